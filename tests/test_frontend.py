"""The edge's own HTTP/1.1 front-end (edge/frontend.py) on real sockets: limits, refusals,
deadlines, keep-alive, pipelining, 100-continue, upgrades, streaming, half-close and shutdown
(HARDENING.md §2.7, §2.9-§2.11, table (a) rows 29-38). It is the only server on the data
plane (issue #9).
"""

from __future__ import annotations

import contextlib
import http.client
import os
import select
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pytest

from tests.harness import (
    LOOPBACK,
    EchoApp,
    ThreadedServer,
    TurnoutInstance,
    backends,
    release_doc,
    wait_until,
)

pytestmark = pytest.mark.timeout(120)

MiB = 1024 * 1024


@dataclass
class Response:
    status: int
    headers: dict[str, str]  # lower-case names; repeated fields joined with ", "
    body: bytes

    def json(self) -> Any:
        return orjson.loads(self.body)


class Client:
    """A raw client connection that reads responses one at a time (safe for pipelining)."""

    def __init__(self, port: int, timeout: float = 10) -> None:
        self.sock = socket.create_connection((LOOPBACK, port), timeout=timeout)
        self.timeout = timeout
        self.buf = b""

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.sock.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def readable(self) -> bool:
        return bool(self.buf) or bool(select.select([self.sock], [], [], 0)[0])

    def _fill(self) -> None:
        chunk = self.sock.recv(65536)
        if not chunk:
            raise EOFError(self.buf[:200])
        self.buf += chunk

    def _take_until(self, sep: bytes) -> bytes:
        while sep not in self.buf:
            self._fill()
        data, _, self.buf = self.buf.partition(sep)
        return data

    def take(self, n: int) -> bytes:
        while len(self.buf) < n:
            self._fill()
        data, self.buf = self.buf[:n], self.buf[n:]
        return data

    def response(self, method: str = "GET") -> Response:
        """The next response (an interim 1xx is returned on its own)."""
        head = self._take_until(b"\r\n\r\n").decode("latin-1")
        status_line, *lines = head.split("\r\n")
        assert status_line.startswith("HTTP/1.1 "), head
        status = int(status_line.split(" ")[1])
        headers: dict[str, str] = {}
        for line in lines:
            name, _, value = line.partition(":")
            name, value = name.strip().lower(), value.strip()
            headers[name] = f"{headers[name]}, {value}" if name in headers else value
        if method == "HEAD" or status < 200 or status in (204, 304):
            return Response(status, headers, b"")
        if headers.get("transfer-encoding") == "chunked":
            body = b""
            while size := int(self._take_until(b"\r\n").split(b";")[0], 16):
                body += self.take(size)
                assert self.take(2) == b"\r\n"
            assert self.take(2) == b"\r\n"  # no trailers
            return Response(status, headers, body)
        if "content-length" in headers:
            return Response(status, headers, self.take(int(headers["content-length"])))
        return Response(status, headers, self.rest())

    def rest(self) -> bytes:
        """Everything until the server closes (a reset counts as a close)."""
        try:
            while True:
                self._fill()
        except (EOFError, ConnectionResetError):
            pass
        data, self.buf = self.buf, b""
        return data

    def closed(self, timeout: float = 10) -> bool:
        """True when the server closes the connection within `timeout` without sending more."""
        self.sock.settimeout(timeout)
        try:
            return self.rest() == b""
        except TimeoutError:
            return False
        finally:
            self.sock.settimeout(self.timeout)


