"""What a change does (flags/diff.py): per stage, cohort, release and route, and the share
of units that change arm, checked against the bucketing contract itself."""

from __future__ import annotations

from typing import Any

import pytest

from flags.diff import diff_documents, emptying_problem
from flags.document import Document, effective_percent, load_document
from flags.hashing import POSITION_SPACE, position, threshold


def doc(**release: Any) -> Document:
    base: dict[str, Any] = {
        "stable": ["http://127.0.0.1:1"],
        "canary": ["http://127.0.0.1:2"],
        "stage": "beta",
    }
    base.update(release)
    return load_document(
        {
            "cohorts": {"c1": {"salt": "one"}, "c2": {"salt": "two"}},
            "releases": {"web": base},
            "routes": [{"host": "*", "path_prefix": "/", "release": "web"}],
        }
    )


def served(document: Document) -> float:
    release = document.releases["web"]
    return 0.0 if release.stage == "off" else effective_percent(document, release)


@pytest.mark.parametrize(
    ("old", "new", "share"),
    [
        ({"stage": "beta"}, {"stage": "open"}, 0.40),
        ({"stage": "ga"}, {"stage": "beta"}, 0.90),
        ({"stage": "custom", "percent": 12.5}, {"stage": "custom", "percent": 12.501}, 0.00001),
        ({"stage": "beta"}, {"stage": "off"}, 0.10),
    ],
)
def test_same_salt_share_is_the_exact_difference(
    old: dict[str, Any], new: dict[str, Any], share: float
) -> None:
    """With the same salt the share is |new - old| exactly, and it is exact because it is
    the count of positions between the two thresholds (checked by counting them)."""
    (change,) = diff_documents(doc(**old), doc(**new))
    assert change.exact is True
    assert change.share == pytest.approx(share)
    old_t, new_t = threshold(served(doc(**old))), threshold(served(doc(**new)))
    moved = sum(1 for p in range(POSITION_SPACE) if (p < old_t) != (p < new_t))
    assert moved / POSITION_SPACE == pytest.approx(change.share)
    assert "exact, by the bucketing contract" in change.text


def test_units_that_move_are_those_between_the_thresholds() -> None:
    """Sampled units: those whose arm changes from beta to open are exactly the ones with
    10 000 <= position < 50 000, so the share describes real users."""
    movers = [
        u
        for u in (f"user-{i}" for i in range(20_000))
        if threshold(10) <= position("web", u) < threshold(50)
    ]
    (change,) = diff_documents(doc(stage="beta"), doc(stage="open"))
    assert change.share is not None
    assert len(movers) / 20_000 == pytest.approx(change.share, abs=0.02)


def test_new_salt_is_an_estimate_both_ways() -> None:
    """A cohort with another salt places everyone again: the share is p(1-q)+q(1-p), marked
    as an estimate."""
    (change,) = diff_documents(doc(cohort="c1"), doc(cohort="c2", stage="open"))
    assert change.exact is False
    assert change.share == pytest.approx(0.1 * 0.5 + 0.5 * 0.9)
    assert "about" in change.text and "new salt" in change.text


def test_internal_users_are_named_when_they_change_arm() -> None:
    """From off to internal nobody moves by percentage, but the allow-list goes to canary."""
    (change,) = diff_documents(
        doc(stage="off", internal={"unit_ids": ["alice", "bob"]}),
        doc(stage="internal", internal={"unit_ids": ["alice", "bob"]}),
    )
    assert change.share == 0
    assert "plus the 2 internal unit ids (to canary)" in change.text


def test_backends_routes_and_stages_are_listed() -> None:
    """Backend, route and stage-table changes each get a line; identical documents none."""
    old = doc()
    raw = old.content()
    raw["releases"]["web"]["canary"] = ["http://127.0.0.1:3"]
    raw["routes"].append({"host": "api.test", "path_prefix": "/v1", "release": "web"})
    raw["stages"]["beta"] = 5.0
    texts = [c.text for c in diff_documents(old, load_document(raw))]
    assert "stage beta: 10 % -> 5 %" in texts
    assert "release web: canary backends http://127.0.0.1:2 -> http://127.0.0.1:3" in texts
    assert "route api.test/v1 added -> release web" in texts
    assert any(t.startswith("release web: stage beta (10 %) -> beta (5 %)") for t in texts)
    assert diff_documents(old, doc()) == []


def test_emptying_problem() -> None:
    """No routes left, or no routed release left, is a problem; keeping one is not."""
    old = doc()
    assert emptying_problem(old, load_document({}))[0] == "routes"  # type: ignore[index]
    other = load_document(
        {
            "releases": {
                "api": {"stable": ["http://127.0.0.1:1"], "canary": ["http://127.0.0.1:1"]}
            },
            "routes": [{"host": "*", "path_prefix": "/", "release": "api"}],
        }
    )
    assert emptying_problem(old, other)[0] == "releases"  # type: ignore[index]
    assert emptying_problem(old, doc(stage="ga")) is None
    assert emptying_problem(load_document({}), load_document({})) is None
