#!/usr/bin/env python3
"""µs per rate-limit check on the request path (edge/ratelimit.py `RateLimiter.check`).

    python benchmarks/ratelimit.py [--n 1000000] [--quick] [--seed 7]

Setups, each over the same pre-built mix of 65,536 requests (10,000 distinct unit ids,
1,000 client addresses), timed with `time.perf_counter_ns`, GC off, best of 3 passes, the
bare loop's cost subtracted ("net"):

* one unit limit, keys admitted (the common case),
* four limits (unit, client, route, arm) on every request,
* one unit limit over a fleet share with learned per-key weights (after a sync),
* one tight unit limit that refuses most requests (the 429 path builds a `Refusal`).

Target (issue #12): <= 1 µs per check with one limit (local). `--quick` runs 100,000 checks
per pass, for a sanity run on a busy machine.
"""

from __future__ import annotations

import argparse
import gc
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from edge.ratelimit import RateLimiter
from flags.document import load_model
from flags.ratelimits import RateLimit

TARGET_US = 1.0
MIX = 65_536


def limiter(specs: dict[str, dict[str, object]]) -> RateLimiter:
    lim = RateLimiter()
    lim.apply({name: load_model(RateLimit, spec) for name, spec in specs.items()})
    return lim


def timed(lim: RateLimiter | None, mix: list[tuple[str, str]], n: int) -> float:
    """ns per iteration of `n` checks (or of the bare loop when `lim` is None)."""
    rounds, rest = divmod(n, len(mix))
    work = mix * rounds + mix[:rest]
    gc.disable()
    try:
        start = time.perf_counter_ns()
        if lim is None:
            for unit, client in work:
                pass
        else:
            check = lim.check
            for unit, client in work:
                check("shop", "stable", "*/", unit, client, False)
        return (time.perf_counter_ns() - start) / n
    finally:
        gc.enable()


def best(lim_factory: object, mix: list[tuple[str, str]], n: int, passes: int = 3) -> float:
    results = []
    for _ in range(passes):
        lim = lim_factory() if callable(lim_factory) else None
        results.append(timed(lim, mix, n))
    return min(results)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1_000_000, help="checks per pass")
    parser.add_argument("--quick", action="store_true", help="100,000 checks per pass")
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    n = 100_000 if args.quick else args.n
    rng = random.Random(args.seed)
    units = [f"user-{rng.getrandbits(48):012x}" for _ in range(10_000)]
    clients = [
        f"10.{rng.randrange(256)}.{rng.randrange(256)}.{rng.randrange(256)}" for _ in range(1000)
    ]
    mix = [(rng.choice(units), rng.choice(clients)) for _ in range(MIX)]

    def fleet() -> RateLimiter:
        lim = limiter({"u": {"key": "unit", "requests": 1_000_000, "per_s": 1}})
        lim.take_demand()  # as the fleet sync does: per-key demand is counted from now on
        lim.set_shares(4, {"u": {u: 0.25 for u in units[:5000]}})
        return lim

    setups: list[tuple[str, object]] = [
        ("bare loop", None),
        (
            "1 unit limit, admitted",
            lambda: limiter({"u": {"key": "unit", "requests": 1_000_000, "per_s": 1}}),
        ),
        (
            "4 limits (unit, client, route, arm)",
            lambda: limiter(
                {
                    "u": {"key": "unit", "requests": 1_000_000, "per_s": 1},
                    "c": {"key": "client", "requests": 1_000_000, "per_s": 1},
                    "r": {"key": "route", "requests": 10_000_000, "per_s": 1},
                    "a": {"key": "arm", "requests": 10_000_000, "per_s": 1},
                }
            ),
        ),
        ("1 unit limit, fleet share learned", fleet),
        (
            "1 unit limit, mostly refused (429)",
            lambda: limiter({"u": {"key": "unit", "requests": 1, "per_s": 3600}}),
        ),
    ]
    print(f"rate-limit check, {n:,} checks per pass, best of 3, Python {sys.version.split()[0]}")
    print(f"{'setup':<40} {'ns/check':>10} {'net ns':>10}")
    bare = 0.0
    one_limit = 0.0
    for name, factory in setups:
        ns = best(factory, mix, n)
        if factory is None:
            bare = ns
        net = ns - bare
        if name.startswith("1 unit limit, admitted"):
            one_limit = net
        print(f"{name:<40} {ns:>10.0f} {net:>10.0f}")
    verdict = "meets" if one_limit / 1000 <= TARGET_US else "MISSES"
    print(
        f"one limit: {one_limit / 1000:.3f} µs net per check, {verdict} the {TARGET_US} µs target"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
