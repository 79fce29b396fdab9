"""The Redis store and the watcher against real redis-server processes (HARDENING.md §8
rows 8-14, 17). No fakes, no timing assertions: waits are bounds, never measurements."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import orjson
import pytest

from flags.changes import put_release, rollback, set_stage
from flags.document import Document, load_document
from flags.errors import StoreError, StoreUnavailable, VersionConflict, VersionNotFound
from flags.store import Revision, VersionInfo
from stores.factory import make_store
from stores.filestore import FileStore
from stores.redisstore import RedisStore, parse_sentinel_url
from stores.revision import checksum, encode_revision
from stores.watch import ConfigWatcher, decode_bootstrap
from tests.redisproc import BlackholeProxy, free_port, redis_server, sentinel_cluster
from tests.routing import route

PREFIX = "turnout"
WAIT_S = 5.0


def make_doc(stage: str = "beta") -> Document:
    return load_document(
        {
            "releases": {
                "web": {
                    "stable": ["http://stable.internal:8080"],
                    "canary": ["http://canary.internal:8080"],
                    "stage": stage,
                }
            },
            "routes": [{"host": "*", "path_prefix": "/", "release": "web"}],
        }
    )


def store_for(url: str, **kwargs: Any) -> RedisStore:
    return RedisStore.from_url(url, key_prefix=PREFIX, **kwargs)


async def eventually(
    predicate: Callable[[], bool | Awaitable[bool]], what: str, timeout_s: float = WAIT_S
) -> None:
    """Wait (bounded) until `predicate` holds; fail with `what` otherwise."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        result = predicate()
        if not isinstance(result, bool):
            result = await result
        if result:
            return
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for: {what}")
        await asyncio.sleep(0.02)


async def commit_next(store: RedisStore, doc: Document, summary: str) -> Revision:
    current = await store.current_version()
    return await store.commit(doc, expected_version=current, actor="test", summary=summary)


def raw_revision(version: int, document: dict[str, Any]) -> bytes:
    """A stored revision built by hand, as `redis-cli SET` would write it."""
    info = VersionInfo.now(version, "intruder", "hand-written").to_dict()
    return orjson.dumps({"info": info, "document": {**document, "version": version}})


@pytest.mark.timeout(60)
def test_commit_is_compare_and_set_with_history(tmp_path: Path) -> None:
    """Commits get consecutive versions, are readable by version, listed newest first,
    and a stale expected version is a VersionConflict."""

    async def main() -> None:
        with redis_server(tmp_path) as srv:
            store = store_for(srv.url)
            try:
                await store.open()
                assert await store.current_version() == 0
                assert await store.latest() is None
                r1 = await store.commit(make_doc(), expected_version=0, actor="a", summary="one")
                r2 = await store.commit(
                    make_doc("ga"), expected_version=1, actor="b", summary="two"
                )
                assert (r1.version, r2.version) == (1, 2)
                assert await store.current_version() == 2
                got = await store.get(1)
                assert got.document == r1.document and got.info == r1.info
                latest = await store.latest()
                assert latest is not None and latest.document.releases["web"].stage == "ga"
                assert [i.version for i in await store.history()] == [2, 1]
                assert [i.summary for i in await store.history(limit=1)] == ["two"]
                with pytest.raises(VersionConflict) as conflict:
                    await store.commit(make_doc(), expected_version=1, actor="c", summary="x")
                assert conflict.value.actual == 2
                with pytest.raises(VersionNotFound):
                    await store.get(99)
                with srv.client() as r:
                    stored = r.get(f"{PREFIX}:rev:2")
                    assert stored == encode_revision(r2)
                    assert r.hget(f"{PREFIX}:sha256", "2") == checksum(stored).encode()
            finally:
                await store.close()

    asyncio.run(main())


