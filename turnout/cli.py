"""The `turnout` command: run an instance, run the demo, and drive the admin API.

Exit codes (the same for every command):
    0  done
    1  the admin API refused the request (its message and field are printed)
    2  usage error (bad arguments, unreadable file)
    3  the admin API could not be reached (one line naming the URL)

The environment is read only through `CliSettings` and `stores.settings` (DESIGN.md §1 rule
3). The admin URL and token come from, strongest first: `--admin` / `--token`, the
`TURNOUT_ADMIN_URL` / `TURNOUT_ADMIN_TOKEN` variables, the settings file (`--config FILE` or
`TURNOUT_CONFIG`: its `admin_host`, `admin_port`, `admin_token`), then the token file in the
state directory, so the CLI works from any directory (issue #13).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import json
import re
import sys
import textwrap
import time
import urllib.parse
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from pydantic import SecretStr, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

from flags.diff import diff_documents
from flags.document import Document, load_document
from flags.errors import ConfigError
from stores.settings import load_settings
from stores.yamlfile import YamlError, read_mapping_file
from turnout import cli_flags

if TYPE_CHECKING:
    # Imported lazily by the client commands only: `turnout serve` and its edge workers
    # never load httpx (a worker's memory counts, issue #9).
    import httpx

EXIT_OK = 0
EXIT_REFUSED = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3

DEFAULT_ADMIN_URL = "http://127.0.0.1:8081"
DEFAULT_STATE_DIR = "./turnout-data"
DEFAULT_TIMEOUT_S = 10.0
CONNECT_TIMEOUT_S = 3.0
TOKEN_FILE_NAME = "admin-token"  # noqa: S105 - a file name; the same as admin.auth's
# A number (with an optional sign, so `-5` gets the range message, not "unknown stage").
_PERCENT = re.compile(r"^([-+]?[0-9]+(?:\.[0-9]*)?|[-+]?\.[0-9]+)\s*%?$")
HELP_WIDTH = 78
OUTPUT_TEXT = "text"
OUTPUT_JSON = "json"


class CliSettings(BaseSettings):
    """What the CLI takes from the environment (`TURNOUT_*`)."""

    model_config = SettingsConfigDict(env_prefix="TURNOUT_", extra="ignore")

    admin_url: str | None = None
    admin_token: SecretStr | None = None
    state_dir: str = DEFAULT_STATE_DIR
    actor: str | None = None
    config: str | None = None  # TURNOUT_CONFIG: the settings file the instance runs with


class UsageError(Exception):
    """Bad arguments or an unreadable input file (exit 2)."""


class AdminUnreachable(Exception):
    """No HTTP answer from the admin API (exit 3)."""


class ApiRefused(Exception):
    """The admin API answered with an error (exit 1)."""

    def __init__(self, status: int, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.field = field


class AdminClient:
    """A small synchronous client of the admin API (`/api/v1`)."""

    def __init__(
        self,
        base_url: str,
        *,
        token: str | None,
        actor: str | None = None,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        if not base_url.startswith(("http://", "https://")):
            raise UsageError(f"the admin URL must start with http:// or https://, got {base_url!r}")
        self.base_url = base_url.rstrip("/")
        headers = {"Accept": "application/json"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        if actor:
            headers["X-Turnout-Actor"] = actor
        import httpx

        timeout = httpx.Timeout(timeout_s, connect=min(CONNECT_TIMEOUT_S, timeout_s))
        self._http = httpx.Client(
            base_url=self.base_url, headers=headers, timeout=timeout, transport=transport
        )

    def close(self) -> None:
        self._http.close()

    def send(
        self,
        method: str,
        path: str,
        *,
        body: Any = None,
        params: dict[str, str] | None = None,
        if_match: int | None = None,
        ok_statuses: Sequence[int] = (200, 202),  # 202: a local override was accepted
    ) -> tuple[int, Any]:
        """One request; the status and decoded JSON, `ApiRefused` for other statuses."""
        import httpx

        headers = {"If-Match": f'"{if_match}"'} if if_match is not None else {}
        content: bytes | None = None
        if body is not None:
            headers["Content-Type"] = "application/json"
            try:
                content = json.dumps(body, default=str, allow_nan=False).encode()
            except ValueError:
                raise UsageError(
                    "the input holds a number JSON cannot carry (NaN or infinity)"
                ) from None
        try:
            response = self._http.request(
                method, path, content=content, params=params, headers=headers
            )
        except httpx.TransportError as exc:
            detail = str(exc) or type(exc).__name__
            raise AdminUnreachable(
                f"cannot reach the Turnout admin API at {self.base_url}: {detail}"
            ) from None
        try:
            data = response.json()
        except ValueError:
            data = None
        if response.status_code in ok_statuses and data is not None:
            return response.status_code, data
        if isinstance(data, dict) and isinstance(data.get("error"), str):
            field = data.get("field")
            raise ApiRefused(
                response.status_code, data["error"], field if isinstance(field, str) else None
            )
        raise ApiRefused(
            response.status_code,
            f"unexpected answer from {self.base_url}{path}: HTTP {response.status_code}",
        )

    def get(self, path: str, params: dict[str, str] | None = None) -> Any:
        return self.send("GET", path, params=params)[1]

    def write(self, method: str, path: str, body: Any, if_match: int | None) -> Any:
        return self.send(method, path, body=body, if_match=if_match)[1]


# -- configuration of a command ---------------------------------------------------------------


class Target:
    """Where the CLI sends its requests: the admin URL and the token, with where they came
    from (for the hint on a 401)."""

    def __init__(self, url: str, token: str | None, token_source: str) -> None:
        self.url = url
        self.token = token
        self.token_source = token_source


def _connect_host(host: str) -> str:
    """The address to call for a listener bound to `host` (a wildcard means this machine)."""
    host = host.strip().strip("[]")
    if host in ("", "0.0.0.0"):
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    return f"[{host}]" if ":" in host else host


def _token_file_candidates(state_dir: str, config: str | None) -> list[Path]:
    """`<state_dir>/admin-token`; a relative state_dir is tried from here and, with a
    settings file, from that file's directory too."""
    paths = [Path(state_dir) / TOKEN_FILE_NAME]
    if config is not None and not Path(state_dir).is_absolute():
        paths.append(Path(config).resolve().parent / state_dir / TOKEN_FILE_NAME)
    return paths


