"""Flag evaluation over a compiled document (issue #11, "Fast evaluation").

Rules of this file:
* `compile_flags` runs once per applied version: conditions become small closures, segment
  id lists frozensets, split weights integer cumulative bounds, and every answer a flag can
  give (variant x reason) a prebuilt, shared `FlagResult`. Evaluation then does no parsing
  and allocates nothing on its common paths: it returns one of the prebuilt results.
* `FlagSet.evaluate` never raises: an unknown flag is FLAG_NOT_FOUND, a split without a unit
  id is TARGETING_KEY_MISSING (never bucketed on a random id, DESIGN.md §2), anything
  unexpected is ERROR/GENERAL. Reasons and codes are OpenFeature's.
* Order, first that applies wins: global kill, flag kill, disabled (all DISABLED with the off
  variant); prerequisites (unmet: off variant, DISABLED); individual targets; rules in order;
  rollout; default. So a kill switch wins over every rule, target and prerequisite.
* Bucketing is the release's (flags/hashing.py): a flag bound to a cohort uses the cohort's
  salt, and split ranges are cumulative in list order, so `cohort: beta` with a first slice
  of 10 % is exactly the units a release at `beta` on that cohort sends to its canary.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any, Final

import mmh3

from flags.flagmodel import (
    NUMBER_OPS,
    SEMVER_OPS,
    UNIT_ATTRIBUTES,
    Condition,
    Flag,
    Segment,
    Split,
    parse_semver,
    split_bounds,
)
from flags.hashing import (
    MAX_UNIT_ID_BYTES,
    POSITION_SPACE,
    normalize_unit_id,
    position_with_prefix,
)

_hash32 = mmh3.hash

if TYPE_CHECKING:
    from flags.document import Document
    from flags.evaluate import CompiledRelease

REASON_STATIC: Final = "STATIC"
REASON_DEFAULT: Final = "DEFAULT"
REASON_TARGETING_MATCH: Final = "TARGETING_MATCH"
REASON_SPLIT: Final = "SPLIT"
REASON_DISABLED: Final = "DISABLED"
REASON_ERROR: Final = "ERROR"

ERROR_FLAG_NOT_FOUND: Final = "FLAG_NOT_FOUND"
ERROR_TARGETING_KEY_MISSING: Final = "TARGETING_KEY_MISSING"
ERROR_GENERAL: Final = "GENERAL"

MAX_PREREQUISITE_DEPTH = 32  # validation refuses cycles; this bounds a deep chain's stack

Context = Mapping[str, Any]
Test = Callable[[str | None, Context], bool]


class FlagResult:
    """One evaluation's answer. Prebuilt per (flag, variant, reason) and shared: read only."""

    __slots__ = (
        "key",
        "value",
        "variant",
        "reason",
        "error_code",
        "error_details",
        "metadata",
        "deferred",
    )

    def __init__(
        self,
        key: str,
        value: Any,
        variant: str | None,
        reason: str,
        metadata: Mapping[str, bool | int | float | str],
        error_code: str | None = None,
        error_details: str | None = None,
        deferred: bool = False,
    ) -> None:
        self.key = key
        self.deferred = deferred  # no value: the caller's code default applies (ADR-0006)
        self.value = value
        self.variant = variant
        self.reason = reason
        self.metadata = metadata
        self.error_code = error_code
        self.error_details = error_details

    def __repr__(self) -> str:
        return (
            f"FlagResult({self.key!r}, variant={self.variant!r}, value={self.value!r}, "
            f"reason={self.reason!r}, error_code={self.error_code!r})"
        )