@pytest.mark.timeout(60)
def test_concurrent_writers_exactly_one_wins(tmp_path: Path) -> None:
    """Two writers committing on the same version: one wins, the other gets VersionConflict,
    and the store holds exactly the winner's document (no lost or merged update)."""

    async def main() -> None:
        with redis_server(tmp_path) as srv:
            a, b = store_for(srv.url), store_for(srv.url)
            try:
                await a.open()
                await b.open()
                await a.commit(make_doc(), expected_version=0, actor="seed", summary="seed")
                for round_no in range(1, 21):
                    results = await asyncio.gather(
                        a.commit(
                            make_doc("ga"), expected_version=round_no, actor="pm", summary="pm"
                        ),
                        b.commit(
                            make_doc("off"), expected_version=round_no, actor="ops", summary="ops"
                        ),
                        return_exceptions=True,
                    )
                    wins = [r for r in results if isinstance(r, Revision)]
                    losses = [r for r in results if isinstance(r, VersionConflict)]
                    assert len(wins) == 1 and len(losses) == 1, results
                    stored = await a.get(round_no + 1)
                    assert stored.info == wins[0].info
                    assert stored.document == wins[0].document
                history = await a.history(limit=1000)
                assert [i.version for i in history] == list(range(21, 0, -1))
            finally:
                await a.close()
                await b.close()

    asyncio.run(main())


@pytest.mark.timeout(60)
def test_pubsub_hint_applies_commit_before_the_poll(tmp_path: Path) -> None:
    """With a 30 s poll interval, a commit reaches the watcher through the pub/sub hint."""

    async def main() -> None:
        with redis_server(tmp_path) as srv:
            writer = store_for(srv.url)
            await writer.open()
            await writer.commit(make_doc(), expected_version=0, actor="t", summary="one")
            watcher = ConfigWatcher(store_for(srv.url), poll_interval_s=30.0)
            try:
                await watcher.start()
                assert watcher.version == 1 and watcher.source == "store"
                with srv.client() as r:
                    await eventually(
                        lambda: r.pubsub_numsub(f"{PREFIX}:changes")[0][1] >= 1,
                        "watcher subscribed",
                    )
                await writer.commit(make_doc("ga"), expected_version=1, actor="t", summary="two")
                await eventually(lambda: watcher.version == 2, "hint applied version 2")
                assert watcher.snapshot.releases["web"].percent == 100.0
            finally:
                await watcher.stop()
                await writer.close()

    asyncio.run(main())


@pytest.mark.timeout(60)
def test_pubsub_killed_while_publishing_applies_within_poll(tmp_path: Path) -> None:
    """CLIENT KILL TYPE pubsub right before a commit: the poll still applies it, and the
    watcher resubscribes."""

    async def main() -> None:
        with redis_server(tmp_path) as srv:
            writer = store_for(srv.url)
            await writer.open()
            await writer.commit(make_doc(), expected_version=0, actor="t", summary="one")
            watcher = ConfigWatcher(store_for(srv.url), poll_interval_s=0.5)
            try:
                await watcher.start()
                with srv.client() as r:
                    channel = f"{PREFIX}:changes"
                    await eventually(lambda: r.pubsub_numsub(channel)[0][1] >= 1, "subscribed")
                    r.execute_command("CLIENT", "KILL", "TYPE", "pubsub")
                    await writer.commit(
                        make_doc("ga"), expected_version=1, actor="t", summary="two"
                    )
                    await eventually(lambda: watcher.version == 2, "version 2 applied")
                    await eventually(lambda: r.pubsub_numsub(channel)[0][1] >= 1, "resubscribed")
                assert watcher.connected and watcher.rejected.total() == 0
            finally:
                await watcher.stop()
                await writer.close()

    asyncio.run(main())


