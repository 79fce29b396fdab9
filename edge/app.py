"""Builds the data plane from settings: identity, pools, pipeline, the ASGI app."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

from prometheus_client import CollectorRegistry

from edge.asgi import EdgeApp
from edge.identity import CookieSigner, Identity
from edge.metrics import EdgeMetrics, TurnoutCollector
from edge.pipeline import Pipeline
from edge.targets import PoolSet
from edge.upstream import Timeouts
from edge.websocket import WebSocketProxy
from flags.evaluate import Snapshot
from flags.store import Revision
from stores.secretfile import read_or_create_secret
from stores.settings import Settings
from stores.watch import ConfigWatcher


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
        self.app = EdgeApp(self.pipeline, WebSocketProxy(self.pipeline))
        self.watcher = watcher
        self._closing: set[asyncio.Task[None]] = set()
        self.pipeline.apply(watcher.snapshot)
        watcher.listeners.append(self._on_config)
        watcher.listeners.append(self.metrics.on_config_applied)
        if registry is not None:
            registry.register(TurnoutCollector(self.metrics, watcher))

    def _on_config(self, snapshot: Snapshot, revision: Revision | None) -> None:
        unused = self.pipeline.apply(snapshot)
        for pool in unused:
            with contextlib.suppress(RuntimeError):  # no running loop: nothing to close on
                task = asyncio.get_running_loop().create_task(pool.aclose())
                self._closing.add(task)
                task.add_done_callback(self._closing.discard)

    async def aclose(self) -> None:
        await self.pools.aclose()
