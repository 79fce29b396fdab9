"""flags/guard.py (the judgement) over edge/armstats.py (the rolling windows), driven by a
replayed clock: one `rotate()` is one second, so 1,000 judged windows take no real time."""

from __future__ import annotations

import math
import random
from collections.abc import Callable

from hypothesis import given, settings
from hypothesis import strategies as st

from edge.armstats import ArmStats
from flags.guard import (
    BREACH,
    ERROR_RATE,
    ERROR_RATE_INCREASE,
    INSUFFICIENT,
    N_BUCKETS,
    P99,
    P99_RATIO,
    PASS,
    ArmCounts,
    Judgement,
    Sustain,
    Window,
    judge,
    latency_bucket,
    windows_from,
)
from flags.rollout import GuardCriteria

PROPERTIES = settings(max_examples=300, deadline=None, database=None)
DEFAULT = GuardCriteria()


def arm(requests: int, errors: int, latency_s: float = 0.02) -> ArmCounts:
    hist = [0] * N_BUCKETS
    hist[latency_bucket(latency_s)] = requests
    return ArmCounts(requests, errors, tuple(hist))


Latency = Callable[[random.Random], float]


def healthy_latency(rng: random.Random) -> float:
    return rng.lognormvariate(math.log(0.02), 0.5)


def replay(
    seconds: int,
    *,
    canary_rps: float,
    stable_rps: float,
    canary_error: Callable[[int], float],
    stable_error: Callable[[int], float] = lambda _t: 0.01,
    canary_latency: Latency = healthy_latency,
    criteria: GuardCriteria = DEFAULT,
    seed: int = 7,
) -> list[Judgement]:
    """Drive `seconds` of traffic through ArmStats and judge after every rotation, as the
    guard runner does. Request counts per second are Poisson (so 1 RPS is really bursty)."""
    rng = random.Random(seed)
    stats = ArmStats()
    out: list[Judgement] = []

    def poisson(rate: float) -> int:
        # Knuth's method is fine for the small rates used here; normal approx above 30.
        if rate > 30:
            return max(0, round(rng.gauss(rate, math.sqrt(rate))))
        limit, k, p = math.exp(-rate), 0, 1.0
        while True:
            p *= rng.random()
            if p <= limit:
                return k
            k += 1

    for t in range(seconds):
        for _ in range(poisson(canary_rps)):
            status = 500 if rng.random() < canary_error(t) else 200
            stats.record("web", "canary", status, canary_latency(rng))
        for _ in range(poisson(stable_rps)):
            status = 500 if rng.random() < stable_error(t) else 200
            stats.record("web", "stable", status, healthy_latency(rng))
        stats.rotate()
        out.append(judge(criteria, windows_from(stats.horizons("web"))))
    return out


def test_a_a_replay_never_rolls_back() -> None:
    """A/A: a healthy canary with stable's own 1 % background error rate and the same latency,
    judged over 1,000 one-second windows at 200 RPS (10 % canary): 0 breaches."""
    judged = replay(1000, canary_rps=20, stable_rps=180, canary_error=lambda _t: 0.01)
    assert len(judged) == 1000
    assert [j for j in judged if j.status == BREACH] == []
    # ...and not because nothing was judged: the evidence passes the canary.
    assert sum(1 for j in judged if j.status == PASS) > 900


def test_one_rps_canary_is_held_never_failed() -> None:
    """A healthy canary at 1 RPS over 10 minutes of driven time (with stable's 1 % background
    errors): never a breach; the short windows hold for lack of samples."""
    judged = replay(600, canary_rps=1, stable_rps=9, canary_error=lambda _t: 0.01)
    assert all(j.status != BREACH for j in judged)
    assert any(j.status == INSUFFICIENT for j in judged)


def test_failing_canary_is_caught_within_seconds() -> None:
    """The canary switches to 50 % 5xx at t=30 s (20 RPS of canary): a breach of the error-rate
    criteria within 4 judged seconds, with the evidence naming both arms."""
    judged = replay(
        60, canary_rps=20, stable_rps=180, canary_error=lambda t: 0.5 if t >= 30 else 0.01
    )
    assert all(j.status != BREACH for j in judged[:30])
    first = next(i for i, j in enumerate(judged) if j.status == BREACH)
    assert 30 <= first <= 33
    names = {v.criterion for v in judged[first].breaches}
    assert names & {ERROR_RATE, ERROR_RATE_INCREASE}
    assert "canary" in judged[first].summary() and "stable" in judged[first].summary()


