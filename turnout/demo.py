"""`turnout demo`: one Turnout instance, two built-in backends, a seeded release, optional traffic.

Everything listens on 127.0.0.1. The backends are deliberately tiny HTTP/1.1 servers
(keep-alive, Content-Length and chunked request bodies) that answer with JSON saying which
version they are and what the edge told them. A WebSocket upgrade on `/ws` is handed to a
`websockets` echo server on a private port by splicing the two TCP streams, so plain requests
and WebSockets share one backend address, as they do behind a real proxy.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import shutil
import sys
import tempfile
from collections import Counter
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, TextIO

import httpx
import orjson
from pydantic import SecretStr
from websockets.asyncio.server import Server, ServerConnection, serve

from admin.auth import resolve_admin_token, token_file
from flags.errors import ConfigError
from stores.settings import Settings, load_settings
from turnout.startup import check_listeners, configure_logging

DEMO_RELEASE = "web"
DEMO_USERS = 1000
TRAFFIC_RATE_PER_S = 50.0
TRAFFIC_MAX_IN_FLIGHT = 32
TRAFFIC_REQUEST_TIMEOUT_S = 5.0
REPORT_INTERVAL_S = 1.0
BACKEND_IDLE_TIMEOUT_S = 30.0
MAX_HEAD_BYTES = 64 * 1024
DEFAULT_ADMIN_PORT = 8081


# -- the demo backends ------------------------------------------------------------------------


class DemoBackend:
    """A backend that says which version it is: `{"version", "path", "user", "arm_header"}`."""

    def __init__(self, version: str) -> None:
        self.version = version
        self.port = 0
        self._ws_port = 0
        self._http: asyncio.Server | None = None
        self._ws: Server | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        self._ws = await serve(self._echo, "127.0.0.1", 0)
        self._ws_port = next(iter(self._ws.sockets)).getsockname()[1]
        self._http = await asyncio.start_server(
            self._connection, "127.0.0.1", 0, limit=MAX_HEAD_BYTES
        )
        self.port = self._http.sockets[0].getsockname()[1]

    async def close(self) -> None:
        if self._http is not None:
            self._http.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._http.wait_closed(), 2)
        if self._ws is not None:
            self._ws.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._ws.wait_closed(), 2)

    async def _echo(self, connection: ServerConnection) -> None:
        async for message in connection:
            text = message if isinstance(message, str) else message.decode("utf-8", "replace")
            await connection.send(f"{self.version}: {text}")

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                async with asyncio.timeout(BACKEND_IDLE_TIMEOUT_S):
                    head = await reader.readuntil(b"\r\n\r\n")
                method, path, version, headers = _parse_head(head)
                if "websocket" in headers.get("upgrade", "").lower() and path.startswith("/ws"):
                    await self._tunnel(head, reader, writer)
                    return
                await _read_body(reader, headers)
                keep_alive = _keep_alive(version, headers)
                body = orjson.dumps(
                    {
                        "version": self.version,
                        "path": path,
                        "user": headers.get("x-user-id"),
                        "arm_header": headers.get("x-turnout-arm"),
                    }
                )
                writer.write(_response_head(len(body), keep_alive))
                if method != "HEAD":
                    writer.write(body)
                await writer.drain()
                if not keep_alive:
                    return
        except (
            asyncio.IncompleteReadError,
            asyncio.LimitOverrunError,
            ConnectionError,
            TimeoutError,
            ValueError,
        ):
            return
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _tunnel(
        self, head: bytes, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        """Hand the upgrade to the websockets server: replay the head, then splice."""
        ws_reader, ws_writer = await asyncio.open_connection("127.0.0.1", self._ws_port)
        ws_writer.write(head)
        pipes = [
            asyncio.create_task(_pipe(reader, ws_writer)),
            asyncio.create_task(_pipe(ws_reader, writer)),
        ]
        try:
            await asyncio.wait(pipes, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in pipes:
                task.cancel()
            await asyncio.gather(*pipes, return_exceptions=True)
            ws_writer.close()


def _parse_head(head: bytes) -> tuple[str, str, str, dict[str, str]]:
    lines = head.decode("latin-1").split("\r\n")
    method, path, version = lines[0].split(" ", 2)
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if line:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
    return method, path, version, headers


def _keep_alive(version: str, headers: dict[str, str]) -> bool:
    connection = headers.get("connection", "").lower()
    if version == "HTTP/1.0":
        return "keep-alive" in connection
    return "close" not in connection


async def _read_body(reader: asyncio.StreamReader, headers: dict[str, str]) -> None:
    """Consume (and drop) the request body so the next request on the connection parses."""
    if "chunked" in headers.get("transfer-encoding", "").lower():
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0].strip(), 16)
            if size == 0:
                while await reader.readuntil(b"\r\n") != b"\r\n":
                    pass  # trailer fields
                return
            await reader.readexactly(size + 2)
    length = int(headers.get("content-length", "0") or "0")
    if length:
        await reader.readexactly(length)


def _response_head(length: int, keep_alive: bool) -> bytes:
    return (
        "HTTP/1.1 200 OK\r\n"
        "Content-Type: application/json\r\n"
        f"Content-Length: {length}\r\n"
        f"Connection: {'keep-alive' if keep_alive else 'close'}\r\n\r\n"
    ).encode()


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(ConnectionError):
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()


# -- synthetic traffic ------------------------------------------------------------------------


def _arm_of(response: httpx.Response) -> str:
    if response.status_code != 200:
        return f"http_{response.status_code}"
    try:
        version = orjson.loads(response.content).get("version")
    except (orjson.JSONDecodeError, AttributeError):
        return "bad_body"
    return str(version)


async def drive_traffic(
    edge_url: str,
    *,
    rate_per_s: float = TRAFFIC_RATE_PER_S,
    out: TextIO = sys.stdout,
) -> None:
    """Requests from user-0..user-999 at about `rate_per_s`, a count line per second."""
    window: Counter[str] = Counter()
    total: Counter[str] = Counter()
    in_flight: set[asyncio.Task[None]] = set()
    limits = httpx.Limits(max_connections=TRAFFIC_MAX_IN_FLIGHT)

    async with httpx.AsyncClient(
        base_url=edge_url, timeout=TRAFFIC_REQUEST_TIMEOUT_S, limits=limits
    ) as client:

        async def one(n: int) -> None:
            user = f"user-{(n * 7919) % DEMO_USERS}"  # a prime stride spreads the ids
            try:
                arm = _arm_of(await client.get("/", headers={"X-User-Id": user}))
            except httpx.HTTPError:
                arm = "errors"
            window[arm] += 1
            total[arm] += 1

        async def report() -> None:
            seconds = 0
            while True:
                await asyncio.sleep(REPORT_INTERVAL_S)
                seconds += 1
                print(_report_line(seconds, window, total), file=out, flush=True)
                window.clear()

        reporter = asyncio.create_task(report())
        loop = asyncio.get_running_loop()
        interval = 1.0 / rate_per_s
        next_at = loop.time()
        n = 0
        try:
            while True:
                next_at = max(next_at + interval, loop.time() - interval)  # no catch-up bursts
                await asyncio.sleep(max(0.0, next_at - loop.time()))
                if len(in_flight) >= TRAFFIC_MAX_IN_FLIGHT:
                    continue  # the edge is slower than the rate: skip rather than pile up
                task = asyncio.create_task(one(n))
                in_flight.add(task)
                task.add_done_callback(in_flight.discard)
                n += 1
        finally:
            reporter.cancel()
            for task in list(in_flight):
                task.cancel()
            await asyncio.gather(reporter, *in_flight, return_exceptions=True)


def _report_line(seconds: int, window: Counter[str], total: Counter[str]) -> str:
    served = window["stable"] + window["canary"]
    share = f"{100.0 * window['canary'] / served:5.1f} %" if served else "  -  "
    others = "  ".join(
        f"{k} {v}" for k, v in sorted(window.items()) if k not in ("stable", "canary")
    )
    return (
        f"[{seconds:4d}s] stable {window['stable']:3d}  canary {window['canary']:3d}  "
        f"(canary {share})  total stable {total['stable']} canary {total['canary']}"
        + (f"  {others}" if others else "")
    )


# -- the demo ---------------------------------------------------------------------------------


def demo_document(stable_url: str, canary_url: str) -> dict[str, Any]:
    """Release `web`: stable -> A, canary -> B, stage beta, alice always in the canary."""
    return {
        "releases": {
            DEMO_RELEASE: {
                "stable": [stable_url],
                "canary": [canary_url],
                "stage": "beta",
                "internal": {"unit_ids": ["alice"]},
                "description": "turnout demo release",
            }
        },
        "routes": [{"host": "*", "path_prefix": "/", "release": DEMO_RELEASE}],
    }


def banner(
    settings: Settings, stable: DemoBackend, canary: DemoBackend, token: str, workdir: Path
) -> str:
    edge = f"http://127.0.0.1:{settings.edge_port}"
    admin = f"http://127.0.0.1:{settings.admin_port}"
    exports = [f"export TURNOUT_ADMIN_TOKEN={token}"]
    if settings.admin_port != DEFAULT_ADMIN_PORT:
        exports.append(f"export TURNOUT_ADMIN_URL={admin}")
    token_path = token_file(settings.state_dir).resolve()
    return "\n".join(
        [
            "Turnout demo",
            f"  edge    {edge}",
            f"  admin   {admin}",
            f"  stable  {stable.url}  (backend A)",
            f"  canary  {canary.url}  (backend B)",
            f"  store   {workdir / 'store'}  (removed on exit)",
            f"  release {DEMO_RELEASE!r}: stage beta = 10 % of users on the canary; alice always",
            "",
            "Admin token (the CLI also finds it in " + str(token_path) + "):",
            *(f"  {line}" for line in exports),
            "",
            "Try:",
            f"  curl -s -H 'X-User-Id: alice' {edge}/        # internal allow-list: canary",
            f"  curl -s -H 'X-User-Id: user-42' {edge}/      # placed by hash: 10 % canary",
            f"  curl -si -H 'X-User-Id: bob' {edge}/ | grep -i x-turnout",
            f"  turnout stage {DEMO_RELEASE} open               # 50 %",
            f"  turnout stage {DEMO_RELEASE} 12.5               # any percentage",
            f"  turnout rollback {DEMO_RELEASE} --reason 'demo: canary errors'",
            f"  turnout explain {DEMO_RELEASE} alice",
            "  turnout status",
            "  turnout versions; turnout restore 1",
            f"  websockets ws://127.0.0.1:{settings.edge_port}/ws   # WebSocket echo via the edge",
            "",
            "Ctrl-C stops the demo.",
        ]
    )


async def _demo(
    *, traffic: bool, edge_port: int, admin_port: int, state_dir: str, out: TextIO
) -> None:
    serve_instance: Callable[..., Coroutine[Any, Any, None]] = importlib.import_module(
        "turnout.server"
    ).serve
    # A busy port is one line naming the flag, before anything starts (issue #13).
    # Settings through the same loader as `turnout serve`: a bad TURNOUT_* value is one line.
    check_listeners(
        load_settings(edge_port=edge_port, admin_port=admin_port, state_dir=state_dir),
        ("--edge-port", "--admin-port"),
    )
    workdir = Path(tempfile.mkdtemp(prefix="turnout-demo-"))
    stable, canary = DemoBackend("stable"), DemoBackend("canary")
    tasks: list[asyncio.Task[None]] = []
    try:
        await stable.start()
        await canary.start()
        # An existing token file is reused, so a CLI already pointed at it keeps working.
        token = resolve_admin_token(load_settings(state_dir=state_dir))
        settings = load_settings(
            edge_host="127.0.0.1",
            edge_port=edge_port,
            admin_host="127.0.0.1",
            admin_port=admin_port,
            admin_token=SecretStr(token),
            state_dir=state_dir,
            store=str(workdir / "store"),
            bootstrap_path=str(workdir / "bootstrap.json"),
            seed=demo_document(stable.url, canary.url),
            expose_decision_headers=True,
            poll_interval_s=1.0,
            # One human line per request, unless synthetic traffic would drown the terminal.
            access_log="off" if traffic else "stdout",
            access_log_format="human",
        )
        # Audit lines and "config version N applied" go to stderr with a timestamp.
        configure_logging(settings)
        started = asyncio.Event()
        server = asyncio.create_task(serve_instance(settings, started=started))
        tasks.append(server)
        waiter = asyncio.create_task(started.wait())
        await asyncio.wait([server, waiter], return_when=asyncio.FIRST_COMPLETED)
        waiter.cancel()
        if not started.is_set():
            await server  # it ended before listening: let its error out
            return
        print(banner(settings, stable, canary, token, workdir), file=out, flush=True)
        if traffic:
            print(
                "\nSynthetic traffic: user-0..user-999 at about 50 requests/s\n",
                file=out,
                flush=True,
            )
            tasks.append(
                asyncio.create_task(drive_traffic(f"http://127.0.0.1:{edge_port}", out=out))
            )
        await server
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await stable.close()
        await canary.close()
        shutil.rmtree(workdir, ignore_errors=True)


def run_demo(
    *,
    traffic: bool = False,
    edge_port: int = 8080,
    admin_port: int = DEFAULT_ADMIN_PORT,
    state_dir: str = "./turnout-data",
    out: TextIO = sys.stdout,
) -> int:
    """Run the demo until Ctrl-C. Returns the process exit code."""
    try:
        asyncio.run(
            _demo(
                traffic=traffic,
                edge_port=edge_port,
                admin_port=admin_port,
                state_dir=state_dir,
                out=out,
            )
        )
    except KeyboardInterrupt:
        pass
    except ConfigError as exc:  # a busy port, a bad setting: one line naming it
        print(f"turnout demo: {exc.field}: {exc.message}", file=sys.stderr)
        return 2
    except SystemExit as exc:  # the server could not listen (port in use, ...)
        if exc.code not in (None, 0):
            print(exc.code, file=sys.stderr)
            return 1
    print("demo stopped", file=out)
    return 0
