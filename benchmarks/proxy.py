#!/usr/bin/env python3
"""Turnout against nginx on loopback, the PERF.md way (one run, interleaved, medians).

    python benchmarks/proxy.py [--duration 10] [--runs 3] [--quick] [--profile]

Layout (2 cores): core 0 runs wrk and the upstream nginx (two ports, stable and canary, a
100-byte and a 120-byte body so the client can tell them apart); core 1 runs the proxy under
test, alone. Setups:

  A  upstream direct   wrk -> stable upstream (the ceiling)
  B  nginx proxy       nginx 1 worker, split_clients on X-User-Id, 10 % canary, keepalive 64
  C  turnout           Turnout (its own HTTP/1.1 server, edge/frontend.py, on uvloop; 1 process),
                       stage beta = 10 %
  E  nginx, N workers  with --workers N (default 2): nginx with `worker_processes N` on both
                       cores (0,1), which it shares with wrk and the upstream
  F  turnout, N wkrs   `turnout serve --workers N` on both cores (a supervisor + N edge
                       processes on one SO_REUSEPORT port); CPU counted for all of them.
                       Printed beside C: RPS and µs CPU per request (target: within 10 %
                       of one process's), and the canary share against the contract

Each round runs every setup once (the order rotates per round) with
`wrk -t1 -c64 -d<duration>s --latency` and then `wrk -t1 -c1 -d<duration>s --latency`; the
table reports medians over the rounds. wrk's Lua script gives every request a different
X-User-Id (a counter mod 100000) and counts the responses by body size, so the canary share
of each proxy is checked in the same run.

`--profile` instead runs Turnout alone under -c64 load with `py-spy record -r 1000 -f raw`
attached and prints where the time per request goes, in µs per request (see README.md).

Everything lives in a temporary directory; every process is started in its own session and
stopped (SIGTERM, then SIGKILL) on exit, on error and on Ctrl-C.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import linecache
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PYTHON = (
    str(ROOT / ".venv" / "bin" / "python")
    if (ROOT / ".venv" / "bin" / "python").exists()
    else sys.executable
)
PY_SPY = (
    str(ROOT / ".venv" / "bin" / "py-spy")
    if (ROOT / ".venv" / "bin" / "py-spy").exists()
    else "py-spy"
)
LOOPBACK = "127.0.0.1"
STABLE_BODY = 100
CANARY_BODY = 120
ID_SPACE = 100_000
CANARY_PERCENT = 10.0
ADMIN_TOKEN = "bench-admin-token-0123456789abcdef"
COOKIE_SECRET = "bench-cookie-secret-0123456789abcdef"

# Targets (issue #9): one Turnout process >= 50 % of nginx's RPS at 64 connections with at most
# 2x nginx's CPU per request, a p50 at 1 connection no more than 0.05 ms above nginx's, and with
# 2 workers a CPU cost per request within 10 % of one process's.
TARGET_RPS_SHARE = 0.50
TARGET_CPU_RATIO = 2.0
TARGET_P50_C1_DELTA_MS = 0.05


def build_description() -> str:
    """Which interpreter and which build of the request path the Turnout setups run."""
    probe = (
        "import sys, sysconfig, importlib\n"
        "mods = ['edge.pipeline', 'edge.frontend', 'edge.upstream', 'flags.evaluate']\n"
        "compiled = [m for m in mods if importlib.import_module(m).__file__.endswith('.so')]\n"
        "pgo = '--enable-optimizations' in (sysconfig.get_config_var('CONFIG_ARGS') or '')\n"
        "print(sys.version.split()[0], sys.executable, '--enable-optimizations' if pgo else 'built without --enable-optimizations (Debian builds PGO by its own rules)',\n"
        "      f'{len(compiled)}/{len(mods)} hot modules compiled with mypyc')"
    )
    out = subprocess.run(
        [PYTHON, "-c", probe], capture_output=True, text=True, cwd=ROOT, check=False
    )
    return out.stdout.strip() or out.stderr.strip()


# -- processes -----------------------------------------------------------------------------------


NICE: list[str] = []  # ["nice", "-n", "-10"] with --nice -10


class Procs:
    """Every process this script starts; all are stopped by `stop_all()`."""

    def __init__(self) -> None:
        self.procs: list[tuple[str, subprocess.Popen]] = []

    def start(self, name: str, argv: list[str], log: Path, **kw) -> subprocess.Popen:
        argv = [*NICE, *argv]
        out = open(log, "ab")
        p = subprocess.Popen(
            argv,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            **kw,
        )
        out.close()
        self.procs.append((name, p))
        return p

    def stop(self, p: subprocess.Popen, sig: int = signal.SIGTERM, wait_s: float = 10.0) -> None:
        if p.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p.pid, sig)
            try:
                p.wait(wait_s)
            except subprocess.TimeoutExpired:
                pass
        # Whatever is left in the process's own session (nginx workers): by group id.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(p.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            p.wait(5)

    def stop_all(self) -> None:
        for _name, p in reversed(self.procs):
            self.stop(p)
        self.procs.clear()


def free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def wait_http(
    url: str, timeout_s: float, proc: subprocess.Popen | None = None, log: Path | None = None
) -> None:
    deadline = time.monotonic() + timeout_s
    last = ""
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            tail = log.read_text(errors="replace")[-3000:] if log and log.exists() else ""
            raise RuntimeError(f"process for {url} exited with {proc.returncode}:\n{tail}")
        try:
            with urllib.request.urlopen(url, timeout=1) as r:
                if r.status == 200:
                    return
                last = f"HTTP {r.status}"
        except Exception as exc:  # noqa: BLE001 - not up yet
            last = repr(exc)
        time.sleep(0.05)
    raise RuntimeError(f"{url} not ready after {timeout_s} s ({last})")


def children(pid: int) -> list[int]:
    out: list[int] = []
    with contextlib.suppress(OSError):
        for tid in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError):
                out += [
                    int(c) for c in Path(f"/proc/{pid}/task/{tid}/children").read_text().split()
                ]
    return out


def rss_kb(pid: int) -> int:
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def machine_busy_ticks() -> int:
    """user + nice + system clock ticks of all cores (/proc/stat).

    irq, softirq and steal are left out: loopback TCP runs its receive path in softirq, which
    the kernel does not charge to the process (wrk at 55k RPS alone makes ~30 % of a core of
    it), so counting it would report the benchmark's own traffic as outside load."""
    v = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:4]]
    return sum(v)


