"""WebSocket tunnels: after the upstream's `101`, bytes both ways (RFC 6455 §4, RFC 9110 §7.8).

Rules of this file:
* A proxy does not need to parse frames to tunnel them: once the upstream has switched
  protocols, every byte from one side is written to the other. Only frame *boundaries* are
  tracked (`_FrameEdges`, header lengths from RFC 6455 §5.2, payloads skipped unread) so that a
  close frame the edge builds itself is never spliced into the middle of a relayed frame.
* The edge builds a close frame only where it closes a tunnel itself: 1001 (going away) on
  drain and shutdown, or the code a caller gives `Tunnel.close` (1012 after a rollback, say).
  Mid-frame in a direction, that side is reset instead: a broken frame is worse than none.
* The upgrade request goes to a fresh upstream connection, never a pooled one: it will not
  come back. Bytes the client sent after its handshake are held until the upstream answered
  `101`; any other answer is relayed as a normal response and those bytes are never sent, so
  an upstream that refuses the upgrade cannot read them as a second, unadmitted request.
* Flow control: when one side's write buffer is full (`pause_writing`), reading from the
  other side pauses until it drains (`resume_writing`); no byte is buffered without bound.
* Tunnels are registered per release and arm (`TunnelRegistry`) to be counted and closed.
  When one ends, the registry's `on_end` hears how the upstream ended it (issue #10: the
  guard counts an upstream's error close against the arm): the status code of the close frame
  it sent (read from the frame edges of its direction: a close frame's payload is at most 125
  bytes, its first two are the code), 1006 when it dropped the connection without one, None
  when the client or the edge closed first.
"""

from __future__ import annotations

import asyncio
import os
import ssl as _ssl
import struct
from collections.abc import Callable

import httptools

from edge.errors import (
    ClosedBeforeResponse,
    ConnectError,
    ConnectTimeout,
    ProtocolError,
    ReadTimeout,
)

__all__ = [
    "CLOSE_GOING_AWAY",
    "CLOSE_SERVICE_RESTART",
    "Handshake",
    "Tunnel",
    "TunnelRegistry",
    "open_upstream",
]

CLOSE_GOING_AWAY = 1001  # RFC 6455 §7.4.1: the server is going down
CLOSE_NO_STATUS = 1005  # §7.4.1: a close frame without a status code
CLOSE_ABNORMAL = 1006  # §7.4.1: the connection dropped without a close frame
_OP_CLOSE = 0x8
CLOSE_SERVICE_RESTART = 1012  # IANA WebSocket close code registry: service restart
MAX_RESPONSE_HEAD_BYTES = 64 * 1024
MAX_REFUSAL_BODY_BYTES = 1024 * 1024  # a refused upgrade's body is relayed whole, up to this
_MAX_CLOSE_REASON_BYTES = 123  # a control frame's payload is at most 125 bytes (§5.5)


class _FrameEdges:
    """Where the frames of one direction end; payload bytes are skipped, never read, except
    the first two of a close frame (its status code, §5.5.1)."""

    __slots__ = ("remaining", "partial", "mask", "code_bytes", "in_close", "close_code")

    def __init__(self) -> None:
        self.remaining = 0  # payload bytes of the current frame still to come
        self.partial = b""  # the start of a frame header split across reads
        self.mask = b""  # the current close frame's masking key (client frames, §5.3)
        self.code_bytes = b""  # the current close frame's payload start, up to 2 bytes
        self.in_close = False
        self.close_code: int | None = None  # the first close frame's code, once complete

    @property
    def at_boundary(self) -> bool:
        return self.remaining == 0 and not self.partial

    def feed(self, data: bytes) -> None:
        i, n = 0, len(data)
        while i < n:
            if self.remaining:
                step = min(self.remaining, n - i)
                if self.in_close and len(self.code_bytes) < 2:
                    self.code_bytes += data[i : i + min(step, 2 - len(self.code_bytes))]
                self.remaining -= step
                i += step
                if not self.remaining and self.in_close:
                    self._close_done()
                continue
            head = self.partial + data[i : i + 14]  # a header is at most 14 bytes (§5.2)
            if len(head) < 2:
                self.partial = head
                return
            size = head[1] & 0x7F
            length = 2 + (2 if size == 126 else 8 if size == 127 else 0) + (4 * (head[1] >> 7))
            if len(head) < length:
                self.partial = head  # all of data[i:] was taken
                return
            if size == 126:
                size = int.from_bytes(head[2:4], "big")
            elif size == 127:
                size = int.from_bytes(head[2:10], "big")
            i += length - len(self.partial)
            self.partial = b""
            self.remaining = size
            if head[0] & 0x0F == _OP_CLOSE and self.close_code is None:
                self.in_close = True
                self.mask = head[length - 4 : length] if head[1] >> 7 else b""
                self.code_bytes = b""
                if not size:
                    self._close_done()

    def _close_done(self) -> None:
        code = self.code_bytes
        if self.mask:
            code = bytes(b ^ self.mask[k] for k, b in enumerate(code))
        self.close_code = int.from_bytes(code, "big") if len(code) == 2 else CLOSE_NO_STATUS
        self.in_close = False


