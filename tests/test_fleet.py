"""A fleet on Redis: several `turnout serve` processes on
real redis-server / redis-sentinel processes (HARDENING.md §4, §8 rows 8-14 and 17).

Every instance is started the way a user starts it (`python -m turnout.cli serve --config
FILE`, stopped with SIGTERM) and observed only from outside: the edge's decision headers
(`expose_decision_headers`), the admin API, `/readyz`, `/metrics`, and the keys in Redis.
No fakes, no timing assertions: every wait is a bound, and "while X was still true" is
proved causally (see the CLIENT PAUSE test).
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import itertools
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml

from tests.harness import EchoApp, ThreadedServer, release_doc
from tests.redisproc import LOCALHOST, RedisServer, SentinelCluster, free_port

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "fleet-admin-token-0123456789abcdef"
COOKIE_SECRET = "fleet-cookie-secret-0123456789abcdef"
PREFIX = "turnout"  # the default key_prefix
RELEASE = "web"
START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10.0
HTTP_TIMEOUT_S = 10.0
PROPAGATION_BOUND_S = 5.0
UNITS = [f"unit-{i:05d}" for i in range(10_000)]

# -- processes -------------------------------------------------------------------------------


def _tail(path: Path, chars: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return "<no log>"


def _stop_process(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM, then SIGKILL (of its own process group) after STOP_TIMEOUT_S."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)  # our own session: proc and its children
            proc.wait(timeout=STOP_TIMEOUT_S)
    else:
        proc.wait()


class Instance:
    """One `turnout serve` process with its own settings file and state_dir."""

    def __init__(
        self,
        workdir: Path,
        name: str,
        store: str,
        seed: dict[str, Any] | None,
        poll_interval_s: float,
    ) -> None:
        self.name = name
        self.edge_port = free_port()
        self.admin_port = free_port()
        self.dir = workdir / name
        self.dir.mkdir(parents=True, exist_ok=True)
        settings: dict[str, Any] = {
            "edge_host": LOCALHOST,
            "edge_port": self.edge_port,
            "admin_host": LOCALHOST,
            "admin_port": self.admin_port,
            "admin_token": TOKEN,
            "cookie_secret": COOKIE_SECRET,
            "state_dir": str(self.dir / "state"),
            "store": store,
            "poll_interval_s": poll_interval_s,
            "expose_decision_headers": True,
            "log_level": "warning",
        }
        if seed is not None:
            settings["seed"] = seed
        self.config = self.dir / "settings.yaml"
        self.config.write_text(yaml.safe_dump(settings))
        self.log = self.dir / "turnout.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Instance:
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "turnout.cli", "serve", "--config", str(self.config)],
                cwd=ROOT,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        return self

    def wait_ready(self) -> Instance:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited:\n{_tail(self.log)}")
            with contextlib.suppress(OSError, http.client.HTTPException):
                status, _, _ = request(self.admin_port, "GET", "/readyz", timeout=1)
                if status == 200:
                    return self
            time.sleep(0.05)
        raise AssertionError(
            f"{self.name} not ready within {START_TIMEOUT_S} s:\n{_tail(self.log)}"
        )

    def stop(self) -> None:
        if self.proc is not None:
            _stop_process(self.proc)
            self.proc = None

    # -- observation -----------------------------------------------------------------------

    def admin(
        self, method: str, path: str, body: Any = None, *, actor: str | None = None
    ) -> tuple[int, Any]:
        headers = {"authorization": f"Bearer {TOKEN}"}
        if actor:
            headers["x-turnout-actor"] = actor
        status, _, data = request(self.admin_port, method, path, body, headers=headers)
        return status, orjson.loads(data) if data else None

    def stage(self, stage: str, **extra: Any) -> tuple[int, Any]:
        return self.admin("POST", f"/api/v1/releases/{RELEASE}/stage", {"stage": stage, **extra})

    def rollback(self, reason: str, **extra: Any) -> tuple[int, Any]:
        return self.admin(
            "POST", f"/api/v1/releases/{RELEASE}/rollback", {"reason": reason, **extra}
        )

    def ready(self) -> dict[str, Any]:
        _, _, data = request(self.admin_port, "GET", "/readyz")
        result: dict[str, Any] = orjson.loads(data)
        return result

    def metrics(self) -> dict[str, float]:
        status, _, data = request(self.admin_port, "GET", "/metrics")
        assert status == 200
        return parse_metrics(data.decode())

    def metric(self, key: str) -> float:
        return self.metrics().get(key, 0.0)

    def served_version(self) -> int:
        status, headers, _ = request(self.edge_port, "GET", "/", headers={"x-user-id": "probe"})
        assert status == 200
        return int(headers["x-turnout-config-version"])


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text format -> {'name{labels}': value}."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            out[key] = float(value)
    return out


def request(
    port: int,
    method: str,
    path: str,
    body: Any = None,
    *,
    headers: dict[str, str] | None = None,
    timeout: float = HTTP_TIMEOUT_S,
) -> tuple[int, dict[str, str], bytes]:
    """One request on a fresh connection."""
    conn = http.client.HTTPConnection(LOCALHOST, port, timeout=timeout)
    try:
        payload = None if body is None else orjson.dumps(body)
        all_headers = dict(headers or {})
        if payload is not None:
            all_headers["content-type"] = "application/json"
        conn.request(method, path, body=payload, headers=all_headers)
        resp = conn.getresponse()
        data = resp.read()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, data
    finally:
        conn.close()


class Decision:
    __slots__ = ("arm", "backend", "status", "version")

    def __init__(self, status: int, arm: str, backend: str, version: int) -> None:
        self.status = status
        self.arm = arm
        self.backend = backend
        self.version = version


class EdgeClient:
    """Requests to one edge on one keep-alive connection (reconnects only when asked)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.conn = http.client.HTTPConnection(LOCALHOST, port, timeout=HTTP_TIMEOUT_S)

    def decide(self, unit: str) -> Decision:
        self.conn.request("GET", "/fleet", headers={"x-user-id": unit})
        resp = self.conn.getresponse()
        data = resp.read()
        backend = orjson.loads(data).get("backend", "") if resp.status == 200 else ""
        return Decision(
            resp.status,
            resp.getheader("x-turnout-arm", ""),
            backend,
            int(resp.getheader("x-turnout-config-version", "-1")),
        )

    def reconnect(self) -> None:
        self.conn.close()
        self.conn = http.client.HTTPConnection(LOCALHOST, self.port, timeout=HTTP_TIMEOUT_S)

    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> EdgeClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def decisions(port: int, units: list[str]) -> dict[str, Decision]:
    """Every unit's decision through one edge, on one keep-alive connection."""
    with EdgeClient(port) as client:
        return {unit: client.decide(unit) for unit in units}


