"""The admin application factory: a separate listener for the control plane.

Reads are open (the listener is loopback by default); every write needs the bearer token,
goes through `admin.writes.perform_write` and becomes a new configuration version.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response

from admin import config, health, releases, repair, rollout, versions
from admin.auth import BearerAuth, is_loopback, resolve_admin_token
from admin.context import AdminContext
from admin.responses import ApiError, json_response
from flags.errors import ConfigError
from flags.store import Store
from stores.events import EventBus
from stores.settings import Settings
from stores.watch import ConfigWatcher

log = logging.getLogger("turnout.admin")


async def _api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)
    return exc.response()


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    return json_response({"error": exc.detail}, status=exc.status_code, headers=exc.headers)


async def _unexpected(request: Request, exc: Exception) -> Response:
    log.error("admin request %s %s failed", request.method, request.url.path, exc_info=exc)
    return json_response({"error": "internal error"}, status=500)


def create_admin_app(
    settings: Settings,
    store: Store,
    watcher: ConfigWatcher,
    registry: CollectorRegistry,
    *,
    release_health: Callable[[str], dict[str, Any] | None] | None = None,
    events: EventBus | None = None,
) -> Starlette:
    """Build the admin API. Raises `ConfigError("admin_host", ...)` for a listener other
    machines can reach without a configured token (a generated file token is only for
    callers on this machine)."""
    if settings.admin_token is None and not is_loopback(settings.admin_host):
        raise ConfigError(
            "admin_host",
            f"the admin API listens on {settings.admin_host!r}, which is not loopback: "
            "set admin_token (TURNOUT_ADMIN_TOKEN) or listen on 127.0.0.1",
        )
    ctx = AdminContext(
        settings=settings,
        store=store,
        watcher=watcher,
        registry=registry,
        auth=BearerAuth(resolve_admin_token(settings)),
        health=release_health,
        events=events,
    )
    return Starlette(
        routes=[
            *health.routes(ctx),
            *config.routes(ctx),
            *releases.routes(ctx),
            *versions.routes(ctx),
            *repair.routes(ctx),
            *rollout.routes(ctx),
        ],
        exception_handlers={
            ApiError: _api_error,
            HTTPException: _http_error,
            Exception: _unexpected,
        },
    )
