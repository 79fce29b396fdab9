"""Passive outlier detection on the request path (issue #12) through a real Turnout and real
upstreams: fed from the `logging` phase, consulted by `upstream_peer`, never ejecting an
arm's last upstream, with the upstreams' state in /metrics."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.harness import (
    LOOPBACK,
    EchoApp,
    ThreadedServer,
    TurnoutInstance,
    free_port,
)

pytestmark = pytest.mark.timeout(120)


class FailingApp:
    """An upstream that answers every request with 500."""

    def __init__(self) -> None:
        self.hits = 0

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        self.hits += 1
        await send(
            {
                "type": "http.response.start",
                "status": 500,
                "headers": [(b"content-length", b"4")],
            }
        )
        await send({"type": "http.response.body", "body": b"oops"})


@pytest.fixture
def servers() -> Iterator[dict[str, ThreadedServer]]:
    made = {
        "good": ThreadedServer(EchoApp("good"), http="httptools").start(),
        "bad": ThreadedServer(FailingApp(), http="httptools").start(),
        "canary": ThreadedServer(FailingApp(), http="httptools").start(),
    }
    try:
        yield made
    finally:
        for server in made.values():
            server.stop()


def metric(text: str, line_start: str) -> float | None:
    for line in text.splitlines():
        if line.startswith(line_start + " "):
            return float(line.split()[-1])
    return None


def test_a_failing_upstream_is_ejected_and_the_last_one_of_an_arm_never(
    tmp_path: Path, servers: dict[str, ThreadedServer]
) -> None:
    """Stable has a good and a 500-only upstream: after its fifth 500 in a row the bad one is
    ejected and stable answers only 200; the canary's only upstream fails every time and
    still takes the canary's requests; /metrics shows the ejection and both states."""
    bad = servers["bad"].url
    canary = servers["canary"].url
    doc = {
        "releases": {
            "web": {
                "stable": [servers["good"].url, bad],
                "canary": [canary],
                "stage": "internal",
                "internal": {"unit_ids": ["tester"]},
            }
        },
        "routes": [{"host": "*", "path_prefix": "/", "release": "web"}],
    }
    inst = TurnoutInstance(tmp_path / "s", seed=doc).start()
    try:
        with httpx.Client(base_url=inst.edge_url, timeout=10) as client:
            statuses = [client.get("/", headers={"x-user-id": "u"}).status_code for _ in range(10)]
            assert statuses.count(500) == 5  # round-robin: every other one, then ejected
            after = [client.get("/", headers={"x-user-id": "u"}).status_code for _ in range(20)]
            assert after == [200] * 20
            for _ in range(8):  # the canary's last upstream is never ejected
                assert client.get("/", headers={"x-user-id": "tester"}).status_code == 500
        page = httpx.get(f"{inst.admin_url}/metrics", headers=inst.auth, timeout=10).text
        assert (
            metric(page, f'turnout_upstream_ejections_total{{arm="stable",upstream="{bad}"}}') == 1
        )
        assert metric(page, f'turnout_upstream_ejected{{arm="stable",upstream="{bad}"}}') == 1
        assert metric(page, f'turnout_upstream_ejected{{arm="canary",upstream="{canary}"}}') == 0
    finally:
        inst.stop()


def test_an_unreachable_upstream_is_ejected_after_failed_connects(
    tmp_path: Path, servers: dict[str, ThreadedServer]
) -> None:
    """A refused connect moves on to the arm's next upstream (answered 200) and counts against
    the refusing one, which is ejected after five in a row."""
    dead = f"http://{LOOPBACK}:{free_port()}"
    doc = {
        "releases": {
            "web": {
                "stable": [servers["good"].url, dead],
                "canary": [servers["good"].url],
                "stage": "off",
            }
        },
        "routes": [{"host": "*", "path_prefix": "/", "release": "web"}],
    }
    inst = TurnoutInstance(tmp_path / "s", seed=doc).start()
    try:
        with httpx.Client(base_url=inst.edge_url, timeout=10) as client:
            for _ in range(12):
                assert client.get("/", headers={"x-user-id": "u"}).status_code == 200
        page = httpx.get(f"{inst.admin_url}/metrics", headers=inst.auth, timeout=10).text
        assert metric(page, f'turnout_upstream_ejected{{arm="stable",upstream="{dead}"}}') == 1
    finally:
        inst.stop()


def test_ejections_are_summed_over_workers_and_ejected_states_kept_per_worker() -> None:
    """With `--workers N` each worker has its own detector: the supervisor's /metrics sums the
    ejection counters and shows each worker's ejected gauge with a `worker` label."""
    from prometheus_client import CollectorRegistry

    from edge.metrics import EdgeMetrics
    from edge.metricsnapshot import WatcherView, WorkerSetCollector, WorkerSetState, take_snapshot

    watcher = WatcherView(
        {
            "version": 1,
            "age_seconds": 0.0,
            "connected": True,
            "stale": False,
            "pending_override": False,
            "failover_reloads": 0,
            "rejected": {},
        }
    )
    up = "http://127.0.0.1:9"

    def snapshot(ejections: int, ejected: int) -> dict[str, Any]:
        metrics = EdgeMetrics()
        metrics.outlier_ejections[("stable", up)] = ejections
        metrics.upstream_ejected = lambda: {("stable", up): ejected}
        metrics.rate_limited["per-user"] = ejections
        return take_snapshot(metrics, watcher)

    state = WorkerSetState(workers=2, live={1: snapshot(2, 1), 2: snapshot(1, 0)})
    registry = CollectorRegistry()
    registry.register(WorkerSetCollector(state))
    value = registry.get_sample_value
    assert value("turnout_upstream_ejections_total", {"arm": "stable", "upstream": up}) == 3
    assert value("turnout_rate_limited_total", {"limit": "per-user"}) == 3
    labels = {"arm": "stable", "upstream": up}
    assert value("turnout_upstream_ejected", {**labels, "worker": "1"}) == 1
    assert value("turnout_upstream_ejected", {**labels, "worker": "2"}) == 0
