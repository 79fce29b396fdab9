"""Feature flags in the versioned document: the models and their validation (issue #11).

Rules of this file:
* Flags live beside releases in the one document (`flags:`, `segments:`, `flags_killed:`,
  `api_keys:`), so every flag change is a new version like any other (DESIGN.md §4).
* A flag that cannot work is refused whole, with the dotted field named: a rule on an unknown
  segment, a prerequisite cycle, weights not summing to 100, a default that is not a variant,
  a variant of the wrong type. Validation happens here; `flags/flageval.py` compiles only
  documents that passed.
* Operators are a closed table (`OPERATORS`): no user-supplied regular expression is ever
  evaluated on the request path (issue #11, "Deliver" 1).
* Percentages and weights are in 0.001 % steps over the same position space as releases
  (DESIGN.md §2): a flag bound to `cohort: beta` buckets with the beta cohort's salt, so the
  beta 10 % of a flag and of a release are the same people.
"""

from __future__ import annotations

import hashlib
import math
import re
from typing import TYPE_CHECKING, Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field

from flags.errors import ConfigError
from flags.hashing import POSITION_SPACE, normalize_unit_id, threshold

if TYPE_CHECKING:
    from flags.document import Document

FLAG_TYPES = ("boolean", "string", "number", "object")
# Flag keys travel unencoded in OFREP URLs (OFREP.md §2: the Python client does not
# percent-encode), so they are kept to [A-Za-z0-9._-].
FLAG_KEY_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
VARIANT_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
SHA256_HEX_RE = re.compile(r"^[0-9a-f]{64}$")
MAX_VARIANTS = 64
MAX_RULES = 128
MAX_CONDITIONS = 32
MAX_TARGET_IDS = 10_000
MAX_IN_VALUES = 10_000
MAX_VARIANT_JSON_BYTES = 32 * 1024

# Attribute names with a meaning of their own: the unit id (OFREP's targetingKey).
UNIT_ATTRIBUTES = frozenset({"targetingKey", "key", "unit_id"})

Operator = Literal[
    "equals",
    "not_equals",
    "in",
    "not_in",
    "starts_with",
    "ends_with",
    "contains",
    "lt",
    "lte",
    "gt",
    "gte",
    "semver_eq",
    "semver_lt",
    "semver_lte",
    "semver_gt",
    "semver_gte",
    "in_segment",
    "not_in_segment",
    "on_canary",  # value: a release name; true while the unit is on that release's canary
    "exists",
]
OPERATORS: tuple[str, ...] = get_args(Operator)
STRING_OPS = frozenset({"starts_with", "ends_with", "contains"})
NUMBER_OPS = frozenset({"lt", "lte", "gt", "gte"})
SEMVER_OPS = frozenset({"semver_eq", "semver_lt", "semver_lte", "semver_gt", "semver_gte"})
SEGMENT_OPS = frozenset({"in_segment", "not_in_segment"})
LIST_OPS = frozenset({"in", "not_in"})
# Attribute-free operators (the value names a segment or a release).
NO_ATTRIBUTE_OPS = SEGMENT_OPS | {"on_canary"}

_SEMVER_RE = re.compile(
    r"^v?(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)(?:-([0-9A-Za-z.-]+))?(?:\+[0-9A-Za-z.-]+)?$"
)

_MODEL = ConfigDict(extra="forbid", frozen=True, strict=True)
MetadataValue = bool | int | float | str


class Condition(BaseModel):
    """One test on the evaluation context; a rule's conditions must all hold."""

    model_config = _MODEL
    attribute: str = Field(default="", max_length=128)
    op: Operator
    value: Any = None


class Split(BaseModel):
    """One slice of a weighted rollout: `weight` percent of the position space."""

    model_config = _MODEL
    variant: str
    weight: float


class Rule(BaseModel):
    """If every condition holds, serve `variant`, or split the matching units by `split`."""

    model_config = _MODEL
    name: str = Field(default="", max_length=128)
    conditions: tuple[Condition, ...] = Field(default=(), max_length=MAX_CONDITIONS)
    variant: str | None = None
    split: tuple[Split, ...] | None = None


class Prerequisite(BaseModel):
    """This flag is served only while `flag` evaluates to one of `variants`."""

    model_config = _MODEL
    flag: str
    variants: tuple[str, ...] = Field(min_length=1)


