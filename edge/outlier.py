"""Passive outlier detection: upstreams that keep failing are ejected for a growing interval.

After Envoy's outlier detection (`consecutive_5xx`, `consecutive_gateway_failure`,
`base_ejection_time`, `max_ejection_time`): an upstream with `consecutive_5xx` 5xx answers in
a row, or `consecutive_connect_failures` failed connects / resets / timeouts in a row, is
ejected for `base_ejection_s * n` (n: how often it was ejected, capped at `max_ejection_s`).
After an ejection ends the upstream takes traffic again; each `base_ejection_s` it then stays
un-ejected lowers n by one, so an upstream that recovered is forgiven over time.

Never the last one: an upstream is not ejected while it is the last un-ejected upstream of any
arm it serves (`groups`): the arm's circuit breaker (edge/breaker.py) decides what happens to
an arm whose every upstream fails, not the ejection.

Rules of this file: pure logic with an injected clock; the pipeline reports outcomes
(`record`), `upstream_peer` asks `available`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

DEFAULT_CONSECUTIVE_5XX = 5
DEFAULT_CONSECUTIVE_CONNECT_FAILURES = 5
DEFAULT_BASE_EJECTION_S = 30.0
DEFAULT_MAX_EJECTION_S = 300.0

Clock = Callable[[], float]


@dataclass(frozen=True)
class OutlierPolicy:
    consecutive_5xx: int = DEFAULT_CONSECUTIVE_5XX
    consecutive_connect_failures: int = DEFAULT_CONSECUTIVE_CONNECT_FAILURES
    base_ejection_s: float = DEFAULT_BASE_EJECTION_S
    max_ejection_s: float = DEFAULT_MAX_EJECTION_S

    def __post_init__(self) -> None:
        for name in ("consecutive_5xx", "consecutive_connect_failures"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be at least 1")
        if not 0 < self.base_ejection_s <= self.max_ejection_s:
            raise ValueError("base_ejection_s: must be > 0 and <= max_ejection_s")


class UpstreamStatus:
    """What the detector knows of one upstream (also what /metrics and the admin API show)."""

    __slots__ = (
        "name",
        "errors_5xx",
        "connect_failures",
        "ejected_until",
        "ejections",
        "_calm_since",
    )

    def __init__(self, name: str) -> None:
        self.name = name
        self.errors_5xx = 0  # consecutive
        self.connect_failures = 0  # consecutive
        self.ejected_until = 0.0
        self.ejections = 0  # the multiplier of the next ejection's length, minus one
        self._calm_since = 0.0

    def snapshot(self, now: float) -> dict[str, object]:
        return {
            "upstream": self.name,
            "ejected": self.ejected_until > now,
            "ejected_for_s": max(0.0, round(self.ejected_until - now, 3)),
            "ejections": self.ejections,
            "consecutive_5xx": self.errors_5xx,
            "consecutive_connect_failures": self.connect_failures,
        }


class OutlierDetector:
    """Per-upstream failure streaks and ejections over the arms the upstreams serve."""

    def __init__(self, policy: OutlierPolicy | None = None, clock: Clock = time.monotonic) -> None:
        self.policy = policy or OutlierPolicy()
        self.clock = clock
        self.status: dict[str, UpstreamStatus] = {}
        self.groups: list[tuple[str, ...]] = []
        self._groups_of: dict[str, list[tuple[str, ...]]] = {}
        self.ejected_total = 0
        self.spared_total = 0  # ejections skipped to keep the last upstream of an arm

    def set_groups(self, groups: Iterable[Sequence[str]]) -> None:
        """The arms (each a tuple of upstream names); state of known upstreams is kept."""
        self.groups = [tuple(g) for g in groups]
        self._groups_of = {}
        for group in self.groups:
            for name in group:
                self._groups_of.setdefault(name, []).append(group)
                if name not in self.status:
                    self.status[name] = UpstreamStatus(name)
        for name in [n for n in self.status if n not in self._groups_of]:
            del self.status[name]

    def _get(self, name: str) -> UpstreamStatus:
        st = self.status.get(name)
        if st is None:
            st = self.status[name] = UpstreamStatus(name)
        return st

    def is_ejected(self, name: str) -> bool:
        st = self.status.get(name)
        return st is not None and st.ejected_until > self.clock()

    def available(self, group: Sequence[str]) -> list[str]:
        """The group's upstreams that take traffic now (never empty for a non-empty group)."""
        now = self.clock()
        status = self.status
        out = [n for n in group if (st := status.get(n)) is None or st.ejected_until <= now]
        return out or list(group)

    def record(self, name: str, status: int) -> bool:
        """An upstream answered with `status`; True if that ejected it."""
        st = self._get(name)
        st.connect_failures = 0
        if status >= 500:
            st.errors_5xx += 1
            if st.errors_5xx >= self.policy.consecutive_5xx:
                return self._eject(st)
        else:
            st.errors_5xx = 0
            self._forgive(st)
        return False

    def record_connect_failure(self, name: str) -> bool:
        """Connect refused, reset before an answer, or timed out; True if that ejected it."""
        st = self._get(name)
        st.connect_failures += 1
        if st.connect_failures >= self.policy.consecutive_connect_failures:
            return self._eject(st)
        return False

    def _forgive(self, st: UpstreamStatus) -> None:
        if st.ejections and st.ejected_until:
            now = self.clock()
            calm = now - max(st.ejected_until, st._calm_since)
            steps = int(calm // self.policy.base_ejection_s)
            if steps > 0:
                st.ejections = max(0, st.ejections - steps)
                st._calm_since = now

    def _eject(self, st: UpstreamStatus) -> bool:
        now = self.clock()
        if st.ejected_until > now:
            return False
        for group in self._groups_of.get(st.name, ()):
            others = [n for n in group if n != st.name and not self.is_ejected(n)]
            if not others:
                self.spared_total += 1
                return False
        self._forgive(st)
        length = min(self.policy.base_ejection_s * (st.ejections + 1), self.policy.max_ejection_s)
        st.ejections += 1
        st.ejected_until = now + length
        st._calm_since = st.ejected_until
        st.errors_5xx = 0
        st.connect_failures = 0
        self.ejected_total += 1
        return True

    def report(self) -> list[dict[str, object]]:
        now = self.clock()
        return [st.snapshot(now) for st in self.status.values()]
