"""Real servers for integration tests: uvicorn upstreams and a Turnout instance, on loopback.

Everything listens on 127.0.0.1 on a free port, runs in a daemon thread with its own event
loop, and is stopped by the test that started it.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import orjson
import uvicorn

from stores.settings import Settings
from turnout.server import install_event_loop_policy, serve

LOOPBACK = "127.0.0.1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


def wait_until(predicate: Any, timeout: float = 10.0, interval: float = 0.01) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())


class EchoApp:
    """An upstream that says who it is and what it received.

    GET /stream?bytes=N&chunk=M   N bytes in chunks of M (chunked transfer encoding)
    GET /gate?bytes=N             one chunk, then waits for `release_gate` before the rest
    GET /status/NNN               that status
    GET /fixed?bytes=N            N bytes with a Content-Length (also on HEAD)
    GET /slow?s=S                 answers after S seconds
    WS  /ws                       echoes each message prefixed with the backend's name
    anything else                 JSON: backend, method, path, query, headers, body length
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self.requests = 0
        self.gate = asyncio.Event()
        self.disconnects = 0
        self.streams_started = 0

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            return
        if scope["type"] == "websocket":
            await self._websocket(scope, receive, send)
            return
        self.requests += 1
        path = scope["path"]
        query = parse_qs(scope["query_string"].decode())
        body = b""
        more = True
        while more:
            message = await receive()
            body += message.get("body", b"")
            more = message.get("more_body", False)
        if path == "/stream":
            await self._stream(send, int(query["bytes"][0]), int(query.get("chunk", ["65536"])[0]))
            return
        if path == "/gate":
            await self._gated(send, receive, int(query["bytes"][0]))
            return
        if path == "/fixed":
            size = int(query["bytes"][0])
            await send(
                {
                    "type": "http.response.start",
                    "status": 200,
                    "headers": [(b"content-length", b"%d" % size)],
                }
            )
            await send({"type": "http.response.body", "body": b"f" * size})
            return
        if path.startswith("/status/"):
            status = int(path.rsplit("/", 1)[1])
            await send({"type": "http.response.start", "status": status, "headers": []})
            await send({"type": "http.response.body", "body": b""})
            return
        if path == "/slow":
            await asyncio.sleep(float(query["s"][0]))
        payload = orjson.dumps(
            {
                "backend": self.name,
                "method": scope["method"],
                "path": path,
                "raw_path": scope["raw_path"].decode("latin-1"),
                "query": scope["query_string"].decode("latin-1"),
                "headers": [
                    [k.decode("latin-1"), v.decode("latin-1")] for k, v in scope["headers"]
                ],
                "body_length": len(body),
            }
        )
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"x-backend", self.name.encode()),
                    (b"set-cookie", b"a=1; Path=/"),
                    (b"set-cookie", b"b=2; Path=/"),
                    (b"connection", b"x-secret-hop"),
                    (b"x-secret-hop", b"must-not-reach-client"),
                    (b"keep-alive", b"timeout=5"),
                    (b"content-length", b"%d" % len(payload)),
                ],
            }
        )
        await send({"type": "http.response.body", "body": payload})

    async def _stream(self, send: Any, total: int, chunk: int) -> None:
        self.streams_started += 1
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"x-backend", self.name.encode())],
            }
        )
        block = b"x" * chunk
        sent = 0
        while sent < total:
            piece = block[: min(chunk, total - sent)]
            await send({"type": "http.response.body", "body": piece, "more_body": True})
            sent += len(piece)
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def _gated(self, send: Any, receive: Any, total: int) -> None:
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-length", b"%d" % total)],
            }
        )
        await send({"type": "http.response.body", "body": b"a" * (total // 2), "more_body": True})
        await self.gate.wait()
        await send(
            {"type": "http.response.body", "body": b"b" * (total - total // 2), "more_body": False}
        )

    async def _websocket(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        message = await receive()
        assert message["type"] == "websocket.connect"
        headers = {k.decode(): v.decode() for k, v in scope["headers"]}
        await send({"type": "websocket.accept"})
        await send(
            {
                "type": "websocket.send",
                "text": f"hello from {self.name} arm={headers.get('x-turnout-arm')}",
            }
        )
        while True:
            message = await receive()
            if message["type"] == "websocket.disconnect":
                return
            text = message.get("text")
            if text == "close-4001":
                await send({"type": "websocket.close", "code": 4001, "reason": "asked to"})
                return
            if text is not None:
                await send({"type": "websocket.send", "text": f"{self.name}: {text}"})
            else:
                await send({"type": "websocket.send", "bytes": message.get("bytes") or b""})


class ThreadedServer:
    """A uvicorn server running an ASGI app in a thread."""

    def __init__(self, app: Any, port: int | None = None, **options: Any) -> None:
        self.app = app
        self.port = port or free_port()
        config = uvicorn.Config(
            app,
            host=LOOPBACK,
            port=self.port,
            log_level="warning",
            lifespan="off",
            ws="websockets-sansio",
            access_log=False,
            **options,
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.loop: asyncio.AbstractEventLoop | None = None

    def _run(self) -> None:
        async def main() -> None:
            self.loop = asyncio.get_running_loop()
            await self.server.serve()

        asyncio.run(main())

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    def start(self) -> ThreadedServer:
        self.thread.start()
        if not wait_until(lambda: self.server.started, 10):
            raise RuntimeError("upstream did not start")
        return self

    def call(self, fn: Any) -> None:
        """Run `fn()` on the server's loop (e.g. to set an asyncio.Event)."""
        assert self.loop is not None
        self.loop.call_soon_threadsafe(fn)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)


class TurnoutInstance:
    """A whole Turnout instance (edge + admin + store + watcher) in a thread."""

    def __init__(self, state_dir: Path, **overrides: Any) -> None:
        self.edge_port = overrides.pop("edge_port", None) or free_port()
        self.admin_port = overrides.pop("admin_port", None) or free_port()
        self.token = overrides.pop("admin_token", "test-admin-token")
        self.settings = Settings(
            state_dir=str(state_dir),
            edge_host=LOOPBACK,
            edge_port=self.edge_port,
            admin_host=LOOPBACK,
            admin_port=self.admin_port,
            admin_token=self.token,
            cookie_secret="test-cookie-secret-0123456789",
            log_level="warning",
            **overrides,
        )
        self.context: dict[str, Any] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._started = threading.Event()
        self._error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    @property
    def edge_url(self) -> str:
        return f"http://{LOOPBACK}:{self.edge_port}"

    @property
    def admin_url(self) -> str:
        return f"http://{LOOPBACK}:{self.admin_port}"

    @property
    def auth(self) -> dict[str, str]:
        return {"authorization": f"Bearer {self.token}"}

    def _run(self) -> None:
        install_event_loop_policy()

        async def main() -> None:
            self._loop = asyncio.get_running_loop()
            self._stop = asyncio.Event()
            started = asyncio.Event()

            async def flag() -> None:
                await started.wait()
                self._started.set()

            flagger = asyncio.create_task(flag())
            try:
                await serve(
                    self.settings, started=started, stop_event=self._stop, context=self.context
                )
            finally:
                flagger.cancel()

        try:
            asyncio.run(main())
        except BaseException as exc:  # noqa: BLE001 - reported to the test thread
            self._error = exc
        finally:
            self._started.set()
            asyncio.set_event_loop_policy(None)

    def start(self) -> TurnoutInstance:
        self.thread.start()
        self._started.wait(20)
        if self._error is not None or not self.thread.is_alive():
            raise RuntimeError(f"turnout did not start: {self._error!r}")
        return self

    def run(self, coro: Any, timeout: float = 10) -> Any:
        """Run a coroutine on the instance's loop and return its result."""
        assert self._loop is not None
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None:
            with contextlib.suppress(RuntimeError):
                self._loop.call_soon_threadsafe(self._stop.set)
        self.thread.join(20)


@contextlib.contextmanager
def backends(*names: str) -> Iterator[dict[str, ThreadedServer]]:
    servers = {name: ThreadedServer(EchoApp(name), http="httptools").start() for name in names}
    try:
        yield servers
    finally:
        for server in servers.values():
            server.stop()


def release_doc(stable: str, canary: str, *, stage: str = "beta", **extra: Any) -> dict[str, Any]:
    release: dict[str, Any] = {"stable": [stable], "canary": [canary], "stage": stage}
    release.update(extra)
    return {
        "releases": {"web": release},
        "routes": [{"host": "*", "path_prefix": "/", "release": "web"}],
    }