def arms(port: int, units: list[str]) -> dict[str, str]:
    """unit -> arm, checking every answer is a 200 from the backend its arm names."""
    out: dict[str, str] = {}
    for unit, d in decisions(port, units).items():
        assert d.status == 200, (unit, d.status)
        assert d.arm == d.backend, (unit, d.arm, d.backend)
        out[unit] = d.arm
    return out


def wait_for(predicate: Callable[[], bool], what: str, timeout_s: float = 10.0) -> None:
    """A bound, not a measurement: poll until `predicate()` holds."""
    deadline = time.monotonic() + timeout_s
    while True:
        with contextlib.suppress(OSError, http.client.HTTPException):
            if predicate():
                return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out ({timeout_s} s) waiting for: {what}")
        time.sleep(0.02)


def wait_version(inst: Instance, version: int, timeout_s: float = PROPAGATION_BOUND_S) -> None:
    """Poll the instance's edge (keep-alive) until its responses carry `version` or later."""
    deadline = time.monotonic() + timeout_s
    client = EdgeClient(inst.edge_port)
    seen = -1
    try:
        while time.monotonic() < deadline:
            try:
                seen = client.decide("probe").version
            except (OSError, http.client.HTTPException):
                client.reconnect()
                continue
            if seen >= version:
                return
            time.sleep(0.005)
    finally:
        client.close()
    raise AssertionError(
        f"{inst.name} still serves version {seen}, not {version}, after {timeout_s} s"
    )


