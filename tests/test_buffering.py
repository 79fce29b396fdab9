"""Request buffering (issue #12 point 1) through a real Turnout and a real upstream that
records every byte it receives: bodies are read whole before an upstream connection is
taken, so a slow or bad body never reaches the upstream; larger bodies stream at a minimum
rate; a request whose client left while waiting for a pool slot is never sent. Includes
HARDENING table (a) rows 32 and 34."""

from __future__ import annotations

import socket
import socketserver
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.harness import TurnoutInstance, wait_until

pytestmark = pytest.mark.timeout(60)


class Recorder(socketserver.ThreadingTCPServer):
    """A keep-alive HTTP/1.1 upstream (Content-Length bodies) that records what reached it;
    while `gate` is clear it holds its answers."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.lock = threading.Lock()
        self.received = b""
        self.connections = 0
        self.requests: list[bytes] = []
        self.gate = threading.Event()
        self.gate.set()
        self.thread = threading.Thread(target=self.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _Handler(socketserver.BaseRequestHandler):
    server: Recorder

    def handle(self) -> None:
        srv = self.server
        with srv.lock:
            srv.connections += 1
        buf = b""
        sock = self.request
        while True:
            while b"\r\n\r\n" not in buf:
                data = sock.recv(65536)
                if not data:
                    return
                with srv.lock:
                    srv.received += data
                buf += data
            head, _, buf = buf.partition(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            while len(buf) < length:
                data = sock.recv(65536)
                if not data:
                    return
                with srv.lock:
                    srv.received += data
                buf += data
            body, buf = buf[:length], buf[length:]
            with srv.lock:
                srv.requests.append(head.split(b"\r\n")[0] + b" " + b"%d" % len(body))
            srv.gate.wait(30)
            answer = b"got %d" % len(body)
            sock.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%s" % (len(answer), answer))


@pytest.fixture
def upstream() -> Iterator[Recorder]:
    srv = Recorder()
    srv.thread.start()
    try:
        yield srv
    finally:
        srv.gate.set()
        srv.shutdown()
        srv.server_close()


def start(tmp_path: Path, up: Recorder, **settings: Any) -> TurnoutInstance:
    seed = {
        "releases": {"web": {"stable": [up.url], "canary": [up.url], "stage": "off"}},
        "routes": [{"host": "*", "path_prefix": "/", "release": "web"}],
    }
    return TurnoutInstance(tmp_path / "state", seed=seed, **settings).start()


def connect(instance: TurnoutInstance) -> socket.socket:
    return socket.create_connection(("127.0.0.1", instance.edge_port), timeout=10)


def read_answer(sock: socket.socket, timeout: float = 10.0) -> bytes:
    """Everything until the edge closes the connection (or `timeout` passes)."""
    sock.settimeout(timeout)
    chunks = []
    while True:
        try:
            chunk = sock.recv(65536)
        except (TimeoutError, ConnectionResetError):
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks)


def read_response(sock: socket.socket) -> bytes:
    """One response with a Content-Length body, on a connection that stays open."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, data
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(
        int(line.split(b":")[1])
        for line in head.lower().split(b"\r\n")
        if line.startswith(b"content-length:")
    )
    while len(body) < length:
        body += sock.recv(65536)
    return head + b"\r\n\r\n" + body


def test_hardening_a34_a_trickled_body_gets_408_and_never_reaches_the_upstream(
    tmp_path: Path, upstream: Recorder
) -> None:
    """`POST` with `Content-Length: 1000`, 1 byte every 0.1 s (never idle long enough for
    the idle deadline): 408 and close at the body deadline; the upstream saw no connection
    and no byte."""
    instance = start(tmp_path, upstream, client_body_timeout_s=1.0, client_idle_timeout_s=5.0)
    try:
        with connect(instance) as sock:
            sock.sendall(b"POST /upload HTTP/1.1\r\nHost: a\r\nContent-Length: 1000\r\n\r\n")
            answer = b""
            sock.settimeout(0.1)
            for _ in range(100):
                try:
                    sock.sendall(b"x")
                except OSError:
                    break
                try:
                    answer += sock.recv(65536)
                except TimeoutError:
                    continue
                if answer:
                    break
            answer += read_answer(sock)
        assert answer.startswith(b"HTTP/1.1 408 "), answer[:80]
        assert b"connection: close" in answer.lower()
    finally:
        instance.stop()
    assert upstream.connections == 0 and upstream.received == b""


def test_hardening_a32_a_chunked_body_over_the_limit_is_413_with_nothing_sent(
    tmp_path: Path, upstream: Recorder
) -> None:
    """A chunked body exceeding `max_request_body_bytes`, sent in pieces: 413 and close;
    being buffered, none of it reached the upstream."""
    instance = start(tmp_path, upstream, max_request_body_bytes=1000)
    try:
        with connect(instance) as sock:
            sock.sendall(b"POST /p HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n")
            for _ in range(5):
                try:
                    sock.sendall(b"190\r\n" + b"y" * 400 + b"\r\n")
                except OSError:  # the edge has answered and closed: the rest is not read
                    break
                time.sleep(0.02)
            answer = read_answer(sock)
        assert answer.startswith(b"HTTP/1.1 413 "), answer[:80]
    finally:
        instance.stop()
    assert upstream.connections == 0 and upstream.received == b""