@pytest.mark.timeout(60)
def test_half_open_subscription_is_detected_and_resubscribed(tmp_path: Path) -> None:
    """A blackholed path (sockets open, nothing flows): polls fail and mark the watcher
    disconnected, the silent subscription is abandoned instead of blocking forever, and
    once traffic flows again the watcher resubscribes and catches up."""

    async def main() -> None:
        with redis_server(tmp_path) as srv:
            proxy = await BlackholeProxy(srv.port).start()
            writer = store_for(srv.url)
            watcher = ConfigWatcher(
                store_for(proxy.url, socket_timeout_s=0.5, health_check_interval_s=0.5),
                poll_interval_s=0.3,
            )
            try:
                await writer.open()
                await writer.commit(make_doc(), expected_version=0, actor="t", summary="one")
                await watcher.start()
                channel = f"{PREFIX}:changes"
                with srv.client() as r:
                    await eventually(lambda: r.pubsub_numsub(channel)[0][1] >= 1, "subscribed")
                    proxy.blackholed = True
                    await eventually(lambda: not watcher.connected, "disconnected", 10)
                    await eventually(
                        lambda: r.pubsub_numsub(channel)[0][1] == 0,
                        "silent subscription abandoned",
                        10,
                    )
                    await writer.commit(make_doc("ga"), expected_version=1, actor="t", summary="2")
                    assert watcher.version == 1 and watcher.stale
                    proxy.blackholed = False
                    await eventually(lambda: watcher.version == 2, "caught up", 10)
                    await eventually(
                        lambda: r.pubsub_numsub(channel)[0][1] >= 1, "resubscribed", 10
                    )
                assert watcher.connected
            finally:
                await watcher.stop()
                await writer.close()
                await proxy.stop()

    asyncio.run(main())


@pytest.mark.timeout(60)
def test_cold_start_on_an_empty_redis_serves_and_reseeds_bootstrap(tmp_path: Path) -> None:
    """Cold start while Redis is up but empty (restarted without data): the bootstrap copy
    is served and written back at its own version."""

    async def main() -> None:
        bootstrap = tmp_path / "bootstrap.json"
        doc = make_doc("off").model_copy(update={"version": 7})
        bootstrap.write_bytes(encode_revision(Revision(doc, VersionInfo.now(7, "t", "b"))))
        with redis_server(tmp_path) as srv:
            store = store_for(srv.url)
            watcher = ConfigWatcher(store, bootstrap_path=bootstrap, poll_interval_s=0.2)
            try:
                await watcher.start()
                assert watcher.version == 7 and watcher.ready
                assert watcher.rejected["store_empty"] == 1
                assert await store.current_version() == 7
                await eventually(lambda: watcher.source == "store", "serving from the store")
            finally:
                await watcher.stop()

    asyncio.run(main())


@pytest.mark.timeout(60)
def test_kill9_keeps_lkg_and_reconnects(tmp_path: Path) -> None:
    """Redis killed with -9: the snapshot is untouched, the watcher reports disconnected,
    commits raise StoreUnavailable (never a fake success); after the restart it reconnects
    and applies a new commit."""

    async def main() -> None:
        with redis_server(tmp_path, persistent=True) as srv:
            writer = store_for(srv.url)
            watcher = ConfigWatcher(store_for(srv.url), poll_interval_s=0.2)
            try:
                await writer.open()
                await writer.commit(make_doc(), expected_version=0, actor="t", summary="one")
                await watcher.start()
                before = watcher.snapshot
                assert watcher.version == 1 and watcher.connected

                srv.kill9()
                await eventually(lambda: not watcher.connected, "watcher disconnected")
                assert watcher.snapshot is before and watcher.stale
                decision = route(watcher.snapshot, host="a", path="/", unit_id="u1")
                assert decision.release == "web"
                with pytest.raises(StoreUnavailable):
                    await writer.commit(make_doc("ga"), expected_version=1, actor="t", summary="x")

                srv.restart(empty=False)
                await eventually(lambda: watcher.connected, "watcher reconnected")
                assert watcher.version == 1 and watcher.rejected.total() == 0
                await writer.commit(make_doc("ga"), expected_version=1, actor="t", summary="two")
                await eventually(lambda: watcher.version == 2, "version 2 applied")
            finally:
                await watcher.stop()
                await writer.close()

    asyncio.run(main())


