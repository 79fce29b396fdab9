"""The guard runner: judges every release once a second and rolls back a bad canary by itself.

Rules of this file:
* It runs beside the watcher as one asyncio task, never on the request path; every store,
  Redis and webhook call has a deadline. The clock is injected (`clock`), and `tick()` is the
  whole of one second's work, so tests drive it without sleeping.
* One tick: rotate the arm windows; publish this instance's counts to the fleet (Redis) and
  read the fleet's sums; judge each release that has a guard (flags/plan.py
  `effective_criteria`) on the fleet's traffic, or on its own when there is no fleet or it
  cannot be read; and, in a fleet, also on its own traffic alone against the catastrophic
  limit, so an instance whose users are failing acts even if the fleet's sums lag.
* A breach commits ONE new version: release at stage off, actor `guard`, the evidence in the
  summary and in the release's `rollback` record (shown by `explain`), with the store's
  compare-and-set. A lost CAS re-reads: if the release is already off (another instance won),
  nothing more is written, so two instances judging at once produce one rollback.
* The store unreachable during a breach: a local override (stores/watch.py) serves the
  rollback on this instance at once and becomes a version when the store returns.
* The guard never moves a release forward. Plans move forward (actor `plan`) only when the
  current phase has its evidence (duration, samples per arm, criteria pass).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import orjson

from edge.armstats import ArmStats
from edge.metrics import EdgeMetrics
from flags.document import STAGE_OFF, Document, Release
from flags.errors import ConfigError, StoreError, VersionConflict
from flags.evaluate import Snapshot
from flags.guard import (
    BREACH,
    HORIZONS_S,
    INSUFFICIENT,
    PASS,
    ArmCounts,
    Judgement,
    Sustain,
    Window,
    judge,
    windows_from,
)
from flags.plan import effective_criteria, guard_rollback, phase_passed
from flags.rollout import PLAN_RUNNING, GuardCriteria
from flags.store import Revision, Store
from stores import events as ev
from stores.events import EventBus
from stores.fleetstats import FleetStats
from stores.watch import ConfigWatcher

log = logging.getLogger("turnout.guard")

JUDGE_INTERVAL_S = 1.0
STORE_CALL_TIMEOUT_S = 2.0
COMMIT_ATTEMPTS = 3
# An instance acts alone, in a fleet, when its own canary fails at least this badly.
CATASTROPHIC_ERROR_RATE = 0.25  # the SPRT tests it against 50 %

# Shown for "above the last latency bucket" where a finite number is needed (metrics).
LATENCY_CEILING_MS = 60_000.0

ACTOR_GUARD = "guard"
ACTOR_PLAN = "plan"


@dataclass(slots=True)
class ReleaseState:
    """What the runner remembers about one release between ticks (never in the document)."""

    sustain: dict[str, Sustain] = field(default_factory=dict)
    judgement: Judgement = field(default_factory=Judgement)
    scope: str = "local"
    phase_key: float | None = None
    phase_canary: ArmCounts = field(default_factory=ArmCounts)
    phase_stable: ArmCounts = field(default_factory=ArmCounts)
    fleet_phase: tuple[ArmCounts, ArmCounts] | None = None
    held: bool = False
    windows: dict[int, tuple[ArmCounts, ArmCounts]] = field(default_factory=dict)


class Guardian:
    """Judges releases on live traffic; rolls back and advances plans through the store."""

    def __init__(
        self,
        *,
        store: Store,
        watcher: ConfigWatcher,
        metrics: EdgeMetrics,
        events: EventBus | None = None,
        fleet: FleetStats | None = None,
        instance_id: str | None = None,
        clock: Callable[[], float] = time.time,
        interval_s: float = JUDGE_INTERVAL_S,
    ) -> None:
        self.store = store
        self.watcher = watcher
        self.metrics = metrics
        self.arms: ArmStats = metrics.arms
        self.events = events or EventBus(clock)
        self.fleet = fleet
        self.instance_id = instance_id or uuid.uuid4().hex[:12]
        self.clock = clock
        self.interval_s = interval_s
        self.releases: dict[str, ReleaseState] = {}
        self.fleet_ok = False
        self.rollbacks = 0
        self._task: asyncio.Task[None] | None = None
        self._previous: Snapshot | None = watcher.snapshot
        # Per release, the document version from which this instance's evidence counts: the
        # version at which it last forgot a release's history (`_on_config`), else the version
        # it started on. Published with the counts, so that an instance which has not yet
        # applied the version that brought a release back (its entry is up to a second old)
        # cannot lend its old evidence to the new canary: `_sum` skips entries older than
        # this instance's own reset.
        self._start_version = watcher.snapshot.version if watcher.snapshot is not None else 0
        self._reset_at: dict[str, int] = {}
        watcher.listeners.append(self._on_config)

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="turnout-guard")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
            self._task = None

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        next_at = loop.time() + self.interval_s
        while True:
            await asyncio.sleep(max(0.0, next_at - loop.time()))
            next_at += self.interval_s
            if next_at < loop.time():  # fell behind (a long GC or a stalled loop): skip ahead
                next_at = loop.time() + self.interval_s
            try:
                await self.tick()
            except Exception:
                log.exception("guard tick failed")  # a bug must not stop the guard

    def _on_config(self, snapshot: Snapshot, revision: Revision | None) -> None:
        """A new version: old evidence about a canary that changed or was off is dropped."""
        previous = self._previous
        self._previous = snapshot
        if revision is not None:
            self.events.publish(
                ev.VERSION,
                {
                    "version": revision.version,
                    "actor": revision.info.actor,
                    "summary": revision.info.summary,
                },
            )
        if previous is None:
            return
        for name, rel in snapshot.releases.items():
            before = previous.releases.get(name)
            if (
                before is None
                or (before.disabled and not rel.disabled)
                or before.canary != rel.canary
            ):
                self.arms.reset(name)
                self.releases.pop(name, None)
                self._reset_at[name] = snapshot.version

    # -- one second ---------------------------------------------------------------------------

    async def tick(self) -> None:
        self.arms.rotate()
        snapshot = self.watcher.snapshot
        document = snapshot.document
        local = {name: self.arms.horizons(name) for name in self.arms.releases()}
        for name in local:
            self._accumulate_phase(name, document.releases.get(name))
        fleet = await self._exchange(local)
        for name, release in document.releases.items():
            await asyncio.sleep(0)  # let requests run between releases (~0.25 ms of judging each)
            if release.stage == STAGE_OFF:
                continue
            criteria = effective_criteria(release)
            if criteria is None or not criteria.enabled:
                continue
            state = self.releases.setdefault(name, ReleaseState())
            mine = local.get(name, {})
            horizons = fleet.get(name) if fleet is not None else None
            state.scope = "fleet" if horizons is not None else "local"
            state.windows = horizons if horizons is not None else mine
            judgement = judge(criteria, windows_from(state.windows))
            gross = _catastrophic(criteria)
            if gross is not None and horizons is not None and mine and judgement.status != BREACH:
                alone = judge(gross, windows_from(mine))
                if alone.status == BREACH:
                    judgement, state.scope = alone, "local-catastrophic"
            if judgement.status != state.judgement.status or not state.judgement.verdicts:
                # The stream carries verdict *changes*, not one event per second.
                self.events.publish(
                    ev.GUARD_VERDICT,
                    {
                        "release": name,
                        "verdict": judgement.status,
                        "scope": state.scope,
                        "summary": judgement.summary(),
                    },
                )
            state.judgement = judgement
            self.metrics.guard_verdicts[name] = judgement.status
            for v in judgement.verdicts:
                value = v.value
                if v.criterion == "p99_ratio":  # the factor the threshold is compared with
                    value = v.value / v.stable_value if v.stable_value else 0.0
                if not math.isfinite(value):
                    value = LATENCY_CEILING_MS
                self.metrics.guard_criteria[(name, v.criterion)] = (value, v.threshold)
            breaches = [
                v
                for v in judgement.breaches
                if state.sustain.setdefault(v.criterion, Sustain()).update(
                    self.clock(), True, criteria.sustained_s
                )
            ]
            for v in judgement.verdicts:
                if v.status != BREACH:
                    state.sustain.setdefault(v.criterion, Sustain()).update(
                        self.clock(), False, 0.0
                    )
            if breaches:
                await self.roll_back(name, Judgement(judgement.verdicts, tuple(breaches)), state)
                continue
            await self._step_plan(name, release, criteria, state)

    # -- fleet ---------------------------------------------------------------------------------

    async def _exchange(
        self, local: dict[str, dict[int, tuple[ArmCounts, ArmCounts]]]
    ) -> dict[str, dict[int, tuple[ArmCounts, ArmCounts]]] | None:
        """Publish this instance's counts and return the fleet's sums (None: judge alone)."""
        if self.fleet is None:
            return None
        payload: dict[str, Any] = {"instance": self.instance_id, "releases": {}}
        for name, horizons in local.items():
            entry: dict[str, Any] = {
                "h": {str(h): [c.to_list(), s.to_list()] for h, (c, s) in horizons.items()},
                "since": self._reset_at.get(name, self._start_version),
            }
            state = self.releases.get(name)
            if state is not None and state.phase_key is not None:
                entry["phase"] = [
                    state.phase_key,
                    state.phase_canary.to_list(),
                    state.phase_stable.to_list(),
                ]
            payload["releases"][name] = entry
        try:
            await self.fleet.publish(self.instance_id, payload)
            entries = await self.fleet.gather()
        except StoreError as exc:
            if self.fleet_ok:
                log.warning("fleet statistics unavailable (%s): judging this instance alone", exc)
            self.fleet_ok = False
            return None
        self.fleet_ok = True
        return self._sum(entries)

    def _sum(
        self, entries: list[dict[str, Any]]
    ) -> dict[str, dict[int, tuple[ArmCounts, ArmCounts]]]:
        out: dict[str, dict[int, tuple[ArmCounts, ArmCounts]]] = {}
        phases: dict[str, tuple[ArmCounts, ArmCounts]] = {}
        for entry in entries:
            for name, rel in entry["releases"].items():
                since = rel.get("since", 0)
                if type(since) is not int or since < self._reset_at.get(name, 0):
                    continue  # counted before this release's canary came back: not its evidence
                try:
                    horizons = {
                        int(h): (ArmCounts.from_list(c), ArmCounts.from_list(s))
                        for h, (c, s) in rel["h"].items()
                    }
                except (KeyError, TypeError, ValueError):
                    continue  # a malformed entry is skipped, never trusted
                mine = out.setdefault(name, {})
                for h, (c, s) in horizons.items():
                    if h not in HORIZONS_S:
                        continue
                    pc, ps = mine.get(h, (ArmCounts(), ArmCounts()))
                    mine[h] = (pc + c, ps + s)
                state = self.releases.get(name)
                phase = rel.get("phase")
                if state is not None and isinstance(phase, list) and len(phase) == 3:
                    if phase[0] == state.phase_key:
                        with contextlib.suppress(TypeError, ValueError):
                            c, s = ArmCounts.from_list(phase[1]), ArmCounts.from_list(phase[2])
                            pc, ps = phases.get(name, (ArmCounts(), ArmCounts()))
                            phases[name] = (pc + c, ps + s)
        for name, sums in phases.items():
            state = self.releases.get(name)
            if state is not None:
                state.fleet_phase = sums
        return out

    # -- rollback -------------------------------------------------------------------------------

    async def roll_back(self, name: str, judgement: Judgement, state: ReleaseState) -> bool:
        """One version at stage off with the evidence; True when this instance wrote it."""
        worst = max(judgement.breaches, key=lambda v: v.llr)
        reason = f"guard ({state.scope}): {worst.describe()}"
        evidence: dict[str, str | float | int] = {**worst.evidence(), "scope": state.scope}
        evidence["instance"] = self.instance_id
        started = time.monotonic()
        written: Revision | None = None
        local = False
        for _ in range(COMMIT_ATTEMPTS):
            try:
                async with asyncio.timeout(STORE_CALL_TIMEOUT_S):
                    latest = await self.store.latest()
                if latest is None:
                    return False
                release = latest.document.releases.get(name)
                if release is None or release.stage == STAGE_OFF:
                    self.watcher.offer(latest)
                    return False  # another instance (or a person) was first
                new, summary = guard_rollback(latest.document, name, reason, evidence)
                async with asyncio.timeout(STORE_CALL_TIMEOUT_S):
                    written = await self.store.commit(
                        new, expected_version=latest.version, actor=ACTOR_GUARD, summary=summary
                    )
                self.watcher.offer(written)
                break
            except VersionConflict:
                continue  # re-read: maybe someone else rolled it back already
            except ConfigError as exc:
                log.error("guard rollback of %s impossible: %s", name, exc)
                return False
            except (StoreError, TimeoutError, OSError) as exc:
                local = await self._roll_back_locally(name, reason, evidence, exc)
                break
        if written is None and not local:
            return False
        self.rollbacks += 1
        key = (name, worst.criterion)
        self.metrics.guard_rollbacks[key] = self.metrics.guard_rollbacks.get(key, 0) + 1
        record = {
            "event": "guard_rollback",
            "release": name,
            "version": written.version if written is not None else None,
            "local_override": local,
            "instance": self.instance_id,
            "criterion": worst.criterion,
            "evidence": evidence,
            "breaches": [v.evidence() for v in judgement.breaches],
            "commit_s": round(time.monotonic() - started, 4),
        }
        log.warning("guard rollback %s", orjson.dumps(record).decode())
        self.events.publish(ev.GUARD_ROLLBACK, record)
        state.sustain.clear()
        return True

    async def _roll_back_locally(
        self, name: str, reason: str, evidence: dict[str, str | float | int], exc: BaseException
    ) -> bool:
        document: Document = self.watcher.snapshot.document
        try:
            new, summary = guard_rollback(document, name, reason, evidence)
            await self.watcher.apply_local_override(new, summary, ACTOR_GUARD)
        except ConfigError as error:
            log.error("guard local rollback of %s impossible: %s", name, error)
            return False
        log.warning("store unreachable (%s): guard rollback of %s served locally", exc, name)
        return True

    # -- plans ----------------------------------------------------------------------------------

    def _accumulate_phase(self, name: str, release: Release | None) -> None:
        """Add the last complete second to the running phase's totals (this instance)."""
        plan = release.plan if release is not None else None
        if plan is None or plan.state.status != PLAN_RUNNING:
            return
        state = self.releases.setdefault(name, ReleaseState())
        key = plan.state.phase_started_at
        if state.phase_key != key:
            state.phase_key = key
            state.phase_canary = ArmCounts()
            state.phase_stable = ArmCounts()
            state.fleet_phase = None
            state.held = False
        canary = self.arms.series.get((name, "canary"))
        stable = self.arms.series.get((name, "stable"))
        if canary is not None:
            state.phase_canary = state.phase_canary + canary.last(1)
        if stable is not None:
            state.phase_stable = state.phase_stable + stable.last(1)

    def phase_counts(self, name: str) -> tuple[ArmCounts, ArmCounts]:
        state = self.releases.get(name)
        if state is None:
            return ArmCounts(), ArmCounts()
        if self.fleet_ok and state.fleet_phase is not None:
            return state.fleet_phase
        return state.phase_canary, state.phase_stable

    async def _step_plan(
        self, name: str, release: Release, criteria: GuardCriteria, state: ReleaseState
    ) -> None:
        plan = release.plan
        if plan is None or plan.state.status != PLAN_RUNNING or plan.state.phase_started_at is None:
            return
        phase = plan.phases[plan.state.phase]
        now = self.clock()
        in_phase = now - plan.state.phase_started_at
        canary, stable = self.phase_counts(name)
        if in_phase < phase.min_duration_s:
            return
        verdict = judge(criteria, [Window(max(1, round(in_phase)), canary, stable)])
        enough = canary.requests >= phase.min_samples and stable.requests >= phase.min_samples
        if not enough or verdict.status != PASS:
            if not state.held:
                state.held = True
                why = (
                    f"phase {plan.state.phase} held: {canary.requests}/{phase.min_samples} canary "
                    f"and {stable.requests}/{phase.min_samples} stable samples; {verdict.summary()}"
                )
                log.info("plan %s", why)
                self.events.publish(
                    ev.PLAN_HOLD, {"release": name, "phase": plan.state.phase, "why": why}
                )
            return
        evidence = (
            f"{in_phase:.0f} s, canary {canary.requests} ({canary.error_rate:.2%} errors), "
            f"stable {stable.requests} ({stable.error_rate:.2%} errors), criteria pass"
        )
        try:
            async with asyncio.timeout(STORE_CALL_TIMEOUT_S):
                latest = await self.store.latest()
            if latest is None:
                return
            current = latest.document.releases.get(name)
            if current is None or current.plan != plan:
                self.watcher.offer(latest)
                return  # the plan moved meanwhile (another instance, or a person)
            new, summary = phase_passed(latest.document, name, now, evidence)
            async with asyncio.timeout(STORE_CALL_TIMEOUT_S):
                written = await self.store.commit(
                    new, expected_version=latest.version, actor=ACTOR_PLAN, summary=summary
                )
        except VersionConflict:
            return  # someone else wrote first; judged again next second
        except (StoreError, TimeoutError, OSError, ConfigError) as exc:
            log.warning("plan %s: cannot advance now: %s", name, exc)
            return
        self.watcher.offer(written)
        self.metrics.plan_advances[name] = self.metrics.plan_advances.get(name, 0) + 1
        new_plan = written.document.releases[name].plan
        kind = ev.PLAN_ADVANCE
        if new_plan is not None and new_plan.state.status == "waiting_approval":
            kind = ev.PLAN_APPROVAL
        elif new_plan is not None and new_plan.state.status == "done":
            kind = ev.PLAN_DONE
        log.info("plan %s", summary)
        self.events.publish(kind, {"release": name, "version": written.version, "summary": summary})

    # -- the live view --------------------------------------------------------------------------

    def health(self, name: str) -> dict[str, Any] | None:
        """Both arms' window figures, the verdict and the plan's phase, for the admin API."""
        document = self.watcher.snapshot.document
        release = document.releases.get(name)
        if release is None:
            return None
        state = self.releases.get(name)
        windows = {}
        judged = state.windows if state is not None and state.windows else None
        for h, (c, s) in (judged or self.arms.horizons(name)).items():
            windows[str(h)] = {"canary": _figures(c), "stable": _figures(s)}
        judgement = state.judgement if state is not None else Judgement()
        criteria = effective_criteria(release)
        view: dict[str, Any] = {
            "release": name,
            "stage": release.stage,
            "version": document.version,
            "guarded": criteria is not None and criteria.enabled,
            "verdict": judgement.status if judgement.verdicts else INSUFFICIENT,
            "scope": state.scope if state is not None else "local",
            "fleet": self.fleet_ok,
            "criteria": [
                {**v.evidence(), "limit": v.limit, "text": v.describe()} for v in judgement.verdicts
            ],
            "windows": windows,
            "rollback": release.rollback.model_dump(mode="json") if release.rollback else None,
        }
        plan = release.plan
        if plan is not None:
            canary, stable = self.phase_counts(name)
            started = plan.state.phase_started_at
            phase = plan.phases[plan.state.phase]
            view["plan"] = {
                **plan.state.model_dump(mode="json"),
                "phases": len(plan.phases),
                "phase_spec": phase.model_dump(mode="json"),
                "time_in_phase_s": round(self.clock() - started, 1) if started else None,
                "samples": {"canary": canary.requests, "stable": stable.requests},
            }
        return view


def _figures(c: ArmCounts) -> dict[str, float | int]:
    return {
        "requests": c.requests,
        "errors": c.errors,
        "error_rate": round(c.error_rate, 5),
        "p95_ms": c.quantile_ms(0.95),
        "p99_ms": c.quantile_ms(0.99),
    }


def _catastrophic(criteria: GuardCriteria) -> GuardCriteria | None:
    """The bar for acting on this instance's traffic alone: absolute errors only, at
    `CATASTROPHIC_ERROR_RATE` or the configured limit if that is higher: alone, an instance
    sees a fraction of the fleet's samples, so only a gross failure counts. None when the
    guard has no absolute error criterion (relative criteria are never judged alone)."""
    if criteria.max_error_rate is None:
        return None
    limit = max(CATASTROPHIC_ERROR_RATE, criteria.max_error_rate)
    return GuardCriteria(
        max_error_rate=min(limit, 0.9),
        max_p95_ms=None,
        max_p99_ms=None,
        max_error_rate_increase=None,
        max_p99_ratio=None,
        min_samples=criteria.min_samples,
    )
