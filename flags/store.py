"""The `Store` protocol: where versioned documents live.

Every implementation (the embedded file store, the Redis store) keeps the same promises:
* versions are assigned by the store: a commit writes `expected_version + 1` only if the
  store is still at `expected_version` (compare-and-set), else raises `VersionConflict`;
* a stored version is immutable and its history is kept;
* backend errors surface as `StoreError` subclasses (`StoreUnavailable` when unreachable);
* `changes()` yields version *hints* (possibly spurious, possibly missed): a watcher re-reads
  `current_version()` as the truth, so a lost notification only delays a change.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass
from typing import Any, Protocol, runtime_checkable

from flags.document import Document


@dataclass(frozen=True, slots=True)
class VersionInfo:
    """Who wrote a version, when, and what it changed."""

    version: int
    created_at: float
    actor: str
    summary: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> VersionInfo:
        return cls(
            version=int(data["version"]),
            created_at=float(data["created_at"]),
            actor=str(data["actor"]),
            summary=str(data["summary"]),
        )

    @classmethod
    def now(cls, version: int, actor: str, summary: str) -> VersionInfo:
        return cls(version=version, created_at=time.time(), actor=actor, summary=summary)


@dataclass(frozen=True, slots=True)
class Revision:
    """A stored document with its metadata (`document.version == info.version`)."""

    document: Document
    info: VersionInfo

    @property
    def version(self) -> int:
        return self.info.version


@runtime_checkable
class Store(Protocol):
    """A versioned document store with compare-and-set writes and change hints."""

    generation: int
    """Bumped when the store's backing server was replaced (a Sentinel failover). Versions
    acknowledged by the old server but never replicated are gone then, so a watcher adopts
    the new server's (possibly lower) version instead of holding on to a vanished one."""

    async def open(self) -> None:
        """Connect / create what is needed. May raise `StoreUnavailable`."""

    async def close(self) -> None:
        """Release connections and stop background work."""

    async def current_version(self) -> int:
        """The current version (0 when the store is empty). Cheap: polled as the truth."""

    async def latest(self) -> Revision | None:
        """The current revision, or None when the store holds nothing yet."""

    async def get(self, version: int) -> Revision:
        """One stored version; `VersionNotFound` when it is not in the history."""

    async def history(self, limit: int = 100) -> list[VersionInfo]:
        """Newest first."""

    async def commit(
        self, document: Document, *, expected_version: int, actor: str, summary: str
    ) -> Revision:
        """Store `document` as version `expected_version + 1` if the store is at
        `expected_version`; else `VersionConflict`. Returns the stored revision."""

    async def seed(self, revision: Revision) -> bool:
        """Write `revision` keeping its version, only if the store is behind it (empty after
        data loss). Returns True when written. Used to re-seed from a last-known-good copy."""

    def changes(self) -> AsyncIterator[int]:
        """Version hints as they are announced; ends when the store is closed."""
