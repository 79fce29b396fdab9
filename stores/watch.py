"""Keep an in-memory snapshot in step with the store (DESIGN.md §4, HARDENING.md §4.3).

Rules of this file:
* The request path reads `watcher.snapshot` (one attribute load) and nothing else.
* Change hints (`Store.changes()`) only poke; `Store.current_version()`, polled every
  `poll_interval_s`, is the truth. A missed hint delays a change by one poll interval at most.
* A candidate is applied only when it is valid and its version is higher than the applied one.
  An invalid document, a checksum mismatch, a version that goes backwards or an emptied store
  is rejected whole: the last-known-good (LKG) snapshot keeps serving and `rejected[reason]`
  counts it (once per bad version, not once per poll).
* An emptied store (Redis restarted without persistence) is never read as "no config": with
  `reseed_on_empty` the watcher writes its LKG back at the LKG's own version (`Store.seed`,
  which only writes if the store is still behind, so several instances converge on the
  highest LKG). A pointer that went backwards is only alarmed: `reseed()` is the explicit fix.
* A local override (HARDENING.md §4.3 rule 6, §8 #14) is served at once, kept in the
  bootstrap file, and committed as a new version when the store answers again. While one is
  pending, newer store versions are not installed over it: the override's release entries are
  re-applied on top of them and committed (an ops emergency edit wins over whatever changed).
* After each applied version the bootstrap file is rewritten, so a cold start with the store
  down serves the LKG (stale) instead of nothing.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from flags.document import Document, Release, check_document, load_document, load_model
from flags.errors import ConfigError, StoreError, VersionConflict
from flags.evaluate import EMPTY_SNAPSHOT, Snapshot, compile_snapshot
from flags.store import Revision, Store, VersionInfo
from stores.filestore import write_atomic
from stores.revision import decode_revision, encode_revision

log = logging.getLogger("turnout.watch")
audit = logging.getLogger("turnout.audit")

DEFAULT_POLL_INTERVAL_S = 2.0
STORE_CALL_TIMEOUT_S = 2.0
RETRY_BACKOFF_MAX_S = 2.0
APPLY_LAG_SAMPLES = 1024

SOURCE_STORE = "store"
SOURCE_BOOTSTRAP = "bootstrap"
SOURCE_DEFAULT = "default"

REJECT_INVALID = "invalid"
REJECT_REGRESSED = "version_regressed"
REJECT_EMPTY = "store_empty"
REJECT_CHECKSUM = "checksum"

ApplyListener = Callable[[Snapshot, Revision | None], None]


@dataclass(frozen=True, slots=True)
class LocalOverride:
    """An ops edit made on this instance while the store was unreachable.

    `revision` is the whole overriding document (at the base version: it is not a store
    version yet); `releases` is the edit itself, re-applied on top of the store's latest
    document if the store moved on meanwhile."""

    base: Revision | None
    releases: dict[str, Release]
    revision: Revision

    @property
    def base_version(self) -> int:
        return self.base.version if self.base is not None else 0


def encode_bootstrap(revision: Revision, override: LocalOverride | None = None) -> bytes:
    """The filestore encoding, plus `"local_override": true` and the edit when an override
    is pending. `revision.decode_revision` ignores the extra keys, so both directions stay
    compatible with plain revision files."""
    payload: dict[str, Any] = orjson.loads(encode_revision(revision))
    if override is not None:
        payload["local_override"] = True
        base = override.base
        payload["override"] = {
            "base": orjson.loads(encode_revision(base)) if base is not None else None,
            "releases": {
                name: rel.model_dump(mode="json") for name, rel in override.releases.items()
            },
        }
    return orjson.dumps(payload, option=orjson.OPT_SORT_KEYS)


def decode_bootstrap(data: bytes) -> tuple[Revision, LocalOverride | None]:
    """Parse a bootstrap file; `ConfigError` when it is unusable."""
    revision = decode_revision(data)
    raw = orjson.loads(data)
    if not raw.get("local_override"):
        return revision, None
    try:
        spec = raw["override"]
        base_raw = spec.get("base")
        base = decode_revision(orjson.dumps(base_raw)) if base_raw is not None else None
        releases = {
            str(name): load_model(Release, rel, prefix=f"override.releases.{name}")
            for name, rel in dict(spec["releases"]).items()
        }
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise ConfigError("override", f"unreadable local override: {exc}") from None
    return revision, LocalOverride(base=base, releases=releases, revision=revision)


def rebase_override(document: Document, releases: dict[str, Release]) -> Document:
    """`document` with the override's release entries put back on top (validated)."""
    merged = dict(document.releases)
    merged.update(releases)
    new = document.model_copy(update={"releases": merged})
    check_document(new)
    return new


