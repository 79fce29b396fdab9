"""flags/rollout.py through flags/document.py: guard criteria, phase plans and maintenance are
validated with the whole document, and a plan or criterion that cannot work is refused whole
with the field named."""

from __future__ import annotations

from typing import Any

import pytest

from flags.document import load_document
from flags.errors import ConfigError
from flags.rollout import DEFAULT_MAX_ERROR_RATE, DEFAULT_MAX_P99_MS, PLAN_PENDING


def document(**release_extra: Any) -> dict[str, Any]:
    rel: dict[str, Any] = {
        "stable": ["http://stable.internal:8080"],
        "canary": ["http://canary.internal:8080"],
        **release_extra,
    }
    return {
        "releases": {"web": rel},
        "routes": [{"host": "*", "path_prefix": "/", "release": "web"}],
    }


PLAN = {
    "phases": [
        {"stage": "internal", "min_duration_s": 60},
        {"stage": "beta", "min_samples": 200},
        {"stage": "open", "advance": "approve"},
        {"stage": "ga"},
    ],
    "approvers": ["ops"],
}


def test_defaults_are_the_seeds() -> None:
    """An empty guard takes the seeds' numbers (5 % errors, 5 s p99) and a plan starts
    pending at phase 0, both round-tripping through the document's JSON."""
    doc = load_document(document(guard={}, plan=PLAN, maintenance={"enabled": True}))
    guard = doc.releases["web"].guard
    assert guard is not None
    assert guard.max_error_rate == DEFAULT_MAX_ERROR_RATE == 0.05
    assert guard.max_p99_ms == DEFAULT_MAX_P99_MS == 5000
    plan = doc.releases["web"].plan
    assert plan is not None and plan.state.status == PLAN_PENDING and plan.state.phase == 0
    assert load_document(doc.to_json()) == doc


@pytest.mark.parametrize(
    ("extra", "field"),
    [
        ({"guard": {"max_error_rate": 1.5}}, "releases.web.guard.max_error_rate"),
        ({"guard": {"max_error_rate": 0.0}}, "releases.web.guard.max_error_rate"),
        (
            {"guard": {"max_error_rate_increase": -0.1}},
            "releases.web.guard.max_error_rate_increase",
        ),
        ({"guard": {"max_p99_ms": 0.0}}, "releases.web.guard.max_p99_ms"),
        ({"guard": {"max_p95_ms": 1e9}}, "releases.web.guard.max_p95_ms"),
        ({"guard": {"max_p99_ratio": 1.0}}, "releases.web.guard.max_p99_ratio"),
        ({"guard": {"min_samples": 0}}, "releases.web.guard.min_samples"),
        ({"guard": {"sustained_s": -1.0}}, "releases.web.guard.sustained_s"),
        ({"guard": {"bogus": 1}}, "releases.web.guard.bogus"),
        (
            {
                "guard": {
                    "max_error_rate": None,
                    "max_p99_ms": None,
                    "max_error_rate_increase": None,
                    "max_p99_ratio": None,
                }
            },
            "releases.web.guard",
        ),
        (
            {"plan": {"phases": [{"stage": "open"}, {"stage": "beta"}]}},
            "releases.web.plan.phases.1",
        ),
        (
            {"plan": {"phases": [{"percent": 20.0}, {"percent": 20.0}]}},
            "releases.web.plan.phases.1",
        ),
        (
            {"plan": {"phases": [{"stage": "beta", "min_samples": 0}]}},
            "releases.web.plan.phases.0.min_samples",
        ),
        (
            {"plan": {"phases": [{"stage": "beta", "advance": "approve"}]}},
            "releases.web.plan.phases.0.advance",
        ),
        ({"plan": {"phases": [{"stage": "nope"}]}}, "releases.web.plan.phases.0.stage"),
        ({"plan": {"phases": [{"stage": "off"}]}}, "releases.web.plan.phases.0.stage"),
        ({"plan": {"phases": [{"stage": "beta", "percent": 5.0}]}}, "releases.web.plan.phases.0"),
        ({"plan": {"phases": [{"percent": 0.0}]}}, "releases.web.plan.phases.0.percent"),
        ({"plan": {"phases": []}}, "releases.web.plan.phases"),
        (
            {"plan": {"phases": [{"stage": "beta", "criteria": {"min_samples": 0}}]}},
            "releases.web.plan.phases.0.criteria.min_samples",
        ),
        (
            {"plan": {"phases": [{"stage": "beta"}], "state": {"phase": 3}}},
            "releases.web.plan.state.phase",
        ),
        ({"maintenance": {"retry_after_s": 0}}, "releases.web.maintenance.retry_after_s"),
    ],
)
def test_refused_with_the_field_named(extra: dict[str, Any], field: str) -> None:
    """Each plan or criterion that cannot work is refused whole, naming the field."""
    with pytest.raises(ConfigError) as info:
        load_document(document(**extra))
    assert info.value.field == field