def test_slow_canary_is_caught_by_latency() -> None:
    """The canary's latency rises 5x with no errors: caught by the p99 ratio criterion (and not
    by any error criterion)."""

    def slow(rng: random.Random) -> float:
        return 5 * healthy_latency(rng)

    judged = replay(
        30, canary_rps=20, stable_rps=180, canary_error=lambda _t: 0.0, canary_latency=slow
    )
    breached = [j for j in judged if j.status == BREACH]
    assert breached
    names = {v.criterion for j in breached for v in j.breaches}
    assert P99_RATIO in names and ERROR_RATE not in names and ERROR_RATE_INCREASE not in names


def test_shared_failure_never_fires_relative_criteria() -> None:
    """Both arms fail together at 50 % (a shared dependency): the relative criterion never
    breaches; only the absolute error rate does, which says so explicitly."""
    judged = replay(
        60,
        canary_rps=20,
        stable_rps=180,
        canary_error=lambda t: 0.5 if t >= 10 else 0.01,
        stable_error=lambda t: 0.5 if t >= 10 else 0.01,
    )
    relative = [v for j in judged for v in j.breaches if v.criterion == ERROR_RATE_INCREASE]
    assert relative == []
    assert any(v.criterion == ERROR_RATE for j in judged for v in j.breaches)
    only_relative = GuardCriteria(max_error_rate=None, max_p99_ms=None)
    judged = replay(
        60,
        canary_rps=20,
        stable_rps=180,
        canary_error=lambda t: 0.5 if t >= 10 else 0.01,
        stable_error=lambda t: 0.5 if t >= 10 else 0.01,
        criteria=only_relative,
    )
    assert all(j.status != BREACH for j in judged)


def test_absolute_latency_threshold() -> None:
    """p99 above the absolute threshold: 6 s answers against the default 5 s breach."""
    judged = judge(DEFAULT, [Window(10, arm(100, 0, 6.0), arm(1000, 0))])
    assert any(v.criterion == P99 for v in judged.breaches)


@PROPERTIES
@given(
    n=st.integers(min_value=0, max_value=49),
    errors=st.integers(min_value=0, max_value=49),
    horizon=st.sampled_from([2, 5, 10, 30, 60]),
)
def test_never_breach_below_min_samples(n: int, errors: int, horizon: int) -> None:
    """Fewer canary samples than min_samples (50): never a breach, whatever they show."""
    errors = min(errors, n)
    judged = judge(DEFAULT, [Window(horizon, arm(n, errors, 30.0), arm(1000, 0))])
    assert judged.status != BREACH


@PROPERTIES
@given(
    n=st.integers(min_value=50, max_value=5000),
    errors=st.integers(min_value=0, max_value=5000),
    more=st.integers(min_value=0, max_value=500),
)
def test_more_errors_never_improve_the_verdict(n: int, errors: int, more: int) -> None:
    """Monotonic: with the same sample size, more canary errors never turn a breach into a
    non-breach (error-rate criterion alone)."""
    errors = min(errors, n)
    worse = min(n, errors + more)
    only = GuardCriteria(max_p99_ms=None, max_error_rate_increase=None, max_p99_ratio=None)
    stable = arm(1000, 10)
    a = judge(only, [Window(10, arm(n, errors), stable)])
    b = judge(only, [Window(10, arm(n, worse), stable)])
    if a.status == BREACH:
        assert b.status == BREACH


@PROPERTIES
@given(
    n=st.integers(min_value=50, max_value=5000),
    rate=st.floats(min_value=0, max_value=1),
    stable_n=st.integers(min_value=50, max_value=5000),
)
def test_canary_no_worse_than_stable_never_breaches_relative(
    n: int, rate: float, stable_n: int
) -> None:
    """A canary whose error rate is at or below stable's never breaches the relative criterion,
    however bad stable is (stable's own failures never roll the canary back)."""
    stable_errors = round(rate * stable_n)
    canary_errors = min(n, math.floor(stable_errors / stable_n * n))
    only = GuardCriteria(max_error_rate=None, max_p99_ms=None, max_p99_ratio=None)
    judged = judge(only, [Window(10, arm(n, canary_errors), arm(stable_n, stable_errors))])
    assert judged.status != BREACH


