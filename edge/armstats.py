"""Live per-release, per-arm statistics for the guard (issue #10 point 1).

Rules of this file:
* `record` is on the request path: one dict lookup and two or three integer adds into the
  current one-second cell (requests, errors, a fixed-bucket latency histogram). Nothing is
  allocated there except a release's first series.
* `rotate` runs off the request path (the guard runner, once a second): the current cell
  joins a ring of the last `RING_S` seconds and a fresh one takes its place (one attribute
  swap between two requests: the edge runs on one event loop).
* A request is counted from the response the client got: a 502/503/504 that Turnout made
  for a dead or slow canary is a canary error (`status >= 500`), and its latency is the time
  the client waited for it; a body cut off mid-stream is an error of its one request
  (`failed`). The pipeline records each exchange once, in its `logging` phase.
* With `workers: N` (turnout/workers.py) each worker process records here and never rotates:
  `take()` hands the counts since the last take to the worker's metrics push, and the
  supervisor's runner adds them into its own `ArmStats` with `merge()`, so one guard judges
  the whole instance's traffic.
"""

from __future__ import annotations

from bisect import bisect_left
from collections import deque
from typing import Any

from flags.evaluate import ARM_CANARY, ARM_STABLE
from flags.guard import EMPTY, HORIZONS_S, LATENCY_BOUNDS_MS, N_BUCKETS, ArmCounts

RING_S = max(HORIZONS_S)


class Cell:
    """One second of one arm."""

    __slots__ = ("requests", "errors", "histogram")

    def __init__(self) -> None:
        self.requests = 0
        self.errors = 0
        self.histogram = [0] * N_BUCKETS

    def counts(self) -> ArmCounts:
        return ArmCounts(self.requests, self.errors, tuple(self.histogram))


class Series:
    """The current cell, the last `RING_S` complete seconds of one (release, arm), and running
    sums per horizon, kept up to date at each rotation (add the new second, subtract the one
    that left the horizon), so reading every horizon costs no walk over the ring."""

    __slots__ = ("current", "ring", "sums")

    def __init__(self) -> None:
        self.current = Cell()
        self.ring: deque[Cell] = deque(maxlen=RING_S + 1)  # +1: the cell leaving the longest
        self.sums: dict[int, Cell] = {h: Cell() for h in HORIZONS_S}

    def rotate(self) -> None:
        cell = self.current
        self.current = Cell()
        ring = self.ring
        ring.append(cell)
        for h, total in self.sums.items():
            total.requests += cell.requests
            total.errors += cell.errors
            hist = total.histogram
            if cell.requests:
                for b, n in enumerate(cell.histogram):
                    if n:
                        hist[b] += n
            if len(ring) > h:
                old = ring[-h - 1]
                total.requests -= old.requests
                total.errors -= old.errors
                if old.requests:
                    for b, n in enumerate(old.histogram):
                        if n:
                            hist[b] -= n

    def spans(self) -> dict[int, ArmCounts]:
        """Sums of the last h complete seconds, for every horizon h."""
        return {h: total.counts() for h, total in self.sums.items()}

    def last(self, seconds: int) -> ArmCounts:
        """Sums of the last `seconds` complete seconds (a walk: for tests and the phase)."""
        requests = errors = 0
        histogram = [0] * N_BUCKETS
        ring = self.ring
        for i in range(max(0, len(ring) - seconds), len(ring)):
            cell = ring[i]
            requests += cell.requests
            errors += cell.errors
            for b, n in enumerate(cell.histogram):
                if n:
                    histogram[b] += n
        return ArmCounts(requests, errors, tuple(histogram))


class ArmStats:
    """Every release's two series; written by the pipeline, read by the guard runner."""

    def __init__(self) -> None:
        self.series: dict[tuple[str, str], Series] = {}
        self.rotations = 0

    def record(
        self,
        release: str,
        arm: str,
        status: int,
        elapsed_s: float | None,
        failed: bool = False,
    ) -> None:
        series = self.series.get((release, arm))
        if series is None:
            series = self.series[(release, arm)] = Series()
        cell = series.current
        cell.requests += 1
        if failed or status >= 500:
            cell.errors += 1
        if elapsed_s is not None:
            cell.histogram[bisect_left(LATENCY_BOUNDS_MS, elapsed_s * 1000.0)] += 1

    def take(self) -> list[list[Any]]:
        """The current cells' counts as JSON-able rows [release, arm, requests, errors,
        histogram], each cell emptied (a worker's share since its last push)."""
        rows: list[list[Any]] = []
        for (release, arm), series in self.series.items():
            cell = series.current
            if cell.requests or cell.errors:
                rows.append([release, arm, cell.requests, cell.errors, cell.histogram])
                series.current = Cell()
        return rows

    def merge(self, rows: list[list[Any]]) -> None:
        """Add a worker's `take()` into the current cells; a malformed row is skipped."""
        for row in rows:
            try:
                release, arm, requests, errors, histogram = row
                counts = [int(n) for n in histogram]
                if len(counts) != N_BUCKETS or not isinstance(release, str):
                    continue
                key = (release, str(arm))
                added = int(requests), int(errors)
            except (TypeError, ValueError):
                continue
            series = self.series.get(key)
            if series is None:
                series = self.series[key] = Series()
            cell = series.current
            cell.requests += added[0]
            cell.errors += added[1]
            hist = cell.histogram
            for b, n in enumerate(counts):
                hist[b] += n

    def rotate(self) -> None:
        for series in self.series.values():
            series.rotate()
        self.rotations += 1

    def releases(self) -> set[str]:
        return {release for release, _ in self.series}

    def horizons(self, release: str) -> dict[int, tuple[ArmCounts, ArmCounts]]:
        """{horizon_s: (canary, stable)} over the complete seconds."""
        canary = self.series.get((release, ARM_CANARY))
        stable = self.series.get((release, ARM_STABLE))
        c = canary.spans() if canary is not None else {}
        s = stable.spans() if stable is not None else {}
        return {h: (c.get(h, EMPTY), s.get(h, EMPTY)) for h in HORIZONS_S}

    def reset(self, release: str) -> None:
        """Forget a release's history (its canary changed: old evidence is not about it)."""
        for arm in (ARM_CANARY, ARM_STABLE):
            self.series.pop((release, arm), None)
