"""What `turnout serve` and `turnout demo` check before they start, and how they log.

Rules of this file (issue #13):
* Every start-up failure a wrong setting or argument can cause is one line naming the
  setting, the flag or variable that sets it, and the value: never a traceback, never a bare
  errno. The listeners are checked by binding them once before anything starts (a busy port
  is the most common first-day failure).
* Logs are "human" lines or one JSON object per line (`log_format`); audit records keep
  their fields in JSON mode rather than nesting a JSON string in a JSON string.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

import orjson

from stores.settings import Settings, SettingsError

HUMAN_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def _listen_error(setting: str, flag: str, host: str, port: int, exc: OSError) -> SettingsError:
    env = f"TURNOUT_{setting.upper()}"
    if exc.errno == errno.EADDRINUSE:
        return SettingsError(
            setting,
            f"port {port} on {host} is already in use: choose another with {flag}, "
            f"{env}, or {setting} in the settings file",
        )
    if exc.errno == errno.EACCES:
        return SettingsError(
            setting,
            f"not allowed to listen on port {port} (ports below 1024 need privileges): "
            f"choose another with {flag} or {env}",
        )
    host_setting = setting.replace("_port", "_host")
    return SettingsError(
        host_setting,
        f"cannot listen on {host}:{port}: {exc.strerror or exc}; check {host_setting} "
        f"(TURNOUT_{host_setting.upper()})",
    )


def check_listeners(
    settings: Settings, flags: tuple[str, str] = ("TURNOUT_EDGE_PORT", "TURNOUT_ADMIN_PORT")
) -> None:
    """Bind each listener's address once (and release it) so a busy or forbidden port is a
    `SettingsError` naming the setting before anything starts. `flags` names the command-line
    options that set the two ports, for the message (the demo has its own)."""
    listeners = (
        ("edge_port", flags[0], settings.edge_host, settings.edge_port),
        ("admin_port", flags[1], settings.admin_host, settings.admin_port),
    )
    if (settings.edge_host, settings.edge_port) == (settings.admin_host, settings.admin_port):
        if settings.edge_port != 0:
            raise SettingsError(
                "admin_port",
                f"the edge and the admin API cannot both listen on port {settings.edge_port}",
            )
    for setting, flag, host, port in listeners:
        if port == 0:
            continue  # the kernel picks a free port
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        except socket.gaierror as exc:
            host_setting = setting.replace("_port", "_host")
            raise SettingsError(
                host_setting, f"cannot resolve {host!r}: {exc.strerror or exc}"
            ) from None
        family, kind, proto, _, address = infos[0]
        with socket.socket(family, kind, proto) as probe:
            # The same option the servers set: a port in TIME_WAIT is not "in use".
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(address)
            except OSError as exc:
                raise _listen_error(setting, flag, host, port, exc) from None


def check_writable_dirs(settings: Settings) -> None:
    """The state directory (and the bootstrap file's and the embedded store's directories)
    exist or can be created, and can be written, and an access log file can be opened: a
    `SettingsError` naming the setting otherwise, instead of a traceback from deep inside."""
    places = [("state_dir", Path(settings.state_dir))]
    if settings.bootstrap_path:
        places.append(("bootstrap_path", Path(settings.bootstrap_path).parent))
    if settings.store_dir is not None and settings.store:
        places.append(("store", settings.store_dir))
    for setting, directory in places:
        try:
            directory.mkdir(parents=True, exist_ok=True)
            probe = directory / f".turnout-write-check-{os.getpid()}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as exc:
            raise SettingsError(
                setting,
                f"cannot create or write {directory}: {exc.strerror or exc} "
                f"(TURNOUT_{setting.upper()})",
            ) from None
    if settings.access_log not in ("off", "stdout", "stderr"):
        # Checked here too because in worker mode only the edge workers open it (each its own
        # append-mode descriptor): a bad path must stop `turnout serve`, not loop restarts.
        try:
            with Path(settings.access_log).open("ab"):
                pass
        except OSError as exc:
            raise SettingsError(
                "access_log", f"cannot open {settings.access_log}: {exc.strerror or exc}"
            ) from None


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time (RFC 3339, UTC), level, logger, message, the edge
    worker's number in worker mode, and the audit record's own fields for an audit line."""

    def __init__(self, worker: int | None = None) -> None:
        super().__init__()
        self.worker = worker

    def format(self, record: logging.LogRecord) -> str:
        data: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
        }
        if self.worker is not None:
            data["worker"] = self.worker
        audit = getattr(record, "audit", None)
        if isinstance(audit, dict):
            data["message"] = "audit"
            data["audit"] = audit
        else:
            data["message"] = record.getMessage()
        if record.exc_info:
            data["error"] = self.formatException(record.exc_info)
        return orjson.dumps(data, default=str).decode()


class HumanFormatter(logging.Formatter):
    """`time level logger: message` (`logger[worker K]` in an edge worker); an audit record
    as a sentence instead of raw JSON."""

    def __init__(self, worker: int | None = None) -> None:
        fmt = HUMAN_FORMAT
        if worker is not None:
            fmt = fmt.replace("%(name)s:", f"%(name)s[worker {worker}]:")
        super().__init__(fmt)

    def format(self, record: logging.LogRecord) -> str:
        audit = getattr(record, "audit", None)
        if isinstance(audit, dict):
            record.msg, record.args = describe_audit(audit), None
        return super().format(record)


def describe_audit(audit: dict[str, Any]) -> str:
    """One audit record as a line a person reads: who did what, the result and versions."""
    before, after = audit.get("before_version"), audit.get("after_version")
    versions = ""
    if after is not None and after != before:
        versions = f", version {before} -> {after}"
    elif before is not None:
        versions = f", version {before} unchanged"
    detail = f": {audit['detail']}" if audit.get("detail") else ""
    reason = f" (reason: {audit['reason']})" if audit.get("reason") else ""
    return (
        f"{audit.get('result')} {audit.get('action')} {audit.get('target')} by "
        f"{audit.get('actor')} from {audit.get('client') or '?'} "
        f"[HTTP {audit.get('status')}{versions}]{reason}{detail}"
    )


def configure_logging(settings: Settings, worker: int | None = None) -> None:
    """Root logging for a Turnout process: level and format from the settings, to stderr.
    `worker` is the edge worker's number in `--workers N` mode (turnout/edgeworker.py), so
    its lines say which worker wrote them in either format."""
    handler = logging.StreamHandler(sys.stderr)
    if settings.log_format == "json":
        handler.setFormatter(JsonFormatter(worker))
    else:
        handler.setFormatter(HumanFormatter(worker))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(settings.log_level.upper())
    # uvicorn's own loggers propagate to the root: one format for every line.
    for name in ("uvicorn", "uvicorn.error"):
        logging.getLogger(name).handlers.clear()
        logging.getLogger(name).propagate = True
    # The demo's WebSocket echo servers say "server closing" at INFO: noise for an operator.
    logging.getLogger("websockets").setLevel(logging.WARNING)
