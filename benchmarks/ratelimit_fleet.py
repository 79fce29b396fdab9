#!/usr/bin/env python3
"""Fleet rate-limit accuracy: N limiter instances sharing one limit through a real Redis.

    python benchmarks/ratelimit_fleet.py [--instances 4] [--rate 100] [--offered 400]
                                         [--seconds 20] [--down-seconds 10] [--quick]

N `RateLimiter`s (edge/ratelimit.py), each with its own `FleetSync` (stores/ratesync.py,
period 1 s) to one `redis-server` started here on 127.0.0.1, run in one process on the real
clock. A driver offers `--offered` requests per second of one unit, round-robin over the
instances (issue #12's setup: 4 instances, 100 RPS per unit; `--sticky` pins the unit to one
instance after a third of the run), for `--seconds`; then Redis is
killed (SIGKILL) and the load goes on for `--down-seconds`. Printed per second: the fleet's
admitted requests; then the admitted rate after the learning period, while Redis was up and
after it died, against the targets (within ±10 % of the limit up; within the bound of
edge/ratelimit.py's docstring down, which for an unchanged fleet and balancer is the limit).

This measures the limiter and the sync without the proxy (the wiring into the request path is
a later change); `benchmarks/proxy.py` measures the proxy.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from tempfile import TemporaryDirectory

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from edge.ratelimit import RateLimiter
from flags.document import load_model
from flags.ratelimits import RateLimit
from stores.ratesync import FleetSync, sync_client

LOOPBACK = "127.0.0.1"
LEARN_S = 3  # periods before the shares have settled (live set, then per-key weights)
TOLERANCE = 0.10


def free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


def start_redis(port: int, workdir: str) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(
        [
            "redis-server",
            "--port",
            str(port),
            "--bind",
            LOOPBACK,
            "--save",
            "",
            "--appendonly",
            "no",
        ],
        cwd=workdir,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    for _ in range(200):
        try:
            with socket.create_connection((LOOPBACK, port), timeout=0.1):
                return proc
        except OSError:
            time.sleep(0.025)
    proc.kill()
    raise RuntimeError("redis-server did not start")


async def run(args: argparse.Namespace, port: int, redis: subprocess.Popen[bytes]) -> int:
    spec = {"key": "unit", "requests": args.rate, "per_s": 1}
    limiters = []
    for _ in range(args.instances):
        lim = RateLimiter()
        lim.apply({"per-user": load_model(RateLimit, spec)})
        limiters.append(lim)
    clients = [sync_client(f"redis://{LOOPBACK}:{port}/0") for _ in limiters]
    syncs = [
        FleetSync(c, lim, instance_id=f"bench-{i}")
        for i, (c, lim) in enumerate(zip(clients, limiters))
    ]
    tasks = [asyncio.create_task(s.run()) for s in syncs]
    step_s = 0.01
    per_step = args.offered * step_s
    due = 0.0
    n = 0
    per_second: list[tuple[bool, int]] = []
    try:
        for second in range(args.seconds + args.down_seconds):
            if second == args.seconds:
                redis.kill()
                redis.wait()
                print("-- redis-server killed")
            admitted = 0
            start = time.monotonic()
            for step in range(int(1 / step_s)):
                due += per_step
                while due >= 1:
                    due -= 1
                    # --sticky: a balancer that pins the unit, after the first third of the run.
                    pinned = args.sticky and second >= args.seconds // 3
                    lim = limiters[0 if pinned else n % len(limiters)]
                    n += 1
                    admitted += lim.check("shop", "stable", "*/", "unit-1", "10.0.0.1") is None
                await asyncio.sleep(max(0.0, start + (step + 1) * step_s - time.monotonic()))
            up = second < args.seconds
            per_second.append((up, admitted))
            print(
                f"{second + 1:4d} s  admitted {admitted:5d}  redis {'up' if up else 'DOWN'}",
                flush=True,
            )
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for c in clients:
            await c.aclose()
    # Settled: LEARN_S periods after the start, or after the balancer turned sticky.
    settled = LEARN_S + (args.seconds // 3 if args.sticky else 0)
    print(f"(averages from second {settled + 1}: the shares need {LEARN_S} periods to settle)")
    up_rates = [a for up, a in per_second[settled : args.seconds] if up]
    down_rates = [a for up, a in per_second if not up]
    failures = 0
    for label, rates in (("Redis up", up_rates), ("Redis down", down_rates)):
        if not rates:
            continue
        mean = sum(rates) / len(rates)
        ok = abs(mean - args.rate) <= TOLERANCE * args.rate
        failures += not ok
        print(
            f"{label}: {mean:.1f} requests/s admitted on average (limit {args.rate}, "
            f"min {min(rates)}, max {max(rates)}), {'within' if ok else 'OUTSIDE'} ±{TOLERANCE:.0%}"
        )
    return 1 if failures else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--instances", type=int, default=4)
    parser.add_argument(
        "--rate", type=int, default=100, help="the limit, requests per second per unit"
    )
    parser.add_argument("--offered", type=int, default=400, help="requests per second offered")
    parser.add_argument("--seconds", type=int, default=20, help="seconds with Redis up")
    parser.add_argument(
        "--down-seconds", type=int, default=10, help="seconds after Redis is killed"
    )
    parser.add_argument("--quick", action="store_true", help="8 s up, 4 s down")
    parser.add_argument(
        "--sticky", action="store_true", help="after a third of the run, all load on instance 0"
    )
    args = parser.parse_args()
    if args.quick:
        args.seconds, args.down_seconds = 8, 4
    if shutil.which("redis-server") is None:
        print("ratelimit_fleet: needs redis-server (Debian: apt-get install redis-server)")
        return 2
    with TemporaryDirectory(prefix="turnout-rl-") as tmp:
        port = free_port()
        redis = start_redis(port, tmp)
        try:
            return asyncio.run(run(args, port, redis))
        finally:
            if redis.poll() is None:
                redis.kill()
                redis.wait()


if __name__ == "__main__":
    raise SystemExit(main())
