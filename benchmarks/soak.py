#!/usr/bin/env python3
"""Soak: mixed traffic at 1,000 concurrent connections through Turnout (issue #12 point 8).

    python benchmarks/soak.py [--duration 600] [--connections 1000] [--report-every 30]
    python benchmarks/soak.py --duration 60          # the CI-length run
    python benchmarks/soak.py --quick                # a 20 s, 100-connection sanity run

One Turnout process (its own front-end, 1 worker) in front of a uvicorn upstream (an ASGI app
in this file: small answers, 1 MiB streamed downloads, uploads, a WebSocket echo), both on
127.0.0.1. The load generator (asyncio, this process) keeps `--connections` clients busy,
each a loop of one kind, with a think time of up to `--think-ms` between requests:

    keep-alive 55 %   GET /small on one persistent connection
    new-conn   15 %   GET /small on a new connection each time
    download   10 %   GET /stream (1 MiB, chunked) read to the end
    upload     10 %   POST /upload with a 64 KiB body; the answer echoes its length
    websocket   8 %   one connection, a message echoed back every think time
    hostile     2 %   slowloris heads, garbage request lines, bodies that stop halfway
                      (errors here are expected and not counted)

Every `--report-every` seconds it prints, for well-behaved clients: requests, errors, p99
latency, and Turnout's RSS, open file descriptors and connections to the upstream. At the
end it stops the load, waits for idle connections to expire and checks the targets: 0 errors
for well-behaved clients, RSS growth <= 5 % after the first minute (or after the first report
in shorter runs), and no leaked upstream connections or file descriptors (back to the
baseline measured before the load, within a small slack). Exit status 1 if a check fails.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import random
import resource
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from tempfile import TemporaryDirectory

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.proxy import TURNOUT_BOOT, Procs, free_port, rss_kb, wait_http  # noqa: E402

LOOPBACK = "127.0.0.1"
PYTHON = sys.executable
DOWNLOAD_BYTES = 1024 * 1024
UPLOAD_BYTES = 64 * 1024
FD_SLACK = 16  # listeners, log files, the loop's own: the baseline may move by this much
RSS_GROWTH_MAX = 0.05
IDLE_WAIT_S = 12.0  # > Turnout's client keep-alive (5 s) and the upstream's (uvicorn: 5 s)
MIX = (
    ("keepalive", 55),
    ("newconn", 15),
    ("download", 10),
    ("upload", 10),
    ("websocket", 8),
    ("hostile", 2),
)

UPSTREAM_APP = """\
import sys
import uvicorn

CHUNK = b"x" * 16384
CHUNKS = int(sys.argv[2])

async def app(scope, receive, send):
    if scope["type"] == "lifespan":
        while True:
            msg = await receive()
            if msg["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            else:
                await send({"type": "lifespan.shutdown.complete"})
                return
    if scope["type"] == "websocket":
        await receive()
        await send({"type": "websocket.accept"})
        while True:
            msg = await receive()
            if msg["type"] == "websocket.disconnect":
                return
            await send({"type": "websocket.send", "text": msg.get("text") or ""})
    path = scope["path"]
    if path == "/stream":
        await send({"type": "http.response.start", "status": 200, "headers": []})
        for _ in range(CHUNKS):
            await send({"type": "http.response.body", "body": CHUNK, "more_body": True})
        await send({"type": "http.response.body", "body": b""})
        return
    size = 0
    while True:
        msg = await receive()
        size += len(msg.get("body", b""))
        if not msg.get("more_body"):
            break
    body = str(size).encode() if path == "/upload" else b"s" * 100
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})

uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning",
            backlog=4096, limit_concurrency=None, ws="websockets")
