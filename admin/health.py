"""Liveness, readiness and metrics: what this instance serves, not what the store holds."""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from admin.context import AdminContext
from admin.responses import json_response
from admin.routing import route


def routes(ctx: AdminContext) -> list[Route]:
    watcher = ctx.watcher

    async def healthz(request: Request) -> Response:
        """The process is alive and answering (nothing else is checked)."""
        return json_response({"status": "alive"})

    async def readyz(request: Request) -> Response:
        """Ready once a configuration from the store or a bootstrap copy is served; a stale
        one (store unreachable) still serves traffic, so it stays 200 and says so."""
        ready = watcher.ready
        body = {
            "status": "ready" if ready else "not_ready",
            "version": watcher.version,
            "source": watcher.source,
            "stale": watcher.stale,
            "connected": watcher.connected,
            "config_age_s": round(watcher.age_seconds(), 3),
            "pending_override": watcher.pending_override,
        }
        return json_response(body, status=200 if ready else 503)

    async def metrics(request: Request) -> Response:
        return Response(generate_latest(ctx.registry), media_type=CONTENT_TYPE_LATEST)

    return [
        route("/healthz", {"GET": healthz}),
        route("/readyz", {"GET": readyz}),
        route("/metrics", {"GET": metrics}),
    ]
