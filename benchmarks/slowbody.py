#!/usr/bin/env python3
"""The slow-body attack (issue #12): clients trickling request bodies must not take the
upstream connections other users need.

    .venv/bin/python benchmarks/slowbody.py [--clients 500] [--pool 64] [--seconds 20] [--quick]

Layout (loopback only, every process started and stopped here): an upstream that, like an
application, reads a request's whole body before it answers (uvicorn + httptools, its own
process); `turnout serve` (one process, `web` at stage off: every request on the
stable arm) with `upstream_max_connections: --pool`. This script is the client:

1. normal: `--users` well-behaved users send GETs back to back on keep-alive connections for
   `--seconds`; p50 / p99 latency and errors are recorded;
2. attack: `--clients` connections each send a POST head with `Content-Length: 1000` and then
   one body byte per second, on the same arm; the same well-behaved load runs meanwhile.

Printed: both phases' requests, errors, p50 and p99, the p99 ratio, how many slow clients the
edge answered (it buffers bodies, so none of them holds an upstream connection; the body
deadline, `client_body_timeout_s`, ends them after 60 s). Target (issue #12): 0 errors for the other users and p99 within 2x of normal.
`--no-buffering` streams bodies as they come (what Turnout did before), for comparison.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import statistics
import sys
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
    wait_http,
)

TARGET_P99_RATIO = 2.0

UPSTREAM_CODE = r"""
import sys, uvicorn

async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    more = True
    while more:  # the whole body first, as an application reading a form or JSON does
        message = await receive()
        more = message.get("more_body", False)
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"text/plain"), (b"content-length", b"2")]})
    await send({"type": "http.response.body", "body": b"ok"})

uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), http="httptools",
            lifespan="off", log_level="warning", access_log=False, backlog=4096)