def resolve_target(args: argparse.Namespace) -> Target:
    """The admin URL and token for this command (see the module docstring for the order)."""
    env = CliSettings()
    config = getattr(args, "config", None) or env.config
    url = getattr(args, "admin", None) or env.admin_url
    token = getattr(args, "token", None)
    source = "--token"
    if not token and env.admin_token is not None:
        token, source = env.admin_token.get_secret_value(), "TURNOUT_ADMIN_TOKEN"
    state_dir = env.state_dir
    if config is not None or url is None or not token:
        try:
            settings = load_settings(config)
        except ConfigError as exc:
            raise UsageError(f"{exc.field}: {exc.message}") from None
        if url is None:
            url = f"http://{_connect_host(settings.admin_host)}:{settings.admin_port}"
        if not token and settings.admin_token is not None:
            token = settings.admin_token.get_secret_value()
            source = f"admin_token in {config}" if config else "TURNOUT_ADMIN_TOKEN"
        state_dir = settings.state_dir
    if not token:
        for path in _token_file_candidates(state_dir, config):
            try:
                token = path.read_text(encoding="utf-8").strip() or None
            except (OSError, UnicodeDecodeError):
                continue
            if token:
                source = str(path)
                break
    if not token:
        source = "none found"
    return Target(url or DEFAULT_ADMIN_URL, token, source)


def make_client(args: argparse.Namespace) -> AdminClient:
    target = resolve_target(args)
    args.target = target
    return AdminClient(
        target.url,
        token=target.token,
        actor=getattr(args, "actor", None) or CliSettings().actor,
        timeout_s=getattr(args, "timeout", None) or DEFAULT_TIMEOUT_S,
    )


def _quote(name: str) -> str:
    return urllib.parse.quote(name, safe="")


# -- output -----------------------------------------------------------------------------------


def _table(rows: list[list[str]], out: TextIO) -> None:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print(
            "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip(),
            file=out,
        )


def _percent(value: Any) -> str:
    return f"{value:g}" if isinstance(value, (int, float)) else "-"


def _json_out(data: Any) -> None:
    print(json.dumps(data, indent=2, sort_keys=True))


