"""Importing flags from flagd and Unleash into Turnout's document (issue #11, "Migration").

Pure conversion: raw JSON in, Turnout `flags:`/`segments:` sections and a per-flag report of
what could not be mapped out. The caller validates and applies the result like any document
(`turnout import ... [--dry-run]`).

What maps, and what does not (the report names each case it meets):

flagd (flag definitions: `flags.<key>` with `state`, `variants`, `defaultVariant`,
`targeting` as JsonLogic, `metadata`; `$evaluators` referenced with `$ref`):
* `if` chains of conditions -> ordered rules; `and` -> one rule's conditions; `or` -> one rule
  per branch; `==`, `!=`, `in` (list membership and substring), `starts_with`, `ends_with`,
  `<`, `<=`, `>`, `>=`, `sem_ver` (=, <, <=, >, >=) over `{"var": ...}`; `targetingKey` is the
  unit id. `fractional` -> a weighted split with the same weights: the same shares, but not
  the same units (Turnout keeps one bucketing contract, DESIGN.md §2; flagd hashes its own way).
* Not mapped: `!` / `!!`, `sem_ver` `^` and `~`, arithmetic, `var` with a default, variables
  other than context attributes (`$flagd.timestamp`), `fractional` with a custom bucketing
  expression, targeting that returns values rather than variant names.

Unleash (a feature export: `features` + `featureStrategies` [+ `featureEnvironments`,
`segments`], or the client API's `features` with inline `strategies`):
* A feature becomes a boolean flag (variants `on`/`off`, default `off`); each strategy a rule
  serving `on`: `default` (everyone), `flexibleRollout` (its percentage of units by user id
  -> a split; same shares, not the same units), `userWithId` (individual targets).
  Constraints -> conditions: IN, NOT_IN, STR_STARTS_WITH, STR_ENDS_WITH, STR_CONTAINS,
  NUM_EQ/GT/GTE/LT/LTE, SEMVER_EQ/GT/LT; `userId` is the unit id.
* Not mapped: `inverted` and `caseInsensitive` constraints, DATE_* operators, other strategies
  (`remoteAddress`, `applicationHostname`, custom), stickiness other than the user id,
  feature variants, strategies after a partial rollout (Unleash ORs strategies; a Turnout
  split rule answers for every unit it holds).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

UNIT = "targetingKey"


@dataclass
class Converted:
    flags: dict[str, dict[str, Any]] = field(default_factory=dict)
    segments: dict[str, dict[str, Any]] = field(default_factory=dict)
    report: dict[str, list[str]] = field(default_factory=dict)

    def problem(self, key: str, message: str) -> None:
        self.report.setdefault(key, []).append(message)


class Unmappable(Exception):
    """A construct this importer cannot express; the message goes into the report."""


def merge_flags(document: Mapping[str, Any], converted: Converted) -> dict[str, Any]:
    """The document with the imported flags and segments added (same keys replaced)."""
    out = dict(document)
    out.pop("version", None)
    out["flags"] = {**dict(document.get("flags") or {}), **converted.flags}
    out["segments"] = {**dict(document.get("segments") or {}), **converted.segments}
    return out


# -- flagd ---------------------------------------------------------------------------------------

_FLAGD_COMPARE = {"==": "equals", "===": "equals", "!=": "not_equals", "!==": "not_equals"}
_FLAGD_ORDER = {"<": "lt", "<=": "lte", ">": "gt", ">=": "gte"}
_FLAGD_SEMVER = {
    "=": "semver_eq",
    "<": "semver_lt",
    "<=": "semver_lte",
    ">": "semver_gt",
    ">=": "semver_gte",
}


def _flagd_type(values: list[Any]) -> str:
    kinds = set()
    for value in values:
        if isinstance(value, bool):
            kinds.add("boolean")
        elif isinstance(value, (int, float)):
            kinds.add("number")
        elif isinstance(value, str):
            kinds.add("string")
        else:
            kinds.add("object")
    if len(kinds) != 1:
        raise Unmappable(f"variants of mixed types {sorted(kinds)}")
    return kinds.pop()


def _var(node: Any) -> str | None:
    if isinstance(node, Mapping) and set(node) == {"var"}:
        name = node["var"]
        if isinstance(name, list):
            if len(name) != 1:
                raise Unmappable("'var' with a default value")
            name = name[0]
        if not isinstance(name, str) or name.startswith("$flagd"):
            raise Unmappable(f"variable {name!r} is not a context attribute")
        return UNIT if name == "targetingKey" else name
    return None


def _flagd_condition(node: Any, evaluators: Mapping[str, Any]) -> list[list[dict[str, Any]]]:
    """A JsonLogic condition as OR of ANDs of Turnout conditions."""
    if not isinstance(node, Mapping) or len(node) != 1:
        raise Unmappable(f"condition {node!r}")
    if "$ref" in node:
        return _flagd_condition(evaluators[node["$ref"]], evaluators)
    op, args = next(iter(node.items()))
    if not isinstance(args, list):
        args = [args]
    if op == "and":
        result: list[list[dict[str, Any]]] = [[]]
        for arg in args:
            result = [a + b for a in result for b in _flagd_condition(arg, evaluators)]
        return result
    if op == "or":
        return [conj for arg in args for conj in _flagd_condition(arg, evaluators)]
    if op in _FLAGD_COMPARE or op in _FLAGD_ORDER:
        if len(args) != 2:
            raise Unmappable(f"'{op}' with {len(args)} operands")
        left, right = _var(args[0]), _var(args[1])
        if left is None and right is not None:
            if op in _FLAGD_ORDER:  # 5 < var  ==  var > 5
                flipped = {"<": ">", "<=": ">=", ">": "<", ">=": "<="}[op]
                return [[{"attribute": right, "op": _FLAGD_ORDER[flipped], "value": args[0]}]]
            left, args = right, [args[1], args[0]]
        if left is None:
            raise Unmappable(f"'{op}' without a context attribute")
        name = _FLAGD_COMPARE.get(op) or _FLAGD_ORDER[op]
        return [[{"attribute": left, "op": name, "value": args[1]}]]
    if op in ("starts_with", "ends_with"):
        attr = _var(args[0]) if args else None
        if attr is None or len(args) != 2 or not isinstance(args[1], str):
            raise Unmappable(f"'{op}' that is not (attribute, text)")
        return [[{"attribute": attr, "op": op, "value": args[1]}]]
    if op == "in":
        if len(args) != 2:
            raise Unmappable("'in' with other than two operands")
        attr = _var(args[0])
        if attr is not None and isinstance(args[1], list):
            return [[{"attribute": attr, "op": "in", "value": args[1]}]]
        attr = _var(args[1])
        if attr is not None and isinstance(args[0], str):
            return [[{"attribute": attr, "op": "contains", "value": args[0]}]]
        raise Unmappable("'in' that is neither list membership nor substring")
    if op == "sem_ver":
        attr = _var(args[0]) if args else None
        if attr is None or len(args) != 3 or args[1] not in _FLAGD_SEMVER:
            raise Unmappable(f"sem_ver {args[1:2]} (only =, <, <=, >, >=)")
        return [[{"attribute": attr, "op": _FLAGD_SEMVER[args[1]], "value": args[2]}]]
    raise Unmappable(f"operator {op!r}")


def _fractional(args: Any, key: str, variants: Mapping[str, Any]) -> list[dict[str, Any]]:
    if not isinstance(args, list) or not args:
        raise Unmappable("'fractional' without buckets")
    if not isinstance(args[0], list):
        raise Unmappable("'fractional' with a custom bucketing expression")
    total = sum(b[1] if len(b) > 1 else 1 for b in args)
    splits = []
    for bucket in args:
        name = bucket[0]
        if name not in variants:
            raise Unmappable(f"'fractional' bucket {name!r} is not a variant")
        weight = bucket[1] if len(bucket) > 1 else 1
        splits.append({"variant": name, "weight": round(weight * 100 / total, 3)})
    drift = round(100 - sum(s["weight"] for s in splits), 3)
    splits[-1]["weight"] = round(splits[-1]["weight"] + drift, 3)
    return splits


def _flagd_targeting(
    key: str, node: Any, variants: Mapping[str, Any], evaluators: Mapping[str, Any]
) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
    """(rules, rollout) for a targeting expression."""
    if not node:
        return [], None
    if isinstance(node, Mapping) and "fractional" in node:
        return [], _fractional(node["fractional"], key, variants)
    if not isinstance(node, Mapping) or "if" not in node:
        raise Unmappable("targeting that is not an 'if' chain or 'fractional'")
    args = node["if"]
    rules: list[dict[str, Any]] = []
    rollout = None
    i = 0
    while i + 1 < len(args):
        outcome = args[i + 1]
        for conj in _flagd_condition(args[i], evaluators):
            rules.append({"conditions": conj, **_flagd_outcome(key, outcome, variants)})
        i += 2
    if i < len(args):  # the else branch
        tail = args[i]
        if isinstance(tail, Mapping) and "if" in tail:
            more, rollout = _flagd_targeting(key, tail, variants, evaluators)
            rules += more
        elif isinstance(tail, Mapping) and "fractional" in tail:
            rollout = _fractional(tail["fractional"], key, variants)
        elif tail is not None:
            rules.append({"conditions": [], **_flagd_outcome(key, tail, variants)})
    return rules, rollout


def _flagd_outcome(key: str, outcome: Any, variants: Mapping[str, Any]) -> dict[str, Any]:
    if isinstance(outcome, str) and outcome in variants:
        return {"variant": outcome}
    if isinstance(outcome, Mapping) and "fractional" in outcome:
        return {"split": _fractional(outcome["fractional"], key, variants)}
    raise Unmappable(f"targeting result {outcome!r} is not a variant name")


def from_flagd(raw: Mapping[str, Any]) -> Converted:
    """flagd flag definitions -> Turnout flags (unmappable flags are left out, reported)."""
    out = Converted()
    evaluators = raw.get("$evaluators") or {}
    for key, spec in (raw.get("flags") or {}).items():
        try:
            variants = dict(spec["variants"])
            flag: dict[str, Any] = {
                "type": _flagd_type(list(variants.values())),
                "variants": variants,
                "default": spec["defaultVariant"],
            }
            if spec.get("state", "ENABLED") == "DISABLED":
                flag["enabled"] = False
            metadata = {
                k: v
                for k, v in (spec.get("metadata") or {}).items()
                if isinstance(v, (str, int, float, bool))
            }
            if metadata:
                flag["metadata"] = metadata
            rules, rollout = _flagd_targeting(key, spec.get("targeting"), variants, evaluators)
            if rules:
                flag["rules"] = rules
            if rollout is not None:
                flag["rollout"] = rollout
                out.problem(key, "fractional: same weights, but units bucket differently")
            for rule in rules:
                if "split" in rule:
                    out.problem(key, "fractional: same weights, but units bucket differently")
            out.flags[key] = flag
        except (Unmappable, KeyError, TypeError) as exc:
            out.problem(key, f"flag left out: {exc}")
    return out


# -- Unleash -------------------------------------------------------------------------------------

_UNLEASH_OPS = {
    "IN": "in",
    "NOT_IN": "not_in",
    "STR_STARTS_WITH": "starts_with",
    "STR_ENDS_WITH": "ends_with",
    "STR_CONTAINS": "contains",
    "NUM_EQ": "equals",
    "NUM_GT": "gt",
    "NUM_GTE": "gte",
    "NUM_LT": "lt",
    "NUM_LTE": "lte",
    "SEMVER_EQ": "semver_eq",
    "SEMVER_GT": "semver_gt",
    "SEMVER_LT": "semver_lt",
}


def _unleash_condition(con: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One constraint as one or more Turnout conditions (string ops take any of the values)."""
    if con.get("inverted"):
        raise Unmappable("inverted constraint")
    if con.get("caseInsensitive"):
        raise Unmappable("case-insensitive constraint")
    op = _UNLEASH_OPS.get(con.get("operator", ""))
    if op is None:
        raise Unmappable(f"constraint operator {con.get('operator')!r}")
    name = con["contextName"]
    attr = UNIT if name == "userId" else name
    values = list(con.get("values") or [])
    if con.get("value") is not None:
        values.append(con["value"])
    if op in ("in", "not_in"):
        return [{"attribute": attr, "op": op, "value": values}]
    if op in ("equals", "gt", "gte", "lt", "lte"):
        try:
            number = float(values[0])
        except (ValueError, IndexError):
            raise Unmappable(f"numeric constraint without a number: {values!r}") from None
        return [
            {"attribute": attr, "op": op, "value": int(number) if number.is_integer() else number}
        ]
    if len(values) != 1:
        raise Unmappable(f"{con['operator']} with {len(values)} values (one is mapped)")
    return [{"attribute": attr, "op": op, "value": values[0]}]


