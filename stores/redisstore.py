"""The Redis store: `Store` on Redis (standalone or Sentinel), HARDENING.md §4.2.

Rules of this file:
* This is the ONLY module that imports `redis` (DESIGN.md §1 rule 1). Every
  `redis.exceptions.*`, `OSError` and `TimeoutError` is mapped here, in `_mapped()`, to
  `StoreUnavailable` (cannot reach / cannot confirm) or `StoreError` (anything else).
* Keys (`{p}` = key_prefix):
      {p}:rev:{n}   one immutable revision, `revision.encode_revision` bytes
      {p}:current   the current version (decimal string), the pointer polled as the truth
      {p}:sha256    hash version -> sha256 hex of {p}:rev:{n}, beside the pointer;
                    verified on every read (mismatch = `ConfigError` on field "checksum")
      {p}:history   list of VersionInfo JSON, newest first
      {p}:changes   pub/sub channel carrying the new version (a hint, never the truth)
  All of them are written by ONE Lua script per write (commit / seed), so a reader never
  sees half a change (HARDENING.md §4.2 "partial update visibility").
* Writes are never retried by redis-py (`Retry(..., 0)`): a commit whose reply was lost is
  reported as `StoreUnavailable` ("outcome unknown"), never as a success nor re-sent.
  With `wait_replicas > 0` a commit is only reported done after `WAIT` saw the replicas
  and the pointer was read back.
* `changes()` has its own connection, polls with `get_message(timeout=...)` and pings
  itself: a silent (half-open) subscription raises `StoreUnavailable` after a deadline
  instead of blocking forever (redis-py's own health check only *sends* a PING).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import unquote, urlsplit

import orjson
import redis.asyncio as aioredis
from redis import exceptions as rex
from redis.asyncio.client import PubSub
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool
from redis.backoff import NoBackoff

from flags.document import Document
from flags.errors import (
    ConfigError,
    StoreError,
    StoreUnavailable,
    VersionConflict,
    VersionNotFound,
)
from flags.store import Revision, VersionInfo
from stores.revision import checksum, decode_revision, encode_revision

log = logging.getLogger("turnout.redisstore")

DEFAULT_KEY_PREFIX = "turnout"
DEFAULT_SENTINEL_PORT = 26379
PUBSUB_READ_TIMEOUT_S = 0.5
MASTER_CHECK_INTERVAL_S = 1.0
"""Sentinel: how often reads re-ask where the master is (commits always ask)."""
"""How long one `get_message` waits: bounds how late `close()` is noticed."""

T = TypeVar("T")

# KEYS: current, sha256, history, rev:{expected+1}
# ARGV: expected, new version, revision bytes, sha256, info JSON, channel
# Returns {1, new} on success, {0, current} when the CAS lost, {-1, current} when the
# revision key already exists (the pointer went backwards: never overwrite a version),
# {-2, 0} when the pointer is not a number.
_COMMIT_LUA = """
local raw = redis.call('GET', KEYS[1])
local cur = 0
if raw then
  cur = tonumber(raw)
  if cur == nil then return {-2, 0} end
end
if cur ~= tonumber(ARGV[1]) then return {0, cur} end
if redis.call('EXISTS', KEYS[4]) == 1 then return {-1, cur} end
redis.call('SET', KEYS[4], ARGV[3])
redis.call('HSET', KEYS[2], ARGV[2], ARGV[4])
redis.call('SET', KEYS[1], ARGV[2])
redis.call('LPUSH', KEYS[3], ARGV[5])
redis.call('PUBLISH', ARGV[6], ARGV[2])
return {1, tonumber(ARGV[2])}
"""

# KEYS: current, sha256, history, rev:{version}
# ARGV: version, revision bytes, sha256, info JSON, channel
# Writes the revision at its own version iff the pointer is missing or lower
# (re-seeding after data loss). Returns 1 when written, 0 otherwise.
_SEED_LUA = """
local raw = redis.call('GET', KEYS[1])
local cur = 0
if raw then cur = tonumber(raw) or 0 end
if cur >= tonumber(ARGV[1]) then return 0 end
redis.call('SET', KEYS[4], ARGV[2])
redis.call('HSET', KEYS[2], ARGV[1], ARGV[3])
redis.call('SET', KEYS[1], ARGV[1])
redis.call('LPUSH', KEYS[3], ARGV[4])
redis.call('PUBLISH', ARGV[5], ARGV[1])
return 1
"""

# Error replies that mean "this node cannot serve us right now" rather than "bad request".
_UNAVAILABLE_REPLIES = ("READONLY", "LOADING", "MASTERDOWN", "NOREPLICAS", "BUSY")


@contextlib.contextmanager
def _mapped(action: str) -> Iterator[None]:
    """The one boundary where redis errors become the store's errors."""
    try:
        yield
    except (rex.ConnectionError, rex.TimeoutError, rex.ReadOnlyError) as exc:
        raise StoreUnavailable(f"redis {action}: {type(exc).__name__}: {exc}") from exc
    except rex.ResponseError as exc:
        if str(exc).upper().lstrip("-").startswith(_UNAVAILABLE_REPLIES):
            raise StoreUnavailable(f"redis {action}: {exc}") from exc
        raise StoreError(f"redis {action}: {exc}") from exc
    except rex.RedisError as exc:
        raise StoreError(f"redis {action}: {type(exc).__name__}: {exc}") from exc
    except OSError as exc:  # includes the builtin TimeoutError
        raise StoreUnavailable(f"redis {action}: {type(exc).__name__}: {exc}") from exc


