"""The one adapter between ASGI and the pipeline (edge/pipeline.py knows nothing of ASGI).

Kept deliberately thin: every ASGI message costs (PERF.md: ~2.4 µs of 36.7 µs per request on
the app side), so a whole small response is exactly two messages, and a streamed one watches
for the client's disconnect only while it streams.
"""

from __future__ import annotations

import asyncio
from typing import Any

from edge.pipeline import ClientGone, Pipeline
from edge.upstream import UpstreamResponse
from edge.websocket import WebSocketProxy

Scope = dict[str, Any]
Message = dict[str, Any]


class AsgiDownstream:
    """`Downstream` over one ASGI request's receive/send."""

    __slots__ = ("receive", "send", "gone")

    def __init__(self, receive: Any, send: Any) -> None:
        self.receive = receive
        self.send = send
        self.gone = False

    async def read_body(self) -> tuple[bytes, bool]:
        message = await self.receive()
        if message["type"] == "http.disconnect":
            self.gone = True
            raise ClientGone
        return message.get("body", b""), message.get("more_body", False)

    async def respond(self, status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
        send = self.send
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    async def start(self, status: int, headers: list[tuple[bytes, bytes]]) -> None:
        await self.send({"type": "http.response.start", "status": status, "headers": headers})

    async def write(self, data: bytes, more: bool) -> bool:
        if self.gone:
            return False
        await self.send({"type": "http.response.body", "body": data, "more_body": more})
        return not self.gone

    def watch_disconnect(self, on_gone: UpstreamResponse) -> asyncio.Task[None]:
        return asyncio.get_running_loop().create_task(self._watch(on_gone))

    async def _watch(self, on_gone: UpstreamResponse) -> None:
        while True:
            message = await self.receive()
            if message["type"] == "http.disconnect":
                self.gone = True
                on_gone.abort()  # the upstream connection is dropped, never pooled
                return


class EdgeApp:
    """The data plane's ASGI callable: plain, no framework (PERF.md)."""

    def __init__(self, pipeline: Pipeline, websockets: WebSocketProxy) -> None:
        self.pipeline = pipeline
        self.websockets = websockets

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        kind = scope["type"]
        if kind == "http":
            await self.pipeline.handle(
                scope["method"],
                scope["raw_path"] or scope["path"].encode("latin-1"),
                scope["query_string"],
                scope["headers"],
                scope["http_version"],
                scope.get("client"),
                scope["scheme"],
                AsgiDownstream(receive, send),
            )
        elif kind == "websocket":
            await self.websockets.handle(scope, receive, send)
        elif kind == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
