"""Store repair: re-seed the store from this instance's last-known-good configuration.

After a Redis restart without persistence the watcher re-seeds by itself; this endpoint is
the explicit form (`turnout store reseed`), for example after a pointer went backwards.
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from admin.audit import RESULT_DENIED, RESULT_OK, AuditEvent
from admin.auth import actor_from
from admin.context import AdminContext
from admin.responses import ApiError, json_response
from admin.routing import route
from flags.errors import StoreError


def routes(ctx: AdminContext) -> list[Route]:
    async def reseed(request: Request) -> Response:
        event = AuditEvent(
            actor=actor_from(request.headers),
            action="store.reseed",
            target="store",
            client=request.client.host if request.client else "",
            request_id="",
        )
        if not ctx.auth.check(request.headers.get("authorization")):
            event.result = RESULT_DENIED
            event.status = 401
            event.emit()
            raise ApiError(401, "a valid 'Authorization: Bearer <token>' is required")
        event.authenticated = True
        try:
            written = await ctx.watcher.reseed()
        except (StoreError, OSError, TimeoutError) as exc:
            event.status = 503
            event.emit()
            raise ApiError(
                503, f"configuration store unavailable while re-seeding: {exc}"
            ) from None
        event.result = RESULT_OK
        event.status = 200
        event.after_version = ctx.watcher.version
        event.emit()
        return json_response({"reseeded": written, "version": ctx.watcher.version})

    return [route("/api/v1/store/reseed", {"POST": reseed})]