class Traffic:
    """Threads sending GETs through edges on keep-alive connections until stopped (bounded
    in count and time). Any non-200 or transport error is a failure."""

    def __init__(
        self,
        ports: list[int],
        *,
        threads_per_port: int = 1,
        max_requests: int = 200_000,
        max_seconds: float = 60.0,
    ) -> None:
        self.stop_event = threading.Event()
        self.max_requests = max_requests
        self.deadline = time.monotonic() + max_seconds
        self.counts: list[int] = []
        self.failures: list[str] = []
        self.lock = threading.Lock()
        self.threads = [
            threading.Thread(target=self._run, args=(port, i), daemon=True)
            for i, (port, _) in enumerate(itertools.product(ports, range(threads_per_port)))
        ]
        self.counts = [0] * len(self.threads)

    def _run(self, port: int, index: int) -> None:
        client = EdgeClient(port)
        n = 0
        try:
            while (
                not self.stop_event.is_set()
                and n < self.max_requests
                and time.monotonic() < self.deadline
            ):
                n += 1
                try:
                    d = client.decide(f"traffic-{index}-{n % 500}")
                    if d.status != 200:
                        with self.lock:
                            self.failures.append(f"HTTP {d.status}")
                except (OSError, http.client.HTTPException, ValueError) as exc:
                    with self.lock:
                        self.failures.append(f"{type(exc).__name__}: {exc}")
                    client.reconnect()
                self.counts[index] = n
        finally:
            client.close()

    @property
    def total(self) -> int:
        return sum(self.counts)

    def start(self) -> Traffic:
        for thread in self.threads:
            thread.start()
        return self

    def stop(self) -> None:
        self.stop_event.set()
        for thread in self.threads:
            thread.join(HTTP_TIMEOUT_S + 5)

    def wait_more(self, than: int, what: str) -> None:
        wait_for(lambda: self.total > than + 50, what)


class Fleet:
    """Everything one test starts; `close()` stops it all (instances first)."""

    def __init__(self, workdir: Path, upstreams: dict[str, ThreadedServer]) -> None:
        self.workdir = workdir
        self.upstreams = upstreams
        self.instances: list[Instance] = []
        self.redises: list[RedisServer] = []
        self.clusters: list[SentinelCluster] = []
        self.procs: list[subprocess.Popen[bytes]] = []
        self.traffic: list[Traffic] = []

    def seed(self, stage: str = "open") -> dict[str, Any]:
        return release_doc(self.upstreams["stable"].url, self.upstreams["canary"].url, stage=stage)

    def redis(self, *, persistent: bool = False) -> RedisServer:
        server = RedisServer(self.workdir, persistent=persistent, name=f"redis{len(self.redises)}")
        self.redises.append(server)
        server.start()
        return server

    def sentinel(self) -> SentinelCluster:
        cluster = SentinelCluster(self.workdir)
        self.clusters.append(cluster)
        cluster.start()
        return cluster

    def instances_on(
        self, store: str, count: int, *, poll_interval_s: float = 0.5, stage: str = "open"
    ) -> list[Instance]:
        """`count` instances on one store: the first seeds it, the others start together."""
        made = [
            Instance(
                self.workdir,
                f"turnout{len(self.instances) + i}",
                store,
                self.seed(stage),
                poll_interval_s,
            )
            for i in range(count)
        ]
        self.instances.extend(made)
        made[0].start().wait_ready()
        for inst in made[1:]:
            inst.start()
        for inst in made[1:]:
            inst.wait_ready()
        return made

    def start_traffic(self, ports: list[int], **kwargs: Any) -> Traffic:
        traffic = Traffic(ports, **kwargs)
        self.traffic.append(traffic)
        return traffic.start()

    def close(self) -> None:
        for traffic in self.traffic:
            traffic.stop()
        for proc in self.procs:
            _stop_process(proc)
        for inst in self.instances:
            inst.stop()
        for cluster in self.clusters:
            cluster.stop()
        for server in self.redises:
            server.stop()


