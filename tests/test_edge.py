"""End-to-end behaviour of the edge on loopback: real upstream servers, a real Turnout on its
own HTTP/1.1 server."""

from __future__ import annotations

import asyncio
import http.client
import socket
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from websockets.sync.client import connect as ws_connect

from flags.hashing import position
from tests.harness import LOOPBACK, TurnoutInstance, backends, free_port, release_doc, wait_until

pytestmark = pytest.mark.timeout(120)

# A unit the bucketing contract puts on stable at every stage below ga (position >= 50 %).
STABLE_UNIT = next(f"s{i}" for i in range(1000) if position("web", f"s{i}") >= 50_000)


def arm_of(conn: http.client.HTTPConnection, unit: str, path: str = "/x") -> str:
    conn.request("GET", path, headers={"x-user-id": unit})
    resp = conn.getresponse()
    body = resp.read()
    assert resp.status == 200, body
    return str(orjson.loads(body)["backend"])


def arms(port: int, units: list[str]) -> dict[str, str]:
    conn = http.client.HTTPConnection(LOOPBACK, port, timeout=10)
    try:
        return {u: arm_of(conn, u) for u in units}
    finally:
        conn.close()


def admin(inst: TurnoutInstance, method: str, path: str, **kw: Any) -> httpx.Response:
    headers = dict(inst.auth)
    headers.update(kw.pop("headers", {}))
    return httpx.request(method, inst.admin_url + path, headers=headers, timeout=10, **kw)


def raw_request(port: int, data: bytes, timeout: float = 5) -> bytes:
    with socket.create_connection((LOOPBACK, port), timeout=timeout) as s:
        s.sendall(data)
        chunks = []
        try:
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    break
                chunks.append(chunk)
                if b"\r\n\r\n" in b"".join(chunks):
                    s.settimeout(0.5)  # the head is in: the rest follows quickly or not at all
        except TimeoutError:
            pass
        return b"".join(chunks)


@pytest.fixture
def up() -> Any:
    with backends("stable", "canary") as servers:
        yield servers


@pytest.fixture
def inst(up: Any, tmp_path: Path) -> Any:
    """A Turnout instance with decision headers exposed and alice in the internal cohort."""
    seed = release_doc(
        up["stable"].url,
        up["canary"].url,
        internal={"unit_ids": ["alice"], "email_domains": ["corp.example"]},
    )
    instance = TurnoutInstance(tmp_path / "state", seed=seed, expose_decision_headers=True).start()
    yield instance
    instance.stop()


def test_beta_split_is_ten_percent_sticky_monotonic_and_survives_restart(
    up: Any, tmp_path: Path
) -> None:
    """10,000 ids at beta: 10 % ± 1 pt canary, the contract's arm, sticky, monotonic to open, kept across a restart."""
    state = tmp_path / "state"
    instance = TurnoutInstance(state, seed=release_doc(up["stable"].url, up["canary"].url)).start()
    units = [f"user-{i}" for i in range(10_000)]
    try:
        first = arms(instance.edge_port, units)
        share = sum(a == "canary" for a in first.values()) / len(units)
        assert 0.09 <= share <= 0.11, share
        for unit, arm in first.items():
            assert (arm == "canary") == (position("web", unit) < 10_000), unit
        assert arms(instance.edge_port, units[:3000]) == {u: first[u] for u in units[:3000]}
        resp = admin(instance, "POST", "/api/v1/releases/web/stage", json={"stage": "open"})
        assert resp.status_code == 200, resp.text
        at_open = arms(instance.edge_port, units)
        assert all(at_open[u] == "canary" for u in units if first[u] == "canary")
        assert 0.49 <= sum(a == "canary" for a in at_open.values()) / len(units) <= 0.51
    finally:
        instance.stop()
    restarted = TurnoutInstance(state).start()
    try:
        assert arms(restarted.edge_port, units) == at_open
    finally:
        restarted.stop()


