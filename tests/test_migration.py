"""flags/migration.py: a flagd file and an Unleash export (tests/data/) import into flags that
evaluate as their source does for a sample of contexts, and the report names every construct
left out (issue #11, "Migration")."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import pytest

from flags.document import load_document
from flags.evaluate import compile_snapshot
from flags.flageval import FlagSet, unit_of
from flags.migration import from_flagd, from_unleash, merge_flags

DATA = Path(__file__).resolve().parent / "data"


def compiled(converted: Any) -> FlagSet:
    doc = load_document(merge_flags({}, converted))
    flags = compile_snapshot(doc).flags
    assert flags is not None
    return flags


def variant(fs: FlagSet, key: str, ctx: dict[str, Any]) -> str | None:
    return fs.evaluate(key, unit_of(ctx), ctx).variant


# Each row: a context and what flagd answers for it (worked out from flagd's documented
# semantics: an `if` chain's first true branch, else the default variant; `null` -> default).
FLAGD_CASES: list[tuple[dict[str, Any], dict[str, str]]] = [
    (
        {"targetingKey": "u1", "email": "a@corp.com", "version": "2.1.0", "plan": "pro", "age": 31},
        {"new-header": "on", "color": "blue", "limit": "high", "legacy": "off"},
    ),
    (
        {"targetingKey": "u2", "email": "b@beta.example", "country": "se", "age": 30},
        {"new-header": "on", "color": "green", "limit": "low", "legacy": "off"},
    ),
    (
        {"targetingKey": "u3", "email": "c@x.org", "version": "1.9.0", "plan": "pro"},
        {"new-header": "off", "color": "red", "limit": "low", "legacy": "off"},
    ),
    (
        {"targetingKey": "u4", "country": "fi", "version": "2.0.0", "plan": "free", "age": 99.5},
        {"new-header": "off", "color": "red", "limit": "high", "legacy": "off"},
    ),
]


@pytest.mark.parametrize(("ctx", "want"), FLAGD_CASES)
def test_flagd_file_evaluates_as_flagd_does(ctx: dict[str, Any], want: dict[str, str]) -> None:
    """Each imported flagd flag gives flagd's variant for the sample contexts."""
    fs = compiled(from_flagd(orjson.loads((DATA / "flagd-flags.json").read_bytes())))
    assert {key: variant(fs, key, ctx) for key in want} == want


def test_flagd_report_names_what_is_not_mapped() -> None:
    """`$flagd.timestamp` leaves its flag out; `fractional` keeps its weights but is reported
    as bucketing differently; the rest maps without a word; metadata and state carry over."""
    converted = from_flagd(orjson.loads((DATA / "flagd-flags.json").read_bytes()))
    assert "clock-based" not in converted.flags
    assert "$flagd.timestamp" in converted.report["clock-based"][0]
    assert converted.flags["checkout-split"]["rollout"] == [
        {"variant": "a", "weight": 50.0},
        {"variant": "b", "weight": 50.0},
    ]
    assert "bucket" in converted.report["checkout-split"][0]
    assert set(converted.report) == {"clock-based", "checkout-split"}
    assert converted.flags["color"]["metadata"] == {"team": "web"}
    assert converted.flags["legacy"]["enabled"] is False
    fs = compiled(converted)
    share = sum(
        variant(fs, "checkout-split", {"targetingKey": f"u{i}"}) == "b" for i in range(4000)
    )
    assert 1800 < share < 2200  # the same 50 % share


UNLEASH_CASES: list[tuple[dict[str, Any], dict[str, str]]] = [
    (
        {"targetingKey": "qa-1", "country": "se", "email": "x@corp.com", "appVersion": "1.5.0"},
        {"new-search": "on", "staff-banner": "on", "qa-tools": "on"},
    ),
    (
        {"targetingKey": "u7", "country": "no", "email": "x@corp.com", "appVersion": "1.4.0"},
        {"new-search": "off", "staff-banner": "off", "qa-tools": "off"},
    ),
    (
        {"targetingKey": "u8", "country": "dk", "email": "x@other.com", "seats": 50},
        {"new-search": "on", "staff-banner": "off", "qa-tools": "on"},
    ),
    (
        {"targetingKey": "qa-2", "seats": 10},
        {"new-search": "off", "staff-banner": "off", "qa-tools": "on"},
    ),
]


@pytest.mark.parametrize(("ctx", "want"), UNLEASH_CASES)
def test_unleash_export_evaluates_as_unleash_does(
    ctx: dict[str, Any], want: dict[str, str]
) -> None:
    """Each imported Unleash feature is on exactly when Unleash's strategies (ORed, constraints
    ANDed) enable it for the sample contexts (`userId` is the targetingKey)."""
    fs = compiled(from_unleash(orjson.loads((DATA / "unleash-export.json").read_bytes())))
    assert {key: variant(fs, key, ctx) for key in want} == want


def test_unleash_report_and_rollout_share() -> None:
    """`remoteAddress` leaves its feature out; a 25 % rollout keeps its share (reported as
    bucketing differently); the description carries over."""
    converted = from_unleash(orjson.loads((DATA / "unleash-export.json").read_bytes()))
    assert "by-ip" not in converted.flags and "remoteAddress" in converted.report["by-ip"][0]
    assert "bucket" in converted.report["beta-pricing"][0]
    assert converted.flags["new-search"]["description"] == "search v2"
    fs = compiled(converted)
    on = sum(variant(fs, "beta-pricing", {"targetingKey": f"u{i}"}) == "on" for i in range(4000))
    assert 850 < on < 1150