class Flag(BaseModel):
    """A typed feature flag with named variants.

    Evaluation order (first that applies wins): global kill switch, this flag's kill switch,
    `enabled: false` (all three serve `off_variant`, reason DISABLED); prerequisites (unmet:
    `off_variant`); individual `targets`; `rules` in order; `rollout`; `default`.
    """

    model_config = _MODEL
    type: Literal["boolean", "string", "number", "object"]
    variants: dict[str, Any] = Field(min_length=1, max_length=MAX_VARIANTS)
    default: str
    off_variant: str | None = None
    enabled: bool = True
    killed: bool = False
    kill_reason: str = Field(default="", max_length=500)
    # When off, answer without a value so each app falls back to its code default (OFREP
    # ADR-0006; OFREP.md §3 item 3): the variant is still named.
    defer_off_value: bool = False
    prerequisites: tuple[Prerequisite, ...] = ()
    targets: dict[str, tuple[str, ...]] = Field(default_factory=dict)
    rules: tuple[Rule, ...] = Field(default=(), max_length=MAX_RULES)
    rollout: tuple[Split, ...] | None = None
    cohort: str | None = None
    salt: str | None = Field(default=None, max_length=128)
    metadata: dict[str, MetadataValue] = Field(default_factory=dict)
    # Releases whose proxied requests carry this flag's variant upstream (edge/flagheader.py).
    upstream: tuple[str, ...] = ()
    description: str = Field(default="", max_length=500)


class Segment(BaseModel):
    """A named set of units: listed ids, minus excluded ids, or units matching every condition."""

    model_config = _MODEL
    include: tuple[str, ...] = Field(default=(), max_length=MAX_TARGET_IDS)
    exclude: tuple[str, ...] = Field(default=(), max_length=MAX_TARGET_IDS)
    conditions: tuple[Condition, ...] = Field(default=(), max_length=MAX_CONDITIONS)
    description: str = Field(default="", max_length=500)


class ApiKey(BaseModel):
    """An application's OFREP key. Only the SHA-256 of the secret is stored (hex)."""

    model_config = _MODEL
    sha256: str
    flags: tuple[str, ...] | None = None  # None: every flag
    revoked: bool = False
    rate_per_s: float | None = None  # None: unlimited
    burst: int | None = None
    exposures: bool = False  # may read the exposure event stream (unit ids: analytics only)
    description: str = Field(default="", max_length=500)


def hash_key(secret: str) -> str:
    """What the document stores for an API key: hex SHA-256 of the secret, never the secret."""
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


# -- validation --------------------------------------------------------------------------------


def parse_semver(text: str) -> tuple[int, int, int, int, str] | None:
    """(major, minor, patch, is_release, prerelease) so tuples order as SemVer §11 (a
    pre-release sorts before its release; pre-release identifiers compared as text)."""
    match = _SEMVER_RE.match(text)
    if match is None:
        return None
    pre = match.group(4) or ""
    return (int(match.group(1)), int(match.group(2)), int(match.group(3)), 0 if pre else 1, pre)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_type(field: str, kind: str, value: Any) -> None:
    ok = {
        "boolean": isinstance(value, bool),
        "string": isinstance(value, str),
        "number": _is_number(value) and math.isfinite(value),
        # OFREP.md §2: an object flag takes a JSON object or array.
        "object": isinstance(value, (dict, list)),
    }[kind]
    if not ok:
        raise ConfigError(field, f"variant value {value!r} is not a {kind}")


def split_bounds(field: str, splits: tuple[Split, ...], variants: dict[str, Any]) -> list[int]:
    """Cumulative upper bounds (positions) of a split, in list order (DESIGN.md §2)."""
    if not splits:
        raise ConfigError(field, "a split needs at least one variant")
    bounds: list[int] = []
    total = 0
    for i, part in enumerate(splits):
        where = f"{field}.{i}"
        if part.variant not in variants:
            raise ConfigError(f"{where}.variant", f"unknown variant {part.variant!r}")
        if not math.isfinite(part.weight) or part.weight < 0 or part.weight > 100:
            raise ConfigError(f"{where}.weight", "must be between 0 and 100")
        steps = part.weight * 1000
        if abs(steps - round(steps)) > 1e-6:
            raise ConfigError(f"{where}.weight", "must be a multiple of 0.001 %")
        total += threshold(part.weight)
        bounds.append(total)
    if total != POSITION_SPACE:
        raise ConfigError(field, f"weights must sum to 100, got {total / 1000:g}")
    return bounds


