"""Pure edits of a document's flags: each returns a new, fully validated document and a summary.

The admin API (admin/flags.py), the CLI (turnout/cli_flags.py) and the importers change flags
only through these functions, so "what a percentage means" is written once: the named
variant gets the first `percent` of the position space (DESIGN.md §2, cumulative in list
order), so raising the percentage only ever adds units, as for a release.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from flags.document import Document, _check_percent, check_document, load_model
from flags.errors import ConfigError
from flags.flagmodel import ApiKey, Flag, Rule, Split

MAX_TARGET_CHANGE = 1000


def _with_flags(doc: Document, flags: dict[str, Flag], **extra: Any) -> Document:
    new = doc.model_copy(update={"flags": flags, **extra})
    check_document(new)
    return new


def _flag(doc: Document, key: str) -> Flag:
    try:
        return doc.flags[key]
    except KeyError:
        raise ConfigError("flag", f"unknown flag {key!r}") from None


def _replace(doc: Document, key: str, **update: Any) -> Document:
    flags = dict(doc.flags)
    flags[key] = _flag(doc, key).model_copy(update=update)
    return _with_flags(doc, flags)


def put_flag(doc: Document, key: str, raw: Any) -> tuple[Document, str]:
    """Create or replace a flag from its JSON form."""
    flag = load_model(Flag, raw, prefix=f"flags.{key}")
    existed = key in doc.flags
    flags = dict(doc.flags)
    flags[key] = flag
    return _with_flags(doc, flags), f"{key}: flag {'replaced' if existed else 'created'}"


def delete_flag(doc: Document, key: str) -> tuple[Document, str]:
    """Remove a flag; refused (naming the field) while a prerequisite or an API key uses it."""
    _flag(doc, key)
    flags = {k: v for k, v in doc.flags.items() if k != key}
    for other, flag in flags.items():
        for i, pre in enumerate(flag.prerequisites):
            if pre.flag == key:
                raise ConfigError(f"flags.{other}.prerequisites.{i}.flag", f"still uses {key!r}")
    return _with_flags(doc, flags), f"{key}: flag deleted"


def set_enabled(doc: Document, key: str, enabled: bool) -> tuple[Document, str]:
    if not isinstance(enabled, bool):
        raise ConfigError("enabled", "must be true or false")
    return _replace(doc, key, enabled=enabled), f"{key}: {'on' if enabled else 'off'}"


def set_killed(doc: Document, key: str, killed: bool, reason: str = "") -> tuple[Document, str]:
    """The flag's kill switch: its off variant for everyone, over every rule and target."""
    if not isinstance(killed, bool):
        raise ConfigError("killed", "must be true or false")
    if not isinstance(reason, str) or len(reason) > 500:
        raise ConfigError("reason", "a string of at most 500 characters")
    if killed and not reason.strip():
        raise ConfigError("reason", "a kill needs a reason")
    new = _replace(doc, key, killed=killed, kill_reason=reason.strip() if killed else "")
    return new, f"{key}: {'killed (' + reason.strip() + ')' if killed else 'kill switch off'}"


def set_global_kill(doc: Document, killed: bool) -> tuple[Document, str]:
    """The global flag kill switch: every flag serves its off variant."""
    if not isinstance(killed, bool):
        raise ConfigError("killed", "must be true or false")
    new = doc.model_copy(update={"flags_killed": killed})
    check_document(new)
    return new, f"all flags: global kill switch {'on' if killed else 'off'}"


def set_percent(
    doc: Document, key: str, percent: Any, variant: str | None = None, rest: str | None = None
) -> tuple[Document, str]:
    """Roll `variant` (boolean flags: the one whose value is true) out to `percent` % of
    units; everyone else in the rollout gets `rest` (default: the flag's default)."""
    flag = _flag(doc, key)
    if isinstance(percent, bool) or not isinstance(percent, (int, float)):
        raise ConfigError("percent", "must be a number")
    _check_percent("percent", float(percent))
    if variant is None:
        on = [name for name, value in flag.variants.items() if value is True]
        if flag.type != "boolean" or len(on) != 1:
            raise ConfigError("variant", "name the variant to roll out")
        variant = on[0]
    if rest is None:
        rest = flag.default if flag.default != variant else None
        if rest is None:
            others = [name for name in flag.variants if name != variant]
            if not others:
                raise ConfigError("rest", "the flag has no other variant")
            rest = others[0]
    if variant not in flag.variants:
        raise ConfigError("variant", f"unknown variant {variant!r}")
    if rest not in flag.variants or rest == variant:
        raise ConfigError("rest", f"must be another variant of the flag, got {rest!r}")
    splits = (
        Split(variant=variant, weight=float(percent)),
        Split(variant=rest, weight=round(100.0 - float(percent), 3)),
    )
    new = _replace(doc, key, rollout=splits)
    return new, f"{key}: {variant} at {float(percent):g} % (rest {rest})"