@pytest.mark.parametrize("pieces", [1, 3], ids=["one-packet", "in-pieces"])
def test_a_malformed_chunked_body_sends_no_byte_upstream(
    tmp_path: Path, upstream: Recorder, pieces: int
) -> None:
    """Good chunks, then a bad chunk terminator (CVE-2025-43859's shape): 400 and close, and
    neither the head nor the good chunks reached the upstream, whether the whole request
    arrived in one packet or the bad part came later."""
    request = (
        b"POST /p HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5\r\nhello\r\n5\r\nworldXX0\r\n\r\n"
    )
    instance = start(tmp_path, upstream)
    try:
        with connect(instance) as sock:
            step = len(request) // pieces + 1
            for i in range(0, len(request), step):
                sock.sendall(request[i : i + step])
                time.sleep(0.05)
            answer = read_answer(sock)
        assert answer.startswith(b"HTTP/1.1 400 "), answer[:80]
    finally:
        instance.stop()
    assert upstream.connections == 0 and upstream.received == b""


def test_a_body_larger_than_the_buffer_streams_and_arrives_whole(
    tmp_path: Path, upstream: Recorder
) -> None:
    """Past `client_body_buffer_bytes` the body streams: 50,000 bytes sent in ten pieces
    reach the upstream whole."""
    instance = start(tmp_path, upstream, client_body_buffer_bytes=1000)
    try:
        with connect(instance) as sock:
            sock.sendall(b"POST /big HTTP/1.1\r\nHost: a\r\nContent-Length: 50000\r\n\r\n")
            for _ in range(10):
                sock.sendall(b"z" * 5000)
                time.sleep(0.01)
            answer = read_response(sock)
        assert answer.startswith(b"HTTP/1.1 200 ") and answer.endswith(b"got 50000")
    finally:
        instance.stop()
    assert upstream.requests == [b"POST /big HTTP/1.1 50000"]


def test_a_streamed_body_below_the_minimum_rate_is_cut_off(
    tmp_path: Path, upstream: Recorder
) -> None:
    """A body past the buffer that then trickles (a byte every 0.1 s against a minimum of
    1,000 B/s over 0.5 s windows) is answered 408 and the connection closed."""
    instance = start(
        tmp_path,
        upstream,
        client_body_buffer_bytes=100,
        client_body_min_rate_bps=1000,
        client_body_rate_window_s=0.5,
        client_idle_timeout_s=5.0,
    )
    try:
        with connect(instance) as sock:
            sock.sendall(b"POST /slow HTTP/1.1\r\nHost: a\r\nContent-Length: 100000\r\n\r\n")
            sock.sendall(b"q" * 200)
            answer = b""
            sock.settimeout(0.1)
            for _ in range(100):
                try:
                    sock.sendall(b"q")
                except OSError:
                    break
                try:
                    answer += sock.recv(65536)
                except TimeoutError:
                    continue
                if answer:
                    break
            answer += read_answer(sock)
        assert answer.startswith(b"HTTP/1.1 408 "), answer[:80]
    finally:
        instance.stop()


def test_slow_bodies_do_not_hold_upstream_connections(tmp_path: Path, upstream: Recorder) -> None:
    """With a pool of 2 upstream connections, 10 clients trickling bodies do not take them:
    other users' requests on the same arm are all answered 200 meanwhile."""
    instance = start(tmp_path, upstream, upstream_max_connections=2, upstream_pool_timeout_s=1.0)
    slow: list[socket.socket] = []
    try:
        for _ in range(10):
            sock = connect(instance)
            sock.sendall(b"POST /slow HTTP/1.1\r\nHost: a\r\nContent-Length: 100\r\n\r\nab")
            slow.append(sock)
        with connect(instance) as sock:
            for i in range(10):
                sock.sendall(b"GET /ok/%d HTTP/1.1\r\nHost: a\r\n\r\n" % i)
                assert read_response(sock).startswith(b"HTTP/1.1 200 ")
        assert upstream.requests == [b"GET /ok/%d HTTP/1.1 0" % i for i in range(10)]
    finally:
        for sock in slow:
            sock.close()
        instance.stop()


def test_a_client_gone_while_queued_for_a_pool_slot_is_never_sent(
    tmp_path: Path, upstream: Recorder
) -> None:
    """Pool of 1, held by a slow first request; a second client's request waits for the
    slot and the client leaves. Once the first finishes, the upstream never sees the second
    request, and a third is served."""
    instance = start(tmp_path, upstream, upstream_max_connections=1, upstream_pool_timeout_s=10.0)
    try:
        upstream.gate.clear()
        first = connect(instance)
        first.sendall(b"GET /first HTTP/1.1\r\nHost: a\r\n\r\n")
        assert wait_until(lambda: upstream.requests == [b"GET /first HTTP/1.1 0"], 10)
        second = connect(instance)
        second.sendall(b"GET /second HTTP/1.1\r\nHost: a\r\n\r\n")
        time.sleep(0.3)  # the second request is now queued for the pool's one slot
        second.close()
        time.sleep(0.3)
        upstream.gate.set()
        assert read_response(first).startswith(b"HTTP/1.1 200 ")
        first.close()
        with connect(instance) as third:
            third.sendall(b"GET /third HTTP/1.1\r\nHost: a\r\n\r\n")
            assert read_response(third).startswith(b"HTTP/1.1 200 ")
        assert upstream.requests == [b"GET /first HTTP/1.1 0", b"GET /third HTTP/1.1 0"]
    finally:
        upstream.gate.set()
        instance.stop()
