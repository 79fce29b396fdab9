"""Guarded delivery in the document: guard criteria, phase plans, maintenance (issue #10).

Rules of this file:
* Pure data and validation, like `flags/document.py`: models are frozen and strict, unknown
  fields are refused, and `check_guard` / `check_plan` / `check_maintenance` raise a
  `ConfigError` naming the dotted field. `flags/document.py` calls them from its whole-document
  check, so a plan or criterion that cannot work never becomes a version.
* Plan *state* (which phase, since when, waiting for approval) lives here too, in the document:
  every advance is a new version, so every instance agrees and a restart forgets nothing.

Defaults, beside the numbers reviewers compare them with (ROLLOUTS.md, "Numbers worth copying"):

    criterion                     Turnout default     Flagger            the seeds (#10)
    absolute error rate           5 %                 1 % (99 % success) 5 %
    p99 latency                   5 s                 500 ms             5 s ("longer than 5 s")
    p95 latency                   off                 -                  -
    relative error-rate increase  +2 points           - (no baseline)    -
    relative p99 ratio            3x                  -                  -
    minimum samples per arm       50 (Kayenta: 50)    none               -
    sustained                     0 s (act at once)   interval x thr.    "instantly at >5 %"
    judged every                  1 s                 60 s (min 10 s)    within 5 minutes

Flagger's stricter numbers are one edit away (`max_error_rate: 0.01`, `max_p99_ms: 500`);
ours start from the seeds because a guard that rolls back healthy releases gets switched off.
"""

from __future__ import annotations

import math
from typing import Final, Literal

from pydantic import BaseModel, ConfigDict, Field

from flags.errors import ConfigError

_MODEL = ConfigDict(extra="forbid", frozen=True, strict=True)

DEFAULT_MAX_ERROR_RATE = 0.05
DEFAULT_MAX_P99_MS = 5000.0
DEFAULT_MAX_ERROR_RATE_INCREASE = 0.02
DEFAULT_MAX_P99_RATIO = 3.0
DEFAULT_MIN_SAMPLES = 50
DEFAULT_SUSTAINED_S = 0.0
MAX_SUSTAINED_S = 3600.0
MAX_LATENCY_MS = 600_000.0
MAX_PHASE_DURATION_S = 30 * 24 * 3600.0

ADVANCE_AUTO: Final = "auto"
ADVANCE_APPROVE: Final = "approve"

PLAN_PENDING: Final = "pending"  # written, not started
PLAN_RUNNING: Final = "running"  # the current phase is being judged
PLAN_WAITING: Final = "waiting_approval"  # the current phase passed; a person must approve the next
PLAN_PAUSED: Final = "paused"  # an operator paused it: no advance, the guard still judges
PLAN_STOPPED: Final = "stopped"  # a breach rolled the release back; only `start` runs it again
PLAN_ABORTED: Final = "aborted"  # an operator aborted: release at stage off
PLAN_DONE: Final = "done"  # the last phase passed
PLAN_STATUSES = (
    PLAN_PENDING,
    PLAN_RUNNING,
    PLAN_WAITING,
    PLAN_PAUSED,
    PLAN_STOPPED,
    PLAN_ABORTED,
    PLAN_DONE,
)


class GuardCriteria(BaseModel):
    """When the canary is bad enough to roll back. A threshold of `None` switches that
    criterion off.

    Absolute criteria judge the canary alone: when stable fails just as much (a shared
    dependency is down) they still fire, on purpose: users of the canary are failing. The
    relative criteria compare the canary with stable in the same window, so stable's own
    failures raise the bar instead of rolling the canary back."""

    model_config = _MODEL
    enabled: bool = True
    max_error_rate: float | None = DEFAULT_MAX_ERROR_RATE
    max_p95_ms: float | None = None
    max_p99_ms: float | None = DEFAULT_MAX_P99_MS
    max_error_rate_increase: float | None = DEFAULT_MAX_ERROR_RATE_INCREASE
    max_p99_ratio: float | None = DEFAULT_MAX_P99_RATIO
    min_samples: int = DEFAULT_MIN_SAMPLES
    sustained_s: float = DEFAULT_SUSTAINED_S


class Phase(BaseModel):
    """One step of a plan: where the release stands, for how long, on how much evidence."""

    model_config = _MODEL
    stage: str | None = None
    percent: float | None = None
    min_duration_s: float = Field(default=600.0)
    min_samples: int = DEFAULT_MIN_SAMPLES
    criteria: GuardCriteria | None = None  # None: the release's guard criteria
    advance: Literal["auto", "approve"] = ADVANCE_AUTO


class PlanState(BaseModel):
    """Where a plan is; written by the plan runner and the operators' commands."""

    model_config = _MODEL
    status: Literal[
        "pending", "running", "waiting_approval", "paused", "stopped", "aborted", "done"
    ] = PLAN_PENDING
    phase: int = 0
    phase_started_at: float | None = None  # seconds since the epoch (the runner's clock)
    note: str = Field(default="", max_length=500)


