"""flags/evaluate.py: route precedence, stages and the internal allow-list, shared cohorts,
the split's share and monotonicity over many ids, the two-step decision never raising, and `explain`."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flags import changes
from flags.document import Document, load_document
from flags.evaluate import (
    ARM_CANARY,
    ARM_STABLE,
    EMPTY_SNAPSHOT,
    REASON_DEFAULT,
    REASON_DISABLED,
    REASON_SPLIT,
    REASON_TARGETING_MATCH,
    Decision,
    Snapshot,
    compile_snapshot,
    explain,
)
from flags.hashing import POSITION_SPACE, position
from tests.routing import route

SYNTHETIC_IDS = [f"user-{i}" for i in range(10_000)]


def release(**overrides: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"stable": ["http://stable:8080"], "canary": ["http://canary:8080"]}
    base.update(overrides)
    return base


def snapshot_of(raw: dict[str, Any]) -> Snapshot:
    return compile_snapshot(load_document(raw))


def single(stage: str = "beta", percent: float | None = None, **overrides: Any) -> Snapshot:
    """One release `web` on every host and path."""
    rel = release(stage=stage, **overrides)
    if percent is not None:
        rel["percent"] = percent
    return snapshot_of({"releases": {"web": rel}, "routes": [{"release": "web"}]})


def routed_release(snapshot: Snapshot, host: str, path: str) -> str | None:
    return route(snapshot, unit_id="u1", host=host, path=path).release


# -- routing --------------------------------------------------------------------------------------

ROUTED = {
    "releases": {name: release(stage="ga") for name in ("root", "api", "v2", "shop", "shopapi")},
    "routes": [
        {"host": "*", "path_prefix": "/", "release": "root"},
        {"host": "*", "path_prefix": "/api", "release": "api"},
        {"host": "*", "path_prefix": "/api/v2", "release": "v2"},
        {"host": "shop.example.com", "path_prefix": "/", "release": "shop"},
        {"host": "shop.example.com", "path_prefix": "/shop-api", "release": "shopapi"},
        {"host": "only.example.com", "path_prefix": "/checkout", "release": "shop"},
    ],
}


@pytest.mark.parametrize(
    ("host", "path", "expected"),
    [
        ("www.example.com", "/", "root"),
        ("www.example.com", "/about", "root"),
        ("www.example.com", "/api", "api"),
        ("www.example.com", "/api/users", "api"),
        ("www.example.com", "/api/v2/users", "v2"),
        ("www.example.com", "/api/v1", "api"),
        ("shop.example.com", "/api/v2/users", "shop"),
        ("shop.example.com", "/shop-api/cart", "shopapi"),
        ("SHOP.Example.COM", "/cart", "shop"),
        ("only.example.com", "/checkout/pay", "shop"),
        ("only.example.com", "/api/v2", "v2"),
        ("only.example.com", "/", "root"),
    ],
)
def test_route_precedence(host: str, path: str, expected: str) -> None:
    """Exact host beats `*`, then the longest prefix wins; host is case-insensitive."""
    assert routed_release(snapshot_of(ROUTED), host, path) == expected


def test_no_route_is_default_with_no_release() -> None:
    """A request no route matches gets stable, release None and reason DEFAULT."""
    snap = snapshot_of(
        {
            "releases": {"api": release(stage="ga")},
            "routes": [{"path_prefix": "/api", "release": "api"}],
        }
    )
    decision = route(snap, unit_id="u1", host="x.example", path="/other")
    assert decision == Decision(ARM_STABLE, None, "", -1, REASON_DEFAULT)
    empty = route(EMPTY_SNAPSHOT, unit_id="u1")
    assert (empty.arm, empty.release, empty.reason) == (ARM_STABLE, None, REASON_DEFAULT)


# -- stages and the internal allow-list -----------------------------------------------------------

INTERNAL = {"unit_ids": ["alice", "Ünïcode"], "email_domains": ["example.com"]}


@pytest.mark.parametrize("email", [None, "alice@example.com", "bob@EXAMPLE.COM"])
@pytest.mark.parametrize("unit", ["alice", "bob", *SYNTHETIC_IDS[:50]])
def test_stage_off_is_disabled_for_everyone(unit: str, email: str | None) -> None:
    """At stage off everyone, internal users included, gets stable with reason DISABLED."""
    snap = single("off", internal=INTERNAL)
    decision = route(snap, unit_id=unit, email=email)
    assert (decision.arm, decision.release, decision.reason) == (ARM_STABLE, "web", REASON_DISABLED)


@pytest.mark.parametrize("stage", ["internal", "beta"])
@pytest.mark.parametrize(
    ("unit", "email"),
    [
        ("alice", None),
        ("  alice ", None),
        ("Ünïcode", None),
        ("zz-not-listed", "carol@example.com"),
        ("zz-not-listed", "carol@Example.COM"),
        ("zz-not-listed", "Carol@EXAMPLE.com "),
        (None, "dave@example.com"),
    ],
)
def test_internal_allow_list_gets_canary(stage: str, unit: str | None, email: str | None) -> None:
    """Allow-listed ids and e-mail domains (any case) get canary/TARGETING_MATCH past off."""
    snap = single(stage, internal=INTERNAL)
    decision = route(snap, unit_id=unit, email=email)
    assert (decision.arm, decision.reason) == (ARM_CANARY, REASON_TARGETING_MATCH)


@pytest.mark.parametrize(
    ("unit", "email"),
    [
        ("Alice", None),
        ("alice2", None),
        ("zz-not-listed", "carol@example.com.evil"),
        ("zz-not-listed", "carol@sub.example.com"),
        ("zz-not-listed", "example.com"),
        ("zz-not-listed", "carol@notexample.com"),
    ],
)
def test_allow_list_matches_exactly(unit: str, email: str | None) -> None:
    """Unit ids match exactly and domains match whole: near misses are split, not targeted."""
    decision = route(single("internal", internal=INTERNAL), unit_id=unit, email=email)
    assert (decision.arm, decision.reason) == (ARM_STABLE, REASON_SPLIT)


def test_stage_internal_puts_no_one_else_in_canary() -> None:
    """At stage internal only the allow-list gets the canary."""
    snap = single("internal", internal=INTERNAL)
    arms = {route(snap, unit_id=uid).arm for uid in SYNTHETIC_IDS[:2000]}
    assert arms == {ARM_STABLE}


def test_no_unit_id_goes_to_stable() -> None:
    """Without a usable unit id a request is never bucketed: stable, reason DEFAULT."""
    snap = single("ga")
    for unit in (None, "", "   ", "x" * 300):
        decision = route(snap, unit_id=unit)
        assert (decision.arm, decision.release, decision.reason) == (
            ARM_STABLE,
            "web",
            REASON_DEFAULT,
        )


# -- the decision never raises ---------------------------------------------------------------------

# Any text, lone surrogates included (what a percent-decoded header or cookie can hold).
any_text = st.text(alphabet=st.characters(codec=None), max_size=300)


@settings(max_examples=300, deadline=None, database=None)
@given(any_text, any_text, any_text, st.one_of(st.none(), any_text))
def test_decision_never_raises(unit: str, host: str, path: str, email: str | None) -> None:
    """Whatever text the request carries (surrogates, controls, huge), match + assign answer."""
    snap = snapshot_of(
        {
            **ROUTED,
            "releases": {
                **ROUTED["releases"],
                "root": release(stage="beta", internal=INTERNAL),
            },
        }
    )
    decision = route(snap, unit, host, path, email)
    assert isinstance(decision, Decision)
    assert decision.arm in (ARM_STABLE, ARM_CANARY)
    assert decision.reason in (REASON_DEFAULT, REASON_SPLIT, REASON_TARGETING_MATCH)


@settings(max_examples=300, deadline=None, database=None)
@given(st.text(max_size=300), st.text(max_size=60), st.text(max_size=200))
def test_decision_on_text_is_never_an_error(unit: str, host: str, path: str) -> None:
    """Text facts never hit the ERROR path: the decision is DEFAULT, SPLIT or TARGETING_MATCH."""
    decision = route(snapshot_of(ROUTED), unit_id=unit, host=host, path=path)
    assert decision.reason in (REASON_DEFAULT, REASON_SPLIT)


# -- cohorts and the split ------------------------------------------------------------------------


def two_releases(first: dict[str, Any], second: dict[str, Any], **extra: Any) -> Snapshot:
    return snapshot_of(
        {
            **extra,
            "releases": {"web": release(**first), "checkout": release(**second)},
            "routes": [
                {"path_prefix": "/", "release": "web"},
                {"path_prefix": "/checkout", "release": "checkout"},
            ],
        }
    )


def canary_set(snap: Snapshot, path: str, ids: list[str]) -> set[str]:
    return {uid for uid in ids if route(snap, unit_id=uid, path=path).arm == ARM_CANARY}


@pytest.mark.parametrize(
    ("first", "second"),
    [
        ({"stage": "beta"}, {"stage": "beta"}),
        ({"stage": "custom", "percent": 33.333}, {"stage": "custom", "percent": 33.333}),
    ],
)
def test_shared_cohort_is_the_same_people_everywhere(
    first: dict[str, Any], second: dict[str, Any]
) -> None:
    """Two releases on one cohort put the same units in canary at one percent."""
    cohorts = {"beta-users": {"salt": "beta-2024"}}
    snap = two_releases(
        {**first, "cohort": "beta-users"}, {**second, "cohort": "beta-users"}, cohorts=cohorts
    )
    ids = SYNTHETIC_IDS[:5000]
    web, checkout = canary_set(snap, "/", ids), canary_set(snap, "/checkout/pay", ids)
    assert web == checkout
    assert web  # and the set is not trivially empty
    decision = route(snap, unit_id="user-1", path="/checkout")
    assert decision.cohort == "beta-users"
    assert decision.position == position("beta-2024", "user-1")


def test_shared_salt_equals_cohort_and_own_salts_differ() -> None:
    """A cohort is its salt: a release with the same salt matches it; release-named salts do not."""
    ids = SYNTHETIC_IDS[:5000]
    shared = two_releases(
        {"stage": "beta", "cohort": "beta-users"},
        {"stage": "beta", "salt": "beta-2024"},
        cohorts={"beta-users": {"salt": "beta-2024"}},
    )
    assert canary_set(shared, "/", ids) == canary_set(shared, "/checkout", ids)
    separate = two_releases({"stage": "beta"}, {"stage": "beta"})
    assert canary_set(separate, "/", ids) != canary_set(separate, "/checkout", ids)


def test_beta_share_is_ten_percent() -> None:
    """10,000 synthetic ids at beta: the canary share is within 10 % +- 1 point."""
    in_canary = canary_set(single("beta"), "/", SYNTHETIC_IDS)
    assert 900 <= len(in_canary) <= 1100


@pytest.mark.parametrize(("low", "high"), [("beta", "open"), ("open", "ga"), ("internal", "beta")])
def test_later_stages_keep_earlier_canary_units(low: str, high: str) -> None:
    """Every id in the canary at an earlier stage is in the canary at a later one."""
    before = canary_set(single(low), "/", SYNTHETIC_IDS)
    after = canary_set(single(high), "/", SYNTHETIC_IDS)
    assert before <= after
    assert len(after) > len(before)


def test_ga_is_everyone() -> None:
    """At ga every identified unit gets the canary."""
    assert canary_set(single("ga"), "/", SYNTHETIC_IDS) == set(SYNTHETIC_IDS)


def test_salt_defaults_to_release_name() -> None:
    """Without salt or cohort a release buckets on its own name."""
    decision = route(single("beta"), unit_id="user-7")
    assert decision.position == position("web", "user-7")
    assert decision.cohort == ""


def test_decisions_bucket_on_the_normalised_id() -> None:
    """NFD/NFC and padded spellings of one id get one position and arm."""
    snap = single("open")
    spellings = ["José", "Jose\u0301", "  José\t"]
    decisions = {(d.arm, d.position) for d in (route(snap, s) for s in spellings)}
    assert decisions == {(route(snap, "José").arm, position("web", "José"))}


# -- explain --------------------------------------------------------------------------------------


def test_explain_split() -> None:
    """explain reports position, threshold, percent, reason SPLIT and the comparison made."""
    snap = single("custom", percent=12.5, salt="s1")
    for uid in SYNTHETIC_IDS[:200]:
        info = explain(snap, "web", uid)
        pos = position("s1", uid)
        assert info["position"] == pos
        assert info["threshold"] == 12_500
        assert info["percent"] == 12.5
        assert info["reason"] == REASON_SPLIT
        assert info["arm"] == (ARM_CANARY if pos < 12_500 else ARM_STABLE)
        assert f"position {pos}" in str(info["explanation"])
        assert str(POSITION_SPACE) in str(info["explanation"])
        assert info["salt"] == "s1" and info["cohort"] is None


def test_explain_internal_and_missing_id() -> None:
    """explain names the allow-list or the e-mail domain that made a unit internal, and the
    missing id otherwise."""
    snap = single("internal", internal=INTERNAL)
    internal = explain(snap, "web", "alice")
    assert internal["reason"] == REASON_TARGETING_MATCH and internal["arm"] == ARM_CANARY
    assert "allow-list" in str(internal["explanation"])
    by_domain = explain(snap, "web", "bob", email="Bob@Example.COM")
    assert by_domain["reason"] == REASON_TARGETING_MATCH and by_domain["arm"] == ARM_CANARY
    assert "e-mail domain example.com" in str(by_domain["explanation"])
    assert "allow-list" not in str(by_domain["explanation"])
    missing = explain(snap, "web", "   ")
    assert missing["reason"] == REASON_DEFAULT and missing["unit_id"] is None
    assert missing["arm"] == ARM_STABLE


def test_explain_mentions_the_rollback_reason() -> None:
    """After changes.rollback, explain says DISABLED and quotes the rollback's reason."""
    doc: Document = load_document(
        {
            "releases": {"web": release(stage="open", internal=INTERNAL)},
            "routes": [{"release": "web"}],
        }
    )
    rolled, _ = changes.rollback(doc, "web", "checkout 5xx spike")
    snap = compile_snapshot(rolled)
    for uid in ("alice", *SYNTHETIC_IDS[:100]):
        info = explain(snap, "web", uid)
        assert info["reason"] == REASON_DISABLED
        assert info["arm"] == ARM_STABLE
        assert info["stage"] == "off"
        assert info["threshold"] == 0
        assert "checkout 5xx spike" in str(info["explanation"])
    plain_off = explain(single("off"), "web", "user-1")
    assert "stage is off" in str(plain_off["explanation"])


def test_explain_agrees_with_the_decision() -> None:
    """explain's arm, position and reason are exactly what the decision gives for the same unit."""
    snap = snapshot_of(
        {
            "cohorts": {"c": {"salt": "shared"}},
            "releases": {"web": release(stage="open", cohort="c")},
            "routes": [{"release": "web"}],
        }
    )
    for uid in SYNTHETIC_IDS[:300]:
        decision = route(snap, unit_id=uid)
        info = explain(snap, "web", uid)
        assert (info["arm"], info["position"], info["reason"]) == (
            decision.arm,
            decision.position,
            decision.reason,
        )
        assert info["cohort"] == "c" and info["salt"] == "shared"
