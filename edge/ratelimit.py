"""Rate limiting at the edge: GCRA per key, local counting, fleet shares (issue #12 point 5).

GCRA (the generic cell rate algorithm, ITU-T I.371; what redis-cell and Envoy's
`local_ratelimit` token bucket amount to): a limit of `requests` per `per_s` has an emission
interval T = per_s / requests and a burst tolerance tau = burst * T. Each key keeps one float,
its theoretical arrival time (TAT). A request at `now` is admitted iff
`max(TAT, now) + T - tau <= now`, and then TAT moves on by T. One dict lookup and a few float
operations: no timer, no list of timestamps, no allocation for a known key.

Fleet design (no request waits on Redis):
* Every instance counts locally. Its *share* of a limit is a weight w: it admits `w * rate`
  for that key, so the fleet admits about `rate` when the weights add up to 1.
* `stores/ratesync.py` runs off the request path every `period_s`: it publishes each
  instance's demand (admitted + refused attempts) for its busy keys to Redis, reads the fleet's
  totals for an earlier, complete period, and sets w = my demand / fleet demand per busy key
  and w = 1 / live instances for every other key. A round-robin balancer thus gives each of n
  instances 1/n; a sticky balancer gives the one instance that sees a user all of that
  user's quota.
* The burst tolerance is a duration (burst / rate seconds) and stays the same under a share:
  an instance with w = 1/4 bursts a quarter of the requests at four times the interval.
* Redis down: the last weights stay in force, so each instance keeps limiting on its own
  share. The fleet then admits at most `rate * sum(last weights)` for a key seen before, and
  at most `rate * n_live / n_last` for a new key (n_last: live instances at the last sync);
  with the same instances and balancer as before the outage, that is `rate`.

Rules of this file: pure logic with an injected clock; nothing here does I/O. The pipeline
calls `RateLimiter.check` once per request (after `decide`, before `upstream_peer`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping

from flags.ratelimits import KEY_ARM, KEY_CLIENT, KEY_ROUTE, KEY_UNIT, RateLimit

# Keys one limit tracks before it folds new keys into a shared overflow bucket: bounded
# memory under key rotation (random unit ids, IPv6 addresses), and rotation buys nothing.
MAX_KEYS_PER_LIMIT = 100_000
OVERFLOW_KEY = "\x00overflow"
# A full table is swept on the request path at most this often: a table full of live keys
# must not cost a sweep per new key (the sync task sweeps off the request path anyway).
INLINE_SWEEP_EVERY_S = 1.0
# Float sums of intervals drift by ulps; a request this close to its slot is on time.
CLOCK_SLACK_S = 1e-9
RETRY_AFTER_MIN_S = 1  # RFC 9110 §10.2.3: delay-seconds is a non-negative integer

Clock = Callable[[], float]
_UNIT, _CLIENT, _ROUTE, _ARM = range(4)
_KINDS = {KEY_UNIT: _UNIT, KEY_CLIENT: _CLIENT, KEY_ROUTE: _ROUTE, KEY_ARM: _ARM}


class Bucket:
    """One limit's GCRA state over all its keys."""

    __slots__ = (
        "name",
        "limit",
        "base_interval_s",
        "interval_s",
        "tau_s",
        "tats",
        "shares",
        "demand",
        "max_keys",
        "policy_header",
        "track_demand",
        "next_sweep",
        "kind",
        "exempt_internal",
    )

    def __init__(self, name: str, limit: RateLimit, max_keys: int = MAX_KEYS_PER_LIMIT) -> None:
        self.name = name
        self.limit = limit
        self.base_interval_s = limit.per_s / limit.requests
        self.interval_s = self.base_interval_s  # the local share's interval for unknown keys
        self.tau_s = limit.burst_requests * self.base_interval_s
        self.tats: dict[str, float] = {}
        self.shares: dict[str, float] = {}  # key -> learned local interval (fleet sync)
        self.demand: dict[str, int] = {}  # attempts since the last sync (fleet sync)
        self.track_demand = False  # on once a fleet sync takes the demand
        self.max_keys = max_keys
        self.next_sweep = 0.0
        self.kind = _KINDS[limit.key]  # an int: the request path compares it, not a string
        self.exempt_internal = limit.exempt_internal
        # draft-ietf-httpapi-ratelimit-headers-10 §3: a String identifier, q quota, w window.
        self.policy_header = f'"{name}";q={limit.requests};w={limit.per_s}'.encode()

    def admit(self, key: str, now: float) -> float:
        """0.0 if the request is admitted (and counted), else the seconds until it would be."""
        tats = self.tats
        tat = tats.get(key)
        if tat is None:
            if len(tats) >= self.max_keys:
                if now >= self.next_sweep:
                    self.next_sweep = now + INLINE_SWEEP_EVERY_S
                    self.sweep(now)
                if len(tats) >= self.max_keys:
                    key = OVERFLOW_KEY
                    tat = tats.get(key)
            if tat is None:
                tat = now
        interval = self.shares.get(key, self.interval_s) if self.shares else self.interval_s
        if self.track_demand:
            demand = self.demand
            demand[key] = demand.get(key, 0) + 1
        if tat < now:
            tat = now
        new_tat = tat + interval
        # A share smaller than one request per burst still admits one request per interval.
        allow_at = new_tat - (self.tau_s if self.tau_s > interval else interval)
        if allow_at > now + CLOCK_SLACK_S:
            return allow_at - now
        tats[key] = new_tat
        return 0.0

    def remaining(self, key: str, now: float) -> tuple[int, int]:
        """(requests left in the burst now, whole seconds until the quota is full again)."""
        interval = self.shares.get(key, self.interval_s) if self.shares else self.interval_s
        tau = self.tau_s if self.tau_s > interval else interval
        tat = self.tats.get(key, now)
        if tat < now:
            tat = now
        left = max(0, math.floor((now + tau - tat) / interval + 1e-9))
        return left, max(0, math.ceil(tat - now))

    def sweep(self, now: float) -> int:
        """Forget keys whose bucket is full again (a full bucket is the same as no entry)."""
        stale = [k for k, tat in self.tats.items() if tat <= now]
        for k in stale:
            del self.tats[k]
        return len(stale)

    def take_demand(self) -> dict[str, int]:
        self.track_demand = True
        demand, self.demand = self.demand, {}
        return demand

    def set_share(self, instances: int, weights: Mapping[str, float]) -> None:
        """This instance's share: 1/instances for unknown keys, `weights` for busy ones."""
        base = self.base_interval_s
        self.interval_s = base * max(1, instances)
        self.shares = {k: base / w for k, w in weights.items() if 0.0 < w <= 1.0}


