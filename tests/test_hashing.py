"""flags/hashing.py: the bucketing contract of DESIGN.md §2 against the shared reference vectors,
plus Hypothesis properties (deterministic, in range, monotonic, 0 %/100 % edges) and unit-id
normalisation (HARDENING.md table (a) row 40)."""

from __future__ import annotations

import unicodedata
from pathlib import Path
from typing import Any

import mmh3
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flags.document import load_document
from flags.evaluate import ARM_CANARY, ARM_STABLE, compile_snapshot
from flags.hashing import (
    MAX_UNIT_ID_BYTES,
    POSITION_SPACE,
    in_canary,
    normalize_unit_id,
    position,
    position_with_prefix,
    threshold,
)

VECTORS_PATH = Path(__file__).resolve().parents[2] / "shared" / "vectors" / "bucketing.json"
NAMED_STAGE_FOR_PERCENT = {0.0: "off", 10.0: "beta", 50.0: "open", 100.0: "ga"}
PROPERTIES = settings(max_examples=300, deadline=None, database=None)


def _load_cases() -> list[dict[str, Any]] | None:
    try:
        data = orjson.loads(VECTORS_PATH.read_bytes())
    except FileNotFoundError:
        return None
    cases: list[dict[str, Any]] = data["cases"]
    return cases


CASES = _load_cases()


def _params(per_percent: bool) -> list[Any]:
    if CASES is None:
        # A missing vectors file must fail the run, not skip it (DESIGN.md §2).
        return [pytest.param(None, "", id="vectors-missing")]
    params = []
    for i, case in enumerate(CASES):
        label = f"{i}-{case['salt']!r}-{case['unit_id']!r}"
        if per_percent:
            params += [pytest.param(case, p, id=f"{label}@{p}") for p in case["canary_at"]]
        else:
            params.append(pytest.param(case, "", id=label))
    return params


def _require(case: dict[str, Any] | None) -> dict[str, Any]:
    if case is None:
        pytest.fail(
            f"bucketing vectors not found at {VECTORS_PATH} (shared/ must sit beside the repo)"
        )
    return case


def _release_doc(salt: str, *, stage: str, percent: float | None) -> dict[str, Any]:
    release: dict[str, Any] = {
        "stable": ["http://stable.test:8080"],
        "canary": ["http://canary.test:8080"],
        "stage": stage,
        "salt": salt,
    }
    if percent is not None:
        release["percent"] = percent
    return {"releases": {"rel": release}, "routes": [{"release": "rel"}]}


def _arm_at(salt: str, unit_id: str, *, stage: str, percent: float | None = None) -> str:
    snapshot = compile_snapshot(load_document(_release_doc(salt, stage=stage, percent=percent)))
    return snapshot.releases["rel"].assign(unit_id).arm


def test_vectors_file_is_present_and_not_empty() -> None:
    """The shared reference vectors are found beside the repo and hold cases."""
    assert CASES, f"no bucketing vectors at {VECTORS_PATH}"


@pytest.mark.parametrize(("case", "unused"), _params(per_percent=False))
def test_vector_murmur3(case: dict[str, Any] | None, unused: str) -> None:
    """MurmurHash3_x86_32(utf8(salt + ':' + unit), seed 0, unsigned) matches the vector."""
    case = _require(case)
    assert mmh3.hash(case["salt"] + ":" + case["unit_id"], 0, False) == case["murmur3"]


@pytest.mark.parametrize(("case", "unused"), _params(per_percent=False))
def test_vector_position(case: dict[str, Any] | None, unused: str) -> None:
    """position() and its precomputed-prefix form give the vector's position."""
    case = _require(case)
    assert position(case["salt"], case["unit_id"]) == case["position"]
    assert position_with_prefix(case["salt"] + ":", case["unit_id"]) == case["position"]


@pytest.mark.parametrize(("case", "percent"), _params(per_percent=True))
def test_vector_in_canary(case: dict[str, Any] | None, percent: str) -> None:
    """in_canary(position, p) gives the vector's decision at every listed percent."""
    case = _require(case)
    assert in_canary(case["position"], float(percent)) is case["canary_at"][percent]


@pytest.mark.parametrize(("case", "percent"), _params(per_percent=True))
def test_vector_compiled_release(case: dict[str, Any] | None, percent: str) -> None:
    """A compiled release at that percent (custom and named stage) assigns the vector's arm."""
    case = _require(case)
    expected = ARM_CANARY if case["canary_at"][percent] else ARM_STABLE
    p = float(percent)
    salt, unit = case["salt"], case["unit_id"]
    assert _arm_at(salt, unit, stage="custom", percent=p) == expected
    if p in NAMED_STAGE_FOR_PERCENT:
        assert _arm_at(salt, unit, stage=NAMED_STAGE_FOR_PERCENT[p]) == expected


# -- properties ----------------------------------------------------------------------------------

salts = st.text(max_size=40)
units = st.text(max_size=80)
milli_percents = st.integers(min_value=0, max_value=100 * 1000)


def _percent(milli: int) -> float:
    """A percentage as an operator types it: a multiple of 0.001."""
    return round(milli * 0.001, 3)


@PROPERTIES
@given(salts, units)
def test_position_is_deterministic(salt: str, unit: str) -> None:
    """The same salt and unit always give the same position, by every code path."""
    expected = (mmh3.hash(salt + ":" + unit, 0, False) * POSITION_SPACE) >> 32
    assert position(salt, unit) == position(salt, unit) == expected
    assert position_with_prefix(salt + ":", unit) == expected


@PROPERTIES
@given(salts, units)
def test_position_is_in_range(salt: str, unit: str) -> None:
    """Every position lies in [0, 100000)."""
    assert 0 <= position(salt, unit) < POSITION_SPACE


