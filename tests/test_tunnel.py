"""WebSocket tunnels (edge/tunnel.py) end to end: a real Turnout, real upstream servers and the
`websockets` library as a client only. Bytes both ways with flow control, an upstream that
refuses the upgrade, the client closing, the edge closing with 1001 on shutdown and with a
given code through the registry."""

from __future__ import annotations

import base64
import hashlib
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect as ws_connect

from edge.pipeline import Pipeline
from edge.tunnel import CLOSE_SERVICE_RESTART, _FrameEdges, close_frame
from tests.harness import LOOPBACK, TurnoutInstance, backends, release_doc, wait_until

pytestmark = pytest.mark.timeout(60)

HANDSHAKE = (
    b"GET /ws HTTP/1.1\r\nHost: a\r\nx-user-id: bob\r\nUpgrade: websocket\r\n"
    b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
    b"Sec-WebSocket-Version: 13\r\n\r\n"
)


@pytest.fixture
def inst(tmp_path: Path) -> Iterator[TurnoutInstance]:
    with backends("stable", "canary") as up:
        seed = release_doc(up["stable"].url, up["canary"].url, stage="off")
        instance = TurnoutInstance(tmp_path / "s", seed=seed, expose_decision_headers=True)
        yield instance.start()
        instance.stop()


def pipeline_of(inst: TurnoutInstance) -> Pipeline:
    pipeline: Pipeline = inst.context["edge"].pipeline
    return pipeline


def open_tunnels(inst: TurnoutInstance) -> int:
    async def count() -> int:
        return pipeline_of(inst).tunnels.count("web", "stable")

    result: int = inst.run(count())
    return result


def test_bytes_flow_both_ways_and_the_tunnel_is_registered(inst: TurnoutInstance) -> None:
    """Text and 2 MiB binary messages cross both ways whole; the tunnel is counted under its
    release and arm while open and forgotten once the client closes."""
    url = f"ws://{LOOPBACK}:{inst.edge_port}/ws"
    big = bytes(range(256)) * (8 * 1024)  # 2 MiB: far more than one socket buffer
    with ws_connect(url, additional_headers={"x-user-id": "bob"}, max_size=None) as ws:
        assert ws.recv(timeout=5) == "hello from stable arm=stable"
        assert open_tunnels(inst) == 1
        scrape = httpx.get(inst.admin_url + "/metrics", timeout=10).text
        assert 'turnout_websocket_tunnels_open{arm="stable",release="web"} 1.0' in scrape
        ws.send(big)
        assert ws.recv(timeout=20) == big
        ws.send("ping")
        assert ws.recv(timeout=5) == "stable: ping"
    assert wait_until(lambda: open_tunnels(inst) == 0, 10)
    assert pipeline_of(inst).metrics.websockets == {("web", "stable"): 1}
    scrape = httpx.get(inst.admin_url + "/metrics", timeout=10).text
    assert "turnout_websocket_tunnels_open{" not in scrape
    assert 'turnout_websocket_sessions_total{arm="stable",release="web"} 1.0' in scrape


def test_edge_closes_open_tunnels_with_1001_on_shutdown(inst: TurnoutInstance) -> None:
    """SIGTERM-style shutdown sends the client a close frame with 1001 (going away)."""
    url = f"ws://{LOOPBACK}:{inst.edge_port}/ws"
    with ws_connect(url, additional_headers={"x-user-id": "bob"}) as ws:
        assert ws.recv(timeout=5).startswith("hello")
        stopper = threading.Thread(target=inst.stop)
        stopper.start()
        with pytest.raises(ConnectionClosed):
            ws.recv(timeout=10)
        assert ws.close_code == 1001
        stopper.join(20)


def test_registry_closes_a_release_arm_with_a_given_code(inst: TurnoutInstance) -> None:
    """`tunnels.close(release, arm, 1012)` (what a rollback will call) reaches the client as
    close code 1012 and leaves no tunnel registered."""
    url = f"ws://{LOOPBACK}:{inst.edge_port}/ws"
    with ws_connect(url, additional_headers={"x-user-id": "bob"}) as ws:
        assert ws.recv(timeout=5).startswith("hello")

        async def close() -> int:
            return pipeline_of(inst).tunnels.close("web", "stable", CLOSE_SERVICE_RESTART)

        assert inst.run(close()) == 1
        with pytest.raises(ConnectionClosed):
            ws.recv(timeout=10)
        assert ws.close_code == CLOSE_SERVICE_RESTART
    assert open_tunnels(inst) == 0


