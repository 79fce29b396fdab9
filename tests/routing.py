"""The edge's two-step decision (`Snapshot.match` then `CompiledRelease.assign`) for tests of
the pure core: canonicalise host and unit id as the edge does, then route and assign."""

from __future__ import annotations

from flags.evaluate import ARM_STABLE, REASON_DEFAULT, Decision, Snapshot
from flags.hashing import normalize_unit_id


def route(
    snapshot: Snapshot,
    unit_id: str | None,
    host: str = "*",
    path: str = "/",
    email: str | None = None,
) -> Decision:
    """The decision the edge makes for a request to `host` + `path` by `unit_id`."""
    release = snapshot.match(host.lower(), path)
    if release is None:
        return Decision(ARM_STABLE, None, "", -1, REASON_DEFAULT)
    unit = normalize_unit_id(unit_id) if unit_id is not None else None
    return release.assign(unit, email)
