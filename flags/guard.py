"""The guard's judgement: is the canary worse than allowed? Pure: counts in, verdicts out.

Rules of this file:
* Every criterion becomes one question about a proportion: "is the share of *bad* canary
  requests above a limit L?". Bad means a 5xx or an upstream failure (error rate), a latency
  above the threshold (p95 / p99: the share above it must stay under 5 % / 1 %), or a latency
  above `ratio` x stable's p99 (p99 ratio). The relative limits are built from stable in the
  same window: L = stable's error rate (its upper confidence bound) + the allowed increase. So
  when stable fails as much as the canary (a shared dependency is down), L rises with it and
  the relative criteria do not fire; the absolute ones still do, on purpose.
* The test is Wald's sequential probability ratio test (SPRT), run on several horizons (the
  last 2, 5, 10, 30 and 60 seconds): H0 "the bad share is L" against H1 "it is 2L" (capped),
  and beside it against "5L" for gross failures (each at alpha/2, see `_test`).
  The log-likelihood ratio of k bad among n is  k ln(p1/p0) + (n-k) ln((1-p1)/(1-p0)).
  It crosses A = ln(1/alpha) -> breach; it falls under B = ln(beta) -> pass; in between ->
  insufficient data (hold, never fail). Why the SPRT: a small canary is never failed on
  noise (a handful of requests cannot reach A), a clearly bad one is caught after a few dozen
  requests (50 % errors against L = 5 %: about 20 bad requests), and a healthy one is passed
  once its evidence adds up instead of after a fixed sample size (ROLLOUTS.md (b) 4). Error
  rates (Wald's bounds): alpha = 1e-6 per test (a false rollback), beta = 1e-2 (a false pass,
  which only lets a plan advance; the guard keeps judging afterwards).
* Nothing here reads a clock. The caller passes counts and times (`Sustain`).
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from flags.rollout import GuardCriteria

# Fixed latency buckets (upper bounds, milliseconds). Every common threshold (100 ms,
# 250 ms, 500 ms, 1 s, 2 s, 5 s, 10 s) is a bound, so "above the threshold" is counted exactly.
LATENCY_BOUNDS_MS: tuple[float, ...] = (
    # about eight steps a decade, so a 5x slower canary moves many buckets, not one
    *(1, 1.5, 2, 3, 4, 5, 7.5),
    *(10, 15, 20, 25, 30, 40, 50, 75),
    *(100, 125, 150, 200, 250, 300, 400, 500, 750),
    *(1000, 1500, 2000, 2500, 3000, 4000, 5000, 7500),
    *(10000, 15000, 20000, 30000, 60000),
)
N_BUCKETS = len(LATENCY_BOUNDS_MS) + 1  # the last one: above 60 s
HORIZONS_S: tuple[int, ...] = (2, 5, 10, 30, 60)

SPRT_ALPHA = 1e-6
SPRT_BETA = 1e-2
SPRT_ACCEPT = math.log(1 / SPRT_ALPHA)  # ~13.8: breach (one test)
SPRT_ACCEPT_EITHER = math.log(2 / SPRT_ALPHA)  # ~14.5: breach, either of the two tests
SPRT_REJECT = math.log(SPRT_BETA)  # ~-4.6: pass
STABLE_BOUND_Z = 3.0  # stable's rate is taken at its upper ~99.9 % Wilson bound

PASS = "pass"  # noqa: S105 - a verdict, not a password
BREACH = "breach"
INSUFFICIENT = "insufficient"

ERROR_RATE = "error_rate"
P95 = "p95_latency"
P99 = "p99_latency"
ERROR_RATE_INCREASE = "error_rate_increase"
P99_RATIO = "p99_ratio"


def latency_bucket(elapsed_s: float) -> int:
    """The bucket index of a latency (the edge calls this once per request)."""
    return bisect.bisect_left(LATENCY_BOUNDS_MS, elapsed_s * 1000.0)


@dataclass(frozen=True, slots=True)
class ArmCounts:
    """One arm's counts over a window: requests, errors (5xx or upstream failure), and a
    latency histogram over `LATENCY_BOUNDS_MS` (`N_BUCKETS` integers)."""

    requests: int = 0
    errors: int = 0
    histogram: tuple[int, ...] = (0,) * N_BUCKETS

    def __add__(self, other: ArmCounts) -> ArmCounts:
        return ArmCounts(
            self.requests + other.requests,
            self.errors + other.errors,
            tuple(a + b for a, b in zip(self.histogram, other.histogram, strict=True)),
        )

    @property
    def error_rate(self) -> float:
        return self.errors / self.requests if self.requests else 0.0

    @property
    def timed(self) -> int:
        return sum(self.histogram)

    def above_ms(self, threshold_ms: float) -> float:
        """Samples slower than `threshold_ms`: exact when it is a bucket bound (every common
        threshold is), else the straddling bucket counts pro rata (linear, as quantiles)."""
        # Bucket i holds (bounds[i-1], bounds[i]]; the first bucket starts at 0.
        i = bisect.bisect_left(LATENCY_BOUNDS_MS, threshold_ms)
        above: float = sum(self.histogram[i + 1 :])
        if i < len(LATENCY_BOUNDS_MS) and self.histogram[i]:
            low = LATENCY_BOUNDS_MS[i - 1] if i else 0.0
            high = LATENCY_BOUNDS_MS[i]
            above += self.histogram[i] * (high - threshold_ms) / (high - low)
        return above

    def quantile_ms(self, q: float) -> float:
        """Quantile q, interpolated linearly inside its bucket as Prometheus'
        `histogram_quantile` does (inf: above the last bound)."""
        total = self.timed
        if total == 0:
            return 0.0
        rank = q * total
        running = 0
        for i, count in enumerate(self.histogram):
            if count and running + count >= rank:
                if i >= len(LATENCY_BOUNDS_MS):
                    return math.inf
                low = LATENCY_BOUNDS_MS[i - 1] if i else 0.0
                high = LATENCY_BOUNDS_MS[i]
                return round(low + (high - low) * (rank - running) / count, 3)
            running += count
        return math.inf

    def to_list(self) -> list[int]:
        return [self.requests, self.errors, *self.histogram]

    @classmethod
    def from_list(cls, raw: Sequence[int]) -> ArmCounts:
        if len(raw) != 2 + N_BUCKETS or not all(isinstance(v, int) and v >= 0 for v in raw):
            raise ValueError("arm counts: 2 + N_BUCKETS non-negative integers expected")
        return cls(raw[0], raw[1], tuple(raw[2:]))


EMPTY = ArmCounts()


@dataclass(frozen=True, slots=True)
class Window:
    """Both arms over the same horizon (seconds)."""

    horizon_s: int
    canary: ArmCounts
    stable: ArmCounts


@dataclass(frozen=True, slots=True)
class Verdict:
    """One criterion's verdict with the evidence behind it."""

    criterion: str
    status: str
    threshold: float
    value: float  # the canary's figure (rate, or ms)
    limit: float  # the bad share's limit L the test used
    bad: float
    samples: int
    llr: float
    horizon_s: int
    stable_value: float = 0.0
    stable_samples: int = 0

    def describe(self) -> str:
        if self.criterion in (ERROR_RATE, ERROR_RATE_INCREASE):
            canary = f"canary {self.value:.2%} ({self.bad}/{self.samples})"
            stable = f"stable {self.stable_value:.2%} ({self.stable_samples})"
            if self.criterion == ERROR_RATE:
                what = f"error rate {canary} vs max {self.threshold:.2%}; {stable}"
            else:
                what = f"error rate {canary} vs {stable} + max {self.threshold:.2%}"
        elif self.criterion == P99_RATIO:
            what = (
                f"p99 canary {self.value:g} ms vs stable {self.stable_value:g} ms x max "
                f"{self.threshold:g} ({self.bad:.0f}/{self.samples} slower)"
            )
        else:
            name = "p95" if self.criterion == P95 else "p99"
            what = (
                f"{name} canary {self.value:g} ms vs max {self.threshold:g} ms "
                f"({self.bad:.0f}/{self.samples} slower)"
            )
        return f"{self.criterion} {self.status}: {what} over {self.horizon_s} s (SPRT log-LR {self.llr:.1f})"

    def evidence(self) -> dict[str, str | float | int]:
        """The figures behind the verdict, for the version summary and `explain`."""
        return {
            "criterion": self.criterion,
            "status": self.status,
            "threshold": self.threshold,
            "canary_value": self.value,
            "stable_value": self.stable_value,
            "canary_samples": self.samples,
            "canary_bad": round(self.bad, 1),
            "stable_samples": self.stable_samples,
            "window_s": self.horizon_s,
            "llr": round(self.llr, 3),
        }


