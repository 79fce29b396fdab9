"""Builds the data plane from settings: identity, pools, the pipeline."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry

from edge.accesslog import AccessLog
from edge.frontend import EdgeServer
from edge.identity import CookieSigner, Identity
from edge.metrics import EdgeMetrics, TurnoutCollector
from edge.ofrep import ExposureCollector, Ofrep
from edge.pipeline import Pipeline
from edge.targets import PoolSet
from edge.tunnel import CLOSE_SERVICE_RESTART
from edge.upstream import Timeouts
from flags.errors import ConfigError
from flags.evaluate import ARM_CANARY, CompiledRelease, Snapshot
from flags.store import Revision
from stores.secretfile import read_or_create_secret
from stores.settings import Settings
from stores.watch import ConfigWatcher

if TYPE_CHECKING:
    from stores.ratesync import FleetSync


class Edge:
    """The data plane of one process; follows the watcher's snapshots."""

    def __init__(
        self, settings: Settings, watcher: ConfigWatcher, registry: CollectorRegistry | None
    ) -> None:
        if settings.cookie_secret is not None:
            secret = settings.cookie_secret.get_secret_value()
        else:
            secret = read_or_create_secret(Path(settings.state_dir) / "cookie-secret")
        identity = Identity(
            CookieSigner(secret.encode("utf-8")),
            cookie_name=settings.unit_cookie,
            max_age_s=settings.cookie_max_age_s,
            secure=settings.cookie_secure,
        )
        timeouts = Timeouts(
            connect_s=settings.upstream_connect_timeout_s,
            read_s=settings.upstream_read_timeout_s,
            write_s=settings.upstream_write_timeout_s,
            pool_s=settings.upstream_pool_timeout_s,
            keepalive_s=settings.upstream_keepalive_s,
        )
        self.metrics = EdgeMetrics()
        self.pools = PoolSet(timeouts, settings.upstream_max_connections)
        self.pipeline = Pipeline(
            identity=identity,
            pools=self.pools,
            metrics=self.metrics,
            unit_header=settings.unit_header,
            email_header=settings.email_header,
            trusted_hops=settings.trusted_hops,
            expose_decision_headers=settings.expose_decision_headers,
            via_name=settings.via_name,
            max_body_bytes=settings.max_request_body_bytes,
            via_upstream=settings.via_upstream,
            rewrite_redirects=settings.rewrite_upstream_redirects,
        )
        self.access_log = open_access_log(settings, secret)
        self.pipeline.access_log = self.access_log
        self.pipeline.body_limits(
            buffer_bytes=settings.client_body_buffer_bytes,
            timeout_s=settings.client_body_timeout_s,
            min_rate_bps=settings.client_body_min_rate_bps,
            rate_window_s=settings.client_body_rate_window_s,
        )
        self.rollback_grace_s = settings.websocket_rollback_grace_s
        self.watcher = watcher
        self._closing: set[asyncio.Task[None]] = set()
        self.ratesync: FleetSync | None = None  # on Redis only (start_rate_sync)
        self._ratesync_task: asyncio.Task[None] | None = None
        self.pipeline.apply(watcher.snapshot)
        self.ofrep = self.pipeline.ofrep = Ofrep(
            path_prefix=settings.ofrep_path_prefix, exposures=self.metrics.exposures
        )
        self.ofrep.apply(watcher.snapshot)
        watcher.listeners.append(self._on_config)
        watcher.listeners.append(self.ofrep.apply)
        watcher.listeners.append(self.metrics.on_config_applied)
        if registry is not None:
            registry.register(TurnoutCollector(self.metrics, watcher))
            registry.register(ExposureCollector(self.ofrep))

    def _on_config(self, snapshot: Snapshot, revision: Revision | None) -> None:
        previous = self.pipeline.snapshot
        unused = self.pipeline.apply(snapshot)
        if previous is not None:
            # A rollback (manual or the guard's: the canary share drops to 0): the release's
            # canary tunnels are asked to reconnect with 1012 after the grace, and their new
            # upgrades land on stable (issue #10 point 5).
            for name, rel in snapshot.releases.items():
                before = previous.releases.get(name)
                if not _takes_canary(rel) and before is not None and _takes_canary(before):
                    with contextlib.suppress(RuntimeError):  # no running loop: no tunnels
                        asyncio.get_running_loop().call_later(
                            self.rollback_grace_s, self._shed_canary, name
                        )
        for pool in unused:
            with contextlib.suppress(RuntimeError):  # no running loop: nothing to close on
                task = asyncio.get_running_loop().create_task(pool.aclose())
                self._closing.add(task)
                task.add_done_callback(self._closing.discard)

    def _shed_canary(self, name: str) -> None:
        """Close a rolled-back release's canary tunnels with 1012 "service restart" (IANA
        WebSocket close codes), unless the release took canary traffic again meanwhile."""
        snapshot = self.pipeline.snapshot
        rel = snapshot.releases.get(name) if snapshot is not None else None
        if rel is not None and _takes_canary(rel):
            return
        self.pipeline.tunnels.close(
            name, ARM_CANARY, CLOSE_SERVICE_RESTART, "rolled back: reconnect"
        )

    def apply_live_settings(self, settings: Settings, server: EdgeServer) -> None:
        """What SIGHUP changes without a restart (stores/settings.py LIVE_SETTINGS): the
        client deadlines and limits of the listener and the pipeline's body limits. Logging
        is the caller's (turnout/startup.py configure_logging)."""
        server.keepalive_timeout_s = settings.client_keepalive_timeout_s
        server.header_timeout_s = settings.client_header_timeout_s
        server.idle_timeout_s = settings.client_idle_timeout_s
        server.max_connections = settings.max_client_connections
        self.pipeline.max_body_bytes = settings.max_request_body_bytes
        self.pipeline.body_limits(
            buffer_bytes=settings.client_body_buffer_bytes,
            timeout_s=settings.client_body_timeout_s,
            min_rate_bps=settings.client_body_min_rate_bps,
            rate_window_s=settings.client_body_rate_window_s,
        )

    def start_rate_sync(self, store: object, workers: int = 1) -> None:
        """Rate limits across processes (issue #12): on Redis, each process (every worker) is a
        member of the fleet sync and learns its share of each limit off the request path
        (stores/ratesync.py); without Redis, the `workers` processes of this instance take
        1/N of each limit (the kernel spreads connections over them, SO_REUSEPORT)."""
        limiter = self.pipeline.ratelimiter
        if getattr(store, "is_redis", False):
            # Imported here: an edge on the embedded file store never loads the Redis client
            # (about 6 MiB of RSS, issue #9's memory budget), as stores/factory.py does.
            from stores.ratesync import FleetSync
            from stores.redisstore import RedisStore

            assert isinstance(store, RedisStore)
            self.ratesync = FleetSync(store.client, limiter)
            self._ratesync_task = asyncio.get_running_loop().create_task(self.ratesync.run())
        elif workers > 1:
            limiter.local_share = workers
            limiter.set_shares(workers, {})

    async def stop_rate_sync(self) -> None:
        """Leave the fleet (the others take the share at once); before the store closes, as
        the sync shares its Redis connection pool."""
        task, self._ratesync_task = self._ratesync_task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        sync, self.ratesync = self.ratesync, None
        if sync is not None:
            await sync.leave()

    async def aclose(self) -> None:
        await self.stop_rate_sync()
        await self.pools.aclose()
        if self.access_log is not None:
            await self.access_log.aclose()


def open_access_log(settings: Settings, secret: str) -> AccessLog | None:
    """The access log the settings ask for, its flush timer started when a loop runs; an
    unwritable file is a `ConfigError` naming `access_log`."""
    try:
        log = AccessLog.open(
            settings.access_log,
            fmt=settings.access_log_format,
            unit_id=settings.access_log_unit_id,
            unit_key=secret.encode("utf-8"),
        )
    except OSError as exc:
        raise ConfigError(
            "access_log", f"cannot open {settings.access_log}: {exc.strerror or exc}"
        ) from None
    if log is not None:
        with contextlib.suppress(RuntimeError):  # no running loop: flushed by size or aclose
            log.start()
    return log


def _takes_canary(rel: CompiledRelease) -> bool:
    """Whether any unit can be assigned the canary: not off, and a share above 0 % or an
    internal cohort (which is in the canary at every stage past off)."""
    if rel.disabled:
        return False
    return rel.percent > 0 or bool(rel.internal_ids or rel.internal_domains)
