"""Upstream health: outlier ejection, per-arm breakers, the retry budget and rule (driven
clocks), and active health checks against real raw upstream servers (issue #12 points 3-4)."""

from __future__ import annotations

import asyncio

import pytest

from edge.breaker import (
    AFTER_HEADERS,
    BEFORE_HEADERS,
    CLOSED,
    HALF_OPEN,
    NOTHING_SENT,
    OPEN,
    ArmBreaker,
    ArmEvent,
    ArmRouter,
    RetryBudget,
    may_retry,
)
from edge.healthcheck import HealthCheck, HealthChecker, HealthState
from edge.outlier import OutlierDetector, OutlierPolicy
from tests.rawserver import RawConn, RawServer, always


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


# -- outlier detection ---------------------------------------------------------------------


def detector(clock: Clock, **policy: float) -> OutlierDetector:
    det = OutlierDetector(OutlierPolicy(**policy), clock)  # type: ignore[arg-type]
    det.set_groups([("a", "b", "c"), ("x",)])
    return det


def test_consecutive_5xx_eject_for_growing_interval() -> None:
    """Five 5xx in a row eject for 30 s; a second ejection lasts 60 s; a success resets the
    streak."""
    clock = Clock()
    det = detector(clock)
    for _ in range(4):
        assert not det.record("a", 503)
    det.record("a", 200)
    assert [det.record("a", 500) for _ in range(5)] == [False] * 4 + [True]
    assert det.is_ejected("a") and det.available(("a", "b", "c")) == ["b", "c"]
    clock.now += 30
    assert not det.is_ejected("a")
    assert [det.record("a", 502) for _ in range(5)][-1]
    clock.now += 59
    assert det.is_ejected("a")
    clock.now += 1
    assert not det.is_ejected("a")


def test_connect_failures_eject_and_the_cap_holds() -> None:
    """Connect failures eject too; the ejection length stops at max_ejection_s."""
    clock = Clock()
    det = detector(clock, consecutive_connect_failures=2, base_ejection_s=10, max_ejection_s=25)
    lengths = []
    for _ in range(4):
        det.record_connect_failure("b")
        assert det.record_connect_failure("b")
        start = clock.now
        while det.is_ejected("b"):
            clock.now += 1
        lengths.append(clock.now - start)
    assert lengths == [10, 20, 25, 25]


def test_never_eject_the_last_upstream_of_an_arm() -> None:
    """The last un-ejected upstream of an arm stays in, and a one-upstream arm never ejects."""
    clock = Clock()
    det = detector(clock, consecutive_5xx=1)
    assert det.record("a", 500) and det.record("b", 500)
    assert not det.record("c", 500)
    assert det.available(("a", "b", "c")) == ["c"]
    assert not det.record("x", 500) and not det.is_ejected("x")
    assert det.spared_total == 2


def test_recovered_upstream_is_forgiven() -> None:
    """Each base interval an upstream stays healthy after an ejection lowers its multiplier."""
    clock = Clock()
    det = detector(clock, consecutive_5xx=1, base_ejection_s=10, max_ejection_s=100)
    det.record("a", 500)
    clock.now += 10
    det.record("a", 500)  # second ejection: 20 s
    assert det.status["a"].ejections == 2
    clock.now += 20 + 25  # 25 s of calm after it ended: two steps forgiven
    det.record("a", 200)
    assert det.status["a"].ejections == 0
    det.record("a", 500)
    clock.now += 10
    assert not det.is_ejected("a")  # back to the base length
    assert {r["upstream"] for r in det.report()} == {"a", "b", "c", "x"}


def test_bad_policy_is_refused() -> None:
    """A policy with a zero threshold or an inverted range names the field."""
    with pytest.raises(ValueError, match="consecutive_5xx"):
        OutlierPolicy(consecutive_5xx=0)
    with pytest.raises(ValueError, match="base_ejection_s"):
        OutlierPolicy(base_ejection_s=10, max_ejection_s=5)