# -- conditions --------------------------------------------------------------------------------


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _compile_attribute_test(cond: Condition) -> Test:
    """A closure per operator. The attribute is read inline (`ctx.get`), not through another
    call: one Python call per condition is the budget (benchmarks/flags.py)."""
    if cond.attribute in UNIT_ATTRIBUTES:
        inner = _compile_value_test(cond.op, cond.value)
        return lambda unit, ctx: inner(unit)
    attr, op, want = cond.attribute, cond.op, cond.value
    if op == "ends_with":
        return lambda unit, ctx: type(v := ctx.get(attr)) is str and v.endswith(want)
    if op == "starts_with":
        return lambda unit, ctx: type(v := ctx.get(attr)) is str and v.startswith(want)
    if op == "equals":
        return lambda unit, ctx: ctx.get(attr) == want
    inner = _compile_value_test(op, want)
    return lambda unit, ctx: inner(ctx.get(attr))


def _compile_value_test(op: str, want: Any) -> Callable[[Any], bool]:
    if op == "exists":
        expected = want is not False
        return lambda v: (v is not None) is expected
    if op in ("equals", "not_equals"):
        negate = op == "not_equals"
        return lambda v: (v == want) is not negate
    if op in ("in", "not_in"):
        members = frozenset(want)
        negate = op == "not_in"

        def member(v: Any) -> bool:
            try:
                return (v in members) is not negate
            except TypeError:  # an unhashable attribute (object, list) is in no list
                return negate

        return member
    if op == "starts_with":
        return lambda v: type(v) is str and v.startswith(want)
    if op == "ends_with":
        return lambda v: type(v) is str and v.endswith(want)
    if op == "contains":
        return lambda v: type(v) is str and want in v
    if op in NUMBER_OPS:
        compare: Callable[[Any, Any], bool] = {
            "lt": lambda a, b: a < b,
            "lte": lambda a, b: a <= b,
            "gt": lambda a, b: a > b,
            "gte": lambda a, b: a >= b,
        }[op]
        return lambda v: _is_number(v) and compare(v, want)
    if op in SEMVER_OPS:
        bound = parse_semver(want)
        by_op: dict[str, Callable[[Any, Any], bool]] = {
            "semver_eq": lambda a, b: a[:4] == b[:4] and a[4] == b[4],
            "semver_lt": lambda a, b: a < b,
            "semver_lte": lambda a, b: a <= b,
            "semver_gt": lambda a, b: a > b,
            "semver_gte": lambda a, b: a >= b,
        }
        semver_compare = by_op[op]

        def semver(v: Any) -> bool:
            if type(v) is not str:
                return False
            parsed = parse_semver(v)  # the context's value is parsed; the rule's was not
            return parsed is not None and semver_compare(parsed, bound)

        return semver
    raise ValueError(f"operator {op!r} has no attribute test")  # unreachable after validation


def _compile_segment(segment: Segment) -> Test:
    include = frozenset(segment.include)
    exclude = frozenset(segment.exclude)
    tests = tuple(_compile_attribute_test(c) for c in segment.conditions)

    def member(unit: str | None, ctx: Context) -> bool:
        if unit is not None:
            if unit in exclude:
                return False
            if unit in include:
                return True
        if not tests:
            return False
        for test in tests:
            if not test(unit, ctx):
                return False
        return True

    return member


def _compile_condition(
    cond: Condition, segments: dict[str, Test], releases: Mapping[str, CompiledRelease]
) -> Test:
    if cond.op in ("in_segment", "not_in_segment"):
        seg = segments[cond.value]
        if cond.op == "in_segment":
            return seg
        return lambda unit, ctx: not seg(unit, ctx)
    if cond.op == "on_canary":
        release = releases[cond.value]

        def on_canary(unit: str | None, ctx: Context) -> bool:
            email = ctx.get("email")
            decision = release.assign(unit, email if type(email) is str else None)
            return decision.arm == "canary"

        return on_canary
    return _compile_attribute_test(cond)


# -- flags -------------------------------------------------------------------------------------


