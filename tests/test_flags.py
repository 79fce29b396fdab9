"""flags/flagmodel.py and flags/flageval.py: feature flags in the document (issue #11).

Validation refusals name the field; every operator; segments, prerequisites, targets,
rollouts on the release's position space; kill switches win (Hypothesis); the cohort
acceptance test (the same 10,000 units get the beta variant as the beta canary)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flags.document import load_document
from flags.errors import ConfigError
from flags.evaluate import ARM_CANARY, Snapshot, compile_snapshot
from flags.flageval import FlagSet, explain_flag, unit_of
from flags.hashing import POSITION_SPACE, position

VECTORS_PATH = Path(__file__).resolve().parents[2] / "shared" / "vectors" / "bucketing.json"
PROPERTIES = settings(max_examples=200, deadline=None, database=None)
UNITS = [f"user-{i}" for i in range(10_000)]


def release(**overrides: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"stable": ["http://stable:8080"], "canary": ["http://canary:8080"]}
    base.update(overrides)
    return base


def boolean_flag(**overrides: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "type": "boolean",
        "variants": {"on": True, "off": False},
        "default": "off",
    }
    base.update(overrides)
    return base


def compiled(raw: dict[str, Any]) -> FlagSet:
    snap = compile_snapshot(load_document(raw))
    assert snap.flags is not None
    return snap.flags


def refused(raw: dict[str, Any]) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load_document(raw)
    return info.value


# -- validation ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "field", "words"),
    [
        (
            {"flags": {"f": boolean_flag(default="maybe")}},
            "flags.f.default",
            "not one of the variants",
        ),
        (
            {"flags": {"f": boolean_flag(variants={"on": True, "off": "no"})}},
            "flags.f.variants.off",
            "not a boolean",
        ),
        (
            {"flags": {"f": {"type": "number", "variants": {"a": 1, "b": True}, "default": "a"}}},
            "flags.f.variants.b",
            "not a number",
        ),
        (
            {"flags": {"f": boolean_flag(rollout=[{"variant": "on", "weight": 10}])}},
            "flags.f.rollout",
            "sum to 100",
        ),
        (
            {
                "flags": {
                    "f": boolean_flag(
                        rules=[
                            {
                                "conditions": [{"op": "in_segment", "value": "ghosts"}],
                                "variant": "on",
                            }
                        ]
                    )
                }
            },
            "flags.f.rules.0.conditions.0.value",
            "unknown segment",
        ),
        (
            {
                "flags": {
                    "a": boolean_flag(prerequisites=[{"flag": "b", "variants": ["on"]}]),
                    "b": boolean_flag(prerequisites=[{"flag": "a", "variants": ["on"]}]),
                }
            },
            "flags.b.prerequisites.0.flag",
            "cycle",
        ),
        (
            {"flags": {"a": boolean_flag(prerequisites=[{"flag": "a", "variants": ["on"]}])}},
            "flags.a.prerequisites.0.flag",
            "cycle",
        ),
        (
            {"flags": {"f": boolean_flag(cohort="beta")}},
            "flags.f.cohort",
            "unknown cohort",
        ),
        (
            {
                "flags": {
                    "f": boolean_flag(
                        rules=[
                            {
                                "conditions": [
                                    {"attribute": "v", "op": "semver_gt", "value": "1.x"}
                                ],
                                "variant": "on",
                            }
                        ]
                    )
                }
            },
            "flags.f.rules.0.conditions.0.value",
            "semantic version",
        ),
        (
            {
                "flags": {
                    "f": boolean_flag(
                        rules=[{"conditions": [{"attribute": "e", "op": "regex", "value": ".*"}]}]
                    )
                }
            },
            "flags.f.rules.0.conditions.0.op",
            "",
        ),
        ({"flags": {"bad key!": boolean_flag()}}, "flags.bad key!", "URL-safe"),
        (
            {"flags": {"f": boolean_flag(targets={"on": ["u1"], "off": ["u1"]})}},
            "flags.f.targets.off",
            "targeted twice",
        ),
        (
            {"flags": {"f": boolean_flag()}, "api_keys": {"app": {"sha256": "xyz"}}},
            "api_keys.app.sha256",
            "hex",
        ),
    ],
    ids=[
        "default-not-variant",
        "variant-wrong-type",
        "bool-is-not-number",
        "weights-not-100",
        "unknown-segment",
        "prerequisite-cycle",
        "self-prerequisite",
        "unknown-cohort",
        "bad-semver",
        "regex-operator",
        "bad-key",
        "target-twice",
        "api-key-hash",
    ],
)
def test_unworkable_flag_documents_are_refused_naming_the_field(
    raw: dict[str, Any], field: str, words: str
) -> None:
    """Each kind of unworkable flag is refused whole, with the dotted field named."""
    error = refused(raw)
    assert error.field == field
    assert words in error.message


def test_number_types_survive_a_round_trip() -> None:
    """A float variant keeps its `.0` through the document's JSON (OFREP.md §3 item 6)."""
    doc = load_document(
        {"flags": {"f": {"type": "number", "variants": {"a": 1.0, "b": 2}, "default": "a"}}}
    )
    again = load_document(doc.to_json())
    assert again.flags["f"].variants == {"a": 1.0, "b": 2}
    assert isinstance(again.flags["f"].variants["a"], float)
    assert isinstance(again.flags["f"].variants["b"], int)