@dataclass(frozen=True, slots=True)
class Judgement:
    """All criteria's verdicts for one release at one moment."""

    verdicts: tuple[Verdict, ...] = ()
    breaches: tuple[Verdict, ...] = field(default=())

    @property
    def status(self) -> str:
        if self.breaches:
            return BREACH
        if self.verdicts and all(v.status == PASS for v in self.verdicts):
            return PASS
        return INSUFFICIENT

    def summary(self) -> str:
        if self.breaches:
            return "; ".join(v.describe() for v in self.breaches)
        return f"{self.status}: " + ", ".join(f"{v.criterion} {v.status}" for v in self.verdicts)


def sprt_llr(bad: float, n: int, p0: float, p1: float) -> float:
    """Wald's log-likelihood ratio of H1 (share p1) over H0 (share p0) for k bad among n."""
    return bad * math.log(p1 / p0) + (n - bad) * math.log((1 - p1) / (1 - p0))


def alternative(limit: float) -> float:
    """H1 for a limit L: twice L, but never past halfway to 1 (a 60 % limit tests 80 %)."""
    return min(2 * limit, limit + (1 - limit) / 2)


def wilson_upper(k: int, n: int, z: float = STABLE_BOUND_Z) -> float:
    if n == 0:
        return 1.0
    p = k / n
    denom = 1 + z * z / n
    centre = p + z * z / (2 * n)
    spread = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return min(1.0, (centre + spread) / denom)