def close_frame(code: int, reason: str, *, masked: bool) -> bytes:
    """A close frame (RFC 6455 §5.5.1); frames to a server are masked (§5.3)."""
    payload = struct.pack("!H", code) + reason.encode()[:_MAX_CLOSE_REASON_BYTES]
    if not masked:
        return bytes((0x88, len(payload))) + payload
    mask = os.urandom(4)
    body = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return bytes((0x88, 0x80 | len(payload))) + mask + body


class Handshake:
    """The upstream's answer to an upgrade request: `101` (then `tunnel_bytes` may already
    hold the first bytes it sent after it) or any other, whole response."""

    __slots__ = (
        "status",
        "headers",
        "body",
        "body_length",
        "has_body",
        "tunnel_bytes",
        "transport",
        "side",
    )

    def __init__(self) -> None:
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.body = b""
        self.body_length: int | None = None  # set once a non-101 answer is whole
        self.has_body = True
        self.tunnel_bytes = b""
        self.transport: asyncio.Transport | None = None
        self.side: _UpstreamSide | None = None


class _UpstreamSide(asyncio.Protocol):
    """The upstream connection: parses the answer to the upgrade, then relays."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.answer = Handshake()
        self.answer.side = self
        self.parser = httptools.HttpResponseParser(self)
        self.done: asyncio.Future[None] = loop.create_future()
        self.head_bytes = 0
        self.body: list[bytes] = []
        self.body_bytes = 0
        self.headers_done = False
        self.tunnel: Tunnel | None = None
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.answer.transport = self.transport

    def data_received(self, data: bytes) -> None:
        tunnel = self.tunnel
        if tunnel is not None:
            tunnel.to_client(data)
            return
        if self.done.done():
            if self.answer.status == 101:
                self.answer.tunnel_bytes += data  # before the tunnel is joined: keep them
            return  # bytes after a refused upgrade's answer: the connection is closed anyway
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            offset = int(exc.args[0]) if exc.args else len(data)
            if self.answer.status != 101:
                self._fail(ProtocolError("unexpected upgrade in upstream response"))
                return
            self.answer.tunnel_bytes = data[offset:]
            self._finish()
            return
        except httptools.HttpParserError as exc:
            if not self.done.done():
                self._fail(ProtocolError(f"invalid response from upstream: {exc}"))
            return
        if not self.headers_done:
            self.head_bytes += len(data)
            if self.head_bytes > MAX_RESPONSE_HEAD_BYTES:
                self._fail(ProtocolError("response head too large"))

    def eof_received(self) -> bool | None:
        if self.tunnel is None and self.headers_done and not self.done.done():
            self._finish()  # a close-delimited refusal ends at EOF (RFC 9112 §6.3 item 8)
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        tunnel = self.tunnel
        if tunnel is not None:
            tunnel.lost(by_upstream=True)
        elif not self.done.done():
            if self.headers_done:
                self._fail(ProtocolError("upstream closed the connection mid-response"))
            else:
                self._fail(ClosedBeforeResponse("upstream closed before answering the upgrade"))

    def pause_writing(self) -> None:
        if self.tunnel is not None:
            self.tunnel.client_reading(False)

    def resume_writing(self) -> None:
        if self.tunnel is not None:
            self.tunnel.client_reading(True)

    # httptools callbacks
    def on_header(self, name: bytes, value: bytes) -> None:
        self.answer.headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        if 100 <= status < 200 and status != 101:
            self.answer.headers.clear()  # interim (RFC 9110 §15.2): skip it
            return
        self.answer.status = status
        self.headers_done = True

    def on_body(self, body: bytes) -> None:
        self.body.append(body)
        self.body_bytes += len(body)
        if self.body_bytes > MAX_REFUSAL_BODY_BYTES:
            raise ProtocolError("refusal body too large")

    def on_message_complete(self) -> None:
        if self.headers_done and self.answer.status != 101 and not self.done.done():
            self._finish()

    def _finish(self) -> None:
        answer = self.answer
        answer.body = b"".join(self.body)
        answer.body_length = len(answer.body) if answer.status != 101 else None
        self.body.clear()
        if not self.done.done():
            self.done.set_result(None)

    def _fail(self, exc: Exception) -> None:
        if self.transport is not None:
            self.transport.abort()
        if not self.done.done():
            self.done.set_exception(exc)


async def open_upstream(
    host: str,
    port: int,
    head: bytes,
    *,
    ssl: _ssl.SSLContext | None,
    connect_timeout_s: float,
    read_timeout_s: float,
) -> Handshake:
    """Send an upgrade request on a fresh connection and wait for the answer.

    Raises ConnectError / ConnectTimeout / ReadTimeout / ProtocolError. For a `101` the
    connection stays open for `Tunnel`; for any other answer it is closed."""
    loop = asyncio.get_running_loop()
    side = _UpstreamSide(loop)
    try:
        async with asyncio.timeout(connect_timeout_s):
            await loop.create_connection(lambda: side, host, port, ssl=ssl)
    except TimeoutError:
        raise ConnectTimeout("connect to upstream timed out") from None
    except OSError as exc:
        raise ConnectError(f"cannot connect to upstream: {exc}") from exc
    transport = side.transport
    assert transport is not None
    transport.write(head)
    try:
        async with asyncio.timeout(read_timeout_s):
            await side.done
    except TimeoutError:
        transport.abort()
        raise ReadTimeout("upstream did not answer the upgrade in time") from None
    except BaseException:
        transport.abort()
        raise
    answer = side.answer
    if answer.status != 101:
        transport.close()
    return answer


class _ClientSide(asyncio.Protocol):
    """Installed on the client's transport once the tunnel is open."""

    def __init__(self, tunnel: Tunnel) -> None:
        self.tunnel = tunnel

    def data_received(self, data: bytes) -> None:
        self.tunnel.to_upstream(data)

    def eof_received(self) -> bool | None:
        return None  # the transport closes; connection_lost closes the other side

    def connection_lost(self, exc: Exception | None) -> None:
        self.tunnel.lost()

    def pause_writing(self) -> None:
        self.tunnel.upstream_reading(False)

    def resume_writing(self) -> None:
        self.tunnel.upstream_reading(True)