@pytest.mark.timeout(60)
def test_restart_empty_keeps_lkg_and_reseeds(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Redis restarted without data: the empty store is rejected (LKG kept, counted) and the
    watcher re-seeds it with the same version, which other writers then build on."""

    async def main() -> None:
        with redis_server(tmp_path) as srv:
            writer = store_for(srv.url)
            watcher = ConfigWatcher(store_for(srv.url), poll_interval_s=0.2)
            try:
                await writer.open()
                await writer.commit(make_doc(), expected_version=0, actor="t", summary="one")
                await writer.commit(make_doc("off"), expected_version=1, actor="t", summary="kill")
                await watcher.start()
                lkg = watcher.snapshot
                assert watcher.version == 2

                srv.restart(empty=True)
                await eventually(lambda: watcher.rejected["store_empty"] >= 1, "empty rejected")
                assert watcher.snapshot is lkg  # the kill switch stays in force
                await eventually(lambda: _version_is(writer, 2), "store re-seeded at version 2", 10)
                reseeded = await writer.get(2)
                assert watcher.revision is not None
                assert reseeded.document == watcher.revision.document
                assert watcher.version == 2 and watcher.snapshot is lkg
                assert "re-seeded store with version 2 from last-known-good" in caplog.text
                await writer.commit(make_doc("ga"), expected_version=2, actor="t", summary="3")
                await eventually(lambda: watcher.version == 3, "version 3 applied")
            finally:
                await watcher.stop()
                await writer.close()

    with caplog.at_level(logging.INFO):
        asyncio.run(main())


async def _version_is(store: RedisStore, version: int) -> bool:
    try:
        return await store.current_version() == version
    except StoreError:
        return False


@pytest.mark.timeout(60)
def test_restart_empty_without_auto_reseed_waits_for_explicit_reseed(tmp_path: Path) -> None:
    """With reseed_on_empty=False the store stays empty (LKG served) until `reseed()`."""

    async def main() -> None:
        with redis_server(tmp_path) as srv:
            store = store_for(srv.url)
            watcher = ConfigWatcher(store, poll_interval_s=30.0, reseed_on_empty=False)
            try:
                await store.open()
                await store.commit(make_doc(), expected_version=0, actor="t", summary="one")
                await watcher.sync()
                srv.restart(empty=True)
                await watcher.sync()
                await watcher.sync()
                assert watcher.rejected["store_empty"] == 1  # once per episode, not per poll
                assert await store.current_version() == 0 and watcher.version == 1
                assert await watcher.reseed() is True
                assert await store.current_version() == 1
                assert await watcher.reseed() is False  # the store is no longer behind
            finally:
                await watcher.stop()

    asyncio.run(main())


@pytest.mark.timeout(60)
def test_corrupted_revisions_are_rejected_and_next_valid_applies(tmp_path: Path) -> None:
    """Bad JSON, an invalid document and a checksum mismatch written straight into Redis are
    each rejected with their reason while the LKG serves; the next valid commit applies."""

    async def main() -> None:
        with redis_server(tmp_path) as srv:
            writer = store_for(srv.url)
            watcher = ConfigWatcher(store_for(srv.url), poll_interval_s=0.2)
            try:
                await writer.open()
                await writer.commit(make_doc(), expected_version=0, actor="t", summary="one")
                await watcher.start()
                good = make_doc().model_dump(mode="json")
                bad_percent = orjson.loads(orjson.dumps(good))
                bad_percent["releases"]["web"].update(stage="custom", percent=150.0)
                cases = [
                    ("invalid", b"{not json", True),
                    ("invalid", raw_revision(0, bad_percent), True),
                    ("checksum", raw_revision(0, good), False),
                ]
                version = 1
                with srv.client() as r:
                    for reason, payload, right_sum in cases:
                        version += 1
                        if payload.startswith(b'{"info"'):
                            payload = raw_revision(version, orjson.loads(payload)["document"])
                        before = watcher.snapshot
                        count = watcher.rejected[reason]
                        digest = checksum(payload) if right_sum else "0" * 64
                        r.set(f"{PREFIX}:rev:{version}", payload)
                        r.hset(f"{PREFIX}:sha256", str(version), digest)
                        r.set(f"{PREFIX}:current", version)
                        await eventually(
                            lambda reason=reason, count=count: (
                                watcher.rejected[reason] == count + 1
                            ),
                            f"{reason} rejected",
                        )
                        assert watcher.snapshot is before and watcher.version == version - 1
                        assert watcher.last_reject_reason == reason
                        version += 1
                        await writer.commit(
                            make_doc("ga"), expected_version=version - 1, actor="t", summary="ok"
                        )
                        await eventually(
                            lambda version=version: watcher.version == version,
                            f"valid version {version} applied",
                        )
                assert watcher.rejected == {"invalid": 2, "checksum": 1}
            finally:
                await watcher.stop()
                await writer.close()

    asyncio.run(main())


@pytest.mark.timeout(60)
def test_pointer_moved_backwards_is_rejected(tmp_path: Path) -> None:
    """A version pointer set backwards is rejected (LKG kept); a commit on it cannot
    overwrite an existing version, and `reseed()` repairs the store."""

    async def main() -> None:
        with redis_server(tmp_path) as srv:
            writer = store_for(srv.url)
            watcher = ConfigWatcher(store_for(srv.url), poll_interval_s=0.2)
            try:
                await writer.open()
                for n in range(3):
                    await writer.commit(make_doc(), expected_version=n, actor="t", summary=str(n))
                await watcher.start()
                lkg = watcher.snapshot
                with srv.client() as r:
                    r.set(f"{PREFIX}:current", 1)
                await eventually(
                    lambda: watcher.rejected["version_regressed"] == 1, "regression rejected"
                )
                assert watcher.snapshot is lkg and watcher.version == 3
                with pytest.raises(StoreError, match="already exists"):
                    await writer.commit(make_doc("ga"), expected_version=1, actor="t", summary="x")
                assert await writer.current_version() == 1
                assert await watcher.reseed() is True
                assert await writer.current_version() == 3
                await writer.commit(make_doc("ga"), expected_version=3, actor="t", summary="4")
                await eventually(lambda: watcher.version == 4, "version 4 applied")
                assert watcher.rejected["version_regressed"] == 1
            finally:
                await watcher.stop()
                await writer.close()

    asyncio.run(main())


@pytest.mark.timeout(60)
def test_client_pause_does_not_touch_the_request_path(tmp_path: Path) -> None:
    """CLIENT PAUSE 3000: the snapshot stays readable and usable while `sync()` fails with
    a clean StoreError/TimeoutError; after the pause the store answers again."""

    async def main() -> None:
        with redis_server(tmp_path) as srv:
            store = store_for(srv.url)
            watcher = ConfigWatcher(store, poll_interval_s=30.0)
            try:
                await store.open()
                await store.commit(make_doc(), expected_version=0, actor="t", summary="one")
                await watcher.sync()
                snapshot = watcher.snapshot
                srv.pause(3000)
                hung = asyncio.create_task(watcher.sync())
                for _ in range(20):
                    assert watcher.snapshot is snapshot
                    decision = route(watcher.snapshot, host="h", path="/x", unit_id="u")
                    assert decision.release == "web"
                    await asyncio.sleep(0.01)
                with pytest.raises((StoreError, TimeoutError)):
                    await hung
                assert watcher.snapshot is snapshot and watcher.version == 1
                await eventually(lambda: _sync_ok(watcher), "store answers after the pause", 10)
            finally:
                await watcher.stop()

    asyncio.run(main())


async def _sync_ok(watcher: ConfigWatcher) -> bool:
    try:
        await watcher.sync()
    except (StoreError, TimeoutError):
        return False
    return True


@pytest.mark.timeout(60)
def test_cold_start_with_redis_down_serves_bootstrap(tmp_path: Path) -> None:
    """Cold start with Redis down and a bootstrap file: the bootstrap copy is served
    (ready, stale)."""

    async def main() -> None:
        bootstrap = tmp_path / "bootstrap.json"
        doc = make_doc("open").model_copy(update={"version": 5})
        bootstrap.write_bytes(encode_revision(Revision(doc, VersionInfo.now(5, "t", "b"))))
        url = f"redis://127.0.0.1:{free_port()}/0"
        watcher = ConfigWatcher(store_for(url), bootstrap_path=bootstrap, poll_interval_s=0.2)
        try:
            await watcher.start()
            assert watcher.source == "bootstrap" and watcher.ready and watcher.stale
            assert watcher.version == 5 and not watcher.connected
            assert watcher.snapshot.releases["web"].percent == 50.0
        finally:
            await watcher.stop()

    asyncio.run(main())


@pytest.mark.timeout(60)
def test_cold_start_with_redis_down_and_no_bootstrap_serves_default(tmp_path: Path) -> None:
    """Cold start with Redis down and no bootstrap: the safe default, not ready."""

    async def main() -> None:
        url = f"redis://127.0.0.1:{free_port()}/0"
        watcher = ConfigWatcher(
            store_for(url), bootstrap_path=tmp_path / "missing.json", poll_interval_s=0.2
        )
        try:
            await watcher.start()
            assert watcher.source == "default" and not watcher.ready and watcher.stale
            assert watcher.version == 0 and not watcher.snapshot.releases
        finally:
            await watcher.stop()

    asyncio.run(main())


@pytest.mark.timeout(60)
def test_local_override_while_redis_down_becomes_a_version(tmp_path: Path) -> None:
    """A rollback applied locally while Redis is down is served at once, kept in the
    bootstrap file, and committed as a new version once Redis is back."""

    async def main() -> None:
        bootstrap = tmp_path / "bootstrap.json"
        with redis_server(tmp_path, persistent=True) as srv:
            writer = store_for(srv.url)
            watcher = ConfigWatcher(
                store_for(srv.url), bootstrap_path=bootstrap, poll_interval_s=0.2
            )
            try:
                await writer.open()
                await writer.commit(make_doc("ga"), expected_version=0, actor="t", summary="1")
                await watcher.start()
                srv.kill9()
                await eventually(lambda: not watcher.connected, "disconnected")

                doc, summary = rollback(watcher.snapshot.document, "web", "incident 42")
                await watcher.apply_local_override(doc, summary, actor="ops@example.com")
                assert watcher.snapshot.releases["web"].percent == 0.0
                assert watcher.pending_override and watcher.version == 1
                revision, override = decode_bootstrap(bootstrap.read_bytes())
                assert override is not None and override.base_version == 1
                assert revision.document.releases["web"].stage == "off"
                assert orjson.loads(bootstrap.read_bytes())["local_override"] is True

                srv.restart(empty=False)
                await eventually(lambda: not watcher.pending_override, "override committed")
                latest = await writer.latest()
                assert latest is not None and latest.version == 2
                assert latest.document.releases["web"].stage == "off"
                assert latest.info.actor == "ops@example.com"
                assert watcher.version == 2 and watcher.source == "store"
                await watcher.stop()
                _, override = decode_bootstrap(bootstrap.read_bytes())
                assert override is None
            finally:
                await watcher.stop()
                await writer.close()

    asyncio.run(main())


@pytest.mark.timeout(60)
def test_local_override_is_rebased_when_the_store_moved_on(tmp_path: Path) -> None:
    """If the store moved past the override's base, the override's release entries are
    re-applied on top of the latest version (the other change is kept)."""

    async def main() -> None:
        with redis_server(tmp_path) as srv:
            writer = store_for(srv.url)
            watcher = ConfigWatcher(store_for(srv.url), bootstrap_path=tmp_path / "b.json")
            try:
                await writer.open()
                await writer.commit(make_doc("ga"), expected_version=0, actor="t", summary="1")
                await watcher.sync()
                doc, summary = rollback(watcher.snapshot.document, "web", "bad deploy")
                await watcher.apply_local_override(doc, summary, actor="ops")
                other, _ = put_release(
                    make_doc("ga"),
                    "api",
                    {"stable": ["http://api-s:80"], "canary": ["http://api-c:80"]},
                )
                other, _ = set_stage(other, "api", stage="beta")
                await writer.commit(other, expected_version=1, actor="pm", summary="api")
                await watcher.sync()
                assert not watcher.pending_override
                latest = await writer.latest()
                assert latest is not None and latest.version == 3
                assert latest.document.releases["web"].stage == "off"
                assert latest.document.releases["api"].stage == "beta"
                assert watcher.version == 3
            finally:
                await watcher.stop()
                await writer.close()

    asyncio.run(main())


@pytest.mark.timeout(60)
def test_sentinel_failover_during_commits_loses_nothing(tmp_path: Path) -> None:
    """SENTINEL FAILOVER while commits run: the store follows the new master, every commit
    that returned is really in Redis afterwards, every other one raised a StoreError."""

    async def main() -> None:
        with sentinel_cluster(tmp_path) as cluster:
            old_master = cluster.master_port()
            writer = store_for(cluster.url, wait_replicas=1, wait_timeout_ms=1000)
            watcher = ConfigWatcher(store_for(cluster.url), poll_interval_s=0.2)
            ok: list[Revision] = []
            failed: list[StoreError] = []
            after_failover = asyncio.Event()
            stop = asyncio.Event()

            async def commit_loop() -> None:
                attempt = 0
                successes_after = 0
                while not stop.is_set():
                    attempt += 1
                    doc = make_doc("ga" if attempt % 2 else "beta")
                    try:
                        rev = await commit_next(writer, doc, f"attempt {attempt}")
                    except StoreError as exc:
                        failed.append(exc)
                        await asyncio.sleep(0.05)
                        continue
                    ok.append(rev)
                    if after_failover.is_set():
                        successes_after += 1
                        if successes_after >= 5:
                            return
                    await asyncio.sleep(0.01)

            try:
                await writer.open()
                await watcher.start()
                loop_task = asyncio.create_task(commit_loop())
                await eventually(lambda: len(ok) >= 3, "commits before the failover", 10)
                new_master = await asyncio.to_thread(cluster.failover)
                assert new_master != old_master
                after_failover.set()
                try:
                    await asyncio.wait_for(loop_task, 40)
                finally:
                    stop.set()
                checker = store_for(cluster.url)
                try:
                    await checker.open()
                    for rev in ok:
                        stored = await checker.get(rev.version)
                        assert stored.info == rev.info, f"commit {rev.version} lost"
                    final = await checker.current_version()
                finally:
                    await checker.close()
                assert final == max(r.version for r in ok)
                await eventually(lambda: watcher.version == final, "watcher on new master", 15)
            finally:
                stop.set()
                await watcher.stop()
                await writer.close()

    asyncio.run(main())


def test_parse_sentinel_url() -> None:
    """Sentinel URLs name several sentinels, the master and optionally the db."""
    target = parse_sentinel_url("redis+sentinel://:pw@h1:26380,h2/mymaster/3")
    assert target.sentinels == (("h1", 26380), ("h2", 26379))
    assert (target.service, target.db, target.password) == ("mymaster", 3, "pw")
    with pytest.raises(StoreError):
        parse_sentinel_url("redis+sentinel://h1:1")


def test_make_store_picks_the_backend(tmp_path: Path) -> None:
    """Paths and file:// give a FileStore, redis URLs a RedisStore."""
    assert isinstance(make_store(str(tmp_path), poll_interval_s=1), FileStore)
    assert isinstance(make_store(f"file://{tmp_path}", poll_interval_s=1), FileStore)
    store = make_store("redis://127.0.0.1:1/0", poll_interval_s=1)
    assert isinstance(store, RedisStore)
    asyncio.run(store.close())