def gross_alternative(limit: float) -> float:
    """A second H1 for gross failures: five times L, never past three quarters to 1."""
    return min(5 * limit, limit + 3 * (1 - limit) / 4)


def _test(bad: float, n: int, limit: float) -> tuple[str, float]:
    """Two SPRTs side by side, each at alpha/2 (Bonferroni): against 2L, which catches a
    canary that is a little worse, and against 5L, which catches a gross failure about twice
    as fast. A pass needs the 2L test to accept H0 (the nearer alternative is ruled out)."""
    if limit >= 1:
        return PASS, -math.inf  # nothing can be worse than everything
    p0 = max(limit, 1e-6)
    near = sprt_llr(bad, n, p0, alternative(p0))
    gross = sprt_llr(bad, n, p0, gross_alternative(p0))
    llr = max(near, gross)
    if llr >= SPRT_ACCEPT_EITHER:
        return BREACH, llr
    if near <= SPRT_REJECT:
        return PASS, near
    return INSUFFICIENT, llr


def _judge_one(criterion: str, threshold: float, c: GuardCriteria, w: Window) -> Verdict:
    canary, stable = w.canary, w.stable
    bad: float
    if criterion == ERROR_RATE:
        n, bad, limit = canary.requests, canary.errors, threshold
        value, stable_value = canary.error_rate, stable.error_rate
        enough = n >= c.min_samples
    elif criterion == ERROR_RATE_INCREASE:
        n, bad = canary.requests, canary.errors
        limit = wilson_upper(stable.errors, stable.requests) + threshold
        value, stable_value = canary.error_rate, stable.error_rate
        enough = n >= c.min_samples and stable.requests >= c.min_samples
    elif criterion in (P95, P99):
        n, bad = canary.timed, canary.above_ms(threshold)
        limit = 0.05 if criterion == P95 else 0.01
        value = canary.quantile_ms(0.95 if criterion == P95 else 0.99)
        stable_value = stable.quantile_ms(0.95 if criterion == P95 else 0.99)
        enough = n >= c.min_samples
    else:  # P99_RATIO: the canary's share above ratio x stable's p99 must stay under 1 %
        stable_p99 = stable.quantile_ms(0.99)
        n, limit = canary.timed, 0.01
        value, stable_value = canary.quantile_ms(0.99), stable_p99
        enough = n >= c.min_samples and stable.timed >= c.min_samples
        enough = enough and math.isfinite(stable_p99) and stable_p99 > 0
        bad = canary.above_ms(threshold * stable_p99) if enough else 0.0
    if not enough:
        status, llr = INSUFFICIENT, 0.0
    else:
        status, llr = _test(bad, n, limit)
    return Verdict(
        criterion=criterion,
        status=status,
        threshold=threshold,
        value=value,
        limit=limit,
        bad=bad,
        samples=n,
        llr=llr,
        horizon_s=w.horizon_s,
        stable_value=stable_value,
        stable_samples=stable.requests
        if criterion in (ERROR_RATE, ERROR_RATE_INCREASE)
        else stable.timed,
    )