def set_weights(doc: Document, key: str, weights: Any) -> tuple[Document, str]:
    """Variant weights, in the order given (the order is the position ranges' order)."""
    _flag(doc, key)
    if not isinstance(weights, Mapping) or not weights:
        raise ConfigError("weights", "an object of variant -> percent")
    splits = []
    for name, weight in weights.items():
        if isinstance(weight, bool) or not isinstance(weight, (int, float)):
            raise ConfigError(f"weights.{name}", "must be a number")
        splits.append(Split(variant=str(name), weight=float(weight)))
    new = _replace(doc, key, rollout=tuple(splits))
    text = ", ".join(f"{s.variant} {s.weight:g} %" for s in splits)
    return new, f"{key}: weights {text}"


def add_rule(doc: Document, key: str, raw: Any, index: Any = None) -> tuple[Document, str]:
    """Insert a targeting rule (at `index`, default last)."""
    flag = _flag(doc, key)
    rule = load_model(Rule, raw, prefix="rule")
    rules = list(flag.rules)
    if index is None:
        index = len(rules)
    if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index <= len(rules):
        raise ConfigError("index", f"must be an integer from 0 to {len(rules)}")
    rules.insert(index, rule)
    return _replace(doc, key, rules=tuple(rules)), f"{key}: rule added at {index}"


def remove_rule(doc: Document, key: str, index: Any) -> tuple[Document, str]:
    flag = _flag(doc, key)
    if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < len(flag.rules):
        raise ConfigError("index", f"no rule {index!r}")
    rules = [r for i, r in enumerate(flag.rules) if i != index]
    return _replace(doc, key, rules=tuple(rules)), f"{key}: rule {index} removed"


def set_targets(
    doc: Document, key: str, variant: str | None, unit_ids: Any
) -> tuple[Document, str]:
    """Individual targets: these units get `variant` (None: these units are untargeted)."""
    flag = _flag(doc, key)
    if (
        not isinstance(unit_ids, list)
        or not unit_ids
        or len(unit_ids) > MAX_TARGET_CHANGE
        or not all(isinstance(u, str) for u in unit_ids)
    ):
        raise ConfigError("unit_ids", f"a list of 1-{MAX_TARGET_CHANGE} unit id strings")
    if variant is not None and variant not in flag.variants:
        raise ConfigError("variant", f"unknown variant {variant!r}")
    moving = set(unit_ids)
    targets = {name: tuple(u for u in ids if u not in moving) for name, ids in flag.targets.items()}
    if variant is not None:
        targets[variant] = (*targets.get(variant, ()), *dict.fromkeys(unit_ids))
    targets = {name: ids for name, ids in targets.items() if ids}
    new = _replace(doc, key, targets=targets)
    where = f"variant {variant}" if variant is not None else "no individual target"
    return new, f"{key}: {len(moving)} unit(s) -> {where}"


def put_api_key(
    doc: Document,
    name: str,
    sha256: str,
    *,
    flags: Any = None,
    rate_per_s: Any = None,
    burst: Any = None,
    exposures: Any = False,
    description: Any = "",
) -> tuple[Document, str]:
    """Create or replace an application's OFREP key (only its hash is stored)."""
    api_key = load_model(
        ApiKey,
        {
            "sha256": sha256,
            "flags": flags,
            "rate_per_s": rate_per_s,
            "burst": burst,
            "exposures": exposures,
            "description": description,
        },
        prefix=f"api_keys.{name}",
    )
    keys = dict(doc.api_keys)
    existed = name in keys
    keys[name] = api_key
    new = doc.model_copy(update={"api_keys": keys})
    check_document(new)
    return new, f"api key {name}: {'replaced' if existed else 'created'}"


def revoke_api_key(doc: Document, name: str) -> tuple[Document, str]:
    """Revoke a key: every request with it is 401 from the next applied version."""
    if name not in doc.api_keys:
        raise ConfigError("api_key", f"unknown API key {name!r}")
    keys = dict(doc.api_keys)
    keys[name] = keys[name].model_copy(update={"revoked": True})
    new = doc.model_copy(update={"api_keys": keys})
    check_document(new)
    return new, f"api key {name}: revoked"