class _Splitter:
    """A weighted split over the flag's salt: cumulative bounds, in list order."""

    __slots__ = ("salt_prefix", "bounds", "results", "missing")

    def __init__(
        self, salt_prefix: str, bounds: list[int], results: list[FlagResult], missing: FlagResult
    ) -> None:
        self.salt_prefix = salt_prefix
        self.bounds = tuple(bounds)
        self.results = tuple(results)
        self.missing = missing

    def pick(self, unit: str | None) -> FlagResult:
        if unit is None:
            return self.missing
        # position_with_prefix inlined (DESIGN.md §2): one call fewer per evaluation.
        pos = (_hash32(self.salt_prefix + unit, 0, False) * POSITION_SPACE) >> 32
        return self.results[bisect_right(self.bounds, pos)]


class CompiledFlag:
    """A flag with every answer prebuilt."""

    __slots__ = (
        "key",
        "flag",
        "salt",
        "cohort",
        "off",
        "off_result",
        "prerequisites",
        "prereq_failed",
        "targets",
        "rules",
        "rollout",
        "default_result",
        "run",
    )

    def __init__(
        self,
        doc: Document,
        key: str,
        flag: Flag,
        segments: dict[str, Test],
        releases: Mapping[str, CompiledRelease],
    ) -> None:
        self.key = key
        self.flag = flag
        if flag.cohort is not None:
            self.salt = doc.cohorts[flag.cohort].salt
            self.cohort = flag.cohort
        else:
            self.salt = flag.salt if flag.salt is not None else key
            self.cohort = ""
        meta: dict[str, bool | int | float | str] = dict(flag.metadata)
        meta["flagVersion"] = doc.version
        if self.cohort:
            meta["cohort"] = self.cohort
        built: dict[tuple[str, str], FlagResult] = {}

        def result(variant: str, reason: str) -> FlagResult:
            hit = built.get((variant, reason))
            if hit is None:
                hit = FlagResult(key, flag.variants[variant], variant, reason, meta)
                built[(variant, reason)] = hit
            return hit

        off_variant = flag.off_variant if flag.off_variant is not None else flag.default
        self.off = doc.flags_killed or flag.killed or not flag.enabled
        self.off_result = (
            FlagResult(key, None, off_variant, REASON_DISABLED, meta, deferred=True)
            if flag.defer_off_value
            else result(off_variant, REASON_DISABLED)
        )
        self.prerequisites = tuple(
            (pre.flag, frozenset(pre.variants)) for pre in flag.prerequisites
        )
        self.prereq_failed = self.off_result
        self.targets = {
            uid: result(variant, REASON_TARGETING_MATCH)
            for variant, ids in flag.targets.items()
            for uid in ids
        }
        missing = FlagResult(
            key,
            None,
            None,
            REASON_ERROR,
            meta,
            ERROR_TARGETING_KEY_MISSING,
            f"flag {key!r} splits by unit: the context needs a targetingKey",
        )
        prefix = self.salt + ":"

        def splitter(field: str, splits: tuple[Split, ...], reason: str) -> _Splitter:
            bounds = split_bounds(field, splits, flag.variants)
            # bisect_right(bounds, pos) is the first slice whose upper bound exceeds pos; a
            # zero-weight slice has an empty range and is never picked.
            return _Splitter(prefix, bounds, [result(s.variant, reason) for s in splits], missing)

        rules: list[tuple[tuple[Test, ...], FlagResult | None, _Splitter | None]] = []
        for i, rule in enumerate(flag.rules):
            tests = tuple(_compile_condition(c, segments, releases) for c in rule.conditions)
            if rule.split is not None:
                rules.append(
                    (tests, None, splitter(f"flags.{key}.rules.{i}", rule.split, REASON_SPLIT))
                )
            else:
                assert rule.variant is not None  # validated: exactly one of variant/split
                rules.append((tests, result(rule.variant, REASON_TARGETING_MATCH), None))
        self.rules = tuple(rules)
        self.rollout = (
            splitter(f"flags.{key}.rollout", flag.rollout, REASON_SPLIT)
            if flag.rollout is not None
            else None
        )
        static = not (flag.rules or flag.targets or flag.prerequisites or flag.rollout)
        self.default_result = result(flag.default, REASON_STATIC if static else REASON_DEFAULT)
        self.run = self._specialise()

    def _specialise(self) -> Callable[[str | None, Context, FlagSet, int], FlagResult]:
        """The evaluation function for this flag's shape: a constant when it is off; for the
        common shape (no prerequisites, no targets, one condition per rule) a closure with
        the rollout's hash inlined; `evaluate` otherwise. Measured by benchmarks/flags.py."""
        if self.off:
            off = self.off_result
            return lambda unit, ctx, flagset, depth: off
        if self.prerequisites or self.targets or any(len(t) != 1 for t, _, _ in self.rules):
            return self.evaluate
        rules = tuple((tests[0], fixed, split) for tests, fixed, split in self.rules)
        default = self.default_result
        rollout = self.rollout
        if rollout is None:

            def run_rules(
                unit: str | None, ctx: Context, flagset: FlagSet, depth: int
            ) -> FlagResult:
                for test, fixed, split in rules:
                    if test(unit, ctx):
                        return fixed if fixed is not None else split.pick(unit)  # type: ignore[union-attr]  # a rule has a variant or a split
                return default

            return run_rules
        prefix, bounds, results, missing = (
            rollout.salt_prefix,
            rollout.bounds,
            rollout.results,
            rollout.missing,
        )

        def run(unit: str | None, ctx: Context, flagset: FlagSet, depth: int) -> FlagResult:
            for test, fixed, split in rules:
                if test(unit, ctx):
                    return fixed if fixed is not None else split.pick(unit)  # type: ignore[union-attr]  # a rule has a variant or a split
            if unit is None:
                return missing
            pos = (_hash32(prefix + unit, 0, False) * POSITION_SPACE) >> 32
            return results[bisect_right(bounds, pos)]

        return run

    def evaluate(self, unit: str | None, ctx: Context, flagset: FlagSet, depth: int) -> FlagResult:
        if self.off:
            return self.off_result
        for pre_key, allowed in self.prerequisites:
            pre = flagset.flags[pre_key]
            if depth >= MAX_PREREQUISITE_DEPTH:
                return self.prereq_failed
            if pre.run(unit, ctx, flagset, depth + 1).variant not in allowed:
                return self.prereq_failed
        if unit is not None and self.targets:
            hit = self.targets.get(unit)
            if hit is not None:
                return hit
        for tests, fixed, split in self.rules:
            for test in tests:
                if not test(unit, ctx):
                    break
            else:
                if fixed is not None:
                    return fixed
                assert split is not None
                return split.pick(unit)
        if self.rollout is not None:
            return self.rollout.pick(unit)
        return self.default_result

    def position(self, unit: str) -> int:
        return position_with_prefix(self.salt + ":", unit)