def _check_condition(doc: Document, field: str, cond: Condition, in_segment: bool) -> None:
    op, value = cond.op, cond.value
    if op in NO_ATTRIBUTE_OPS:
        if in_segment and op in SEGMENT_OPS:
            raise ConfigError(f"{field}.op", "a segment cannot refer to another segment")
        if not isinstance(value, str):
            raise ConfigError(f"{field}.value", "must be a name")
        if op in SEGMENT_OPS and value not in doc.segments:
            raise ConfigError(f"{field}.value", f"unknown segment {value!r}")
        if op == "on_canary" and value not in doc.releases:
            raise ConfigError(f"{field}.value", f"unknown release {value!r}")
        return
    if not cond.attribute:
        raise ConfigError(f"{field}.attribute", f"required for {op!r}")
    if op == "exists":
        if value is not None and not isinstance(value, bool):
            raise ConfigError(f"{field}.value", "must be true, false or absent")
    elif op in LIST_OPS:
        if not isinstance(value, list) or len(value) > MAX_IN_VALUES:
            raise ConfigError(f"{field}.value", f"must be a list of at most {MAX_IN_VALUES}")
        for i, item in enumerate(value):
            if not isinstance(item, (str, int, float, bool)):
                raise ConfigError(f"{field}.value.{i}", "must be a string, number or boolean")
    elif op in STRING_OPS:
        if not isinstance(value, str) or not value:
            raise ConfigError(f"{field}.value", "must be a non-empty string")
    elif op in NUMBER_OPS:
        if not _is_number(value) or not math.isfinite(value):
            raise ConfigError(f"{field}.value", "must be a number")
    elif op in SEMVER_OPS:
        if not isinstance(value, str) or parse_semver(value) is None:
            raise ConfigError(f"{field}.value", f"not a semantic version: {value!r}")
    elif not isinstance(value, (str, int, float, bool)):  # equals / not_equals
        raise ConfigError(f"{field}.value", "must be a string, number or boolean")


def _check_unit_ids(field: str, ids: tuple[str, ...]) -> None:
    for i, uid in enumerate(ids):
        if normalize_unit_id(uid) != uid:
            raise ConfigError(f"{field}.{i}", "invalid unit id (trimmed, NFC, printable)")


def _check_flag(doc: Document, key: str, flag: Flag) -> None:
    where = f"flags.{key}"
    if not FLAG_KEY_RE.match(key):
        raise ConfigError(where, "flag keys are 1-128 of A-Z a-z 0-9 . _ - (URL-safe)")
    for name, value in flag.variants.items():
        if not VARIANT_RE.match(name):
            raise ConfigError(f"{where}.variants.{name}", "invalid variant name")
        _check_type(f"{where}.variants.{name}", flag.type, value)
    if flag.default not in flag.variants:
        raise ConfigError(f"{where}.default", f"{flag.default!r} is not one of the variants")
    if flag.off_variant is not None and flag.off_variant not in flag.variants:
        raise ConfigError(
            f"{where}.off_variant", f"{flag.off_variant!r} is not one of the variants"
        )
    for i, pre in enumerate(flag.prerequisites):
        target = doc.flags.get(pre.flag)
        if target is None:
            raise ConfigError(f"{where}.prerequisites.{i}.flag", f"unknown flag {pre.flag!r}")
        for j, variant in enumerate(pre.variants):
            if variant not in target.variants:
                raise ConfigError(
                    f"{where}.prerequisites.{i}.variants.{j}",
                    f"flag {pre.flag!r} has no variant {variant!r}",
                )
    seen: set[str] = set()
    for variant, ids in flag.targets.items():
        if variant not in flag.variants:
            raise ConfigError(f"{where}.targets.{variant}", f"unknown variant {variant!r}")
        _check_unit_ids(f"{where}.targets.{variant}", ids)
        for uid in ids:
            if uid in seen:
                raise ConfigError(f"{where}.targets.{variant}", f"unit {uid!r} targeted twice")
            seen.add(uid)
    if len(seen) > MAX_TARGET_IDS:
        raise ConfigError(f"{where}.targets", f"at most {MAX_TARGET_IDS} individual targets")
    for i, rule in enumerate(flag.rules):
        rwhere = f"{where}.rules.{i}"
        for j, cond in enumerate(rule.conditions):
            _check_condition(doc, f"{rwhere}.conditions.{j}", cond, in_segment=False)
        if (rule.variant is None) == (rule.split is None):
            raise ConfigError(rwhere, "give exactly one of 'variant' or 'split'")
        if rule.variant is not None and rule.variant not in flag.variants:
            raise ConfigError(f"{rwhere}.variant", f"unknown variant {rule.variant!r}")
        if rule.split is not None:
            split_bounds(f"{rwhere}.split", rule.split, flag.variants)
    if flag.rollout is not None:
        split_bounds(f"{where}.rollout", flag.rollout, flag.variants)
    if flag.salt is not None and flag.cohort is not None:
        raise ConfigError(f"{where}.cohort", "set either salt or cohort, not both")
    if flag.cohort is not None and flag.cohort not in doc.cohorts:
        raise ConfigError(f"{where}.cohort", f"unknown cohort {flag.cohort!r}")
    for i, release in enumerate(flag.upstream):
        if release not in doc.releases:
            raise ConfigError(f"{where}.upstream.{i}", f"unknown release {release!r}")
    for name, meta in flag.metadata.items():
        if isinstance(meta, float) and not math.isfinite(meta):
            raise ConfigError(f"{where}.metadata.{name}", "must be finite")


