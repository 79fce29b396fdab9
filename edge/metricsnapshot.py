"""A worker's metrics as a plain, JSON-able snapshot, and the sum of many snapshots.

With `workers: N` each edge process keeps its own `EdgeMetrics` (plain ints, no lock, no
syscall on the request path) and sends `take_snapshot()` to the supervisor off the request
path; the supervisor rebuilds the instance's view with `add_snapshot()` when Prometheus
scrapes. Counters and histograms add up (the flag exposures OFREP counted too, exported
only for flags the supervisor's applied version declares); gauges (the watcher's state) stay
per worker, except
the open WebSocket tunnels, which are the instance's sum over its live workers. The guard's
per-arm windows travel beside the snapshot (edge/armstats.py `take`/`merge`) to the one guard
runner in the supervisor, whose own families (`edge.metrics.guard_families`) join the scrape.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, cast

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from edge.metrics import (
    UPSTREAM_EJECTED,
    EdgeMetrics,
    Histogram,
    TurnoutCollector,
    exposure_family,
    guard_families,
)

if TYPE_CHECKING:
    from flags.flageval import FlagSet
    from stores.watch import ConfigWatcher

Snapshot = dict[str, Any]
TUNNELS_OPEN = "turnout_websocket_tunnels_open"


class WatcherState(Protocol):
    """What a snapshot reads from a watcher (`stores.watch.ConfigWatcher` or `WatcherView`)."""

    @property
    def version(self) -> int: ...
    @property
    def connected(self) -> bool: ...
    @property
    def stale(self) -> bool: ...
    @property
    def pending_override(self) -> bool: ...
    @property
    def failover_reloads(self) -> int: ...
    @property
    def rejected(self) -> Any: ...

    def age_seconds(self) -> float: ...


def take_snapshot(metrics: EdgeMetrics, watcher: WatcherState) -> Snapshot:
    """Everything `TurnoutCollector` exports for one process, as lists, dicts and numbers."""
    return {
        "requests": [[*key, n] for key, n in metrics.requests.items()],
        "upstream_errors": [[*key, n] for key, n in metrics.upstream_errors.items()],
        "websockets": [[*key, n] for key, n in metrics.websockets.items()],
        "exposures": [[*key, n] for key, n in metrics.exposures.items()],
        "rate_limited": [[name, n] for name, n in metrics.rate_limited.items()],
        "outlier_ejections": [[*key, n] for key, n in metrics.outlier_ejections.items()],
        "upstream_ejected": [[*key, n] for key, n in metrics.upstream_ejected().items()],
        "tunnels_open": [[*key, n] for key, n in metrics.open_tunnels().items()],
        "client_connections": metrics.client_connections(),
        "connections_refused": metrics.connections_refused,
        "upstream_latency": {
            arm: [hist.counts, hist.total, hist.n] for arm, hist in metrics.upstream_latency.items()
        },
        "apply_lag": [metrics.apply_lag.counts, metrics.apply_lag.total, metrics.apply_lag.n],
        "watcher": {
            "version": watcher.version,
            "age_seconds": watcher.age_seconds(),
            "taken_at": time.time(),  # the reader ages `age_seconds` by the time since
            "connected": bool(watcher.connected),
            "stale": bool(watcher.stale),
            "pending_override": bool(watcher.pending_override),
            "failover_reloads": watcher.failover_reloads,
            "rejected": dict(watcher.rejected),
        },
    }


def _add_histogram(target: Histogram, data: list[Any]) -> None:
    counts, total, n = data
    if len(counts) != len(target.counts):
        raise ValueError("histogram buckets differ between processes")
    for i, count in enumerate(counts):
        target.counts[i] += int(count)
    target.total += float(total)
    target.n += int(n)


def add_snapshot(target: EdgeMetrics, snapshot: Snapshot) -> None:
    """Add a snapshot's counters and histograms into `target` (gauges are not summed)."""
    for *key, n in snapshot["requests"]:
        k = (str(key[0]), str(key[1]), int(key[2]))
        target.requests[k] = target.requests.get(k, 0) + int(n)
    for *key, n in snapshot["upstream_errors"]:
        e = (str(key[0]), str(key[1]), str(key[2]))
        target.upstream_errors[e] = target.upstream_errors.get(e, 0) + int(n)
    for *key, n in snapshot["websockets"]:
        w = (str(key[0]), str(key[1]))
        target.websockets[w] = target.websockets.get(w, 0) + int(n)
    for *key, n in snapshot.get("exposures", ()):  # .get: a worker from before issue #11
        x = (str(key[0]), str(key[1]))
        target.exposures[x] = target.exposures.get(x, 0) + int(n)
    for name, n in snapshot.get("rate_limited", ()):  # absent from an older worker's
        target.rate_limited[str(name)] = target.rate_limited.get(str(name), 0) + int(n)
    target.connections_refused += int(snapshot.get("connections_refused", 0))
    open_now = int(snapshot.get("client_connections", 0))  # a gauge: per worker, not summed
    target.client_connections = lambda: open_now
    for arm, upstream, n in snapshot.get("outlier_ejections", ()):
        o = (str(arm), str(upstream))
        target.outlier_ejections[o] = target.outlier_ejections.get(o, 0) + int(n)
    for arm, data in snapshot["upstream_latency"].items():
        if arm not in target.upstream_latency:
            target.upstream_latency[arm] = Histogram(
                next(iter(target.upstream_latency.values())).bounds
            )
        _add_histogram(target.upstream_latency[arm], data)
    _add_histogram(target.apply_lag, snapshot["apply_lag"])


