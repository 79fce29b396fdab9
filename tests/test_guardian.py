"""edge/guardian.py: the guard runner over real stores (file store, real redis-server), driven
tick by tick with an explicit clock; and one end-to-end run through a real Turnout whose
canary upstream answers 500."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import orjson

from edge.guardian import ACTOR_GUARD, ACTOR_PLAN, Guardian, _catastrophic
from edge.metrics import EdgeMetrics
from flags import plan as plans
from flags.document import load_document
from flags.evaluate import explain
from flags.guard import HORIZONS_S
from flags.rollout import GuardCriteria
from flags.store import Store
from stores import events as ev
from stores.events import EventBus
from stores.filestore import FileStore
from stores.fleetstats import fleet_stats_for
from stores.redisstore import RedisStore
from stores.watch import ConfigWatcher
from tests.harness import ThreadedServer, TurnoutInstance, backends, release_doc, wait_until
from tests.redisproc import redis_server
from tests.serveproc import LOOPBACK, ServeProcess, connection_owner

STABLE = "http://127.0.0.1:9"
CANARY = "http://127.0.0.1:10"


class Clock:
    """The guard's clock, moved by the test."""

    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def guarded_doc(**extra: Any) -> dict[str, Any]:
    return release_doc(STABLE, CANARY, stage="beta", guard={}, **extra)


async def setup(store: Store, tmp: Path, doc: dict[str, Any] | None) -> ConfigWatcher:
    await store.open()
    if doc is not None and await store.current_version() == 0:
        await store.commit(load_document(doc), expected_version=0, actor="seed", summary="seed")
    watcher = ConfigWatcher(store, bootstrap_path=tmp / "bootstrap.json", poll_interval_s=0.2)
    await watcher.start()
    return watcher


def traffic(
    metrics: EdgeMetrics, *, canary_errors: int, canary: int = 100, stable: int = 900
) -> None:
    """One second of finished requests as the pipeline's `logging` phase records them."""
    for i in range(canary):
        status = 500 if i < canary_errors else 200
        metrics.count("web", "canary", status)
        metrics.arms.record("web", "canary", status, 0.02)
    for i in range(stable):
        status = 500 if i % 100 == 0 else 200
        metrics.count("web", "stable", status)
        metrics.arms.record("web", "stable", status, 0.02)


def run_async(fn: Callable[..., Any]) -> Callable[[Path], None]:
    """Run an async test body on a fresh event loop, with a file store in tmp_path."""

    def wrapper(tmp_path: Path) -> None:
        if "file_store" in fn.__code__.co_varnames[: fn.__code__.co_argcount]:
            asyncio.run(fn(FileStore(tmp_path / "store", poll_interval_s=0.2), tmp_path))
        else:
            asyncio.run(fn(tmp_path))

    wrapper.__name__ = fn.__name__
    wrapper.__doc__ = fn.__doc__
    return wrapper


@run_async
async def test_breach_commits_one_guard_version_with_evidence(
    file_store: FileStore, tmp_path: Path
) -> None:
    """A canary at 50 % 5xx: one tick commits ONE version, actor guard, release at stage off,
    the criterion and both arms' figures in the summary, the rollback record (shown by
    explain), the metric and the event; further ticks write nothing more."""
    watcher = await setup(file_store, tmp_path, guarded_doc())
    metrics = EdgeMetrics()
    bus = EventBus()
    seen: list[ev.Event] = []
    bus.hooks.append(seen.append)
    guard = Guardian(store=file_store, watcher=watcher, metrics=metrics, events=bus, clock=Clock())
    try:
        traffic(metrics, canary_errors=50)
        await guard.tick()
        history = await file_store.history()
        assert [h.actor for h in history] == [ACTOR_GUARD, "seed"]
        assert "error_rate" in history[0].summary and "stable" in history[0].summary
        latest = await file_store.latest()
        assert latest is not None
        release = latest.document.releases["web"]
        assert release.stage == "off" and release.rollback is not None
        assert release.rollback.evidence is not None
        assert release.rollback.evidence["canary_samples"] == 100
        assert watcher.version == latest.version  # offered at once, not at the next poll
        why = explain(watcher.snapshot, "web", "someone")
        assert why["arm"] == "stable" and "guard" in str(why["explanation"])
        assert why["rollback"]["evidence"]["criterion"] in ("error_rate", "error_rate_increase")  # type: ignore[index]
        assert sum(metrics.guard_rollbacks.values()) == 1
        assert [e.kind for e in seen if e.kind == ev.GUARD_ROLLBACK] == [ev.GUARD_ROLLBACK]
        traffic(metrics, canary_errors=50)
        await guard.tick()
        assert len(await file_store.history()) == 2
    finally:
        await watcher.stop()