def req(target: str = "/x", *headers: str, method: str = "GET", version: str = "HTTP/1.1") -> bytes:
    lines = [f"{method} {target} {version}", "Host: a", "X-User-Id: bob", *headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def upstream_requests(up: dict[str, ThreadedServer]) -> int:
    return sum(server.app.requests for server in up.values())


def open_gates(up: dict[str, ThreadedServer]) -> None:
    """Make EchoApp's /gate?bytes=N answer at once: a Content-Length response, no waiting."""
    for server in up.values():
        server.call(server.app.gate.set)
    for server in up.values():
        assert wait_until(server.app.gate.is_set, 5)


def refused(port: int, data: bytes) -> tuple[Response, bool]:
    """Send `data` on a new connection: the answer and whether the server closed after it."""
    with Client(port) as c:
        c.send(data)
        resp = c.response()
        return resp, c.closed()


class BodyLog:
    """An EchoApp upstream that records, per request, the body bytes it got and whether the
    body ended (False when the proxy dropped the upstream connection mid-body)."""

    def __init__(self) -> None:
        self.app = EchoApp("rec")
        self.requests = 0
        self.bodies: list[tuple[int, bool]] = []

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        seen: dict[str, Any] = {"bytes": 0, "ended": False}

        async def recv() -> Any:
            message = await receive()
            seen["bytes"] += len(message.get("body", b""))
            seen["ended"] = message["type"] == "http.request" and not message.get("more_body")
            return message

        self.requests += 1
        try:
            await self.app(scope, recv, send)
        finally:
            self.bodies.append((seen["bytes"], seen["ended"]))


@pytest.fixture
def up() -> Iterator[dict[str, ThreadedServer]]:
    with backends("stable", "canary") as servers:
        yield servers


@pytest.fixture
def start(
    up: dict[str, ThreadedServer], tmp_path: Path
) -> Iterator[Callable[..., TurnoutInstance]]:
    """Start Turnout instances routing to `up`, with settings overrides; all stopped at the end."""
    started: list[TurnoutInstance] = []

    def make(**overrides: Any) -> TurnoutInstance:
        seed = overrides.pop("seed", None) or release_doc(up["stable"].url, up["canary"].url)
        instance = TurnoutInstance(tmp_path / f"state{len(started)}", seed=seed, **overrides)
        started.append(instance.start())
        return instance

    yield make
    for instance in started:
        instance.stop()


@pytest.fixture
def edge(start: Callable[..., TurnoutInstance]) -> TurnoutInstance:
    """An instance with the default settings."""
    return start()


# -- limits and the request line: rows 29, 30, 37 -------------------------------------------------


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        pytest.param(req("/" + "a" * 17_000), 414, id="17k-target"),
        pytest.param(req("/" + "a" * 70_000), 414, id="70k-target"),
        pytest.param(req("/", "X-Big: " + "b" * 200 * 1024), 431, id="200KiB-header"),
        pytest.param(req("/", *(f"X-H{i}: v" for i in range(2000))), 431, id="2000-headers"),
        pytest.param(b"GET / HTTP/2.0\r\nHost: a\r\n\r\n", 505, id="http2"),
        pytest.param(b"GET /\r\n\r\n", 400, id="http0.9"),
        pytest.param(req("/a?b#c"), 400, id="fragment-in-query"),
        pytest.param(b"GET / HTTP/1.32\r\nHost: a\r\n\r\n", 400, id="http1.32"),
        pytest.param(b"get / HTTP/1.1\r\nHost: a\r\n\r\n", 400, id="lower-case-method"),
    ],
)
def test_refused_request_is_answered_closed_and_reaches_no_upstream(
    edge: TurnoutInstance, up: dict[str, ThreadedServer], request_bytes: bytes, status: int
) -> None:
    """A target over 16 KiB gets 414, a 200 KiB header or 2000 headers 431, HTTP/2.0 505, HTTP/1.32, a lower-case method and HTTP/0.9 400; each closes and reaches no upstream."""
    before = upstream_requests(up)
    resp, closed = refused(edge.edge_port, request_bytes)
    assert resp.status == status and closed
    assert upstream_requests(up) == before


