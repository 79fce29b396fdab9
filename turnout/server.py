"""The composition root: settings -> store -> watcher -> edge + admin, on one event loop.

`serve()` runs the edge listener (edge/frontend.py, the edge's own HTTP/1.1 server) and the
admin listener (Starlette on uvicorn) side by side; `run()` is the blocking entry point for `turnout serve`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Callable, Iterator
from typing import Any

import uvicorn
from prometheus_client import CollectorRegistry

from edge.app import Edge
from edge.frontend import EdgeServer
from edge.guardian import Guardian
from flags.document import load_document
from flags.errors import ConfigError
from flags.store import Store
from stores.events import EventBus
from stores.fleetstats import fleet_stats_for
from stores.settings import Settings, settings_changes
from stores.watch import ConfigWatcher
from stores.webhooks import Notifier
from stores.yamlfile import YamlError, read_mapping_file
from turnout.startup import check_listeners, check_writable_dirs, configure_logging

log = logging.getLogger("turnout.server")


class _Server(uvicorn.Server):
    """A uvicorn server that leaves signal handling to `serve()` (two servers, one loop)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def make_store(settings: Settings) -> Store:
    from stores.factory import make_store as _make

    return _make(
        settings.store or str(settings.store_dir),
        poll_interval_s=settings.poll_interval_s,
        redis_options={
            "wait_replicas": settings.wait_replicas,
            "wait_timeout_ms": settings.store_wait_timeout_ms,
        },
    )


def read_seed(settings: Settings) -> dict[str, Any] | None:
    """The initial document from `seed` or `seed_file` (YAML or JSON), if any."""
    if settings.seed is not None:
        return settings.seed
    if settings.seed_file is None:
        return None
    try:  # YAML 1.2, duplicate keys refused with their line (stores/yamlfile.py)
        return read_mapping_file(settings.seed_file, "the configuration document")
    except YamlError as exc:
        raise ConfigError("seed_file", str(exc)) from None


async def seed_store(store: Store, settings: Settings) -> None:
    """Write the seed document as version 1 when the store is empty."""
    raw = read_seed(settings)
    if raw is None:
        return
    try:  # invalid -> ConfigError naming the file and the field, nothing written
        document = load_document(raw)
    except ConfigError as exc:
        source = settings.seed_file if settings.seed is None else "the inline seed"
        setting = "seed_file" if settings.seed is None else "seed"
        raise ConfigError(setting, f"{source}: {exc.field}: {exc.message}") from None
    if await store.current_version() == 0:
        await store.commit(
            document, expected_version=0, actor="seed", summary="initial configuration"
        )


async def reload_settings(
    current: Settings,
    reload: Callable[[], Settings],
    store: Store | None,
    worker: int | None = None,
) -> Settings | None:
    """SIGHUP: read the settings file again; take what can change live, log one line for
    each change that needs a restart, and apply the seed where that makes sense (only to an
    empty store). Returns the new settings, or None when the file is refused (nothing
    changes: the running settings stay)."""
    try:
        new = reload()
    except ConfigError as exc:
        log.error("SIGHUP: settings not reloaded, nothing changed: %s", exc)
        return None
    live, restart = settings_changes(current, new)
    if "log_level" in live or "log_format" in live:
        configure_logging(new, worker)
    for name in live:
        log.warning(
            "SIGHUP: %s applied (%r -> %r)", name, getattr(current, name), getattr(new, name)
        )
    for name in restart:
        if name in ("seed", "seed_file"):
            continue
        log.warning("SIGHUP: %s changed; not applied live, restart Turnout to apply it", name)
    if store is not None and (new.seed is not None or new.seed_file is not None):
        version = await store.current_version()
        if version == 0:
            try:
                await seed_store(store, new)
                log.warning("SIGHUP: the seed was applied to the empty store")
            except ConfigError as exc:
                log.error("SIGHUP: seed not applied: %s", exc)
        elif "seed" in restart or "seed_file" in restart:
            log.warning(
                "SIGHUP: the seed is only written to an empty store (this one is at version %d);"
                " change the document with `turnout apply FILE`",
                version,
            )
    if not live and not restart:
        log.warning("SIGHUP: settings read again; nothing changed")
    return new


def edge_server(edge: Edge, settings: Settings) -> EdgeServer:
    """The edge listener: Turnout's own HTTP/1.1 server (the only one on the data plane)."""
    server = EdgeServer(
        edge.pipeline,
        host=settings.edge_host,
        port=settings.edge_port,
        keepalive_timeout_s=settings.client_keepalive_timeout_s,
        header_timeout_s=settings.client_header_timeout_s,
        idle_timeout_s=settings.client_idle_timeout_s,
        graceful_timeout_s=10.0,
        backlog=settings.listen_backlog,
        max_connections=settings.max_client_connections,
    )
    connections = server.connections
    edge.metrics.client_connections = lambda: len(connections)
    return server


def admin_config(app: Any, settings: Settings) -> uvicorn.Config:
    return uvicorn.Config(
        app,
        host=settings.admin_host,
        port=settings.admin_port,
        loop="none",
        http="h11",
        ws="none",
        lifespan="off",
        proxy_headers=False,
        access_log=False,
        log_level=settings.log_level,
        log_config=None,  # uvicorn's lines go through Turnout's own format (turnout/startup.py)
        timeout_graceful_shutdown=5,
    )


