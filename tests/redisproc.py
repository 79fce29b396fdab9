"""Real redis-server / redis-sentinel processes for tests (never the shared 6379).

Every server runs on a free loopback port with its own `--dir`, without persistence unless
asked (`persistent=True` turns on an fsync-always AOF so `kill -9` loses nothing), and is
killed by `stop()` (the context managers do it). The helpers use the synchronous redis-py
client: tests drive faults and inspect keys with it, the code under test uses asyncio.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import redis

LOCALHOST = "127.0.0.1"
READY_TIMEOUT_S = 10.0
SENTINEL_MASTER = "mymaster"


def free_port() -> int:
    """A loopback port nobody listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOCALHOST, 0))
        port: int = sock.getsockname()[1]
        return port


def wait_until(predicate: Any, timeout_s: float = READY_TIMEOUT_S, what: str = "") -> None:
    """Poll a synchronous predicate; AssertionError if it stays false (a bound, not a
    timing assertion)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with contextlib.suppress(redis.RedisError, OSError):
            if predicate():
                return
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what or predicate}")


class RedisServer:
    """One redis-server process on a fixed port (kept across restarts)."""

    def __init__(
        self,
        workdir: Path,
        *,
        port: int | None = None,
        persistent: bool = False,
        args: tuple[str, ...] = (),
        name: str = "redis",
    ) -> None:
        self.port = port or free_port()
        self.dir = workdir / f"{name}-{self.port}"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.persistent = persistent
        self.args = args
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://{LOCALHOST}:{self.port}/0"

    def command(self) -> list[str]:
        persistence = (
            ["--appendonly", "yes", "--appendfsync", "always"]
            if self.persistent
            else ["--appendonly", "no"]
        )
        return [
            "redis-server",
            "--port",
            str(self.port),
            "--bind",
            LOCALHOST,
            "--save",
            "",
            *persistence,
            "--dir",
            str(self.dir),
            "--logfile",
            str(self.dir / "redis.log"),
            "--daemonize",
            "no",
            *self.args,
        ]

    def start(self) -> RedisServer:
        self.proc = subprocess.Popen(
            self.command(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        self.wait_ready()
        return self

    def wait_ready(self) -> None:
        def ready() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                log = (self.dir / "redis.log").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"redis-server exited: {log}")
            with self.client() as r:
                return bool(r.ping())

        wait_until(ready, what=f"redis on port {self.port}")

    def client(self, **kwargs: Any) -> redis.Redis:
        """A synchronous client; use it as a context manager so it is closed."""
        options: dict[str, Any] = {"socket_timeout": 5, "socket_connect_timeout": 2}
        options.update(kwargs)
        return redis.Redis(host=LOCALHOST, port=self.port, **options)

    def kill9(self) -> None:
        """SIGKILL, as a crash: no shutdown save, sockets reset."""
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None

    def restart(self, *, empty: bool = True) -> None:
        """Kill -9 and start again on the same port. `empty=True` on a non-persistent
        server is "restarted without persistence": an empty keyspace."""
        if not empty and not self.persistent:
            raise ValueError("restart(empty=False) needs persistent=True")
        self.kill9()
        if empty:
            for path in self.dir.glob("*.rdb"):
                path.unlink()
        self.start()

    def pause(self, ms: int, mode: str = "ALL") -> None:
        """`CLIENT PAUSE ms ALL`: every client blocks (a hung Redis)."""
        with self.client() as r:
            r.execute_command("CLIENT", "PAUSE", ms, mode)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None


@contextlib.contextmanager
def redis_server(workdir: Path, **kwargs: Any) -> Iterator[RedisServer]:
    server = RedisServer(workdir, **kwargs)
    try:
        server.start()
        yield server
    finally:
        server.stop()


class SentinelServer(RedisServer):
    """A redis-server in sentinel mode watching `mymaster`."""

    def __init__(self, workdir: Path, master_port: int, quorum: int = 2) -> None:
        super().__init__(workdir, name="sentinel")
        self.config = self.dir / "sentinel.conf"
        self.config.write_text(
            "\n".join(
                [
                    f"port {self.port}",
                    f"bind {LOCALHOST}",
                    f"dir {self.dir}",
                    f"logfile {self.dir / 'redis.log'}",
                    f"sentinel monitor {SENTINEL_MASTER} {LOCALHOST} {master_port} {quorum}",
                    f"sentinel down-after-milliseconds {SENTINEL_MASTER} 1000",
                    f"sentinel failover-timeout {SENTINEL_MASTER} 5000",
                    f"sentinel parallel-syncs {SENTINEL_MASTER} 1",
                    "",
                ]
            )
        )

    def command(self) -> list[str]:
        return ["redis-server", str(self.config), "--sentinel"]


class SentinelCluster:
    """A master, one replica and three sentinels (quorum 2) on loopback."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.master = RedisServer(workdir, name="master")
        self.replica = RedisServer(
            workdir,
            name="replica",
            args=("--replicaof", LOCALHOST, str(self.master.port)),
        )
        self.sentinels = [SentinelServer(workdir, self.master.port) for _ in range(3)]

    @property
    def url(self) -> str:
        hosts = ",".join(f"{LOCALHOST}:{s.port}" for s in self.sentinels)
        return f"redis+sentinel://{hosts}/{SENTINEL_MASTER}"

    def servers(self) -> list[RedisServer]:
        return [self.master, self.replica, *self.sentinels]

    def start(self) -> SentinelCluster:
        self.master.start()
        self.replica.start()

        def replica_linked() -> bool:
            with self.replica.client() as r:
                info = r.info("replication")
            return info.get("master_link_status") == "up"

        wait_until(replica_linked, what="replica link up")
        for sentinel in self.sentinels:
            sentinel.start()
        wait_until(self._sentinels_see_replica, what="sentinels discover the replica")
        return self

    def _sentinels_see_replica(self) -> bool:
        for sentinel in self.sentinels:
            with sentinel.client() as r:
                replicas = r.execute_command("SENTINEL", "REPLICAS", SENTINEL_MASTER)
                if not replicas:
                    return False
        return True

    def master_port(self) -> int:
        with self.sentinels[0].client() as r:
            _, port = r.execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", SENTINEL_MASTER)
        return int(port)

    def failover(self) -> int:
        """`SENTINEL FAILOVER mymaster` (retried until a replica is eligible); returns the
        new master's port once it is promoted and the sentinels agree."""
        old = self.master_port()

        def failover_started() -> bool:
            with self.sentinels[0].client() as r:
                try:
                    r.execute_command("SENTINEL", "FAILOVER", SENTINEL_MASTER)
                except redis.ResponseError as exc:
                    if "INPROG" in str(exc):
                        return True
                    raise redis.RedisError(str(exc)) from exc
            return True

        wait_until(failover_started, what="SENTINEL FAILOVER accepted")

        def promoted() -> bool:
            port = self.master_port()
            if port == old:
                return False
            server = self.replica if port == self.replica.port else self.master
            with server.client() as r:
                return r.info("replication").get("role") == "master"

        wait_until(promoted, timeout_s=30, what="new master promoted")
        return self.master_port()

    def stop(self) -> None:
        for server in reversed(self.servers()):
            server.stop()


@contextlib.contextmanager
def sentinel_cluster(workdir: Path) -> Iterator[SentinelCluster]:
    cluster = SentinelCluster(workdir)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


class BlackholeProxy:
    """An asyncio TCP proxy to a local port that can silently drop traffic both ways while
    keeping every socket open: a half-open / partitioned path (HARDENING.md §8 #11)."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.blackholed = False
        self.port = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()

    @property
    def url(self) -> str:
        return f"redis://{LOCALHOST}:{self.port}/0"

    async def start(self) -> BlackholeProxy:
        self._server = await asyncio.start_server(self._accept, LOCALHOST, 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(LOCALHOST, self.target_port)
        except OSError:
            writer.close()
            return
        self._writers.update((writer, up_writer))
        for src, dst in ((reader, up_writer), (up_reader, writer)):
            task = asyncio.create_task(self._pump(src, dst))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _pump(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError):
            while data := await src.read(65536):
                if not self.blackholed:
                    dst.write(data)
                    await dst.drain()
        dst.close()

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        for writer in list(self._writers):
            writer.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for writer in list(self._writers):
            with contextlib.suppress(OSError):
                await writer.wait_closed()
