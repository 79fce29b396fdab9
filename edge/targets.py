"""Upstream targets: for every release, a stable and a canary target, each a round-robin over
keep-alive pools. Pools are keyed by upstream URL and outlive snapshots, so a config change
does not drop warm connections; the two arms never share a pool (a slow canary cannot exhaust
stable's connections, HARDENING.md §2.14 "bulkhead")."""

from __future__ import annotations

import ssl
from collections.abc import Iterable
from urllib.parse import urlsplit

from edge.upstream import Timeouts, UpstreamPool
from flags.evaluate import ARM_CANARY, ARM_STABLE, Snapshot


class Target:
    """One arm of one release: where its requests go and the headers that say so."""

    __slots__ = ("release", "arm", "pools", "upstream_headers", "_next", "log_label")

    def __init__(
        self, release: str, arm: str, cohort: str, pools: tuple[UpstreamPool, ...]
    ) -> None:
        self.release = release
        self.arm = arm
        self.log_label = (release, arm)  # what the access log records (edge/accesslog.py)
        self.pools = pools
        head = (
            b"x-turnout-arm: "
            + arm.encode()
            + b"\r\nx-turnout-release: "
            + release.encode()
            + b"\r\n"
        )
        if cohort:
            head += b"x-turnout-cohort: " + cohort.encode() + b"\r\n"
        self.upstream_headers = head
        self._next = 0

    def pick(self) -> UpstreamPool:
        pools = self.pools
        i = self._next
        self._next = (i + 1) % len(pools)
        return pools[i]


class PoolSet:
    """All upstream pools of the process, created once per (URL, arm)."""

    def __init__(self, timeouts: Timeouts, max_connections: int) -> None:
        self.timeouts = timeouts
        self.max_connections = max_connections
        self.pools: dict[tuple[str, str], UpstreamPool] = {}
        self._tls: ssl.SSLContext | None = None

    def pool(self, url: str, arm: str) -> UpstreamPool:
        key = (url.rstrip("/"), arm)
        pool = self.pools.get(key)
        if pool is None:
            parts = urlsplit(url)
            host = parts.hostname or "127.0.0.1"
            tls = parts.scheme == "https"
            port = parts.port or (443 if tls else 80)
            kwargs: dict[str, object] = {}
            if tls:
                if self._tls is None:
                    self._tls = ssl.create_default_context()
                kwargs["ssl"] = self._tls
            pool = UpstreamPool(
                host,
                port,
                max_connections=self.max_connections,
                timeouts=self.timeouts,
                **kwargs,  # type: ignore[arg-type]
            )
            self.pools[key] = pool
        return pool

    def targets(self, snapshot: Snapshot) -> dict[str, tuple[Target, Target]]:
        out: dict[str, tuple[Target, Target]] = {}
        for name, rel in snapshot.releases.items():
            stable = Target(
                name, ARM_STABLE, rel.cohort, tuple(self.pool(u, ARM_STABLE) for u in rel.stable)
            )
            canary = Target(
                name, ARM_CANARY, rel.cohort, tuple(self.pool(u, ARM_CANARY) for u in rel.canary)
            )
            out[name] = (stable, canary)
        return out

    def unused(self, live: Iterable[tuple[Target, Target]]) -> list[UpstreamPool]:
        """Pools no target refers to any more (closed by the caller)."""
        used = {id(p) for pair in live for t in pair for p in t.pools}
        stale = [key for key, pool in self.pools.items() if id(pool) not in used]
        return [self.pools.pop(key) for key in stale]

    async def aclose(self) -> None:
        for pool in self.pools.values():
            await pool.aclose()
        self.pools.clear()
