"""Fleet rate-limit sync: each instance's share of every limit, learned through Redis.

The request path never waits on this (edge/ratelimit.py counts locally); this task runs beside
it every `period_s` and, in one pipelined round trip:

1. heartbeats the instance into a sorted set of live instances (score: wall-clock time) and
   drops members silent for `MEMBER_TTL_PERIODS` periods: `n` = live instances;
2. adds this instance's demand (admitted + refused attempts) for its busy keys to a per-period
   hash `rl:{limit}:{period index}`, which expires after a few periods;
3. reads the fleet's totals for the keys it published two periods ago (a period every
   instance has finished writing), so its weight for such a key is my demand / fleet demand.

Period indices come from each instance's wall clock, so the fleet's clocks must agree to
within a period (reading two periods back leaves one period of slack; NTP does far better).
Beyond that, a skewed instance reads totals its peers have not finished writing, or writes
after they have read, and weights come out too high: the fleet admits more than the limit
until the clocks agree.

It then hands `n` and the weights to the limiter (`ShareTarget.set_shares`). When Redis is
unreachable nothing changes: the last shares stay in force and each instance goes on limiting
on its own share (the bound is in edge/ratelimit.py's docstring). A busy key is one whose
demand in a period reached `BUSY_FRACTION` of what one instance may admit of it: the keys far
from their limit need no fleet view, which keeps a sync's size bounded (`MAX_SYNC_KEYS`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
import uuid
from collections.abc import Callable, Mapping
from typing import Any, Protocol

import redis.asyncio as aioredis
from redis import exceptions as rex
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

log = logging.getLogger("turnout.ratesync")

DEFAULT_PERIOD_S = 1.0
MEMBER_TTL_PERIODS = 3
HISTORY_PERIODS = 2  # read totals this many periods back: every instance has written them
BUSY_FRACTION = 0.1
MAX_SYNC_KEYS = 1000  # per limit and period
KEY_PREFIX = "turnout:rl:"


def sync_client(url: str, timeout_s: float = DEFAULT_PERIOD_S / 2) -> aioredis.Redis:
    """A client for the sync: short timeouts and no retries, so a dead Redis costs one
    failed round trip per period, never a backoff that stalls the loop."""
    return aioredis.Redis.from_url(
        url,
        socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s,
        retry=Retry(NoBackoff(), 0),
    )


class ShareTarget(Protocol):
    """What the sync needs of a limiter (edge/ratelimit.py `RateLimiter`)."""

    def take_demand(self) -> dict[str, dict[str, int]]: ...

    def limit_rates(self) -> dict[str, float]: ...

    def set_shares(self, instances: int, weights: Mapping[str, Mapping[str, float]]) -> None: ...

    def sweep(self) -> int: ...


class FleetSync:
    """Periodic share sync of one instance's limiter through one Redis."""

    def __init__(
        self,
        client: aioredis.Redis,
        target: ShareTarget,
        *,
        period_s: float = DEFAULT_PERIOD_S,
        instance_id: str | None = None,
        clock: Callable[[], float] = time.time,
        prefix: str = KEY_PREFIX,
    ) -> None:
        self.client = client
        self.target = target
        self.period_s = period_s
        self.instance_id = instance_id or uuid.uuid4().hex
        self.clock = clock
        self.prefix = prefix
        self.instances = 1
        self.connected = False
        self.failures = 0
        # period index -> limit -> key -> demand this instance published under that index
        self._published: dict[int, dict[str, dict[str, int]]] = {}

    def _hash(self, limit: str, index: int) -> str:
        return f"{self.prefix}{limit}:{index}"

    def _busy(self, demand: dict[str, dict[str, int]]) -> dict[str, dict[str, int]]:
        rates = self.target.limit_rates()
        out: dict[str, dict[str, int]] = {}
        for limit, keys in demand.items():
            per_instance = rates.get(limit, 0.0) * self.period_s / max(1, self.instances)
            floor = max(1.0, BUSY_FRACTION * per_instance)
            busy = [(n, k) for k, n in keys.items() if n >= floor]
            if len(busy) > MAX_SYNC_KEYS:
                busy.sort(reverse=True)
                busy = busy[:MAX_SYNC_KEYS]
            if busy:
                out[limit] = {k: n for n, k in busy}
        return out

    async def sync_once(self) -> bool:
        """One round trip; True if Redis answered (shares updated), False if not."""
        now = self.clock()
        index = math.floor(now / self.period_s)
        mine = self._busy(self.target.take_demand())
        past_index = index - HISTORY_PERIODS
        past = self._published.get(past_index, {})
        members = self.prefix + "members"
        ttl_s = max(1, math.ceil(self.period_s * (HISTORY_PERIODS + 2)))
        pipe = self.client.pipeline(transaction=False)
        pipe.zadd(members, {self.instance_id: now})
        pipe.zremrangebyscore(members, "-inf", now - MEMBER_TTL_PERIODS * self.period_s)
        pipe.zcard(members)
        for limit, keys in mine.items():
            name = self._hash(limit, index)
            for key, n in keys.items():
                pipe.hincrby(name, key, n)
            pipe.expire(name, ttl_s)
        reads = [(limit, list(keys)) for limit, keys in past.items()]
        for limit, key_list in reads:
            pipe.hmget(self._hash(limit, past_index), key_list)
        try:
            async with asyncio.timeout(self.period_s):
                results: list[Any] = await pipe.execute()
        except (rex.RedisError, OSError, TimeoutError) as exc:
            # Keep the last shares: each instance limits on its own share (module docstring).
            self.failures += 1
            if self.connected:
                log.warning("rate-limit sync: Redis unavailable, keeping local shares: %s", exc)
            self.connected = False
            self._remember(index, mine)
            return False
        self.connected = True
        self.instances = max(1, int(results[2]))
        weights: dict[str, dict[str, float]] = {}
        totals = results[len(results) - len(reads) :] if reads else []
        for (limit, key_list), values in zip(reads, totals, strict=True):
            published = past[limit]
            for key, raw in zip(key_list, values, strict=True):
                total = int(raw) if raw is not None else 0
                my = published[key]
                if total >= my > 0:
                    weights.setdefault(limit, {})[key] = my / total
        self.target.set_shares(self.instances, weights)
        self._remember(index, mine)
        return True

    def _remember(self, index: int, mine: dict[str, dict[str, int]]) -> None:
        if mine:
            merged = self._published.setdefault(index, {})
            for limit, keys in mine.items():
                into = merged.setdefault(limit, {})
                for key, n in keys.items():
                    into[key] = into.get(key, 0) + n
        for old in [i for i in self._published if i < index - HISTORY_PERIODS]:
            del self._published[old]

    async def run(self) -> None:
        """Sync every period until cancelled; also sweeps full buckets out of memory."""
        while True:
            try:
                await self.sync_once()
                self.target.sweep()
            except Exception:  # a bug here must never stop limiting; it is logged
                log.exception("rate-limit sync failed")
            await asyncio.sleep(self.period_s)

    async def leave(self) -> None:
        """Drop this instance from the live set (graceful shutdown), best effort."""
        with contextlib.suppress(rex.RedisError, OSError, TimeoutError):
            await self.client.zrem(self.prefix + "members", self.instance_id)