def test_rollback_sends_everyone_to_stable_and_restore_brings_the_stage_back(
    inst: TurnoutInstance,
) -> None:
    """Rollback: next request all stable (internal users too), version rises, explain says why; restore brings beta back."""
    units = [f"u{i}" for i in range(2000)] + ["alice"]
    before = arms(inst.edge_port, units)
    assert before["alice"] == "canary"
    assert any(a == "canary" for a in before.values())
    v0 = admin(inst, "GET", "/api/v1/config").json()["version"]
    resp = admin(inst, "POST", "/api/v1/releases/web/rollback", json={"reason": "error rate 7%"})
    assert resp.status_code == 200, resp.text
    assert resp.json()["version"] == v0 + 1
    assert set(arms(inst.edge_port, units).values()) == {"stable"}
    explained = admin(
        inst, "GET", "/api/v1/releases/web/explain", params={"unit_id": "alice"}
    ).json()
    assert explained["arm"] == "stable" and "error rate 7%" in explained["explanation"]
    resp = admin(inst, "POST", f"/api/v1/versions/{v0}/restore")
    assert resp.status_code == 200, resp.text
    assert resp.json()["version"] == v0 + 2
    assert admin(inst, "GET", "/api/v1/releases/web").json()["release"]["stage"] == "beta"
    assert arms(inst.edge_port, units) == before


def test_stale_if_match_is_refused_and_changes_nothing(inst: TurnoutInstance) -> None:
    """A write with a stale If-Match gets 412 and leaves version and stage as they were."""
    v = admin(inst, "GET", "/api/v1/config").json()["version"]
    assert (
        admin(inst, "POST", "/api/v1/releases/web/rollback", json={"reason": "ops"}).status_code
        == 200
    )
    resp = admin(
        inst,
        "POST",
        "/api/v1/releases/web/stage",
        json={"stage": "ga"},
        headers={"if-match": f'"{v}"'},
    )
    assert resp.status_code == 412
    cfg = admin(inst, "GET", "/api/v1/config").json()
    assert cfg["version"] == v + 1
    assert cfg["document"]["releases"]["web"]["stage"] == "off"


def test_invalid_config_is_refused_by_field_and_traffic_keeps_flowing(
    inst: TurnoutInstance,
) -> None:
    """An invalid release (percent 150, ftp upstream) gets 422 naming the field; the old version keeps serving."""
    v = admin(inst, "GET", "/api/v1/config").json()["version"]
    resp = admin(inst, "POST", "/api/v1/releases/web/stage", json={"percent": 150})
    assert resp.status_code == 422 and resp.json()["field"] == "percent"
    bad = {"stable": ["ftp://x"], "canary": ["http://127.0.0.1:1"], "stage": "beta"}
    resp = admin(inst, "PUT", "/api/v1/releases/web", json=bad)
    assert resp.status_code == 422 and resp.json()["field"] == "releases.web.stable.0"
    assert admin(inst, "GET", "/api/v1/config").json()["version"] == v
    assert set(arms(inst.edge_port, [f"u{i}" for i in range(300)]).values()) == {"stable", "canary"}


def test_upstream_sees_computed_forwarding_and_decision_headers_only(inst: TurnoutInstance) -> None:
    """Inbound X-Turnout-*, X-Forwarded-*, hop-by-hop and nominated headers never reach the upstream; ours do."""
    headers = {
        "x-user-id": "alice",
        "x-turnout-arm": "stable",
        "x-turnout-release": "other",
        "x-forwarded-for": "6.6.6.6",
        "x-real-ip": "6.6.6.6",
        "forwarded": "for=6.6.6.6",
        "connection": "keep-alive, x-foo",
        "x-foo": "1",
        "keep-alive": "timeout=1",
        "te": "trailers",
    }
    resp = httpx.get(inst.edge_url + "/p?q=1", headers=headers)
    got = {k: v for k, v in resp.json()["headers"]}
    assert (
        got["x-turnout-arm"] == "canary"
    )  # alice is internal: the real decision, not the client's
    assert got["x-turnout-release"] == "web"
    assert got["x-forwarded-for"] == "127.0.0.1"
    assert got["x-forwarded-proto"] == "http"
    assert "via" not in got  # off by default upstream (issue #12; tests/test_forwarding.py)
    for name in ("x-real-ip", "forwarded", "x-foo", "keep-alive", "te", "connection"):
        assert name not in got, name
    assert resp.json()["query"] == "q=1"


