"""Pure edits of a document: each returns a new, fully validated document and a summary.

The admin API and the CLI only ever change configuration through these functions, so that
"what a stage change means" is written once.
"""

from __future__ import annotations

from typing import Any

from flags.document import (
    STAGE_CUSTOM,
    STAGE_OFF,
    Document,
    Release,
    Rollback,
    _check_percent,
    check_document,
    load_model,
)
from flags.errors import ConfigError


def _with_release(doc: Document, name: str, release: Release) -> Document:
    releases = dict(doc.releases)
    releases[name] = release
    new = doc.model_copy(update={"releases": releases})
    check_document(new)
    return new


def _release(doc: Document, name: str) -> Release:
    try:
        return doc.releases[name]
    except KeyError:
        raise ConfigError("release", f"unknown release {name!r}") from None


def describe_stage(release: Release) -> str:
    if release.stage == STAGE_CUSTOM:
        return f"{release.percent:g} %"
    return release.stage


def set_stage(
    doc: Document, name: str, *, stage: str | None = None, percent: float | None = None
) -> tuple[Document, str]:
    """Move a release to a named stage or an explicit percentage."""
    current = _release(doc, name)
    if (stage is None) == (percent is None):
        raise ConfigError("stage", "give exactly one of 'stage' or 'percent'")
    if percent is not None:
        if isinstance(percent, bool) or not isinstance(percent, (int, float)):
            raise ConfigError("percent", "must be a number")
        _check_percent("percent", float(percent))
        update: dict[str, Any] = {"stage": STAGE_CUSTOM, "percent": float(percent)}
    else:
        if not isinstance(stage, str) or stage == STAGE_CUSTOM or stage not in doc.stages:
            known = ", ".join(doc.stages)
            raise ConfigError("stage", f"unknown stage {stage!r} (known: {known}, or a percent)")
        update = {"stage": stage, "percent": None}
    update["rollback"] = None
    new_release = current.model_copy(update=update)
    new = _with_release(doc, name, new_release)
    return new, f"{name}: stage {describe_stage(current)} -> {describe_stage(new_release)}"


def rollback(doc: Document, name: str, reason: str) -> tuple[Document, str]:
    """Everyone (internal allow-list included) to stable on the next request."""
    current = _release(doc, name)
    if not isinstance(reason, str) or not reason.strip():
        raise ConfigError("reason", "a rollback needs a reason")
    if len(reason) > 500:
        raise ConfigError("reason", "at most 500 characters")
    record = Rollback(reason=reason.strip(), from_stage=current.stage, from_percent=current.percent)
    new_release = current.model_copy(
        update={"stage": STAGE_OFF, "percent": None, "rollback": record}
    )
    new = _with_release(doc, name, new_release)
    return new, f"{name}: rollback from {describe_stage(current)} ({reason.strip()})"


def put_release(doc: Document, name: str, raw: Any) -> tuple[Document, str]:
    """Create or replace a release from its JSON form."""
    release = load_model(Release, raw, prefix=f"releases.{name}")
    existed = name in doc.releases
    new = _with_release(doc, name, release)
    return new, f"{name}: release {'replaced' if existed else 'created'}"


def replace_document(doc: Document, raw: Any) -> tuple[Document, str]:
    """Replace the whole content (the version is the store's to assign)."""
    from flags.document import load_document

    if isinstance(raw, dict):
        raw = {k: v for k, v in raw.items() if k != "version"}
    new = load_document(raw).model_copy(update={"version": doc.version})
    return new, "document replaced"


def restore(doc: Document, old: Document) -> tuple[Document, str]:
    """A new version with an old version's content (versions never go backwards)."""
    new = old.model_copy(update={"version": doc.version})
    check_document(new)
    return new, f"restore content of version {old.version}"