def test_8mib_header_sent_in_pieces_is_refused_before_it_ends(
    edge: TurnoutInstance, up: dict[str, ThreadedServer]
) -> None:
    """An 8 MiB header trickled in 64 KiB pieces is refused (431 or reset) long before its end; the next client is served."""
    before = upstream_requests(up)
    sent = 0
    with Client(edge.edge_port) as c:
        c.send(b"GET / HTTP/1.1\r\nHost: a\r\nX-Big: ")
        piece = b"b" * 65536
        try:
            while sent < 8 * MiB and not c.readable():
                c.send(piece)
                sent += len(piece)
                time.sleep(0.002)
        except OSError:  # the server closed: our writes are reset
            pass
        answer = c.rest()
    assert sent < 4 * MiB, sent  # the server stopped reading at its 1 MiB hard net
    assert answer == b"" or answer.startswith(b"HTTP/1.1 431 "), answer[:100]
    assert upstream_requests(up) == before
    with Client(edge.edge_port) as c:
        c.send(req("/next"))
        assert c.response().json()["path"] == "/next"


# -- pipelining: row 38 ---------------------------------------------------------------------------


def test_valid_request_then_garbage_gets_200_then_400_and_close(edge: TurnoutInstance) -> None:
    """`GET /1 ...` then `Invalid` in one segment: a 200 for /1, then a 400, then the close (row 38)."""
    with Client(edge.edge_port) as c:
        c.send(req("/1") + b"Invalid\r\n\r\n")
        first = c.response()
        assert first.status == 200 and first.json()["path"] == "/1"
        assert c.response().status == 400
        assert c.closed()


def test_three_pipelined_requests_are_answered_in_order(edge: TurnoutInstance) -> None:
    """Three requests in one segment get three responses in order; the last asked to close."""
    with Client(edge.edge_port) as c:
        c.send(req("/a") + req("/b") + req("/c", "Connection: close"))
        assert [c.response().json()["path"] for _ in range(3)] == ["/a", "/b", "/c"]
        assert c.closed()


# -- deadlines: rows 33, 34 -----------------------------------------------------------------------


def trickle_head(port: int, give_up_after: float) -> tuple[Response | None, bool]:
    """Send a request head one byte per 0.2 s until the server answers or `give_up_after`
    seconds pass: the answer (None if none came) and whether the server then closed."""
    with Client(port) as c:
        c.send(b"GET / HTTP/1.1\r\nHost: a\r\n")
        deadline = time.monotonic() + give_up_after
        try:
            while time.monotonic() < deadline and not c.readable():
                time.sleep(0.2)
                c.send(b"X")
        except OSError:
            pass
        if not c.readable():
            return None, False
        return c.response(), c.closed()


# The other deadlines short and long: a shorter deadline must not wait for a pending longer
# timer (the keep-alive one armed at connect).
OTHER_TIMEOUTS = [
    pytest.param(0.5, id="other-timeouts-short"),
    pytest.param(60.0, id="other-timeouts-long"),
]


@pytest.mark.parametrize("others", OTHER_TIMEOUTS)
def test_slow_header_gets_408_and_close(
    start: Callable[..., TurnoutInstance], others: float
) -> None:
    """A head trickled one byte per 0.2 s gets 408 and a close within 10 s at a 0.5 s header deadline (row 33)."""
    inst = start(client_header_timeout_s=0.5, client_keepalive_timeout_s=others)
    resp, closed = trickle_head(inst.edge_port, give_up_after=10)
    assert resp is not None and resp.status == 408 and closed


def test_silent_connection_is_closed_after_keepalive_timeout(
    start: Callable[..., TurnoutInstance],
) -> None:
    """A client that connects and sends nothing is closed at the keep-alive timeout, with no bytes."""
    inst = start(client_keepalive_timeout_s=0.5)
    with Client(inst.edge_port) as c:
        assert c.closed(timeout=10)