def test_response_hop_by_hop_removed_and_cookies_kept_apart(inst: TurnoutInstance) -> None:
    """Upstream Connection-nominated and Keep-Alive headers are stripped; two Set-Cookie lines stay two."""
    raw = raw_request(
        inst.edge_port, b"GET /r HTTP/1.1\r\nHost: a\r\nX-User-Id: bob\r\nConnection: close\r\n\r\n"
    )
    head = raw.split(b"\r\n\r\n", 1)[0].lower()
    assert head.startswith(b"http/1.1 200")
    assert b"x-secret-hop" not in head and b"keep-alive: timeout" not in head
    assert head.count(b"set-cookie: ") == 2
    assert b"x-turnout-arm: " in head and b"x-turnout-config-version: " in head


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close, X-Forwarded-For\r\n\r\n", b"400"),
        (b"GET / HTTP/1.1\r\nHost: a\r\nConnection: x-user-id\r\n\r\n", b"400"),
        (b"GET /public/%2e%2e/admin HTTP/1.1\r\nHost: a\r\n\r\n", b"400"),
        (b"GET /a%2fb HTTP/1.1\r\nHost: a\r\n\r\n", b"400"),
        (b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", b"400"),
        (b"GET / HTTP/1.1\r\n\r\n", b"400"),
        (b"GET / HTTP/1.1\r\nHost: a b@c/d\r\n\r\n", b"400"),
        (
            b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
            b"501",
        ),
        (
            b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 6\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            b"400",
        ),
        (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 999999999999\r\n\r\n", b"413"),
    ],
)
def test_bad_requests_are_refused_before_any_upstream_request(
    inst: TurnoutInstance, up: Any, request_bytes: bytes, status: bytes
) -> None:
    """Smuggling shapes, protected nominations, encoded traversal and bad Host get 4xx/5xx and reach no upstream."""
    before = up["stable"].app.requests + up["canary"].app.requests
    raw = raw_request(inst.edge_port, request_bytes)
    assert raw.split(b"\r\n", 1)[0].split(b" ")[1] == status, raw[:200]
    assert up["stable"].app.requests + up["canary"].app.requests == before


def test_percent_encoded_unreserved_path_is_canonicalised(inst: TurnoutInstance) -> None:
    """/%61dmin is forwarded as /admin: one canonical path for routing and the backend."""
    resp = httpx.get(inst.edge_url + "/%61dmin/x", headers={"x-user-id": "bob"})
    assert resp.json()["raw_path"] == "/admin/x"


def test_anonymous_user_gets_a_signed_sticky_cookie(inst: TurnoutInstance) -> None:
    """No id: a signed cookie is set; sending it back keeps the arm and sets none; a forged one is replaced."""
    with httpx.Client(base_url=inst.edge_url) as client:
        first = client.get("/x")
        cookie = first.cookies.get("turnout_uid")
        assert cookie and "." in cookie
        arm = first.json()["backend"]
        for _ in range(5):
            again = httpx.get(inst.edge_url + "/x", cookies={"turnout_uid": cookie})
            assert again.json()["backend"] == arm
            assert "turnout_uid" not in again.headers.get("set-cookie", "")
        unit = cookie.rsplit(".", 1)[0]
        forged = httpx.get(
            inst.edge_url + "/x", cookies={"turnout_uid": unit + ".AAAAAAAAAAAAAAAAAAAAAA"}
        )
        assert "turnout_uid=" in forged.headers.get("set-cookie", "")
        assert unit not in forged.headers["set-cookie"]


def test_large_response_streams_before_the_upstream_finishes(
    inst: TurnoutInstance, up: Any
) -> None:
    """The first half of a response reaches the client while the upstream still holds the second half."""
    total = 2 * 1024 * 1024
    with httpx.stream(
        "GET",
        inst.edge_url + f"/gate?bytes={total}",
        headers={"x-user-id": STABLE_UNIT},
        timeout=10,
    ) as r:
        received = 0
        it = r.iter_raw()
        while received < total // 2:
            received += len(next(it))
        assert received == total // 2  # the rest is held back upstream: nothing was buffered whole
        up["stable"].call(up["stable"].app.gate.set)
        for chunk in it:
            received += len(chunk)
    assert received == total


