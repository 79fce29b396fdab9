#!/usr/bin/env python3
"""Memory per idle keep-alive client connection: one edge worker holding 10,000 of them.

    .venv/bin/python benchmarks/connections.py [--connections 10000] [--quick] [--max-seconds 300]

Layout (loopback only, every process started and stopped here):

* one upstream (`tests.harness.EchoApp` on uvicorn, its own process);
* `turnout serve --workers 1` (one process: edge and admin) with the 50-release, 50-route
  document of `benchmarks/decide.py`, every release pointed at that upstream, and
  `client_keepalive_timeout_s` 600 so idle connections are kept, not reaped;
* this script as the client. It raises its RLIMIT_NOFILE soft limit to the hard limit before
  starting Turnout (which inherits it), opens the connections in batches, sends one request on
  each (so each holds the state of a served keep-alive connection) and then leaves it idle.

At 0, 1,000 and 10,000 held connections (`--quick`: 0, 100, 1,000) it prints the Turnout
process's RSS (from /proc/PID/status VmRSS) and the p50 / p99 of PROBES sequential requests
made meanwhile on a separate keep-alive connection. Errors (failed connects, non-200
answers, probes that fail) are counted; at the end a sample of the held connections is used
again to show they were still open. Target (issue #9): RSS <= 80 MB at 10,000 connections,
no errors. Exit status 0 on PASS. Bounded by --max-seconds; every process is stopped on exit.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import http.client
import os
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import yaml  # noqa: E402
from decide import build_document  # noqa: E402

from tests.redisproc import LOCALHOST, free_port  # noqa: E402

TOKEN = "connections-admin-token-0123456789"
COOKIE_SECRET = "connections-cookie-secret-0123456789"
TARGET_RSS_MB = 80.0  # decimal megabytes, as the issue states it (80 MB = 76.3 MiB)
MB_PER_MIB = 1.048576
PROBES = 200
BATCH = 200  # connections opened concurrently
FD_MARGIN = 512  # descriptors beyond the held connections (upstream pool, files, probes)
START_TIMEOUT_S = 30.0
REUSE_SAMPLE = 100  # held connections used again at the end
HOST = "app0.example.com"  # routed to a release by the 50-route table

UPSTREAM_CODE = (
    "import sys, uvicorn\n"
    "from tests.harness import EchoApp\n"
    "uvicorn.run(EchoApp('up'), host='127.0.0.1', port=int(sys.argv[1]), "
    "http='httptools', lifespan='off', log_level='warning', access_log=False, backlog=4096)\n"
)


def raise_fd_limit(wanted: int) -> int:
    """Raise the soft RLIMIT_NOFILE towards `wanted` (up to the hard limit); the new soft."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if target > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def wait_http(port: int, path: str, proc: subprocess.Popen[bytes], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"process {proc.args!r} exited with {proc.returncode}")
        with contextlib.suppress(OSError, http.client.HTTPException):
            conn = http.client.HTTPConnection(LOCALHOST, port, timeout=2)
            conn.request("GET", path)
            if conn.getresponse().status == 200:
                conn.close()
                return
        time.sleep(0.05)
    raise RuntimeError(f"nothing answered 200 on {port}{path}")


def request_bytes(unit: str) -> bytes:
    return f"GET / HTTP/1.1\r\nHost: {HOST}\r\nX-User-Id: {unit}\r\n\r\n".encode()


async def read_response(reader: asyncio.StreamReader) -> int:
    """Read one response with a Content-Length body; its status."""
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    await reader.readexactly(length)
    return status