@pytest.mark.parametrize("others", OTHER_TIMEOUTS)
def test_stalled_body_gets_408_and_the_upstream_request_is_aborted(
    start: Callable[..., TurnoutInstance], others: float
) -> None:
    """POST Content-Length 1000, 10 bytes, then silence: 408 and close within 10 s; the upstream never gets the whole body (row 34)."""
    log = BodyLog()
    rec = ThreadedServer(log, http="httptools").start()
    try:
        inst = start(
            seed=release_doc(rec.url, rec.url),
            client_idle_timeout_s=0.5,
            client_header_timeout_s=others,
            client_keepalive_timeout_s=others,
        )
        with Client(inst.edge_port) as c:
            c.send(req("/upload", "Content-Length: 1000", method="POST") + b"0123456789")
            assert c.response().status == 408
            assert c.closed()
        # Each upstream request ends (an unaborted one would wait for its body forever), short.
        assert wait_until(lambda: len(log.bodies) == log.requests, 10)
        assert all(not complete and length < 1000 for length, complete in log.bodies), log.bodies
    finally:
        rec.stop()


def test_client_that_stops_reading_is_cut_off_and_the_upstream_freed(
    start: Callable[..., TurnoutInstance], up: dict[str, ThreadedServer]
) -> None:
    """A client that asks for 64 MiB and reads nothing is aborted at the send-stall deadline; the upstream connection is dropped, the pool drains, the next request works (§2.7 slow read)."""
    inst = start(seed=release_doc(up["stable"].url, up["canary"].url), client_idle_timeout_s=0.5)
    sock = socket.create_connection((LOOPBACK, inst.edge_port), timeout=10)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.sendall(req("/stream?bytes=67108864&chunk=65536"))
        pools = inst.context["edge"].pools.pools.values()
        assert wait_until(lambda: any(p.active_count for p in pools), 10)
        # Nothing is read: once the send buffers are full the edge waits 0.5 s, then aborts.
        assert wait_until(lambda: all(p.active_count == 0 for p in pools), 30)
        received = 0
        with contextlib.suppress(ConnectionResetError):
            while chunk := sock.recv(1 << 20):
                received += len(chunk)
        assert received < 64 * MiB  # cut off with a reset, not delivered whole or trickled on
    finally:
        sock.close()
    with Client(inst.edge_port) as c:
        c.send(req("/after"))
        assert c.response().json()["path"] == "/after"


# -- keep-alive and HTTP/1.0: §2.10 ---------------------------------------------------------------


def test_keepalive_serves_sequential_requests_and_http10_closes(edge: TurnoutInstance) -> None:
    """Two requests one after the other on one connection are both answered; HTTP/1.0 without keep-alive closes."""
    with Client(edge.edge_port) as c:
        for path in ("/one", "/two"):
            c.send(req(path))
            assert c.response().json()["path"] == path
    with Client(edge.edge_port) as c:
        c.send(req("/old", version="HTTP/1.0"))
        resp = c.response()
        assert resp.status == 200 and resp.json()["path"] == "/old"
        assert c.closed()


def test_http10_keepalive_with_content_length_stays_open(
    edge: TurnoutInstance, up: dict[str, ThreadedServer]
) -> None:
    """HTTP/1.0 + `Connection: keep-alive` with a Content-Length response: a second request is answered on the same connection."""
    open_gates(up)
    with Client(edge.edge_port) as c:
        for n in (10, 20):
            c.send(req(f"/gate?bytes={n}", "Connection: keep-alive", version="HTTP/1.0"))
            resp = c.response()
            assert resp.status == 200 and len(resp.body) == n
            assert resp.headers["content-length"] == str(n)
            assert "transfer-encoding" not in resp.headers


def test_http10_keepalive_response_says_keep_alive(
    edge: TurnoutInstance, up: dict[str, ThreadedServer]
) -> None:
    """A kept-open answer to an HTTP/1.0 keep-alive request carries `Connection: keep-alive`."""
    # Without it an HTTP/1.0 client must assume the server closes (RFC 9112 §9.3,
    # RFC 2068 §19.7.1) and opens a new connection each time, while the server keeps it open.
    open_gates(up)
    with Client(edge.edge_port) as c:
        c.send(req("/gate?bytes=10", "Connection: keep-alive", version="HTTP/1.0"))
        assert c.response().headers.get("connection", "").lower() == "keep-alive"