def cpu_ticks(pid: int) -> int:
    """utime + stime of a process, in clock ticks."""
    with contextlib.suppress(OSError, IndexError, ValueError):
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])
    return 0


# -- configuration files -------------------------------------------------------------------------

NGINX_COMMON = """\
worker_processes {workers};
daemon off;
master_process on;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
worker_rlimit_nofile 65536;
events {{ worker_connections 16384; multi_accept on; }}
http {{
    access_log off;
    client_body_temp_path {dir}/client_body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    keepalive_requests 1000000;
    keepalive_timeout 75s;
    server_tokens off;
{body}
}}
"""

UPSTREAM_SERVERS = """\
    server {{
        listen 127.0.0.1:{stable_port} reuseport backlog=4096;
        location / {{ default_type text/plain; return 200 "{stable_body}"; }}
    }}
    server {{
        listen 127.0.0.1:{canary_port} reuseport backlog=4096;
        location / {{ default_type text/plain; return 200 "{canary_body}"; }}
    }}
"""

PROXY_SERVER = """\
    split_clients "${{http_x_user_id}}" $arm {{
        {percent}% canary;
        * stable;
    }}
    upstream stable {{ server 127.0.0.1:{stable_port}; keepalive 64; }}
    upstream canary {{ server 127.0.0.1:{canary_port}; keepalive 64; }}
    server {{
        listen 127.0.0.1:{port} reuseport backlog=4096;
        location / {{
            proxy_pass http://$arm;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }}
    }}
"""

WRK_LUA = """\
-- A different X-User-Id per request (a counter mod %(space)d); responses counted by body size.
local counter = 0
stable, canary, other = 0, 0, 0
local threads = {}

function setup(thread)
    table.insert(threads, thread)
end

function request()
    counter = counter + 1
    wrk.headers["X-User-Id"] = tostring(counter %% %(space)d)
    return wrk.format(nil, nil, wrk.headers)
end

function response(status, headers, body)
    local n = #body
    if n == %(stable)d then
        stable = stable + 1
    elseif n == %(canary)d then
        canary = canary + 1
    else
        other = other + 1
    end
end

function done(summary, latency, requests)
    local s, c, o = 0, 0, 0
    for _, t in ipairs(threads) do
        s = s + t:get("stable")
        c = c + t:get("canary")
        o = o + t:get("other")
    end
    local e = summary.errors
    io.write(string.format(
        "BENCH requests=%%d duration_us=%%d p50_us=%%d p90_us=%%d p99_us=%%d max_us=%%d "
        .. "connect=%%d read=%%d write=%%d status=%%d timeout=%%d stable=%%d canary=%%d other=%%d\\n",
        summary.requests, summary.duration, latency:percentile(50), latency:percentile(90),
        latency:percentile(99), latency.max, e.connect, e.read, e.write, e.status, e.timeout, s, c, o))
end
"""

TURNOUT_BOOT = """\
import sys, json
sys.path.insert(0, {root!r})
from stores.settings import Settings
from turnout.server import run
args = json.loads(sys.argv[1])
run(Settings(**args))
"""


def turnout_seed(stable_port: int, canary_port: int) -> dict:
    return {
        "releases": {
            "web": {
                "stable": [f"http://{LOOPBACK}:{stable_port}"],
                "canary": [f"http://{LOOPBACK}:{canary_port}"],
                "stage": "beta",
            }
        },
        "routes": [{"host": "*", "path_prefix": "/", "release": "web"}],
    }


def turnout_expected_share() -> float | None:
    """The share of ids 0..ID_SPACE-1 Turnout's contract puts in the canary (flags.hashing)."""
    try:
        sys.path.insert(0, str(ROOT))
        from flags.hashing import position, threshold

        t = threshold(CANARY_PERCENT)
        return sum(position("web", str(i)) < t for i in range(ID_SPACE)) / ID_SPACE
    except Exception:  # noqa: BLE001 - informative only
        return None


# -- the bench -----------------------------------------------------------------------------------


