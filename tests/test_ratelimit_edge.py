"""Rate limits on the request path (issue #12 point 5) through a real Turnout and real
upstreams: checked in the decide phase, 429 with Retry-After and the RateLimit fields, the
internal cohort exempt, counted in /metrics; with `--workers 2` each worker takes its share
and the supervisor sums the 429s; on Redis the fleet sync runs beside the watcher."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from tests.harness import ThreadedServer, TurnoutInstance, backends, release_doc, wait_until
from tests.redisproc import redis_server
from tests.test_workers import connect_to, get, serving

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def up() -> Iterator[dict[str, ThreadedServer]]:
    with backends("stable", "canary") as servers:
        yield servers


def limited_doc(up: dict[str, ThreadedServer], requests: int) -> dict[str, Any]:
    doc = release_doc(up["stable"].url, up["canary"].url, internal={"unit_ids": ["carol"]})
    doc["rate_limits"] = {"per-user": {"key": "unit", "requests": requests, "per_s": 60}}
    return doc


def metric(text: str, name: str) -> float:
    """The value of one sample line `name` in a Prometheus text page (0 when absent)."""
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    return 0.0


def test_a_unit_over_its_limit_gets_429_with_retry_after_and_ratelimit_fields(
    tmp_path: Path, up: dict[str, ThreadedServer]
) -> None:
    """Two requests per minute for alice pass, the third is 429 with Retry-After and the
    draft's RateLimit-Policy / RateLimit, not sent upstream; bob and the internal carol pass;
    /metrics counts the 429 under the limit's name."""
    inst = TurnoutInstance(tmp_path / "s", seed=limited_doc(up, 2)).start()
    try:
        with httpx.Client(base_url=inst.edge_url, timeout=10) as client:
            for _ in range(2):
                assert client.get("/", headers={"x-user-id": "alice"}).status_code == 200
            refused = client.get("/", headers={"x-user-id": "alice"})
            assert refused.status_code == 429
            assert int(refused.headers["retry-after"]) >= 1
            assert refused.headers["ratelimit-policy"] == '"per-user";q=2;w=60'
            assert refused.headers["ratelimit"].startswith('"per-user";r=0;t=')
            assert "rate limited (per-user)" in refused.text
            assert client.get("/", headers={"x-user-id": "bob"}).status_code == 200
            for _ in range(4):  # the internal cohort is exempt by default
                assert client.get("/", headers={"x-user-id": "carol"}).status_code == 200
        page = httpx.get(f"{inst.admin_url}/metrics", headers=inst.auth, timeout=10).text
        assert metric(page, 'turnout_rate_limited_total{limit="per-user"}') == 1
    finally:
        inst.stop()


def test_each_of_two_workers_takes_half_a_limit_and_the_supervisor_sums_the_429s(
    tmp_path: Path, up: dict[str, ThreadedServer]
) -> None:
    """`--workers 2` on a file store: a limit of 4 per minute is 2 per worker (the fleet admits
    the limit, not twice it), and both workers' 429s reach the supervisor's /metrics."""
    with serving(tmp_path, up, seed=limited_doc(up, 4)) as proc:
        statuses: list[int] = []
        for pid in proc.worker_pids():
            conn = connect_to(proc, pid)
            statuses += [get(conn, x_user_id="alice")[0] for _ in range(3)]
            conn.close()
        assert sorted(statuses) == [200, 200, 200, 200, 429, 429]
        assert wait_until(
            lambda: proc.metric_sum("turnout_rate_limited_total", limit="per-user") == 2, 10
        )


def test_on_redis_the_fleet_sync_runs_beside_the_watcher(
    tmp_path: Path, up: dict[str, ThreadedServer]
) -> None:
    """With the store on Redis the instance joins the rate-limit fleet (its member entry
    appears, and leaves on shutdown), and limits still answer 429."""
    with redis_server(tmp_path) as server:
        client = redis.Redis.from_url(server.url)
        inst = TurnoutInstance(tmp_path / "s", seed=limited_doc(up, 1), store=server.url).start()
        try:
            assert wait_until(lambda: client.zcard("turnout:rl:members") == 1, 10)
            with httpx.Client(base_url=inst.edge_url, timeout=10) as http:
                assert http.get("/", headers={"x-user-id": "alice"}).status_code == 200
                assert http.get("/", headers={"x-user-id": "alice"}).status_code == 429
        finally:
            inst.stop()
        assert client.zcard("turnout:rl:members") == 0
        client.close()


def test_client_limits_key_on_the_address_the_trusted_hops_give(
    tmp_path: Path, up: dict[str, ThreadedServer]
) -> None:
    """Behind one trusted hop, two clients arriving through the same load balancer (one
    socket peer) have a bucket each: the address the hop put in X-Forwarded-For, not the
    peer's. A forged entry left of it does not buy a new bucket."""
    doc = limited_doc(up, 100)
    doc["rate_limits"] = {"per-ip": {"key": "client", "requests": 1, "per_s": 60}}
    inst = TurnoutInstance(tmp_path / "s", seed=doc, trusted_hops=1).start()
    try:
        with httpx.Client(base_url=inst.edge_url, timeout=10) as client:

            def status(xff: str) -> int:
                return client.get("/", headers={"x-forwarded-for": xff}).status_code

            assert status("203.0.113.7") == 200
            assert status("203.0.113.7") == 429
            assert status("198.51.100.9") == 200  # another client behind the same hop
            assert status("6.6.6.6, 203.0.113.7") == 429  # forged left part: same client
    finally:
        inst.stop()


def test_route_limits_count_per_route_entry(tmp_path: Path, up: dict[str, ThreadedServer]) -> None:
    """Two routes to one release: a `route` limit of one request a minute allows one on
    each route, not one for the release."""
    doc = limited_doc(up, 100)
    doc["routes"] = [
        {"host": "*", "path_prefix": "/a", "release": "web"},
        {"host": "*", "path_prefix": "/b", "release": "web"},
    ]
    doc["rate_limits"] = {"per-route": {"key": "route", "requests": 1, "per_s": 60}}
    inst = TurnoutInstance(tmp_path / "s", seed=doc).start()
    try:
        with httpx.Client(base_url=inst.edge_url, timeout=10) as client:
            assert client.get("/a/1", headers={"x-user-id": "u1"}).status_code == 200
            assert client.get("/a/2", headers={"x-user-id": "u2"}).status_code == 429
            assert client.get("/b/1", headers={"x-user-id": "u3"}).status_code == 200
            assert client.get("/b/2", headers={"x-user-id": "u4"}).status_code == 429
    finally:
        inst.stop()