# -- breakers ------------------------------------------------------------------------------


def test_breaker_opens_half_opens_and_closes() -> None:
    """Failures in a row open the breaker, which half-opens after open_s for one trial:
    failure reopens, success closes; every change is an event."""
    clock = Clock()
    events: list[ArmEvent] = []
    br = ArmBreaker(
        "shop", "canary", failure_threshold=3, open_s=10, clock=clock, on_change=events.append
    )
    for _ in range(2):
        br.failure()
    br.success()
    for _ in range(3):
        assert br.allow()
        br.failure("502")
    assert br.state == OPEN and not br.allow()
    clock.now += 10
    assert br.allow() and br.state == HALF_OPEN
    assert not br.allow()  # one trial at a time
    br.failure("timeout")
    assert br.state == OPEN
    clock.now += 10
    assert br.allow()
    br.success()
    assert br.state == CLOSED and br.allow()
    assert [(e.old, e.new) for e in events] == [
        (CLOSED, OPEN),
        (OPEN, HALF_OPEN),
        (HALF_OPEN, OPEN),
        (OPEN, HALF_OPEN),
        (HALF_OPEN, CLOSED),
    ]
    assert events[0].release == "shop" and "3 failures" in events[0].reason


def test_half_open_breaker_never_sticks() -> None:
    """A trial that never reports does not keep the breaker half-open for ever: an abandoned
    trial frees its slot at once, a silent one after another open period."""
    clock = Clock()
    br = ArmBreaker("shop", "canary", failure_threshold=1, open_s=10, clock=clock)
    br.failure()
    clock.now += 10
    assert br.allow() and not br.allow()
    br.abandon()
    assert br.allow() and not br.allow()  # the slot came back
    clock.now += 9
    assert not br.allow()
    clock.now += 1  # two open periods since it opened: the silent trial is given up
    assert br.allow()
    br.success()
    assert br.state == CLOSED


def test_canary_users_go_to_stable_or_get_503() -> None:
    """An open canary breaker sends canary users to stable (counted) by default, or refuses
    them with the 503 fallback; stable users are never moved."""
    clock = Clock()
    stable = ArmBreaker("shop", "stable", clock=clock)
    canary = ArmBreaker("shop", "canary", clock=clock)
    router = ArmRouter(stable, canary)
    assert router.arm_for("canary") == "canary"
    canary.no_upstream()
    assert router.arm_for("canary") == "stable" and router.fell_back == 1
    assert router.arm_for("stable") == "stable"
    strict = ArmRouter(stable, canary, fallback="503")
    assert strict.arm_for("canary") is None and strict.refused == 1
    stable.no_upstream()
    assert router.arm_for("stable") is None
    assert router.arm_for("canary") is None


# -- retries -------------------------------------------------------------------------------


def test_retry_budget() -> None:
    """At least 3 retries in flight; beyond that 20 % of the active requests; released slots
    are reusable."""
    budget = RetryBudget()
    for _ in range(10):
        budget.started()
    assert [budget.try_retry() for _ in range(4)] == [True, True, True, False]
    for _ in range(20):
        budget.started()
    assert budget.try_retry() and budget.try_retry() and budget.try_retry()
    assert not budget.try_retry()  # 6 = 20 % of 30
    budget.retry_done()
    assert budget.try_retry()
    assert budget.exhausted == 2


@pytest.mark.parametrize(
    ("method", "stopped", "attempts", "ok"),
    [
        ("POST", NOTHING_SENT, 1, True),
        ("GET", BEFORE_HEADERS, 1, True),
        ("GET", BEFORE_HEADERS, 2, False),
        ("POST", BEFORE_HEADERS, 1, False),
        ("PATCH", BEFORE_HEADERS, 1, False),
        ("GET", AFTER_HEADERS, 1, False),
    ],
)
def test_retry_rule(method: str, stopped: str, attempts: int, ok: bool) -> None:
    """HARDENING §2.14 / table (b) rows 1-2: which failed attempts may be retried."""
    assert may_retry(method, stopped, attempts) is ok


