"""The edge alone, as an app factory for uvicorn's own process manager:

    TURNOUT_STORE=redis://127.0.0.1:6379/0 TURNOUT_COOKIE_SECRET=... \\
      uvicorn turnout.worker:app --factory --workers 2 --http httptools --no-proxy-headers

Each worker builds its settings from `TURNOUT_*`, follows the store with its own watcher and
decides exactly as `turnout serve` does (the bucketing contract has no per-process state).
This mode has no admin listener: run `turnout serve` (or another instance) for the admin API,
and set `cookie_secret` explicitly, or every worker shares the generated one in `state_dir`.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from edge.app import Edge
from edge.guardian import Guardian
from stores.fleetstats import fleet_stats_for
from stores.settings import Settings, load_settings
from stores.watch import ConfigWatcher
from turnout.server import make_store, seed_store

log = logging.getLogger("turnout.worker")


class WorkerApp:
    """ASGI app whose lifespan starts the store, the watcher and the edge."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.edge: Edge | None = None
        self.watcher: ConfigWatcher | None = None
        self.guardian: Guardian | None = None

    async def startup(self) -> None:
        settings = self.settings
        store = make_store(settings)
        try:
            await store.open()
            await seed_store(store, settings)
        except Exception as exc:  # noqa: BLE001 - the watcher serves the bootstrap copy
            log.warning("store not reachable at start: %s", exc)
        self.watcher = ConfigWatcher(
            store, bootstrap_path=settings.bootstrap_file, poll_interval_s=settings.poll_interval_s
        )
        await self.watcher.start()
        self.edge = Edge(settings, self.watcher, None)
        # Each worker judges like an instance (issue #10): on Redis, with the fleet's sums.
        self.guardian = Guardian(
            store=store,
            watcher=self.watcher,
            metrics=self.edge.metrics,
            fleet=fleet_stats_for(store),
            instance_id=f"{settings.instance_id or 'worker'}-{os.getpid()}",
            interval_s=settings.guard_interval_s,
        )
        if settings.guard_enabled:
            self.guardian.start()

    async def shutdown(self) -> None:
        if self.guardian is not None:
            await self.guardian.stop()
        if self.watcher is not None:
            await self.watcher.stop()
        if self.edge is not None:
            await self.edge.aclose()

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    try:
                        await self.startup()
                    except Exception as exc:  # noqa: BLE001 - reported to uvicorn
                        await send({"type": "lifespan.startup.failed", "message": str(exc)})
                        return
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await self.shutdown()
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        assert self.edge is not None, "uvicorn must run the lifespan (default 'auto' does)"
        await self.edge.app(scope, receive, send)


def app() -> WorkerApp:
    """The factory uvicorn calls in each worker process."""
    return WorkerApp(load_settings())
