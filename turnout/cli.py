"""The `turnout` command: run an instance, run the demo, and drive the admin API.

Exit codes (the same for every command):
    0  done
    1  the admin API refused the request (its message and field are printed)
    2  usage error (bad arguments, unreadable file)
    3  the admin API could not be reached (one line naming the URL)

The environment is read only through `CliSettings` (DESIGN.md §1 rule 3).
"""

from __future__ import annotations

import argparse
import importlib
import json
import re
import sys
import time
import urllib.parse
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TextIO

import httpx
import yaml
from pydantic import SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

EXIT_OK = 0
EXIT_REFUSED = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3

DEFAULT_ADMIN_URL = "http://127.0.0.1:8081"
DEFAULT_STATE_DIR = "./turnout-data"
DEFAULT_TIMEOUT_S = 10.0
CONNECT_TIMEOUT_S = 3.0
TOKEN_FILE_NAME = "admin-token"  # noqa: S105 - a file name; the same as admin.auth's
_PERCENT = re.compile(r"^([0-9]+(?:\.[0-9]+)?)\s*%?$")


class CliSettings(BaseSettings):
    """What the CLI takes from the environment (`TURNOUT_*`)."""

    model_config = SettingsConfigDict(env_prefix="TURNOUT_", extra="ignore")

    admin_url: str = DEFAULT_ADMIN_URL
    admin_token: SecretStr | None = None
    state_dir: str = DEFAULT_STATE_DIR
    actor: str | None = None


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


def read_token(env: CliSettings, explicit: str | None) -> str | None:
    """`--token`, else `TURNOUT_ADMIN_TOKEN`, else `<state_dir>/admin-token` if readable."""
    if explicit:
        return explicit
    if env.admin_token is not None:
        return env.admin_token.get_secret_value()
    try:
        return (Path(env.state_dir) / TOKEN_FILE_NAME).read_text(encoding="utf-8").strip() or None
    except (OSError, UnicodeDecodeError):
        return None