@run_async
async def test_healthy_canary_is_left_alone(file_store: FileStore, tmp_path: Path) -> None:
    """1 % errors on both arms for 30 ticks: no version written, the verdict passes."""
    watcher = await setup(file_store, tmp_path, guarded_doc())
    metrics = EdgeMetrics()
    guard = Guardian(store=file_store, watcher=watcher, metrics=metrics, clock=Clock())
    try:
        for _ in range(30):
            traffic(metrics, canary_errors=1)
            await guard.tick()
        assert len(await file_store.history()) == 1
        assert metrics.guard_verdicts["web"] == "pass"
        value, threshold = metrics.guard_criteria[("web", "error_rate")]
        assert threshold == 0.05 and 0 <= value < 0.05
        view = guard.health("web")
        assert view is not None and view["verdict"] == "pass"
        assert view["windows"]["10"]["canary"]["requests"] == 1000
    finally:
        await watcher.stop()


@run_async
async def test_unguarded_release_is_never_judged(file_store: FileStore, tmp_path: Path) -> None:
    """Without `guard` (and no running plan) a failing canary is not rolled back: the guard is
    opt-in per release."""
    watcher = await setup(file_store, tmp_path, release_doc(STABLE, CANARY, stage="beta"))
    metrics = EdgeMetrics()
    guard = Guardian(store=file_store, watcher=watcher, metrics=metrics, clock=Clock())
    try:
        traffic(metrics, canary_errors=100)
        await guard.tick()
        assert len(await file_store.history()) == 1
    finally:
        await watcher.stop()


@run_async
async def test_two_instances_judging_at_once_roll_back_once(tmp_path: Path) -> None:
    """Two instances on one redis-server see the same breach in the same tick: the store's
    compare-and-set lets one write; the other re-reads, finds the release off, writes
    nothing. Their published counts are summed fleet-wide."""
    with redis_server(tmp_path / "redis") as server:
        stores = [RedisStore.from_url(server.url) for _ in range(2)]
        watchers = [await setup(s, tmp_path / f"i{i}", guarded_doc()) for i, s in enumerate(stores)]
        metrics = [EdgeMetrics(), EdgeMetrics()]
        guards = [
            Guardian(
                store=s,
                watcher=w,
                metrics=m,
                fleet=fleet_stats_for(s),
                instance_id=f"i{i}",
                clock=Clock(),
            )
            for i, (s, w, m) in enumerate(zip(stores, watchers, metrics, strict=True))
        ]
        try:
            # Each alone has too few samples (min 50); together they have enough.
            for m in metrics:
                traffic(m, canary_errors=0, canary=0, stable=0)
            await asyncio.gather(*(g.tick() for g in guards))  # publish empty, learn the fleet
            for m in metrics:
                traffic(m, canary_errors=20, canary=30, stable=300)
            await asyncio.gather(*(g.tick() for g in guards))
            await asyncio.gather(*(g.tick() for g in guards))
            history = await stores[0].history()
            assert [h.actor for h in history].count(ACTOR_GUARD) == 1
            assert sum(g.rollbacks for g in guards) == 1
            assert all(g.fleet_ok for g in guards)
            assert "fleet" in history[0].summary
        finally:
            for w in watchers:
                await w.stop()


@run_async
async def test_redis_down_rolls_back_locally_then_commits(tmp_path: Path) -> None:
    """Redis dies during a breach: the instance serves the rollback at once as a local
    override, and it becomes a version (actor guard) when Redis returns."""
    with redis_server(tmp_path / "redis", persistent=True) as server:
        store = RedisStore.from_url(server.url)
        watcher = await setup(store, tmp_path, guarded_doc())
        metrics = EdgeMetrics()
        guard = Guardian(
            store=store,
            watcher=watcher,
            metrics=metrics,
            fleet=fleet_stats_for(store),
            clock=Clock(),
        )
        try:
            with server.client() as r:
                r.save()
            server.kill9()
            traffic(metrics, canary_errors=60)
            await guard.tick()
            assert watcher.pending_override
            assert watcher.snapshot.releases["web"].disabled  # served at once
            server.start()

            async def committed() -> bool:
                await asyncio.sleep(0.05)
                return any(h.actor == ACTOR_GUARD for h in await store.history())

            for _ in range(200):
                if await committed():
                    break
            assert await committed()
            assert not watcher.pending_override
        finally:
            await watcher.stop()


