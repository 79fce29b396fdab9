#!/usr/bin/env python3
"""µs per routing decision over a 50-route / 50-release snapshot.

    python benchmarks/decide.py [--n 1000000] [--seed 7]

The decision API (flags/evaluate.py) is two steps, `snapshot.match(host, path)` then
`release.assign(unit, email)`, on canonical inputs. Two forms are timed over the same
pre-built, randomised request mix:

* request path: match + assign on canonical inputs (what edge/pipeline.py does; the edge
  canonicalises host and unit id once while it parses the request)
* from raw input: the same with `host.lower()` and `normalize_unit_id(unit)` inside the loop

plus the cost of the bare loop (subtracted in the "net" column). Target: <= 2 µs per decision.
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
from flags.evaluate import compile_snapshot
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
    # The request path gets the host already lower-cased/port-stripped and the unit normalised.
    norm = [(h.lower(), p, normalize_unit_id(u), e) for h, p, u, e in reqs]
    pool = len(reqs)
    reps, rest = divmod(n, pool)
    raw_seq = reqs * reps + reqs[:rest]
    norm_seq = norm * reps + norm[:rest]
    match = snap.match

    # Sanity: both forms agree, and the mix hits every kind of decision.
    reasons: Counter[str] = Counter()
    arms: Counter[str] = Counter()
    for (h, p, u, e), (nh, np_, nu, ne) in zip(reqs, norm):
        rel = match(h.lower(), p)
        unit = normalize_unit_id(u) if u is not None else None
        d1 = rel.assign(unit, e) if rel is not None else None
        rel2 = match(nh, np_)
        d2 = rel2.assign(nu, ne) if rel2 is not None else None
        if d1 != d2:
            raise SystemExit(f"raw and canonical forms disagree for {(h, p, u, e)}: {d1} vs {d2}")
        reasons[d1.reason if d1 is not None else "DEFAULT (no route)"] += 1
        arms[d1.arm if d1 is not None else "stable"] += 1

    def loop_empty4(k: int) -> None:
        for h, p, u, e in norm_seq:
            pass

    def loop_path(k: int) -> None:
        for h, p, u, e in norm_seq:
            rel = match(h, p)
            if rel is not None:
                rel.assign(u, e)

    def loop_raw(k: int) -> None:
        for h, p, u, e in raw_seq:
            rel = match(h.lower(), p)
            if rel is not None:
                rel.assign(normalize_unit_id(u) if u is not None else None, e)

    t_start = time.perf_counter()
    base4 = timed(loop_empty4, n, 2) / n / 1000
    rows = [
        ("snapshot.match(host, path).assign(unit)", timed(loop_path, n) / n / 1000, base4),
        (
            "the same from raw input (lower(), normalize_unit_id)",
            timed(loop_raw, n) / n / 1000,
            base4,
        ),
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
    for name, us, base in rows:
        net = us - base
        ok = us <= TARGET_US
        print(
            f"{name:<54} {us:>12.3f} {net:>12.3f}  {'≤ ' + format(TARGET_US, 'g'):>7}  {'PASS' if ok else 'MISS'}"
        )
    print(f"{'(bare loop: 4-tuple unpack)':<54} {base4:>12.3f}")
    print()
    worst = max(us for _, us, _ in rows)
    print(
        f"routing decision: {'PASS' if worst <= TARGET_US else 'MISS'} "
        f"(worst form {worst:.3f} µs vs target ≤ {TARGET_US:g} µs)"
    )
    print(f"timed in {elapsed:.1f} s")
    return 0 if worst <= TARGET_US else 1


if __name__ == "__main__":
    sys.exit(main())
