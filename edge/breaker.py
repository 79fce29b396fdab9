"""A circuit breaker per release arm, and the retry budget (issue #12 point 4).

Breaker states (the classic three, as in Envoy's and resilience4j's):

    closed     traffic flows; `failure_threshold` failures in a row, or no usable upstream
               (every one ejected or failing its health check), open it
    open       no traffic for `open_s`; a canary arm's users go to stable (`fallback="stable"`,
               the default, counted) or get 503 (`fallback="503"`); a stable arm answers 503
    half_open  after `open_s`, up to `trial_requests` requests at a time try the arm: a success
               closes it, a failure opens it again

Every state change is an `ArmEvent` handed to `on_change` (the guard and the event stream
subscribe there). Pure logic with an injected clock.

Retry budget (Envoy `retry_budget`): at most `budget_percent` % of the active requests may be
retries at any time, and never fewer than `min_retry_concurrency`, so retries cannot amplify
an outage. `may_retry` holds the retry rule of HARDENING §2.14 (RFC 9110 §9.2.2).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

CLOSED = "closed"
OPEN = "open"
HALF_OPEN = "half_open"
DEFAULT_FAILURE_THRESHOLD = 5
DEFAULT_OPEN_S = 30.0
DEFAULT_TRIAL_REQUESTS = 1
DEFAULT_BUDGET_PERCENT = 20.0
DEFAULT_MIN_RETRY_CONCURRENCY = 3

Fallback = Literal["stable", "503"]
Clock = Callable[[], float]


@dataclass(frozen=True)
class ArmEvent:
    release: str
    arm: str
    old: str
    new: str
    reason: str
    at: float


class ArmBreaker:
    """The breaker of one release arm."""

    def __init__(
        self,
        release: str,
        arm: str,
        *,
        failure_threshold: int = DEFAULT_FAILURE_THRESHOLD,
        open_s: float = DEFAULT_OPEN_S,
        trial_requests: int = DEFAULT_TRIAL_REQUESTS,
        clock: Clock = time.monotonic,
        on_change: Callable[[ArmEvent], None] | None = None,
    ) -> None:
        if failure_threshold < 1 or open_s <= 0 or trial_requests < 1:
            raise ValueError("failure_threshold, trial_requests >= 1 and open_s > 0")
        self.release = release
        self.arm = arm
        self.failure_threshold = failure_threshold
        self.open_s = open_s
        self.trial_requests = trial_requests
        self.clock = clock
        self.on_change = on_change
        self.state = CLOSED
        self.failures = 0  # consecutive
        self.opened_at = 0.0
        self.trials = 0  # in flight while half-open
        self.opened_total = 0

    def _move(self, new: str, reason: str) -> None:
        old, self.state = self.state, new
        if new == OPEN:
            self.opened_at = self.clock()
            self.opened_total += 1
            self.trials = 0
        elif new == CLOSED:
            self.failures = 0
            self.trials = 0
        if self.on_change is not None:
            self.on_change(ArmEvent(self.release, self.arm, old, new, reason, self.clock()))

    def allow(self) -> bool:
        """May a request go to this arm now? (Counts a half-open trial when it says yes.)"""
        state = self.state
        if state == CLOSED:
            return True
        if state == OPEN:
            if self.clock() - self.opened_at < self.open_s:
                return False
            self._move(HALF_OPEN, f"open for {self.open_s:g} s")
        if self.trials >= self.trial_requests and self.clock() - self.opened_at >= 2 * self.open_s:
            # Trials that never reported (their client left, or a bug): do not stay half-open
            # for ever; let new trials through after another `open_s`.
            self.trials = 0
            self.opened_at = self.clock() - self.open_s
        if self.trials < self.trial_requests:
            self.trials += 1
            return True
        return False

    def abandon(self) -> None:
        """A trial request ended without a verdict (client gone before the upstream answered)."""
        if self.state == HALF_OPEN and self.trials:
            self.trials -= 1

    def success(self) -> None:
        if self.state == HALF_OPEN:
            self._move(CLOSED, "trial request succeeded")
        self.failures = 0

    def failure(self, reason: str = "upstream failure") -> None:
        if self.state == HALF_OPEN:
            self._move(OPEN, f"trial request failed: {reason}")
            return
        self.failures += 1
        if self.state == CLOSED and self.failures >= self.failure_threshold:
            self._move(OPEN, f"{self.failures} failures in a row, last: {reason}")

    def no_upstream(self) -> None:
        """Every upstream of the arm is ejected or unhealthy: open at once."""
        if self.state == CLOSED:
            self._move(OPEN, "no usable upstream")


class ArmRouter:
    """Which arm a request goes to, given the breakers of a release's two arms."""

    def __init__(
        self, stable: ArmBreaker, canary: ArmBreaker, fallback: Fallback = "stable"
    ) -> None:
        self.stable = stable
        self.canary = canary
        self.fallback = fallback
        self.fell_back = 0  # canary users sent to stable (counted and visible)
        self.refused = 0  # 503s

    def arm_for(self, decided: str) -> str | None:
        """The arm to use for a request decided for `decided`, or None for 503."""
        if decided == self.canary.arm:
            if self.canary.allow():
                return decided
            if self.fallback == "503":
                self.refused += 1
                return None
            self.fell_back += 1
            decided = self.stable.arm
        if self.stable.allow():
            return decided
        self.refused += 1
        return None


class RetryBudget:
    """Envoy's retry budget: retries in flight <= max(min, percent of active requests)."""

    def __init__(
        self,
        percent: float = DEFAULT_BUDGET_PERCENT,
        min_concurrency: int = DEFAULT_MIN_RETRY_CONCURRENCY,
    ) -> None:
        if not 0 <= percent <= 100 or min_concurrency < 0:
            raise ValueError("percent in [0, 100], min_concurrency >= 0")
        self.percent = percent
        self.min_concurrency = min_concurrency
        self.active = 0
        self.retrying = 0
        self.exhausted = 0  # retries refused by the budget (metrics)

    def started(self) -> None:
        self.active += 1

    def finished(self) -> None:
        self.active = max(0, self.active - 1)

    def try_retry(self) -> bool:
        """Take a retry slot if the budget allows; pair with `retry_done`."""
        cap = max(self.min_concurrency, int(self.active * self.percent / 100))
        if self.retrying >= cap:
            self.exhausted += 1
            return False
        self.retrying += 1
        return True

    def retry_done(self) -> None:
        self.retrying = max(0, self.retrying - 1)


# Where a failed attempt stopped (the upstream exception tree's phases).
NOTHING_SENT = "nothing_sent"  # connect refused / failed, pool timeout: nothing reached it
BEFORE_HEADERS = "before_headers"  # request sent, connection lost before response headers
AFTER_HEADERS = "after_headers"  # response started: never retried
SAFE_RETRY_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


def may_retry(method: str, stopped: str, attempts: int) -> bool:
    """HARDENING §2.14: any method when nothing was sent; GET/HEAD/OPTIONS once when the
    connection was lost before response headers; never after headers, never POST/PATCH
    once sent (RFC 9110 §9.2.2, nginx `proxy_next_upstream` without `non_idempotent`)."""
    if stopped == NOTHING_SENT:
        return True
    if stopped == BEFORE_HEADERS:
        return method in SAFE_RETRY_METHODS and attempts <= 1
    return False