@run_async
async def test_plan_advances_on_evidence_holds_and_waits(
    file_store: FileStore, tmp_path: Path
) -> None:
    """A plan internal -> beta (approve) -> ga: the first phase advances (actor plan) only after
    its minimum duration on the driven clock AND its minimum samples; low traffic holds it
    (an event, no failure); an approval phase waits for an approver."""
    plan = {
        "phases": [
            {"percent": 1.0, "min_duration_s": 60, "min_samples": 200},
            {"stage": "beta", "min_duration_s": 30, "min_samples": 100, "advance": "approve"},
            {"stage": "ga"},
        ],
        "approvers": ["alice"],
    }
    clock = Clock()
    watcher = await setup(file_store, tmp_path, release_doc(STABLE, CANARY, stage="off", plan=plan))
    metrics = EdgeMetrics()
    bus = EventBus()
    seen: list[str] = []
    bus.hooks.append(lambda e: seen.append(e.kind))
    guard = Guardian(store=file_store, watcher=watcher, metrics=metrics, events=bus, clock=clock)
    try:
        latest = await file_store.latest()
        assert latest is not None
        new, summary = plans.start(latest.document, "web", clock.now)
        watcher.offer(
            await file_store.commit(
                new, expected_version=latest.version, actor="ops", summary=summary
            )
        )
        # 60 s of a trickle: duration reached, samples not -> hold, never fail.
        for _ in range(60):
            clock.now += 1
            traffic(metrics, canary_errors=0, canary=1, stable=9)
            await guard.tick()
        assert watcher.snapshot.document.releases["web"].plan.state.phase == 0  # type: ignore[union-attr]
        assert ev.PLAN_HOLD in seen
        # Enough traffic: the phase passes and the plan moves to beta (the p99 criterion needs
        # about 460 samples before the SPRT can say "under 1 % slower").
        for _ in range(20):
            clock.now += 1
            traffic(metrics, canary_errors=0, canary=30, stable=300)
            await guard.tick()
        rel = watcher.snapshot.document.releases["web"]
        assert rel.stage == "beta" and rel.plan is not None and rel.plan.state.phase == 1
        assert (await file_store.history())[0].actor == ACTOR_PLAN
        for _ in range(40):
            clock.now += 1
            traffic(metrics, canary_errors=0, canary=30, stable=300)
            await guard.tick()
        rel = watcher.snapshot.document.releases["web"]
        assert rel.plan is not None and rel.plan.state.status == "waiting_approval"
        assert rel.stage == "beta"
        assert ev.PLAN_APPROVAL in seen
    finally:
        await watcher.stop()


class FailingApp:
    """A canary upstream that answers 500 to everything (it can be told to recover)."""

    def __init__(self) -> None:
        self.failing = True

    async def __call__(self, scope: dict[str, Any], receive: Callable[..., Any], send: Any) -> None:
        if scope["type"] != "http":
            return
        status = 500 if self.failing else 200
        await send({"type": "http.response.start", "status": status, "headers": []})
        await send({"type": "http.response.body", "body": b"canary"})


def test_end_to_end_failing_canary_is_rolled_back(tmp_path: Path) -> None:
    """Through a real Turnout: a canary upstream answering 500 (counted from the responses the
    clients got) is rolled back by the guard; /health, /metrics and the version history show
    it, and every user then lands on stable."""
    canary = ThreadedServer(FailingApp(), http="httptools").start()
    with backends("stable") as up:
        doc = release_doc(up["stable"].url, canary.url, stage="open", guard={})
        inst = TurnoutInstance(tmp_path, seed=doc).start()
        try:
            with httpx.Client(base_url=inst.edge_url, timeout=5) as client:

                def hammer() -> bool:
                    for i in range(50):
                        client.get("/", headers={"x-user-id": f"u{i}"})
                    history = httpx.get(f"{inst.admin_url}/api/v1/versions").json()
                    return any(v["actor"] == ACTOR_GUARD for v in history["versions"])

                assert wait_until(hammer, timeout=30, interval=0)
                arms = {
                    client.get("/", headers={"x-user-id": f"u{i}"}).status_code for i in range(40)
                }
                assert arms == {200}
            health = httpx.get(f"{inst.admin_url}/api/v1/releases/web/health").json()
            assert health["stage"] == "off" and health["rollback"]["evidence"]["criterion"]
            text = httpx.get(f"{inst.admin_url}/metrics").text
            assert "turnout_guard_rollbacks_total" in text
        finally:
            inst.stop()
            canary.stop()