@pytest.fixture(scope="module")
def upstreams() -> Iterator[dict[str, ThreadedServer]]:
    servers = {
        name: ThreadedServer(EchoApp(name), http="httptools").start()
        for name in ("stable", "canary")
    }
    try:
        yield servers
    finally:
        for server in servers.values():
            server.stop()


@pytest.fixture
def fleet(tmp_path: Path, upstreams: dict[str, ThreadedServer]) -> Iterator[Fleet]:
    f = Fleet(tmp_path, upstreams)
    try:
        yield f
    finally:
        f.close()


def history(inst: Instance) -> list[dict[str, Any]]:
    status, data = inst.admin("GET", "/api/v1/versions?limit=1000")
    assert status == 200, data
    versions: list[dict[str, Any]] = data["versions"]
    return versions


def redis_version(server: RedisServer) -> int:
    with server.client() as r:
        raw = r.get(f"{PREFIX}:current")
    return int(raw) if raw is not None else 0


# -- 1. the same decisions everywhere --------------------------------------------------------


@pytest.mark.timeout(150)
def test_fleet_makes_identical_decisions(fleet: Fleet) -> None:
    """Three `turnout serve` processes on one Redis give every one of 10,000 unit ids the
    same arm."""
    server = fleet.redis()
    instances = fleet.instances_on(server.url, 3)
    with ThreadPoolExecutor(len(instances)) as pool:
        results = list(pool.map(lambda inst: arms(inst.edge_port, UNITS), instances))
    reference = results[0]
    assert set(reference.values()) == {"stable", "canary"}  # the test can tell arms apart
    for inst, result in zip(instances[1:], results[1:], strict=True):
        differ = [u for u in UNITS if result[u] != reference[u]]
        assert not differ, f"{inst.name} decides differently for {len(differ)} ids: {differ[:5]}"


# -- 2. a change through one admin API reaches every instance ---------------------------------


@pytest.mark.timeout(90)
def test_rollback_through_one_instance_reaches_all(fleet: Fleet) -> None:
    """A rollback POSTed to one instance's admin API is served by every instance (bounded
    wait), and then 100 % of units go to stable everywhere."""
    server = fleet.redis()
    instances = fleet.instances_on(server.url, 3)
    before = arms(instances[1].edge_port, UNITS[:500])
    assert "canary" in before.values()

    status, body = instances[0].rollback("fleet test")
    assert status == 200, body
    version = body["version"]
    for inst in instances:
        wait_version(inst, version)
    for inst in instances:
        result = arms(inst.edge_port, UNITS[:2000])
        assert set(result.values()) == {"stable"}, inst.name


# -- 3. kill -9 of Redis under traffic --------------------------------------------------------


@pytest.mark.timeout(90)
def test_redis_kill9_under_traffic(fleet: Fleet) -> None:
    """kill -9 of Redis under traffic: zero failed requests, the store shows as disconnected
    and stale, admin writes get 503 naming the store; after the restart writes work again."""
    server = fleet.redis(persistent=True)
    (inst,) = fleet.instances_on(server.url, 1)
    version = inst.served_version()
    traffic = fleet.start_traffic([inst.edge_port], threads_per_port=4)
    traffic.wait_more(0, "traffic flows")

    server.kill9()
    wait_for(lambda: inst.metric("turnout_store_connected") == 0, "store_connected = 0")
    at_disconnect = traffic.total
    age1 = inst.metric("turnout_config_age_seconds")
    wait_for(lambda: inst.metric("turnout_config_age_seconds") > age1, "config age grows", 5)
    status, body = inst.stage("beta")
    assert status == 503, body
    assert "store" in body["error"].lower(), body
    assert inst.ready()["stale"] is True
    traffic.wait_more(at_disconnect, "traffic keeps flowing with Redis dead")
    assert inst.served_version() == version

    server.restart(empty=False)  # same data dir, AOF fsync always: the data returns
    wait_for(lambda: inst.metric("turnout_store_connected") == 1, "store_connected = 1")
    status, body = inst.stage("beta")
    assert status == 200, body
    assert body["version"] == version + 1
    wait_version(inst, version + 1)
    traffic.stop()
    assert traffic.failures == [], traffic.failures[:5]
    assert traffic.total > at_disconnect