# -- Expect: 100-continue: §2.9, row 31 -----------------------------------------------------------


def test_expect_100_continue_then_body_reaches_upstream(edge: TurnoutInstance) -> None:
    """A small body with Expect: 100-continue: `100 Continue` comes before the body is sent; the upstream gets the body, not Expect."""
    with Client(edge.edge_port) as c:
        c.send(req("/upload", "Content-Length: 5", "Expect: 100-continue", method="POST"))
        assert c.response().status == 100
        c.send(b"hello")
        resp = c.response()
        assert resp.status == 200 and resp.json()["body_length"] == 5
        assert "expect" not in dict(resp.json()["headers"])


def test_expect_100_continue_with_huge_length_is_413_without_continue(
    edge: TurnoutInstance, up: dict[str, ThreadedServer]
) -> None:
    """Content-Length 10 GiB + Expect: 100-continue gets 413 first (no `100 Continue`), then a close (row 31)."""
    before = upstream_requests(up)
    data = req("/upload", "Content-Length: 10737418240", "Expect: 100-continue", method="POST")
    resp, closed = refused(edge.edge_port, data)
    assert resp.status == 413 and closed
    assert upstream_requests(up) == before


# -- upgrades: §2.11, row 36 ----------------------------------------------------------------------


def test_h2c_upgrade_is_a_plain_request_and_the_rest_is_never_parsed(
    edge: TurnoutInstance, up: dict[str, ThreadedServer]
) -> None:
    """An h2c upgrade is answered as a normal 200 without Upgrade/HTTP2-Settings upstream; a request after it is never read."""
    before = upstream_requests(up)
    h2c = req(
        "/x",
        "Upgrade: h2c",
        "Connection: Upgrade, HTTP2-Settings",
        "HTTP2-Settings: AAMAAABkAAQCAAAAAAIAAAAA",
    )
    with Client(edge.edge_port) as c:
        c.send(h2c + req("/smuggled"))
        resp = c.response()
        assert resp.status == 200 and resp.json()["path"] == "/x"
        seen = {name for name, _ in resp.json()["headers"]}
        assert not seen & {"upgrade", "http2-settings", "connection"}, seen
        assert c.closed()
    assert upstream_requests(up) == before + 1


def ws_frame(text: str) -> bytes:
    payload = text.encode()
    mask = os.urandom(4)
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return bytes([0x81, 0x80 | len(payload)]) + mask + masked


def test_websocket_frame_sent_with_the_handshake_is_relayed(edge: TurnoutInstance) -> None:
    """A text frame in the same segment as the upgrade request reaches the upstream and is echoed."""
    handshake = req(
        "/ws",
        "Upgrade: websocket",
        "Connection: Upgrade",
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
        "Sec-WebSocket-Version: 13",
    )
    with Client(edge.edge_port) as c:
        c.send(handshake + ws_frame("ping"))
        assert c.response().status == 101
        texts = []
        for _ in range(2):
            opcode, length = c.take(2)
            assert opcode == 0x81 and length < 126  # final text frame, unmasked, short
            texts.append(c.take(length).decode())
    arm = texts[0].rsplit("=", 1)[1]
    assert texts == [f"hello from {arm} arm={arm}", f"{arm}: ping"]


# -- streaming: §2.10 -----------------------------------------------------------------------------