def test_sustain_needs_the_breach_to_hold() -> None:
    """A breach counts once it has held for sustained_s of the caller's clock; a pass resets."""
    s = Sustain()
    assert not s.update(100.0, True, 5.0)
    assert not s.update(104.0, True, 5.0)
    assert s.update(105.0, True, 5.0)
    assert not s.update(106.0, False, 5.0)
    assert not s.update(107.0, True, 5.0)
    assert Sustain().update(1.0, True, 0.0)


def test_counts_round_trip_and_reject_garbage() -> None:
    """Arm counts published by other instances are parsed strictly (length, non-negative)."""
    counts = arm(10, 2)
    assert ArmCounts.from_list(counts.to_list()) == counts
    for bad in ([1, 2], [-1, 0, *([0] * N_BUCKETS)], ["1", 0, *([0] * N_BUCKETS)]):
        try:
            ArmCounts.from_list(bad)  # type: ignore[arg-type]
        except ValueError:
            continue
        raise AssertionError(f"accepted {bad!r}")


@PROPERTIES
@given(
    seconds=st.lists(
        st.lists(st.tuples(st.sampled_from([200, 404, 500, 502]), st.floats(0, 100)), max_size=5),
        max_size=80,
    )
)
def test_running_sums_equal_a_walk_over_the_ring(
    seconds: list[list[tuple[int, float]]],
) -> None:
    """edge/armstats.py keeps per-horizon sums at rotation; they always equal the sums of a
    walk over the last h complete seconds (requests, errors, every latency bucket)."""
    stats = ArmStats()
    stats.record("web", "stable", 200, 0.01)  # both series exist from the start
    for second in seconds:
        for status, latency in second:
            stats.record("web", "canary", status, latency)
        stats.rotate()
    canary = stats.series[("web", "canary")] if ("web", "canary") in stats.series else None
    for h, (c, _s) in stats.horizons("web").items():
        expected = canary.last(h) if canary is not None else ArmCounts()
        assert c == expected
        assert (
            c.errors == sum(1 for sec in seconds[-h:] for st_, _ in sec if st_ >= 500)
            if seconds
            else True
        )


def test_a_body_cut_off_midstream_counts_as_an_error() -> None:
    """A 200 whose body the upstream cut off (the pipeline reports kind "midstream") is one
    request and one error in the guard's windows, not two requests: the `logging` phase
    records the finished exchange once."""
    from edge.upstream import Timeouts
    from tests.test_errors import context, make_pipeline

    pipeline = make_pipeline("http://127.0.0.1:9", Timeouts())
    ctx = context()
    pipeline.admit(ctx)
    ctx.status, ctx.upstream_s, ctx.error = 200, 0.01, "midstream"
    pipeline.logging(ctx)
    metrics = pipeline.metrics
    metrics.arms.rotate()
    _, stable = metrics.arms.horizons("web")[2]  # the release is off: the stable arm
    assert (stable.requests, stable.errors) == (1, 1)
    assert metrics.upstream_errors[("web", "stable", "midstream")] == 1


def test_turnouts_own_502_counts_against_the_arm() -> None:
    """An upstream failure Turnout answers itself (502) is an error of the arm in the guard's
    windows, with the time the client waited for it."""
    from edge.upstream import Timeouts
    from tests.test_errors import context, make_pipeline

    pipeline = make_pipeline("http://127.0.0.1:9", Timeouts())
    ctx = context()
    pipeline.admit(ctx)
    ctx.status, ctx.error = 502, "connect"
    pipeline.logging(ctx)
    pipeline.metrics.arms.rotate()
    _, stable = pipeline.metrics.arms.horizons("web")[2]
    assert (stable.requests, stable.errors) == (1, 1)
    assert sum(stable.histogram) == 1