"""


async def user(port: int, until: float, latencies: list[float], errors: list[str]) -> None:
    """A well-behaved user: GETs back to back on one keep-alive connection."""
    reader, writer = await asyncio.open_connection(LOOPBACK, port)
    n = 0
    try:
        while time.monotonic() < until:
            n += 1
            started = time.perf_counter()
            writer.write(b"GET /u/%d HTTP/1.1\r\nHost: a\r\nX-User-Id: u%d\r\n\r\n" % (n, n))
            try:
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":")[1])
                await reader.readexactly(length)
            except (OSError, asyncio.IncompleteReadError, TimeoutError) as exc:
                errors.append(type(exc).__name__)
                writer.close()
                reader, writer = await asyncio.open_connection(LOOPBACK, port)
                continue
            status = int(head.split(b" ", 2)[1])
            if status != 200:
                errors.append(str(status))
            latencies.append(time.perf_counter() - started)
    finally:
        writer.close()


async def slow_client(port: int, until: float, answered: list[int]) -> None:
    """One byte of a 1,000-byte body per second until `until` (or the edge answers)."""
    try:
        reader, writer = await asyncio.open_connection(LOOPBACK, port)
    except OSError:
        return
    try:
        writer.write(b"POST /upload HTTP/1.1\r\nHost: a\r\nContent-Length: 1000\r\n\r\n")
        while time.monotonic() < until:
            writer.write(b"x")
            try:
                data = await asyncio.wait_for(reader.read(1024), 1.0)
            except TimeoutError:
                continue
            if data:
                answered.append(int(data.split(b" ", 2)[1]) if data.startswith(b"HTTP/") else 0)
            return
    except OSError:
        return
    finally:
        writer.close()


async def phase(
    port: int, users: int, seconds: float, clients: int
) -> tuple[list[float], list[str], list[int]]:
    latencies: list[float] = []
    errors: list[str] = []
    answered: list[int] = []
    slow = []
    if clients:
        until_slow = time.monotonic() + seconds + 5
        for i in range(clients):
            slow.append(asyncio.create_task(slow_client(port, until_slow, answered)))
            if i % 50 == 49:
                await asyncio.sleep(0.05)
        await asyncio.sleep(2)  # every slow client has sent its head and started its body
    until = time.monotonic() + seconds
    await asyncio.gather(*(user(port, until, latencies, errors) for _ in range(users)))
    for task in slow:
        task.cancel()
    await asyncio.gather(*slow, return_exceptions=True)
    return latencies, errors, answered


def pct(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100)[q - 1] * 1000 if len(values) > 2 else 0.0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, default=500)
    parser.add_argument("--pool", type=int, default=64)
    parser.add_argument("--users", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--quick", action="store_true", help="100 slow clients, 5 s phases")
    parser.add_argument(
        "--no-buffering",
        action="store_true",
        help="client_body_buffer_bytes 0 and no minimum rate: bodies stream as they come "
        "(the behaviour before request buffering), for comparison",
    )
    args = parser.parse_args()
    if args.quick:
        args.clients, args.seconds = 100, 5.0
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    bench = Bench(argparse.Namespace(nice=0, keep_tmp=False))
    try:
        up_log = bench.tmp / "upstream.log"
        upstream = bench.procs.start(
            "upstream", [PYTHON, "-c", UPSTREAM_CODE, str(bench.stable_port)], up_log
        )
        wait_http(f"http://{LOOPBACK}:{bench.stable_port}/", 30, upstream, up_log)
        edge_port, admin_port = free_port(), free_port()
        seed = turnout_seed(bench.stable_port, bench.stable_port)
        seed["releases"]["web"]["stage"] = "off"
        settings = {
            "state_dir": str(bench.tmp / "state"),
            "edge_host": LOOPBACK,
            "edge_port": edge_port,
            "admin_host": LOOPBACK,
            "admin_port": admin_port,
            "seed": seed,
            "log_level": "warning",
            "admin_token": ADMIN_TOKEN,
            "cookie_secret": COOKIE_SECRET,
            "access_log": "off",
            "upstream_max_connections": args.pool,
        }
        if args.no_buffering:
            settings["client_body_buffer_bytes"] = 0
            settings["client_body_min_rate_bps"] = 0
        (bench.tmp / "state").mkdir()
        argv = [PYTHON, "-c", TURNOUT_BOOT.format(root=str(ROOT)), json.dumps(settings)]
        log = bench.tmp / "turnout.log"
        proc = bench.procs.start("turnout", argv, log, cwd=str(bench.tmp))
        wait_http(f"http://{LOOPBACK}:{admin_port}/readyz", 30, proc, log)
        normal = asyncio.run(phase(edge_port, args.users, args.seconds, 0))
        attack = asyncio.run(phase(edge_port, args.users, args.seconds, args.clients))
        if proc.poll() is not None:
            print("turnout exited during the run", file=sys.stderr)
            return 1
    finally:
        bench.close()
    rows = (("normal", normal), (f"attack ({args.clients} slow bodies)", attack))
    buffering = "off (--no-buffering)" if args.no_buffering else "on"
    print(
        f"pool {args.pool} upstream connections, {args.users} users, {args.seconds:g} s each, "
        f"request buffering {buffering}"
    )
    print(f"{'phase':<28} {'requests':>9} {'errors':>7} {'p50 ms':>8} {'p99 ms':>8}")
    for name, (lat, errs, _) in rows:
        print(f"{name:<28} {len(lat):>9,} {len(errs):>7} {pct(lat, 50):>8.2f} {pct(lat, 99):>8.2f}")
    ratio = pct(attack[0], 99) / max(pct(normal[0], 99), 1e-9)
    answered = attack[2]
    print(
        f"slow clients answered during the run: {len(answered)} (statuses {sorted(set(answered))})"
    )
    ok = not attack[1] and ratio <= TARGET_P99_RATIO
    print(
        f"p99 under attack / normal: {ratio:.2f} (target <= {TARGET_P99_RATIO:g}), "
        f"errors {len(attack[1])} (target 0): {'PASS' if ok else 'MISS'}"
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