def _wants_json(args: argparse.Namespace) -> bool:
    return getattr(args, "output", OUTPUT_TEXT) == OUTPUT_JSON


def _changes(data: Any) -> None:
    for change in data.get("changes") or []:
        text = change.get("text") if isinstance(change, dict) else None
        if text:
            print(f"  {text}")


def _written(data: Any, args: argparse.Namespace | None = None) -> None:
    if args is not None and _wants_json(args):
        _json_out(data)
        return
    if data.get("local_override"):
        print(f"local override on this instance: {data.get('summary', '')} ({data.get('message')})")
        return
    if data.get("dry_run"):
        changes = data.get("changes") or []
        if changes:
            print(f"dry run: against version {data.get('version')}, this would change:")
            _changes(data)
        else:
            print(
                f"dry run: no change (the configuration is already this, version {data.get('version')})"
            )
        print("nothing was written")
        return
    if data.get("changed") is False:
        print(f"no change: version {data.get('version')} already says this; no version written")
        return
    print(f"version {data.get('version')}: {data.get('summary', '')}")
    _changes(data)


# -- commands ---------------------------------------------------------------------------------


def cmd_stage(client: AdminClient, args: argparse.Namespace) -> int:
    value: str = args.value.strip()
    match = _PERCENT.match(value)
    body: dict[str, Any] = (
        {"percent": float(match.group(1))} if match is not None else {"stage": value}
    )
    if args.local:
        body["local_override"] = True
    _written(
        client.write("POST", f"/api/v1/releases/{_quote(args.release)}/stage", body, args.if_match),
        args,
    )
    return EXIT_OK


def cmd_rollback(client: AdminClient, args: argparse.Namespace) -> int:
    path = f"/api/v1/releases/{_quote(args.release)}/rollback"
    body: dict[str, Any] = {"reason": args.reason}
    if args.local:
        body["local_override"] = True
    _written(client.write("POST", path, body, args.if_match), args)
    return EXIT_OK


def cmd_store_reseed(client: AdminClient, args: argparse.Namespace) -> int:
    data = client.write("POST", "/api/v1/store/reseed", None, None)
    if _wants_json(args):
        _json_out(data)
    elif data.get("reseeded"):
        print(f"store re-seeded with version {data.get('version')} from this instance")
    else:
        print(f"nothing to do: the store already holds version >= {data.get('version')}")
    return EXIT_OK


def cmd_status(client: AdminClient, args: argparse.Namespace) -> int:
    listing = client.get("/api/v1/releases")
    _, ready = client.send("GET", "/readyz", ok_statuses=(200, 503))
    if _wants_json(args):
        _json_out({"config": listing, "instance": ready})
        return EXIT_OK
    state = ready.get("status", "?") if isinstance(ready, dict) else "?"
    if isinstance(ready, dict) and ready.get("stale"):
        state += ", stale"
    if listing.get("source") == "instance":
        print(
            f"store unreachable ({listing.get('store_error')}): showing what this instance "
            f"serves, version {listing.get('version')} (stale)"
        )
    else:
        print(
            f"config version {listing.get('version')} "
            f"(this instance serves version {ready.get('version')} from {ready.get('source')}: {state})"
        )
    releases = listing.get("releases", [])
    if not releases:
        print("no releases")
        return EXIT_OK
    rows = [["RELEASE", "STAGE", "PERCENT", "STABLE", "CANARY"]]
    notes: list[str] = []
    for rel in releases:
        rows.append(
            [
                str(rel.get("name")),
                str(rel.get("stage")),
                _percent(rel.get("effective_percent")),
                ",".join(rel.get("stable", [])),
                ",".join(rel.get("canary", [])),
            ]
        )
        rollback = rel.get("rollback")
        if isinstance(rollback, dict):
            was = rollback.get("from_stage")
            if was == "custom":
                was = f"{_percent(rollback.get('from_percent'))} %"
            notes.append(f"{rel.get('name')}: rolled back from {was}: {rollback.get('reason')}")
    _table(rows, sys.stdout)
    for note in notes:
        print(note)
    return EXIT_OK


