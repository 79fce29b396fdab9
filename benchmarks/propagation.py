"""How fast does a change made through one instance's admin API reach the whole fleet?

    .venv/bin/python benchmarks/propagation.py [--changes 100] [--instances 4] [--poll-interval 2]
                                               [--workers N]

Layout (loopback only, every process started and stopped here):

* its own `redis-server` on a free port (never the shared 6379), no persistence;
* two tiny upstreams (`tests.harness.EchoApp`, "stable" and "canary"), each in its own
  uvicorn process so they do not share this script's GIL;
* N `turnout serve` processes (default 4) on that Redis, `poll_interval_s` 2 by default:
  the poll is only the truth-keeper, pub/sub pokes are what should make changes fast;
* one poller thread per instance, sending GETs in a tight loop on one keep-alive connection
  and recording the first moment each instance's responses carry
  `X-Turnout-Config-Version >= v`.
* with `--workers N` (N >= 2) each instance is `turnout serve --workers N`, and there is one
  poller per *worker*: its connection is pinned to that worker process (connections are
  opened until /proc shows that worker holds the server end, `tests/serveproc.py`), so a
  change is only counted as arrived once every worker of every instance serves it. The
  per-poller table then shows each worker's own propagation.

`--changes` changes go through instance 1's admin API, alternating stage changes (open,
beta) with rollbacks and restores. For each change v two latencies are recorded:

* from return: the last instance's first response at >= v, minus the moment the admin call
  returned (0 when every instance already served v before the reply arrived);
* from start: the same minus the moment the admin call was sent.

Printed: p50 / p99 / max of both (ms), the target (p99 <= 50 ms from return) with PASS or
MISS, and each instance's own `turnout_config_apply_lag_seconds` histogram (commit time to
apply time as the instance sees it). Exit status 0 on PASS. Bounded: the whole run stops
after `--max-seconds` (default 100) and every process is stopped on the way out.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import math
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import orjson  # noqa: E402
import yaml  # noqa: E402

from tests.redisproc import LOCALHOST, RedisServer, free_port  # noqa: E402
from tests.serveproc import children, connection_owner  # noqa: E402

TOKEN = "propagation-admin-token-0123456789"
COOKIE_SECRET = "propagation-cookie-secret-0123456789"
TARGET_P99_MS = 50.0
PER_CHANGE_BOUND_S = 5.0
START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10.0
PIN_TRIES = 200  # connections opened to land one on a given worker (the kernel hashes them)

UPSTREAM_CODE = (
    "import sys, uvicorn\n"
    "from tests.harness import EchoApp\n"
    "uvicorn.run(EchoApp(sys.argv[1]), host='127.0.0.1', port=int(sys.argv[2]), "
    "http='httptools', lifespan='off', log_level='warning', access_log=False)\n"
)


def stop_process(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)  # our own session only
            proc.wait(timeout=STOP_TIMEOUT_S)


def http_call(
    port: int, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection(LOCALHOST, port, timeout=10)
    try:
        payload = None if body is None else orjson.dumps(body)
        hdrs = dict(headers or {})
        if payload is not None:
            hdrs["content-type"] = "application/json"
        conn.request(method, path, body=payload, headers=hdrs)
        resp = conn.getresponse()
        data = resp.read()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, data
    finally:
        conn.close()


def wait_for(predicate: Any, what: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError, http.client.HTTPException):
            if predicate():
                return
        time.sleep(0.05)
    raise RuntimeError(f"timed out waiting for {what}")


class Instance:
    def __init__(
        self,
        workdir: Path,
        index: int,
        store: str,
        seed: dict[str, Any],
        poll: float,
        workers: int = 1,
    ):
        self.name = f"instance{index + 1}"
        self.workers = workers
        self.edge_port = free_port()
        self.admin_port = free_port()
        self.dir = workdir / self.name
        self.dir.mkdir()
        self.config = self.dir / "settings.yaml"
        self.config.write_text(
            yaml.safe_dump(
                {
                    "edge_host": LOCALHOST,
                    "edge_port": self.edge_port,
                    "admin_host": LOCALHOST,
                    "admin_port": self.admin_port,
                    "admin_token": TOKEN,
                    "cookie_secret": COOKIE_SECRET,
                    "state_dir": str(self.dir / "state"),
                    "store": store,
                    "poll_interval_s": poll,
                    "expose_decision_headers": True,
                    "log_level": "warning",
                    "seed": seed,
                }
            )
        )
        self.log = self.dir / "turnout.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "turnout.cli",
                    "serve",
                    "--config",
                    str(self.config),
                    "--workers",
                    str(self.workers),
                ],
                cwd=ROOT,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def wait_ready(self) -> None:
        def ready() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited: {self.log.read_text()[-2000:]}")
            return http_call(self.admin_port, "GET", "/readyz")[0] == 200 and (
                self.workers == 1 or len(self.worker_pids()) == self.workers
            )

        wait_for(ready, f"{self.name} ready", START_TIMEOUT_S)

    def worker_pids(self) -> list[int]:
        assert self.proc is not None
        return [self.proc.pid] if self.workers == 1 else children(self.proc.pid)

    def admin(self, method: str, path: str, body: Any) -> tuple[int, Any]:
        status, _, data = http_call(
            self.admin_port, method, path, body, {"authorization": f"Bearer {TOKEN}"}
        )
        return status, orjson.loads(data) if data else None

    def metrics(self) -> dict[str, float]:
        _, _, data = http_call(self.admin_port, "GET", "/metrics")
        out: dict[str, float] = {}
        for line in data.decode().splitlines():
            if line and not line.startswith("#"):
                key, _, value = line.rpartition(" ")
                out[key] = float(value)
        return out

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)
            self.proc = None


class Poller(threading.Thread):
    """Tight loop of GETs on one keep-alive connection; first time each version is seen."""

    def __init__(
        self, inst: Instance, stop: threading.Event, deadline: float, pid: int | None = None
    ) -> None:
        super().__init__(daemon=True, name=f"poller-{inst.name}")
        self.inst = inst
        self.pid = pid  # pin the connection to this worker process (None: any)
        self.label = inst.name if pid is None else f"{inst.name}/pid {pid}"
        self.stop_event = stop
        self.deadline = deadline
        self.seen = 0
        self.first_seen: dict[int, float] = {}
        self.requests = 0
        self.errors = 0
        self.cond = threading.Condition()

    def connect(self) -> http.client.HTTPConnection:
        for _ in range(PIN_TRIES):
            conn = http.client.HTTPConnection(LOCALHOST, self.inst.edge_port, timeout=10)
            conn.connect()
            if self.pid is None:
                return conn
            assert conn.sock is not None
            if connection_owner(conn.sock, [self.pid]) == self.pid:
                return conn
            conn.close()
        raise RuntimeError(f"no connection landed on worker pid {self.pid}")

    def run(self) -> None:
        conn = self.connect()
        try:
            while not self.stop_event.is_set() and time.monotonic() < self.deadline:
                try:
                    conn.request("GET", "/p", headers={"x-user-id": "poller"})
                    resp = conn.getresponse()
                    resp.read()
                    now = time.monotonic()
                    version = int(resp.getheader("x-turnout-config-version", "0"))
                except (OSError, http.client.HTTPException, ValueError):
                    self.errors += 1
                    conn.close()
                    conn = self.connect()
                    continue
                self.requests += 1
                if version > self.seen:
                    with self.cond:
                        for v in range(self.seen + 1, version + 1):
                            self.first_seen[v] = now
                        self.seen = version
                        self.cond.notify_all()
        finally:
            conn.close()

    def wait_version(self, version: int, until: float) -> float | None:
        with self.cond:
            while self.seen < version:
                left = until - time.monotonic()
                if left <= 0:
                    return None
                self.cond.wait(left)
            return self.first_seen[version]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return math.nan
    index = min(len(ordered) - 1, max(0, math.ceil(q / 100 * len(ordered)) - 1))
    return ordered[index]


def lag_summary(metrics: dict[str, float]) -> str:
    name = "turnout_config_apply_lag_seconds"
    count = metrics.get(f"{name}_count", 0.0)
    total = metrics.get(f"{name}_sum", 0.0)
    buckets = sorted(
        (float(key.split('le="')[1].rstrip('"}')), value)
        for key, value in metrics.items()
        if key.startswith(f"{name}_bucket")
    )
    if not count:
        return "no samples"

    def bucket_quantile(q: float) -> str:
        for bound, cumulative in buckets:
            if cumulative >= q * count:
                return "+Inf" if math.isinf(bound) else f"<= {bound * 1000:g} ms"
        return "?"

    return (
        f"count {count:.0f}, mean {total / count * 1000:.1f} ms, "
        f"p50 {bucket_quantile(0.5)}, p99 {bucket_quantile(0.99)}"
    )


def run(args: argparse.Namespace) -> int:
    started = time.monotonic()
    deadline = started + args.max_seconds
    sys.setswitchinterval(0.0005)  # the pollers and the admin caller share one GIL
    rng = random.Random(args.seed)
    procs: list[subprocess.Popen[bytes]] = []
    instances: list[Instance] = []
    stop = threading.Event()
    pollers: list[Poller] = []
    with tempfile.TemporaryDirectory(prefix="turnout-propagation-") as tmp:
        workdir = Path(tmp)
        redis = RedisServer(workdir, name="redis")
        try:
            redis.start()
            ports = {"stable": free_port(), "canary": free_port()}
            for name, port in ports.items():
                procs.append(
                    subprocess.Popen(
                        [sys.executable, "-c", UPSTREAM_CODE, name, str(port)],
                        cwd=ROOT,
                        stdout=subprocess.DEVNULL,
                        stderr=subprocess.DEVNULL,
                        start_new_session=True,
                    )
                )
            for port in ports.values():
                wait_for(lambda p=port: http_call(p, "GET", "/")[0] == 200, "upstream", 20)
            seed = {
                "releases": {
                    "web": {
                        "stable": [f"http://{LOCALHOST}:{ports['stable']}"],
                        "canary": [f"http://{LOCALHOST}:{ports['canary']}"],
                        "stage": "beta",
                    }
                },
                "routes": [{"host": "*", "path_prefix": "/", "release": "web"}],
            }
            instances = [
                Instance(workdir, i, redis.url, seed, args.poll_interval, args.workers)
                for i in range(args.instances)
            ]
            instances[0].start()
            instances[0].wait_ready()
            for inst in instances[1:]:
                inst.start()
            for inst in instances[1:]:
                inst.wait_ready()
            if args.workers == 1:
                pollers = [Poller(inst, stop, deadline) for inst in instances]
            else:
                pollers = [
                    Poller(inst, stop, deadline, pid)
                    for inst in instances
                    for pid in inst.worker_pids()
                ]
            for poller in pollers:
                poller.start()
            first = instances[0]
            if not all(p.wait_version(1, time.monotonic() + 10) is not None for p in pollers):
                raise RuntimeError("pollers see no configuration")

            from_return: list[float] = []
            from_start: list[float] = []
            per_poller_last: list[int] = [0] * len(pollers)
            per_poller: list[list[float]] = [[] for _ in pollers]
            timeouts = 0
            stage_versions: list[int] = []
            for i in range(args.changes):
                if time.monotonic() > deadline - PER_CHANGE_BOUND_S:
                    print(f"stopping early: time bound reached after {i} changes")
                    break
                kind = i % 4
                if kind in (0, 2):
                    path, body = (
                        "/api/v1/releases/web/stage",
                        {"stage": "open" if kind == 0 else "beta"},
                    )
                elif kind == 1:
                    path, body = "/api/v1/releases/web/rollback", {"reason": f"bench {i}"}
                else:
                    path = f"/api/v1/versions/{stage_versions[-2]}/restore"
                    body = {"reason": f"bench {i}"}
                t_start = time.monotonic()
                status, reply = first.admin("POST", path, body)
                t_return = time.monotonic()
                if status != 200:
                    raise RuntimeError(f"change {i} ({path}) failed: {status} {reply}")
                version = int(reply["version"])
                if kind in (0, 2):
                    stage_versions.append(version)
                until = t_return + PER_CHANGE_BOUND_S
                seen = [p.wait_version(version, until) for p in pollers]
                if any(s is None for s in seen):
                    timeouts += 1
                    from_return.append(math.inf)
                    from_start.append(math.inf)
                else:
                    times = [s for s in seen if s is not None]
                    last = max(times)
                    per_poller_last[times.index(last)] += 1
                    for k, t in enumerate(times):
                        per_poller[k].append(max(0.0, t - t_return) * 1000)
                    from_return.append(max(0.0, last - t_return) * 1000)
                    from_start.append((last - t_start) * 1000)
                time.sleep(rng.uniform(0.02, 0.08))  # no phase lock with the poll loop
            stop.set()
            for poller in pollers:
                poller.join(15)

            n = len(from_return)
            print(
                f"propagation: {n} changes through {first.name}'s admin API, "
                f"{len(instances)} instances on one Redis, poll_interval_s {args.poll_interval:g} "
                f"(pub/sub pokes + poll), {args.workers} worker(s) each"
            )
            print(
                "pollers: "
                + ", ".join(f"{p.label} {p.requests} req/{p.errors} err" for p in pollers)
            )
            print(
                f"{'latency until every instance serves v (ms)':<46}{'p50':>9}{'p99':>9}{'max':>9}"
            )
            for label, values in (
                ("from the admin call's return", from_return),
                ("from the admin call's start", from_start),
            ):
                print(
                    f"  {label:<44}{percentile(values, 50):>9.2f}"
                    f"{percentile(values, 99):>9.2f}{max(values):>9.2f}"
                )
            print(
                "slowest poller per change: "
                + ", ".join(f"{p.label} {count}" for p, count in zip(pollers, per_poller_last))
            )
            print(f"{'each poller, from the return (ms)':<46}{'p50':>9}{'p99':>9}{'max':>9}")
            for p, values in zip(pollers, per_poller):
                if values:
                    print(
                        f"  {p.label:<44}{percentile(values, 50):>9.2f}"
                        f"{percentile(values, 99):>9.2f}{max(values):>9.2f}"
                    )
            if timeouts:
                print(f"{timeouts} change(s) not seen everywhere within {PER_CHANGE_BOUND_S} s")
            p99 = percentile(from_return, 99)
            verdict = "PASS" if p99 <= TARGET_P99_MS and not timeouts else "MISS"
            print(f"target: p99 <= {TARGET_P99_MS:g} ms from return: {verdict} (p99 {p99:.2f} ms)")
            print("instances' own turnout_config_apply_lag_seconds (commit -> applied):")
            for inst in instances:
                print(f"  {inst.name}: {lag_summary(inst.metrics())}")
            print(f"total run time {time.monotonic() - started:.1f} s")
            return 0 if verdict == "PASS" else 1
        finally:
            stop.set()
            for poller in pollers:
                poller.join(15)
            for inst in instances:
                inst.stop()
            for proc in procs:
                stop_process(proc)
            redis.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--changes", type=int, default=100)
    parser.add_argument("--instances", type=int, default=4)
    parser.add_argument("--poll-interval", type=float, default=2.0)
    parser.add_argument("--max-seconds", type=float, default=100.0)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--workers",
        type=int,
        default=1,
        help="turnout serve --workers N per instance; one pinned poller per worker",
    )
    args = parser.parse_args()
    if args.instances < 1 or args.changes < 1 or args.workers < 1:
        parser.error("--instances, --changes and --workers must be >= 1")
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
