"""Fleet-wide arm statistics: each instance publishes its window counts, the guard sums them.

Rules of this file:
* One small write per instance per second: `SET {prefix}:armstats:{instance} <json> PX ttl`
  (and `SADD` of the instance to the index set, in the same pipeline).
  An instance that stops (or loses Redis) simply expires, so a dead instance's traffic leaves
  the fleet's sums within `ttl_ms` and nothing needs cleaning up.
* Reading is `SMEMBERS {prefix}:armstats-instances` + `MGET` (never a SCAN over the store's
  keys); members whose key expired are removed from the set as they are found.
* Every Redis failure is a `StoreUnavailable` (the store's own error type); the caller then
  judges its own traffic alone. Entries that do not parse are skipped, never trusted.
* The payload is JSON (`orjson`): {"instance": id, "releases": {name: {"h": {"2": [canary,
  stable], ...}, "phase": [phase_key, canary, stable]}}}, each arm a list of integers
  (`flags.guard.ArmCounts.to_list`).
"""

from __future__ import annotations

import asyncio
from typing import Any, Protocol

import orjson

from flags.errors import StoreUnavailable

DEFAULT_TTL_MS = 3000
FLEET_CALL_TIMEOUT_S = 0.5


class FleetStats(Protocol):
    """Where instances share their counts."""

    async def publish(self, instance: str, payload: dict[str, Any]) -> None: ...

    async def gather(self) -> list[dict[str, Any]]: ...


class RedisFleetStats:
    """`FleetStats` on the same Redis as the store (its connection pool)."""

    def __init__(self, client: Any, prefix: str, *, ttl_ms: int = DEFAULT_TTL_MS) -> None:
        self.client = client
        self.prefix = f"{prefix}:armstats:"
        self.index = f"{prefix}:armstats-instances"
        self.ttl_ms = ttl_ms

    async def publish(self, instance: str, payload: dict[str, Any]) -> None:
        data = orjson.dumps(payload)
        try:
            async with asyncio.timeout(FLEET_CALL_TIMEOUT_S):
                pipe = self.client.pipeline(transaction=False)
                pipe.set(self.prefix + instance, data, px=self.ttl_ms)
                pipe.sadd(self.index, instance)
                await pipe.execute()
        except Exception as exc:  # noqa: BLE001 - redis errors, mapped at this boundary
            raise StoreUnavailable(f"fleet stats publish: {exc!r}") from None

    async def gather(self) -> list[dict[str, Any]]:
        try:
            async with asyncio.timeout(FLEET_CALL_TIMEOUT_S):
                members = sorted(
                    m.decode() if isinstance(m, bytes) else str(m)
                    for m in await self.client.smembers(self.index)
                )
                values = (
                    await self.client.mget([self.prefix + m for m in members]) if members else []
                )
                gone = [m for m, raw in zip(members, values, strict=True) if raw is None]
                if gone:  # expired: that instance stopped publishing (it re-adds itself if back)
                    await self.client.srem(self.index, *gone)
        except Exception as exc:  # noqa: BLE001 - redis errors, mapped at this boundary
            raise StoreUnavailable(f"fleet stats read: {exc!r}") from None
        out: list[dict[str, Any]] = []
        for raw in values:
            if raw is None:
                continue
            try:
                entry = orjson.loads(raw)
            except orjson.JSONDecodeError:
                continue
            if isinstance(entry, dict) and isinstance(entry.get("releases"), dict):
                out.append(entry)
        return out


def fleet_stats_for(store: Any, *, ttl_ms: int = DEFAULT_TTL_MS) -> FleetStats | None:
    """The fleet channel of a store: Redis shares counts; the file store judges alone."""
    client = getattr(store, "client", None)
    prefix = getattr(store, "prefix", None)
    if client is None or not isinstance(prefix, str):
        return None
    return RedisFleetStats(client, prefix, ttl_ms=ttl_ms)