# -- 4. Redis restarted empty ----------------------------------------------------------------


@pytest.mark.timeout(90)
def test_redis_restarted_empty_is_reseeded_not_applied(fleet: Fleet) -> None:
    """Redis restarted without data: the instance keeps its version and decisions, counts
    store_empty, re-seeds Redis with the same version, and the next write is version+1."""
    server = fleet.redis()
    (inst,) = fleet.instances_on(server.url, 1)
    status, body = inst.stage("beta")  # version 2: not the seed
    assert status == 200, body
    version = body["version"]
    wait_version(inst, version)
    before = arms(inst.edge_port, UNITS[:1000])

    server.restart(empty=True)
    wait_for(
        lambda: inst.metric('turnout_config_rejected_total{reason="store_empty"}') >= 1,
        "store_empty rejection counted",
    )
    wait_for(lambda: redis_version(server) == version, "Redis re-seeded with the LKG version")
    assert inst.served_version() == version
    assert arms(inst.edge_port, UNITS[:1000]) == before
    with server.client() as r:
        stored = orjson.loads(r.get(f"{PREFIX}:rev:{version}"))
    assert stored["document"]["releases"][RELEASE]["stage"] == "beta"

    status, body = inst.stage("open")
    assert status == 200, body
    assert body["version"] == version + 1
    wait_version(inst, version + 1)


# -- 5. invalid documents written behind the API's back --------------------------------------


def _write_raw(server: RedisServer, version: int, doc: dict[str, Any], pointer: int) -> None:
    """Write a revision by hand with a matching checksum, move the pointer and poke."""
    info = {"version": version, "created_at": time.time(), "actor": "intruder", "summary": "raw"}
    data = orjson.dumps(
        {"info": info, "document": {**doc, "version": version}}, option=orjson.OPT_SORT_KEYS
    )
    with server.client() as r, r.pipeline(transaction=True) as pipe:
        pipe.set(f"{PREFIX}:rev:{version}", data)
        pipe.hset(f"{PREFIX}:sha256", str(version), hashlib.sha256(data).hexdigest())
        pipe.set(f"{PREFIX}:current", pointer)
        pipe.publish(f"{PREFIX}:changes", pointer)
        pipe.execute()


def _set_pointer(server: RedisServer, pointer: int) -> None:
    with server.client() as r, r.pipeline(transaction=True) as pipe:
        pipe.set(f"{PREFIX}:current", pointer)
        pipe.publish(f"{PREFIX}:changes", pointer)
        pipe.execute()


@pytest.mark.timeout(90)
def test_invalid_or_regressed_store_content_is_rejected(fleet: Fleet) -> None:
    """A checksummed document with percent 150, and a pointer moved backwards, are rejected
    (old version keeps serving, rejected_total{reason} counts them); the next valid
    version applies."""
    server = fleet.redis()
    (inst,) = fleet.instances_on(server.url, 1)
    status, body = inst.stage("beta")
    assert status == 200, body
    version = body["version"]
    wait_version(inst, version)
    before = arms(inst.edge_port, UNITS[:500])
    with server.client() as r:
        good = orjson.loads(r.get(f"{PREFIX}:rev:{version}"))["document"]

    bad = orjson.loads(orjson.dumps(good))
    bad["releases"][RELEASE].update(stage="custom", percent=150.0)
    _write_raw(server, version + 1, bad, version + 1)
    wait_for(
        lambda: inst.metric('turnout_config_rejected_total{reason="invalid"}') >= 1,
        "percent 150 rejected as invalid",
    )
    assert inst.served_version() == version
    assert arms(inst.edge_port, UNITS[:500]) == before

    _set_pointer(server, version - 1)
    wait_for(
        lambda: inst.metric('turnout_config_rejected_total{reason="version_regressed"}') >= 1,
        "backwards pointer rejected",
    )
    assert inst.served_version() == version
    assert arms(inst.edge_port, UNITS[:500]) == before
    assert inst.ready()["version"] == version

    fixed = orjson.loads(orjson.dumps(good))
    fixed["releases"][RELEASE].update(stage="off")
    _write_raw(server, version + 2, fixed, version + 2)
    wait_version(inst, version + 2)
    assert set(arms(inst.edge_port, UNITS[:500]).values()) == {"stable"}