"""
CHUNK_BYTES = 16384


@dataclass
class Window:
    requests: int = 0
    errors: int = 0
    latencies_ms: list[float] = field(default_factory=list)
    error_kinds: dict[str, int] = field(default_factory=dict)

    def error(self, kind: str) -> None:
        self.errors += 1
        self.error_kinds[kind] = self.error_kinds.get(kind, 0) + 1


class Load:
    """The clients; `window` collects what the current report period saw."""

    def __init__(self, port: int, think_ms: float, seed: int) -> None:
        self.port = port
        self.think_s = think_ms / 1000
        self.rng = random.Random(seed)
        self.window = Window()
        self.total = Window()
        self.hostile = 0
        self.stop = asyncio.Event()

    def record(self, started: float, ok: bool, kind: str) -> None:
        for w in (self.window, self.total):
            w.requests += 1
            if ok:
                w.latencies_ms.append((time.perf_counter() - started) * 1000)
            else:
                w.error(kind)

    async def think(self) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.rng.random() * self.think_s):
                await self.stop.wait()

    async def open(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await asyncio.open_connection(LOOPBACK, self.port, limit=1024 * 1024)

    @staticmethod
    async def read_response(reader: asyncio.StreamReader) -> tuple[int, bytes]:
        head = await reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        lines = head.lower().split(b"\r\n")
        length = next(
            (int(v.split(b":")[1]) for v in lines if v.startswith(b"content-length:")), None
        )
        if length is not None:
            return status, await reader.readexactly(length)
        if any(v.startswith(b"transfer-encoding:") and b"chunked" in v for v in lines):
            body = bytearray()
            while True:
                size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
                if size == 0:
                    await reader.readuntil(b"\r\n")
                    return status, bytes(body)
                body += await reader.readexactly(size + 2)
                del body[-2:]
        return status, await reader.read()

    def request(self, method: str, path: str, body: bytes = b"") -> bytes:
        uid = self.rng.randrange(100_000)
        head = f"{method} {path} HTTP/1.1\r\nHost: soak\r\nX-User-Id: u{uid}\r\n"
        if body:
            head += f"Content-Length: {len(body)}\r\n"
        return head.encode() + b"\r\n" + body

    async def exchange(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        raw: bytes,
        check: bytes | None,
    ) -> bool:
        writer.write(raw)
        status, body = await self.read_response(reader)
        return status == 200 and (check is None or body == check)

    async def client(self, kind: str) -> None:
        while not self.stop.is_set():
            try:
                if kind == "keepalive":
                    await self.keepalive()
                elif kind == "websocket":
                    await self.websocket()
                elif kind == "hostile":
                    await self.hostile_client()
                else:
                    await self.one_shot(kind)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - any failure of a client is an error to count
                if kind != "hostile" and not self.stop.is_set():
                    self.record(time.perf_counter(), False, f"{kind}: {type(exc).__name__}")
                await self.think()

    async def keepalive(self) -> None:
        reader, writer = await self.open()
        try:
            while not self.stop.is_set():
                started = time.perf_counter()
                ok = await self.exchange(reader, writer, self.request("GET", "/small"), b"s" * 100)
                self.record(started, ok, "keepalive: bad answer")
                await self.think()
        finally:
            writer.close()

    async def one_shot(self, kind: str) -> None:
        started = time.perf_counter()
        reader, writer = await self.open()
        try:
            if kind == "download":
                writer.write(self.request("GET", "/stream"))
                status, body = await self.read_response(reader)
                ok = status == 200 and len(body) == DOWNLOAD_BYTES
            elif kind == "upload":
                raw = self.request("POST", "/upload", b"u" * UPLOAD_BYTES)
                ok = await self.exchange(reader, writer, raw, str(UPLOAD_BYTES).encode())
            else:
                ok = await self.exchange(reader, writer, self.request("GET", "/small"), b"s" * 100)
            self.record(started, ok, f"{kind}: bad answer")
        finally:
            writer.close()
        await self.think()

    async def websocket(self) -> None:
        import websockets

        uid = self.rng.randrange(100_000)
        async with websockets.connect(
            f"ws://{LOOPBACK}:{self.port}/ws", additional_headers={"X-User-Id": f"u{uid}"}
        ) as ws:
            while not self.stop.is_set():
                started = time.perf_counter()
                text = f"m{self.rng.randrange(1 << 30)}"
                await ws.send(text)
                self.record(started, await ws.recv() == text, "websocket: bad echo")
                await self.think()

    async def hostile_client(self) -> None:
        """Slowloris, garbage, a body that stops: Turnout must shed them (not counted)."""
        self.hostile += 1
        reader, writer = await self.open()
        try:
            mode = self.rng.randrange(3)
            if mode == 0:
                writer.write(b"GET / HTTP/1.1\r\nHost: soak\r\n")
                for _ in range(30):  # a header line every second until Turnout gives up
                    await asyncio.sleep(1)
                    writer.write(b"X-Slow: 1\r\n")
            elif mode == 1:
                writer.write(b"\x16\x03\x01 not http\r\n\r\n")
            else:
                writer.write(
                    b"POST /upload HTTP/1.1\r\nHost: soak\r\nContent-Length: 1000\r\n\r\nhalf"
                )
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(90):
                    await reader.read()
        finally:
            writer.close()
        await self.think()


def open_fds(pid: int) -> int:
    with contextlib.suppress(OSError):
        return len(os.listdir(f"/proc/{pid}/fd"))
    return -1


def connections_to(port: int) -> int:
    """ESTABLISHED TCP connections whose remote end is 127.0.0.1:`port` (/proc/net/tcp)."""
    count = 0
    with contextlib.suppress(OSError):
        for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
            parts = line.split()
            remote, state = parts[2], parts[3]
            if state == "01" and int(remote.split(":")[1], 16) == port:
                count += 1
    return count


def p99(values: list[float]) -> float:
    if len(values) < 2:
        return values[0] if values else 0.0
    return statistics.quantiles(values, n=100)[98]


async def soak(args: argparse.Namespace, edge_port: int, upstream_port: int, pid: int) -> int:
    load = Load(edge_port, args.think_ms, args.seed)
    kinds = [k for k, weight in MIX for _ in range(weight)]
    base_fds = open_fds(pid)
    print(f"baseline: turnout RSS {rss_kb(pid) / 1024:.1f} MiB, {base_fds} fds")
    print(
        f"{'t (s)':>6} {'requests':>9} {'errors':>7} {'p99 ms':>8} {'RSS MiB':>8} {'fds':>6} {'upstream':>9}"
    )
    tasks = [
        asyncio.create_task(load.client(kinds[i % len(kinds)])) for i in range(args.connections)
    ]
    start = time.monotonic()
    rss_series: list[tuple[float, int]] = []
    while (elapsed := time.monotonic() - start) < args.duration:
        await asyncio.sleep(min(args.report_every, args.duration - elapsed))
        w, load.window = load.window, Window()
        rss = rss_kb(pid)
        rss_series.append((time.monotonic() - start, rss))
        print(
            f"{time.monotonic() - start:6.0f} {w.requests:9d} {w.errors:7d} {p99(w.latencies_ms):8.1f} "
            f"{rss / 1024:8.1f} {open_fds(pid):6d} {connections_to(upstream_port):9d}"
            + (f"  {w.error_kinds}" if w.error_kinds else ""),
            flush=True,
        )
    load.stop.set()
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await asyncio.sleep(IDLE_WAIT_S)
    end_fds, end_upstream = open_fds(pid), connections_to(upstream_port)

    failures = []
    total = load.total
    print(
        f"total: {total.requests} requests, {total.errors} errors, p99 {p99(total.latencies_ms):.1f} ms, "
        f"{load.hostile} hostile connections"
    )
    if total.errors:
        failures.append(f"{total.errors} errors for well-behaved clients: {total.error_kinds}")
    after = [rss for t, rss in rss_series if t >= min(60.0, args.report_every)]
    if len(after) >= 2:
        growth = after[-1] / after[0] - 1
        print(f"RSS growth after the first minute: {growth * 100:+.1f} %")
        if growth > RSS_GROWTH_MAX:
            failures.append(f"RSS grew {growth * 100:.1f} % (> {RSS_GROWTH_MAX * 100:.0f} %)")
    print(
        f"after {IDLE_WAIT_S:g} s idle: {end_fds} fds (baseline {base_fds}), {end_upstream} upstream connections"
    )
    if end_fds > base_fds + FD_SLACK:
        failures.append(f"file descriptors: {end_fds} at the end, {base_fds} before")
    if end_upstream:
        failures.append(f"{end_upstream} upstream connections still open after the idle wait")
    for failure in failures:
        print(f"FAIL: {failure}")
    print("PASS" if not failures else "FAILED")
    return 1 if failures else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=600.0, help="seconds of load (600)")
    parser.add_argument("--connections", type=int, default=1000)
    parser.add_argument("--report-every", type=float, default=30.0)
    parser.add_argument("--think-ms", type=float, default=100.0, help="max pause between requests")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument(
        "--quick", action="store_true", help="20 s, 100 connections, reports every 5 s"
    )
    args = parser.parse_args()
    if args.quick:
        args.duration, args.connections, args.report_every = 20.0, 100, 5.0
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = min(hard, max(soft, 4 * args.connections + 1024))
    resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))  # inherited by the children
    if want < 2 * args.connections + 256:
        print(f"soak: the open-file limit ({hard}) is too low for {args.connections} connections")
        return 2
    # Cancelled and hostile clients write to sockets Turnout already closed: expected here.
    logging.getLogger("asyncio").setLevel(logging.ERROR)
    procs = Procs()
    with TemporaryDirectory(prefix="turnout-soak-") as tmp_name:
        tmp = Path(tmp_name)
        try:
            upstream_port, edge_port, admin_port = free_port(), free_port(), free_port()
            app = tmp / "upstream.py"
            app.write_text(UPSTREAM_APP)
            up_log = tmp / "upstream.log"
            up = procs.start(
                "upstream",
                [PYTHON, str(app), str(upstream_port), str(DOWNLOAD_BYTES // CHUNK_BYTES)],
                up_log,
                cwd=tmp_name,
            )
            wait_http(f"http://{LOOPBACK}:{upstream_port}/small", 30, up, up_log)
            upstream = f"http://{LOOPBACK}:{upstream_port}"
            settings = {
                "state_dir": str(tmp / "state"),
                "edge_host": LOOPBACK,
                "edge_port": edge_port,
                "admin_host": LOOPBACK,
                "admin_port": admin_port,
                "seed": {
                    "releases": {
                        "web": {"stable": [upstream], "canary": [upstream], "stage": "beta"}
                    },
                    "routes": [{"host": "*", "path_prefix": "/", "release": "web"}],
                },
                "log_level": "warning",
                "admin_token": "soak-admin-token-0123456789",
                "cookie_secret": "soak-cookie-secret-0123456789",
            }
            log = tmp / "turnout.log"
            boot = TURNOUT_BOOT.format(root=str(ROOT))
            turnout = procs.start(
                "turnout", [PYTHON, "-c", boot, json.dumps(settings)], log, cwd=tmp_name
            )
            wait_http(f"http://{LOOPBACK}:{admin_port}/readyz", 30, turnout, log)
            wait_http(f"http://{LOOPBACK}:{edge_port}/small", 10, turnout, log)
            print(
                f"soak: {args.duration:g} s, {args.connections} connections, think <= {args.think_ms:g} ms, "
                f"Turnout pid {turnout.pid}"
            )
            code = asyncio.run(soak(args, edge_port, upstream_port, turnout.pid))
            if turnout.poll() is not None:
                print(f"FAIL: Turnout exited with {turnout.returncode}")
                code = 1
            return code
        finally:
            procs.stop_all()


if __name__ == "__main__":
    raise SystemExit(main())