# -- evaluation ----------------------------------------------------------------------------------


def test_reasons_static_default_disabled_and_not_found() -> None:
    """A rule-less flag is STATIC, a flag with unmatched rules DEFAULT, a disabled one DISABLED
    with its off variant, an unknown key FLAG_NOT_FOUND."""
    fs = compiled(
        {
            "flags": {
                "plain": boolean_flag(default="on"),
                "ruled": boolean_flag(
                    rules=[
                        {
                            "conditions": [{"attribute": "plan", "op": "equals", "value": "pro"}],
                            "variant": "on",
                        }
                    ]
                ),
                "off": boolean_flag(default="on", off_variant="off", enabled=False),
            }
        }
    )
    ctx = {"targetingKey": "u1", "plan": "free"}
    assert (fs.evaluate("plain", "u1", ctx).reason, fs.evaluate("plain", "u1", ctx).value) == (
        "STATIC",
        True,
    )
    assert fs.evaluate("ruled", "u1", ctx).reason == "DEFAULT"
    assert fs.evaluate("ruled", "u1", {"plan": "pro"}).reason == "TARGETING_MATCH"
    off = fs.evaluate("off", "u1", ctx)
    assert (off.reason, off.variant, off.value) == ("DISABLED", "off", False)
    missing = fs.evaluate("nope", "u1", ctx)
    assert (missing.reason, missing.error_code) == ("ERROR", "FLAG_NOT_FOUND")


def rule_flag(cond: dict[str, Any]) -> dict[str, Any]:
    return {"flags": {"f": boolean_flag(rules=[{"conditions": [cond], "variant": "on"}])}}