class RefusingUpstream:
    """A raw upstream that answers every request with 403 and records every byte it got."""

    def __init__(self) -> None:
        self.sock = socket.create_server((LOOPBACK, 0))
        self.port = self.sock.getsockname()[1]
        self.received = b""
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        conn, _ = self.sock.accept()
        with conn:
            conn.settimeout(2)
            while b"\r\n\r\n" not in self.received:
                self.received += conn.recv(65536)
            conn.sendall(b"HTTP/1.1 403 Forbidden\r\ncontent-length: 7\r\n\r\nno way\n")
            try:
                while chunk := conn.recv(65536):
                    self.received += chunk
            except OSError:
                pass

    def close(self) -> None:
        self.sock.close()
        self.thread.join(5)


def test_upstream_refusing_the_upgrade_is_relayed_and_held_bytes_never_sent(
    tmp_path: Path,
) -> None:
    """An upstream answering 403 to the upgrade: the client gets that 403 (body whole, then the
    connection closes), and bytes sent after the handshake never reach the upstream, so they
    cannot run there as a request nobody admitted."""
    upstream = RefusingUpstream()
    url = f"http://{LOOPBACK}:{upstream.port}"
    instance = TurnoutInstance(tmp_path / "s", seed=release_doc(url, url, stage="off")).start()
    try:
        smuggled = b"GET /admin HTTP/1.1\r\nHost: a\r\n\r\n"
        with socket.create_connection((LOOPBACK, instance.edge_port), timeout=10) as s:
            s.sendall(HANDSHAKE + smuggled)
            answer = b""
            while chunk := s.recv(65536):
                answer += chunk
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 403 "), answer
        assert b"connection: close" in head.lower()
        assert body == b"no way\n"
    finally:
        instance.stop()
        upstream.close()
    assert upstream.received.startswith(b"GET /ws HTTP/1.1\r\n")
    assert b"upgrade: websocket" in upstream.received.lower()
    assert b"/admin" not in upstream.received


def test_unreachable_websocket_upstream_is_502_naming_the_arm(tmp_path: Path) -> None:
    """The same admission and error answer as HTTP: a dead upstream gives 502 with release and arm."""
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        dead = f"http://{LOOPBACK}:{s.getsockname()[1]}"
    instance = TurnoutInstance(tmp_path / "s", seed=release_doc(dead, dead, stage="off")).start()
    try:
        with socket.create_connection((LOOPBACK, instance.edge_port), timeout=10) as s:
            s.sendall(HANDSHAKE)
            answer = b""
            while chunk := s.recv(65536):
                answer += chunk
        assert answer.startswith(b"HTTP/1.1 502 "), answer
        assert b"release web, arm stable" in answer
    finally:
        instance.stop()


def test_an_upgrade_moves_on_to_the_arms_next_upstream_when_one_is_dead(tmp_path: Path) -> None:
    """Stable arm = one dead and one live upstream: every upgrade is answered 101 by the live
    one (as plain HTTP moves on), never a 502."""
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        dead = f"http://{LOOPBACK}:{s.getsockname()[1]}"
    with backends("stable", "canary") as up:
        seed = release_doc(up["stable"].url, up["canary"].url, stage="off")
        seed["releases"]["web"]["stable"] = [dead, up["stable"].url]
        instance = TurnoutInstance(tmp_path / "s", seed=seed).start()
        try:
            for _ in range(20):
                with ws_connect(f"ws://{LOOPBACK}:{instance.edge_port}/ws") as ws:
                    ws.send("ping")
                    assert ws.recv(timeout=10)
        finally:
            instance.stop()


def test_fragment_in_a_websocket_target_is_refused_like_http(inst: TurnoutInstance) -> None:
    """WebSocket admission is HTTP's: a fragment in the query is a 400 before any upstream."""
    with socket.create_connection((LOOPBACK, inst.edge_port), timeout=10) as s:
        s.sendall(HANDSHAKE.replace(b"GET /ws ", b"GET /ws?a#b "))
        answer = s.recv(65536)
    assert answer.startswith(b"HTTP/1.1 400 "), answer
    assert b"fragment in request target" in answer