class FlagSet:
    """Every flag of one document version, compiled."""

    __slots__ = ("flags", "version", "killed", "upstream")

    def __init__(self, flags: dict[str, CompiledFlag], version: int, killed: bool) -> None:
        self.flags = flags
        self.version = version
        self.killed = killed
        # release -> the flags its requests carry upstream (`Flag.upstream`), in key order
        upstream: dict[str, list[CompiledFlag]] = {}
        for key in sorted(flags):
            for release in flags[key].flag.upstream:
                upstream.setdefault(release, []).append(flags[key])
        self.upstream = {release: tuple(found) for release, found in upstream.items()}

    def evaluate(self, key: str, unit: str | None, ctx: Context) -> FlagResult:
        """The answer for one flag; `unit` already normalised (`unit_of`). Never raises."""
        flag = self.flags.get(key)
        if flag is None:
            return not_found(key)
        try:
            return flag.run(unit, ctx, self, 0)
        except Exception as exc:  # noqa: BLE001 - the contract is "never raises"
            return FlagResult(key, None, None, REASON_ERROR, {}, ERROR_GENERAL, str(exc))

    def evaluate_all(
        self, unit: str | None, ctx: Context, keys: Iterable[str] | None = None
    ) -> list[FlagResult]:
        """Bulk evaluation, in document order (or `keys` order)."""
        if keys is None:
            try:
                return [flag.run(unit, ctx, self, 0) for flag in self.flags.values()]
            except Exception:  # noqa: BLE001 - redo one by one so only the bad flag errs
                keys = self.flags
        evaluate = self.evaluate
        return [evaluate(key, unit, ctx) for key in keys]


