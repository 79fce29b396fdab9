#!/usr/bin/env python3
"""µs per routing decision over a 50-route / 50-release snapshot.

    python benchmarks/decide.py [--n 1000000] [--seed 7]

Two forms are timed over the same pre-built, randomised request mix:

* public:       flags.evaluate.decide(snapshot, Facts(...))   (Facts pre-built, as the API takes them)
* request path: snapshot.match(host, path).assign(unit, email) (what edge/pipeline.py does)

plus the cost of the bare loop (subtracted in the "net" column) and, for reference, the
public form with the Facts object built inside the timed loop. Target: <= 2 µs per decision.
"""

from __future__ import annotations

import argparse
import gc
import random
import string
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from flags.document import load_document
from flags.evaluate import Facts, compile_snapshot, decide
from flags.hashing import normalize_unit_id

TARGET_US = 2.0
STAGES = ("off", "internal", "beta", "open", "ga", "custom")


def build_document(rng: random.Random) -> dict:
    """50 releases, 50 routes: 20 hosts x 2 prefixes + 10 wildcard prefixes, mixed stages."""
    releases: dict[str, dict] = {}
    for i in range(50):
        stage = STAGES[i % len(STAGES)]
        rel: dict = {
            "stable": [f"http://10.0.{i}.1:8080", f"http://10.0.{i}.2:8080"],
            "canary": [f"http://10.1.{i}.1:8080"],
            "stage": stage,
        }
        if stage == "custom":
            rel["percent"] = round(rng.uniform(0.5, 99.5), 3)
        if i % 3 == 0 or stage == "internal":  # allow-lists on a third of the releases
            rel["internal"] = {
                "unit_ids": [f"staff-{i}-{k}" for k in range(20)],
                "email_domains": ["example.com", f"team{i}.example.org"],
            }
        if i % 7 == 0:
            rel["salt"] = f"salt-{i}"
        releases[f"rel-{i:02d}"] = rel
    routes = []
    n = 0
    for h in range(20):
        for prefix in ("/", f"/svc{h}/"):
            routes.append(
                {"host": f"app{h}.example.com", "path_prefix": prefix, "release": f"rel-{n:02d}"}
            )
            n += 1
    for w in range(10):
        prefix = "/" if w == 0 else f"/shared/{w}/v{w % 3}/"
        routes.append({"host": "*", "path_prefix": prefix, "release": f"rel-{n:02d}"})
        n += 1
    assert n == 50
    return {"releases": releases, "routes": routes}


def build_requests(rng: random.Random, count: int) -> list[tuple[str, str, str, str | None]]:
    """(host, path, unit id, email): mostly routed hosts, some unknown hosts (wildcard table)."""
    alphabet = string.ascii_letters + string.digits
    out = []
    for _ in range(count):
        r = rng.random()
        h = rng.randrange(20)
        if r < 0.4:
            host, path = f"app{h}.example.com", f"/svc{h}/items/{rng.randrange(10**6)}"
        elif r < 0.7:
            host, path = f"app{h}.example.com", f"/page/{rng.randrange(1000)}"
        elif r < 0.9:
            w = rng.randrange(1, 10)
            host, path = f"other{h}.example.net", f"/shared/{w}/v{w % 3}/thing"
        else:
            host, path = "unknown.example.net", "/index.html"
        if rng.random() < 0.02:
            unit = f"staff-{rng.randrange(50)}-{rng.randrange(20)}"
        else:
            unit = "".join(rng.choices(alphabet, k=16))
        email = f"u{rng.randrange(1000)}@example.com" if rng.random() < 0.05 else None
        out.append((host, path, unit, email))
    return out