class Plan(BaseModel):
    """Ordered phases (internal -> beta -> open -> GA), advanced on evidence."""

    model_config = _MODEL
    phases: tuple[Phase, ...] = Field(min_length=1, max_length=32)
    approvers: tuple[str, ...] = ()
    state: PlanState = PlanState()


class Maintenance(BaseModel):
    """503 with Retry-After for everyone but the internal cohort (global or per release)."""

    model_config = _MODEL
    enabled: bool = False
    retry_after_s: int = 300
    message: str = Field(default="Down for maintenance; back soon.", max_length=1000)


def _check_fraction(field: str, value: float | None, *, low: float = 0.0) -> None:
    if value is None:
        return
    if not math.isfinite(value) or value <= low or value > 1:
        raise ConfigError(field, f"must be a fraction above {low:g} and at most 1, got {value}")


def _check_ms(field: str, value: float | None) -> None:
    if value is None:
        return
    if not math.isfinite(value) or value <= 0 or value > MAX_LATENCY_MS:
        raise ConfigError(field, f"must be above 0 and at most {MAX_LATENCY_MS:g} ms, got {value}")


def check_guard(where: str, guard: GuardCriteria) -> None:
    """A guard whose thresholds can work; `ConfigError` naming the field otherwise."""
    _check_fraction(f"{where}.max_error_rate", guard.max_error_rate)
    _check_fraction(f"{where}.max_error_rate_increase", guard.max_error_rate_increase)
    _check_ms(f"{where}.max_p95_ms", guard.max_p95_ms)
    _check_ms(f"{where}.max_p99_ms", guard.max_p99_ms)
    if guard.max_p99_ratio is not None and (
        not math.isfinite(guard.max_p99_ratio) or not 1 < guard.max_p99_ratio <= 1000
    ):
        raise ConfigError(
            f"{where}.max_p99_ratio", f"must be above 1 and at most 1000, got {guard.max_p99_ratio}"
        )
    if guard.min_samples < 1:
        raise ConfigError(f"{where}.min_samples", "must be at least 1")
    if not 0 <= guard.sustained_s <= MAX_SUSTAINED_S:
        raise ConfigError(f"{where}.sustained_s", f"must be between 0 and {MAX_SUSTAINED_S:g}")
    if guard.enabled and all(
        v is None
        for v in (
            guard.max_error_rate,
            guard.max_p95_ms,
            guard.max_p99_ms,
            guard.max_error_rate_increase,
            guard.max_p99_ratio,
        )
    ):
        raise ConfigError(where, "an enabled guard needs at least one criterion")


def check_plan(where: str, plan: Plan, stages: dict[str, float]) -> None:
    """Phases that go forward and can pass; approval only with someone to approve."""
    previous = -1.0
    for i, phase in enumerate(plan.phases):
        at = f"{where}.phases.{i}"
        if (phase.stage is None) == (phase.percent is None):
            raise ConfigError(at, "give exactly one of 'stage' or 'percent'")
        if phase.stage is not None:
            if phase.stage not in stages:
                known = ", ".join(stages)
                raise ConfigError(f"{at}.stage", f"unknown stage {phase.stage!r} (known: {known})")
            percent = stages[phase.stage]
        else:
            assert phase.percent is not None
            percent = phase.percent
            if not math.isfinite(percent) or not 0 < percent <= 100:
                raise ConfigError(
                    f"{at}.percent", f"must be above 0 and at most 100, got {percent}"
                )
        if phase.stage == "off":
            raise ConfigError(f"{at}.stage", "a phase cannot be 'off' (abort the plan instead)")
        # 'internal' is 0 % plus the allow-list: it may only come first.
        if percent < previous or (percent == previous and percent > 0):
            raise ConfigError(at, f"phases must go forward: {percent:g} % after {previous:g} %")
        previous = percent
        if not 0 <= phase.min_duration_s <= MAX_PHASE_DURATION_S:
            raise ConfigError(
                f"{at}.min_duration_s", f"must be between 0 and {MAX_PHASE_DURATION_S:g}"
            )
        if phase.min_samples < 1:
            raise ConfigError(f"{at}.min_samples", "must be at least 1")
        if phase.criteria is not None:
            check_guard(f"{at}.criteria", phase.criteria)
        if phase.advance == ADVANCE_APPROVE and not plan.approvers:
            raise ConfigError(
                f"{at}.advance", "'approve' needs someone able to approve: set plan.approvers"
            )
    for i, who in enumerate(plan.approvers):
        if not who or len(who) > 128 or not who.isprintable():
            raise ConfigError(f"{where}.approvers.{i}", "must be a printable name")
    if not 0 <= plan.state.phase < len(plan.phases):
        raise ConfigError(f"{where}.state.phase", f"no phase {plan.state.phase}")


def check_maintenance(where: str, maintenance: Maintenance) -> None:
    if not 1 <= maintenance.retry_after_s <= 86_400:
        raise ConfigError(f"{where}.retry_after_s", "must be between 1 and 86400 seconds")


def phase_percent(phase: Phase, stages: dict[str, float]) -> float:
    if phase.stage is not None:
        return stages.get(phase.stage, 0.0)
    return phase.percent if phase.percent is not None else 0.0