def cmd_explain(client: AdminClient, args: argparse.Namespace) -> int:
    params = {"unit_id": args.unit_id}
    if args.email:
        params["email"] = args.email
    data = client.get(f"/api/v1/releases/{_quote(args.release)}/explain", params=params)
    if _wants_json(args):
        _json_out(data)
        return EXIT_OK
    print(f"{data.get('unit_id')} -> {data.get('arm')} ({data.get('reason')})")
    print(f"  {data.get('explanation')}")
    print(
        f"  release {data.get('release')}, stage {data.get('stage')}, "
        f"{_percent(data.get('percent'))} % (threshold {data.get('threshold')}), "
        f"position {data.get('position')}, salt {data.get('salt')}, "
        f"config version {data.get('version')}{' (stale)' if data.get('stale') else ''}"
    )
    return EXIT_OK


def cmd_versions(client: AdminClient, args: argparse.Namespace) -> int:
    data = client.get("/api/v1/versions", params={"limit": str(args.limit)})
    if _wants_json(args):
        _json_out(data)
        return EXIT_OK
    current = data.get("current")
    rows = [["", "VERSION", "TIME", "ACTOR", "SUMMARY"]]
    for info in data.get("versions", []):
        stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(info.get("created_at", 0))))
        mark = "*" if info.get("version") == current else ""
        rows.append(
            [
                mark,
                str(info.get("version")),
                stamp,
                str(info.get("actor")),
                str(info.get("summary")),
            ]
        )
    if len(rows) == 1:
        print("no versions yet")
        return EXIT_OK
    _table(rows, sys.stdout)
    return EXIT_OK


def cmd_restore(client: AdminClient, args: argparse.Namespace) -> int:
    body = {"reason": args.reason} if args.reason else {}
    _written(
        client.write("POST", f"/api/v1/versions/{args.version}/restore", body, args.if_match),
        args,
    )
    return EXIT_OK


def read_document_file(path: str) -> dict[str, Any]:
    """A YAML or JSON file (JSON is YAML) holding one mapping, through Turnout's one YAML
    loader: YAML 1.2 (`off` is the stage off), duplicate keys refused with their line."""
    try:
        return read_mapping_file(path, "the configuration document")
    except YamlError as exc:
        raise UsageError(str(exc)) from None


def cmd_validate(args: argparse.Namespace) -> int:
    """Validate a document file locally (no server): YAML, schema and cross-references."""
    try:
        raw = read_mapping_file(args.file, "the configuration document")
        document = load_document(raw)
    except YamlError as exc:
        return _invalid(args, str(exc))
    except ConfigError as exc:
        return _invalid(args, f"{args.file}: {exc.field}: {exc.message}", exc.field)
    routed = {route.release for route in document.routes}
    if _wants_json(args):
        _json_out(
            {
                "valid": True,
                "file": args.file,
                "releases": sorted(document.releases),
                "routes": len(document.routes),
            }
        )
    else:
        print(
            f"{args.file}: valid ({len(document.releases)} releases, {len(document.routes)} routes)"
        )
        unrouted = sorted(set(document.releases) - routed)
        if not document.routes:
            print("  note: no routes: every request would get 404")
        elif unrouted:
            print(f"  note: no route points at {', '.join(unrouted)}")
    return EXIT_OK


def _invalid(args: argparse.Namespace, message: str, field: str | None = None) -> int:
    if _wants_json(args):
        _json_out({"valid": False, "file": args.file, "error": message, "field": field})
    else:
        _error(f"invalid: {message}")
    return EXIT_REFUSED


def cmd_apply(client: AdminClient, args: argparse.Namespace) -> int:
    document = read_document_file(args.file)
    params = []
    if args.dry_run:
        params.append("dry_run=true")
    if args.allow_empty:
        params.append("allow_empty=true")
    path = "/api/v1/config" + (f"?{'&'.join(params)}" if params else "")
    _written(client.write("PUT", path, document, args.if_match), args)
    return EXIT_OK


def _document_of(client: AdminClient, version: int | None) -> Document:
    path = "/api/v1/config" if version is None else f"/api/v1/versions/{version}"
    data = client.get(path)
    try:
        return load_document(data.get("document") or {})
    except ConfigError as exc:
        raise ApiRefused(200, f"the server sent an unreadable document: {exc}") from None