class Held:
    """The idle connections this script keeps open."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.conns: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
        self.errors = 0

    async def _open_one(self, n: int) -> None:
        try:
            reader, writer = await asyncio.open_connection(LOCALHOST, self.port)
            writer.write(request_bytes(f"held-{n}"))
            if await asyncio.wait_for(read_response(reader), 30) != 200:
                self.errors += 1
            self.conns.append((reader, writer))
        except (OSError, asyncio.IncompleteReadError, TimeoutError, ValueError):
            self.errors += 1

    async def grow_to(self, total: int) -> None:
        while len(self.conns) + self.errors < total:
            batch = min(BATCH, total - len(self.conns) - self.errors)
            start = len(self.conns) + self.errors
            await asyncio.gather(*(self._open_one(start + i) for i in range(batch)))

    async def reuse(self, sample: int) -> int:
        """Send one more request on `sample` held connections; how many failed."""
        failed = 0
        step = max(1, len(self.conns) // max(1, sample))
        for reader, writer in self.conns[::step][:sample]:
            try:
                writer.write(request_bytes("again"))
                if await asyncio.wait_for(read_response(reader), 30) != 200:
                    failed += 1
            except (OSError, asyncio.IncompleteReadError, TimeoutError, ValueError):
                failed += 1
        return failed

    def close(self) -> None:
        for _, writer in self.conns:
            writer.close()
        self.conns.clear()


async def probe(port: int, count: int) -> tuple[list[float], int]:
    """`count` sequential requests on one new keep-alive connection: latencies (ms), errors."""
    latencies: list[float] = []
    errors = 0
    reader, writer = await asyncio.open_connection(LOCALHOST, port)
    try:
        for i in range(count):
            t0 = time.perf_counter()
            try:
                writer.write(request_bytes(f"probe-{i}"))
                status = await asyncio.wait_for(read_response(reader), 30)
            except (OSError, asyncio.IncompleteReadError, TimeoutError, ValueError):
                errors += 1
                continue
            latencies.append((time.perf_counter() - t0) * 1000)
            if status != 200:
                errors += 1
    finally:
        writer.close()
    return latencies, errors


async def measure(pid: int, port: int, steps: list[int], deadline: float) -> int:
    held = Held(port)
    rows: list[tuple[int, float, float, float, int]] = []
    probe_errors = 0
    try:
        for step in steps:
            if time.monotonic() > deadline:
                print(f"stopping early: time bound reached before {step} connections")
                break
            await held.grow_to(step)
            await asyncio.sleep(0.5)  # let the server settle (timers, buffers) before reading
            latencies, errors = await probe(port, PROBES)
            probe_errors += errors
            p50 = statistics.median(latencies) if latencies else float("nan")
            p99 = statistics.quantiles(latencies, n=100)[98] if len(latencies) > 1 else float("nan")
            rows.append((len(held.conns), rss_mb(pid), p50, p99, held.errors + probe_errors))
            print(
                f"  {len(held.conns):>6} held: RSS {rows[-1][1]:7.1f} MiB, probe p50 {p50:.3f} ms "
                f"p99 {p99:.3f} ms, errors so far {rows[-1][4]}",
                flush=True,
            )
        reuse_failed = await held.reuse(REUSE_SAMPLE)
    finally:
        held.close()
    print()
    print(f"{'held connections':>17} {'RSS MiB':>9} {'probe p50 ms':>13} {'probe p99 ms':>13}")
    for n, rss, p50, p99, _ in rows:
        print(f"{n:>17,} {rss:>9.1f} {p50:>13.3f} {p99:>13.3f}")
    if len(rows) >= 2 and rows[-1][0] > rows[0][0]:
        per_conn_kb = (rows[-1][1] - rows[0][1]) * 1024 / (rows[-1][0] - rows[0][0])
        print(f"RSS per held connection: {per_conn_kb:.1f} KiB")
    errors = held.errors + probe_errors + reuse_failed
    print(
        f"errors: {held.errors} opening/first request, {probe_errors} probes, "
        f"{reuse_failed} of {min(REUSE_SAMPLE, rows[-1][0] if rows else 0)} held connections "
        "failed when used again"
    )
    final_rss = rows[-1][1] if rows else float("nan")
    reached = rows[-1][0] if rows else 0
    final_mb = final_rss * MB_PER_MIB
    verdict = (
        "PASS" if reached >= steps[-1] and final_mb <= TARGET_RSS_MB and not errors else "MISS"
    )
    print(
        f"target: RSS <= {TARGET_RSS_MB:g} MB at {steps[-1]:,} connections, no errors: {verdict} "
        f"(RSS {final_mb:.1f} MB = {final_rss:.1f} MiB at {reached:,})"
    )
    return 0 if verdict == "PASS" else 1


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)  # its own session only
            proc.wait(10)


def run(args: argparse.Namespace) -> int:
    steps = [0, 100, 1000] if args.quick else [0, 1000, args.connections]
    soft = raise_fd_limit(steps[-1] + FD_MARGIN)
    if soft < steps[-1] + FD_MARGIN:
        print(
            f"RLIMIT_NOFILE hard limit {soft} is below {steps[-1] + FD_MARGIN}: "
            "raise it (ulimit -Hn, as root) to hold that many connections",
            file=sys.stderr,
        )
        return 2
    deadline = time.monotonic() + args.max_seconds
    procs: list[subprocess.Popen[bytes]] = []
    with tempfile.TemporaryDirectory(prefix="turnout-connections-") as tmp:
        workdir = Path(tmp)
        try:
            up_port, edge_port, admin_port = free_port(), free_port(), free_port()
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-c", UPSTREAM_CODE, str(up_port)],
                    cwd=ROOT,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                    start_new_session=True,
                )
            )
            wait_http(up_port, "/", procs[-1], START_TIMEOUT_S)
            document = build_document(__import__("random").Random(1))
            upstream = f"http://{LOCALHOST}:{up_port}"
            for release in document["releases"].values():
                release["stable"] = [upstream]
                release["canary"] = [upstream]
            config = workdir / "settings.yaml"
            config.write_text(
                yaml.safe_dump(
                    {
                        "edge_host": LOCALHOST,
                        "edge_port": edge_port,
                        "admin_host": LOCALHOST,
                        "admin_port": admin_port,
                        "admin_token": TOKEN,
                        "cookie_secret": COOKIE_SECRET,
                        "state_dir": str(workdir / "state"),
                        "client_keepalive_timeout_s": 600,
                        "log_level": "warning",
                        "seed": document,
                    }
                )
            )
            log = (workdir / "turnout.log").open("wb")
            turnout = subprocess.Popen(
                [sys.executable, "-m", "turnout.cli", "serve", "--config", str(config)],
                cwd=ROOT,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            procs.append(turnout)
            wait_http(admin_port, "/readyz", turnout, START_TIMEOUT_S)
            print(
                f"turnout pid {turnout.pid} (edge :{edge_port}), 50 releases / 50 routes, "
                f"RLIMIT_NOFILE {soft}; holding up to {steps[-1]:,} idle keep-alive connections",
                flush=True,
            )
            return asyncio.run(measure(turnout.pid, edge_port, steps, deadline))
        finally:
            for proc in reversed(procs):
                stop(proc)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--connections", type=int, default=10_000)
    parser.add_argument("--quick", action="store_true", help="0, 100 and 1,000 connections")
    parser.add_argument("--max-seconds", type=float, default=300.0)
    args = parser.parse_args()
    if args.connections < 1000:
        parser.error("--connections must be >= 1000 (the steps are 0, 1,000 and N)")
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