def make_client(args: argparse.Namespace) -> AdminClient:
    env = CliSettings()
    return AdminClient(
        getattr(args, "admin", None) or env.admin_url,
        token=read_token(env, getattr(args, "token", None)),
        actor=getattr(args, "actor", None) or env.actor,
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


def _written(data: Any) -> None:
    if data.get("local_override"):
        print(f"local override on this instance: {data.get('summary', '')} ({data.get('message')})")
        return
    print(f"version {data.get('version')}: {data.get('summary', '')}")


# -- commands ---------------------------------------------------------------------------------


def cmd_stage(client: AdminClient, args: argparse.Namespace) -> int:
    value: str = args.value
    match = _PERCENT.match(value.strip())
    body: dict[str, Any] = (
        {"percent": float(match.group(1))} if match is not None else {"stage": value.strip()}
    )
    if args.local:
        body["local_override"] = True
    _written(
        client.write("POST", f"/api/v1/releases/{_quote(args.release)}/stage", body, args.if_match)
    )
    return EXIT_OK


def cmd_rollback(client: AdminClient, args: argparse.Namespace) -> int:
    path = f"/api/v1/releases/{_quote(args.release)}/rollback"
    body: dict[str, Any] = {"reason": args.reason}
    if args.local:
        body["local_override"] = True
    _written(client.write("POST", path, body, args.if_match))
    return EXIT_OK


def cmd_store_reseed(client: AdminClient, args: argparse.Namespace) -> int:
    data = client.write("POST", "/api/v1/store/reseed", None, None)
    if data.get("reseeded"):
        print(f"store re-seeded with version {data.get('version')} from this instance")
    else:
        print(f"nothing to do: the store already holds version >= {data.get('version')}")
    return EXIT_OK


def cmd_status(client: AdminClient, args: argparse.Namespace) -> int:
    listing = client.get("/api/v1/releases")
    _, ready = client.send("GET", "/readyz", ok_statuses=(200, 503))
    state = ready.get("status", "?") if isinstance(ready, dict) else "?"
    if isinstance(ready, dict) and ready.get("stale"):
        state += ", stale"
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
    _written(client.write("POST", f"/api/v1/versions/{args.version}/restore", body, args.if_match))
    return EXIT_OK


def read_document_file(path: str) -> Any:
    """A YAML or JSON file (JSON is YAML) holding one mapping."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"cannot read {path}: {exc}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise UsageError(f"{path} is not valid YAML or JSON: {exc}") from None
    if not isinstance(data, dict):
        raise UsageError(f"{path} must hold a mapping (the configuration document)")
    return data


def cmd_apply(client: AdminClient, args: argparse.Namespace) -> int:
    document = read_document_file(args.file)
    _written(client.write("PUT", "/api/v1/config", document, args.if_match))
    return EXIT_OK


def cmd_get(client: AdminClient, args: argparse.Namespace) -> int:
    path = "/api/v1/config" if args.version is None else f"/api/v1/versions/{args.version}"
    data = client.get(path)
    print(json.dumps(data.get("document"), indent=2, sort_keys=True))
    return EXIT_OK


def describe_invalid(exc: Any) -> str:
    """A pydantic ValidationError as one line: `field: reason; field: reason`."""
    parts = []
    for error in exc.errors():
        field = ".".join(str(part) for part in error["loc"]) or "settings"
        parts.append(f"{field}: {str(error['msg']).removeprefix('Value error, ')}")
    return "; ".join(parts)


def cmd_serve(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from flags.errors import ConfigError
    from stores.settings import Settings, load_settings

    if args.config is not None and not Path(args.config).is_file():
        raise UsageError(f"no such settings file: {args.config}")
    overrides: dict[str, Any] = {}
    if args.workers is not None:
        overrides["workers"] = args.workers
    try:
        settings = load_settings(args.config, **overrides)
    except ValidationError as exc:
        raise UsageError(f"invalid settings: {describe_invalid(exc)}") from None
    except ConfigError as exc:  # a removed setting names its replacement in one line
        raise UsageError(f"invalid settings: {exc}") from None
    # Imported by name at run time: the CLI's other commands (and its type check) must not
    # depend on the data plane's modules.
    run: Callable[[Settings], None] = importlib.import_module("turnout.server").run
    try:
        run(settings)
    except ConfigError as exc:
        raise UsageError(f"invalid configuration: {exc}") from None
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


def _client_options(parser: argparse.ArgumentParser) -> None:
    # SUPPRESS: given before or after the command name, the value is kept (a subparser's
    # default would otherwise overwrite the main parser's value).
    group = parser.add_argument_group("admin API")
    group.add_argument(
        "--admin",
        metavar="URL",
        default=argparse.SUPPRESS,
        help=f"admin API URL (TURNOUT_ADMIN_URL, default {DEFAULT_ADMIN_URL})",
    )
    group.add_argument(
        "--token",
        default=argparse.SUPPRESS,
        help="admin token (TURNOUT_ADMIN_TOKEN, else <state_dir>/admin-token)",
    )
    group.add_argument(
        "--actor", default=argparse.SUPPRESS, help="name recorded in the audit log (TURNOUT_ACTOR)"
    )
    group.add_argument(
        "--timeout",
        type=float,
        metavar="S",
        default=argparse.SUPPRESS,
        help=f"seconds per request (default {DEFAULT_TIMEOUT_S:g})",
    )


def _version_number(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"not a version number: {text!r}")
    return int(text)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="turnout", description="Feature-flag and canary-routing edge proxy."
    )
    _client_options(parser)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    serve = commands.add_parser("serve", help="run the edge and admin listeners")
    serve.add_argument("--config", metavar="FILE", help="YAML settings file")
    serve.add_argument(
        "--workers",
        metavar="N",
        help='edge processes sharing the edge port (a number or "auto"; overrides `workers`)',
    )
    serve.set_defaults(run=cmd_serve)

    demo = commands.add_parser("demo", help="run a self-contained demo with two backends")
    demo.add_argument(
        "--traffic", action="store_true", help="drive synthetic users through the edge"
    )
    demo.add_argument("--edge-port", type=int, default=8080)
    demo.add_argument("--admin-port", type=int, default=8081)
    demo.set_defaults(run=cmd_demo)

    def client_command(
        name: str, help_text: str, func: ClientCommand, *, writes: bool = False
    ) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text)
        _client_options(sub)
        if writes:
            sub.add_argument(
                "--if-match",
                type=_version_number,
                metavar="N",
                help="only if the config is still at version N",
            )
        sub.set_defaults(client_run=func)
        return sub

    stage = client_command(
        "stage", "move a release to a stage or a percentage", cmd_stage, writes=True
    )
    stage.add_argument("release")
    stage.add_argument(
        "value",
        metavar="STAGE|PERCENT",
        help="off, internal, beta, open, ga, ... or a number such as 12.5",
    )

    rollback = client_command("rollback", "send everyone to stable now", cmd_rollback, writes=True)
    rollback.add_argument("release")
    rollback.add_argument("--reason", required=True)
    local_help = (
        "if the store is unreachable, apply on this instance now and commit when it returns"
    )
    rollback.add_argument("--local", action="store_true", help=local_help)
    stage.add_argument("--local", action="store_true", help=local_help)

    store = client_command("store", "store maintenance", cmd_store_reseed)
    store.add_argument(
        "action",
        choices=["reseed"],
        help="reseed: write this instance's last-known-good configuration back to the store",
    )

    client_command("status", "releases, stages and readiness", cmd_status)

    explain = client_command("explain", "why a unit gets the arm it gets", cmd_explain)
    explain.add_argument("release")
    explain.add_argument("unit_id")
    explain.add_argument("--email")

    versions = client_command("versions", "the configuration history", cmd_versions)
    versions.add_argument("--limit", type=_version_number, default=20)

    restore = client_command(
        "restore", "write a new version with version N's content", cmd_restore, writes=True
    )
    restore.add_argument("version", type=_version_number, metavar="N")
    restore.add_argument("--reason")

    apply = client_command(
        "apply", "replace the configuration with a YAML or JSON file", cmd_apply, writes=True
    )
    apply.add_argument("file", metavar="FILE")

    get = client_command("get", "print the current configuration document as JSON", cmd_get)
    get.add_argument(
        "--version", type=_version_number, metavar="N", help="an older version instead"
    )
    from turnout.cli_rollout import register  # issue #10: plan, maintenance, status RELEASE

    register(commands, client_command)
    return parser


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
            _error(
                "set TURNOUT_ADMIN_TOKEN, pass --token, or run where <state_dir>/admin-token is readable"
            )
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


if __name__ == "__main__":
    sys.exit(main())