def cmd_diff(client: AdminClient, args: argparse.Namespace) -> int:
    """`diff` (previous -> current), `diff N` (N -> current), `diff N M` (N -> M)."""
    new_version: int | None = args.new
    if args.old is None:
        current = _document_of(client, None)
        if current.version <= 1:
            print(f"nothing to compare: the configuration is at version {current.version}")
            return EXIT_OK
        old, new = _document_of(client, current.version - 1), current
    else:
        old = _document_of(client, args.old)
        new = _document_of(client, new_version)
    changes = diff_documents(old, new)
    if _wants_json(args):
        _json_out(
            {
                "from": old.version,
                "to": new.version,
                "changes": [change.to_dict() for change in changes],
            }
        )
        return EXIT_OK
    print(f"version {old.version} -> {new.version}:")
    if not changes:
        print("  no change")
    for change in changes:
        print(f"  {change.text}")
    return EXIT_OK


def cmd_get(client: AdminClient, args: argparse.Namespace) -> int:
    path = "/api/v1/config" if args.version is None else f"/api/v1/versions/{args.version}"
    data = client.get(path)
    print(json.dumps(data.get("document"), indent=2, sort_keys=True))
    return EXIT_OK


def cmd_serve(args: argparse.Namespace) -> int:
    from stores.settings import Settings

    overrides: dict[str, Any] = {}
    if args.edge_port is not None:
        overrides["edge_port"] = args.edge_port
    if args.admin_port is not None:
        overrides["admin_port"] = args.admin_port
    if args.workers is not None:
        overrides["workers"] = args.workers
    config = args.config or CliSettings().config
    try:
        # Every settings failure (a bad value, an unknown key, the removed edge_server) is one
        # ConfigError worded by flags/wording.py: one line naming the setting.
        settings = load_settings(config, **overrides)
    except ConfigError as exc:
        raise UsageError(f"invalid settings: {exc}") from None
    # Imported by name at run time: the CLI's other commands (and its type check) must not
    # depend on the data plane's modules.
    run: Callable[..., None] = importlib.import_module("turnout.server").run

    def reload() -> Settings:  # SIGHUP: the same file and command-line overrides, read again
        return load_settings(config, **overrides)

    try:
        run(settings, reload=reload)
    except ConfigError as exc:
        raise UsageError(f"{exc.field}: {exc.message}" if exc.field else exc.message) from None
    except ValidationError as exc:  # a setting checked only when used (defensive)
        raise UsageError(f"invalid setting: {exc.errors(include_url=False)[0]['loc']}") from None
    return EXIT_OK


def cmd_demo(args: argparse.Namespace) -> int:
    from turnout.demo import run_demo

    return run_demo(
        traffic=args.traffic,
        edge_port=args.edge_port,
        admin_port=args.admin_port,
        state_dir=CliSettings().state_dir,
    )


# -- parser -----------------------------------------------------------------------------------

ClientCommand = Callable[[AdminClient, argparse.Namespace], int]
LOCAL_HINT = (
    "the configuration store is unreachable: add --local to apply this on the instance now "
    "(it becomes a new version when the store returns)"
)


def _version() -> str:
    try:
        return importlib.metadata.version("turnout")
    except importlib.metadata.PackageNotFoundError:  # running from a source tree
        return "unknown"


def _client_options(parser: argparse.ArgumentParser) -> None:
    # SUPPRESS: given before or after the command name, the value is kept (a subparser's
    # default would otherwise overwrite the main parser's value).
    group = parser.add_argument_group("admin API")
    group.add_argument(
        "--admin",
        metavar="URL",
        default=argparse.SUPPRESS,
        help="admin API URL (default: TURNOUT_ADMIN_URL, else admin_host:admin_port of the "
        f"settings, else {DEFAULT_ADMIN_URL})",
    )
    group.add_argument(
        "--token",
        default=argparse.SUPPRESS,
        help="admin token (default: TURNOUT_ADMIN_TOKEN, else admin_token of the settings "
        "file, else <state_dir>/admin-token)",
    )
    group.add_argument(
        "--config",
        metavar="FILE",
        default=argparse.SUPPRESS,
        help="the instance's settings file, to find its admin URL and token from any "
        "directory (default: TURNOUT_CONFIG)",
    )
    group.add_argument(
        "--actor",
        default=argparse.SUPPRESS,
        help="your name in the audit log and the version history (default: TURNOUT_ACTOR)",
    )
    group.add_argument(
        "--timeout",
        type=_seconds,
        metavar="S",
        default=argparse.SUPPRESS,
        help=f"seconds to wait for each answer (default {DEFAULT_TIMEOUT_S:g})",
    )