def request_total(snapshot: Snapshot) -> int:
    """All requests a snapshot counted, whatever their release, arm or status."""
    return sum(int(row[-1]) for row in snapshot["requests"])


class WatcherView:
    """A worker's watcher state as read from its snapshot, shaped like `ConfigWatcher` for
    `TurnoutCollector`."""

    def __init__(self, state: dict[str, Any]) -> None:
        self.version = int(state["version"])
        self._age = float(state["age_seconds"])
        self._taken_at = float(state.get("taken_at", 0.0))
        self.connected = bool(state["connected"])
        self.stale = bool(state["stale"])
        self.pending_override = bool(state["pending_override"])
        self.failover_reloads = int(state["failover_reloads"])
        self.rejected: dict[str, int] = {str(k): int(v) for k, v in state["rejected"].items()}

    def age_seconds(self) -> float:
        """The age as the worker saw it, plus the time since it said so (a snapshot may be up
        to a push interval old when scraped)."""
        if not self._taken_at:
            return self._age
        return self._age + max(0.0, time.time() - self._taken_at)


def as_watcher(snapshot: Snapshot) -> ConfigWatcher:
    # TurnoutCollector reads only the attributes WatcherView carries (duck typing).
    return cast("ConfigWatcher", WatcherView(snapshot["watcher"]))


def fold(total: Snapshot | None, last: Snapshot) -> Snapshot:
    """`total` plus the counters of `last`: how a dead worker's counts are kept, so the
    instance's counters never go backwards when a worker is restarted from zero."""
    metrics = EdgeMetrics()
    view = WatcherView(last["watcher"])
    if total is not None:
        add_snapshot(metrics, total)
        previous = WatcherView(total["watcher"])
        view.failover_reloads += previous.failover_reloads
        for reason, n in previous.rejected.items():
            view.rejected[reason] = view.rejected.get(reason, 0) + n
    add_snapshot(metrics, last)
    return take_snapshot(metrics, view)


@dataclass
class WorkerSetState:
    """What the supervisor knows about its workers, read by `WorkerSetCollector`."""

    workers: int
    live: dict[int, Snapshot] = field(default_factory=dict)  # worker number -> last snapshot
    guard: EdgeMetrics | None = None  # the supervisor's guard runner writes here (issue #10)
    retired: Snapshot | None = None  # the counters of every worker process that has exited
    restarts: dict[int, int] = field(default_factory=dict)  # worker number -> restarts