class Tunnel:
    """One client connection joined to one upstream connection after a `101`."""

    __slots__ = (
        "release",
        "arm",
        "client",
        "upstream",
        "registry",
        "closed",
        "_to_client",
        "_to_upstream",
    )

    def __init__(
        self,
        release: str,
        arm: str,
        client: asyncio.Transport,
        answer: Handshake,
        registry: TunnelRegistry,
    ) -> None:
        assert answer.transport is not None and answer.side is not None
        self.release = release
        self.arm = arm
        self.client = client
        self.upstream = answer.transport
        self.registry = registry
        self.closed = False
        self._to_client = _FrameEdges()
        self._to_upstream = _FrameEdges()
        answer.side.tunnel = self
        registry.add(self)

    def start(self, head: bytes, client_bytes: bytes, tunnel_bytes: bytes) -> None:
        """Send the 101 head (and what the upstream sent after it) to the client, the
        held client bytes to the upstream, and start relaying."""
        self.client.set_protocol(_ClientSide(self))
        self.client.write(head)
        if tunnel_bytes:
            self.to_client(tunnel_bytes)
        if client_bytes:
            self.to_upstream(client_bytes)
        if self.client.is_closing() or self.upstream.is_closing():
            self.lost(by_upstream=self.upstream.is_closing())  # one side went away
            return
        self.client.resume_reading()

    def to_client(self, data: bytes) -> None:
        if not self.closed:
            self._to_client.feed(data)
            self.client.write(data)

    def to_upstream(self, data: bytes) -> None:
        if not self.closed:
            self._to_upstream.feed(data)
            self.upstream.write(data)

    def client_reading(self, on: bool) -> None:
        _set_reading(self.client, on)

    def upstream_reading(self, on: bool) -> None:
        _set_reading(self.upstream, on)

    def lost(self, *, by_upstream: bool = False) -> None:
        """One side closed: close the other once its buffered bytes are written."""
        if self.closed:
            return
        self.closed = True
        code = self._to_client.close_code
        if code is None and by_upstream:
            code = CLOSE_ABNORMAL
        self.registry.ended(self, code)
        self.client.close()
        self.upstream.close()

    def close(self, code: int = CLOSE_GOING_AWAY, reason: str = "") -> None:
        """The edge ends the tunnel: a close frame `code` to both sides where a frame may
        start, a reset where one is half-relayed (RFC 6455 §7.1.7)."""
        if self.closed:
            return
        self.closed = True
        self.registry.ended(self, self._to_client.close_code)
        for transport, edges, masked in (
            (self.client, self._to_client, False),
            (self.upstream, self._to_upstream, True),
        ):
            if transport.is_closing():
                continue
            if edges.at_boundary:
                transport.write(close_frame(code, reason, masked=masked))
                transport.close()
            else:
                transport.abort()


