"""The client connection cap (`max_client_connections`, issue #12 point 2) and HARDENING
table (b) row 15 (slowloris from many sockets), on a real instance over loopback."""

from __future__ import annotations

import socket
from pathlib import Path

import httpx
import pytest

from tests.harness import TurnoutInstance, backends, release_doc, wait_until

pytestmark = pytest.mark.timeout(60)

CAP = 20


def read_until_closed(sock: socket.socket, timeout: float = 10.0) -> bytes:
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


def metric(instance: TurnoutInstance, name: str) -> float:
    text = httpx.get(instance.admin_url + "/metrics", timeout=5).text
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in /metrics")


def test_hardening_b15_slowloris_sockets_are_capped_then_closed_at_the_header_deadline(
    tmp_path: Path,
) -> None:
    """CAP sockets trickle a request head that never completes. A connection beyond the cap
    is answered 503 with Retry-After at once and closed; every slowloris socket gets 408 and
    is closed at the header deadline; then a legitimate request is served again."""
    with backends("stable", "canary") as servers:
        seed = release_doc(servers["stable"].url, servers["canary"].url, stage="ga")
        instance = TurnoutInstance(
            tmp_path / "state",
            seed=seed,
            max_client_connections=CAP,
            client_header_timeout_s=1.0,
        ).start()
        slow: list[socket.socket] = []
        try:
            for _ in range(CAP):
                sock = socket.create_connection(("127.0.0.1", instance.edge_port), timeout=5)
                sock.sendall(b"GET / HTTP/1.1\r\nHost: a\r\n")  # and never the end of the head
                slow.append(sock)
            assert wait_until(lambda: metric(instance, "turnout_client_connections") == CAP, 10)
            with socket.create_connection(("127.0.0.1", instance.edge_port), timeout=5) as extra:
                extra.sendall(b"GET / HTTP/1.1\r\nHost: a\r\nX-User-Id: u1\r\n\r\n")
                answer = read_until_closed(extra)
            assert answer.startswith(b"HTTP/1.1 503 "), answer[:80]
            head = answer.split(b"\r\n\r\n")[0].lower()
            assert b"\r\nretry-after: 1" in head and b"\r\nconnection: close" in head
            assert metric(instance, "turnout_client_connections_refused_total") == 1
            for sock in slow:
                assert read_until_closed(sock).startswith(b"HTTP/1.1 408 ")
            assert wait_until(lambda: metric(instance, "turnout_client_connections") == 0, 10)
            with httpx.Client(base_url=instance.edge_url) as client:
                ok = client.get("/", headers={"X-User-Id": "u1"})
            assert ok.status_code == 200
        finally:
            for sock in slow:
                sock.close()
            instance.stop()


def test_connections_under_the_cap_are_served_and_a_freed_slot_is_reused(tmp_path: Path) -> None:
    """Keep-alive clients up to the cap are all served; one more is refused; once one of
    them leaves, a new connection is served."""
    with backends("stable", "canary") as servers:
        seed = release_doc(servers["stable"].url, servers["canary"].url, stage="ga")
        instance = TurnoutInstance(tmp_path / "state", seed=seed, max_client_connections=3).start()
        held: list[socket.socket] = []
        try:
            for i in range(3):
                sock = socket.create_connection(("127.0.0.1", instance.edge_port), timeout=5)
                sock.sendall(b"GET / HTTP/1.1\r\nHost: a\r\nX-User-Id: u%d\r\n\r\n" % i)
                assert sock.recv(65536).startswith(b"HTTP/1.1 200 ")
                held.append(sock)
            with socket.create_connection(("127.0.0.1", instance.edge_port), timeout=5) as extra:
                assert read_until_closed(extra).startswith(b"HTTP/1.1 503 ")
            held.pop().close()
            assert wait_until(lambda: metric(instance, "turnout_client_connections") == 2, 10)
            with httpx.Client(base_url=instance.edge_url) as client:
                assert client.get("/", headers={"X-User-Id": "u9"}).status_code == 200
        finally:
            for sock in held:
                sock.close()
            instance.stop()
