"""Guarded delivery, measured (issue #10 point 8): how fast does a bad canary leave the fleet?

    .venv/bin/python benchmarks/guard.py [--quick] [--rps 200] [--max-seconds 300]

Layout (loopback only; every process is started and stopped here):

* its own `redis-server` on a free port, no persistence;
* one upstream process serving a "stable" and a "canary" app on two free ports; each answers
  after a lognormal delay (median 10 ms) with a background error rate, and obeys
  `GET /__control?error=E&delay=S` so the script can make it fail or slow down;
* two `turnout serve` processes on that Redis, release `web` at `beta` (10 %) with
  `guard: {}` (the defaults: 5 % errors, p99 5 s, +2 points against stable, p99 3x stable);
* load threads sending `--rps` requests per second of synthetic users (a pool of 5,000 ids),
  alternating between the two instances on keep-alive connections.

Scenarios, each from a fresh `beta` (the guard forgets old evidence when a release comes back):

1. errors: the canary switches to 50 % 5xx. Printed: time from the first bad canary response
   any client saw to the moment BOTH instances serve the release at stage off (every canary
   user on stable), and the number of user requests that failed meanwhile.
   Target: <= 5 s and <= 100 failed requests.
2. latency: the canary's delay rises 5x, no errors. Printed: time to both instances off and
   the criterion that fired (expected: p99_ratio).
3. shared: both arms fail at 50 % with a guard of relative criteria only. Printed: rollbacks
   (target 0: stable's own failures never roll the canary back on the relative criteria; the
   absolute criteria would, by design, and say so).
4. A/A replay (driven clock, no real seconds): 1,000 judged windows of a healthy canary with
   stable's 1 % background errors. Target: 0 rollbacks.
5. 1 RPS replay: a healthy canary at 1 RPS for 10 minutes of driven time. Target: never failed.

`--quick` shortens every phase (a sanity run, not figures to quote). Exit status 0 when every
target is met. Bounded by `--max-seconds`; every process is stopped on the way out.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import random
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import orjson  # noqa: E402
import yaml  # noqa: E402

from benchmarks.propagation import http_call, stop_process, wait_for  # noqa: E402
from tests.redisproc import LOCALHOST, RedisServer, free_port  # noqa: E402

TOKEN = "guard-bench-admin-token-0123456789"
COOKIE_SECRET = "guard-bench-cookie-secret-0123456789"
TARGET_DETECT_S = 5.0
TARGET_FAILED = 100
START_TIMEOUT_S = 30.0
USERS = 5000

UPSTREAM_CODE = r"""
import asyncio, random, sys
from urllib.parse import parse_qs
import uvicorn

class App:
    def __init__(self, name):
        self.name = name.encode()
        self.error = 0.01
        self.delay = 0.010
    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return
        if scope["path"] == "/__control":
            q = parse_qs(scope["query_string"].decode())
            self.error = float(q.get("error", [self.error])[0])
            self.delay = float(q.get("delay", [self.delay])[0])
            status = 200
        else:
            await asyncio.sleep(self.delay * random.lognormvariate(0, 0.3))
            status = 500 if random.random() < self.error else 200
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"text/plain")]})
        await send({"type": "http.response.body", "body": self.name})

async def main():
    servers = []
    for name, port in (("stable", int(sys.argv[1])), ("canary", int(sys.argv[2]))):
        config = uvicorn.Config(App(name), host="127.0.0.1", port=port, http="httptools",
                                lifespan="off", log_level="warning", access_log=False)
        servers.append(uvicorn.Server(config))
    await asyncio.gather(*(s.serve() for s in servers))