class ConfigWatcher:
    """Follows a `Store` and exposes the current compiled `Snapshot`."""

    def __init__(
        self,
        store: Store,
        *,
        bootstrap_path: str | Path | None = None,
        poll_interval_s: float = DEFAULT_POLL_INTERVAL_S,
        reseed_on_empty: bool = True,
        store_call_timeout_s: float = STORE_CALL_TIMEOUT_S,
    ) -> None:
        self.store = store
        self.bootstrap_path = Path(bootstrap_path) if bootstrap_path else None
        self.poll_interval_s = poll_interval_s
        self.reseed_on_empty = reseed_on_empty
        self.store_call_timeout_s = store_call_timeout_s
        self.snapshot: Snapshot = EMPTY_SNAPSHOT
        self.revision: Revision | None = None
        self.source = SOURCE_DEFAULT
        self.connected = False
        self.last_sync_monotonic = time.monotonic()
        self.rejected: Counter[str] = Counter()
        self.failover_reloads = 0
        self._generation = getattr(store, "generation", 0)
        self.last_reject_reason = ""
        self.listeners: list[ApplyListener] = []
        self.apply_lags: collections.deque[float] = collections.deque(maxlen=APPLY_LAG_SAMPLES)
        self.override: LocalOverride | None = None
        self.override_error = ""
        self._last_reject: tuple[str, int] | None = None
        self._poke = asyncio.Event()
        self._sync_lock = asyncio.Lock()
        self._tasks: list[asyncio.Task[None]] = []
        self._bootstrap_lock = asyncio.Lock()
        self._bootstrap_seq = 0
        self._bootstrap_tasks: set[asyncio.Task[None]] = set()
        self._stopping = False

    # -- state -------------------------------------------------------------------------------

    @property
    def version(self) -> int:
        return self.snapshot.version

    @property
    def ready(self) -> bool:
        """Serving a configuration that came from the store, a bootstrap copy or an
        operator's local override."""
        return self.source != SOURCE_DEFAULT or self.override is not None

    @property
    def stale(self) -> bool:
        return not self.connected or self.source != SOURCE_STORE

    @property
    def pending_override(self) -> bool:
        """A local override is served but not yet committed to the store."""
        return self.override is not None

    def age_seconds(self) -> float:
        """Seconds since the store last confirmed the applied version."""
        return time.monotonic() - self.last_sync_monotonic

    def last_known_good(self) -> Revision | None:
        """The newest revision that came from the store (directly or via the bootstrap
        copy): what a re-seed writes back."""
        if self.override is not None:
            return self.override.base
        return self.revision if self.source != SOURCE_DEFAULT else None

    def _install(self, revision: Revision | None, snapshot: Snapshot, source: str) -> None:
        self.snapshot = snapshot
        self.revision = revision
        self.source = source
        for listener in self.listeners:
            try:
                listener(snapshot, revision)
            except Exception:
                log.exception("config listener failed")

    def _reject(self, reason: str, version: int, detail: str) -> None:
        """Count and log one rejection per (reason, version), however often it is polled."""
        if self._last_reject == (reason, version):
            return
        self._last_reject = (reason, version)
        self.rejected[reason] += 1
        self.last_reject_reason = reason
        log.error("config rejected (%s): %s; keeping version %d", reason, detail, self.version)

    # -- applying ----------------------------------------------------------------------------

    def _apply(self, revision: Revision) -> None:
        snapshot = compile_snapshot(revision.document, source=SOURCE_STORE)
        self._install(revision, snapshot, SOURCE_STORE)
        self._last_reject = None
        self.apply_lags.append(max(0.0, time.time() - revision.info.created_at))
        self._schedule_bootstrap_write(revision)
        log.info("config version %d applied (%s)", revision.version, revision.info.summary)

    def offer(self, revision: Revision) -> bool:
        """Apply `revision` if it is newer than what is served. Returns True when applied."""
        if self.override is not None:
            self._poke.set()  # reconcile the override on top of it instead
            return False
        if self.source != SOURCE_DEFAULT and revision.version < self.version:
            self._reject(
                REJECT_REGRESSED,
                revision.version,
                f"store went back to version {revision.version}",
            )
            return False
        if revision.version == self.version and self.source == SOURCE_STORE:
            return False
        self._apply(revision)
        return True

    async def sync(self) -> None:
        """Read the store's truth once and apply it. Raises `StoreError` (or
        `TimeoutError`) when the store is unreachable or too slow."""
        async with asyncio.timeout(self.store_call_timeout_s), self._sync_lock:
            await self._sync_once()
        self.connected = True
        self.last_sync_monotonic = time.monotonic()

    async def _sync_once(self) -> None:
        version = await self.store.current_version()
        generation = self.store.generation  # read after the call that may notice a failover
        try:
            await self._sync_version(version, generation)
        finally:
            self._generation = generation

    async def _adopt_after_failover(self, version: int) -> None:
        """The store's server was replaced and its version is lower than the one served:
        what this instance applied from the old master was never replicated. Serve the new
        master's truth rather than a version that no longer exists anywhere."""
        readable, revision = await self._read_latest(version)
        if not readable or revision is None:
            return
        lost = self.version
        self.failover_reloads += 1
        self._apply(revision)
        audit.warning(
            "store failover: version %d was lost with the old master; serving version %d",
            lost,
            revision.version,
        )

    async def _sync_version(self, version: int, generation: int) -> None:
        if version == 0 and self.last_known_good() is not None:
            self._reject(REJECT_EMPTY, 0, "store holds no configuration (restarted empty?)")
            if not self.reseed_on_empty:
                return
            await self.reseed()
            version = await self.store.current_version()
            if version == 0:
                return
        if self.override is not None:
            await self._reconcile(self.override, version)
            return
        if self.source != SOURCE_DEFAULT and version < self.version:
            if generation != self._generation and self.source == SOURCE_STORE:
                await self._adopt_after_failover(version)
                return
            self._reject(
                REJECT_REGRESSED, version, f"store is at {version}, serving {self.version}"
            )
            return
        if version == self.version and self.source == SOURCE_STORE:
            self._last_reject = None
            return
        if version == 0 or (self._last_reject is not None and self._last_reject[1] == version):
            return  # nothing stored yet, or this version was already rejected
        readable, revision = await self._read_latest(version)
        if readable and revision is not None:
            self.offer(revision)

    async def _read_latest(self, version: int) -> tuple[bool, Revision | None]:
        """The store's latest revision (None: the store is empty). (False, None) when it fails
        validation or its checksum: rejected whole and counted, the LKG keeps serving."""
        try:
            return True, await self.store.latest()
        except ConfigError as exc:
            reason = REJECT_CHECKSUM if exc.field == "checksum" else REJECT_INVALID
            self._reject(reason, version, f"version {version}: {exc}")
            return False, None

    # -- store repair and local overrides ----------------------------------------------------

    async def reseed(self) -> bool:
        """Write the last-known-good revision back at its own version if the store is
        behind it (empty after data loss, or a pointer that went backwards). Returns True
        when written. This is what `turnout store reseed` runs."""
        lkg = self.last_known_good()
        if lkg is None:
            log.warning("re-seed skipped: no last-known-good configuration to write")
            return False
        written = await self.store.seed(lkg)
        if written:
            audit.warning("re-seeded store with version %d from last-known-good", lkg.version)
            self._poke.set()
        else:
            log.info("re-seed skipped: store already holds version >= %d", lkg.version)
        return written

    async def apply_local_override(self, document: Document, summary: str, actor: str) -> None:
        """Serve `document` at once on this instance (ops emergency: rollback, kill switch
        while the store is down), keep it in the bootstrap file, and commit it as a new
        version when the store is reachable. Raises `ConfigError` if it is invalid."""
        document = load_document(document.model_dump(mode="json"))
        base = self.last_known_good()
        base_version = base.version if base is not None else 0
        base_releases = base.document.releases if base is not None else {}
        doc = document.model_copy(update={"version": base_version})
        changed = {
            name: rel for name, rel in doc.releases.items() if base_releases.get(name) != rel
        }
        revision = Revision(doc, VersionInfo.now(base_version, actor, summary))
        override = LocalOverride(base=base, releases=changed, revision=revision)
        self.override = override
        self.override_error = ""
        snapshot = compile_snapshot(doc, stale=self.snapshot.stale, source=self.source)
        self._install(revision, snapshot, self.source)
        audit.warning(
            "local override by %s: %s (releases %s; based on version %d, committed as a "
            "new version when the store is reachable)",
            actor,
            summary,
            ", ".join(sorted(changed)) or "-",
            base_version,
        )
        task = self._schedule_bootstrap_write(revision, override)
        if task is not None:
            await asyncio.shield(task)
        self._poke.set()

    async def _reconcile(self, override: LocalOverride, current: int) -> None:
        """Commit a pending local override: CAS on its base version if the store did not
        move, else its release entries re-applied on top of the latest version."""
        latest: Revision | None = None
        if current == override.base_version:
            document = override.revision.document
        else:
            readable, latest = await self._read_latest(current)
            if not readable:
                return
            base_doc = latest.document if latest is not None else Document()
            try:
                document = rebase_override(base_doc, override.releases)
            except ConfigError as exc:
                if self.override_error != str(exc):
                    log.error(
                        "local override cannot be applied on version %d: %s "
                        "(still serving it locally)",
                        current,
                        exc,
                    )
                self.override_error = str(exc)
                return
            if latest is not None and document == base_doc:
                self._finish_override(override, latest, "already in the store")
                return
        expected = latest.version if latest is not None else current
        info = override.revision.info
        try:
            committed = await self.store.commit(
                document,
                expected_version=expected,
                actor=info.actor,
                summary=f"local override: {info.summary}",
            )
        except VersionConflict:
            self._poke.set()  # the store moved again: rebase on the next round
            return
        self._finish_override(override, committed, f"committed as version {committed.version}")

    def _finish_override(self, override: LocalOverride, revision: Revision, how: str) -> None:
        audit.warning(
            "local override by %s (%s) %s",
            override.revision.info.actor,
            override.revision.info.summary,
            how,
        )
        if self.override is override:  # not replaced by a newer override meanwhile
            self.override = None
            self.override_error = ""
            self._apply(revision)

    # -- bootstrap ---------------------------------------------------------------------------

    def load_bootstrap(self) -> bool:
        """Serve the bootstrap copy (stale) if there is a valid one."""
        if self.bootstrap_path is None:
            return False
        try:
            revision, override = decode_bootstrap(self.bootstrap_path.read_bytes())
        except FileNotFoundError:
            return False
        except (OSError, ConfigError, orjson.JSONDecodeError) as exc:
            self._reject(REJECT_INVALID, -1, f"bootstrap file {self.bootstrap_path}: {exc}")
            return False
        snapshot = compile_snapshot(revision.document, stale=True, source=SOURCE_BOOTSTRAP)
        self._install(revision, snapshot, SOURCE_BOOTSTRAP)
        self.override = override
        if override is not None:
            log.warning(
                "serving a pending local override from the bootstrap file (based on version %d)",
                override.base_version,
            )
        else:
            log.warning(
                "serving bootstrap copy of version %d (store not reached yet)",
                revision.version,
            )
        return True

    def _schedule_bootstrap_write(
        self, revision: Revision, override: LocalOverride | None = None
    ) -> asyncio.Task[None] | None:
        if self.bootstrap_path is None:
            return None
        path, data = self.bootstrap_path, encode_bootstrap(revision, override)
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self._write_bootstrap(path, data)
            return None
        self._bootstrap_seq += 1
        task = loop.create_task(self._write_bootstrap_in_order(self._bootstrap_seq, path, data))
        self._bootstrap_tasks.add(task)
        task.add_done_callback(self._bootstrap_tasks.discard)
        return task

    async def _write_bootstrap_in_order(self, seq: int, path: Path, data: bytes) -> None:
        async with self._bootstrap_lock:
            if seq != self._bootstrap_seq:
                return  # a newer copy is queued behind us
            await asyncio.to_thread(self._write_bootstrap, path, data)

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
        if self.bootstrap_path is not None and self.bootstrap_path.exists():
            # A pending local override lives only in the bootstrap file: pick it up first.
            with contextlib.suppress(OSError, ConfigError, orjson.JSONDecodeError):
                _, pending = decode_bootstrap(self.bootstrap_path.read_bytes())
                if pending is not None:
                    self.load_bootstrap()
        try:
            await self.store.open()
            await self.sync()
        except (StoreError, TimeoutError, OSError) as exc:
            self.connected = False
            log.warning("config store unavailable at start: %s", exc)
        if self.source == SOURCE_DEFAULT:
            if self.load_bootstrap():
                if self.connected:
                    # The store answered but gave nothing usable (emptied, or a rejected
                    # version): the bootstrap copy is the LKG; this sync may re-seed it.
                    with contextlib.suppress(StoreError, TimeoutError, OSError):
                        await self.sync()
            elif self.connected:
                # A fresh start on an empty store is normal, not an error (issue #13).
                log.info(
                    "the store holds no configuration yet: every request goes to stable "
                    "until one is applied (seed_file, or turnout apply FILE)"
                )
            else:
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
        if self._bootstrap_tasks:
            await asyncio.gather(*self._bootstrap_tasks, return_exceptions=True)
        with contextlib.suppress(Exception):
            await self.store.close()

    async def _follow_hints(self) -> None:
        backoff = 0.05
        while not self._stopping:
            hints = self.store.changes()
            try:
                async for _ in hints:
                    backoff = 0.05
                    self._poke.set()
            except (StoreError, OSError) as exc:
                log.debug("change feed interrupted: %s", exc)
            except Exception:
                log.exception("change feed failed; resubscribing")
            finally:
                aclose = getattr(hints, "aclose", None)
                if aclose is not None:
                    with contextlib.suppress(Exception):
                        await aclose()
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
                    log.warning(
                        "config store unreachable: %s (serving version %d)",
                        exc,
                        self.version,
                    )
                self.connected = False
                await asyncio.sleep(min(self.poll_interval_s, RETRY_BACKOFF_MAX_S) / 4)
            except Exception:
                # A bug must not freeze configuration updates: log it and keep polling.
                log.exception("config sync failed")
                await asyncio.sleep(min(self.poll_interval_s, RETRY_BACKOFF_MAX_S) / 4)
