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
  the client waited for it.
"""

from __future__ import annotations

from collections import deque

from flags.evaluate import ARM_CANARY, ARM_STABLE
from flags.guard import HORIZONS_S, N_BUCKETS, ArmCounts, latency_bucket

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
    """The current cell and the last `RING_S` complete seconds of one (release, arm)."""

    __slots__ = ("current", "ring")

    def __init__(self) -> None:
        self.current = Cell()
        self.ring: deque[Cell] = deque(maxlen=RING_S)

    def rotate(self) -> None:
        self.ring.append(self.current)
        self.current = Cell()

    def last(self, seconds: int) -> ArmCounts:
        """Sums of the last `seconds` complete seconds."""
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

    def record(self, release: str, arm: str, status: int, elapsed_s: float | None) -> None:
        series = self.series.get((release, arm))
        if series is None:
            series = self.series[(release, arm)] = Series()
        cell = series.current
        cell.requests += 1
        if status >= 500:
            cell.errors += 1
        if elapsed_s is not None:
            cell.histogram[latency_bucket(elapsed_s)] += 1

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
        out: dict[int, tuple[ArmCounts, ArmCounts]] = {}
        for h in HORIZONS_S:
            out[h] = (
                canary.last(h) if canary is not None else ArmCounts(),
                stable.last(h) if stable is not None else ArmCounts(),
            )
        return out

    def reset(self, release: str) -> None:
        """Forget a release's history (its canary changed: old evidence is not about it)."""
        for arm in (ARM_CANARY, ARM_STABLE):
            self.series.pop((release, arm), None)