asyncio.run(main())
"""


class Instance:
    def __init__(self, workdir: Path, index: int, store: str, seed: dict[str, Any]) -> None:
        self.name = f"instance{index + 1}"
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
                    "expose_decision_headers": True,
                    "instance_id": self.name,
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
                [sys.executable, "-m", "turnout.cli", "serve", "--config", str(self.config)],
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
            return http_call(self.admin_port, "GET", "/readyz")[0] == 200

        wait_for(ready, f"{self.name} ready", START_TIMEOUT_S)

    def admin(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        status, _, data = http_call(
            self.admin_port, method, path, body, {"authorization": f"Bearer {TOKEN}"}
        )
        return status, orjson.loads(data) if data else None

    def served_stage(self) -> str:
        _, _, data = http_call(self.admin_port, "GET", "/api/v1/releases/web/health")
        return str(orjson.loads(data).get("stage"))

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)
            self.proc = None


@dataclass
class Load:
    """Paced load of synthetic users over both instances; records every response."""

    instances: list[Instance]
    rps: float
    threads: int = 8
    stop: threading.Event = field(default_factory=threading.Event)
    records: list[tuple[float, int, str]] = field(default_factory=list)  # (t, status, arm)
    lock: threading.Lock = field(default_factory=threading.Lock)
    workers: list[threading.Thread] = field(default_factory=list)

    def start(self) -> Load:
        for i in range(self.threads):
            t = threading.Thread(target=self._run, args=(i,), daemon=True)
            t.start()
            self.workers.append(t)
        return self

    def _run(self, index: int) -> None:
        inst = self.instances[index % len(self.instances)]
        rng = random.Random(index)
        interval = self.threads / self.rps
        conn = http.client.HTTPConnection(LOCALHOST, inst.edge_port, timeout=10)
        next_at = time.monotonic()
        while not self.stop.is_set():
            next_at += interval
            user = f"user-{rng.randrange(USERS)}"
            try:
                conn.request("GET", "/app", headers={"x-user-id": user})
                resp = conn.getresponse()
                resp.read()
                arm = resp.getheader("x-turnout-arm", "?")
                status = resp.status
            except (OSError, http.client.HTTPException):
                conn.close()
                conn = http.client.HTTPConnection(LOCALHOST, inst.edge_port, timeout=10)
                status, arm = 599, "?"
            with self.lock:
                self.records.append((time.monotonic(), status, arm))
            delay = next_at - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            else:
                next_at = time.monotonic()  # behind: do not burst to catch up

    def since(self, t0: float) -> list[tuple[float, int, str]]:
        with self.lock:
            return [r for r in self.records if r[0] >= t0]

    def close(self) -> None:
        self.stop.set()
        for t in self.workers:
            t.join(15)


def control(port: int, **params: float) -> None:
    query = "&".join(f"{k}={v}" for k, v in params.items())
    status, _, _ = http_call(port, "GET", f"/__control?{query}")
    assert status == 200


def wait_all_off(instances: list[Instance], deadline: float) -> float | None:
    """The monotonic moment both instances serve the release at stage off."""
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError, http.client.HTTPException):
            if all(inst.served_stage() == "off" for inst in instances):
                return time.monotonic()
        time.sleep(0.02)
    return None


def reset(instances: list[Instance], guard: dict[str, Any]) -> None:
    """Release back at beta with `guard`, from instance 1's admin API."""
    status, doc = instances[0].admin("GET", "/api/v1/config")
    assert status == 200, doc
    document = doc.get("document", doc)
    document.pop("version", None)
    document["releases"]["web"]["guard"] = guard
    document["releases"]["web"]["stage"] = "beta"
    document["releases"]["web"]["percent"] = None
    document["releases"]["web"]["rollback"] = None
    status, body = instances[0].admin("PUT", "/api/v1/config", document)
    assert status == 200, body
    wait_for(lambda: all(i.served_stage() == "beta" for i in instances), "both at beta", 10)


def guard_versions(inst: Instance) -> list[dict[str, Any]]:
    _, data = inst.admin("GET", "/api/v1/versions?limit=100")
    return [v for v in data["versions"] if v["actor"] == "guard"]


def scenario(
    name: str,
    instances: list[Instance],
    load: Load,
    ports: dict[str, int],
    *,
    warm_s: float,
    bound_s: float,
    guard: dict[str, Any],
    stable: dict[str, float],
    canary: dict[str, float],
) -> dict[str, Any]:
    control(ports["stable"], error=0.01, delay=0.010)
    control(ports["canary"], error=0.01, delay=0.010)
    reset(instances, guard)
    before = len(guard_versions(instances[0]))
    time.sleep(warm_s)  # healthy windows on both arms
    switched = time.monotonic()
    control(ports["stable"], **stable)
    control(ports["canary"], **canary)
    off_at = wait_all_off(instances, switched + bound_s)
    records = load.since(switched)
    first_bad = next((t for t, s, arm in records if s >= 500 and arm == "canary"), None)
    end = off_at if off_at is not None else time.monotonic()
    failed = sum(1 for t, s, _ in records if s >= 500 and t <= end)
    canary_failed = sum(1 for t, s, arm in records if s >= 500 and arm == "canary" and t <= end)
    versions = guard_versions(instances[0])
    out: dict[str, Any] = {
        "scenario": name,
        "rolled_back": off_at is not None,
        "from_switch_s": round(off_at - switched, 3) if off_at else None,
        "from_first_bad_s": round(off_at - first_bad, 3) if off_at and first_bad else None,
        "failed_requests": failed,
        "failed_canary_requests": canary_failed,
        "guard_versions": len(versions) - before,
        "summary": versions[0]["summary"] if len(versions) > before else "",
    }
    control(ports["stable"], error=0.01, delay=0.010)
    control(ports["canary"], error=0.01, delay=0.010)
    return out