def _unleash_features(raw: Mapping[str, Any], environment: str | None) -> list[dict[str, Any]]:
    """Both shapes as client-API features (inline strategies, `enabled`)."""
    features = list(raw.get("features") or [])
    if "featureStrategies" not in raw:
        return features
    strategies = list(raw.get("featureStrategies") or [])
    envs = [s.get("environment") for s in strategies if s.get("environment")]
    env = environment or (envs[0] if envs else None)
    enabled: dict[str, bool] = {}
    for fe in raw.get("featureEnvironments") or []:
        if fe.get("environment") == env:
            enabled[fe["featureName"]] = bool(fe.get("enabled"))
    out = []
    for feature in features:
        name = feature["name"]
        out.append(
            {
                **feature,
                "enabled": enabled.get(name, feature.get("enabled", True)),
                "strategies": sorted(
                    (
                        s
                        for s in strategies
                        if s.get("featureName") == name and s.get("environment", env) == env
                    ),
                    key=lambda s: s.get("sortOrder", 0),
                ),
            }
        )
    return out


def from_unleash(raw: Mapping[str, Any], environment: str | None = None) -> Converted:
    """An Unleash feature export -> Turnout boolean flags."""
    out = Converted()
    segment_defs = {s.get("id"): s for s in raw.get("segments") or [] if isinstance(s, Mapping)}
    for feature in _unleash_features(raw, environment):
        key = feature["name"]
        try:
            if feature.get("variants"):
                out.problem(key, "feature variants are not mapped (the flag is on/off)")
            flag: dict[str, Any] = {
                "type": "boolean",
                "variants": {"on": True, "off": False},
                "default": "off",
                "enabled": bool(feature.get("enabled", True)),
            }
            if feature.get("description"):
                flag["description"] = str(feature["description"])[:500]
            rules: list[dict[str, Any]] = []
            targets: list[str] = []
            partial_seen = False
            for strategy in feature.get("strategies") or []:
                if partial_seen:
                    out.problem(key, "strategies after a partial rollout are not consulted")
                    break
                conditions: list[dict[str, Any]] = []
                for con in strategy.get("constraints") or []:
                    conditions += _unleash_condition(con)
                for seg_id in strategy.get("segments") or []:
                    seg = segment_defs.get(seg_id)
                    if seg is None:
                        raise Unmappable(f"unknown segment {seg_id!r}")
                    for con in seg.get("constraints") or []:
                        conditions += _unleash_condition(con)
                name = strategy.get("name")
                params = strategy.get("parameters") or {}
                if name == "default":
                    rules.append({"conditions": conditions, "variant": "on"})
                elif name == "userWithId":
                    ids = [u.strip() for u in str(params.get("userIds", "")).split(",")]
                    if conditions:
                        rules.append(
                            {
                                "conditions": [
                                    *conditions,
                                    {"attribute": UNIT, "op": "in", "value": ids},
                                ],
                                "variant": "on",
                            }
                        )
                    else:
                        targets += [u for u in ids if u and u not in targets]
                elif name in ("flexibleRollout", "gradualRolloutUserId"):
                    stickiness = params.get("stickiness", "default")
                    if stickiness not in ("default", "userId"):
                        raise Unmappable(f"stickiness {stickiness!r} (only the user id)")
                    percent = float(params.get("rollout", params.get("percentage", 100)))
                    if percent >= 100:
                        rules.append({"conditions": conditions, "variant": "on"})
                    elif percent > 0:
                        split = [
                            {"variant": "on", "weight": percent},
                            {"variant": "off", "weight": round(100 - percent, 3)},
                        ]
                        rules.append({"conditions": conditions, "split": split})
                        out.problem(key, "rollout: same percentage, but units bucket differently")
                        partial_seen = True
                else:
                    raise Unmappable(f"strategy {name!r}")
            if not feature.get("strategies"):
                rules.append({"conditions": [], "variant": "on"})  # no strategy: on for all
            if rules:
                flag["rules"] = rules
            if targets:
                flag["targets"] = {"on": targets}
            out.flags[key] = flag
        except (Unmappable, KeyError, TypeError, ValueError) as exc:
            out.problem(key, f"flag left out: {exc}")
    return out