def timed(fn, n: int, passes: int = 3) -> float:
    """Nanoseconds for one call of fn(n) with the GC off (best of `passes`, to drop noise)."""
    best = None
    for _ in range(passes):
        gc.collect()
        gc.disable()
        t0 = time.perf_counter_ns()
        fn(n)
        dt = time.perf_counter_ns() - t0
        gc.enable()
        best = dt if best is None else min(best, dt)
    return float(best)


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--n", type=int, default=1_000_000, help="decisions per timed pass (default 1,000,000)"
    )
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument(
        "--pool", type=int, default=65_536, help="distinct pre-built requests cycled through"
    )
    args = ap.parse_args()
    n = max(args.n, 1000)

    rng = random.Random(args.seed)
    doc = load_document(build_document(rng))
    snap = compile_snapshot(doc)
    reqs = build_requests(rng, args.pool)
    facts = [Facts(unit_id=u, host=h, path=p, email=e) for h, p, u, e in reqs]
    # The request path gets the host already lower-cased/port-stripped and the unit normalised.
    norm = [(h, p, normalize_unit_id(u), e) for h, p, u, e in reqs]
    pool = len(reqs)
    reps, rest = divmod(n, pool)
    facts_seq = facts * reps + facts[:rest]
    norm_seq = norm * reps + norm[:rest]
    match = snap.match

    # Sanity: both forms agree, and the mix hits every kind of decision.
    reasons: Counter[str] = Counter()
    arms: Counter[str] = Counter()
    for f, (h, p, u, e) in zip(facts, norm):
        d1 = decide(snap, f)
        rel = match(h, p)
        d2 = rel.assign(u, e) if rel is not None else None
        if d2 is not None and d1 != d2:
            raise SystemExit(f"decide() and match().assign() disagree for {f}: {d1} vs {d2}")
        reasons[d1.reason] += 1
        arms[d1.arm] += 1

    def loop_empty(k: int) -> None:
        for f in facts_seq:
            pass

    def loop_public(k: int) -> None:
        for f in facts_seq:
            decide(snap, f)

    def loop_public_build(k: int) -> None:
        for h, p, u, e in norm_seq:
            decide(snap, Facts(u, h, p, e))

    def loop_empty4(k: int) -> None:
        for h, p, u, e in norm_seq:
            pass

    def loop_facts_only(k: int) -> None:
        for h, p, u, e in norm_seq:
            Facts(u, h, p, e)

    def loop_path(k: int) -> None:
        for h, p, u, e in norm_seq:
            rel = match(h, p)
            if rel is not None:
                rel.assign(u, e)

    t_start = time.perf_counter()
    base1 = timed(loop_empty, n, 2) / n / 1000
    base4 = timed(loop_empty4, n, 2) / n / 1000
    facts_us = timed(loop_facts_only, n, 2) / n / 1000 - base4
    rows = [
        ("decide(snapshot, Facts) [Facts pre-built]", timed(loop_public, n) / n / 1000, base1),
        (
            "decide(snapshot, Facts(...)) [Facts built per call]",
            timed(loop_public_build, n) / n / 1000,
            base4,
        ),
        ("snapshot.match(host, path).assign(unit)", timed(loop_path, n) / n / 1000, base4),
    ]
    elapsed = time.perf_counter() - t_start

    print(f"python {sys.version.split()[0]} ({sys.executable})")
    print(
        f"snapshot: {len(doc.releases)} releases, {len(doc.routes)} routes "
        f"({len(snap.hosts)} exact hosts + {len(snap.wildcard.by_prefix) if snap.wildcard else 0} wildcard prefixes)"
    )
    print(
        f"mix: {pool:,} distinct requests cycled; {n:,} decisions per pass, best of 3 passes, GC off, "
        f"perf_counter_ns"
    )
    print("reasons: " + ", ".join(f"{k} {v / pool:.1%}" for k, v in sorted(reasons.items())))
    print("arms:    " + ", ".join(f"{k} {v / pool:.1%}" for k, v in sorted(arms.items())))
    print()
    print(f"{'form':<54} {'µs/decision':>12} {'net of loop':>12}  {'target':>7}  result")
    worst = 0.0
    for name, us, base in rows:
        net = us - base
        ok = us <= TARGET_US
        worst = max(worst, us)
        print(
            f"{name:<54} {us:>12.3f} {net:>12.3f}  {'≤ ' + format(TARGET_US, 'g'):>7}  {'PASS' if ok else 'MISS'}"
        )
    print(f"{'(bare loop: 1-tuple / 4-tuple unpack)':<54} {base1:>12.3f} {base4:>12.3f}")
    print(f"{'(Facts(...) construction alone, frozen dataclass)':<54} {facts_us:>12.3f}")
    print()
    decision_worst = max(rows[0][1], rows[2][1])
    print(
        f"routing decision: {'PASS' if decision_worst <= TARGET_US else 'MISS'} "
        f"(worst of decide() and match().assign(): {decision_worst:.3f} µs vs target ≤ {TARGET_US:g} µs)"
    )
    print(
        f"public API incl. building Facts per call: {'PASS' if rows[1][1] <= TARGET_US else 'MISS'} "
        f"({rows[1][1]:.3f} µs; of which Facts(...) {facts_us:.3f} µs)"
    )
    print(f"timed in {elapsed:.1f} s")
    return 0 if decision_worst <= TARGET_US else 1


if __name__ == "__main__":
    sys.exit(main())
