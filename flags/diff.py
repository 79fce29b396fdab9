"""What a change to the document does, per stage, release and route (`turnout diff`,
`turnout apply --dry-run`, and the summary of a replaced document).

Rules of this file:
* Pure: two documents in, a list of `Change` out, each with one line of text.
* For a release whose canary share moves, `share` is the fraction of its units that change
  arm. With the same salt it is exact by the bucketing contract (DESIGN.md §2): the canary is
  the positions below `round(p * 1000)`, so moving from p to q moves exactly the positions
  between the two thresholds, |q - p| %. With a new salt every unit is placed again and the
  share is the expectation for independent placements, p(1-q) + q(1-p), marked "about".
  The internal allow-list is not in the share: it is named when it changes arm.
"""

from __future__ import annotations

from dataclasses import dataclass

from flags.document import Document, Release, effective_percent
from flags.hashing import POSITION_SPACE, threshold

KIND_STAGES = "stages"
KIND_COHORT = "cohort"
KIND_RELEASE = "release"
KIND_ROUTE = "route"


@dataclass(frozen=True, slots=True)
class Change:
    """One difference: what it is about, its one-line text, and for a canary share that
    moves, the fraction of the release's units (0..1) that change arm."""

    kind: str
    name: str
    text: str
    share: float | None = None
    exact: bool = True

    def to_dict(self) -> dict[str, object]:
        return {
            "kind": self.kind,
            "name": self.name,
            "text": self.text,
            "share": self.share,
            "exact": self.exact,
        }


def _salt(doc: Document, name: str, release: Release) -> str:
    if release.cohort is not None and release.cohort in doc.cohorts:
        return doc.cohorts[release.cohort].salt
    return release.salt if release.salt is not None else name


def _stage_text(doc: Document, release: Release) -> str:
    percent = effective_percent(doc, release)
    if release.stage == "custom":
        return f"{percent:g} %"
    return f"{release.stage} ({percent:g} %)"


def _served_percent(doc: Document, release: Release) -> float:
    return 0.0 if release.stage == "off" else effective_percent(doc, release)


def _internal_text(release: Release) -> str:
    parts = []
    if release.internal.unit_ids:
        parts.append(f"{len(release.internal.unit_ids)} internal unit ids")
    if release.internal.email_domains:
        parts.append(f"{len(release.internal.email_domains)} internal e-mail domains")
    return " and ".join(parts)


def share_text(share: float, exact: bool) -> str:
    amount = f"{share * 100:.3f}".rstrip("0").rstrip(".")
    how = (
        "exact, by the bucketing contract"
        if exact
        else "about: the salt changed, so every unit is placed again"
    )
    return f"{amount} % of its units change arm ({how})"


def _release_change(old_doc: Document, new_doc: Document, name: str) -> list[Change]:
    old, new = old_doc.releases[name], new_doc.releases[name]
    changes: list[Change] = []
    p_old, p_new = _served_percent(old_doc, old), _served_percent(new_doc, new)
    same_salt = _salt(old_doc, name, old) == _salt(new_doc, name, new)
    stage_moved = _stage_text(old_doc, old) != _stage_text(new_doc, new) or old.stage != new.stage
    if stage_moved or p_old != p_new or not same_salt:
        if same_salt:
            moved = abs(threshold(p_new) - threshold(p_old))
            share, exact = moved / POSITION_SPACE, True
        else:
            a, b = p_old / 100, p_new / 100
            share, exact = a * (1 - b) + b * (1 - a), False
        text = f"release {name}: stage {_stage_text(old_doc, old)} -> {_stage_text(new_doc, new)}"
        if not same_salt:
            text += " and a new salt"
        if share > 0:
            direction = "stable -> canary" if p_new > p_old else "canary -> stable"
            if not exact:
                direction = "both ways"
            text += f"; {share_text(share, exact)}, {direction}"
        else:
            text += "; no unit changes arm"
        internal = _internal_text(new if new.stage != "off" else old)
        if internal and (old.stage == "off") != (new.stage == "off"):
            text += f"; plus the {internal} ({'to canary' if old.stage == 'off' else 'to stable'})"
        changes.append(Change(KIND_RELEASE, name, text, share, exact))
    for arm in ("stable", "canary"):
        before, after = getattr(old, arm), getattr(new, arm)
        if before != after:
            changes.append(
                Change(
                    KIND_RELEASE,
                    name,
                    f"release {name}: {arm} backends {', '.join(before)} -> {', '.join(after)}",
                )
            )
    if old.internal != new.internal:
        changes.append(
            Change(
                KIND_RELEASE,
                name,
                f"release {name}: internal allow-list changed "
                f"({_internal_text(old) or 'empty'} -> {_internal_text(new) or 'empty'})",
            )
        )
    if old.description != new.description:
        changes.append(Change(KIND_RELEASE, name, f"release {name}: description changed"))
    return changes