@pytest.mark.parametrize(
    ("cond", "hit", "miss"),
    [
        ({"attribute": "plan", "op": "equals", "value": "pro"}, {"plan": "pro"}, {"plan": "x"}),
        ({"attribute": "plan", "op": "not_equals", "value": "pro"}, {"plan": "x"}, {"plan": "pro"}),
        ({"attribute": "n", "op": "in", "value": [1, 2]}, {"n": 2}, {"n": 3}),
        ({"attribute": "n", "op": "not_in", "value": ["a"]}, {"n": "b"}, {"n": "a"}),
        ({"attribute": "n", "op": "in", "value": ["a"]}, {"n": "a"}, {"n": ["a"]}),
        (
            {"attribute": "email", "op": "ends_with", "value": "@corp.com"},
            {"email": "a@corp.com"},
            {"email": "a@corp.com.evil"},
        ),
        ({"attribute": "p", "op": "starts_with", "value": "/a"}, {"p": "/ab"}, {"p": "b/a"}),
        ({"attribute": "p", "op": "contains", "value": "mid"}, {"p": "a-mid-b"}, {"p": 7}),
        ({"attribute": "age", "op": "gte", "value": 18}, {"age": 18.0}, {"age": "18"}),
        ({"attribute": "age", "op": "lt", "value": 18}, {"age": 17}, {"age": True}),
        ({"attribute": "age", "op": "gt", "value": 1.5}, {"age": 2}, {"age": 1.5}),
        ({"attribute": "age", "op": "lte", "value": 1}, {"age": 1}, {"age": 2}),
        (
            {"attribute": "v", "op": "semver_gte", "value": "2.0.0"},
            {"v": "2.0.0"},
            {"v": "2.0.0-rc.1"},
        ),
        ({"attribute": "v", "op": "semver_lt", "value": "1.10.0"}, {"v": "1.9.9"}, {"v": "1.10.0"}),
        ({"attribute": "v", "op": "semver_eq", "value": "1.2.3"}, {"v": "v1.2.3"}, {"v": "1.2.4"}),
        ({"attribute": "v", "op": "semver_gt", "value": "1.2.3"}, {"v": "1.3.0"}, {"v": "junk"}),
        ({"attribute": "v", "op": "semver_lte", "value": "1.2.3"}, {"v": "1.2.3"}, {"v": "1.2.4"}),
        ({"attribute": "beta", "op": "exists"}, {"beta": 0}, {}),
        ({"attribute": "targetingKey", "op": "equals", "value": "u1"}, {}, {"targetingKey": "u1"}),
    ],
)
def test_each_operator_matches_and_misses(
    cond: dict[str, Any], hit: dict[str, Any], miss: dict[str, Any]
) -> None:
    """Every operator matches its positive context and not its negative one (wrong types miss,
    never raise); `targetingKey` is the unit id, not a context attribute."""
    fs = compiled(rule_flag(cond))
    unit_hit = "u1" if cond["attribute"] == "targetingKey" else None
    assert fs.evaluate("f", unit_hit, hit).variant == "on"
    assert fs.evaluate("f", None, miss).variant == "off"


def test_segments_targets_and_prerequisites() -> None:
    """Segment membership by id list, exclusion and conditions; an individual target wins over
    rules; an unmet prerequisite serves the off variant."""
    fs = compiled(
        {
            "segments": {
                "staff": {
                    "include": ["vip"],
                    "exclude": ["intern@corp.com-id"],
                    "conditions": [{"attribute": "email", "op": "ends_with", "value": "@corp.com"}],
                }
            },
            "flags": {
                "base": boolean_flag(
                    rules=[
                        {"conditions": [{"op": "in_segment", "value": "staff"}], "variant": "on"}
                    ]
                ),
                "child": {
                    "type": "string",
                    "variants": {"a": "A", "b": "B", "none": ""},
                    "default": "a",
                    "off_variant": "none",
                    "prerequisites": [{"flag": "base", "variants": ["on"]}],
                    "targets": {"b": ["vip"]},
                },
            },
        }
    )
    assert fs.evaluate("base", "vip", {}).variant == "on"
    assert fs.evaluate("base", "x", {"email": "x@corp.com"}).variant == "on"
    assert fs.evaluate("base", "intern@corp.com-id", {"email": "i@corp.com"}).variant == "off"
    assert fs.evaluate("child", "vip", {}).variant == "b"
    assert fs.evaluate("child", "x", {"email": "x@corp.com"}).variant == "a"
    child_out = fs.evaluate("child", "x", {"email": "x@else.com"})
    assert (child_out.variant, child_out.reason) == ("none", "DISABLED")


def test_split_without_unit_is_targeting_key_missing_never_random() -> None:
    """A split for a context without targetingKey is TARGETING_KEY_MISSING, not a random arm."""
    fs = compiled({"flags": {"f": boolean_flag(rollout=[{"variant": "on", "weight": 100}])}})
    result = fs.evaluate("f", unit_of({}), {})
    assert (result.reason, result.error_code) == ("ERROR", "TARGETING_KEY_MISSING")
    assert fs.evaluate("f", unit_of({"targetingKey": "u"}), {}).variant == "on"