def test_global_maintenance_is_validated() -> None:
    """The document-wide maintenance switch is checked like the per-release one."""
    raw = document()
    raw["maintenance"] = {"enabled": True, "retry_after_s": 100_000}
    with pytest.raises(ConfigError) as info:
        load_document(raw)
    assert info.value.field == "maintenance.retry_after_s"


def test_plan_state_machine() -> None:
    """flags/plan.py: start moves the release to phase 0; a guard rollback stops a running
    plan (stage off, evidence kept); approve needs a waiting plan and a named approver; the
    last phase passing ends the plan; abort rolls back; nothing here moves a release
    backwards except to off."""
    from flags import plan as plans

    doc = load_document(document(plan=PLAN))
    doc, summary = plans.start(doc, "web", 100.0)
    rel = doc.releases["web"]
    assert rel.stage == "internal" and rel.plan is not None
    assert rel.plan.state.status == "running" and rel.plan.state.phase_started_at == 100.0
    with pytest.raises(ConfigError):
        plans.start(doc, "web", 101.0)
    doc, _ = plans.phase_passed(doc, "web", 200.0, "evidence")
    assert doc.releases["web"].stage == "beta"
    doc, _ = plans.phase_passed(doc, "web", 300.0, "evidence")  # phase 1 auto -> open
    assert doc.releases["web"].stage == "open"
    doc, _ = plans.phase_passed(doc, "web", 400.0, "evidence")  # phase 2 is approve
    rel = doc.releases["web"]
    assert (
        rel.stage == "open" and rel.plan is not None and rel.plan.state.status == "waiting_approval"
    )
    with pytest.raises(ConfigError) as info:
        plans.approve(doc, "web", "mallory", 500.0)
    assert info.value.field == "approver"
    approved, _ = plans.approve(doc, "web", "ops", 500.0)
    assert approved.releases["web"].stage == "ga"
    done, _ = plans.phase_passed(approved, "web", 600.0, "evidence")
    assert done.releases["web"].plan.state.status == "done"  # type: ignore[union-attr]
    stopped, _ = plans.guard_rollback(doc, "web", "guard: bad", {"criterion": "error_rate"})
    rel = stopped.releases["web"]
    assert rel.stage == "off" and rel.plan is not None and rel.plan.state.status == "stopped"
    assert rel.rollback is not None and rel.rollback.evidence == {"criterion": "error_rate"}
    with pytest.raises(ConfigError):
        plans.guard_rollback(stopped, "web", "again", {})
    aborted, _ = plans.abort(approved, "web", "no")
    assert aborted.releases["web"].stage == "off"
    assert aborted.releases["web"].plan.state.status == "aborted"  # type: ignore[union-attr]
    paused, _ = plans.pause(approved, "web")
    with pytest.raises(ConfigError):
        plans.phase_passed(paused, "web", 700.0, "evidence")
    resumed, _ = plans.resume(paused, "web", 800.0)
    assert resumed.releases["web"].plan.state.phase_started_at == 800.0  # type: ignore[union-attr]
