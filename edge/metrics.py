"""Per-arm request metrics, kept as plain integers on the request path.

prometheus-client's `Counter.labels().inc()` takes a lock and costs microseconds; the request
path instead bumps ints in dicts, and a custom collector turns them into metric families when
Prometheus scrapes (the same trick as Envoy's stats: cheap writes, work at read time).
"""

from __future__ import annotations

import bisect
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
)
from prometheus_client.registry import Collector

from edge.armstats import ArmStats

if TYPE_CHECKING:
    from flags.evaluate import Snapshot
    from flags.flageval import FlagSet
    from flags.store import Revision
    from stores.watch import ConfigWatcher

LATENCY_BUCKETS_S = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)
LAG_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
STATUS_CLASSES = ("1xx", "2xx", "3xx", "4xx", "5xx")


class Histogram:
    """A fixed-bucket histogram of floats, lock-free (one event loop)."""

    __slots__ = ("bounds", "counts", "total", "n")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.total = 0.0
        self.n = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.total += value
        self.n += 1

    def buckets(self) -> list[tuple[str, float]]:
        out: list[tuple[str, float]] = []
        running = 0
        for bound, count in zip(self.bounds, self.counts, strict=False):
            running += count
            out.append((repr(bound), running))
        out.append(("+Inf", self.n))
        return out


UPSTREAM_EJECTED = "turnout_upstream_ejected"


class EdgeMetrics:
    """Counters the data plane writes and the admin listener exposes."""

    def __init__(self) -> None:
        # (release, arm, status class index) -> count
        self.requests: dict[tuple[str, str, int], int] = {}
        self.upstream_latency: dict[str, Histogram] = {
            "stable": Histogram(LATENCY_BUCKETS_S),
            "canary": Histogram(LATENCY_BUCKETS_S),
        }
        self.upstream_errors: dict[tuple[str, str, str], int] = {}
        # rate limit name -> requests refused with 429 (issue #12)
        self.rate_limited: dict[str, int] = {}
        self.websockets: dict[tuple[str, str], int] = {}
        # (flag, variant) -> evaluations served over OFREP (edge/ofrep.py counts, issue #11).
        self.exposures: dict[tuple[str, str], int] = {}
        # (arm, upstream) -> ejections by passive outlier detection (edge/outlier.py, #12)
        self.outlier_ejections: dict[tuple[str, str], int] = {}
        # (arm, upstream) -> 1 while ejected, 0 else; read at scrape time (edge/pipeline.py)
        self.upstream_ejected: Callable[[], dict[tuple[str, str], int]] = dict
        # Open WebSocket tunnels by (release, arm), read at scrape time (edge/tunnel.py).
        self.open_tunnels: Callable[[], dict[tuple[str, str], int]] = dict
        # Client connections open now (read at scrape time) and those refused at the
        # `max_client_connections` cap (edge/frontend.py).
        self.client_connections: Callable[[], int] = int
        self.connections_refused = 0
        self.apply_lag = Histogram(LAG_BUCKETS_S)
        self.arms = ArmStats()  # the guard's rolling windows (edge/armstats.py)
        # (release, criterion) -> automatic rollbacks by the guard (issue #10)
        self.guard_rollbacks: dict[tuple[str, str], int] = {}
        self.guard_verdicts: dict[str, str] = {}  # release -> last verdict
        # (release, criterion) -> (canary value, threshold): the numbers behind the verdict
        self.guard_criteria: dict[tuple[str, str], tuple[float, float]] = {}
        self.plan_advances: dict[str, int] = {}

    def count(self, release: str, arm: str, status: int) -> None:
        key = (release, arm, status // 100)
        requests = self.requests
        requests[key] = requests.get(key, 0) + 1

    def error(self, release: str, arm: str, kind: str) -> None:
        key = (release, arm, kind)
        self.upstream_errors[key] = self.upstream_errors.get(key, 0) + 1

    def on_config_applied(self, snapshot: Snapshot, revision: Revision | None) -> None:
        if revision is not None:
            self.apply_lag.observe(max(0.0, time.time() - revision.info.created_at))


def exposure_family(
    exposures: dict[tuple[str, str], int], flags: FlagSet | None
) -> CounterMetricFamily:
    """`turnout_flag_exposures_total{flag, variant}` (A/B readouts, issue #11): only the
    declared flags and variants of `flags`, so cardinality is the document's, not the
    clients'. One process's counts, or the sum over the workers (edge/metricsnapshot.py)."""
    family = CounterMetricFamily(
        "turnout_flag_exposures",
        "Flag evaluations served over OFREP, by flag and variant",
        labels=["flag", "variant"],
    )
    for (flag, variant), count in sorted(exposures.items()):
        compiled = flags.flags.get(flag) if flags is not None else None
        if compiled is not None and variant in compiled.flag.variants:
            family.add_metric([flag, variant], count)
    return family


class TurnoutCollector(Collector):
    """Exports `EdgeMetrics` and the config watcher's state."""

    def __init__(self, metrics: EdgeMetrics, watcher: ConfigWatcher, *, guard: bool = True) -> None:
        self.metrics = metrics
        self.watcher = watcher
        self.guard = guard  # False where the guard's families come from elsewhere (workers)

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily | HistogramMetricFamily]:
        m, w = self.metrics, self.watcher
        requests = CounterMetricFamily(
            "turnout_requests",
            "Proxied requests by release, arm and status class",
            labels=["release", "arm", "status_class"],
        )
        for (release, arm, cls), value in sorted(m.requests.items()):
            label = STATUS_CLASSES[cls - 1] if 1 <= cls <= 5 else "other"
            requests.add_metric([release, arm, label], value)
        yield requests
        errors = CounterMetricFamily(
            "turnout_upstream_errors",
            "Upstream failures by release, arm and kind",
            labels=["release", "arm", "kind"],
        )
        for (release, arm, kind), value in sorted(m.upstream_errors.items()):
            errors.add_metric([release, arm, kind], value)
        yield errors
        limited = CounterMetricFamily(
            "turnout_rate_limited",
            "Requests refused with 429 by a rate limit of the document (issue #12)",
            labels=["limit"],
        )
        for name, value in sorted(m.rate_limited.items()):
            limited.add_metric([name], value)
        yield limited
        latency = HistogramMetricFamily(
            "turnout_upstream_latency_seconds",
            "Time to the upstream response head, by arm",
            labels=["arm"],
        )
        for arm, hist in m.upstream_latency.items():
            latency.add_metric([arm], hist.buckets(), hist.total)
        yield latency
        ws = CounterMetricFamily(
            "turnout_websocket_sessions",
            "WebSocket sessions by release and arm",
            labels=["release", "arm"],
        )
        for (release, arm), value in sorted(m.websockets.items()):
            ws.add_metric([release, arm], value)
        yield ws
        tunnels = GaugeMetricFamily(
            "turnout_websocket_tunnels_open",
            "Open WebSocket tunnels by release and arm",
            labels=["release", "arm"],
        )
        for (release, arm), value in sorted(m.open_tunnels().items()):
            tunnels.add_metric([release, arm], value)
        yield tunnels
        ejections = CounterMetricFamily(
            "turnout_upstream_ejections",
            "Upstreams ejected by passive outlier detection, by arm and upstream",
            labels=["arm", "upstream"],
        )
        for (arm, upstream), value in sorted(m.outlier_ejections.items()):
            ejections.add_metric([arm, upstream], value)
        yield ejections
        ejected = GaugeMetricFamily(
            UPSTREAM_EJECTED,
            "1 while an upstream is ejected by outlier detection, by arm and upstream",
            labels=["arm", "upstream"],
        )
        for (arm, upstream), value in sorted(m.upstream_ejected().items()):
            ejected.add_metric([arm, upstream], value)
        yield ejected
        if self.guard:
            yield from guard_families(m)
        yield GaugeMetricFamily(
            "turnout_client_connections",
            "Client connections open on the edge listener",
            value=m.client_connections(),
        )
        yield CounterMetricFamily(
            "turnout_client_connections_refused",
            "Client connections answered 503 at the max_client_connections cap",
            value=m.connections_refused,
        )
        yield GaugeMetricFamily(
            "turnout_config_version", "Applied configuration version", value=w.version
        )
        yield GaugeMetricFamily(
            "turnout_config_age_seconds",
            "Seconds since the store last confirmed the applied version",
            value=w.age_seconds(),
        )
        yield GaugeMetricFamily(
            "turnout_store_connected",
            "1 when the configuration store is reachable",
            value=1 if w.connected else 0,
        )
        yield GaugeMetricFamily(
            "turnout_config_stale",
            "1 when serving a configuration the store has not confirmed",
            value=1 if w.stale else 0,
        )
        yield GaugeMetricFamily(
            "turnout_local_override_pending",
            "1 while a local override (made with the store down) waits to be committed",
            value=1 if w.pending_override else 0,
        )
        yield CounterMetricFamily(
            "turnout_store_failover_reloads",
            "Times a store failover lost versions and the new master's version was adopted",
            value=w.failover_reloads,
        )
        rejected = CounterMetricFamily(
            "turnout_config_rejected",
            "Configuration versions rejected, by reason",
            labels=["reason"],
        )
        for reason, value in sorted(w.rejected.items()):
            rejected.add_metric([reason], value)
        yield rejected
        lag = HistogramMetricFamily(
            "turnout_config_apply_lag_seconds",
            "Time from a version's commit to its application here",
        )
        lag.add_metric([], m.apply_lag.buckets(), m.apply_lag.total)
        yield lag