def _route_key(host: str, path_prefix: str) -> str:
    return f"{host}{path_prefix}"


def diff_documents(old: Document, new: Document) -> list[Change]:
    """Every difference between two documents that changes what is served, in the order
    stages, cohorts, releases, routes."""
    changes: list[Change] = []
    for stage in sorted(set(old.stages) | set(new.stages)):
        before, after = old.stages.get(stage), new.stages.get(stage)
        if before != after:
            text = (
                f"stage {stage} added ({after:g} %)"
                if before is None
                else f"stage {stage} removed (was {before:g} %)"
                if after is None
                else f"stage {stage}: {before:g} % -> {after:g} %"
            )
            changes.append(Change(KIND_STAGES, stage, text))
    for cohort in sorted(set(old.cohorts) | set(new.cohorts)):
        before_c, after_c = old.cohorts.get(cohort), new.cohorts.get(cohort)
        if before_c is None:
            changes.append(Change(KIND_COHORT, cohort, f"cohort {cohort} added"))
        elif after_c is None:
            changes.append(Change(KIND_COHORT, cohort, f"cohort {cohort} removed"))
        elif before_c.salt != after_c.salt:
            changes.append(Change(KIND_COHORT, cohort, f"cohort {cohort}: new salt"))
    for name in sorted(set(old.releases) | set(new.releases)):
        if name not in old.releases:
            rel = new.releases[name]
            changes.append(
                Change(KIND_RELEASE, name, f"release {name} added at stage {_stage_text(new, rel)}")
            )
        elif name not in new.releases:
            rel = old.releases[name]
            changes.append(
                Change(
                    KIND_RELEASE,
                    name,
                    f"release {name} removed (was at stage {_stage_text(old, rel)})",
                )
            )
        else:
            changes.extend(_release_change(old, new, name))
    old_routes = {_route_key(r.host, r.path_prefix): r.release for r in old.routes}
    new_routes = {_route_key(r.host, r.path_prefix): r.release for r in new.routes}
    for key in sorted(set(old_routes) | set(new_routes)):
        before_r, after_r = old_routes.get(key), new_routes.get(key)
        if before_r is None:
            changes.append(Change(KIND_ROUTE, key, f"route {key} added -> release {after_r}"))
        elif after_r is None:
            changes.append(Change(KIND_ROUTE, key, f"route {key} removed (was -> {before_r})"))
        elif before_r != after_r:
            changes.append(Change(KIND_ROUTE, key, f"route {key}: release {before_r} -> {after_r}"))
    return changes


def routed_releases(doc: Document) -> set[str]:
    """The releases that receive traffic: those some route points at."""
    return {route.release for route in doc.routes}


def emptying_problem(old: Document, new: Document) -> tuple[str, str] | None:
    """(field, message) when `new` would stop serving everything `old` serves: it drops
    every route, or every release that has traffic. None otherwise (or when `old` serves
    nothing itself)."""
    if old.routes and not new.routes:
        return "routes", (
            f"the new document has no routes (today {len(old.routes)}): every request would get 404"
        )
    served = routed_releases(old)
    if served and not (served & routed_releases(new)):
        names = ", ".join(sorted(served))
        return "releases", (
            f"the new document routes no traffic to any release that has traffic today ({names})"
        )
    return None
