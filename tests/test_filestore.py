"""flags/filestore.py and flags/watch.py over it: compare-and-set commits, history, restarts,
atomic files, corrupt files, other processes (a watcher and a competing writer), and the
ConfigWatcher's apply / reject / bootstrap behaviour."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

import orjson
import pytest

from flags.document import Document, load_document
from flags.errors import ConfigError, StoreError, VersionConflict, VersionNotFound
from flags.store import Revision, Store, VersionInfo
from stores.filestore import FileStore, write_atomic
from stores.watch import (
    REJECT_INVALID,
    SOURCE_BOOTSTRAP,
    SOURCE_DEFAULT,
    SOURCE_STORE,
    ConfigWatcher,
    decode_bootstrap,
    encode_bootstrap,
)

REPO = Path(__file__).resolve().parents[1]
SCENARIO_TIMEOUT_S = 20
FAST_POLL_S = 0.02

T = TypeVar("T")


def run(scenario: Callable[[], Coroutine[Any, Any, T]]) -> T:
    async def bounded() -> T:
        async with asyncio.timeout(SCENARIO_TIMEOUT_S):
            return await scenario()

    return asyncio.run(bounded())


async def until(condition: Callable[[], bool]) -> None:
    """Wait for a condition (bounded by the scenario's timeout; no timing assertion)."""
    while not condition():
        await asyncio.sleep(0.01)


def doc(stage: str = "beta", name: str = "web") -> Document:
    return load_document(
        {
            "releases": {
                name: {
                    "stable": ["http://stable:80"],
                    "canary": ["http://canary:80"],
                    "stage": stage,
                }
            },
            "routes": [{"release": name}],
        }
    )


async def opened(root: Path) -> FileStore:
    store = FileStore(root, poll_interval_s=FAST_POLL_S)
    await store.open()
    return store


def listing(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def subprocess_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


# -- commits and compare-and-set ------------------------------------------------------------------


def test_commit_assigns_versions_and_cas(tmp_path: Path) -> None:
    """Commits get expected+1; a stale expected version is VersionConflict and writes nothing."""

    async def scenario() -> None:
        store = await opened(tmp_path)
        assert await store.current_version() == 0
        assert await store.latest() is None
        first = await store.commit(doc(), expected_version=0, actor="ann", summary="create")
        assert first.version == first.document.version == 1
        second = await store.commit(
            doc("open").model_copy(update={"version": 42}),
            expected_version=1,
            actor="bob",
            summary="open",
        )
        assert second.version == second.document.version == 2
        files_before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
        with pytest.raises(VersionConflict) as info:
            await store.commit(doc("ga"), expected_version=1, actor="eve", summary="stale")
        assert (info.value.expected, info.value.actual) == (1, 2)
        with pytest.raises(VersionConflict):
            await store.commit(doc("ga"), expected_version=3, actor="eve", summary="future")
        files_after = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
        assert files_after == files_before
        assert await store.current_version() == 2
        latest = await store.latest()
        assert latest is not None and latest.document.releases["web"].stage == "open"

    run(scenario)


def test_history_newest_first_and_get(tmp_path: Path) -> None:
    """history is newest first with actor/summary; get a missing version is VersionNotFound."""

    async def scenario() -> None:
        store = await opened(tmp_path)
        stages = ["off", "internal", "beta", "open", "ga"]
        for i, stage in enumerate(stages):
            await store.commit(doc(stage), expected_version=i, actor=f"user{i}", summary=stage)
        history = await store.history()
        assert [h.version for h in history] == [5, 4, 3, 2, 1]
        assert [(h.actor, h.summary) for h in history][0] == ("user4", "ga")
        assert [h.summary for h in history] == list(reversed(stages))
        assert all(isinstance(h, VersionInfo) and h.created_at > 0 for h in history)
        assert [h.version for h in await store.history(limit=2)] == [5, 4]
        third = await store.get(3)
        assert third.version == 3 and third.info.actor == "user2"
        assert third.document.releases["web"].stage == "beta"
        for missing in (0, 6, 1000):
            with pytest.raises(VersionNotFound) as info:
                await store.get(missing)
            assert info.value.version == missing

    run(scenario)


def test_store_survives_restart(tmp_path: Path) -> None:
    """A new FileStore on the same directory sees every version, its metadata and the CAS state."""

    async def scenario() -> None:
        first = await opened(tmp_path)
        for i, stage in enumerate(["internal", "beta", "open"]):
            await first.commit(doc(stage), expected_version=i, actor="ann", summary=stage)
        before = [await first.get(v) for v in (1, 2, 3)]
        await first.close()

        second = await opened(tmp_path)
        assert await second.current_version() == 3
        assert [await second.get(v) for v in (1, 2, 3)] == before
        assert (await second.latest()) == before[-1]
        assert [h.summary for h in await second.history()] == ["open", "beta", "internal"]
        with pytest.raises(VersionConflict):
            await second.commit(doc(), expected_version=2, actor="bob", summary="stale")
        fourth = await second.commit(doc("ga"), expected_version=3, actor="bob", summary="ga")
        assert fourth.version == 4

    run(scenario)


def test_files_are_written_atomically(tmp_path: Path) -> None:
    """Only version files, the marker and the lock remain: no temp files are left behind."""

    async def scenario() -> None:
        store = await opened(tmp_path)
        for i in range(4):
            await store.commit(doc(), expected_version=i, actor="a", summary=str(i))
        with pytest.raises(VersionConflict):
            await store.commit(doc(), expected_version=0, actor="a", summary="stale")
        expected = {"versions", "CURRENT", ".lock"} | {
            f"versions/{v:012d}.json" for v in range(1, 5)
        }
        assert listing(tmp_path) == expected
        assert (tmp_path / "CURRENT").read_text() == "4"
        stored = orjson.loads((tmp_path / "versions" / f"{4:012d}.json").read_bytes())
        assert stored["info"]["version"] == stored["document"]["version"] == 4

    run(scenario)


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"{not json",
        b'{"info": {"version": 2}}',
        b"[]",
        pytest.param(None, id="invalid-document"),
        pytest.param(b"mismatch", id="version-mismatch"),
    ],
    ids=["empty", "garbage", "no-document", "array", "invalid-document", "version-mismatch"],
)
def test_corrupt_version_file_is_a_config_error(tmp_path: Path, content: bytes | None) -> None:
    """A torn, foreign or invalid version file raises ConfigError on read, never a document."""

    async def scenario() -> None:
        store = await opened(tmp_path)
        await store.commit(doc(), expected_version=0, actor="a", summary="one")
        good = await store.commit(doc("open"), expected_version=1, actor="a", summary="two")
        path = tmp_path / "versions" / f"{2:012d}.json"
        raw = orjson.loads(path.read_bytes())
        if content is None:
            raw["document"]["releases"]["web"]["stage"] = "nonsense"
            data = orjson.dumps(raw)
        elif content == b"mismatch":
            raw["document"]["version"] = 7
            data = orjson.dumps(raw)
        else:
            data = content
        path.write_bytes(data)
        with pytest.raises(ConfigError):
            await store.get(2)
        with pytest.raises(ConfigError):
            await store.latest()
        assert (await store.get(1)).version == 1
        assert good.version == 2

    run(scenario)


