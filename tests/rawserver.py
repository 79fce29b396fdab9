"""Scripted raw TCP servers on 127.0.0.1 for tests that need exact bytes on the wire.

Usage::

    async def handler(conn: RawConn) -> None:
        while (req := await conn.read_request()) is not None:
            conn.write(b"HTTP/1.1 200 OK\\r\\nContent-Length: 2\\r\\n\\r\\nok")

    async with RawServer(handler) as srv:
        ...  # connect to 127.0.0.1:srv.port; srv.connections counts accepted connections

The handler runs once per accepted connection; when it returns the connection is closed.
Everything is torn down (handlers cancelled, sockets closed) on exit from the context.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from types import TracebackType

__all__ = ["RawConn", "RawRequest", "RawServer", "always", "replies"]


@dataclass
class RawRequest:
    head: bytes  # request line and header fields, including the final CRLFCRLF
    body: bytes  # de-chunked when the request used Transfer-Encoding: chunked
    raw_body: bytes  # exactly the body bytes as they arrived

    @property
    def request_line(self) -> bytes:
        return self.head.split(b"\r\n", 1)[0]

    @property
    def method(self) -> bytes:
        return self.request_line.split(b" ", 1)[0]

    def header(self, name: bytes) -> bytes | None:
        """First value of a header field (case-insensitive), or None."""
        want = name.lower()
        for line in self.head.split(b"\r\n")[1:]:
            k, sep, v = line.partition(b":")
            if sep and k.strip().lower() == want:
                return v.strip()
        return None


@dataclass
class RawConn:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    index: int  # 0 for the first accepted connection, 1 for the next...
    requests: list[RawRequest] = field(default_factory=list)

    async def read_head(self) -> bytes:
        """Bytes up to and including the blank line; b"" on a clean EOF."""
        try:
            return await self.reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError as e:
            return b"" if not e.partial else e.partial
        except ConnectionError:
            return b""

    async def read_request(self) -> RawRequest | None:
        """Read one request (head and body framed by Content-Length or chunked); None at EOF."""
        head = await self.read_head()
        if not head.endswith(b"\r\n\r\n"):
            return None
        req = RawRequest(head, b"", b"")
        te = req.header(b"transfer-encoding")
        cl = req.header(b"content-length")
        if te is not None and te.lower() == b"chunked":
            raw, body = bytearray(), bytearray()
            while True:
                line = await self.reader.readuntil(b"\r\n")
                raw += line
                size = int(line.split(b";", 1)[0].strip(), 16)
                if size == 0:
                    while True:  # trailer section up to the empty line
                        t = await self.reader.readuntil(b"\r\n")
                        raw += t
                        if t == b"\r\n":
                            break
                    break
                data = await self.reader.readexactly(size + 2)
                raw += data
                body += data[:-2]
            req.body, req.raw_body = bytes(body), bytes(raw)
        elif cl is not None:
            req.body = req.raw_body = await self.reader.readexactly(int(cl))
        self.requests.append(req)
        return req

    def write(self, data: bytes) -> None:
        self.writer.write(data)

    async def drain(self) -> None:
        await self.writer.drain()

    def close(self) -> None:
        self.writer.close()

    def reset(self) -> None:
        """Close with RST instead of FIN (SO_LINGER 0)."""
        import socket
        import struct

        sock = self.writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.writer.transport.abort()


Handler = Callable[[RawConn], Awaitable[None]]


class RawServer:
    """An asyncio TCP server on 127.0.0.1 (ephemeral port) running ``handler`` per connection."""

    def __init__(
        self, handler: Handler, *, backlog: int = 100, ssl: ssl.SSLContext | None = None
    ) -> None:
        self.handler = handler
        self.backlog = backlog
        self.ssl = ssl
        self.port = 0
        self.connections = 0  # accepted so far
        self.conns: list[RawConn] = []
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def requests(self) -> list[RawRequest]:
        """All requests read so far, over all connections, in connection order."""
        return [r for c in self.conns for r in c.requests]

    async def _on_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = RawConn(reader, writer, self.connections)
        self.connections += 1
        self.conns.append(conn)
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            await self.handler(conn)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self._tasks.discard(task)
            writer.close()
            try:
                await writer.wait_closed()
            except (ConnectionError, asyncio.CancelledError):
                pass

    async def __aenter__(self) -> RawServer:
        self._server = await asyncio.start_server(
            self._on_client, "127.0.0.1", 0, backlog=self.backlog, ssl=self.ssl
        )
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        assert self._server is not None
        self._server.close()
        tasks = list(self._tasks)
        for t in tasks:
            t.cancel()
        for c in self.conns:
            c.writer.transport.abort()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        await self._server.wait_closed()


def replies(*responses: bytes) -> Handler:
    """Handler: answer the n-th request on each connection with responses[n] (last one repeats)."""

    async def handler(conn: RawConn) -> None:
        n = 0
        while await conn.read_request() is not None:
            conn.write(responses[min(n, len(responses) - 1)])
            await conn.drain()
            n += 1

    return handler


def always(response: bytes) -> Handler:
    """Handler: answer every request on every connection with the same bytes (keep-alive)."""
    return replies(response)
