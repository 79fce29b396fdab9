"""uvicorn's httptools protocol with one change: a response head and its first body chunk
leave in one `transport.write`.

Rules of this file:
* Measured, not assumed (benchmarks/proxy.py --profile): uvicorn writes the head at
  `http.response.start` and the body at `http.response.body`, two syscalls per response; the
  second write was 5 % of the edge's CPU per request, and two TCP segments per response cost
  the client a second wake-up.
* Nothing of uvicorn's logic is copied: each request cycle's class is swapped for a subclass
  whose `send` holds the head back and hands both messages to uvicorn's own `send` over a
  buffering transport, which is flushed once. Framing, keep-alive, HEAD, 204/304 and
  disconnects stay uvicorn's.
* Use it with `uvicorn.Config(http=TurnoutHttpProtocol)` or `--http edge.httpserver:TurnoutHttpProtocol`.
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle


class _BufferedTransport:
    """Collects writes; `close()` (uvicorn's end of a non-keep-alive response) flushes first."""

    __slots__ = ("transport", "parts")

    def __init__(self, transport: asyncio.Transport) -> None:
        self.transport = transport
        self.parts: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.parts.append(data)

    def flush(self) -> None:
        if self.parts:
            self.transport.write(b"".join(self.parts))
            self.parts = []

    def close(self) -> None:
        self.flush()
        self.transport.close()

    def is_closing(self) -> bool:
        return self.transport.is_closing()


def _needs_close_delimiting(scope: Any, message: Any) -> bool:
    """An HTTP/1.0 response of unknown length with a body: uvicorn's httptools mode would
    send `Transfer-Encoding: chunked`, which HTTP/1.0 clients do not understand (RFC 9112
    §6.1, HARDENING.md §2.10); the body must be delimited by closing the connection."""
    if scope.get("http_version") != "1.0" or scope["method"] == "HEAD":
        return False
    if message.get("status", 200) in (204, 304) or message.get("status", 200) < 200:
        return False
    return not any(name.lower() == b"content-length" for name, _ in message.get("headers", ()))


class _CoalescingCycle(RequestResponseCycle):
    _held: Any = None  # the response-start message waiting for its first body message
    _close_delimited = False

    async def send(self, message: Any) -> None:
        if message["type"] == "http.response.start" and not self.response_started:
            if _needs_close_delimiting(self.scope, message):
                self._close_delimited = True
                self.chunked_encoding = False  # uvicorn then adds no Transfer-Encoding
                self.keep_alive = False
                await super().send(message)
                return
            self._held = message
            return
        if self._close_delimited:
            await self._send_close_delimited(message)
            return
        held = self._held
        if held is None:
            await super().send(message)
            return
        self._held = None
        transport = self.transport
        buffered = _BufferedTransport(transport)
        self.transport = buffered  # type: ignore[assignment]
        try:
            await super().send(held)
            await super().send(message)
        finally:
            self.transport = transport
        buffered.flush()

    async def _send_close_delimited(self, message: Any) -> None:
        """Body bytes as they are; the end of the body is the end of the connection."""
        if self.flow.write_paused and not self.disconnected:
            await self.flow.drain()
        if self.disconnected or self.response_complete:
            return
        body = message.get("body", b"")
        if body:
            self.transport.write(body)
        if not message.get("more_body", False):
            self.response_complete = True
            self.message_event.set()
            self.transport.close()
            self.on_response()


class TurnoutHttpProtocol(HttpToolsProtocol):
    """`HttpToolsProtocol` whose request cycles coalesce head and first body write."""

    def _start_asgi_task(self, cycle: RequestResponseCycle, app: Any) -> None:
        cycle.__class__ = _CoalescingCycle
        super()._start_asgi_task(cycle, app)