def guard_families(m: EdgeMetrics) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
    """The guard runner's and the phase plans' families (issue #10), from the `EdgeMetrics`
    the runner writes: the edge's own in one process, the supervisor's with workers."""
    rollbacks = CounterMetricFamily(
        "turnout_guard_rollbacks",
        "Automatic rollbacks by the guard, by release and criterion",
        labels=["release", "criterion"],
    )
    for (release, criterion), value in sorted(m.guard_rollbacks.items()):
        rollbacks.add_metric([release, criterion], value)
    yield rollbacks
    verdict = GaugeMetricFamily(
        "turnout_guard_verdict",
        "The guard's last verdict per release (1 for the verdict it is in)",
        labels=["release", "verdict"],
    )
    for release, status in sorted(m.guard_verdicts.items()):
        for name in ("pass", "breach", "insufficient"):
            verdict.add_metric([release, name], 1 if status == name else 0)
    yield verdict
    criteria = GaugeMetricFamily(
        "turnout_guard_criterion",
        "Each guard criterion's current canary value and its threshold (rates as "
        "fractions, latencies in ms, p99_ratio as a factor)",
        labels=["release", "criterion", "kind"],
    )
    for (release, criterion), (current, limit) in sorted(m.guard_criteria.items()):
        criteria.add_metric([release, criterion, "value"], current)
        criteria.add_metric([release, criterion, "threshold"], limit)
    yield criteria
    advances = CounterMetricFamily(
        "turnout_plan_advances",
        "Phase plan advances by release",
        labels=["release"],
    )
    for release, value in sorted(m.plan_advances.items()):
        advances.add_metric([release], value)
    yield advances
