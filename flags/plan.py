"""Pure edits for guarded delivery: the guard's rollback and a phase plan's life.

Each function takes the store's latest document and returns (new document, summary), like
`flags/changes.py`, or raises `ConfigError` naming the field. The plan state machine:

    pending --start--> running --phase passed, advance auto--> running (next phase) ... done
                       running --phase passed, advance approve--> waiting_approval
                       waiting_approval --approve--> running (next phase)
                       running|waiting_approval --pause--> paused --resume--> running
                       any --breach (guard)--> stopped      any --abort--> aborted (stage off)
                       stopped|aborted|done --start--> running (phase 0 again)

A plan only ever moves a release *forward* through its phases; the guard only ever moves it
to stage off. Times are the caller's clock (seconds since the epoch), never read here.
"""

from __future__ import annotations

from collections.abc import Mapping

from flags.changes import describe_stage, set_stage
from flags.document import STAGE_OFF, Document, Release, Rollback, check_document
from flags.errors import ConfigError
from flags.rollout import (
    PLAN_ABORTED,
    PLAN_DONE,
    PLAN_PAUSED,
    PLAN_RUNNING,
    PLAN_STOPPED,
    PLAN_WAITING,
    GuardCriteria,
    Maintenance,
    Phase,
    Plan,
    PlanState,
    check_maintenance,
)

MAX_REASON_CHARS = 500


def _release(doc: Document, name: str) -> Release:
    try:
        return doc.releases[name]
    except KeyError:
        raise ConfigError("release", f"unknown release {name!r}") from None


def _plan(doc: Document, name: str) -> Plan:
    plan = _release(doc, name).plan
    if plan is None:
        raise ConfigError(f"releases.{name}.plan", "this release has no plan")
    return plan


def _put(doc: Document, name: str, release: Release) -> Document:
    releases = dict(doc.releases)
    releases[name] = release
    new = doc.model_copy(update={"releases": releases})
    check_document(new)
    return new


def _with_state(doc: Document, name: str, state: PlanState) -> Document:
    release = _release(doc, name)
    plan = _plan(doc, name)
    return _put(
        doc, name, release.model_copy(update={"plan": plan.model_copy(update={"state": state})})
    )


def _at_phase(doc: Document, name: str, phase: Phase) -> Document:
    if phase.stage is not None:
        new, _ = set_stage(doc, name, stage=phase.stage)
    else:
        new, _ = set_stage(doc, name, percent=phase.percent)
    return new


def effective_criteria(release: Release) -> GuardCriteria | None:
    """What the guard judges a release by: the running phase's criteria, else the release's
    guard, else (a plan is running) the defaults; None: no guard for this release."""
    plan = release.plan
    running = plan is not None and plan.state.status in (PLAN_RUNNING, PLAN_WAITING, PLAN_PAUSED)
    if plan is not None and running:
        phase = plan.phases[plan.state.phase]
        if phase.criteria is not None:
            return phase.criteria
    if release.guard is not None:
        return release.guard
    return GuardCriteria() if running else None


def guard_rollback(
    doc: Document, name: str, reason: str, evidence: Mapping[str, str | float | int]
) -> tuple[Document, str]:
    """Stage off with the guard's evidence; a running plan stops. Never a step forward."""
    current = _release(doc, name)
    if current.stage == STAGE_OFF:
        raise ConfigError(f"releases.{name}.stage", "already off")
    reason = reason[:MAX_REASON_CHARS]
    record = Rollback(
        reason=reason,
        from_stage=current.stage,
        from_percent=current.percent,
        evidence=dict(evidence),
    )
    update: dict[str, object] = {"stage": STAGE_OFF, "percent": None, "rollback": record}
    if current.plan is not None and current.plan.state.status not in (
        PLAN_DONE,
        PLAN_ABORTED,
        PLAN_STOPPED,
    ):
        state = current.plan.state.model_copy(
            update={"status": PLAN_STOPPED, "note": f"stopped by the guard: {reason}"[:500]}
        )
        update["plan"] = current.plan.model_copy(update={"state": state})
    new = _put(doc, name, current.model_copy(update=update))
    return new, f"{name}: guard rollback from {describe_stage(current)}: {reason}"


def start(doc: Document, name: str, now: float) -> tuple[Document, str]:
    plan = _plan(doc, name)
    if plan.state.status in (PLAN_RUNNING, PLAN_WAITING, PLAN_PAUSED):
        raise ConfigError(f"releases.{name}.plan.state", f"already {plan.state.status}")
    new = _at_phase(doc, name, plan.phases[0])
    new = _with_state(new, name, PlanState(status=PLAN_RUNNING, phase=0, phase_started_at=now))
    return new, f"{name}: plan started at phase 0 ({describe_stage(new.releases[name])})"


def pause(doc: Document, name: str) -> tuple[Document, str]:
    plan = _plan(doc, name)
    if plan.state.status not in (PLAN_RUNNING, PLAN_WAITING):
        raise ConfigError(
            f"releases.{name}.plan.state", f"cannot pause a plan that is {plan.state.status}"
        )
    state = plan.state.model_copy(
        update={"status": PLAN_PAUSED, "note": f"paused ({plan.state.status})"}
    )
    return _with_state(doc, name, state), f"{name}: plan paused at phase {plan.state.phase}"


