#!/usr/bin/env python3
"""1,000 clients at once (issue #12, the launch plans' load test): `wrk -t2 -c1000` through
Turnout on one worker and through nginx, in one run, socket errors by kind.

    .venv/bin/python benchmarks/burst.py [--connections 1000] [--duration 60] [--quick]

Layout: benchmarks/proxy.py's setups B (nginx, one worker, `split_clients` 10 %) and C
(`turnout serve`, one process), the same upstream nginx; the proxy alone on core 1, wrk and
the upstream on core 0. Each proxy gets one unmeasured 5 s warm-up at the same connection
count, then the measured run. wrk opens all its connections at the start, so a listen queue
that drains slowly shows up as connect errors and timeouts.

Printed per proxy: RPS, p50 / p99, and wrk's socket errors (connect, read, write, timeout)
and non-2xx answers; then Turnout's RPS as a ratio of nginx's. Target (issue #12): 0 socket
errors through Turnout, connect timeouts included. Raises RLIMIT_NOFILE to the hard limit
(wrk inherits it).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import resource
import signal
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.proxy import LOOPBACK, Bench  # noqa: E402


def wrk(bench: Bench, port: int, conns: int, duration: float) -> dict[str, float]:
    argv = [
        "taskset",
        "-c",
        "0",
        "wrk",
        "-t2",
        f"-c{conns}",
        f"-d{duration:g}s",
        "--latency",
        "--timeout",
        "5s",
        "-s",
        str(bench.lua),
        f"http://{LOOPBACK}:{port}/",
    ]
    p = subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    try:
        out, _ = p.communicate(timeout=duration + 60)
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(p.pid, signal.SIGKILL)
        p.wait()
        raise
    m = re.search(r"^BENCH (.*)$", out, re.M)
    if p.returncode != 0 or not m:
        raise RuntimeError(f"wrk exited {p.returncode}:\n{out[-2000:]}")
    v = {k: float(x) for k, x in (kv.split("=") for kv in m.group(1).split())}
    v["rps"] = v["requests"] / (v["duration_us"] / 1e6)
    return v


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--connections", type=int, default=1000)
    parser.add_argument("--duration", type=float, default=60.0)
    parser.add_argument("--quick", action="store_true", help="10 s per proxy")
    args = parser.parse_args()
    if args.quick:
        args.duration = 10.0
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    bench = Bench(argparse.Namespace(nice=0, keep_tmp=False, access_log=False))
    results: dict[str, dict[str, float]] = {}
    try:
        bench.start_upstreams()
        nginx_port, _ = bench.start_nginx_proxy()
        edge_port, _ = bench.start_turnout()
        for name, port in (("nginx", nginx_port), ("turnout", edge_port)):
            wrk(bench, port, args.connections, 5)  # warm-up: pools, caches
            results[name] = wrk(bench, port, args.connections, args.duration)
            bench.check_alive()
    finally:
        bench.close()
    print(f"wrk -t2 -c{args.connections} -d{args.duration:g}s, one proxy process on core 1")
    print(
        f"{'proxy':<8} {'RPS':>9} {'p50 ms':>8} {'p99 ms':>8} {'connect':>8} {'read':>6} "
        f"{'write':>6} {'timeout':>8} {'non-2xx':>8}"
    )
    for name, v in results.items():
        print(
            f"{name:<8} {v['rps']:>9,.0f} {v['p50_us'] / 1000:>8.2f} {v['p99_us'] / 1000:>8.2f} "
            f"{v['connect']:>8.0f} {v['read']:>6.0f} {v['write']:>6.0f} {v['timeout']:>8.0f} "
            f"{v['status']:>8.0f}"
        )
    t = results["turnout"]
    socket_errors = t["connect"] + t["read"] + t["write"] + t["timeout"]
    ratio = t["rps"] / results["nginx"]["rps"]
    verdict = "PASS" if socket_errors == 0 and t["status"] == 0 else "MISS"
    print(f"Turnout / nginx RPS at {args.connections} connections: {ratio:.2f}")
    print(f"Turnout socket errors: {socket_errors:.0f} (target 0): {verdict}")
    return 0 if verdict == "PASS" else 1


if __name__ == "__main__":
    sys.exit(main())