@pytest.mark.parametrize("split", [1, 2, 3, 5, 9, 1000])
def test_frame_edges_follow_any_split(split: int) -> None:
    """Frame boundaries (RFC 6455 §5.2) are found however the bytes are cut: short, 16-bit and
    64-bit lengths, masked and not; mid-frame is never a boundary."""
    frames = [
        bytes([0x81, 0x05]) + b"hello",
        bytes([0x82, 0xFE, 0x01, 0x00]) + b"mask" + b"x" * 256,
        bytes([0x82, 0x7F]) + (70_000).to_bytes(8, "big") + b"y" * 70_000,
        close_frame(1001, "bye", masked=True),
    ]
    edges = _FrameEdges()
    stream = b"".join(frames)
    boundaries = set()
    at = 0
    for frame in frames:
        at += len(frame)
        boundaries.add(at)
    for i in range(0, len(stream), split):
        edges.feed(stream[i : i + split])
        end = min(i + split, len(stream))
        assert edges.at_boundary is (end in boundaries), end


def test_close_frame_layout() -> None:
    """An unmasked close frame is 0x88, length, code, reason; a masked one unmasks to the same."""
    assert close_frame(1001, "", masked=False) == b"\x88\x02\x03\xe9"
    masked = close_frame(1012, "restart", masked=True)
    assert masked[0] == 0x88 and masked[1] == 0x80 | 9
    mask, payload = masked[2:6], masked[6:]
    assert bytes(b ^ mask[i % 4] for i, b in enumerate(payload)) == b"\x03\xf4restart"


class ScriptedWebSocketUpstream:
    """A raw upstream that accepts one WebSocket handshake (RFC 6455 §4.2.2) and then records
    every byte until the edge closes the connection."""

    GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

    def __init__(self) -> None:
        self.sock = socket.create_server((LOOPBACK, 0))
        self.port = self.sock.getsockname()[1]
        self.after_handshake = b""
        self.saw_eof = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        conn, _ = self.sock.accept()
        with conn:
            conn.settimeout(10)
            head = b""
            while b"\r\n\r\n" not in head:
                head += conn.recv(65536)
            head, _, rest = head.partition(b"\r\n\r\n")
            key = next(
                line.split(b":", 1)[1].strip()
                for line in head.split(b"\r\n")
                if line.lower().startswith(b"sec-websocket-key:")
            )
            # SHA-1 is what RFC 6455 §4.2.2 prescribes for the accept key, not a security choice.
            digest = hashlib.sha1(key + self.GUID, usedforsecurity=False).digest()
            accept = base64.b64encode(digest)
            conn.sendall(
                b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                b"Connection: Upgrade\r\nSec-WebSocket-Accept: " + accept + b"\r\n\r\n"
            )
            self.after_handshake = rest
            try:
                while chunk := conn.recv(65536):
                    self.after_handshake += chunk
                self.saw_eof.set()
            except OSError:
                pass

    def close(self) -> None:
        self.sock.close()
        self.thread.join(5)


def test_client_close_frame_and_hang_up_reach_the_upstream_byte_for_byte(tmp_path: Path) -> None:
    """Bytes after the 101 are relayed unparsed (a close frame arrives exactly as sent), and the
    client hanging up closes the upstream connection and unregisters the tunnel."""
    upstream = ScriptedWebSocketUpstream()
    url = f"http://{LOOPBACK}:{upstream.port}"
    instance = TurnoutInstance(tmp_path / "s", seed=release_doc(url, url, stage="off")).start()
    try:
        frame = close_frame(1000, "done", masked=True)
        with socket.create_connection((LOOPBACK, instance.edge_port), timeout=10) as s:
            s.sendall(HANDSHAKE)
            head = b""
            while b"\r\n\r\n" not in head:
                head += s.recv(65536)
            assert head.startswith(b"HTTP/1.1 101 "), head
            assert b"sec-websocket-accept: " in head.lower()
            s.sendall(frame)
            assert wait_until(lambda: upstream.after_handshake == frame, 10)
        assert upstream.saw_eof.wait(10)
        assert wait_until(lambda: open_tunnels(instance) == 0, 10)
    finally:
        instance.stop()
        upstream.close()