def test_with_two_workers_one_guard_judges_the_whole_instance(tmp_path: Path) -> None:
    """`turnout serve --workers 2`: both workers' per-arm counts reach the one guard runner in
    the supervisor (while the canary is healthy its longest window holds every request the
    workers answered); once the canary fails it is rolled back once, and the guard's families
    are in the supervisor's /metrics."""
    app = FailingApp()
    app.failing = False
    canary = ThreadedServer(app, http="httptools").start()
    with backends("stable") as up:
        doc = release_doc(up["stable"].url, canary.url, stage="open", guard={})
        proc = ServeProcess(tmp_path, workers=2, seed=doc, poll_interval_s=0.1).start()
        try:
            pids = proc.worker_pids()
            answered = dict.fromkeys(pids, 0)

            def send(count: int) -> None:
                for i in range(count):
                    with socket.create_connection((LOOPBACK, proc.edge_port), 5) as sock:
                        owner = connection_owner(sock, pids)
                        sock.sendall(
                            b"GET / HTTP/1.1\r\nhost: a\r\nx-user-id: u%d\r\n"
                            b"connection: close\r\n\r\n" % i
                        )
                        while sock.recv(65536):
                            pass
                    if owner is not None:
                        answered[owner] += 1

            def health() -> dict[str, Any]:
                _, raw = proc.admin("GET", "/api/v1/releases/web/health", headers=proc.auth)
                view: dict[str, Any] = orjson.loads(raw)
                return view

            def judged_everything() -> bool:
                windows = health()["windows"][str(max(HORIZONS_S))]
                seen = windows["canary"]["requests"] + windows["stable"]["requests"]
                return bool(seen == proc.metric_sum("turnout_requests_total", release="web"))

            assert wait_until(lambda: (send(20), all(answered.values()))[1], 30, interval=0)
            total = sum(answered.values())
            assert wait_until(
                lambda: proc.metric_sum("turnout_requests_total", release="web") == total, 10
            )
            assert wait_until(judged_everything, 15)
            assert health()["verdict"] != "breach"

            app.failing = True

            def rolled_back() -> bool:
                send(40)
                _, body = proc.admin("GET", "/api/v1/versions", headers=proc.auth)
                versions = orjson.loads(body)["versions"]
                return any(v["actor"] == ACTOR_GUARD for v in versions)

            assert wait_until(rolled_back, timeout=60, interval=0)
            _, body = proc.admin("GET", "/api/v1/versions", headers=proc.auth)
            actors = [v["actor"] for v in orjson.loads(body)["versions"]]
            assert actors.count(ACTOR_GUARD) == 1
            assert proc.metric_sum("turnout_guard_rollbacks_total", release="web") == 1
            assert proc.metric_sum("turnout_guard_verdict", release="web") == 1
        finally:
            proc.stop()
            canary.stop()


@run_async
async def test_instance_acts_alone_on_a_catastrophic_breach(tmp_path: Path) -> None:
    """In a fleet whose sums look fine (one instance's healthy canary traffic dilutes the
    other's), the instance whose own canary answers only 5xx rolls back alone
    (scope local-catastrophic); with a relative-only guard it never acts alone."""
    with redis_server(tmp_path / "redis") as server:
        stores = [RedisStore.from_url(server.url) for _ in range(2)]
        watchers = [await setup(s, tmp_path / f"i{i}", guarded_doc()) for i, s in enumerate(stores)]
        metrics = [EdgeMetrics(), EdgeMetrics()]
        guards = [
            Guardian(
                store=s,
                watcher=w,
                metrics=m,
                fleet=fleet_stats_for(s),
                instance_id=f"i{i}",
                clock=Clock(),
            )
            for i, (s, w, m) in enumerate(zip(stores, watchers, metrics, strict=True))
        ]
        try:
            await asyncio.gather(*(g.tick() for g in guards))
            traffic(metrics[0], canary_errors=80, canary=80, stable=800)
            traffic(metrics[1], canary_errors=0, canary=8000, stable=80000)
            await guards[1].tick()  # publishes the healthy bulk first
            await guards[0].tick()
            history = await stores[0].history()
            assert history[0].actor == ACTOR_GUARD
            assert "local-catastrophic" in history[0].summary
            assert guards[0].rollbacks == 1 and guards[1].rollbacks == 0
            relative_only = GuardCriteria(max_error_rate=None, max_p99_ms=None)
            assert _catastrophic(relative_only) is None
        finally:
            for w in watchers:
                await w.stop()