class WorkerSetCollector(Collector):
    """The whole instance: counters and histograms summed over every worker (and the workers
    that exited), the watcher's gauges per worker with a `worker` label. With `flags` (the
    supervisor's applied flags), the summed flag exposures too, limited to declared flags."""

    def __init__(
        self, state: WorkerSetState, flags: Callable[[], FlagSet | None] | None = None
    ) -> None:
        self.state = state
        self.flags = flags

    def collect(self) -> Iterator[Metric]:
        state = self.state
        live = dict(state.live)
        total = state.retired
        for snapshot in live.values():
            total = fold(total, snapshot)
        gauges: dict[str, GaugeMetricFamily] = {}
        merged = EdgeMetrics()
        if total is not None:
            add_snapshot(merged, total)
            for family in TurnoutCollector(merged, as_watcher(total), guard=False).collect():
                if family.type != "gauge":
                    yield family
        if self.flags is not None:
            yield exposure_family(merged.exposures, self.flags())
        tunnels: dict[tuple[str, str], int] = {}
        for worker, snapshot in sorted(live.items()):
            for release, arm, n in snapshot.get("tunnels_open", []):
                key = (str(release), str(arm))
                tunnels[key] = tunnels.get(key, 0) + int(n)
            metrics = EdgeMetrics()
            add_snapshot(metrics, snapshot)
            for family in TurnoutCollector(metrics, as_watcher(snapshot), guard=False).collect():
                if family.type != "gauge" or family.name in (TUNNELS_OPEN, UPSTREAM_EJECTED):
                    continue
                labelled = gauges.get(family.name)
                if labelled is None:
                    labelled = GaugeMetricFamily(
                        family.name, family.documentation, labels=["worker"]
                    )
                    gauges[family.name] = labelled
                for sample in family.samples:
                    labelled.add_metric([str(worker)], sample.value)
        yield from gauges.values()
        open_tunnels = GaugeMetricFamily(
            TUNNELS_OPEN,
            "Open WebSocket tunnels by release and arm (all workers)",
            labels=["release", "arm"],
        )
        for (release, arm), n in sorted(tunnels.items()):
            open_tunnels.add_metric([release, arm], n)
        yield open_tunnels
        # Each worker has its own outlier detector (edge/outlier.py): its view, per worker.
        ejected = GaugeMetricFamily(
            UPSTREAM_EJECTED,
            "1 while an upstream is ejected by a worker's outlier detection",
            labels=["arm", "upstream", "worker"],
        )
        for worker, snapshot in sorted(live.items()):
            for arm, upstream, n in snapshot.get("upstream_ejected", []):
                ejected.add_metric([str(arm), str(upstream), str(worker)], int(n))
        yield ejected
        if state.guard is not None:
            yield from guard_families(state.guard)
        yield GaugeMetricFamily(
            "turnout_workers", "Edge worker processes configured", value=state.workers
        )
        up = GaugeMetricFamily(
            "turnout_worker_up", "1 while the worker process runs and reports", labels=["worker"]
        )
        served = CounterMetricFamily(
            "turnout_worker_requests",
            "Requests answered by each worker process since it started",
            labels=["worker"],
        )
        for worker in range(1, state.workers + 1):
            up.add_metric([str(worker)], 1 if worker in live else 0)
            if worker in live:
                served.add_metric([str(worker)], request_total(live[worker]))
        yield up
        yield served
        restarts = CounterMetricFamily(
            "turnout_worker_restarts",
            "Times a worker process died and was started again",
            labels=["worker"],
        )
        for worker in range(1, state.workers + 1):
            restarts.add_metric([str(worker)], state.restarts.get(worker, 0))
        yield restarts