class Refusal:
    """Why a request was refused: the limit and how long until it would be admitted."""

    __slots__ = ("bucket", "wait_s")

    def __init__(self, bucket: Bucket, wait_s: float) -> None:
        self.bucket = bucket
        self.wait_s = wait_s

    @property
    def retry_after_s(self) -> int:
        return max(RETRY_AFTER_MIN_S, math.ceil(self.wait_s))

    def headers(self) -> list[tuple[bytes, bytes]]:
        """The 429's fields: Retry-After (RFC 6585 §4) and the draft's RateLimit pair."""
        after = str(self.retry_after_s).encode()
        return [
            (b"retry-after", after),
            (b"ratelimit-policy", self.bucket.policy_header),
            (b"ratelimit", b'"' + self.bucket.name.encode() + b'";r=0;t=' + after),
        ]


class RateLimiter:
    """Every limit of the current document, indexed by release for the request path."""

    def __init__(self, clock: Clock = time.monotonic, max_keys: int = MAX_KEYS_PER_LIMIT) -> None:
        self.clock = clock
        self.max_keys = max_keys
        self.buckets: dict[str, Bucket] = {}
        self._all: tuple[Bucket, ...] = ()
        self._by_release: dict[str, tuple[Bucket, ...]] = {}
        self.refused: dict[str, int] = {}  # limit name -> 429s (metrics)
        # Limiters sharing the limits without a fleet sync (`workers: N` on a file store):
        # each takes 1/N of every limit. A fleet sync (stores/ratesync.py) replaces this.
        self.local_share = 1

    def apply(self, limits: Mapping[str, RateLimit]) -> None:
        """Take a new document's limits; a limit whose definition is unchanged keeps its state."""
        buckets: dict[str, Bucket] = {}
        for name, limit in limits.items():
            old = self.buckets.get(name)
            if old is not None and old.limit == limit:
                buckets[name] = old
            else:
                buckets[name] = Bucket(name, limit, self.max_keys)
                if self.local_share > 1:
                    buckets[name].set_share(self.local_share, {})
        by_release: dict[str, list[Bucket]] = {}
        everywhere: list[Bucket] = []
        for bucket in buckets.values():
            if bucket.limit.releases:
                for release in bucket.limit.releases:
                    by_release.setdefault(release, []).append(bucket)
            else:
                everywhere.append(bucket)
        self.buckets = buckets
        self._all = tuple(everywhere)
        self._by_release = {r: tuple(everywhere + b) for r, b in by_release.items()}
        self.refused = {name: self.refused.get(name, 0) for name in buckets}

    def check(
        self,
        release: str,
        arm: str,
        route: str,
        unit: str | None,
        client: str,
        internal: bool = False,
    ) -> Refusal | None:
        """None if every limit that applies admits the request, else the first refusal.

        Limits are checked in document order and each admitted one counts the request, as
        nginx's `limit_req` zones do; a refused request is counted against the refusing limit
        only as demand."""
        buckets = self._by_release.get(release, self._all)
        if not buckets:
            return None
        now = self.clock()
        for bucket in buckets:
            if internal and bucket.exempt_internal:
                continue
            kind = bucket.kind
            if kind == _UNIT:
                if unit is None:
                    continue  # no unit: the client-address limit is the one that applies
                key = unit
            elif kind == _CLIENT:
                key = client
            elif kind == _ROUTE:
                key = route
            else:
                key = release + "/" + arm
            wait = bucket.admit(key, now)
            if wait > 0.0:
                self.refused[bucket.name] += 1
                return Refusal(bucket, wait)
        return None

    def headers(
        self, release: str, arm: str, route: str, unit: str | None, client: str
    ) -> list[tuple[bytes, bytes]]:
        """RateLimit-Policy / RateLimit for an admitted response: the tightest limit's state."""
        buckets = self._by_release.get(release, self._all)
        now = self.clock()
        best: tuple[int, int, Bucket] | None = None
        for bucket in buckets:
            kind = bucket.limit.key
            if kind == KEY_UNIT and unit is None:
                continue
            key = {
                KEY_UNIT: unit or "",
                KEY_CLIENT: client,
                KEY_ROUTE: route,
                KEY_ARM: release + "/" + arm,
            }[kind]
            left, reset = bucket.remaining(key, now)
            if best is None or left < best[0]:
                best = (left, reset, bucket)
        if best is None:
            return []
        left, reset, bucket = best
        value = f'"{bucket.name}";r={left};t={reset}'.encode()
        return [(b"ratelimit-policy", bucket.policy_header), (b"ratelimit", value)]

    def sweep(self) -> int:
        now = self.clock()
        return sum(bucket.sweep(now) for bucket in self.buckets.values())

    # The fleet-sync seam (stores/ratesync.py `ShareTarget`).
    def take_demand(self) -> dict[str, dict[str, int]]:
        return {name: bucket.take_demand() for name, bucket in self.buckets.items()}

    def limit_rates(self) -> dict[str, float]:
        """Requests per second of each limit (the sync picks busy keys by it)."""
        return {n: b.limit.requests / b.limit.per_s for n, b in self.buckets.items()}

    def set_shares(self, instances: int, weights: Mapping[str, Mapping[str, float]]) -> None:
        for name, bucket in self.buckets.items():
            bucket.set_share(instances, weights.get(name, {}))