def _set_reading(transport: asyncio.Transport, on: bool) -> None:
    if transport.is_closing():
        return
    if on:
        transport.resume_reading()
    else:
        transport.pause_reading()


class TunnelRegistry:
    """Open tunnels by (release, arm): counted for metrics, closed on drain or rollback."""

    def __init__(self, on_end: Callable[[str, str, int | None], None] | None = None) -> None:
        self._open: dict[tuple[str, str], set[Tunnel]] = {}
        # (release, arm, the upstream's close code or None): see the rules above.
        self.on_end = on_end

    def add(self, tunnel: Tunnel) -> None:
        self._open.setdefault((tunnel.release, tunnel.arm), set()).add(tunnel)

    def discard(self, tunnel: Tunnel) -> None:
        key = (tunnel.release, tunnel.arm)
        tunnels = self._open.get(key)
        if tunnels is not None:
            tunnels.discard(tunnel)
            if not tunnels:
                del self._open[key]

    def ended(self, tunnel: Tunnel, upstream_code: int | None) -> None:
        """A tunnel closed: forget it and report how the upstream ended it."""
        self.discard(tunnel)
        if self.on_end is not None:
            self.on_end(tunnel.release, tunnel.arm, upstream_code)

    def counts(self) -> dict[tuple[str, str], int]:
        """Open tunnels per (release, arm), for the metrics scrape."""
        return {key: len(tunnels) for key, tunnels in self._open.items()}

    def count(self, release: str | None = None, arm: str | None = None) -> int:
        """Open tunnels, of one release (and arm) or all."""
        return sum(
            len(tunnels)
            for (r, a), tunnels in self._open.items()
            if (release is None or r == release) and (arm is None or a == arm)
        )

    def close(
        self,
        release: str | None = None,
        arm: str | None = None,
        code: int = CLOSE_GOING_AWAY,
        reason: str = "",
    ) -> int:
        """Close the open tunnels of one release (and arm), or all; returns how many."""
        chosen = [
            tunnel
            for (r, a), tunnels in list(self._open.items())
            if (release is None or r == release) and (arm is None or a == arm)
            for tunnel in list(tunnels)
        ]
        for tunnel in chosen:
            tunnel.close(code, reason)
        return len(chosen)
