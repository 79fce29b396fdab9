"""flags/changes.py: the pure edits (set_stage, rollback, restore, put_release) return new,
validated documents, name the bad field on refusal, and never touch their input."""

from __future__ import annotations

import math
from typing import Any

import pytest

from flags import changes
from flags.document import Document, effective_percent, load_document
from flags.errors import ConfigError


def release(**overrides: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"stable": ["http://stable:8080"], "canary": ["http://canary:8080"]}
    base.update(overrides)
    return base


def make_doc(version: int = 4) -> Document:
    return load_document(
        {
            "version": version,
            "cohorts": {"beta-users": {"salt": "b"}},
            "releases": {
                "web": release(stage="beta"),
                "checkout": release(stage="custom", percent=12.5, cohort="beta-users"),
            },
            "routes": [{"release": "web"}, {"path_prefix": "/checkout", "release": "checkout"}],
        }
    )


# -- set_stage ------------------------------------------------------------------------------------


@pytest.mark.parametrize("stage", ["off", "internal", "beta", "open", "ga"])
def test_set_stage_by_name(stage: str) -> None:
    """A named stage is set with no percent, keeping the version, and the summary says so."""
    doc = make_doc()
    new, summary = changes.set_stage(doc, "checkout", stage=stage)
    rel = new.releases["checkout"]
    assert (rel.stage, rel.percent, new.version) == (stage, None, doc.version)
    assert summary == f"checkout: stage 12.5 % -> {stage}"
    assert new.releases["web"] == doc.releases["web"]


@pytest.mark.parametrize("percent", [0, 0.001, 25, 33.333, 100.0])
def test_set_stage_by_percent(percent: float) -> None:
    """An explicit percentage becomes stage custom with that percentage."""
    new, summary = changes.set_stage(make_doc(), "web", percent=percent)
    rel = new.releases["web"]
    assert rel.stage == "custom" and rel.percent == float(percent)
    assert effective_percent(new, rel) == float(percent)
    assert summary.startswith("web: stage beta -> ")


def test_set_stage_clears_a_rollback() -> None:
    """Moving the stage again forgets the last rollback's record."""
    rolled, _ = changes.rollback(make_doc(), "web", "errors")
    assert rolled.releases["web"].rollback is not None
    moved, _ = changes.set_stage(rolled, "web", stage="internal")
    assert moved.releases["web"].rollback is None


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"stage": "gamma"}, "stage"),
        ({"stage": "custom"}, "stage"),
        ({"stage": "BETA"}, "stage"),
        ({"stage": ""}, "stage"),
        ({"stage": 10}, "stage"),
        ({}, "stage"),
        ({"stage": "beta", "percent": 10}, "stage"),
        ({"percent": 150}, "percent"),
        ({"percent": -1}, "percent"),
        ({"percent": 100.001}, "percent"),
        ({"percent": 12.0001}, "percent"),
        ({"percent": math.nan}, "percent"),
        ({"percent": math.inf}, "percent"),
        ({"percent": "10"}, "percent"),
        ({"percent": True}, "percent"),
    ],
)
def test_invalid_set_stage_names_field_and_leaves_input(kwargs: dict[str, Any], field: str) -> None:
    """A bad stage or percent is a ConfigError on `stage`/`percent`; the input is unchanged."""
    doc = make_doc()
    before = doc.to_json()
    with pytest.raises(ConfigError) as info:
        changes.set_stage(doc, "web", **kwargs)
    assert info.value.field == field
    assert doc.to_json() == before


def test_set_stage_unknown_release() -> None:
    """Editing a release that does not exist is a ConfigError on `release`."""
    with pytest.raises(ConfigError) as info:
        changes.set_stage(make_doc(), "nope", stage="beta")
    assert info.value.field == "release"


# -- rollback -------------------------------------------------------------------------------------


def test_rollback_sets_stage_off_with_reason() -> None:
    """rollback: stage off, no percent, and a record of why and from where."""
    doc = make_doc()
    new, summary = changes.rollback(doc, "checkout", "  5xx spike  ")
    rel = new.releases["checkout"]
    assert (rel.stage, rel.percent) == ("off", None)
    assert rel.rollback is not None
    assert rel.rollback.reason == "5xx spike"
    assert (rel.rollback.from_stage, rel.rollback.from_percent) == ("custom", 12.5)
    assert "5xx spike" in summary and "12.5 %" in summary
    assert doc.releases["checkout"].stage == "custom"  # input untouched
    assert new.version == doc.version