def resume(doc: Document, name: str, now: float) -> tuple[Document, str]:
    """Back to running; the phase's clock restarts (the paused time is not evidence)."""
    plan = _plan(doc, name)
    if plan.state.status != PLAN_PAUSED:
        raise ConfigError(
            f"releases.{name}.plan.state", f"cannot resume a plan that is {plan.state.status}"
        )
    state = plan.state.model_copy(
        update={"status": PLAN_RUNNING, "phase_started_at": now, "note": ""}
    )
    return _with_state(doc, name, state), f"{name}: plan resumed at phase {plan.state.phase}"


def approve(doc: Document, name: str, approver: str, now: float) -> tuple[Document, str]:
    plan = _plan(doc, name)
    if plan.state.status != PLAN_WAITING:
        raise ConfigError(
            f"releases.{name}.plan.state", f"nothing to approve: the plan is {plan.state.status}"
        )
    if approver not in plan.approvers:
        raise ConfigError("approver", f"{approver!r} is not among the plan's approvers")
    return _advance(doc, name, now, f"approved by {approver}")


def abort(doc: Document, name: str, reason: str) -> tuple[Document, str]:
    plan = _plan(doc, name)
    if not reason.strip():
        raise ConfigError("reason", "an abort needs a reason")
    current = _release(doc, name)
    record = Rollback(
        reason=reason.strip()[:MAX_REASON_CHARS],
        from_stage=current.stage,
        from_percent=current.percent,
    )
    state = plan.state.model_copy(update={"status": PLAN_ABORTED, "note": reason.strip()[:500]})
    release = current.model_copy(
        update={
            "stage": STAGE_OFF,
            "percent": None,
            "rollback": record,
            "plan": plan.model_copy(update={"state": state}),
        }
    )
    return _put(
        doc, name, release
    ), f"{name}: plan aborted at phase {plan.state.phase} ({reason.strip()})"


def phase_passed(doc: Document, name: str, now: float, evidence: str) -> tuple[Document, str]:
    """The running phase has its evidence: the next phase (auto), or wait for approval."""
    plan = _plan(doc, name)
    if plan.state.status != PLAN_RUNNING:
        raise ConfigError(f"releases.{name}.plan.state", f"not running ({plan.state.status})")
    phase = plan.phases[plan.state.phase]
    last = plan.state.phase + 1 >= len(plan.phases)
    if last:
        state = plan.state.model_copy(update={"status": PLAN_DONE, "note": evidence[:500]})
        return _with_state(
            doc, name, state
        ), f"{name}: plan done after phase {plan.state.phase} ({evidence})"
    if phase.advance == "approve":
        state = plan.state.model_copy(update={"status": PLAN_WAITING, "note": evidence[:500]})
        return (
            _with_state(doc, name, state),
            f"{name}: phase {plan.state.phase} passed, waiting for approval ({evidence})",
        )
    return _advance(doc, name, now, evidence)


def _advance(doc: Document, name: str, now: float, why: str) -> tuple[Document, str]:
    plan = _plan(doc, name)
    nxt = plan.state.phase + 1
    before = describe_stage(_release(doc, name))
    new = _at_phase(doc, name, plan.phases[nxt])
    new = _with_state(
        new, name, PlanState(status=PLAN_RUNNING, phase=nxt, phase_started_at=now, note=why[:500])
    )
    after = describe_stage(new.releases[name])
    return new, f"{name}: plan phase {nxt - 1} -> {nxt} ({before} -> {after}; {why})"


def set_maintenance(
    doc: Document,
    name: str | None,
    *,
    enabled: bool,
    retry_after_s: int | None = None,
    message: str | None = None,
) -> tuple[Document, str]:
    """Maintenance on or off, for one release or (name None) every route."""
    if not isinstance(enabled, bool):
        raise ConfigError("enabled", "must be true or false")
    current = doc.maintenance if name is None else _release(doc, name).maintenance
    base = current or Maintenance()
    update: dict[str, object] = {"enabled": enabled}
    if retry_after_s is not None:
        if isinstance(retry_after_s, bool) or not isinstance(retry_after_s, int):
            raise ConfigError("retry_after_s", "must be an integer number of seconds")
        update["retry_after_s"] = retry_after_s
    if message is not None:
        if not isinstance(message, str) or len(message) > 1000:
            raise ConfigError("message", "must be a string of at most 1000 characters")
        update["message"] = message
    value = base.model_copy(update=update)
    where = "maintenance" if name is None else f"releases.{name}.maintenance"
    check_maintenance(where, value)
    if name is None:
        new = doc.model_copy(update={"maintenance": value})
        check_document(new)
        scope = "everything"
    else:
        new = _put(doc, name, _release(doc, name).model_copy(update={"maintenance": value}))
        scope = name
    return new, f"maintenance {'on' if enabled else 'off'} for {scope}"