def test_corrupt_marker_is_a_store_error(tmp_path: Path) -> None:
    """A CURRENT marker that is not a number is a StoreError, not version 0."""

    async def scenario() -> None:
        store = await opened(tmp_path)
        await store.commit(doc(), expected_version=0, actor="a", summary="one")
        (tmp_path / "CURRENT").write_text("garbage")
        with pytest.raises(StoreError):
            await store.current_version()
        with pytest.raises(StoreError):
            await store.commit(doc(), expected_version=1, actor="a", summary="two")

    run(scenario)


def test_seed_writes_only_when_behind(tmp_path: Path) -> None:
    """seed keeps the revision's own version and writes only into a store that is behind it."""

    async def scenario() -> None:
        source = await opened(tmp_path / "a")
        rev = None
        for i in range(3):
            rev = await source.commit(doc(), expected_version=i, actor="a", summary=str(i))
        assert rev is not None
        empty = await opened(tmp_path / "b")
        assert await empty.seed(rev) is True
        assert await empty.current_version() == 3
        assert await empty.get(3) == rev
        assert await empty.seed(rev) is False

    run(scenario)


def test_filestore_is_a_store() -> None:
    """FileStore satisfies the Store protocol."""
    assert isinstance(FileStore("/nonexistent"), Store)