def _output_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--output",
        "-o",
        choices=[OUTPUT_TEXT, OUTPUT_JSON],
        default=OUTPUT_TEXT,
        help="text for people (default) or json for scripts",
    )


def _version_number(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"not a version number: {text!r}")
    return int(text)


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 < value <= 3600:
        raise argparse.ArgumentTypeError(f"must be seconds between 0 and 3600, got {text!r}")
    return value


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number of 1 or more, got {text!r}")
    return int(text)


def _port(text: str) -> int:
    if not text.isdigit() or not 0 <= int(text) <= 65535:
        raise argparse.ArgumentTypeError(f"must be a port number from 0 to 65535, got {text!r}")
    return int(text)


def _paragraph(text: str) -> str:
    """A description wrapped for the terminal (the raw formatter keeps the examples' layout)."""
    return textwrap.fill(text, HELP_WIDTH, break_on_hyphens=False)


def _examples(*lines: str) -> str:
    return "examples:\n" + "\n".join(f"  {line}" for line in lines)


def build_parser() -> argparse.ArgumentParser:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(
        prog="turnout",
        description=_paragraph("Feature-flag and canary-routing edge proxy."),
        formatter_class=formatter,
        epilog=_examples(
            "turnout demo                          # try it: two backends, edge :8080, admin :8081",
            "turnout serve --config settings.yaml  # run an instance",
            "turnout status                        # releases, stages, config version",
            "turnout stage web beta                # move a release",
            "turnout COMMAND --help                # every command's options and examples",
        ),
    )
    parser.add_argument("--version", action="version", version=f"turnout {_version()}")
    _client_options(parser)
    commands = parser.add_subparsers(
        dest="command", metavar="COMMAND", help="what to do (turnout COMMAND --help)"
    )

    serve = commands.add_parser(
        "serve",
        help="run the edge and admin listeners",
        description=_paragraph("Run one Turnout instance: the edge (proxy) and the admin API."),
        formatter_class=formatter,
        epilog=_examples(
            "turnout serve --config settings.yaml",
            "TURNOUT_STATE_DIR=/var/lib/turnout turnout serve --edge-port 80",
            "turnout serve --config settings.yaml --workers auto  # one edge process per core",
        ),
    )
    serve.add_argument(
        "--config",
        metavar="FILE",
        help="YAML settings file (default: TURNOUT_CONFIG; every setting also as TURNOUT_<NAME>)",
    )
    serve.add_argument(
        "--edge-port", type=_port, metavar="PORT", help="the proxy's port (setting edge_port)"
    )
    serve.add_argument(
        "--admin-port",
        type=_port,
        metavar="PORT",
        help="the admin API's port (setting admin_port)",
    )
    serve.add_argument(
        "--workers",
        metavar="N",
        help='edge processes sharing the edge port (a number or "auto"; setting workers)',
    )
    serve.set_defaults(run=cmd_serve)

    demo = commands.add_parser(
        "demo",
        help="run a self-contained demo with two backends",
        description=_paragraph(
            "A whole Turnout with two demo backends and release 'web' at stage beta. "
            "Its store is temporary; the admin token is kept in ./turnout-data/admin-token."
        ),
        formatter_class=formatter,
        epilog=_examples(
            "turnout demo",
            "turnout demo --traffic                       # with synthetic users",
            "turnout demo --edge-port 9080 --admin-port 9081   # when 8080/8081 are taken",
        ),
    )
    demo.add_argument(
        "--traffic", action="store_true", help="drive synthetic users through the edge"
    )
    demo.add_argument(
        "--edge-port", type=_port, default=8080, metavar="PORT", help="the edge's port (8080)"
    )
    demo.add_argument(
        "--admin-port",
        type=_port,
        default=8081,
        metavar="PORT",
        help="the admin API's port (8081)",
    )
    demo.set_defaults(run=cmd_demo)

    validate = commands.add_parser(
        "validate",
        help="check a configuration document file (no server needed)",
        description=_paragraph(
            "Check a YAML or JSON configuration document as the server would: YAML "
            "1.2, duplicate keys, fields, stages, cohorts and routes. Exit 0 valid, 1 invalid."
        ),
        formatter_class=formatter,
        epilog=_examples("turnout validate routing.yaml", "turnout validate routing.yaml -o json"),
    )
    validate.add_argument("file", metavar="FILE", help="the document (YAML or JSON)")
    _output_option(validate)
    validate.set_defaults(run=cmd_validate)

    def client_command(
        name: str,
        help_text: str,
        func: ClientCommand,
        examples: tuple[str, ...],
        *,
        writes: bool = False,
        reads: bool = False,
        description: str | None = None,
    ) -> argparse.ArgumentParser:
        sub = commands.add_parser(
            name,
            help=help_text,
            description=_paragraph(description or help_text[0].upper() + help_text[1:] + "."),
            formatter_class=formatter,
            epilog=_examples(*examples),
        )
        _client_options(sub)
        if writes:
            sub.add_argument(
                "--if-match",
                type=_version_number,
                metavar="N",
                help="only if the config is still at version N (else refused with 412)",
            )
        if reads or writes:
            _output_option(sub)
        sub.set_defaults(client_run=func)
        return sub

    release_help = "the release's name (as in the document's releases)"
    local_help = (
        "if the store is unreachable, apply on this instance now and commit when it returns"
    )
    stage = client_command(
        "stage",
        "move a release to a stage or a percentage",
        cmd_stage,
        ("turnout stage web beta", "turnout stage web 12.5", "turnout stage web off --local"),
        writes=True,
    )
    stage.add_argument("release", metavar="RELEASE", help=release_help)
    stage.add_argument(
        "value",
        metavar="STAGE|PERCENT",
        help="a stage name (off, internal, beta, open, ga, or the document's own) or a "
        "percentage from 0 to 100 in 0.001 steps, such as 12.5",
    )
    stage.add_argument("--local", action="store_true", help=local_help)

    rollback = client_command(
        "rollback",
        "send everyone (internal users too) to stable on the next request",
        cmd_rollback,
        ('turnout rollback web --reason "5xx at 4 %"', "turnout rollback web --reason x --local"),
        writes=True,
    )
    rollback.add_argument("release", metavar="RELEASE", help=release_help)
    rollback.add_argument(
        "--reason",
        required=True,
        help="why (kept in the document and shown by explain and status)",
    )
    rollback.add_argument("--local", action="store_true", help=local_help)

    store = commands.add_parser(
        "store",
        help="store maintenance",
        description=_paragraph("Store maintenance."),
        formatter_class=formatter,
        epilog=_examples("turnout store reseed"),
    )
    store_commands = store.add_subparsers(
        dest="store_command", metavar="ACTION", help="what to do (see its --help)"
    )
    reseed = store_commands.add_parser(
        "reseed",
        help="write this instance's last-known-good configuration back to the store",
        description=_paragraph(
            "Write the configuration this instance serves back to the store, at the "
            "same version (after Redis lost data or a pointer went backwards)."
        ),
        formatter_class=formatter,
        epilog=_examples(
            "turnout store reseed", "turnout --admin http://10.0.0.7:8081 store reseed"
        ),
    )
    _client_options(reseed)
    _output_option(reseed)
    reseed.set_defaults(client_run=cmd_store_reseed)
    store.set_defaults(run=lambda args: _subcommand_missing(store))

    client_command(
        "status",
        "releases, stages and this instance's readiness",
        cmd_status,
        ("turnout status", "turnout status -o json | jq .config.version"),
        reads=True,
    )

    explain = client_command(
        "explain",
        "why a unit gets the arm it gets",
        cmd_explain,
        ("turnout explain web user-42", "turnout explain web bob --email bob@example.com"),
        reads=True,
    )
    explain.add_argument("release", metavar="RELEASE", help=release_help)
    explain.add_argument(
        "unit_id", metavar="UNIT_ID", help="the unit (user) id, as sent in X-User-Id"
    )
    explain.add_argument(
        "--email", help="the unit's e-mail address, for the internal e-mail domains"
    )

    versions = client_command(
        "versions",
        "the configuration history, newest first",
        cmd_versions,
        ("turnout versions", "turnout versions --limit 5"),
        reads=True,
    )
    versions.add_argument(
        "--limit", type=_positive, default=20, metavar="N", help="how many versions (20)"
    )

    restore = client_command(
        "restore",
        "write a new version with version N's content",
        cmd_restore,
        ("turnout restore 3", 'turnout restore 3 --reason "undo the 12:05 change"'),
        writes=True,
    )
    restore.add_argument(
        "version", type=_version_number, metavar="N", help="the version to bring back"
    )
    restore.add_argument("--reason", help="why (added to the version's summary)")

    apply = client_command(
        "apply",
        "replace the configuration with a YAML or JSON file",
        cmd_apply,
        (
            "turnout apply routing.yaml --dry-run   # what would change, nothing written",
            "turnout apply routing.yaml",
            "turnout apply empty.yaml --allow-empty",
        ),
        writes=True,
        description=_paragraph(
            "Replace the whole configuration document. Prints what changes per "
            "release, route and stage. An identical document writes no version; one that would "
            "drop every route, or every release that has traffic, is refused unless --allow-empty."
        ),
    )
    apply.add_argument("file", metavar="FILE", help="the document (YAML or JSON)")
    apply.add_argument(
        "--dry-run",
        action="store_true",
        help="validate and show what would change, write nothing",
    )
    apply.add_argument(
        "--allow-empty",
        action="store_true",
        help="allow a document that drops every route or every release with traffic",
    )

    diff = client_command(
        "diff",
        "what changed between two versions",
        cmd_diff,
        (
            "turnout diff            # the previous version -> the current one",
            "turnout diff 3",
            "turnout diff 3 5",
        ),
        reads=True,
        description=_paragraph(
            "What changed per stage, release and route between two versions, and for "
            "a stage change the share of units that change arm (exact for a percentage change "
            "with the same salt: |new - old|, by the bucketing contract)."
        ),
    )
    diff.add_argument("old", type=_version_number, metavar="N", nargs="?", help="from this version")
    diff.add_argument(
        "new",
        type=_version_number,
        metavar="M",
        nargs="?",
        help="to this version (default: the current one)",
    )

    get = client_command(
        "get",
        "print the current configuration document as JSON",
        cmd_get,
        ("turnout get > routing.json", "turnout get --version 3"),
    )
    get.add_argument(
        "--version", type=_version_number, metavar="N", help="an older version instead"
    )
    cli_flags.register(client_command)  # `turnout flag ...` and `turnout import ...` (#11)
    from turnout.cli_rollout import register  # issue #10: plan, maintenance, status RELEASE

    register(commands, client_command)
    return parser