def test_client_disconnect_storm_returns_the_pool_to_idle(up: Any, tmp_path: Path) -> None:
    """200 clients drop a large chunked download mid-way; the upstream pools drain to zero active and the next request works."""
    # A generous connect timeout: the upstreams share this process (and its GIL) with the storm.
    seed = release_doc(up["stable"].url, up["canary"].url)
    instance = TurnoutInstance(tmp_path / "s", seed=seed, upstream_connect_timeout_s=30).start()
    heads: list[bytes] = []

    async def one(i: int) -> None:
        reader, writer = await asyncio.open_connection(LOOPBACK, instance.edge_port)
        try:
            writer.write(
                b"GET /stream?bytes=67108864&chunk=65536 HTTP/1.1\r\nHost: a\r\nX-User-Id: u%d\r\n\r\n"
                % i
            )
            await writer.drain()
            heads.append(await reader.readuntil(b"\r\n\r\n"))
            await reader.readexactly(4096)  # mid-download, then gone without a goodbye
        finally:
            writer.transport.abort()

    async def storm() -> None:
        await asyncio.gather(*(one(i) for i in range(200)))

    try:
        asyncio.run(storm())
        assert len(heads) == 200
        assert all(h.startswith(b"HTTP/1.1 200") for h in heads), {h[:40] for h in heads}
        edge = instance.context["edge"]
        pools = edge.pools.pools.values()
        assert wait_until(lambda: all(p.active_count == 0 for p in pools), 30)
        resp = httpx.get(instance.edge_url + "/after", headers={"x-user-id": "bob"})
        assert resp.status_code == 200 and resp.json()["path"] == "/after"
    finally:
        instance.stop()


def test_websocket_reaches_the_units_arm_and_passes_close_codes(inst: TurnoutInstance) -> None:
    """A WebSocket echo through the edge lands on the unit's arm; messages flow both ways; close code 4001 passes."""
    ws_url = f"ws://{LOOPBACK}:{inst.edge_port}/ws"
    for unit, expected in (("alice", "canary"), (STABLE_UNIT, "stable")):
        with ws_connect(ws_url, additional_headers={"x-user-id": unit}, open_timeout=5) as ws:
            assert ws.recv(timeout=5) == f"hello from {expected} arm={expected}"
            ws.send("ping")
            assert ws.recv(timeout=5) == f"{expected}: ping"
            ws.send(b"\x00\x01")
            assert ws.recv(timeout=5) == b"\x00\x01"
            ws.send("close-4001")
            with pytest.raises(Exception):  # noqa: B017 - websockets raises ConnectionClosed subclasses
                ws.recv(timeout=5)
            assert ws.close_code == 4001


def test_refused_upstream_is_502_and_slow_upstream_is_504(up: Any, tmp_path: Path) -> None:
    """A closed canary port answers 502 naming release and arm; a stalled upstream answers 504 at the read timeout."""
    dead = f"http://{LOOPBACK}:{free_port()}"
    seed = release_doc(up["stable"].url, dead, stage="ga")
    instance = TurnoutInstance(tmp_path / "s", seed=seed, upstream_read_timeout_s=0.3).start()
    try:
        resp = httpx.get(instance.edge_url + "/x", headers={"x-user-id": "bob"})
        assert resp.status_code == 502
        assert "release web" in resp.text and "arm canary" in resp.text
        admin(instance, "POST", "/api/v1/releases/web/stage", json={"stage": "off"})
        resp = httpx.get(instance.edge_url + "/slow?s=2", headers={"x-user-id": "bob"})
        assert resp.status_code == 504 and "arm stable" in resp.text
        resp = httpx.get(instance.edge_url + "/fast", headers={"x-user-id": "bob"})
        assert resp.status_code == 200
    finally:
        instance.stop()


def test_post_bodies_are_forwarded_with_rederived_framing(inst: TurnoutInstance) -> None:
    """Fixed-length and chunked request bodies arrive whole upstream."""
    body = b"z" * 300_000
    resp = httpx.post(inst.edge_url + "/upload", content=body, headers={"x-user-id": "bob"})
    assert resp.json()["body_length"] == len(body)

    def gen() -> Any:
        for _ in range(10):
            yield b"y" * 10_000

    resp = httpx.post(inst.edge_url + "/upload", content=gen(), headers={"x-user-id": "bob"})
    assert resp.json()["body_length"] == 100_000