@run_async
async def test_sustained_breach_waits_on_the_driven_clock(
    file_store: FileStore, tmp_path: Path
) -> None:
    """With `sustained_s: 3` a breach rolls back only once it has held for 3 s of the
    guard's clock (driven here), not at the first breaching tick."""
    doc = release_doc(STABLE, CANARY, stage="beta", guard={"sustained_s": 3.0})
    watcher = await setup(file_store, tmp_path, doc)
    metrics = EdgeMetrics()
    clock = Clock()
    guard = Guardian(store=file_store, watcher=watcher, metrics=metrics, clock=clock)
    try:
        for second in range(3):
            traffic(metrics, canary_errors=50)
            await guard.tick()
            assert guard.rollbacks == 0, f"rolled back after {second} s"
            clock.now += 1
        traffic(metrics, canary_errors=50)
        await guard.tick()
        assert guard.rollbacks == 1
        assert (await file_store.history())[0].actor == ACTOR_GUARD
    finally:
        await watcher.stop()


@run_async
async def test_old_evidence_is_forgotten_when_the_release_comes_back(
    file_store: FileStore, tmp_path: Path
) -> None:
    """After a rollback, moving the release forward again drops the old windows: the next
    tick, with healthy traffic, does not roll the new canary back on the old failures."""
    watcher = await setup(file_store, tmp_path, guarded_doc())
    metrics = EdgeMetrics()
    guard = Guardian(store=file_store, watcher=watcher, metrics=metrics, clock=Clock())
    try:
        traffic(metrics, canary_errors=50)
        await guard.tick()
        assert guard.rollbacks == 1
        latest = await file_store.latest()
        assert latest is not None
        from flags.changes import set_stage

        new, summary = set_stage(latest.document, "web", stage="beta")
        watcher.offer(
            await file_store.commit(
                new, expected_version=latest.version, actor="ops", summary=summary
            )
        )
        assert metrics.arms.horizons("web")[60][0].requests == 0
        traffic(metrics, canary_errors=0)
        await guard.tick()
        assert guard.rollbacks == 1
        assert (await file_store.history())[0].actor == "ops"
    finally:
        await watcher.stop()


@run_async
async def test_a_stale_fleet_entry_is_not_evidence_against_a_release_that_came_back(
    tmp_path: Path,
) -> None:
    """Instance i1 rolls a bad canary back; ops brings the release back at beta. i0 applies
    that version and judges healthy traffic while i1's last published counts (up to a
    second old, still holding the bad canary's failures) are in the fleet sums: they were
    counted before the release came back, so they are skipped, and nothing rolls back twice.
    (Before this rule, benchmarks/guard.py's second scenario could be rolled back at once on
    the first scenario's errors.)"""
    with redis_server(tmp_path / "redis") as server:
        stores = [RedisStore.from_url(server.url) for _ in range(2)]
        watchers = [await setup(s, tmp_path / f"i{i}", guarded_doc()) for i, s in enumerate(stores)]
        metrics = [EdgeMetrics(), EdgeMetrics()]
        guards = [
            Guardian(
                store=s,
                watcher=w,
                metrics=m,
                fleet=fleet_stats_for(s),
                instance_id=f"i{i}",
                clock=Clock(),
            )
            for i, (s, w, m) in enumerate(zip(stores, watchers, metrics, strict=True))
        ]
        try:
            traffic(metrics[1], canary_errors=50)
            await guards[1].tick()  # publishes the failures and rolls back
            assert guards[1].rollbacks == 1
            rolled_back = await stores[0].latest()
            assert rolled_back is not None
            watchers[0].offer(rolled_back)
            from flags.changes import set_stage

            new, summary = set_stage(rolled_back.document, "web", stage="beta")
            back = await stores[0].commit(
                new, expected_version=rolled_back.version, actor="ops", summary=summary
            )
            watchers[0].offer(back)
            assert watchers[0].snapshot.version == back.version
            traffic(metrics[0], canary_errors=0)
            await guards[0].tick()  # i1's entry in Redis is still the old one
            assert guards[0].rollbacks == 0
            assert guards[0].fleet_ok
            assert (await stores[0].history())[0].actor == "ops"
            # i1's counts from after its own reset are evidence again.
            for _ in range(500):  # i1's watcher applies the version from Redis
                if watchers[1].snapshot.version == back.version:
                    break
                await asyncio.sleep(0.01)
            assert watchers[1].snapshot.version == back.version
            traffic(metrics[1], canary_errors=0)
            await guards[1].tick()
            await guards[0].tick()
            canary, _stable = guards[0].releases["web"].windows[60]
            assert canary.requests == 200
        finally:
            for w in watchers:
                await w.stop()
