"""Keep an in-memory snapshot in step with the store (DESIGN.md §4, HARDENING.md §4.3).

Rules of this file:
* The request path reads `watcher.snapshot` (one attribute load) and nothing else.
* Change hints (`Store.changes()`) only poke; `Store.current_version()`, polled every
  `poll_interval_s`, is the truth. A missed hint delays a change by one poll interval at most.
* A candidate is applied only when it is valid and its version is higher than the applied one.
  An invalid document, a version that goes backwards or an emptied store is rejected whole:
  the last-known-good (LKG) snapshot keeps serving and `rejected[reason]` counts it.
* After each applied version the bootstrap file is rewritten, so a cold start with the store
  down serves the LKG (stale) instead of nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from flags.errors import ConfigError, StoreError
from flags.evaluate import EMPTY_SNAPSHOT, Snapshot, compile_snapshot
from flags.filestore import decode_revision, encode_revision, write_atomic
from flags.store import Revision, Store

log = logging.getLogger("turnout.watch")

DEFAULT_POLL_INTERVAL_S = 2.0
STORE_CALL_TIMEOUT_S = 2.0
RETRY_BACKOFF_MAX_S = 2.0

SOURCE_STORE = "store"
SOURCE_BOOTSTRAP = "bootstrap"
SOURCE_DEFAULT = "default"

REJECT_INVALID = "invalid"
REJECT_REGRESSED = "version_regressed"
REJECT_EMPTY = "store_empty"

ApplyListener = Callable[[Snapshot, Revision | None], None]


class ConfigWatcher:
    """Follows a `Store` and exposes the current compiled `Snapshot`."""

    def __init__(
        self,
        store: Store,
        *,
        bootstrap_path: str | Path | None = None,
        poll_interval_s: float = DEFAULT_POLL_INTERVAL_S,
    ) -> None:
        self.store = store
        self.bootstrap_path = Path(bootstrap_path) if bootstrap_path else None
        self.poll_interval_s = poll_interval_s
        self.snapshot: Snapshot = EMPTY_SNAPSHOT
        self.revision: Revision | None = None
        self.source = SOURCE_DEFAULT
        self.connected = False
        self.last_sync_monotonic = time.monotonic()
        self.rejected: Counter[str] = Counter()
        self.last_reject_reason = ""
        self.listeners: list[ApplyListener] = []
        self._poke = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = False

    # -- state -------------------------------------------------------------------------------

    @property
    def version(self) -> int:
        return self.snapshot.version

    @property
    def ready(self) -> bool:
        """Serving a configuration that came from the store or a bootstrap copy."""
        return self.source != SOURCE_DEFAULT

    @property
    def stale(self) -> bool:
        return not self.connected or self.source != SOURCE_STORE

    def age_seconds(self) -> float:
        """Seconds since the store last confirmed the applied version."""
        return time.monotonic() - self.last_sync_monotonic

    def _install(self, revision: Revision | None, snapshot: Snapshot, source: str) -> None:
        self.snapshot = snapshot
        self.revision = revision
        self.source = source
        for listener in self.listeners:
            try:
                listener(snapshot, revision)
            except Exception:  # noqa: BLE001 - a listener must not stop config updates
                log.exception("config listener failed")

    def _reject(self, reason: str, detail: str) -> None:
        self.rejected[reason] += 1
        self.last_reject_reason = reason
        log.error("config rejected (%s): %s; keeping version %d", reason, detail, self.version)

    # -- applying ----------------------------------------------------------------------------

    def offer(self, revision: Revision) -> bool:
        """Apply `revision` if it is newer than what is served. Returns True when applied."""
        if revision.version <= self.version and self.source == SOURCE_STORE:
            if revision.version < self.version:
                self._reject(REJECT_REGRESSED, f"store went back to version {revision.version}")
            return False
        snapshot = compile_snapshot(revision.document, source=SOURCE_STORE)
        self._install(revision, snapshot, SOURCE_STORE)
        self._schedule_bootstrap_write(revision)
        log.info("config version %d applied (%s)", revision.version, revision.info.summary)
        return True

    async def sync(self) -> None:
        """Read the store's truth once and apply it. Raises `StoreError` when unreachable."""
        async with asyncio.timeout(STORE_CALL_TIMEOUT_S):
            version = await self.store.current_version()
            if version == 0 and self.revision is not None:
                self._reject(REJECT_EMPTY, "store holds no configuration")
            elif version < self.version and self.source == SOURCE_STORE:
                self._reject(REJECT_REGRESSED, f"store is at {version}, serving {self.version}")
            elif version > self.version or (version and self.source != SOURCE_STORE):
                try:
                    revision = await self.store.latest()
                except ConfigError as exc:
                    self._reject(REJECT_INVALID, str(exc))
                    revision = None
                if revision is not None:
                    self.offer(revision)
        self.connected = True
        self.last_sync_monotonic = time.monotonic()

    # -- bootstrap ---------------------------------------------------------------------------

    def load_bootstrap(self) -> bool:
        """Serve the bootstrap copy (stale) if there is a valid one."""
        if self.bootstrap_path is None:
            return False
        try:
            revision = decode_revision(self.bootstrap_path.read_bytes())
        except FileNotFoundError:
            return False
        except (OSError, ConfigError) as exc:
            self._reject(REJECT_INVALID, f"bootstrap file {self.bootstrap_path}: {exc}")
            return False
        self._install(revision, compile_snapshot(revision.document, stale=True, source=SOURCE_BOOTSTRAP), SOURCE_BOOTSTRAP)
        log.warning("serving bootstrap copy of version %d (store not reached yet)", revision.version)
        return True

    def _schedule_bootstrap_write(self, revision: Revision) -> None:
        if self.bootstrap_path is None:
            return
        path, data = self.bootstrap_path, encode_revision(revision)
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            write_atomic(path, data)
            return
        task = loop.create_task(asyncio.to_thread(self._write_bootstrap, path, data))
        self._tasks.append(task)
        task.add_done_callback(self._tasks.remove)

    @staticmethod
    def _write_bootstrap(path: Path, data: bytes) -> None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(path, data)
        except OSError:
            log.exception("cannot write bootstrap file %s", path)

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Load the first configuration (store, else bootstrap, else the safe default) and
        start following the store. Never raises because the store is down."""
        try:
            await self.store.open()
            await self.sync()
        except (StoreError, TimeoutError, OSError) as exc:
            self.connected = False
            log.warning("config store unavailable at start: %s", exc)
            if not self.load_bootstrap():
                log.error("no bootstrap copy: serving the safe default (every request on stable)")
        self._tasks.append(asyncio.create_task(self._follow_hints(), name="turnout-config-hints"))
        self._tasks.append(asyncio.create_task(self._poll(), name="turnout-config-poll"))

    async def stop(self) -> None:
        self._stopping = True
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks.clear()
        with contextlib.suppress(Exception):
            await self.store.close()

    async def _follow_hints(self) -> None:
        backoff = 0.05
        while not self._stopping:
            try:
                async for _ in self.store.changes():
                    backoff = 0.05
                    self._poke.set()
            except (StoreError, OSError) as exc:
                log.debug("change feed interrupted: %s", exc)
            # (Re)subscribing: a full reload, since hints published meanwhile are lost.
            self._poke.set()
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, RETRY_BACKOFF_MAX_S)

    async def _poll(self) -> None:
        while not self._stopping:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.poll_interval_s):
                    await self._poke.wait()
            self._poke.clear()
            try:
                await self.sync()
            except (StoreError, TimeoutError, OSError) as exc:
                if self.connected:
                    log.warning("config store unreachable: %s (serving version %d)", exc, self.version)
                self.connected = False
                await asyncio.sleep(min(self.poll_interval_s, RETRY_BACKOFF_MAX_S) / 4)
