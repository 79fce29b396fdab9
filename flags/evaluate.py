"""Routing decisions over an immutable, precompiled snapshot of a document.

The decision API is two steps, the same for the edge, the admin API and the tests:

    release = snapshot.match(host, path)        # which release serves this request, or None
    decision = release.assign(unit_id, email)   # which arm this unit gets there, and why

`match` comes first because the edge answers 404 (and sets no cookie) for an unrouted request
before it looks for the unit.

Rules of this file:
* `compile_snapshot` does all the work that does not depend on the request (thresholds as
  integers, salts with their ':' appended, route tables by prefix length), so a decision is a
  few dict lookups and one MurmurHash3.
* Inputs are canonical: `host` lower case without port, `unit_id` normalised by
  `flags.hashing.normalize_unit_id` (the edge does both once per request). For such inputs
  neither step can raise.
* Route precedence: routes of the request's exact host first, then `*` routes; within
  either, the longest matching path prefix wins (plain string prefix, as nginx and Envoy).
* Anonymous requests: the edge never buckets a request on a fresh random number (DESIGN.md
  §2). A request without a usable unit id is given one first (a random id in a signed
  cookie, `edge/identity.py`) and is then bucketed like anyone else; `assign(None)` is only
  reached when no id could be had at all, and gives stable.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from flags.document import STAGE_OFF, Document, Release, effective_percent
from flags.flageval import CompiledFlag, FlagSet, compile_flags
from flags.hashing import POSITION_SPACE, normalize_unit_id, position_with_prefix, threshold
from flags.rollout import Maintenance

ARM_STABLE: Final = "stable"
ARM_CANARY: Final = "canary"

# OpenFeature reason vocabulary (DESIGN.md §6).
REASON_DISABLED: Final = "DISABLED"  # stage off or rolled back: everyone on stable
REASON_TARGETING_MATCH: Final = "TARGETING_MATCH"  # internal allow-list
REASON_SPLIT: Final = "SPLIT"  # by hash position against the percentage
REASON_DEFAULT: Final = "DEFAULT"  # no route matched
REASON_ERROR: Final = "ERROR"


class Decision:
    """Which arm a unit goes to, and why."""

    __slots__ = ("arm", "release", "cohort", "position", "reason")

    def __init__(
        self, arm: str, release: str | None, cohort: str, position: int, reason: str
    ) -> None:
        self.arm = arm
        self.release = release
        self.cohort = cohort
        self.position = position
        self.reason = reason

    def __repr__(self) -> str:
        return (
            f"Decision(arm={self.arm!r}, release={self.release!r}, cohort={self.cohort!r}, "
            f"position={self.position}, reason={self.reason!r})"
        )

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Decision):
            return NotImplemented
        return (self.arm, self.release, self.cohort, self.position, self.reason) == (
            other.arm,
            other.release,
            other.cohort,
            other.position,
            other.reason,
        )

    __hash__ = None  # type: ignore[assignment]  # mutable-looking value object; not a key


class CompiledRelease:
    """A release with everything the request path needs precomputed."""

    __slots__ = (
        "name",
        "release",
        "salt",
        "salt_prefix",
        "cohort",
        "percent",
        "threshold",
        "disabled",
        "internal_ids",
        "internal_domains",
        "stable",
        "canary",
        "maintenance",
        "upstream_flags",
        "route_key",
    )

    def __init__(self, doc: Document, name: str, rel: Release) -> None:
        self.name = name
        # The flags proxied requests carry upstream (edge/flagheader.py), in key order: set by
        # compile_snapshot per route (the route's `flags:` and the flags naming the release).
        self.upstream_flags: tuple[CompiledFlag, ...] = ()
        # "host path_prefix" of the route this object serves (`route` rate-limit keys); the
        # release's name until compile_snapshot gives a route its own.
        self.route_key = name
        self.release = rel
        if rel.cohort is not None:
            self.salt = doc.cohorts[rel.cohort].salt
            self.cohort = rel.cohort
        else:
            self.salt = rel.salt if rel.salt is not None else name
            self.cohort = ""
        self.salt_prefix = self.salt + ":"
        self.disabled = rel.stage == STAGE_OFF
        self.percent = 0.0 if self.disabled else effective_percent(doc, rel)
        self.threshold = threshold(self.percent)
        self.internal_ids = frozenset(rel.internal.unit_ids)
        self.internal_domains = frozenset(d.lower() for d in rel.internal.email_domains)
        self.stable = rel.stable
        self.canary = rel.canary
        # Maintenance (issue #10): the release's own switch, else the document-wide one.
        if rel.maintenance is not None and rel.maintenance.enabled:
            self.maintenance: Maintenance | None = rel.maintenance
        elif doc.maintenance is not None and doc.maintenance.enabled:
            self.maintenance = doc.maintenance
        else:
            self.maintenance = None

    def is_internal(self, unit_id: str | None, email: str | None) -> bool:
        if unit_id is not None and unit_id in self.internal_ids:
            return True
        if email and self.internal_domains:
            _, at, domain = email.rpartition("@")
            return bool(at) and domain.strip().lower() in self.internal_domains
        return False

    def assign(self, unit_id: str | None, email: str | None = None) -> Decision:
        """The decision for one unit. `unit_id` must already be normalised."""
        if self.disabled:
            pos = position_with_prefix(self.salt_prefix, unit_id) if unit_id is not None else -1
            return Decision(ARM_STABLE, self.name, self.cohort, pos, REASON_DISABLED)
        if (self.internal_ids or self.internal_domains) and self.is_internal(unit_id, email):
            pos = position_with_prefix(self.salt_prefix, unit_id) if unit_id is not None else -1
            return Decision(ARM_CANARY, self.name, self.cohort, pos, REASON_TARGETING_MATCH)
        if unit_id is None:
            # No id at all (the edge assigns a signed cookie id before this; see the module
            # docstring): never bucket on a fresh random number (DESIGN.md §2), so stable.
            return Decision(ARM_STABLE, self.name, self.cohort, -1, REASON_DEFAULT)
        pos = position_with_prefix(self.salt_prefix, unit_id)
        arm = ARM_CANARY if pos < self.threshold else ARM_STABLE
        return Decision(arm, self.name, self.cohort, pos, REASON_SPLIT)


@dataclass(frozen=True, slots=True)
class _RouteTable:
    lengths: tuple[int, ...]  # distinct prefix lengths, longest first
    by_prefix: dict[str, CompiledRelease]

    def match(self, path: str) -> CompiledRelease | None:
        by_prefix = self.by_prefix
        for n in self.lengths:
            hit = by_prefix.get(path[:n])
            if hit is not None:
                return hit
        return None


def _table(entries: dict[str, CompiledRelease]) -> _RouteTable:
    lengths = tuple(sorted({len(p) for p in entries}, reverse=True))
    return _RouteTable(lengths, dict(entries))


@dataclass(frozen=True, slots=True)
class Snapshot:
    """One immutable, compiled document. The edge swaps the whole object on change."""

    document: Document
    releases: dict[str, CompiledRelease]
    hosts: dict[str, _RouteTable]
    wildcard: _RouteTable | None
    stale: bool = False
    source: str = "store"
    flags: FlagSet | None = None  # compiled feature flags (flags/flageval.py, issue #11)

    @property
    def version(self) -> int:
        return self.document.version

    def match(self, host: str, path: str) -> CompiledRelease | None:
        """The release serving host + path, or None. `host` lower case without port."""
        table = self.hosts.get(host)
        if table is not None:
            hit = table.match(path)
            if hit is not None:
                return hit
        wildcard = self.wildcard
        return wildcard.match(path) if wildcard is not None else None


def compile_snapshot(doc: Document, *, stale: bool = False, source: str = "store") -> Snapshot:
    """Precompile a validated document for the request path."""
    releases = {name: CompiledRelease(doc, name, rel) for name, rel in doc.releases.items()}
    flagset = compile_flags(doc, releases)
    for name, compiled in releases.items():
        compiled.upstream_flags = flagset.upstream.get(name, ())
    per_host: dict[str, dict[str, CompiledRelease]] = {}
    for route in doc.routes:
        # Each route gets its own copy of its release (the same decisions), so the request
        # path reads what is the route's own (its upstream flags, its key for `route` rate
        # limits) from the object it matched, with no lookup.
        served = CompiledRelease(doc, route.release, doc.releases[route.release])
        served.route_key = f"{route.host} {route.path_prefix}"
        wanted = {flag.key: flag for flag in releases[route.release].upstream_flags}
        wanted.update((key, flagset.flags[key]) for key in route.flags)
        served.upstream_flags = tuple(wanted[key] for key in sorted(wanted))
        per_host.setdefault(route.host, {})[route.path_prefix] = served
    wildcard = per_host.pop("*", None)
    return Snapshot(
        document=doc,
        releases=releases,
        hosts={host: _table(entries) for host, entries in per_host.items()},
        wildcard=_table(wildcard) if wildcard else None,
        stale=stale,
        source=source,
        flags=flagset,
    )


EMPTY_SNAPSHOT = compile_snapshot(Document())


def explain(
    snapshot: Snapshot, release: str, unit_id: str, email: str | None = None
) -> dict[str, object]:
    """Why a unit gets the arm it gets, for the admin API and the CLI."""
    rel = snapshot.releases[release]
    unit = normalize_unit_id(unit_id)
    decision = rel.assign(unit, email)
    doc_rel = rel.release
    if decision.reason == REASON_DISABLED:
        if doc_rel.rollback is not None:
            why = f"release rolled back ({doc_rel.rollback.reason}); everyone goes to stable"
        else:
            why = "stage is off; everyone goes to stable"
    elif decision.reason == REASON_TARGETING_MATCH:
        if unit in rel.internal_ids:
            why = "unit is on the internal allow-list; internal users always get the canary"
        else:
            domain = (email or "").rpartition("@")[2].strip().lower()
            why = (
                f"e-mail domain {domain} is an internal domain; "
                "internal users always get the canary"
            )
    elif decision.reason == REASON_SPLIT:
        cmp = "<" if decision.arm == ARM_CANARY else ">="
        why = (
            f"position {decision.position} {cmp} threshold {rel.threshold} "
            f"({rel.percent:g} % of {POSITION_SPACE})"
        )
    else:
        why = "no usable unit id; units without an id go to stable"
    return {
        "release": release,
        "unit_id": unit,
        "arm": decision.arm,
        "position": decision.position,
        "percent": rel.percent,
        "threshold": rel.threshold,
        "stage": doc_rel.stage,
        "salt": rel.salt,
        "cohort": rel.cohort or None,
        "reason": decision.reason,
        "explanation": why,
        "version": snapshot.version,
        # The guard's figures when it rolled the release back by itself (issue #10).
        "rollback": doc_rel.rollback.model_dump(mode="json") if doc_rel.rollback else None,
    }