def test_flag_position_is_the_release_position_on_the_shared_vectors() -> None:
    """A flag's split uses DESIGN §2's position: each shared vector's position picks the slice
    its cumulative range holds (at the 0.001 % granularity)."""
    cases = orjson.loads(VECTORS_PATH.read_bytes())["cases"]
    assert cases
    for case in cases:
        pos = case["position"]
        raw = {
            "flags": {
                "f": boolean_flag(
                    salt=case["salt"],
                    rollout=[
                        {"variant": "on", "weight": (pos + 1) / 1000},
                        {"variant": "off", "weight": (POSITION_SPACE - pos - 1) / 1000},
                    ],
                ),
                "g": boolean_flag(
                    salt=case["salt"],
                    rollout=[
                        {"variant": "on", "weight": pos / 1000},
                        {"variant": "off", "weight": (POSITION_SPACE - pos) / 1000},
                    ],
                ),
            }
        }
        fs = compiled(raw)
        assert fs.evaluate("f", case["unit_id"], {}).variant == "on"
        assert fs.evaluate("g", case["unit_id"], {}).variant == "off"
        assert fs.flags["f"].position(case["unit_id"]) == pos


def test_beta_cohort_flag_is_exactly_the_beta_canary() -> None:
    """Acceptance (issue #11): for 10,000 unit ids, those routed to web's canary at `beta` get
    the beta variant of a flag bound to the `beta` cohort, and no one else does; a flag that
    follows web's canary (`on_canary`) agrees too, and so does a recompiled second copy."""
    raw = {
        "cohorts": {"beta": {"salt": "beta-2026"}},
        "releases": {"web": release(stage="beta", cohort="beta")},
        "routes": [{"release": "web"}],
        "flags": {
            "checkout": {
                "type": "string",
                "variants": {"beta": "new-checkout", "control": "old-checkout"},
                "default": "control",
                "cohort": "beta",
                "rollout": [
                    {"variant": "beta", "weight": 10},
                    {"variant": "control", "weight": 90},
                ],
            },
            "follows-web": boolean_flag(
                rules=[{"conditions": [{"op": "on_canary", "value": "web"}], "variant": "on"}]
            ),
        },
    }
    first: Snapshot = compile_snapshot(load_document(raw))
    second: Snapshot = compile_snapshot(load_document(orjson.dumps(raw)))
    canary = flagged = 0
    for unit in UNITS:
        on_canary = first.releases["web"].assign(unit).arm == ARM_CANARY
        for snap in (first, second):
            assert snap.flags is not None
            got = snap.flags.evaluate("checkout", unit, {}).variant
            assert (got == "beta") is on_canary, unit
            assert (snap.flags.evaluate("follows-web", unit, {}).variant == "on") is on_canary
        canary += on_canary
        flagged += got == "beta"
    assert canary == flagged
    assert 800 < canary < 1200  # ~10 % of 10,000: the split is a real one, not all or none


# -- properties ----------------------------------------------------------------------------------

weights = st.lists(st.integers(min_value=0, max_value=100_000), min_size=1, max_size=6)