# -- 6. a hung Redis -------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_paused_redis_does_not_block_requests(fleet: Fleet) -> None:
    """With Redis frozen by CLIENT PAUSE, 200 requests all succeed before the pause ends
    (a PING sent after the pause is still unanswered when they are done)."""
    server = fleet.redis()
    (inst,) = fleet.instances_on(server.url, 1)
    ping_reply: list[bytes] = []
    ping_done = threading.Event()
    with EdgeClient(inst.edge_port) as client:
        client.decide("warm-up")  # the connection is open before the pause
        server.pause(5000, "ALL")
        sock = socket.create_connection((LOCALHOST, server.port), timeout=10)
        try:

            def ping() -> None:
                with contextlib.suppress(OSError):
                    sock.sendall(b"PING\r\n")
                    ping_reply.append(sock.recv(64))
                ping_done.set()

            pinger = threading.Thread(target=ping, daemon=True)
            pinger.start()
            results = [client.decide(unit) for unit in UNITS[:200]]
            paused_still = not ping_done.is_set()
            pinger.join(15)
        finally:
            sock.close()
    assert [d.status for d in results] == [200] * 200
    assert all(d.arm == d.backend for d in results)
    assert paused_still, "the 200 requests outlasted CLIENT PAUSE: nothing proved"
    assert ping_reply == [b"+PONG\r\n"]


# -- 7. pub/sub killed ------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_change_applies_when_pubsub_connections_are_killed(fleet: Fleet) -> None:
    """`CLIENT KILL TYPE pubsub` right before a write on A: B still applies the change
    within a few poll intervals (polling is the truth, pub/sub only a poke)."""
    server = fleet.redis()
    a, b = fleet.instances_on(server.url, 2, poll_interval_s=0.5)
    with server.client() as r:
        killed = r.execute_command("CLIENT", "KILL", "TYPE", "pubsub")
    assert int(killed) >= 2  # both instances were subscribed
    status, body = a.stage("beta")
    assert status == 200, body
    wait_version(b, body["version"], timeout_s=4 * 0.5 + 1)


# -- 8. kill switch while Redis is down -------------------------------------------------------


@pytest.mark.timeout(90)
def test_local_override_while_redis_is_down(fleet: Fleet) -> None:
    """With Redis dead, a rollback with local_override takes effect on A at once (202),
    one without it is refused (503); when Redis returns the override becomes a new version
    that B applies too."""
    server = fleet.redis(persistent=True)
    a, b = fleet.instances_on(server.url, 2)
    version = a.served_version()
    assert "canary" in arms(a.edge_port, UNITS[:500]).values()

    server.kill9()
    wait_for(lambda: a.metric("turnout_store_connected") == 0, "A sees the store down")
    status, body = a.rollback("incident, store down")
    assert status == 503, body
    assert "store" in body["error"].lower(), body

    status, body = a.rollback("incident, store down", local_override=True)
    assert status == 202, body
    assert body["local_override"] is True and body["pending"] is True, body
    assert set(arms(a.edge_port, UNITS[:1000]).values()) == {"stable"}
    assert a.ready()["pending_override"] is True
    assert a.metric("turnout_local_override_pending") == 1
    assert "canary" in arms(b.edge_port, UNITS[:500]).values()  # B cannot know yet

    server.restart(empty=False)
    wait_for(lambda: redis_version(server) == version + 1, "override committed to Redis")
    latest = history(a)[0]
    assert latest["version"] == version + 1
    assert "local override" in latest["summary"], latest
    wait_version(b, version + 1)
    assert set(arms(b.edge_port, UNITS[:1000]).values()) == {"stable"}
    wait_for(lambda: a.ready()["pending_override"] is False, "A's override no longer pending")
    assert a.metric("turnout_local_override_pending") == 0
    assert a.served_version() == version + 1


