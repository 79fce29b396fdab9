"""Small forwarding fixes of issue #12 through a real Turnout and real upstreams:
`Content-Length: 010` refused (HARDENING table (a) row 5), `Via` upstream off by default
behind a setting, and upstream `Location` / `Content-Location` made client-facing."""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from edge.redirects import relative_location, upstream_origins
from edge.upstream import UpstreamPool
from tests.harness import LOOPBACK, ThreadedServer, TurnoutInstance, backends, release_doc


class RedirectApp:
    """An upstream that redirects to its own absolute URL (as many frameworks do)."""

    def __init__(self) -> None:
        self.port = 0

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        own = f"http://{LOOPBACK}:{self.port}"
        headers = [
            (b"location", f"{own}/login?next=%2Fa".encode()),
            (b"content-location", f"{own}//evil.example/x".encode()),
            (b"content-length", b"0"),
        ]
        if scope["path"] == "/elsewhere":
            headers[0] = (b"location", b"https://sso.example/login")
        await send({"type": "http.response.start", "status": 302, "headers": headers})
        await send({"type": "http.response.body", "body": b""})


@pytest.fixture
def up() -> Iterator[dict[str, ThreadedServer]]:
    with backends("stable", "canary") as servers:
        yield servers


@pytest.fixture
def start(tmp_path: Path) -> Iterator[Callable[..., TurnoutInstance]]:
    started: list[TurnoutInstance] = []

    def make(seed: dict[str, Any], **overrides: Any) -> TurnoutInstance:
        inst = TurnoutInstance(tmp_path / f"s{len(started)}", seed=seed, **overrides)
        started.append(inst.start())
        return inst

    yield make
    for inst in started:
        inst.stop()


def raw_exchange(port: int, data: bytes) -> tuple[bytes, bool]:
    """Send `data`; return the answer and whether the server closed the connection."""
    with socket.create_connection((LOOPBACK, port), timeout=10) as sock:
        sock.sendall(data)
        out = b""
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                return out, True
            out += chunk
            if b"\r\n\r\n" in out and out.endswith(b"\n"):
                sock.settimeout(2)
                try:
                    rest = sock.recv(65536)
                except TimeoutError:
                    return out, False
                if not rest:
                    return out, True
                out += rest


@pytest.mark.parametrize(
    ("value", "status"),
    [
        (b"010", 400),
        (b"00", 400),
        (b"05", 400),
        (b"+5", 400),
        (b"-1", 400),
        (b"0x5", 400),
        (b"1Z", 400),
        (b"", 400),
        (b"18446744073709551616", 400),
        (b"10737418240", 413),
    ],
)
def test_hardening_a5_bad_content_length_is_refused(
    start: Callable[..., TurnoutInstance], up: dict[str, ThreadedServer], value: bytes, status: int
) -> None:
    """HARDENING table (a) row 5: `Content-Length` `010`, `+5`, `-1`, `0x5`, `1Z`, empty or
    past 64 bits gets 400 (a huge valid one 413) and close, and reaches no upstream; a plain
    `0` still passes."""
    inst = start(release_doc(up["stable"].url, up["canary"].url))
    before = sum(s.app.requests for s in up.values())
    out, closed = raw_exchange(
        inst.edge_port,
        b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: " + value + b"\r\n\r\n0123456789",
    )
    assert out.startswith(b"HTTP/1.1 %d " % status) and closed
    assert sum(s.app.requests for s in up.values()) == before
    resp = httpx.post(inst.edge_url + "/x", content=b"", headers={"x-user-id": "bob"})
    assert resp.status_code == 200


def test_via_is_not_sent_upstream_by_default(
    start: Callable[..., TurnoutInstance], up: dict[str, ThreadedServer]
) -> None:
    """By default the upstream sees no `Via` of ours (a client's own is passed on); with
    `via_upstream` it sees ours appended; the client always gets Turnout's `Via`."""
    seed = release_doc(up["stable"].url, up["canary"].url)
    plain = start(seed)
    resp = httpx.get(plain.edge_url + "/p", headers={"x-user-id": "bob"})
    upstream = dict(resp.json()["headers"])
    assert "via" not in upstream
    assert resp.headers["via"] == "1.1 turnout"
    resp = httpx.get(plain.edge_url + "/p", headers={"x-user-id": "bob", "via": "1.0 corp"})
    assert dict(resp.json()["headers"])["via"] == "1.0 corp"
    on = start(seed, via_upstream=True)
    resp = httpx.get(on.edge_url + "/p", headers={"x-user-id": "bob", "via": "1.0 corp"})
    assert dict(resp.json()["headers"])["via"] == "1.0 corp, 1.1 turnout"


def test_upstream_location_is_made_client_facing(start: Callable[..., TurnoutInstance]) -> None:
    """A redirect to the upstream's own URL reaches the client as a relative reference (no
    upstream host or port), a `//host` path cannot become an open redirect, other URLs are
    untouched, and `rewrite_upstream_redirects: false` turns it off."""
    app = RedirectApp()
    server = ThreadedServer(app).start()
    app.port = server.port
    try:
        seed = release_doc(server.url, server.url)
        inst = start(seed)
        resp = httpx.get(inst.edge_url + "/a", headers={"x-user-id": "bob"})
        assert resp.status_code == 302
        assert resp.headers["location"] == "/login?next=%2Fa"
        assert resp.headers["content-location"] == "/.//evil.example/x"
        resp = httpx.get(inst.edge_url + "/elsewhere", headers={"x-user-id": "bob"})
        assert resp.headers["location"] == "https://sso.example/login"
        off = start(seed, rewrite_upstream_redirects=False)
        resp = httpx.get(off.edge_url + "/a", headers={"x-user-id": "bob"})
        assert resp.headers["location"] == f"{server.url}/login?next=%2Fa"
    finally:
        server.stop()


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (b"http://up:8080/x?y", b"/x?y"),
        (b"HTTP://UP:8080", b"/"),
        (b"http://up:8080?q", b"/?q"),
        (b"http://up:80800/x", b"http://up:80800/x"),
        (b"http://upper:8080/x", b"http://upper:8080/x"),
        (b"http://web/x", b"/x"),
        (b"/already/relative", b"/already/relative"),
    ],
)
def test_relative_location_rules(value: bytes, expected: bytes) -> None:
    """Only the arm's own origins (default ports implied, case-insensitive) are stripped."""
    origins = upstream_origins([UpstreamPool("up", 8080), UpstreamPool("web", 80)])
    assert relative_location(value, origins) == expected