def _check_prerequisite_cycles(doc: Document) -> None:
    """Depth-first search over prerequisite edges; a back edge is a cycle (refused)."""
    state: dict[str, int] = {}  # 1: on the stack, 2: done

    def visit(key: str, path: list[str]) -> None:
        state[key] = 1
        for i, pre in enumerate(doc.flags[key].prerequisites):
            if state.get(pre.flag) == 1:
                cycle = " -> ".join([*path[path.index(pre.flag) :], pre.flag])
                raise ConfigError(
                    f"flags.{key}.prerequisites.{i}.flag", f"prerequisite cycle: {cycle}"
                )
            if pre.flag not in state:
                visit(pre.flag, [*path, pre.flag])
        state[key] = 2

    for key in doc.flags:
        if key not in state:
            visit(key, [key])


def check_flags(doc: Document) -> None:
    """Cross-field validation of the flag sections of a parsed document."""
    for name, seg in doc.segments.items():
        where = f"segments.{name}"
        if not FLAG_KEY_RE.match(name):
            raise ConfigError(where, "invalid segment name")
        _check_unit_ids(f"{where}.include", seg.include)
        _check_unit_ids(f"{where}.exclude", seg.exclude)
        for j, cond in enumerate(seg.conditions):
            _check_condition(doc, f"{where}.conditions.{j}", cond, in_segment=True)
    for key, flag in doc.flags.items():
        _check_flag(doc, key, flag)
    _check_prerequisite_cycles(doc)
    hashes: dict[str, str] = {}
    for name, api_key in doc.api_keys.items():
        where = f"api_keys.{name}"
        if not FLAG_KEY_RE.match(name):
            raise ConfigError(where, "invalid key name")
        if not SHA256_HEX_RE.match(api_key.sha256):
            raise ConfigError(f"{where}.sha256", "must be 64 lower-case hex digits (SHA-256)")
        if api_key.sha256 in hashes:
            raise ConfigError(
                f"{where}.sha256", f"same secret as api_keys.{hashes[api_key.sha256]}"
            )
        hashes[api_key.sha256] = name
        for i, key in enumerate(api_key.flags or ()):
            if key not in doc.flags:
                raise ConfigError(f"{where}.flags.{i}", f"unknown flag {key!r}")
        if api_key.rate_per_s is not None and not (0 < api_key.rate_per_s <= 1e6):
            raise ConfigError(f"{where}.rate_per_s", "must be > 0 and at most 1e6")
        if api_key.burst is not None and not (1 <= api_key.burst <= 1_000_000):
            raise ConfigError(f"{where}.burst", "must be between 1 and 1000000")