@dataclass(frozen=True, slots=True)
class SentinelTarget:
    """A parsed `redis+sentinel://h:p,h:p/master[/db]` URL."""

    sentinels: tuple[tuple[str, int], ...]
    service: str
    db: int
    password: str | None


def parse_sentinel_url(url: str) -> SentinelTarget:
    parts = urlsplit(url)
    netloc = parts.netloc
    password: str | None = None
    if "@" in netloc:
        userinfo, netloc = netloc.rsplit("@", 1)
        password = unquote(userinfo.split(":", 1)[-1]) or None
    sentinels: list[tuple[str, int]] = []
    for item in netloc.split(","):
        host, _, port = item.strip().rpartition(":")
        if not host:
            host, port = port, str(DEFAULT_SENTINEL_PORT)
        if not host or not port.isdigit():
            raise StoreError(f"invalid sentinel address {item!r} in {url!r}")
        sentinels.append((host.strip("[]"), int(port)))
    segments = [s for s in parts.path.split("/") if s]
    if not segments or len(segments) > 2:
        raise StoreError(f"sentinel URL needs /master-name[/db]: {url!r}")
    db = segments[1] if len(segments) == 2 else "0"
    if not db.isdigit():
        raise StoreError(f"invalid db {db!r} in {url!r}")
    return SentinelTarget(tuple(sentinels), segments[0], int(db), password)


