"""Bucketing: the contract of DESIGN.md §2. Never change it silently.

    h        = MurmurHash3_x86_32(utf8(salt + ":" + unit_id), seed=0)   # unsigned 32-bit
    position = (h * 100_000) >> 32                                       # 0 .. 99_999
    in canary at percent p  <=>  position < round(p * 1000)

Positions are thousandths of a percent, so a threshold is an integer and comparisons on the
request path never touch floats. Monotonic by construction: a unit in at 10 % is in at 50 %.
"""

from __future__ import annotations

import unicodedata

import mmh3

POSITION_SPACE = 100_000
MILLI_PERCENT_PER_PERCENT = 1_000
MAX_UNIT_ID_BYTES = 256

_hash32 = mmh3.hash


def position(salt: str, unit_id: str) -> int:
    """Return the unit's stable position in [0, POSITION_SPACE) for this salt."""
    return (_hash32(salt + ":" + unit_id, 0, False) * POSITION_SPACE) >> 32


def position_with_prefix(salt_prefix: str, unit_id: str) -> int:
    """`position` with ``salt + ":"`` precomputed (the request path's form)."""
    return (_hash32(salt_prefix + unit_id, 0, False) * POSITION_SPACE) >> 32


def threshold(percent: float) -> int:
    """Canary threshold for a percentage: positions below it are in the canary."""
    return round(percent * MILLI_PERCENT_PER_PERCENT)


def in_canary(pos: int, percent: float) -> bool:
    """The contract's decision, for tests and explanations."""
    return pos < threshold(percent)


def normalize_unit_id(raw: str | bytes) -> str | None:
    """Canonical unit id, or None when the value cannot identify a unit.

    HARDENING.md table (a) row 40: ids are UTF-8, NFC-normalised (so NFD and NFC spellings of
    one name land in one bucket), trimmed, and at most MAX_UNIT_ID_BYTES bytes. An id that is
    empty, not UTF-8 or too long is treated as absent (the caller falls back to the next
    identity source) rather than truncated, because truncation would merge distinct users.
    """
    if isinstance(raw, bytes):
        # An NFD spelling is up to 3x its NFC form in UTF-8 (UAX #15; a Hangul syllable is 3
        # bytes NFC, 9 NFD): the pre-cap admits 3x so NFD bytes keep the bucket NFC text gets.
        if len(raw) > MAX_UNIT_ID_BYTES * 3:
            return None
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            return None
    else:
        text = raw
    text = text.strip()
    if not text.isascii():
        text = unicodedata.normalize("NFC", text)
        # "surrogatepass": a lone surrogate must not raise here; isprintable() refuses it below.
        if len(text.encode("utf-8", "surrogatepass")) > MAX_UNIT_ID_BYTES:
            return None
    elif len(text) > MAX_UNIT_ID_BYTES:
        return None
    if not text or not text.isprintable():
        return None
    return text