def criteria_of(c: GuardCriteria) -> list[tuple[str, float]]:
    out: list[tuple[str, float]] = []
    for name, value in (
        (ERROR_RATE, c.max_error_rate),
        (P95, c.max_p95_ms),
        (P99, c.max_p99_ms),
        (ERROR_RATE_INCREASE, c.max_error_rate_increase),
        (P99_RATIO, c.max_p99_ratio),
    ):
        if value is not None:
            out.append((name, float(value)))
    return out


def judge(criteria: GuardCriteria, windows: Sequence[Window]) -> Judgement:
    """Each criterion over every horizon: a breach on any horizon is a breach (the short ones
    catch a sudden failure fast, the long ones a small steady one); otherwise the verdict of
    the longest horizon with enough samples (pass, or insufficient)."""
    if not criteria.enabled or not windows:
        return Judgement()
    ordered = sorted(windows, key=lambda w: w.horizon_s)
    verdicts: list[Verdict] = []
    breaches: list[Verdict] = []
    for name, threshold in criteria_of(criteria):
        judged = [_judge_one(name, threshold, criteria, w) for w in ordered]
        breached = [v for v in judged if v.status == BREACH]
        worst = max(breached, key=lambda v: v.llr) if breached else None
        passed = [v for v in judged if v.status == PASS]
        chosen = worst or (passed[-1] if passed else judged[-1])
        verdicts.append(chosen)
        if worst is not None:
            breaches.append(worst)
    return Judgement(tuple(verdicts), tuple(breaches))


def windows_from(horizons: Mapping[int, tuple[ArmCounts, ArmCounts]]) -> list[Window]:
    """{horizon_s: (canary, stable)} -> windows."""
    return [Window(h, c, s) for h, (c, s) in sorted(horizons.items())]


class Sustain:
    """A breach counts only once it has held for `sustained_s` (times given by the caller)."""

    __slots__ = ("since",)

    def __init__(self) -> None:
        self.since: float | None = None

    def update(self, now: float, breached: bool, sustained_s: float) -> bool:
        if not breached:
            self.since = None
            return False
        if self.since is None:
            self.since = now
        return now - self.since >= sustained_s
