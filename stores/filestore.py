"""The embedded file store: one directory, one JSON file per version.

Layout (all files written atomically: temp file, fsync, rename, fsync of the directory):

    <root>/versions/000000000042.json   {"info": {...}, "document": {...}}
    <root>/CURRENT                       "42"  (the version marker other processes poll)
    <root>/.lock                         flock(2) held during a commit (cross-process CAS)

A version file is never rewritten. CURRENT is written after the version file, so a reader that
sees CURRENT = n always finds version n. A torn or foreign file is reported, never applied.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import orjson

from flags.document import Document
from flags.errors import StoreError, VersionConflict, VersionNotFound
from flags.store import Revision, VersionInfo
from stores.revision import decode_revision, encode_revision

DEFAULT_POLL_INTERVAL_S = 0.1
_VERSION_DIGITS = 12


def write_atomic(path: Path, data: bytes) -> None:
    """Write `data` to `path` so that readers see the old or the new file, never a torn one."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        view = memoryview(data)
        while view:
            written = os.write(fd, view)
            view = view[written:]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


class FileStore:
    """`Store` on a local directory. Safe across processes on one machine."""

    def __init__(
        self, root: str | os.PathLike[str], *, poll_interval_s: float = DEFAULT_POLL_INTERVAL_S
    ) -> None:
        self.root = Path(root)
        self.versions_dir = self.root / "versions"
        self.marker = self.root / "CURRENT"
        self.poll_interval_s = poll_interval_s
        self.generation = 0  # one directory: never replaced underneath us
        self._closed = asyncio.Event()
        self._local_change = asyncio.Event()

    # -- helpers (synchronous file I/O; files are small) -------------------------------------

    def _path(self, version: int) -> Path:
        return self.versions_dir / f"{version:0{_VERSION_DIGITS}d}.json"

    def _read_marker(self) -> int:
        try:
            text = self.marker.read_text().strip()
        except FileNotFoundError:
            return 0
        except OSError as exc:
            raise StoreError(f"cannot read {self.marker}: {exc}") from exc
        if not text.isdigit():
            raise StoreError(f"corrupt version marker {self.marker}: {text[:40]!r}")
        return int(text)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        fd = os.open(self.root / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def _read(self, version: int) -> Revision:
        try:
            data = self._path(version).read_bytes()
        except FileNotFoundError:
            raise VersionNotFound(version) from None
        except OSError as exc:
            raise StoreError(f"cannot read version {version}: {exc}") from exc
        return decode_revision(data)

    def _write(self, revision: Revision) -> None:
        write_atomic(self._path(revision.version), encode_revision(revision))
        write_atomic(self.marker, str(revision.version).encode())

    # -- Store protocol -----------------------------------------------------------------------

    async def open(self) -> None:
        try:
            self.versions_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"cannot create store directory {self.root}: {exc}") from exc

    async def close(self) -> None:
        self._closed.set()

    async def current_version(self) -> int:
        return self._read_marker()

    async def latest(self) -> Revision | None:
        version = self._read_marker()
        return self._read(version) if version else None

    async def get(self, version: int) -> Revision:
        return self._read(version)

    async def history(self, limit: int = 100) -> list[VersionInfo]:
        infos: list[VersionInfo] = []
        names = sorted((p.name for p in self.versions_dir.glob("*.json")), reverse=True)
        for name in names[:limit]:
            try:
                raw = orjson.loads((self.versions_dir / name).read_bytes())
                infos.append(VersionInfo.from_dict(raw["info"]))
            except (OSError, orjson.JSONDecodeError, KeyError, TypeError, ValueError):
                continue
        return infos

    async def commit(
        self, document: Document, *, expected_version: int, actor: str, summary: str
    ) -> Revision:
        with self._locked():
            current = self._read_marker()
            if current != expected_version:
                raise VersionConflict(expected_version, current)
            version = current + 1
            stored = document.model_copy(update={"version": version})
            revision = Revision(stored, VersionInfo.now(version, actor, summary))
            self._write(revision)
        self._local_change.set()
        return revision

    async def seed(self, revision: Revision) -> bool:
        with self._locked():
            if self._read_marker() >= revision.version:
                return False
            self._write(revision)
        self._local_change.set()
        return True

    async def changes(self) -> AsyncIterator[int]:
        """Poll the marker file; commits in this process are announced at once."""
        last = -1
        while not self._closed.is_set():
            try:
                version = self._read_marker()
            except StoreError:
                version = last
            if version != last:
                last = version
                yield version
            self._local_change.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.poll_interval_s):
                    await self._local_change.wait()