def replays(quick: bool) -> dict[str, Any]:
    from tests.test_guard import replay  # the tests' driven-clock replay (flags/guard.py)

    windows = 200 if quick else 1000
    aa = replay(windows, canary_rps=20, stable_rps=180, canary_error=lambda _t: 0.01)
    slow_s = 120 if quick else 600
    trickle = replay(slow_s, canary_rps=1, stable_rps=9, canary_error=lambda _t: 0.01)
    return {
        "aa_windows": len(aa),
        "aa_rollbacks": sum(1 for j in aa if j.status == "breach"),
        "one_rps_seconds": slow_s,
        "one_rps_failed": sum(1 for j in trickle if j.status == "breach"),
        "one_rps_held_windows": sum(1 for j in trickle if j.status == "insufficient"),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="short sanity run")
    parser.add_argument("--rps", type=float, default=200.0)
    parser.add_argument("--max-seconds", type=float, default=300.0)
    args = parser.parse_args()
    warm_s = 5.0 if args.quick else 15.0
    bound_s = 20.0 if args.quick else 60.0
    deadline = time.monotonic() + args.max_seconds
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="turnout-guard-") as tmp:
        workdir = Path(tmp)
        redis = RedisServer(workdir, name="redis")
        ports = {"stable": free_port(), "canary": free_port()}
        upstream = subprocess.Popen(
            [sys.executable, "-c", UPSTREAM_CODE, str(ports["stable"]), str(ports["canary"])],
            cwd=ROOT,
            start_new_session=True,
        )
        instances: list[Instance] = []
        load: Load | None = None
        try:
            redis.start()
            wait_for(
                lambda: http_call(ports["canary"], "GET", "/")[0] in (200, 500), "upstreams", 20
            )
            seed = {
                "releases": {
                    "web": {
                        "stable": [f"http://{LOCALHOST}:{ports['stable']}"],
                        "canary": [f"http://{LOCALHOST}:{ports['canary']}"],
                        "stage": "beta",
                        "guard": {},
                    }
                },
                "routes": [{"host": "*", "path_prefix": "/", "release": "web"}],
            }
            instances = [Instance(workdir, i, redis.url, seed) for i in range(2)]
            for inst in instances:
                inst.start()
            for inst in instances:
                inst.wait_ready()
            load = Load(instances, args.rps).start()
            common = {"warm_s": warm_s, "bound_s": bound_s}
            results.append(
                scenario(
                    "errors (canary 50 % 5xx)",
                    instances,
                    load,
                    ports,
                    guard={},
                    stable={"error": 0.01},
                    canary={"error": 0.5},
                    **common,
                )
            )
            if time.monotonic() < deadline:
                results.append(
                    scenario(
                        "latency (canary 5x slower)",
                        instances,
                        load,
                        ports,
                        guard={},
                        stable={"delay": 0.010},
                        canary={"delay": 0.050, "error": 0.0},
                        **common,
                    )
                )
            if time.monotonic() < deadline:
                results.append(
                    scenario(
                        "shared (both arms 50 % 5xx, relative criteria only)",
                        instances,
                        load,
                        ports,
                        guard={"max_error_rate": None, "max_p99_ms": None},
                        stable={"error": 0.5},
                        canary={"error": 0.5},
                        **common,
                    )
                )
        finally:
            if load is not None:
                load.close()
            for inst in instances:
                inst.stop()
            stop_process(upstream)
            redis.stop()
    replay = replays(args.quick)
    ok = True
    print(
        f"guard benchmark ({'quick' if args.quick else 'full'}, {args.rps:g} RPS, 2 instances, one Redis)"
    )
    for r in results:
        print(f"\n{r['scenario']}")
        for key in (
            "rolled_back",
            "from_first_bad_s",
            "from_switch_s",
            "failed_requests",
            "failed_canary_requests",
            "guard_versions",
        ):
            print(f"  {key:<24} {r[key]}")
        if r["summary"]:
            print(f"  summary                  {r['summary']}")
    if results:
        errors = results[0]
        met = (
            errors["rolled_back"]
            and errors["from_first_bad_s"] is not None
            and errors["from_first_bad_s"] <= TARGET_DETECT_S
            and errors["failed_requests"] <= TARGET_FAILED
            and errors["guard_versions"] == 1
        )
        print(
            f"\ntarget errors: <= {TARGET_DETECT_S:g} s and <= {TARGET_FAILED} failed: {'PASS' if met else 'MISS'}"
        )
        ok &= bool(met)
    if len(results) > 1:
        met = bool(results[1]["rolled_back"]) and "p99" in results[1]["summary"]
        print(f"target latency: caught by a latency criterion: {'PASS' if met else 'MISS'}")
        ok &= met
    if len(results) > 2:
        met = not results[2]["rolled_back"] and results[2]["guard_versions"] == 0
        print(f"target shared: 0 rollbacks on relative criteria: {'PASS' if met else 'MISS'}")
        ok &= met
    print(
        f"A/A replay: {replay['aa_rollbacks']} rollbacks over {replay['aa_windows']} judged "
        f"windows: {'PASS' if replay['aa_rollbacks'] == 0 else 'MISS'}"
    )
    print(
        f"1 RPS replay: {replay['one_rps_failed']} failures over {replay['one_rps_seconds']} s "
        f"({replay['one_rps_held_windows']} windows held): "
        f"{'PASS' if replay['one_rps_failed'] == 0 else 'MISS'}"
    )
    ok &= replay["aa_rollbacks"] == 0 and replay["one_rps_failed"] == 0
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