@PROPERTIES
@given(milli_percents)
def test_threshold_is_exact_for_milli_percents(milli: int) -> None:
    """A percentage in 0.001 % steps maps to exactly that many thousandths."""
    assert threshold(_percent(milli)) == milli


@PROPERTIES
@given(salts, units, milli_percents, milli_percents)
def test_canary_is_monotonic_in_percent(salt: str, unit: str, a: int, b: int) -> None:
    """A unit in the canary at p is in the canary at every q >= p."""
    low, high = sorted((a, b))
    pos = position(salt, unit)
    if in_canary(pos, _percent(low)):
        assert in_canary(pos, _percent(high))


@PROPERTIES
@given(salts, units)
def test_zero_percent_never_and_hundred_always(salt: str, unit: str) -> None:
    """At 0 % no unit is in the canary; at 100 % every unit is."""
    pos = position(salt, unit)
    assert not in_canary(pos, 0.0)
    assert in_canary(pos, 100.0)


@settings(max_examples=60, deadline=None, database=None)
@given(st.text(max_size=30), units)
def test_compiled_release_edges(salt: str, unit: str) -> None:
    """Compiled releases agree: custom 0 % and off are stable, custom 100 % and ga canary."""
    assert _arm_at(salt, unit, stage="custom", percent=0.0) == ARM_STABLE
    assert _arm_at(salt, unit, stage="off") == ARM_STABLE
    assert _arm_at(salt, unit, stage="custom", percent=100.0) == ARM_CANARY
    assert _arm_at(salt, unit, stage="ga") == ARM_CANARY


# -- unit id normalisation -----------------------------------------------------------------------

WHITESPACE = st.text(alphabet=" \t\r\n\u00a0\u2003\u3000", max_size=5)
ACCENTED = st.text(alphabet="aeiouAEIOUéèêëüñçÅåøæßǅ가한글\u0301\u0308\u0327 -_.@", max_size=40)


@PROPERTIES
@given(st.one_of(units, ACCENTED))
def test_nfc_and_nfd_spellings_normalise_alike(text: str) -> None:
    """NFC and NFD spellings of one id give one canonical id, as text and as UTF-8 bytes."""
    nfc = unicodedata.normalize("NFC", text)
    nfd = unicodedata.normalize("NFD", text)
    expected = normalize_unit_id(nfc)
    assert normalize_unit_id(nfd) == expected
    assert normalize_unit_id(nfc.encode()) == expected
    assert normalize_unit_id(nfd.encode()) == expected


def test_nfd_bytes_near_the_cap_keep_their_bucket() -> None:
    """An NFD id whose NFC form fits 256 bytes is kept even when its NFD bytes are 3x longer."""
    name = "한" * 85  # 255 bytes in NFC, 765 in NFD
    nfd = unicodedata.normalize("NFD", name).encode()
    assert normalize_unit_id(nfd) == name


@PROPERTIES
@given(WHITESPACE, st.one_of(units, ACCENTED), WHITESPACE)
def test_surrounding_whitespace_is_trimmed(before: str, text: str, after: str) -> None:
    """Leading and trailing whitespace do not change the canonical id."""
    assert normalize_unit_id(before + text + after) == normalize_unit_id(text)


@PROPERTIES
@given(st.one_of(units, ACCENTED, st.binary(max_size=80)))
def test_normalisation_is_idempotent(raw: str | bytes) -> None:
    """A canonical id normalises to itself, and is non-empty, trimmed, NFC and within the cap."""
    once = normalize_unit_id(raw)
    if once is not None:
        assert normalize_unit_id(once) == once
        assert once and once == once.strip()
        assert once == unicodedata.normalize("NFC", once)
        assert len(once.encode("utf-8")) <= MAX_UNIT_ID_BYTES


@PROPERTIES
@given(
    st.text(max_size=20).map(str.encode),
    st.sampled_from([b"\xff", b"\xc3", b"\xed\xa0\x80", b"\x80"]),
)
def test_non_utf8_bytes_are_absent(prefix: bytes, bad: bytes) -> None:
    """Bytes that are not UTF-8 identify no unit (None), never a mangled id."""
    assert normalize_unit_id(prefix + bad + b"x") is None


@pytest.mark.parametrize(
    "raw",
    [
        "x" * (MAX_UNIT_ID_BYTES + 1),
        b"x" * (MAX_UNIT_ID_BYTES + 1),
        "é" * (MAX_UNIT_ID_BYTES // 2 + 1),
        ("é" * (MAX_UNIT_ID_BYTES // 2 + 1)).encode(),
        b"x" * 10_000,
    ],
    ids=["ascii-str", "ascii-bytes", "utf8-str", "utf8-bytes", "10KiB"],
)
def test_ids_over_the_cap_are_absent(raw: str | bytes) -> None:
    """An id longer than 256 UTF-8 bytes is treated as absent, never truncated."""
    assert normalize_unit_id(raw) is None


def test_ids_at_the_cap_are_kept() -> None:
    """An id of exactly 256 UTF-8 bytes is kept whole."""
    assert normalize_unit_id("x" * MAX_UNIT_ID_BYTES) == "x" * MAX_UNIT_ID_BYTES
    assert normalize_unit_id("é" * (MAX_UNIT_ID_BYTES // 2)) == "é" * (MAX_UNIT_ID_BYTES // 2)


@pytest.mark.parametrize("raw", ["", "   ", b"", "\t\n", "a\x00b", "\ud800", "user\ud800"])
def test_empty_control_and_surrogate_ids_are_absent(raw: str | bytes) -> None:
    """Empty, whitespace-only, control-character and lone-surrogate ids are None (no raise)."""
    assert normalize_unit_id(raw) is None