@dataclass
class Result:
    rps: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    errors: int
    stable: int
    canary: int
    other: int
    requests: int


@dataclass
class Setup:
    key: str
    name: str
    port: int
    pid_for_rss: callable = None  # () -> list of pids
    cpu_pid: callable = None
    c64: list[Result] = field(default_factory=list)
    foreign: list[float] = field(default_factory=list)
    c1: list[Result] = field(default_factory=list)
    rss: list[int] = field(default_factory=list)
    cpu_share: list[float] = field(default_factory=list)


def parse_wrk(out: str) -> Result:
    m = re.search(r"^BENCH (.*)$", out, re.M)
    if not m:
        raise RuntimeError(f"wrk printed no BENCH line:\n{out[-2000:]}")
    v = {k: int(x) for k, x in (kv.split("=") for kv in m.group(1).split())}
    errors = v["connect"] + v["read"] + v["write"] + v["status"] + v["timeout"]
    return Result(
        rps=v["requests"] / (v["duration_us"] / 1e6),
        p50_ms=v["p50_us"] / 1000,
        p90_ms=v["p90_us"] / 1000,
        p99_ms=v["p99_us"] / 1000,
        errors=errors,
        stable=v["stable"],
        canary=v["canary"],
        other=v["other"],
        requests=v["requests"],
    )


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.tmp = Path(tempfile.mkdtemp(prefix="turnout-bench-"))
        self.tmp.chmod(0o755)  # nginx workers run as nobody
        self.procs = Procs()
        self.lua = self.tmp / "bench.lua"
        self.lua.write_text(
            WRK_LUA % {"space": ID_SPACE, "stable": STABLE_BODY, "canary": CANARY_BODY}
        )
        self.stable_port = free_port()
        self.canary_port = free_port()
        self.turnout_proc: subprocess.Popen | None = None
        self.nginx_proxy_proc: subprocess.Popen | None = None

    # -- starting things

    def start_nginx(
        self, name: str, core: int | str, body: str, workers: int = 1
    ) -> subprocess.Popen:
        d = self.tmp / name
        d.mkdir()
        conf = d / "nginx.conf"
        conf.write_text(NGINX_COMMON.format(dir=d, body=body, workers=workers))
        log = d / "stdout.log"
        p = self.procs.start(
            name, ["taskset", "-c", str(core), "nginx", "-p", str(d), "-c", str(conf)], log
        )
        return p

    def start_upstreams(self) -> None:
        body = UPSTREAM_SERVERS.format(
            stable_port=self.stable_port,
            canary_port=self.canary_port,
            stable_body="s" * (STABLE_BODY - 1) + "\\n",
            canary_body="c" * (CANARY_BODY - 1) + "\\n",
        )
        p = self.start_nginx("upstream", 0, body)
        for port, size in ((self.stable_port, STABLE_BODY), (self.canary_port, CANARY_BODY)):
            wait_http(f"http://{LOOPBACK}:{port}/", 10, p, self.tmp / "upstream" / "stdout.log")
            with urllib.request.urlopen(f"http://{LOOPBACK}:{port}/", timeout=2) as r:
                got = len(r.read())
            if got != size:
                raise RuntimeError(f"upstream on {port} serves {got} bytes, expected {size}")

    def start_nginx_proxy(self, workers: int = 1) -> tuple[int, subprocess.Popen]:
        port = free_port()
        body = PROXY_SERVER.format(
            port=port,
            percent=f"{CANARY_PERCENT:g}",
            stable_port=self.stable_port,
            canary_port=self.canary_port,
        )
        # 1 worker: alone on core 1; 2 workers: both cores (shared with wrk and the upstream).
        name = "nginx-proxy" if workers == 1 else f"nginx-proxy-{workers}w"
        p = self.start_nginx(name, 1 if workers == 1 else "0,1", body, workers)
        wait_http(f"http://{LOOPBACK}:{port}/", 10, p, self.tmp / name / "stdout.log")
        if workers == 1:
            self.nginx_proxy_proc = p
        return port, p

    def start_turnout(self, workers: int = 1, access_log: str = "off") -> tuple[int, int]:
        edge_port, admin_port = free_port(), free_port()
        tag = "turnout" if workers == 1 else f"turnout-{workers}w"
        if access_log != "off":
            tag += "-access-log"
        state = self.tmp / f"turnout-state-{tag}"
        state.mkdir()
        settings = {
            "state_dir": str(state),
            "edge_host": LOOPBACK,
            "edge_port": edge_port,
            "admin_host": LOOPBACK,
            "admin_port": admin_port,
            "seed": turnout_seed(self.stable_port, self.canary_port),
            "log_level": "warning",
            "admin_token": ADMIN_TOKEN,
            "cookie_secret": COOKIE_SECRET,
            "expose_decision_headers": True,
            "workers": workers,
            "access_log": access_log,
        }
        log = self.tmp / f"turnout-{tag}.log"
        argv = [
            "taskset",
            "-c",
            "1" if workers == 1 else "0,1",  # N workers: both cores, as nginx's N workers
            PYTHON,
            "-c",
            TURNOUT_BOOT.format(root=str(ROOT)),
            json.dumps(settings),
        ]
        p = self.procs.start(tag, argv, log, cwd=str(self.tmp))
        self.turnout_proc = p
        wait_http(f"http://{LOOPBACK}:{admin_port}/readyz", 30, p, log)
        wait_http(f"http://{LOOPBACK}:{edge_port}/", 10, p, log)
        if workers > 1:
            deadline = time.monotonic() + 30
            while len(children(p.pid)) < workers:  # the supervisor and its workers
                if time.monotonic() > deadline or p.poll() is not None:
                    raise RuntimeError(f"turnout --workers {workers} did not start all workers")
                time.sleep(0.05)
        return edge_port, admin_port

    def our_pids(self) -> list[int]:
        pids: list[int] = []
        for _name, p in self.procs.procs:
            if p.poll() is None:
                pids += [p.pid, *children(p.pid)]
        return pids

    def nginx_worker_pids(self) -> list[int]:
        p = self.nginx_proxy_proc
        return children(p.pid) if p is not None else []

    # -- load

    def wrk_argv(self, port: int, conns: int, duration: float) -> list[str]:
        """wrk on core 0 with the counting Lua script (the one load of every setup)."""
        return [
            *NICE,
            "taskset",
            "-c",
            "0",
            "wrk",
            "-t1",
            f"-c{conns}",
            f"-d{duration:g}s",
            "--latency",
            "--timeout",
            "5s",
            "-s",
            str(self.lua),
            f"http://{LOOPBACK}:{port}/",
        ]

    def wrk(self, port: int, conns: int, duration: float) -> Result:
        p = subprocess.Popen(
            self.wrk_argv(port, conns, duration),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        try:
            out, _ = p.communicate(timeout=duration + 30)
        except BaseException:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)
            p.wait()
            raise
        if p.returncode != 0:
            raise RuntimeError(f"wrk exited {p.returncode}:\n{out[-2000:]}")
        return parse_wrk(out)

    def check_alive(self) -> None:
        for name, p in self.procs.procs:
            if p.poll() is not None:
                tail = ""
                for log in (
                    self.tmp / f"{name}.log",
                    self.tmp / name / "stdout.log",
                    self.tmp / name / "error.log",
                ):
                    if name in str(log) and log.exists():
                        tail += log.read_text(errors="replace")[-3000:]
                raise RuntimeError(f"{name} (pid {p.pid}) exited with {p.returncode}\n{tail}")

    # -- the comparison

    def run(self) -> int:
        a = self.args
        print(f"temp dir {self.tmp}; python {PYTHON}", flush=True)
        self.start_upstreams()
        nginx_port, _ = self.start_nginx_proxy()
        edge_port, _admin = self.start_turnout()
        tp = self.turnout_proc
        assert tp is not None
        setups = [
            Setup("A", "upstream direct", self.stable_port, lambda: [], lambda: []),
            Setup(
                "B",
                "nginx proxy (1 worker)",
                nginx_port,
                self.nginx_worker_pids,
                self.nginx_worker_pids,
            ),
            Setup("C", "turnout (1 process)", edge_port, lambda: [tp.pid], lambda: [tp.pid]),
        ]
        if a.access_log:
            log_port, _ = self.start_turnout(access_log=str(self.tmp / "access.log"))
            lp = self.turnout_proc
            assert lp is not None
            setups.append(
                Setup(
                    "L",
                    "turnout + access log (file)",
                    log_port,
                    lambda: [lp.pid],
                    # CPU: the edge and its access-log writer process (edge/logwriter.py),
                    # which inherits the edge's core: what the log costs is all counted.
                    lambda: [lp.pid, *children(lp.pid)],
                )
            )
        if a.workers >= 2:
            n = a.workers
            nginx_n_port, np_ = self.start_nginx_proxy(n)
            turnout_n_port, _ = self.start_turnout(workers=n)
            tn = self.turnout_proc
            assert tn is not None
            # The supervisor is counted with its workers: it is part of what N workers cost.
            setups += [
                Setup(
                    "E",
                    f"nginx proxy ({n} workers)",
                    nginx_n_port,
                    lambda: children(np_.pid),
                    lambda: children(np_.pid),
                ),
                Setup(
                    "F",
                    f"turnout --workers {n}",
                    turnout_n_port,
                    lambda: [tn.pid, *children(tn.pid)],
                    lambda: [tn.pid, *children(tn.pid)],
                ),
            ]
        print(
            f"upstreams :{self.stable_port} (stable, {STABLE_BODY} B) :{self.canary_port} (canary, {CANARY_BODY} B); "
            f"nginx proxy :{nginx_port}; turnout edge :{edge_port}",
            flush=True,
        )
        # Warm-up: fill the keep-alive pools and caches; not measured.
        for s in setups:
            self.wrk(s.port, 64, a.warmup)
            self.check_alive()
        for r in range(a.runs):
            order = setups[r % len(setups) :] + setups[: r % len(setups)]
            for s in order:
                pids = s.cpu_pid()
                ours = self.our_pids()
                t0 = {pid: cpu_ticks(pid) for pid in ours}
                m0 = machine_busy_ticks()
                c0 = os.times()
                w0 = time.monotonic()
                res64 = self.wrk(s.port, 64, a.duration)
                wall = time.monotonic() - w0
                c1 = os.times()
                hz = os.sysconf("SC_CLK_TCK")
                delta = {pid: cpu_ticks(pid) - t0[pid] for pid in ours}
                if pids:
                    s.cpu_share.append(sum(delta.get(pid, 0) for pid in pids) / hz / wall)
                # CPU used by anything else on the machine during the run (other users' jobs):
                # all busy ticks minus wrk (a waited child), this script and our servers.
                mine = (
                    c1.children_user
                    + c1.children_system
                    - c0.children_user
                    - c0.children_system
                    + c1.user
                    + c1.system
                    - c0.user
                    - c0.system
                )
                other = (machine_busy_ticks() - m0) / hz - sum(delta.values()) / hz - mine
                s.foreign.append(max(0.0, other) / wall)
                self.check_alive()
                res1 = self.wrk(s.port, 1, a.duration)
                self.check_alive()
                s.c64.append(res64)
                s.c1.append(res1)
                rss = sum(rss_kb(pid) for pid in s.pid_for_rss())
                s.rss.append(rss)
                print(
                    f"  run {r + 1}/{a.runs} {s.key} {s.name:<24} c64 {res64.rps:>9,.0f} rps  p50 {res64.p50_ms:.2f} "
                    f"p99 {res64.p99_ms:.2f} ms  err {res64.errors}  | c1 {res1.rps:>7,.0f} rps  "
                    f"p50 {res1.p50_ms:.3f} p99 {res1.p99_ms:.3f} ms  err {res1.errors}",
                    flush=True,
                )
        self.report(setups)
        return 0

    def report(self, setups: list[Setup]) -> None:
        a = self.args
        med = statistics.median
        print()
        print(f"turnout runs on: {build_description()}")
        print(
            f"wrk -t1 -c64 -d{a.duration:g}s --latency and -c1, median of {a.runs} interleaved run(s); "
            f"proxy on core 1, wrk + upstream nginx on core 0; {os.cpu_count()} cores"
            f"{f'; everything under nice -n {a.nice}' if a.nice else ''}"
        )
        hdr = (
            f"{'setup':<27} {'RPS c64':>9} {'p50 c64':>8} {'p99 c64':>8} {'RPS c1':>8} {'p50 c1':>8} "
            f"{'p99 c1':>8} {'RSS MiB':>8} {'CPU c64':>8} {'µs CPU/r':>8} {'noise':>6} {'errors':>7} {'x nginx':>8}"
        )
        print(hdr)
        print("-" * len(hdr))
        nginx = setups[1]
        n_rps = med(r.rps for r in nginx.c64)
        rows = {}
        for s in setups:
            rps = med(r.rps for r in s.c64)
            p50 = med(r.p50_ms for r in s.c64)
            p99 = med(r.p99_ms for r in s.c64)
            rps1 = med(r.rps for r in s.c1)
            p50_1 = med(r.p50_ms for r in s.c1)
            p99_1 = med(r.p99_ms for r in s.c1)
            errs = sum(r.errors for r in s.c64) + sum(r.errors for r in s.c1)
            rss = f"{s.rss[-1] / 1024:.1f}" if s.rss and s.rss[-1] else "-"
            cpu = f"{med(s.cpu_share):.0%}" if s.cpu_share else "-"
            cpu_us = (
                f"{med(c / r.rps * 1e6 for c, r in zip(s.cpu_share, s.c64)):.1f}"
                if s.cpu_share
                else "-"
            )
            noise = f"{max(s.foreign):.0%}" if s.foreign else "-"
            rows[s.key] = (rps, p50_1)
            print(
                f"{s.key} {s.name:<25} {rps:>9,.0f} {p50:>8.2f} {p99:>8.2f} {rps1:>8,.0f} {p50_1:>8.3f} "
                f"{p99_1:>8.3f} {rss:>8} {cpu:>8} {cpu_us:>8} {noise:>6} {errs:>7} {rps / n_rps:>8.2f}"
            )
        print(
            "(latencies in ms; RSS: the proxy process after its last run, for nginx the worker; CPU c64: the proxy's\n"
            " CPU seconds per wall second during -c64, µs CPU/r: that per request; noise: the worst CPU share of\n"
            " a core used by processes outside this benchmark during a -c64 run (user+system time; softirq excluded); errors: wrk socket errors + non-2xx)"
        )
        worst_noise = max((max(s.foreign) for s in setups if s.foreign), default=0.0)
        if worst_noise > 0.10:
            print(
                f"WARNING: other processes used up to {worst_noise:.0%} of a core during the runs; "
                "figures are noisy (compare the ratios, or rerun on an idle machine)"
            )
        t_rps, t_p50 = rows["C"]
        share = t_rps / n_rps
        delta = t_p50 - rows["B"][1]
        print()
        print(
            f"Turnout / nginx RPS at 64 connections: {share:.3f}  (target ≥ {TARGET_RPS_SHARE:.2f})  "
            f"{'PASS' if share >= TARGET_RPS_SHARE else 'MISS'}"
        )
        print(
            f"Turnout p50 at 1 connection − nginx's: {delta:+.3f} ms  (target ≤ +{TARGET_P50_C1_DELTA_MS:.2f} ms)  "
            f"{'PASS' if delta <= TARGET_P50_C1_DELTA_MS else 'MISS'}"
        )
        tc = setups[2]
        if tc.cpu_share and nginx.cpu_share:
            us = med(c / r.rps * 1e6 for c, r in zip(tc.cpu_share, tc.c64))
            n_us = med(c / r.rps * 1e6 for c, r in zip(nginx.cpu_share, nginx.c64))
            print(
                f"Turnout CPU per request at 64 connections: {us:.1f} µs = {us / n_us:.2f} x nginx's "
                f"{n_us:.1f} µs (target ≤ {TARGET_CPU_RATIO:g} x)  "
                f"{'PASS' if us <= TARGET_CPU_RATIO * n_us else 'MISS'}  (its core {med(tc.cpu_share):.0%} busy)"
            )
        by_key = {s.key: s for s in setups}
        if "F" in by_key and tc.cpu_share and by_key["F"].cpu_share:
            tf, ne = by_key["F"], by_key["E"]

            def us_per_request(s: Setup) -> float:
                return med(c / r.rps * 1e6 for c, r in zip(s.cpu_share, s.c64))

            one, many = us_per_request(tc), us_per_request(tf)
            print(
                f"{tf.name}: {med(r.rps for r in tf.c64):,.0f} RPS at 64 connections "
                f"({med(r.rps for r in tf.c64) / med(r.rps for r in ne.c64):.2f} x {ne.name}'s, "
                f"{med(r.rps for r in tf.c64) / t_rps:.2f} x 1 process); CPU per request "
                f"{many:.1f} µs vs {one:.1f} µs with 1 process: {many / one - 1:+.1%} "
                f"(target within ±10 %) {'PASS' if many <= one * 1.10 else 'MISS'}; "
                f"{ne.name}: {us_per_request(ne):.1f} µs"
            )
            print(
                "  (both cores are shared with wrk and the upstream nginx in E and F, so their RPS\n"
                "   is bounded by that core too; µs CPU per request is the comparable figure)"
            )
        print()
        expected = turnout_expected_share()
        print("Canary share (responses counted by body size in wrk's Lua, all runs, -c64 and -c1):")
        for s in setups:
            st = sum(r.stable for r in s.c64 + s.c1)
            ca = sum(r.canary for r in s.c64 + s.c1)
            ot = sum(r.other for r in s.c64 + s.c1)
            total = st + ca + ot
            line = f"  {s.key} {s.name:<25} canary {ca / total if total else 0:6.2%} of {total:,} responses"
            if ot:
                line += f"  ({ot:,} neither stable nor canary body!)"
            if s.key == "A":
                line += "  (expected 0: direct to stable)"
            elif s.key == "B":
                line += f"  (split_clients {CANARY_PERCENT:g} %, MurmurHash2 of the id)"
            elif s.key == "E":
                line += "  (split_clients, as B)"
            elif s.key in ("C", "F") and expected is not None:
                ok = abs(ca / total - expected) < 0.01 if total else False
                line += (
                    f"  (contract for ids 0..{ID_SPACE - 1}: {expected:.2%}) "
                    f"{'PASS' if ok and not ot else 'MISS'}"
                )
            print(line)

    # -- the profile

    def profile(self) -> int:
        a = self.args
        print(f"temp dir {self.tmp}; python {PYTHON}", flush=True)
        self.start_upstreams()
        # With --access-log the profiled instance writes its access log (setup L).
        access_log = str(self.tmp / "access.log") if a.access_log else "off"
        edge_port, _admin = self.start_turnout(access_log=access_log)
        tp = self.turnout_proc
        assert tp is not None
        conns = a.profile_connections
        self.wrk(edge_port, 64, a.warmup)  # warm the pools
        # 1) the same load without the profiler: the reference RPS
        base = self.wrk(edge_port, conns, a.profile_duration)
        self.check_alive()
        # 2) the same load with py-spy attached; wrk runs 2 s longer on each side
        raw = self.tmp / "profile.txt"
        spy_log = self.tmp / "py-spy.log"
        lead = 2.0
        wrk = subprocess.Popen(
            self.wrk_argv(edge_port, conns, a.profile_duration + 2 * lead),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        try:
            time.sleep(lead)
            t0 = cpu_ticks(tp.pid)
            w0 = time.monotonic()
            spy_argv = [
                *NICE,
                "taskset",
                "-c",
                "0",
                PY_SPY,
                "record",
                "--pid",
                str(tp.pid),
                "-r",
                str(a.rate),
                "-f",
                "raw",
                "-d",
                f"{a.profile_duration:g}",
                "-o",
                str(raw),
                "--full-filenames",
            ]
            if a.nonblocking:
                spy_argv.append("--nonblocking")
            if a.gil:
                spy_argv.append("--gil")
            spy = subprocess.run(
                spy_argv,
                stdout=open(spy_log, "wb"),
                stderr=subprocess.STDOUT,
                timeout=a.profile_duration + 60,
                start_new_session=True,
            )
            spy_wall = time.monotonic() - w0
            spy_cpu = (cpu_ticks(tp.pid) - t0) / os.sysconf("SC_CLK_TCK")
            out, _ = wrk.communicate(timeout=a.profile_duration + 2 * lead + 30)
        except BaseException:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(wrk.pid, signal.SIGKILL)
            wrk.wait()
            raise
        if spy.returncode != 0 or not raw.exists():
            raise RuntimeError(
                f"py-spy failed ({spy.returncode}):\n{spy_log.read_text(errors='replace')[-2000:]}"
            )
        loaded = parse_wrk(out)
        self.check_alive()
        self.report_profile(raw, base, loaded, spy_wall, spy_cpu)
        if a.keep_profile:
            dest = Path(a.keep_profile)
            shutil.copy(raw, dest)
            print(f"raw py-spy output copied to {dest}")
        return 0

    def report_profile(
        self, raw: Path, base: Result, loaded: Result, wall: float, cpu_s: float
    ) -> None:
        a = self.args
        main: list[tuple[list[str], int]] = []
        other_threads = 0
        for line in raw.read_text(errors="replace").splitlines():
            stack, _, count = line.rpartition(" ")
            if not stack or not count.isdigit():
                continue
            frames = stack.split(";")
            if frames[0].startswith("Thread._bootstrap ("):
                other_threads += int(count)  # thread-pool workers (asyncio.to_thread), not the loop
            else:
                # The loop thread. With --nonblocking some stacks are read while they change and
                # come back cut short (no <module> root): their leaf is still right, so they count.
                main.append((frames, int(count)))
        total = sum(c for _, c in main)
        if not total:
            print("py-spy recorded no samples of the event-loop thread")
            return
        requests = loaded.rps * wall
        wall_us = wall / requests * 1e6  # wall time of the one loop thread per request (= 1/RPS)
        cpu_us = cpu_s / requests * 1e6  # the process's CPU time per request (/proc/PID/stat)
        # A frame's cost = its share of the loop thread's samples x the CPU time per request.
        # (Scaling by CPU, not by 1/RPS, keeps idle time and time the thread spent preempted by
        # other processes out of the figures; with --gil the epoll wait, which uvloop runs
        # without the GIL, is not sampled at all.)
        us_per_sample = cpu_us / total
        loop_leaf = sum(c for f, c in main if f[-1].startswith("Runner.run ("))
        print()
        print(
            f"Turnout under wrk -t1 -c{a.profile_connections}, py-spy record -r {a.rate} -f raw for {a.profile_duration:g} s "
            f"({'--nonblocking' if a.nonblocking else 'blocking: the process is paused for every sample'}"
            f"{', --gil' if a.gil else ''})"
        )
        print(
            f"  RPS without profiler {base.rps:,.0f} ({1e6 / base.rps:.1f} µs/request); "
            f"with profiler {loaded.rps:,.0f} ({wall_us:.1f} µs/request)"
        )
        print(
            f"  loop-thread samples {total:,} ({total / wall:,.0f}/s), other threads {other_threads:,} (ignored); "
            f"process CPU {cpu_s / wall:.0%} of a core = {cpu_us:.1f} µs CPU/request"
        )
        print(
            f"  µs/request = share of loop-thread samples x {cpu_us:.1f} µs CPU/request. A C call counts in its "
            f"Python caller\n  (transport.write's send() syscall in the line that calls it); samples whose leaf is "
            f"Runner.run are uvloop's own\n  C code and its syscalls (reads, epoll): {loop_leaf * us_per_sample:.1f} µs/request."
        )

        def short(frame: str) -> str:
            frame = re.sub(r"\(/\S*/site-packages/", "(", frame)
            frame = re.sub(r"\(/usr/lib/python3\.\d+/", "(", frame)
            return frame.replace("(" + str(ROOT) + "/", "(")

        def func(frame: str) -> str:
            return re.sub(r":\d+\)$", ")", short(frame))

        def source(frame: str) -> str:
            m = re.search(r"\((/[^()]*):(\d+)\)$", frame)
            return linecache.getline(m.group(1), int(m.group(2))).strip() if m else ""

        def component(frame: str) -> str:
            if frame.startswith("Runner.run ("):
                return "uvloop C code (loop, recv, epoll)"
            m = re.search(r"\(" + re.escape(str(ROOT)) + r"/([a-z_]+/[a-z_]+)\.py", frame)
            if m:
                return m.group(1) + ".py"
            if "site-packages/" in frame:
                return re.sub(r".*site-packages/([^/]+).*", r"\1", frame)
            return "stdlib (asyncio, abc, ...)"

        self_line: dict[str, int] = defaultdict(int)
        self_func: dict[str, int] = defaultdict(int)
        incl_func: dict[str, int] = defaultdict(int)
        by_component: dict[str, int] = defaultdict(int)
        line_src: dict[str, str] = {}
        writes = 0
        for frames, count in main:
            leaf = frames[-1]
            key = short(leaf)
            self_line[key] += count
            if key not in line_src:
                line_src[key] = source(leaf)
            if re.search(r"transport\.write(lines)?\(", line_src[key]):
                writes += count
            self_func[func(leaf)] += count
            by_component[component(leaf)] += count
            for f in {func(x) for x in frames}:
                incl_func[f] += count

        print()
        print("Self time by component")
        print(f"  {'µs/req':>7} {'share':>6}  component")
        for name, count in sorted(by_component.items(), key=lambda kv: -kv[1]):
            print(f"  {count * us_per_sample:>7.2f} {count / total:>6.1%}  {name}")
        print(f"  {'-' * 7}")
        print(
            f"  {total * us_per_sample:>7.2f} 100.0%  total CPU per request; of which socket writes "
            f"(transport.write lines, the send() syscalls): {writes * us_per_sample:.2f} µs ({writes / total:.0%})"
        )

        def table(title: str, data: dict[str, int], n: int, skip: tuple[str, ...] = ()) -> None:
            print()
            print(f"{title}")
            print(f"  {'µs/req':>7} {'share':>6}  frame")
            rows = [
                kv
                for kv in sorted(data.items(), key=lambda kv: -kv[1])
                if not kv[0].startswith(skip)
            ]
            for name, count in rows[:n]:
                label = name
                if data is self_line and line_src.get(name):
                    label = f"{name:<72} {line_src[name][:56]}"
                if name.startswith("Runner.run ("):
                    label += "   <- uvloop's C code: loop, reads, epoll"
                print(f"  {count * us_per_sample:>7.2f} {count / total:>6.1%}  {label}")

        table(
            "Top frames by self time (function; C calls count in their Python caller)",
            self_func,
            a.top,
        )
        table("Top lines by self time", self_line, a.top)
        cut = sum(c for f, c in main if not f[0].startswith("<module> ("))
        if cut:
            print(
                f"\n({cut / total:.0%} of the loop-thread stacks came back cut short (--nonblocking): they count in the "
                "self-time tables, but inclusive times below are low by up to that share)"
            )
        table(
            "Top functions by inclusive time",
            incl_func,
            a.top + 5,
            skip=(
                "<module> (",
                "run (turnout/server.py",
                "run (asyncio/runners.py",
                "Runner.run (",
            ),
        )

    def close(self) -> None:
        self.procs.stop_all()
        if self.args.keep_tmp:
            print(f"kept {self.tmp}")
        else:
            shutil.rmtree(self.tmp, ignore_errors=True)


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--duration", type=float, default=10.0, help="seconds per wrk run (default 10)")
    ap.add_argument(
        "--runs",
        type=int,
        default=3,
        help="interleaved rounds; the table shows medians (default 3)",
    )
    ap.add_argument(
        "--warmup",
        type=float,
        default=2.0,
        help="unmeasured wrk seconds per setup first (default 2)",
    )
    ap.add_argument("--quick", action="store_true", help="smoke test: 1 run of 3 s per setup")
    ap.add_argument(
        "--profile", action="store_true", help="profile Turnout under load with py-spy instead"
    )
    ap.add_argument(
        "--profile-duration", type=float, default=10.0, help="py-spy seconds (default 10)"
    )
    ap.add_argument(
        "--rate", type=int, default=1000, help="py-spy samples per second (default 1000)"
    )
    ap.add_argument(
        "--blocking",
        dest="nonblocking",
        action="store_false",
        help="let py-spy pause the process for every sample (exact stacks, but at 1000 Hz it "
        "cuts Turnout's RPS by ~4x); default: --nonblocking",
    )
    ap.add_argument(
        "--no-gil",
        dest="gil",
        action="store_false",
        help="sample the loop thread also when it does not hold the GIL (includes epoll waits)",
    )
    ap.add_argument("--top", type=int, default=15, help="frames to list (default 15)")
    ap.add_argument(
        "--profile-connections",
        type=int,
        default=64,
        metavar="N",
        help="wrk connections while profiling (default 64; 1 shows the latency path)",
    )
    ap.add_argument("--keep-profile", metavar="FILE", help="copy the raw py-spy output to FILE")
    ap.add_argument(
        "--nice",
        type=int,
        default=0,
        metavar="N",
        help="run wrk, the servers and py-spy under `nice -n N` (e.g. -10, needs root) so that "
        "other jobs on a shared machine disturb the figures less (default 0: off)",
    )
    ap.add_argument("--keep-tmp", action="store_true", help="keep the temp dir (configs, logs)")
    ap.add_argument(
        "--workers",
        type=int,
        default=2,
        metavar="N",
        help="also run E (nginx, N workers) and F (turnout --workers N) on both cores; "
        "0 or 1 skips them (default 2)",
    )
    ap.add_argument(
        "--access-log",
        action="store_true",
        help="also run setup L, Turnout writing its access log to a file (C runs with "
        "access_log: off), to measure the access log's cost (issue #13 target: <= 5 %% RPS)",
    )
    args = ap.parse_args()
    if args.quick:
        args.runs, args.duration, args.warmup = 1, 3.0, 1.0
    if args.nice:
        NICE[:] = ["nice", "-n", str(args.nice)]
    for tool in ("nginx", "wrk", "taskset"):
        if shutil.which(tool) is None:
            print(f"{tool} not found (apt-get install nginx-light wrk util-linux)", file=sys.stderr)
            return 2
    if (os.cpu_count() or 1) < 2:
        print("needs 2 cores (core 0: wrk + upstream, core 1: the proxy)", file=sys.stderr)
        return 2

    def on_term(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, signal.default_int_handler)  # even if started with SIGINT ignored
    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGHUP, on_term)
    bench = Bench(args)
    try:
        return bench.profile() if args.profile else bench.run()
    except KeyboardInterrupt:
        print("interrupted; stopping everything", file=sys.stderr)
        return 130
    except RuntimeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        bench.close()


if __name__ == "__main__":
    sys.exit(main())
