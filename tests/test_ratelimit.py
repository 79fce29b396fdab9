"""Rate limits: the document model, GCRA with a driven clock, the 429's fields, the fleet
share sync against real redis-server processes (issue #12 point 5)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from edge.ratelimit import OVERFLOW_KEY, RateLimiter
from flags.document import load_document, load_model
from flags.errors import ConfigError
from flags.ratelimits import RateLimit
from stores.ratesync import FleetSync, sync_client
from tests.redisproc import LOCALHOST, redis_server


class Clock:
    """A driven clock: tests move time, nothing sleeps."""

    def __init__(self, start: float = 1_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now


def doc_with(limits: dict[str, Any]) -> dict[str, Any]:
    return {
        "releases": {"shop": {"stable": ["http://s:1"], "canary": ["http://c:1"]}},
        "routes": [{"release": "shop"}],
        "rate_limits": limits,
    }


def limiter(clock: Clock, **limits: dict[str, Any]) -> RateLimiter:
    lim = RateLimiter(clock)
    lim.apply({name: load_model(RateLimit, spec) for name, spec in limits.items()})
    return lim


def check(lim: RateLimiter, unit: str | None = "u1", client: str = "10.0.0.1", **kw: Any) -> Any:
    return lim.check("shop", kw.get("arm", "stable"), "*/", unit, client, kw.get("internal", False))


# -- the document model --------------------------------------------------------------------


def test_document_accepts_limits() -> None:
    """A document with a valid limit loads and keeps it; the burst defaults to the rate."""
    doc = load_document(doc_with({"per-user": {"key": "unit", "requests": 10, "per_s": 1}}))
    assert doc.rate_limits["per-user"].burst_requests == 10


@pytest.mark.parametrize(
    ("limits", "field"),
    [
        ({"per-user": {"key": "user", "requests": 1, "per_s": 1}}, "rate_limits.per-user.key"),
        ({"per-user": {"key": "unit", "requests": 0, "per_s": 1}}, "rate_limits.per-user.requests"),
        ({"per-user": {"key": "unit", "requests": 1, "per_s": 0}}, "rate_limits.per-user.per_s"),
        ({"per-user": {"key": "unit", "requests": 1, "per_s": 1.5}}, "rate_limits.per-user.per_s"),
        ({"Per User": {"key": "unit", "requests": 1, "per_s": 1}}, "rate_limits.Per User"),
        (
            {"x": {"key": "unit", "requests": 1, "per_s": 1, "releases": ["nope"]}},
            "rate_limits.x.releases.0",
        ),
        ({"x": {"key": "unit", "requests": 1, "per_s": 1, "extra": 1}}, "rate_limits.x.extra"),
    ],
)
def test_document_refuses_bad_limits(limits: dict[str, Any], field: str) -> None:
    """Each bad limit is refused with a ConfigError naming its field."""
    with pytest.raises(ConfigError) as err:
        load_document(doc_with(limits))
    assert err.value.field == field


# -- GCRA ----------------------------------------------------------------------------------


def test_burst_then_steady_rate() -> None:
    """A fresh key gets its burst at once, then exactly one request per emission interval."""
    clock = Clock()
    lim = limiter(clock, u={"key": "unit", "requests": 10, "per_s": 1, "burst": 5})
    assert [check(lim) is None for _ in range(6)] == [True] * 5 + [False]
    clock.now += 0.05  # half an interval: still refused
    assert check(lim) is not None
    clock.now += 0.05
    assert check(lim) is None
    assert check(lim) is not None
    admitted = 0
    for _ in range(100):  # 10 s at 10 requests per second offered each 0.1 s step x 3
        clock.now += 0.1
        admitted += sum(check(lim) is None for _ in range(3))
    assert admitted == 100


def test_keys_are_independent_and_kinds_pick_their_key() -> None:
    """Unit, client, route and arm limits count their own keys."""
    clock = Clock()
    lim = limiter(
        clock,
        a={"key": "unit", "requests": 1, "per_s": 60},
        b={"key": "client", "requests": 2, "per_s": 60},
    )
    assert check(lim, unit="u1", client="c1") is None
    assert check(lim, unit="u2", client="c1") is None
    refusal = check(lim, unit="u3", client="c1")
    assert refusal is not None and refusal.bucket.name == "b"
    refusal = check(lim, unit="u1", client="c2")
    assert refusal is not None and refusal.bucket.name == "a"
    arm = limiter(clock, arm={"key": "arm", "requests": 1, "per_s": 60})
    assert check(arm, arm="canary") is None
    assert check(arm, arm="stable") is None
    assert check(arm, arm="canary", unit="other") is not None


def test_no_unit_skips_unit_limits() -> None:
    """A request without a unit id is not limited by a unit limit (the client limit applies)."""
    lim = limiter(Clock(), a={"key": "unit", "requests": 1, "per_s": 60})
    assert all(check(lim, unit=None) is None for _ in range(5))


def test_internal_cohort_exemption() -> None:
    """The internal cohort passes an exempting limit and is limited by a non-exempting one."""
    clock = Clock()
    lim = limiter(clock, a={"key": "unit", "requests": 1, "per_s": 60})
    assert all(check(lim, internal=True) is None for _ in range(5))
    strict = limiter(clock, a={"key": "unit", "requests": 1, "per_s": 60, "exempt_internal": False})
    assert check(strict, internal=True) is None
    assert check(strict, internal=True) is not None


def test_release_filter() -> None:
    """A limit naming releases applies to those releases only."""
    lim = limiter(Clock(), a={"key": "unit", "requests": 1, "per_s": 60, "releases": ["other"]})
    assert all(check(lim) is None for _ in range(3))
    assert lim.check("other", "stable", "r", "u1", "c") is None
    assert lim.check("other", "stable", "r", "u1", "c") is not None


def test_refusal_headers() -> None:
    """A 429 carries integer Retry-After and the draft-10 RateLimit-Policy / RateLimit fields."""
    clock = Clock()
    lim = limiter(clock, api={"key": "unit", "requests": 2, "per_s": 10})
    check(lim)
    check(lim)
    refusal = check(lim)
    assert refusal is not None
    assert refusal.wait_s == pytest.approx(5.0)
    assert dict(refusal.headers()) == {
        b"retry-after": b"5",
        b"ratelimit-policy": b'"api";q=2;w=10',
        b"ratelimit": b'"api";r=0;t=5',
    }
    clock.now += 4.9
    assert check(lim) is not None
    assert check(lim).retry_after_s == 1  # never 0: RFC 9110 delay-seconds, rounded up


def test_admitted_headers_report_the_tightest_limit() -> None:
    """Admitted responses get the RateLimit fields of the limit with the fewest requests left."""
    clock = Clock()
    lim = limiter(
        clock,
        wide={"key": "client", "requests": 100, "per_s": 1},
        tight={"key": "unit", "requests": 3, "per_s": 3},
    )
    check(lim)
    headers = dict(lim.headers("shop", "stable", "*/", "u1", "10.0.0.1"))
    assert headers[b"ratelimit"] == b'"tight";r=2;t=1'
    assert headers[b"ratelimit-policy"] == b'"tight";q=3;w=3'


def test_unchanged_limits_keep_state_across_documents() -> None:
    """A new document with the same limit keeps its counts; a changed limit starts afresh."""
    clock = Clock()
    spec = {"key": "unit", "requests": 1, "per_s": 60}
    lim = limiter(clock, a=spec)
    assert check(lim) is None
    lim.apply({"a": RateLimit(**spec)})
    assert check(lim) is not None
    lim.apply({"a": RateLimit(**{**spec, "requests": 2})})
    assert check(lim) is None


def test_key_table_is_bounded() -> None:
    """Past max_keys new keys share one overflow bucket; sweeping frees full buckets."""
    clock = Clock()
    lim = RateLimiter(clock, max_keys=3)
    lim.apply({"a": RateLimit(key="unit", requests=1, per_s=60)})
    for i in range(3):
        assert check(lim, unit=f"u{i}") is None
    assert check(lim, unit="u3") is None  # first overflow request
    assert check(lim, unit="u4") is not None  # the overflow bucket is shared
    bucket = lim.buckets["a"]
    assert set(bucket.tats) == {"u0", "u1", "u2", OVERFLOW_KEY}
    clock.now += 61
    assert lim.sweep() == 4
    assert not bucket.tats
    assert check(lim, unit="u5") is None


def test_demand_is_tracked_only_for_a_fleet_sync() -> None:
    """Without a fleet sync no per-key demand accumulates (bounded memory); once a sync takes
    it, attempts (admitted and refused) are counted per period."""
    lim = limiter(Clock(), a={"key": "unit", "requests": 1, "per_s": 60})
    for _ in range(3):
        check(lim)
    assert lim.take_demand() == {"a": {}}
    for _ in range(3):
        check(lim)
    assert lim.take_demand() == {"a": {"u1": 3}}
    assert lim.take_demand() == {"a": {}}


def test_full_table_sweeps_at_most_once_a_second() -> None:
    """A table full of live keys does not sweep on every new key; after a second it may."""
    clock = Clock()
    lim = RateLimiter(clock, max_keys=2)
    lim.apply({"a": RateLimit(key="unit", requests=1, per_s=1)})
    bucket = lim.buckets["a"]
    check(lim, unit="u0")
    check(lim, unit="u1")
    check(lim, unit="u2")  # full: swept (nothing free), goes to the overflow bucket
    first = bucket.next_sweep
    clock.now += 0.5
    check(lim, unit="u3")
    assert bucket.next_sweep == first
    clock.now += 0.6  # every entry is full again and a second has passed
    assert check(lim, unit="u4") is None
    assert "u4" in bucket.tats and "u0" not in bucket.tats


def test_share_divides_rate_and_keeps_burst_duration() -> None:
    """With 1/4 of the fleet an instance admits a quarter of the burst and of the rate."""
    clock = Clock()
    lim = limiter(clock, a={"key": "unit", "requests": 100, "per_s": 1})
    lim.set_shares(4, {})
    assert sum(check(lim) is None for _ in range(100)) == 25
    admitted = 0
    for _ in range(100):
        clock.now += 0.01
        admitted += sum(check(lim) is None for _ in range(4))
    assert admitted == 25  # 1 s at 25 requests per second
    lim.set_shares(4, {"a": {"u1": 1.0}})  # learned: this instance sees all of u1
    clock.now += 1.0
    assert sum(check(lim) is None for _ in range(200)) == 100


def test_tiny_share_still_admits() -> None:
    """A share below one request per burst admits one request per local interval, not none."""
    clock = Clock()
    lim = limiter(clock, a={"key": "unit", "requests": 1, "per_s": 1})
    lim.set_shares(4, {})
    assert check(lim) is None
    assert check(lim) is not None
    clock.now += 4.0
    assert check(lim) is None


# -- the fleet -----------------------------------------------------------------------------


class Fleet:
    """n limiters on one driven clock, each with its FleetSync to one real redis-server."""

    def __init__(self, url_port: int, n: int, spec: dict[str, Any]) -> None:
        self.clock = Clock(start=1_700_000_000.0)
        self.limiters = [limiter(self.clock, a=spec) for _ in range(n)]
        self.clients = [sync_client(f"redis://{LOCALHOST}:{url_port}/0") for _ in range(n)]
        self.syncs = [
            FleetSync(c, lim, instance_id=f"i{i}", clock=self.clock)
            for i, (c, lim) in enumerate(zip(self.clients, self.limiters, strict=True))
        ]

    async def second(
        self, offered_rps: int, route: list[int], units: tuple[str, ...] = ("u1",)
    ) -> int:
        """Drive one second of offered load in 10 ms steps; requests go to instances by
        `route` (cycled); then every instance syncs. Returns the admitted count."""
        admitted = 0
        per_step = offered_rps // 100
        n = 0
        for _ in range(100):
            self.clock.now += 0.01
            for _ in range(per_step):
                lim = self.limiters[route[n % len(route)]]
                unit = units[n % len(units)]
                admitted += lim.check("shop", "stable", "r", unit, "c") is None
                n += 1
        for sync in self.syncs:
            await sync.sync_once()
        return admitted

    async def aclose(self) -> None:
        for c in self.clients:
            await c.aclose()


def test_fleet_round_robin_and_sticky(tmp_path: Path) -> None:
    """Four instances behind a round-robin balancer admit 100 RPS of a 100 RPS limit within
    10 %; when the balancer turns sticky the one instance that sees the user learns the whole
    share within a few periods; Redis down, each keeps its last share and the fleet stays
    within the documented bound."""

    async def scenario(port: int, kill: Any) -> None:
        fleet = Fleet(port, 4, {"key": "unit", "requests": 100, "per_s": 1})
        try:
            for _ in range(3):  # learn: the live set and the per-key shares
                await fleet.second(400, [0, 1, 2, 3])
            assert all(s.instances == 4 for s in fleet.syncs)
            steady = [await fleet.second(400, [0, 1, 2, 3]) for _ in range(5)]
            assert all(90 <= a <= 110 for a in steady), steady
            # Sticky: all of u1 now goes to instance 0; within a few periods it gets ~all.
            sticky = [await fleet.second(400, [0]) for _ in range(6)]
            assert sticky[0] < 50, sticky  # it started at its old quarter share
            assert 90 <= sticky[-1] <= 110, sticky
            # Back to round robin, then Redis dies: shares stay, each instance limits alone.
            for _ in range(4):
                await fleet.second(400, [0, 1, 2, 3])
            kill()
            down = [await fleet.second(400, [0, 1, 2, 3]) for _ in range(3)]
            assert all(not s.connected for s in fleet.syncs)
            assert all(80 <= a <= 120 for a in down), down
            # A new key while Redis is down: 1/n of the last live count on each instance.
            # (Its first second also holds the burst: 100 at once, then 100 per second.)
            new_key = [await fleet.second(400, [0, 1, 2, 3], units=("fresh",)) for _ in range(2)]
            assert new_key[0] <= 210 and 90 <= new_key[1] <= 110, new_key
        finally:
            await fleet.aclose()

    with redis_server(tmp_path) as server:
        asyncio.run(asyncio.wait_for(scenario(server.port, server.kill9), 60))


def test_fleet_instances_leave_and_expire(tmp_path: Path) -> None:
    """An instance that leaves or stops syncing drops out of the live count, and the others'
    default share grows to match (2 live of 3 -> each admits half)."""

    async def scenario(port: int) -> None:
        fleet = Fleet(port, 3, {"key": "unit", "requests": 60, "per_s": 1, "burst": 1})
        try:
            for sync in fleet.syncs * 2:  # the first round: each sees those before it
                await sync.sync_once()
            assert [s.instances for s in fleet.syncs] == [3, 3, 3]
            await fleet.syncs[2].leave()
            for sync in fleet.syncs[:2]:
                await sync.sync_once()
            assert fleet.syncs[0].instances == 2
            # Silent for MEMBER_TTL_PERIODS: instance 1 stops syncing and expires.
            fleet.clock.now += 10
            await fleet.syncs[0].sync_once()
            assert fleet.syncs[0].instances == 1
            interval = fleet.limiters[0].buckets["a"].interval_s
            assert interval == pytest.approx(1 / 60)
        finally:
            await fleet.aclose()

    with redis_server(tmp_path) as server:
        asyncio.run(asyncio.wait_for(scenario(server.port), 60))