def _subcommand_missing(parser: argparse.ArgumentParser) -> int:
    parser.print_help(sys.stderr)
    return EXIT_USAGE


def _error(message: str) -> None:
    print(f"turnout: {message}", file=sys.stderr)


def run_client_command(func: ClientCommand, args: argparse.Namespace) -> int:
    try:
        client = make_client(args)
    except UsageError as exc:
        _error(str(exc))
        return EXIT_USAGE
    try:
        return func(client, args)
    except ApiRefused as exc:
        where = f" (field: {exc.field})" if exc.field else ""
        _error(f"refused (HTTP {exc.status}): {exc.message}{where}")
        if exc.status == 401:
            target: Target | None = getattr(args, "target", None)
            tried = target.token_source if target is not None else "none found"
            _error(
                f"token used: {tried}. Pass --token, set TURNOUT_ADMIN_TOKEN, or point "
                "--config (TURNOUT_CONFIG) at the instance's settings file"
            )
        elif exc.status == 503 and func in (cmd_stage, cmd_rollback) and not args.local:
            _error(LOCAL_HINT)
        return EXIT_REFUSED
    except AdminUnreachable as exc:
        _error(str(exc))
        return EXIT_UNREACHABLE
    except UsageError as exc:
        _error(str(exc))
        return EXIT_USAGE
    finally:
        client.close()


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse: --help (0) or a usage error (2)
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    client_run: ClientCommand | None = getattr(args, "client_run", None)
    if client_run is not None:
        return run_client_command(client_run, args)
    run: Callable[[argparse.Namespace], int] | None = getattr(args, "run", None)
    if run is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    try:
        return run(args)
    except UsageError as exc:
        _error(str(exc))
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