# -- 9. Sentinel failover during traffic and writes ------------------------------------------


@pytest.mark.timeout(120)
def test_sentinel_failover_during_traffic_and_writes(fleet: Fleet) -> None:
    """SENTINEL FAILOVER while traffic flows and admin writes run: no failed proxy request;
    every write is either confirmed (200, and then present in the history) or reported
    failed (5xx); both instances end on the same, latest version."""
    cluster = fleet.sentinel()
    a, b = fleet.instances_on(cluster.url, 2)
    traffic = fleet.start_traffic([a.edge_port, b.edge_port])
    traffic.wait_more(0, "traffic flows")

    outcomes: list[tuple[int, Any, str]] = []
    failover_done = threading.Event()
    writer_error: list[BaseException] = []

    def writer() -> None:
        """Alternate beta/open on A until 15 writes after the failover were confirmed (or
        30 in a row failed), bounded in count and time."""
        deadline = time.monotonic() + 40
        confirmed_after = failed_in_a_row = 0
        try:
            for i in range(400):
                if time.monotonic() > deadline or confirmed_after >= 15 or failed_in_a_row >= 30:
                    return
                actor = f"writer-{i}"
                status, body = a.admin(
                    "POST",
                    f"/api/v1/releases/{RELEASE}/stage",
                    {"stage": "beta" if i % 2 else "open"},
                    actor=actor,
                )
                outcomes.append((status, body, actor))
                failed_in_a_row = 0 if status == 200 else failed_in_a_row + 1
                if failover_done.is_set():
                    confirmed_after += status == 200
                time.sleep(0.02)
        except BaseException as exc:  # noqa: BLE001 - reported to the test thread
            writer_error.append(exc)

    thread = threading.Thread(target=writer, daemon=True)
    thread.start()
    wait_for(lambda: sum(s == 200 for s, _, _ in outcomes) >= 3, "writes before the failover")
    old_master = cluster.master_port()
    new_master = cluster.failover()
    assert new_master != old_master
    failover_done.set()
    thread.join(60)
    assert not thread.is_alive() and not writer_error, writer_error

    def timeline() -> str:
        return "; ".join(
            f"{actor}:{s}:{body.get('version', body.get('error', '')[:60])}"
            for s, body, actor in outcomes
        )

    # The dust settles: the store answers on the new master.
    wait_for(lambda: a.admin("GET", "/api/v1/versions?limit=1")[0] == 200, "store answers", 15)
    confirmed = [(body["version"], actor) for s, body, actor in outcomes if s == 200]
    assert len(confirmed) > 3
    stored = {(info["version"], info["actor"]) for info in history(a)}
    lost = [pair for pair in confirmed if pair not in stored]
    assert not lost, (
        f"{len(lost)} confirmed (200) writes are missing after the failover: {lost[:10]}... "
        f"(store now at {a.admin('GET', '/api/v1/versions?limit=1')[1]['current']}); "
        f"timeline: {timeline()}"
    )
    odd = [(s, body) for s, body, _ in outcomes if s != 200 and s < 500]
    assert not odd, f"writes neither confirmed nor reported failed: {odd[:5]}; {timeline()}"

    _, data = a.admin("GET", "/api/v1/versions?limit=1")
    latest = data["current"]
    wait_version(a, latest, timeout_s=10)
    wait_version(b, latest, timeout_s=10)
    assert a.ready()["version"] == b.ready()["version"] == latest

    traffic.stop()
    assert traffic.failures == [], traffic.failures[:5]
