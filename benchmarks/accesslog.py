#!/usr/bin/env python3
"""The access log's cost in instructions per request: Turnout with and without it, under
valgrind's callgrind, on the same fixed load (issue #13 target: the log costs <= 5 %).

    .venv/bin/python benchmarks/accesslog.py [--requests 4000] [--connections 4]

What is counted: the Turnout process only. Its access log ships each batch to a writer
process (edge/logwriter.py) that formats and writes the lines; valgrind does not follow
that child (`--trace-children=no`), so the figure is the cost on the request path's core,
which is what the 5 % budget is about. The writer's own CPU runs on another core when there
is one (benchmarks/proxy.py --access-log counts it with the rest).

Why instructions: on a shared or noisy machine, RPS and CPU-time figures of two setups
differ by more than 5 % from run to run (PERF.md's interleaved wrk runs of setups C and L
in benchmarks/proxy.py --access-log are the throughput view; run them on a quiet machine).
An instruction count is repeatable whatever else the machine does, so a 5 % budget can be
checked here. Instructions are not time (a syscall or a cache miss costs more than an add),
so this complements, not replaces, the wrk figures.

Layout (loopback only, every process started and stopped here): the upstream nginx of
benchmarks/proxy.py (stable and canary on two ports); `turnout serve` (one process, the
document of proxy.py: `web` at beta) started under `valgrind --tool=callgrind
--collect-atstart=no`, once with `access_log: off` and once writing its JSON access log to
a file. Each setting runs twice, with N and with 2N keep-alive GETs (distinct user ids over
`--connections` connections) after the same warm-up, and is stopped with SIGTERM (the log
is flushed); the difference of the two runs' instruction totals over N is the cost of one
request, start-up and shutdown cancelling out. Printed: instructions per request for both
settings, the difference, and the ratio. Every access-log line is checked to be there
(one valid JSON line per request).
"""

from __future__ import annotations

import argparse
import http.client
import json
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.proxy import (  # noqa: E402
    ADMIN_TOKEN,
    COOKIE_SECRET,
    LOOPBACK,
    PYTHON,
    TURNOUT_BOOT,
    Bench,
    free_port,
    turnout_seed,
)

TARGET_SHARE = 0.05
START_TIMEOUT_S = 600.0  # imports under valgrind are slow
WARM_REQUESTS = 200


def wait_ready(port: int, proc: subprocess.Popen[bytes], deadline_s: float) -> None:
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError("turnout exited under valgrind")
        try:
            conn = http.client.HTTPConnection(LOOPBACK, port, timeout=30)
            conn.request("GET", "/readyz")
            if conn.getresponse().status == 200:
                return
        except OSError:
            pass
        time.sleep(1)
    raise RuntimeError("turnout under valgrind did not become ready")


def load(port: int, first: int, count: int, connections: int) -> int:
    """`count` GETs with distinct user ids over keep-alive connections; the number of 200s."""
    ok = [0] * connections

    def run(index: int) -> None:
        conn = http.client.HTTPConnection(LOOPBACK, port, timeout=120)
        for i in range(first + index, first + count, connections):
            conn.request("GET", f"/items/{i % 97}", headers={"x-user-id": str(i)})
            resp = conn.getresponse()
            resp.read()
            ok[index] += resp.status == 200
        conn.close()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(connections)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(ok)


def measure(bench: Bench, access_log: str, requests: int, connections: int) -> int:
    """Instructions of one Turnout process's whole life (start-up, a warm-up, `requests`
    requests, shutdown) under callgrind. `per_request` takes the difference of two such
    lives that differ only in the number of requests, so start-up and shutdown cancel out."""
    edge_port, admin_port = free_port(), free_port()
    tag = f"{'on' if access_log != 'off' else 'off'}-{requests}"
    state = bench.tmp / f"state-{tag}"
    state.mkdir()
    settings = {
        "state_dir": str(state),
        "edge_host": LOOPBACK,
        "edge_port": edge_port,
        "admin_host": LOOPBACK,
        "admin_port": admin_port,
        "seed": turnout_seed(bench.stable_port, bench.canary_port),
        "log_level": "warning",
        "admin_token": ADMIN_TOKEN,
        "cookie_secret": COOKIE_SECRET,
        "access_log": access_log,
    }
    out = bench.tmp / f"callgrind-{tag}.out"
    argv = [
        "valgrind",
        "--tool=callgrind",
        f"--callgrind-out-file={out}",
        PYTHON,
        "-c",
        TURNOUT_BOOT.format(root=str(ROOT)),
        json.dumps(settings),
    ]
    log = bench.tmp / f"turnout-{tag}.log"
    proc = bench.procs.start(f"turnout-{tag}", argv, log, cwd=str(bench.tmp))
    wait_ready(admin_port, proc, START_TIMEOUT_S)
    load(edge_port, 1_000_000, WARM_REQUESTS, connections)  # pools, caches, first calls
    ok = load(edge_port, 0, requests, connections)
    if ok != requests:
        raise RuntimeError(f"{requests - ok} requests failed")
    time.sleep(1)
    proc.send_signal(signal.SIGTERM)
    proc.wait(300)
    total = 0
    for line in out.read_text(errors="replace").splitlines():
        if line.startswith(("summary:", "totals:")):
            total = int(line.split()[1])
    if access_log != "off":
        lines = [json.loads(line) for line in Path(access_log).read_text().splitlines()]
        if len(lines) != requests + WARM_REQUESTS:  # every line there, each valid JSON
            raise RuntimeError(f"access log has {len(lines)} lines")
        Path(access_log).unlink()
    if total <= 0:
        raise RuntimeError(f"no instruction count in {out}")
    return total


def per_request(bench: Bench, access_log: str, requests: int, connections: int) -> float:
    small = measure(bench, access_log, requests, connections)
    large = measure(bench, access_log, 2 * requests, connections)
    return (large - small) / requests


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=4000)
    parser.add_argument("--connections", type=int, default=4)
    args = parser.parse_args()
    for tool in ("valgrind", "nginx"):
        if shutil.which(tool) is None:
            print(f"needs {tool} (apt-get install valgrind nginx)", file=sys.stderr)
            return 2
    bench = Bench(argparse.Namespace(nice=0, keep_tmp=False))
    try:
        bench.start_upstreams()
        per_off = per_request(bench, "off", args.requests, args.connections)
        with tempfile.TemporaryDirectory() as tmp:
            log = str(Path(tmp) / "access.log")
            per_on = per_request(bench, log, args.requests, args.connections)
    finally:
        bench.close()
    share = per_on / per_off - 1
    print(f"{args.requests} requests, {args.connections} connections, callgrind (instructions)")
    print(f"  access_log off   {per_off:12,.0f} instructions / request")
    print(f"  access_log file  {per_on:12,.0f} instructions / request")
    print(f"  the log's cost   {per_on - per_off:12,.0f} instructions / request = {share:+.1%}")
    verdict = "PASS" if share <= TARGET_SHARE else "MISS"
    print(f"target (issue #13): <= {TARGET_SHARE:.0%}  {verdict}")
    return 0 if verdict == "PASS" else 1


if __name__ == "__main__":
    sys.exit(main())