def not_found(key: str) -> FlagResult:
    return FlagResult(
        key,
        None,
        None,
        REASON_ERROR,
        {},
        ERROR_FLAG_NOT_FOUND,
        f"flag {key!r} is not defined",
    )


def unit_of(ctx: Context) -> str | None:
    """The context's unit id: OFREP's `targetingKey`, normalised like the edge's ids."""
    raw = ctx.get("targetingKey")
    if type(raw) is not str:
        return None
    # The common id (printable ASCII, no edge spaces, short) is already canonical: skip the
    # call (normalize_unit_id gives the same answer for it).
    if (
        raw.isascii()
        and 0 < len(raw) <= MAX_UNIT_ID_BYTES
        and raw.isprintable()
        and raw[0] != " "
        and raw[-1] != " "
    ):
        return raw
    return normalize_unit_id(raw)


def compile_flags(doc: Document, releases: Mapping[str, CompiledRelease]) -> FlagSet:
    """Compile every flag of a validated document (once per applied version)."""
    segments = {name: _compile_segment(seg) for name, seg in doc.segments.items()}
    flags = {
        key: CompiledFlag(doc, key, flag, segments, releases) for key, flag in doc.flags.items()
    }
    return FlagSet(flags, doc.version, doc.flags_killed)


def explain_flag(flagset: FlagSet, key: str, ctx: Context) -> dict[str, Any]:
    """Which rule, position, cohort and variant a context gets, and why (CLI and admin)."""
    compiled = flagset.flags.get(key)
    unit = unit_of(ctx)
    result = flagset.evaluate(key, unit, ctx)
    out: dict[str, Any] = {
        "flag": key,
        "unit_id": unit,
        "variant": result.variant,
        "value": result.value,
        "reason": result.reason,
        "error_code": result.error_code,
        "version": flagset.version,
    }
    if compiled is None:
        out["explanation"] = "no such flag"
        return out
    flag = compiled.flag
    out["cohort"] = compiled.cohort or None
    out["salt"] = compiled.salt
    out["position"] = compiled.position(unit) if unit is not None else None
    why = "default variant: no target, rule or rollout applied"
    if result.reason == REASON_DISABLED:
        if flagset.killed:
            why = "the global flag kill switch is on"
        elif flag.killed:
            why = f"the flag's kill switch is on ({flag.kill_reason or 'no reason given'})"
        elif not flag.enabled:
            why = "the flag is off"
        else:
            why = "a prerequisite is not met"
    elif result.error_code is not None:
        why = result.error_details or result.error_code
    elif unit is not None and unit in compiled.targets and result.reason == REASON_TARGETING_MATCH:
        why = "the unit is an individual target"
    else:
        for i, (tests, _fixed, split) in enumerate(compiled.rules):
            if all(test(unit, ctx) for test in tests):
                name = flag.rules[i].name or f"rules.{i}"
                why = f"rule {name} matched"
                if split is not None:
                    why += f"; position {out['position']} picked {result.variant!r} of the split"
                out["rule"] = i
                break
        else:
            if compiled.rollout is not None and result.reason == REASON_SPLIT:
                why = f"rollout: position {out['position']} falls in {result.variant!r}'s range"
                out["ranges"] = [
                    [s.variant, lo, hi]
                    for s, lo, hi in zip(
                        flag.rollout or (),
                        (0, *compiled.rollout.bounds[:-1]),
                        compiled.rollout.bounds,
                        strict=True,
                    )
                ]
    out["explanation"] = why
    return out