@pytest.mark.parametrize("reason", ["", "   ", "\n\t", None, 42, "x" * 501])
def test_rollback_refuses_bad_reason(reason: Any) -> None:
    """A rollback without a (short, textual) reason is a ConfigError on `reason`."""
    doc = make_doc()
    before = doc.to_json()
    with pytest.raises(ConfigError) as info:
        changes.rollback(doc, "web", reason)
    assert info.value.field == "reason"
    assert doc.to_json() == before


def test_rollback_of_a_named_stage_records_no_percent() -> None:
    """Rolling back a named stage records that stage and no percentage."""
    new, _ = changes.rollback(make_doc(), "web", "latency")
    record = new.releases["web"].rollback
    assert record is not None and (record.from_stage, record.from_percent) == ("beta", None)


# -- restore --------------------------------------------------------------------------------------


def test_restore_copies_content_keeping_current_version() -> None:
    """restore copies old content and keeps the current version (the store assigns the next)."""
    old = make_doc(version=2)
    current, _ = changes.set_stage(make_doc(version=9), "web", stage="ga")
    current, _ = changes.rollback(current, "checkout", "bad")
    restored, summary = changes.restore(current, old)
    assert restored.version == 9
    assert restored.content() == old.content()
    assert summary == "restore content of version 2"
    assert current.releases["web"].stage == "ga"  # input untouched


# -- put_release ----------------------------------------------------------------------------------


def test_put_release_creates_and_replaces() -> None:
    """put_release adds a new release or replaces one, validated against the document."""
    doc = make_doc()
    created, summary = changes.put_release(doc, "search", release(stage="open"))
    assert created.releases["search"].stage == "open"
    assert summary == "search: release created"
    assert "search" not in doc.releases
    replaced, summary = changes.put_release(created, "web", release(stage="ga", salt="w2"))
    assert replaced.releases["web"].salt == "w2"
    assert summary == "web: release replaced"


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        (release(stagee="beta"), "releases.web.stagee"),
        (release(stable="http://a"), "releases.web.stable"),
        (release(stage="custom", percent="5"), "releases.web.percent"),
        ({"canary": ["http://c"]}, "releases.web.stable"),
        (release(stage="gamma"), "releases.web.stage"),
        (release(stage="custom", percent=150), "releases.web.percent"),
        (release(stage="custom"), "releases.web.percent"),
        (release(stage="beta", percent=10), "releases.web.percent"),
        (release(cohort="nobody"), "releases.web.cohort"),
        (release(cohort="beta-users", salt="x"), "releases.web.cohort"),
        (release(canary=["ftp://c"]), "releases.web.canary.0"),
        (
            release(internal={"email_domains": ["bad domain"]}),
            "releases.web.internal.email_domains.0",
        ),
        (release(internal={"x": 1}), "releases.web.internal.x"),
        ("not an object", "releases.web"),
        ({"stable": {1, 2}}, "releases.web"),
    ],
)
def test_put_release_validation_names_prefixed_field(raw: Any, field: str) -> None:
    """Schema and cross-reference errors name `releases.<name>.<field>`; the input is unchanged."""
    doc = make_doc()
    before = doc.to_json()
    with pytest.raises(ConfigError) as info:
        changes.put_release(doc, "web", raw)
    assert info.value.field == field, str(info.value)
    assert doc.to_json() == before


def test_put_release_bad_name() -> None:
    """A release name outside the naming rule is refused on `releases.<name>`."""
    with pytest.raises(ConfigError) as info:
        changes.put_release(make_doc(), "Web Site", release())
    assert info.value.field == "releases.Web Site"


def test_replace_document_keeps_the_version() -> None:
    """replace_document validates the new content and keeps the current version number."""
    doc = make_doc(version=6)
    new, _ = changes.replace_document(doc, {"version": 1, "releases": {"x": release()}})
    assert new.version == 6 and list(new.releases) == ["x"]
    with pytest.raises(ConfigError) as info:
        changes.replace_document(doc, {"routes": [{"release": "missing"}]})
    assert info.value.field == "routes.0.release"