class RedisStore:
    """`Store` on Redis. Build it with `RedisStore.from_url`."""

    # Read by edge/app.py without importing this module (and the Redis client) for a file store.
    is_redis = True

    def __init__(
        self,
        client: aioredis.Redis,
        *,
        key_prefix: str = DEFAULT_KEY_PREFIX,
        health_check_interval_s: float = 5.0,
        socket_timeout_s: float = 1.0,
        wait_replicas: int = 0,
        wait_timeout_ms: int = 200,
        sentinel: Sentinel | None = None,
        description: str = "redis",
    ) -> None:
        self._client = client
        self._sentinel = sentinel
        self.description = description
        self.prefix = key_prefix
        self.key_current = f"{key_prefix}:current"
        self.key_sums = f"{key_prefix}:sha256"
        self.key_history = f"{key_prefix}:history"
        self.channel = f"{key_prefix}:changes"
        self.health_check_interval_s = health_check_interval_s
        self.socket_timeout_s = socket_timeout_s
        self.wait_replicas = wait_replicas
        self.wait_timeout_ms = wait_timeout_ms
        self.run_id: str | None = None
        self.restarts_seen = 0
        self._commit_script = client.register_script(_COMMIT_LUA)
        self._seed_script = client.register_script(_SEED_LUA)
        self._closed = asyncio.Event()
        self._master_checked = -MASTER_CHECK_INTERVAL_S
        # Bumped on every Sentinel failover seen (Store protocol: `generation`).
        self.generation = 0
        self._last_master: tuple[str, int] | None = None

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        key_prefix: str = DEFAULT_KEY_PREFIX,
        socket_timeout_s: float = 1.0,
        connect_timeout_s: float = 1.0,
        health_check_interval_s: float = 5.0,
        wait_replicas: int = 0,
        wait_timeout_ms: int = 200,
    ) -> RedisStore:
        """`redis://host:port/db`, `rediss://…`, `unix://…` or
        `redis+sentinel://host:port,host:port/master-name[/db]`."""
        # Explicit timeouts everywhere (redis-py has no default socket timeout) and no
        # automatic retry: a re-sent commit could be applied twice or misreported.
        # WAIT blocks on the server for up to wait_timeout_ms: the read timeout must
        # outlast it, or every unconfirmed write would look like a dead socket.
        read_timeout_s = socket_timeout_s
        if wait_replicas > 0:
            read_timeout_s += wait_timeout_ms / 1000
        options: dict[str, Any] = {
            "socket_timeout": read_timeout_s,
            "socket_connect_timeout": connect_timeout_s,
            "socket_keepalive": True,
            "health_check_interval": max(1, round(health_check_interval_s)),
            "retry": Retry(NoBackoff(), 0),
        }
        scheme = urlsplit(url).scheme.lower()
        common: dict[str, Any] = {
            "key_prefix": key_prefix,
            "health_check_interval_s": health_check_interval_s,
            "socket_timeout_s": read_timeout_s,
            "wait_replicas": wait_replicas,
            "wait_timeout_ms": wait_timeout_ms,
        }
        if scheme == "redis+sentinel":
            target = parse_sentinel_url(url)
            # redis-py leaves Sentinel.__init__ and PubSub.aclose unannotated.
            sentinel = Sentinel(  # type: ignore[no-untyped-call]
                list(target.sentinels),
                sentinel_kwargs={
                    "socket_timeout": socket_timeout_s,
                    "socket_connect_timeout": connect_timeout_s,
                    "retry": Retry(NoBackoff(), 0),
                },
            )
            client = sentinel.master_for(
                target.service, db=target.db, password=target.password, **options
            )
            where = ",".join(f"{h}:{p}" for h, p in target.sentinels)
            return cls(
                client,
                sentinel=sentinel,
                description=f"sentinel {where} master {target.service}",
                **common,
            )
        if scheme not in ("redis", "rediss", "unix"):
            raise StoreError(f"not a redis URL: {url!r}")
        client = aioredis.Redis.from_url(url, **options)
        parts = urlsplit(url)
        return cls(client, description=f"{scheme}://{parts.hostname}:{parts.port}", **common)

    @property
    def client(self) -> aioredis.Redis:
        """The connection pool, shared with the fleet statistics (stores/fleetstats.py)."""
        return self._client

    # -- helpers -----------------------------------------------------------------------------

    def rev_key(self, version: int) -> str:
        return f"{self.prefix}:rev:{version}"

    async def _read(self, action: str, call: Callable[[], Awaitable[T]]) -> T:
        """An idempotent read, tried twice if the first connection turns out dead (a
        pooled socket to a restarted or failed-over server)."""
        try:
            with _mapped(action):
                return await call()
        except StoreUnavailable as exc:
            if not isinstance(exc.__cause__, rex.ConnectionError):
                raise
        with _mapped(action):
            return await call()

    @staticmethod
    def _parse_version(raw: Any) -> int:
        if raw is None:
            return 0
        text = raw.decode() if isinstance(raw, bytes) else str(raw)
        if not text.isdigit():
            raise StoreError(f"corrupt version pointer: {text[:40]!r}")
        return int(text)

    def _decode(self, version: int, data: Any, digest: Any) -> Revision:
        if data is None:
            raise ConfigError("revision", f"version {version} is missing from redis")
        raw = bytes(data)
        expected = digest.decode() if isinstance(digest, bytes) else digest
        if expected != checksum(raw):
            raise ConfigError(
                "checksum",
                f"version {version}: sha256 does not match the stored revision",
            )
        revision = decode_revision(raw)
        if revision.version != version:
            raise ConfigError("version", f"key for {version} holds {revision.version}")
        return revision

    async def _follow_master(self, *, force: bool = False) -> tuple[str, int] | None:
        """Sentinel only: ask the sentinels where the master is now. redis-py asks only
        when it opens a connection, so after a failover pooled sockets keep talking to the
        demoted master (which still accepts writes until Sentinel reconfigures it, and then
        drops them). Asking drops idle connections to the old master. Best effort: if no
        sentinel answers, the current connections are used (WAIT still guards commits)."""
        pool = self._client.connection_pool
        if not isinstance(pool, SentinelConnectionPool):
            return None
        now = time.monotonic()
        if force or now - self._master_checked >= MASTER_CHECK_INTERVAL_S:
            self._master_checked = now
            try:
                with _mapped("sentinel discovery"):
                    await pool.get_master_address()  # type: ignore[no-untyped-call]
            except StoreError as exc:
                log.debug("sentinel discovery failed: %s", exc)
        address = pool.master_address
        current = (str(address[0]), int(address[1])) if address else None
        if current is not None and current != self._last_master:
            if self._last_master is not None:
                self.generation += 1  # a failover: the watcher adopts the new master's truth
                log.warning("Redis master moved %s:%d -> %s:%d", *self._last_master, *current)
            self._last_master = current
        return current

    async def _check_run_id(self) -> None:
        """Notice a restarted server (`INFO server` run_id): worth a log line, because a
        restart without persistence empties the store (HARDENING.md §4.2)."""
        info = await self._client.info("server")
        run_id = str(info.get("run_id", ""))
        if self.run_id is not None and run_id and run_id != self.run_id:
            self.restarts_seen += 1
            log.warning("Redis restarted (run_id %s -> %s)", self.run_id[:8], run_id[:8])
        self.run_id = run_id or self.run_id

    # -- Store protocol ----------------------------------------------------------------------

    async def open(self) -> None:
        self._closed.clear()
        with _mapped("open"):
            await self._client.ping()
            await self._check_run_id()

    async def close(self) -> None:
        self._closed.set()
        with contextlib.suppress(Exception):
            await self._client.aclose()
        if self._sentinel is not None:
            with contextlib.suppress(Exception):
                await self._sentinel.aclose()

    async def current_version(self) -> int:
        await self._follow_master()
        raw = await self._read("GET current", lambda: self._client.get(self.key_current))
        return self._parse_version(raw)

    async def _fetch(self, version: int) -> tuple[Any, Any]:
        async with self._client.pipeline(transaction=False) as pipe:
            pipe.get(self.rev_key(version))
            pipe.hget(self.key_sums, str(version))
            data, digest = await pipe.execute()
        return data, digest

    async def latest(self) -> Revision | None:
        # Writers read the base here and then commit: both must reach the same master, and a
        # commit always re-asks the sentinels, so this read does too.
        await self._follow_master(force=True)
        version = await self.current_version()
        if version == 0:
            return None
        data, digest = await self._read("read revision", lambda: self._fetch(version))
        return self._decode(version, data, digest)

    async def get(self, version: int) -> Revision:
        data, digest = await self._read("read revision", lambda: self._fetch(version))
        if data is None:
            raise VersionNotFound(version)
        return self._decode(version, data, digest)

    async def history(self, limit: int = 100) -> list[VersionInfo]:
        items = await self._read(
            "LRANGE history",
            lambda: self._client.lrange(self.key_history, 0, max(0, limit - 1)),
        )
        infos: list[VersionInfo] = []
        for item in items:
            try:
                infos.append(VersionInfo.from_dict(orjson.loads(item)))
            except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
                continue
        return infos

    async def commit(
        self, document: Document, *, expected_version: int, actor: str, summary: str
    ) -> Revision:
        version = expected_version + 1
        stored = document.model_copy(update={"version": version})
        revision = Revision(stored, VersionInfo.now(version, actor, summary))
        data = encode_revision(revision)
        digest = checksum(data)
        keys = [
            self.key_current,
            self.key_sums,
            self.key_history,
            self.rev_key(version),
        ]
        args: list[Any] = [
            expected_version,
            version,
            data,
            digest,
            orjson.dumps(revision.info.to_dict()),
            self.channel,
        ]
        await self._follow_master(force=True)
        try:
            with _mapped("commit"):
                if self.wait_replicas > 0:
                    # Same connection for the script and WAIT: WAIT counts the replicas
                    # that acknowledged *this connection's* writes.
                    async with self._client.pipeline(transaction=False) as pipe:
                        await self._commit_script(keys=keys, args=args, client=pipe)
                        pipe.wait(self.wait_replicas, self.wait_timeout_ms)
                        result, acked = await pipe.execute()
                else:
                    result, acked = await self._commit_script(keys=keys, args=args), 0
        except StoreUnavailable as exc:
            raise StoreUnavailable(
                f"commit of version {version} not confirmed (outcome unknown; re-read "
                f"the store before retrying): {exc}"
            ) from exc
        status, current = int(result[0]), int(result[1])
        if status == 0:
            raise VersionConflict(expected_version, current)
        if status == -1:
            raise StoreError(
                f"version {version} already exists while the pointer is at {current}: "
                "the store went backwards; re-seed it before writing"
            )
        if status != 1:
            raise StoreError("the version pointer in redis is corrupt")
        if self.wait_replicas > 0:
            await self._confirm(version, digest, int(acked))
        return revision

    async def _confirm(self, version: int, digest: str, acked: int) -> None:
        """Never report a write that a failover could silently drop (HARDENING.md §8 #10)."""
        if acked < self.wait_replicas:
            raise StoreUnavailable(
                f"version {version} reached the master but only {acked} of "
                f"{self.wait_replicas} replica(s) confirmed it within "
                f"{self.wait_timeout_ms} ms; it may be lost on failover"
            )
        try:
            current = await self.current_version()
            _, stored = await self._read("read back", lambda: self._fetch(version))
        except StoreError as exc:
            raise StoreUnavailable(f"version {version} written but not read back: {exc}") from exc
        stored_digest = stored.decode() if isinstance(stored, bytes) else stored
        if current < version or stored_digest != digest:
            raise StoreUnavailable(
                f"version {version} was acknowledged but is not in the store on read-back "
                f"(pointer at {current})"
            )

    async def seed(self, revision: Revision) -> bool:
        data = encode_revision(revision)
        keys = [
            self.key_current,
            self.key_sums,
            self.key_history,
            self.rev_key(revision.version),
        ]
        args: list[Any] = [
            revision.version,
            data,
            checksum(data),
            orjson.dumps(revision.info.to_dict()),
            self.channel,
        ]
        await self._follow_master(force=True)
        with _mapped("seed"):
            written = await self._seed_script(keys=keys, args=args)
        return bool(written)

    async def changes(self) -> AsyncIterator[int]:
        """One hint per (re)subscription (the current version: the caller reloads in full,
        since messages published while disconnected are lost) and one per message.

        Raises `StoreUnavailable` when the subscription breaks or goes silent; the caller
        resubscribes with backoff."""
        pubsub: PubSub = self._client.pubsub(ignore_subscribe_messages=False)
        silence_limit_s = 2 * self.health_check_interval_s + self.socket_timeout_s
        loop = asyncio.get_running_loop()
        try:
            with _mapped("subscribe"):
                await pubsub.subscribe(self.channel)
            last_heard = last_ping = loop.time()
            while not self._closed.is_set():
                with _mapped("pub/sub"):
                    message = await pubsub.get_message(timeout=PUBSUB_READ_TIMEOUT_S)
                now = loop.time()
                if message is None:
                    if now - last_heard > silence_limit_s:
                        raise StoreUnavailable(
                            f"pub/sub silent for {now - last_heard:.1f} s (half-open?)"
                        )
                    if now - last_ping >= self.health_check_interval_s:
                        last_ping = now
                        await self._check_subscribed_to_master(pubsub)
                        with _mapped("pub/sub ping"):
                            await pubsub.ping(b"turnout-liveness")
                    continue
                last_heard = now
                kind = message.get("type")
                if kind == "subscribe":
                    with _mapped("INFO server"):
                        await self._check_run_id()
                    yield await self.current_version()
                elif kind == "message":
                    try:
                        yield int(message["data"])
                    except (TypeError, ValueError):
                        yield await self.current_version()
        finally:
            with contextlib.suppress(Exception):
                await pubsub.aclose()  # type: ignore[no-untyped-call]

    async def _check_subscribed_to_master(self, pubsub: PubSub) -> None:
        """After a failover the subscription would stay on the demoted master: resubscribe
        (the caller reloads in full on the new subscription)."""
        master = await self._follow_master(force=True)
        conn: Any = pubsub.connection  # typed as None in redis-py's stubs
        if master is not None and conn is not None:
            here = (str(getattr(conn, "host", "")), int(getattr(conn, "port", 0)))
            if here != master:
                raise StoreUnavailable(
                    f"master moved to {master[0]}:{master[1]}; resubscribing there"
                )

    def __repr__(self) -> str:
        return f"RedisStore({self.description}, prefix={self.prefix!r})"