def test_streamed_response_is_chunked_and_head_has_no_body(edge: TurnoutInstance) -> None:
    """A streamed upstream body reaches an HTTP/1.1 client chunked and whole; HEAD of it sends no body bytes."""
    total = 300_001
    path = f"/stream?bytes={total}&chunk=7000"
    conn = http.client.HTTPConnection(LOOPBACK, edge.edge_port, timeout=10)
    try:
        conn.request("GET", path, headers={"x-user-id": "bob"})
        resp = conn.getresponse()
        assert resp.status == 200 and resp.getheader("transfer-encoding") == "chunked"
        assert len(resp.read()) == total
    finally:
        conn.close()
    with Client(edge.edge_port) as c:
        c.send(req(path, method="HEAD") + req("/after"))
        assert c.response(method="HEAD").status == 200
        assert c.response().json()["path"] == "/after"  # stray body bytes would break this


# -- half-close and shutdown ----------------------------------------------------------------------


def test_half_closed_client_gets_every_answer_then_eof(edge: TurnoutInstance) -> None:
    """Requests then shutdown(SHUT_WR): each pipelined request is still answered in full, then EOF."""
    with Client(edge.edge_port) as c:
        c.send(req("/slow?s=0.3") + req("/second"))
        c.sock.shutdown(socket.SHUT_WR)
        assert c.response().json()["path"] == "/slow"
        assert c.response().json()["path"] == "/second"
        assert c.closed()


def test_graceful_shutdown_finishes_in_flight_and_closes_idle(
    start: Callable[..., TurnoutInstance], up: dict[str, ThreadedServer]
) -> None:
    """On stop, a request in flight to a slow upstream completes with 200 and a close; an idle keep-alive connection is closed."""
    inst = start(client_keepalive_timeout_s=60)
    with Client(inst.edge_port) as idle, Client(inst.edge_port) as busy:
        idle.send(req("/warm"))
        assert idle.response().status == 200
        before = upstream_requests(up)
        busy.send(req("/slow?s=1"))
        assert wait_until(lambda: upstream_requests(up) > before, 10)
        stopper = threading.Thread(target=inst.stop)
        stopper.start()
        try:
            assert idle.closed(timeout=10)
            resp = busy.response()
            assert resp.status == 200 and resp.json()["path"] == "/slow"
            assert resp.headers.get("connection") == "close"
            assert busy.closed()
        finally:
            stopper.join(30)
    assert not stopper.is_alive()
    with pytest.raises(OSError):
        socket.create_connection((LOOPBACK, inst.edge_port), timeout=2).close()


# -- memory of idle connections ---------------------------------------------------------------------


def test_idle_connections_give_back_their_parser_and_keep_working(
    start: Callable[..., TurnoutInstance], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Above PARSER_RELEASE_CONNECTIONS open connections an idle keep-alive connection drops its
    parser between requests; its next requests (one at a time, then pipelined with a body) are
    parsed by a fresh one and answered in order."""
    import edge.frontend

    monkeypatch.setattr(edge.frontend, "PARSER_RELEASE_CONNECTIONS", 0)
    inst = start()
    server = inst.context["servers"][0]
    with Client(inst.edge_port) as client:
        for n in range(3):
            client.send(req(f"/seq{n}"))
            response = client.response()
            assert response.status == 200 and response.json()["path"] == f"/seq{n}"
            (conn,) = server.connections
            assert wait_until(lambda conn=conn: conn.parser is None, 5)
        client.send(req("/a") + req("/b", "Content-Length: 3", method="POST")[:-4] + b"\r\n\r\nxyz")
        first, second = client.response(), client.response()
        assert (first.status, first.json()["path"]) == (200, "/a")
        assert (second.status, second.json()["path"], second.json()["body_length"]) == (
            200,
            "/b",
            3,
        )


def test_parsers_are_kept_below_the_release_threshold(edge: TurnoutInstance) -> None:
    """With few connections (the default threshold), a keep-alive connection keeps its parser
    between requests: nothing is rebuilt per request."""
    server = edge.context["servers"][0]
    with Client(edge.edge_port) as client:
        client.send(req("/one"))
        assert client.response().status == 200
        (conn,) = server.connections
        parser = conn.parser
        client.send(req("/two"))
        assert client.response().status == 200
        assert conn.parser is parser