def test_metrics_count_requests_by_release_arm_and_status(inst: TurnoutInstance) -> None:
    """The admin /metrics counts proxied requests per release, arm and status class."""
    for unit in ("alice", STABLE_UNIT):
        httpx.get(inst.edge_url + "/status/503", headers={"x-user-id": unit})
    text = httpx.get(inst.admin_url + "/metrics").text
    assert 'turnout_requests_total{arm="canary",release="web",status_class="5xx"} 1.0' in text
    assert 'turnout_requests_total{arm="stable",release="web",status_class="5xx"} 1.0' in text
    assert "turnout_config_version 1.0" in text


def test_config_change_applies_on_the_next_request_under_load(inst: TurnoutInstance) -> None:
    """While 4 clients hammer the edge, a rollback is seen by every request issued after the API returned."""
    stop = threading.Event()
    errors: list[str] = []

    def hammer() -> None:
        conn = http.client.HTTPConnection(LOOPBACK, inst.edge_port, timeout=10)
        i = 0
        while not stop.is_set():
            conn.request("GET", "/x", headers={"x-user-id": f"h{i % 500}"})
            resp = conn.getresponse()
            resp.read()
            if resp.status != 200:
                errors.append(str(resp.status))
            i += 1
        conn.close()

    threads = [threading.Thread(target=hammer) for _ in range(4)]
    for t in threads:
        t.start()
    time.sleep(0.3)
    assert (
        admin(inst, "POST", "/api/v1/releases/web/rollback", json={"reason": "r"}).status_code
        == 200
    )
    after = arms(inst.edge_port, [f"h{i}" for i in range(500)])
    stop.set()
    for t in threads:
        t.join(10)
    assert set(after.values()) == {"stable"}
    assert errors == []


def test_pipelined_requests_are_answered_in_order_with_one_write_each(
    inst: TurnoutInstance,
) -> None:
    """Two pipelined requests in one segment get two complete responses, in order (coalesced writes keep framing)."""
    raw = raw_request(
        inst.edge_port,
        b"GET /first HTTP/1.1\r\nHost: a\r\nX-User-Id: bob\r\n\r\n"
        b"GET /second HTTP/1.1\r\nHost: a\r\nX-User-Id: bob\r\nConnection: close\r\n\r\n",
    )
    assert raw.count(b"HTTP/1.1 200 OK") == 2
    assert raw.index(b'"path":"/first"') < raw.index(b'"path":"/second"')


def test_http10_head_and_204_responses_are_framed_correctly(inst: TurnoutInstance) -> None:
    """HTTP/1.0 gets a close-delimited body (never chunked, RFC 9112 §6.1); HEAD and 204 carry no body."""
    raw = raw_request(inst.edge_port, b"GET /old HTTP/1.0\r\nHost: a\r\nX-User-Id: bob\r\n\r\n")
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    assert b"transfer-encoding" not in head.lower()
    assert b"connection: close" in head.lower()
    assert orjson.loads(body)["path"] == "/old"  # the whole body; the close ended it
    raw = raw_request(
        inst.edge_port,
        b"HEAD /fixed?bytes=1234 HTTP/1.1\r\nHost: a\r\nX-User-Id: bob\r\nConnection: close\r\n\r\n",
    )
    assert raw.startswith(b"HTTP/1.1 200") and raw.endswith(b"\r\n\r\n")
    # HEAD states the length a GET gets (RFC 9110 §8.6), never a made-up 0.
    assert b"content-length: 1234\r\n" in raw.lower(), raw
    raw = raw_request(
        inst.edge_port,
        b"GET /status/204 HTTP/1.1\r\nHost: a\r\nX-User-Id: bob\r\nConnection: close\r\n\r\n",
    )
    assert raw.startswith(b"HTTP/1.1 204") and raw.endswith(b"\r\n\r\n")
    assert b"content-length" not in raw.lower()  # never on a 204 (RFC 9110 §8.6)