async def open_store(settings: Settings) -> tuple[Store, ConfigWatcher]:
    """Open the store, seed it when empty, and start a watcher on it. A store that is down
    is not fatal (the watcher serves the bootstrap copy and reconnects); an invalid seed is."""
    store = make_store(settings)
    try:
        await store.open()
        await seed_store(store, settings)
    except ConfigError:
        raise
    except Exception as exc:  # noqa: BLE001 - the store may be down; the watcher copes
        log.warning("store not reachable at start: %s", exc)
    watcher = ConfigWatcher(
        store, bootstrap_path=settings.bootstrap_file, poll_interval_s=settings.poll_interval_s
    )
    await watcher.start()
    return store, watcher


async def serve(
    settings: Settings,
    *,
    started: asyncio.Event | None = None,
    stop_event: asyncio.Event | None = None,
    context: dict[str, Any] | None = None,
    reload: Callable[[], Settings] | None = None,
) -> None:
    """Run one Turnout instance until SIGINT/SIGTERM or until `stop_event` is set; SIGHUP
    re-reads the settings with `reload` (`reload_settings`)."""
    from admin.app import create_admin_app

    store, watcher = await open_store(settings)
    registry = CollectorRegistry()
    edge = Edge(settings, watcher, registry)
    edge.start_rate_sync(store)  # issue #12: the fleet's rate-limit shares, beside the watcher
    # Guarded delivery (issue #10): the guard judges beside the watcher, never on the
    # request path; webhooks and the event stream hang off its events.
    events = EventBus()
    notifier = Notifier.from_settings(settings)
    if notifier is not None:
        events.hooks.append(notifier.notify)
        notifier.start()
    guardian = Guardian(
        store=store,
        watcher=watcher,
        metrics=edge.metrics,
        events=events,
        fleet=fleet_stats_for(store),
        instance_id=settings.instance_id,
        interval_s=settings.guard_interval_s,
    )
    if settings.guard_enabled:
        guardian.start()
    admin_app = create_admin_app(
        settings, store, watcher, registry, release_health=guardian.health, events=events
    )
    servers: list[Any] = [edge_server(edge, settings), _Server(admin_config(admin_app, settings))]
    if context is not None:  # for tests and embedding: the live objects of this instance
        context.update(store=store, watcher=watcher, edge=edge, servers=servers, guardian=guardian)

    loop = asyncio.get_running_loop()

    def stop() -> None:
        edge.ofrep.close()  # SSE streams end now rather than at the graceful deadline
        for server in servers:
            server.should_exit = True

    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(sig, stop)  # main thread only; tests use stop_event
    current = [settings]

    async def hangup() -> None:
        assert reload is not None
        new = await reload_settings(current[0], reload, store)
        if new is not None:
            edge.apply_live_settings(new, servers[0])
            current[0] = new

    if reload is not None:
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(signal.SIGHUP, lambda: loop.create_task(hangup()))

    async def announce() -> None:
        while not all(s.started for s in servers):
            if any(t.done() for t in tasks):
                return
            await asyncio.sleep(0.01)
        log.info(
            "turnout edge on http://%s:%d, admin on http://%s:%d (config version %d, %s)",
            settings.edge_host,
            settings.edge_port,
            settings.admin_host,
            settings.admin_port,
            watcher.version,
            watcher.source,
        )
        if started is not None:
            started.set()

    async def wait_stop() -> None:
        if stop_event is not None:
            await stop_event.wait()
            stop()

    tasks = [asyncio.create_task(s.serve()) for s in servers]
    announcer = asyncio.create_task(announce())
    stopper = asyncio.create_task(wait_stop())
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        stop()
        await asyncio.gather(*tasks, return_exceptions=True)
        for task in done:
            if task.exception() is not None:
                raise task.exception()  # type: ignore[misc]
            if any(not s.started for s in servers):
                raise SystemExit("turnout: a listener failed to start (is the port in use?)")
    finally:
        stop()
        announcer.cancel()
        stopper.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                loop.remove_signal_handler(sig)
        await guardian.stop()
        if notifier is not None:
            await notifier.aclose()
        await edge.stop_rate_sync()  # shares the store's Redis pool: before it closes
        await watcher.stop()
        await edge.aclose()


def install_event_loop_policy() -> None:
    """uvloop when available (PERF.md: the loop and parser matter 4x)."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


def run(settings: Settings, reload: Callable[[], Settings] | None = None) -> None:
    """`reload`: how SIGHUP reads the settings again (the CLI's file and overrides)."""
    configure_logging(settings)
    check_listeners(settings, ("--edge-port", "--admin-port"))  # busy port: one line, no traceback
    check_writable_dirs(settings)
    install_event_loop_policy()
    if settings.worker_count > 1:  # a supervisor and N edge processes (turnout/workers.py)
        from turnout.workers import supervise

        asyncio.run(supervise(settings, reload=reload))
        return
    asyncio.run(serve(settings, reload=reload))  # workers: 1 -> edge and admin in one process