# -- active health checks --------------------------------------------------------------------


def test_health_state_thresholds() -> None:
    """Unhealthy after 3 failed probes in a row, healthy again after 2 good ones."""
    state = HealthState("http://a", HealthCheck())
    assert [state.observe(False, "x") for _ in range(3)] == [False, False, True]
    assert not state.healthy and state.last_error == "x"
    assert [state.observe(True) for _ in range(2)] == [False, True]
    assert state.healthy


def test_bad_health_check_is_refused() -> None:
    """A path that is not origin-form and zero thresholds are refused, naming the field."""
    with pytest.raises(ValueError, match="path"):
        HealthCheck(path="healthz")
    with pytest.raises(ValueError, match="threshold"):
        HealthCheck(unhealthy_threshold=0)


def test_health_checker_against_real_upstreams() -> None:
    """Against real servers: a 200 upstream stays healthy, a 503 one and a closed port turn
    unhealthy after the threshold, the probe sends a GET of the configured path, and the
    503 one recovers when it answers 200 again."""

    async def scenario() -> None:
        status = {"code": b"503 Service Unavailable"}
        paths: list[bytes] = []

        async def flaky(conn: RawConn) -> None:
            req = await conn.read_request()
            if req is not None:
                paths.append(req.request_line)
                conn.write(b"HTTP/1.1 " + status["code"] + b"\r\nContent-Length: 0\r\n\r\n")
                await conn.drain()

        ok = always(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
        async with RawServer(ok) as gone:  # a port that was just closed: connect refused
            gone_port = gone.port
        async with RawServer(ok) as good, RawServer(flaky) as bad:
            changes: list[tuple[str, bool]] = []
            checker = HealthChecker(on_change=lambda s: changes.append((s.upstream, s.healthy)))
            check = HealthCheck(
                path="/ready", timeout_s=2, unhealthy_threshold=2, healthy_threshold=2
            )
            urls = {
                "good": f"http://127.0.0.1:{good.port}",
                "bad": f"http://127.0.0.1:{bad.port}",
                "gone": f"http://127.0.0.1:{gone_port}",
            }
            checker.configure((u, check) for u in urls.values())
            for _ in range(2):
                await checker.check_all()
            assert checker.healthy(urls["good"])
            assert not checker.healthy(urls["bad"]) and not checker.healthy(urls["gone"])
            assert paths[0] == b"GET /ready HTTP/1.1"
            assert "status 503" in checker.states[urls["bad"]].last_error
            assert "Connect" in checker.states[urls["gone"]].last_error or "refused" in (
                checker.states[urls["gone"]].last_error
            )
            status["code"] = b"200 OK"
            for _ in range(2):
                await checker.check_all()
            assert checker.healthy(urls["bad"])
            assert sorted(changes) == sorted(
                [(urls["bad"], False), (urls["gone"], False), (urls["bad"], True)]
            )
            assert good.connections == 4

    asyncio.run(asyncio.wait_for(scenario(), 60))


def test_health_checker_loop_runs_until_closed() -> None:
    """The background loop probes on its own (bounded wait for a state change) and stops
    cleanly; a timed-out probe counts as a failure."""

    async def scenario() -> None:
        async def silent(conn: RawConn) -> None:
            await conn.reader.read()  # never answers

        async with RawServer(silent) as srv:
            url = f"http://127.0.0.1:{srv.port}"
            checker = HealthChecker()
            checker.configure(
                [(url, HealthCheck(interval_s=0.01, timeout_s=0.05, unhealthy_threshold=2))]
            )
            checker.start()
            for _ in range(2000):
                if not checker.healthy(url):
                    break
                await asyncio.sleep(0.01)
            await checker.aclose()
            assert not checker.healthy(url)
            assert "no answer" in checker.states[url].last_error

    asyncio.run(asyncio.wait_for(scenario(), 60))