def _splits(raw_weights: list[int]) -> list[dict[str, Any]]:
    total = sum(raw_weights) or 1
    milli = [w * POSITION_SPACE // total for w in raw_weights]
    milli[-1] += POSITION_SPACE - sum(milli)
    return [{"variant": f"v{i}", "weight": m / 1000} for i, m in enumerate(milli)]


@PROPERTIES
@given(
    raw_weights=weights,
    unit=st.text(min_size=1, max_size=20),
    global_kill=st.booleans(),
    email=st.sampled_from(["a@corp.com", "b@x.org", None]),
)
def test_kill_switches_win_over_every_rule_target_and_prerequisite(
    raw_weights: list[int], unit: str, global_kill: bool, email: str | None
) -> None:
    """With the flag's kill switch (or the global one) on, every unit gets the off variant
    with reason DISABLED, whatever its targets, rules, rollout and prerequisites say."""
    splits = _splits(raw_weights)
    variants = {f"v{i}": f"value-{i}" for i in range(len(splits))}
    variants["dark"] = "dark"
    flag = {
        "type": "string",
        "variants": variants,
        "default": "v0",
        "off_variant": "dark",
        "killed": not global_kill,
        "prerequisites": [{"flag": "gate", "variants": ["on"]}],
        "rules": [
            {
                "conditions": [{"attribute": "email", "op": "ends_with", "value": "@corp.com"}],
                "variant": "v0",
            }
        ],
        "rollout": splits,
    }
    norm = unit_of({"targetingKey": unit})
    if norm is not None:
        flag["targets"] = {"v0": [norm]}  # the unit is an individual target of a live variant
    fs = compiled(
        {
            "flags_killed": global_kill,
            "flags": {"gate": boolean_flag(default="on"), "f": flag},
        }
    )
    ctx = {"targetingKey": unit, "email": email}
    result = fs.evaluate("f", unit_of(ctx), ctx)
    assert (result.variant, result.reason) == ("dark", "DISABLED")


@PROPERTIES
@given(raw_weights=weights, unit=st.text(min_size=1, max_size=20))
def test_evaluation_is_deterministic_and_weights_cover_the_space(
    raw_weights: list[int], unit: str
) -> None:
    """The same unit gets the same variant twice and after a recompile; the variant is the
    slice whose cumulative range holds the unit's position (the ranges cover 0..99,999)."""
    splits = _splits(raw_weights)
    raw = {
        "flags": {
            "f": {
                "type": "string",
                "variants": {s["variant"]: s["variant"] for s in splits},
                "default": "v0",
                "rollout": splits,
            }
        }
    }
    a, b = compiled(raw), compiled(raw)
    norm = unit_of({"targetingKey": unit})
    first = a.evaluate("f", norm, {})
    assert first.variant == a.evaluate("f", norm, {}).variant == b.evaluate("f", norm, {}).variant
    if norm is None:
        assert first.error_code == "TARGETING_KEY_MISSING"
        return
    pos = position("f", norm)
    low = 0
    for s in splits:
        high = low + round(s["weight"] * 1000)
        if low <= pos < high:
            assert first.variant == s["variant"]
            break
        low = high
    else:
        pytest.fail(f"position {pos} is in no range")
    assert first.reason == "SPLIT"


def test_evaluation_never_raises_on_odd_contexts() -> None:
    """Unhashable, nested or wrongly typed attributes never make evaluation raise."""
    fs = compiled(
        rule_flag({"attribute": "n", "op": "in", "value": ["a", 1]})
        | {
            "segments": {
                "s": {"conditions": [{"attribute": "v", "op": "semver_gt", "value": "1.0.0"}]}
            }
        }
    )
    for value in ({"x": 1}, [1, 2], None, 1.5, True, "a" * 10_000):
        assert fs.evaluate("f", None, {"n": value, "v": value}).error_code is None


def test_explain_says_which_rule_position_and_cohort() -> None:
    """explain names the matched rule, the unit's position, the cohort and the variant."""
    fs = compiled(
        {
            "cohorts": {"beta": {"salt": "s"}},
            "flags": {
                "f": boolean_flag(
                    cohort="beta",
                    rules=[
                        {
                            "name": "staff",
                            "conditions": [
                                {"attribute": "email", "op": "ends_with", "value": "@corp.com"}
                            ],
                            "variant": "on",
                        }
                    ],
                    rollout=[{"variant": "on", "weight": 50}, {"variant": "off", "weight": 50}],
                )
            },
        }
    )
    staff = explain_flag(fs, "f", {"targetingKey": "u1", "email": "a@corp.com"})
    assert staff["rule"] == 0 and "staff" in staff["explanation"]
    assert staff["cohort"] == "beta" and staff["position"] == position("s", "u1")
    other = explain_flag(fs, "f", {"targetingKey": "u1"})
    assert other["reason"] == "SPLIT" and "rollout" in other["explanation"]
    assert other["variant"] == ("on" if position("s", "u1") < 50_000 else "off")
