"""What every admin handler works with, and the one place store errors become HTTP errors.

Rules of this file:
* Reads of the configuration go to the store (the truth), not to the watcher's snapshot;
  only `explain` and the health endpoints describe what this instance is serving.
* Store failures are mapped here, once: unreachable, failing or timing out -> 503 with a
  message that says nothing was confirmed (HARDENING.md §8 row 8: never a fake success);
  a lost compare-and-set -> 412 when the client sent `If-Match`, else 409.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry

from admin.auth import BearerAuth
from admin.responses import ApiError
from flags.document import Document
from flags.errors import ConfigError, StoreError, VersionConflict, VersionNotFound
from flags.store import Revision, Store, VersionInfo
from stores.events import EventBus
from stores.settings import Settings
from stores.watch import ConfigWatcher

STORE_READ_TIMEOUT_S = 2.0
# Longer than a read: a commit cut short by our timeout may still land in the store.
STORE_COMMIT_TIMEOUT_S = 5.0


@asynccontextmanager
async def _store_call(what: str, timeout_s: float) -> AsyncIterator[None]:
    try:
        async with asyncio.timeout(timeout_s):
            yield
    except (VersionConflict, VersionNotFound):
        raise
    except StoreError as exc:
        raise ApiError(503, f"configuration store unavailable while {what}: {exc}") from None
    except (TimeoutError, OSError) as exc:
        detail = str(exc) or type(exc).__name__
        raise ApiError(503, f"configuration store unavailable while {what}: {detail}") from None
    except ConfigError as exc:
        raise ApiError(503, f"the store holds an unreadable configuration: {exc}") from None


@dataclass(frozen=True, slots=True)
class AdminContext:
    settings: Settings
    store: Store
    watcher: ConfigWatcher
    registry: CollectorRegistry
    auth: BearerAuth
    # Guarded delivery (issue #10), given by the composition root: the guard's live view of a
    # release, and the event stream. None where no guard runs (admin-only tests).
    health: Callable[[str], dict[str, Any] | None] | None = None
    events: EventBus | None = None

    async def latest(self) -> Revision | None:
        async with _store_call("reading the configuration", STORE_READ_TIMEOUT_S):
            return await self.store.latest()

    async def latest_document(self) -> Document:
        """The store's current document (an empty version 0 when the store is empty)."""
        revision = await self.latest()
        return revision.document if revision is not None else Document()

    async def current_version(self) -> int:
        async with _store_call("reading the version", STORE_READ_TIMEOUT_S):
            return await self.store.current_version()

    async def get_version(self, version: int) -> Revision:
        try:
            async with _store_call(f"reading version {version}", STORE_READ_TIMEOUT_S):
                return await self.store.get(version)
        except VersionNotFound:
            raise ApiError(404, f"version {version} not found", field="version") from None

    async def history(self, limit: int) -> list[VersionInfo]:
        async with _store_call("reading the history", STORE_READ_TIMEOUT_S):
            return await self.store.history(limit)

    async def commit(
        self,
        document: Document,
        *,
        expected_version: int,
        actor: str,
        summary: str,
        conditional: bool,
    ) -> Revision:
        try:
            async with _store_call("writing (the change is not confirmed)", STORE_COMMIT_TIMEOUT_S):
                return await self.store.commit(
                    document,
                    expected_version=expected_version,
                    actor=actor,
                    summary=summary,
                )
        except VersionConflict as exc:
            if conditional:
                raise ApiError(
                    412,
                    f"version is now {exc.actual}, not {exc.expected}; nothing was changed",
                    field="If-Match",
                ) from None
            raise ApiError(
                409,
                f"the configuration changed meanwhile (now version {exc.actual}); "
                "nothing was changed: read it again and retry",
            ) from None
