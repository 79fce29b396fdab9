"""The supervisor of `turnout serve --workers N` (N >= 2): one admin listener, N edge workers.

Rules of this file:
* Before any worker starts, the supervisor opens the store, writes the seed, reads or creates
  the cookie secret and the admin token, and reserves the edge port; every worker then gets
  the same settings and secrets, so a unit gets the same signed cookie and (at the same
  snapshot version) the same decision whichever worker answers.
* Workers are fresh interpreters (`python -m turnout.edgeworker`), never forked from this
  running event loop (a fork copies the loop, its sockets and its threads' locks).
* The edge port is shared with SO_REUSEPORT (edge/listener.py). The supervisor keeps its own
  socket in the group *bound but not listening*: it reserves the port (and resolves port 0)
  while workers come and go; the kernel only hands connections to listening sockets.
* A worker that dies is logged (worker number, pid, exit code or signal), counted
  (`turnout_worker_restarts_total`) and started again; again and again only with a growing
  delay (RESTART_BACKOFF_*), reset once it has run for STABLE_RUN_S.
* SIGTERM / SIGINT: stop the admin listener, SIGTERM every worker (each drains its requests
  in flight within its graceful deadline), SIGKILL what is still running after
  DRAIN_DEADLINE_S, exit 0.
* `/metrics` is served here from the snapshots the workers push (turnout/edgeworker.py
  explains why push): counters summed, watcher gauges per worker.
* The guard (issue #10) runs here, once per instance: see `start_guard`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path

import orjson
from prometheus_client import CollectorRegistry
from pydantic import SecretStr

from admin.auth import resolve_admin_token
from edge.guardian import Guardian
from edge.listener import reserve_port
from edge.metrics import EdgeMetrics
from edge.metricsnapshot import WorkerSetCollector, WorkerSetState, fold
from flags.store import Store
from stores.events import EventBus
from stores.fleetstats import fleet_stats_for
from stores.secretfile import read_or_create_secret
from stores.settings import Settings, settings_changes
from stores.watch import ConfigWatcher
from stores.webhooks import Notifier
from turnout.edgeworker import settings_payload
from turnout.server import _Server, admin_config, open_store, reload_settings

log = logging.getLogger("turnout.workers")

START_TIMEOUT_S = 30.0  # a worker must listen this soon after it is started
GRACEFUL_TIMEOUT_S = 10.0  # what each worker's EdgeServer allows requests in flight
DRAIN_DEADLINE_S = GRACEFUL_TIMEOUT_S + 5.0  # then SIGKILL
RESTART_BACKOFF_FIRST_S = 0.5
RESTART_BACKOFF_MAX_S = 30.0
STABLE_RUN_S = 10.0  # a worker that ran this long is restarted at once if it dies
MAX_CONTROL_LINE_BYTES = 16 * 1024 * 1024  # a snapshot of many releases is still far below


def describe_exit(returncode: int) -> str:
    if returncode < 0:
        with contextlib.suppress(ValueError):
            return f"killed by signal {signal.Signals(-returncode).name}"
        return f"killed by signal {-returncode}"
    return f"exit code {returncode}"


def restart_delay(failures: int) -> float:
    """The wait before a restart after `failures` short-lived runs in a row: 0 after a stable
    run, then 0.5, 1, 2, ... s, at most RESTART_BACKOFF_MAX_S (a crash loop costs little)."""
    if failures <= 0:
        return 0.0
    return float(min(RESTART_BACKOFF_MAX_S, RESTART_BACKOFF_FIRST_S * 2 ** (failures - 1)))


class WorkerProcess:
    """One worker slot: its current process and what it reported."""

    def __init__(self, supervisor: Supervisor, number: int) -> None:
        self.supervisor = supervisor
        self.number = number
        self.proc: asyncio.subprocess.Process | None = None
        self.ready = asyncio.Event()
        self.reader_task: asyncio.Task[None] | None = None
        self.writer: asyncio.StreamWriter | None = None  # to the worker (SIGHUP's settings)

    @property
    def pid(self) -> int | None:
        return None if self.proc is None else self.proc.pid

    async def start(self) -> None:
        sup = self.supervisor
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.ready = asyncio.Event()
        try:
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "turnout.edgeworker",
                "--worker",
                str(self.number),
                "--control-fd",
                str(child.fileno()),
                "--of",
                str(sup.count),
                stdin=asyncio.subprocess.PIPE,
                pass_fds=(child.fileno(),),
                cwd=sup.cwd,
            )
        except BaseException:
            parent.close()
            raise
        finally:
            child.close()
        assert self.proc.stdin is not None
        self.proc.stdin.write(sup.payload)
        with contextlib.suppress(ConnectionError):
            await self.proc.stdin.drain()
        self.proc.stdin.close()
        log.info("worker %d started (pid %d)", self.number, self.proc.pid)
        reader, writer = await asyncio.open_unix_connection(
            sock=parent, limit=MAX_CONTROL_LINE_BYTES
        )
        self.writer = writer
        self.reader_task = asyncio.create_task(self._read(reader, writer))

    def send(self, message: dict[str, object]) -> None:
        """One line to the worker over its control socket (turnout/edgeworker.py reads it)."""
        writer = self.writer
        if writer is not None and not writer.is_closing():
            writer.write(orjson.dumps(message) + b"\n")

    async def _read(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        state = self.supervisor.state
        try:
            while line := await reader.readline():
                message = orjson.loads(line)
                if "metrics" in message:
                    state.live[self.number] = message["metrics"]
                rows = message.get("arms")
                if rows and state.guard is not None:
                    state.guard.arms.merge(rows)
                if "ready" in message:
                    self.ready.set()
        except (ConnectionError, ValueError, asyncio.LimitOverrunError) as exc:
            log.warning("worker %d: control channel: %s", self.number, exc)
        finally:
            writer.close()

    async def wait(self) -> int:
        assert self.proc is not None
        returncode = await self.proc.wait()
        if self.reader_task is not None:
            # The final snapshot is written before exit; read it to the end of the stream.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self.reader_task), 1.0)
            self.reader_task.cancel()
        last = self.supervisor.state.live.pop(self.number, None)
        if last is not None:
            self.supervisor.state.retired = fold(self.supervisor.state.retired, last)
        return returncode

    def signal(self, sig: int) -> None:
        if self.proc is not None and self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(sig)


class Supervisor:
    """Starts, watches, restarts and drains the edge workers of one instance."""

    def __init__(self, settings: Settings, count: int) -> None:
        self.settings = settings
        self.count = count
        self.state = WorkerSetState(workers=count)
        self.workers = [WorkerProcess(self, k) for k in range(1, count + 1)]
        self.stopping = asyncio.Event()
        self.payload = b""
        self.cwd = str(Path.cwd())
        # The guard runner's metrics and windows: the workers' per-arm counts merge in here.
        self.state.guard = EdgeMetrics()

    def hand_down(self, settings: Settings) -> None:
        """The settings every worker gets: secrets resolved once, here."""
        if settings.cookie_secret is not None:
            cookie = settings.cookie_secret.get_secret_value()
        else:
            cookie = read_or_create_secret(Path(settings.state_dir) / "cookie-secret")
        worker_settings = settings.model_copy(
            update={
                "cookie_secret": SecretStr(cookie),
                "admin_token": SecretStr(resolve_admin_token(settings)),
                "workers": 1,
            }
        )
        self.payload = settings_payload(worker_settings)

    async def start_all(self) -> None:
        await asyncio.gather(*(w.start() for w in self.workers))
        for w in self.workers:
            waiter = asyncio.create_task(w.ready.wait())
            assert w.proc is not None
            exited = asyncio.create_task(w.proc.wait())
            done, _ = await asyncio.wait(
                {waiter, exited}, timeout=START_TIMEOUT_S, return_when=asyncio.FIRST_COMPLETED
            )
            waiter.cancel()
            exited.cancel()
            if waiter not in done or not w.ready.is_set():
                raise SystemExit(
                    f"turnout: edge worker {w.number} did not start"
                    + (
                        f" ({describe_exit(w.proc.returncode)})"
                        if w.proc.returncode is not None
                        else ""
                    )
                )

    async def keep(self, w: WorkerProcess) -> None:
        """Restart worker `w` whenever it dies, until the instance stops."""
        failures = 0
        while True:
            started = time.monotonic()
            returncode = await w.wait()
            if self.stopping.is_set():
                log.info(
                    "worker %d (pid %s) stopped (%s)", w.number, w.pid, describe_exit(returncode)
                )
                return
            failures = 0 if time.monotonic() - started >= STABLE_RUN_S else failures + 1
            delay = restart_delay(failures)
            self.state.restarts[w.number] = self.state.restarts.get(w.number, 0) + 1
            log.warning(
                "worker %d (pid %s) %s; restarting in %.1f s",
                w.number,
                w.pid,
                describe_exit(returncode),
                delay,
            )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stopping.wait(), delay)
            if self.stopping.is_set():
                return
            try:
                await w.start()
            except OSError as exc:
                log.error("worker %d: cannot start: %s", w.number, exc)
            if self.stopping.is_set():  # the drain began while this one was starting
                w.signal(signal.SIGTERM)

    async def drain(self) -> None:
        """SIGTERM every worker, wait up to DRAIN_DEADLINE_S, SIGKILL the rest."""
        self.stopping.set()
        for w in self.workers:
            w.signal(signal.SIGTERM)
        waits = [asyncio.create_task(w.proc.wait()) for w in self.workers if w.proc is not None]
        if not waits:
            return
        _, pending = await asyncio.wait(waits, timeout=DRAIN_DEADLINE_S)
        if pending:
            for w in self.workers:
                if w.proc is not None and w.proc.returncode is None:
                    log.warning(
                        "worker %d (pid %d) did not drain in time: SIGKILL", w.number, w.pid
                    )
                    w.signal(signal.SIGKILL)
            await asyncio.gather(*pending, return_exceptions=True)


def start_guard(
    settings: Settings, store: Store, watcher: ConfigWatcher, metrics: EdgeMetrics
) -> tuple[Guardian, EventBus, Notifier | None]:
    """ONE guard runner per instance, here in the supervisor, judging the sum of its workers'
    traffic (each worker pushes its per-arm counts with its metrics snapshot).

    Why not a guard in every worker: each sees only the share of the traffic the kernel gave
    its socket (SO_REUSEPORT), so N guards would judge N thin samples (slower to reach the
    minimum samples, and N commits racing on every breach); and with the file store there
    would be no channel between them at all. Why not the fleet store: a file store has none,
    and on Redis it would put N entries per instance per second on the store. The supervisor
    already receives every worker's push each second over the control socket, holds the
    store and the admin API (whose health view and event stream read this runner), and
    outlives the workers; across instances it still shares counts through the fleet store
    like a one-process instance does."""
    events = EventBus()
    notifier = Notifier.from_settings(settings)
    if notifier is not None:
        events.hooks.append(notifier.notify)
        notifier.start()
    guardian = Guardian(
        store=store,
        watcher=watcher,
        metrics=metrics,
        events=events,
        fleet=fleet_stats_for(store),
        instance_id=settings.instance_id,
        interval_s=settings.guard_interval_s,
    )
    if settings.guard_enabled:
        guardian.start()
    return guardian, events, notifier


MIGRATE_REQ_SYSCTL = Path("/proc/sys/net/ipv4/tcp_migrate_req")


def migrates_queued_connections() -> bool:
    """Whether the kernel hands a closing listener's queued connections to the rest of its
    SO_REUSEPORT group (Linux >= 5.14, `net.ipv4.tcp_migrate_req`); unknown counts as yes."""
    try:
        return MIGRATE_REQ_SYSCTL.read_text().strip() != "0"
    except OSError:
        return True


async def supervise(
    settings: Settings,
    *,
    started: asyncio.Event | None = None,
    stop_event: asyncio.Event | None = None,
    reload: Callable[[], Settings] | None = None,
) -> None:
    """Run one instance with `settings.worker_count` edge workers until SIGTERM/SIGINT;
    SIGHUP re-reads the settings with `reload`."""
    from admin.app import create_admin_app

    count = settings.worker_count
    # Reserve the port first: a clear error when it is taken, and port 0 resolved once for all.
    try:
        reservation = reserve_port(settings.edge_host, settings.edge_port)
    except OSError as exc:
        raise SystemExit(f"turnout: {exc.strerror}") from None
    port = int(reservation.getsockname()[1])
    settings = settings.model_copy(update={"edge_port": port})

    store, watcher = await open_store(settings)
    if not migrates_queued_connections():
        # Linux resets the connections still queued at a listener that closes (a worker killed
        # or crashing) unless they may move to another socket of the SO_REUSEPORT group.
        log.warning(
            "net.ipv4.tcp_migrate_req is 0: connections queued at a worker that dies are reset "
            "instead of handed to the other workers (sysctl -w net.ipv4.tcp_migrate_req=1)"
        )
    supervisor = Supervisor(settings, count)
    supervisor.hand_down(settings)
    registry = CollectorRegistry()
    # The flag exposures the workers push are summed too, limited to the flags declared in
    # the supervisor's applied version (issue #11).
    registry.register(WorkerSetCollector(supervisor.state, flags=lambda: watcher.snapshot.flags))
    assert supervisor.state.guard is not None
    guardian, events, notifier = start_guard(settings, store, watcher, supervisor.state.guard)
    admin_app = create_admin_app(
        settings, store, watcher, registry, release_health=guardian.health, events=events
    )
    admin = _Server(admin_config(admin_app, settings))

    loop = asyncio.get_running_loop()
    stop_requested = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(sig, stop_requested.set)
    current = [settings]

    async def hangup() -> None:
        """SIGHUP: the settings read again here (one set of log lines for the instance);
        what can change live goes to every worker over its control socket, and to the
        settings a restarted worker gets; the rest waits for a restart."""
        assert reload is not None
        new = await reload_settings(current[0], reload, store)
        if new is None:
            return
        live, _ = settings_changes(current[0], new)
        merged = current[0].model_copy(update={name: getattr(new, name) for name in live})
        current[0] = merged
        supervisor.hand_down(merged)
        if live:
            payload = orjson.loads(supervisor.payload)
            for w in supervisor.workers:
                w.send({"settings": payload})

    if reload is not None:
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(signal.SIGHUP, lambda: loop.create_task(hangup()))

    keepers: list[asyncio.Task[None]] = []
    admin_task: asyncio.Task[None] | None = None
    try:
        await supervisor.start_all()
        keepers = [asyncio.create_task(supervisor.keep(w)) for w in supervisor.workers]
        admin_task = asyncio.create_task(admin.serve())
        while not admin.started:
            if admin_task.done():
                raise SystemExit("turnout: the admin listener failed to start (port in use?)")
            await asyncio.sleep(0.01)
        log.info(
            "turnout edge on http://%s:%d (%d workers: pids %s), admin on http://%s:%d "
            "(config version %d, %s)",
            settings.edge_host,
            port,
            count,
            " ".join(str(w.pid) for w in supervisor.workers),
            settings.admin_host,
            settings.admin_port,
            watcher.version,
            watcher.source,
        )
        if started is not None:
            started.set()
        waits = [asyncio.create_task(stop_requested.wait()), admin_task]
        if stop_event is not None:
            waits.append(asyncio.create_task(stop_event.wait()))
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        log.info("turnout: stopping; draining %d workers", count)
    finally:
        admin.should_exit = True
        await supervisor.drain()
        for task in keepers:
            task.cancel()
        if admin_task is not None:
            await asyncio.gather(admin_task, return_exceptions=True)
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                loop.remove_signal_handler(sig)
        await guardian.stop()
        if notifier is not None:
            await notifier.aclose()
        await watcher.stop()
        reservation.close()