# -- other processes ------------------------------------------------------------------------------

WATCH_SCRIPT = """
import asyncio, sys
from stores.filestore import FileStore

async def main():
    store = FileStore(sys.argv[1], poll_interval_s=0.02)
    await store.open()
    async with asyncio.timeout(30):
        async for version in store.changes():
            if version == 1:
                print("ready", flush=True)
            elif version >= 2:
                print(f"version {version}", flush=True)
                break
    await store.close()

asyncio.run(main())
"""


@pytest.mark.timeout(60)
def test_second_process_sees_new_version(tmp_path: Path) -> None:
    """A FileStore in another process sees a version committed here through changes()."""

    async def commit(version: int) -> None:
        store = await opened(tmp_path)
        await store.commit(doc(), expected_version=version - 1, actor="a", summary=str(version))

    run(lambda: commit(1))
    proc = subprocess.Popen(
        [sys.executable, "-c", WATCH_SCRIPT, str(tmp_path)],
        cwd=REPO,
        env=subprocess_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline()
        assert first == "ready\n", proc.stderr.read() if proc.stderr else first
        run(lambda: commit(2))
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    assert out == "version 2\n"


CAS_SCRIPT = """
import asyncio, pathlib, sys, time
from flags.document import load_document
from flags.errors import VersionConflict
from stores.filestore import FileStore

async def main():
    root, barrier, name = sys.argv[1], pathlib.Path(sys.argv[2]), sys.argv[3]
    store = FileStore(root)
    await store.open()
    expected = await store.current_version()
    document = load_document(
        {"releases": {name: {"stable": ["http://s"], "canary": ["http://c"]}}}
    )
    print(f"ready {expected}", flush=True)
    deadline = time.monotonic() + 30
    while not barrier.exists():
        if time.monotonic() > deadline:
            sys.exit("barrier never came")
        time.sleep(0.0005)
    try:
        revision = await store.commit(
            document, expected_version=expected, actor=name, summary=name
        )
    except VersionConflict as exc:
        print(f"conflict {exc.actual}", flush=True)
    else:
        print(f"won {revision.version}", flush=True)

asyncio.run(main())
"""


@pytest.mark.timeout(60)
@pytest.mark.parametrize("round_", range(3))
def test_concurrent_commits_from_two_processes(tmp_path: Path, round_: int) -> None:
    """Two processes committing on one expected version: exactly one wins."""

    async def seed() -> None:
        store = await opened(tmp_path / "store")
        await store.commit(doc(), expected_version=0, actor="seed", summary="seed")

    run(seed)
    barrier = tmp_path / "go"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", CAS_SCRIPT, str(tmp_path / "store"), str(barrier), name],
            cwd=REPO,
            env=subprocess_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name in ("alpha", "beta")
    ]
    try:
        for proc in procs:
            assert proc.stdout is not None
            line = proc.stdout.readline()
            assert line == "ready 1\n", proc.stderr.read() if proc.stderr else line
        barrier.touch()
        results = [proc.communicate(timeout=30) for proc in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    assert [proc.returncode for proc in procs] == [0, 0], [err for _, err in results]
    outcomes = sorted(out.strip() for out, _ in results)
    assert outcomes == ["conflict 2", "won 2"]
    winner = ("alpha", "beta")[[out.strip() for out, _ in results].index("won 2")]

    async def check() -> None:
        store = await opened(tmp_path / "store")
        assert await store.current_version() == 2
        latest = await store.latest()
        assert latest is not None and latest.info.actor == winner
        assert list(latest.document.releases) == [winner]
        assert [h.version for h in await store.history()] == [2, 1]
        with pytest.raises(VersionNotFound):
            await store.get(3)

    run(check)


# -- ConfigWatcher over a FileStore ---------------------------------------------------------------


def write_raw_version(root: Path, version: int, document: dict[str, Any]) -> None:
    """Write a version file and the marker directly, bypassing validation (a foreign writer)."""
    info = {"version": version, "created_at": 1.0, "actor": "intruder", "summary": "raw"}
    payload = orjson.dumps({"info": info, "document": {**document, "version": version}})
    write_atomic(root / "versions" / f"{version:012d}.json", payload)
    write_atomic(root / "CURRENT", str(version).encode())


@pytest.mark.timeout(60)
def test_watcher_applies_rejects_and_writes_bootstrap(tmp_path: Path) -> None:
    """Watcher applies new versions, rejects an invalid one once (LKG kept), writes bootstrap."""
    root, boot = tmp_path / "store", tmp_path / "boot" / "bootstrap.json"

    async def scenario() -> None:
        writer = await opened(root)
        await writer.commit(doc("internal"), expected_version=0, actor="ann", summary="v1")
        watcher = ConfigWatcher(
            FileStore(root, poll_interval_s=FAST_POLL_S),
            bootstrap_path=boot,
            poll_interval_s=0.05,
        )
        await watcher.start()
        try:
            assert (watcher.version, watcher.source, watcher.ready) == (1, SOURCE_STORE, True)
            assert not watcher.stale

            await writer.commit(doc("beta"), expected_version=1, actor="ann", summary="v2")
            await until(lambda: watcher.version == 2)
            assert watcher.snapshot.document.releases["web"].stage == "beta"
            await until(
                lambda: boot.exists() and decode_bootstrap(boot.read_bytes())[0].version == 2
            )

            bad = doc("open").model_dump(mode="json")
            bad["releases"]["web"]["canary"] = ["ftp://nope"]
            write_raw_version(root, 3, bad)
            await until(lambda: watcher.rejected[REJECT_INVALID] >= 1)
            for _ in range(3):
                await watcher.sync()
            assert watcher.rejected[REJECT_INVALID] == 1
            assert watcher.last_reject_reason == REJECT_INVALID
            assert watcher.version == 2
            assert watcher.snapshot.document.releases["web"].stage == "beta"

            await writer.commit(doc("ga"), expected_version=3, actor="ann", summary="v4")
            await until(lambda: watcher.version == 4)
            assert watcher.snapshot.document.releases["web"].stage == "ga"
        finally:
            await watcher.stop()
        revision, override = decode_bootstrap(boot.read_bytes())
        assert override is None
        assert revision.version == 4
        assert revision.document.releases["web"].stage == "ga"

    run(scenario)


@pytest.mark.timeout(60)
def test_cold_start_with_unreadable_store_serves_bootstrap(tmp_path: Path) -> None:
    """With the store dir unusable at start, the watcher serves the bootstrap copy (stale)."""
    good = tmp_path / "good"
    boot = tmp_path / "bootstrap.json"

    async def prepare() -> Revision:
        store = await opened(good)
        await store.commit(doc("internal"), expected_version=0, actor="a", summary="1")
        return await store.commit(doc("open"), expected_version=1, actor="a", summary="2")

    boot.write_bytes(encode_bootstrap(run(prepare)))
    not_a_dir = tmp_path / "store-is-a-file"
    not_a_dir.write_bytes(b"not a directory")

    async def scenario() -> None:
        watcher = ConfigWatcher(
            FileStore(not_a_dir, poll_interval_s=FAST_POLL_S),
            bootstrap_path=boot,
            poll_interval_s=0.05,
        )
        await watcher.start()
        try:
            assert watcher.source == SOURCE_BOOTSTRAP
            assert watcher.version == 2
            assert watcher.ready and watcher.stale and watcher.snapshot.stale
            assert watcher.snapshot.document.releases["web"].stage == "open"
        finally:
            await watcher.stop()

    run(scenario)


@pytest.mark.timeout(60)
def test_cold_start_without_store_or_bootstrap_serves_default(tmp_path: Path) -> None:
    """With neither store nor bootstrap the watcher serves the safe empty default, not ready."""
    not_a_dir = tmp_path / "store-is-a-file"
    not_a_dir.write_bytes(b"x")

    async def scenario() -> None:
        watcher = ConfigWatcher(
            FileStore(not_a_dir, poll_interval_s=FAST_POLL_S),
            bootstrap_path=tmp_path / "missing.json",
            poll_interval_s=0.05,
        )
        await watcher.start()
        try:
            assert watcher.source == SOURCE_DEFAULT
            assert not watcher.ready
            assert watcher.snapshot.document.releases == {}
        finally:
            await watcher.stop()

    run(scenario)
