"""Guarded delivery in the admin API (issue #10): health, plans, maintenance, the event stream.

    GET  /api/v1/releases/{name}/health          both arms' windows, verdict, plan phase
    GET  /api/v1/status                          the same for every release
    POST /api/v1/releases/{name}/plan/{action}   start | pause | resume | approve | abort
    POST /api/v1/releases/{name}/maintenance     {"enabled": bool, "retry_after_s", "message"}
    POST /api/v1/maintenance                     the same for every route
    GET  /api/v1/events                          text/event-stream: versions, verdicts, plans

Writes go through `admin.writes.perform_write` like every other change: one new version each,
audited, with compare-and-set. The health view describes what *this* instance judges (on the
fleet's sums when it has them), not what the store holds.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from admin.auth import actor_from
from admin.context import AdminContext
from admin.inputs import check_fields
from admin.responses import ApiError, json_response
from admin.routing import route
from admin.writes import perform_write
from flags import plan as plans
from flags.document import Document

PLAN_ACTIONS = ("start", "pause", "resume", "approve", "abort")
SSE_KEEPALIVE_S = 15.0


def routes(ctx: AdminContext) -> list[Route]:
    async def health(request: Request) -> Response:
        name = request.path_params["name"]
        if ctx.health is None:
            raise ApiError(503, "the guard is not running on this instance")
        view = ctx.health(name)
        if view is None:
            raise ApiError(
                404, f"release {name!r} is not in the served configuration", field="release"
            )
        return json_response(view)

    async def status(request: Request) -> Response:
        if ctx.health is None:
            raise ApiError(503, "the guard is not running on this instance")
        names = sorted(ctx.watcher.snapshot.releases)
        views = [v for v in (ctx.health(n) for n in names) if v is not None]
        return json_response({"version": ctx.watcher.version, "releases": views})

    async def plan_action(request: Request) -> Response:
        name = request.path_params["name"]
        action = request.path_params["action"]
        if action not in PLAN_ACTIONS:
            raise ApiError(
                404, f"unknown plan action {action!r} (known: {', '.join(PLAN_ACTIONS)})"
            )
        actor = actor_from(request.headers)

        async def edit(doc: Document, body: dict[str, Any]) -> tuple[Document, str]:
            if name not in doc.releases:
                raise ApiError(404, f"unknown release {name!r}", field="release")
            check_fields(body, ("reason",))
            now = time.time()
            if action == "start":
                return plans.start(doc, name, now)
            if action == "pause":
                return plans.pause(doc, name)
            if action == "resume":
                return plans.resume(doc, name, now)
            if action == "approve":
                return plans.approve(doc, name, actor, now)
            return plans.abort(doc, name, str(body.get("reason", "")))

        return await perform_write(
            ctx, request, action=f"plan.{action}", target=name, edit=edit, body_required=False
        )

    async def maintenance(request: Request) -> Response:
        name = request.path_params.get("name")

        async def edit(doc: Document, body: dict[str, Any]) -> tuple[Document, str]:
            if name is not None and name not in doc.releases:
                raise ApiError(404, f"unknown release {name!r}", field="release")
            check_fields(body, ("enabled", "retry_after_s", "message", "reason"))
            if "enabled" not in body:
                raise ApiError(422, "required", field="enabled")
            return plans.set_maintenance(
                doc,
                name,
                enabled=body["enabled"],
                retry_after_s=body.get("retry_after_s"),
                message=body.get("message"),
            )

        return await perform_write(
            ctx, request, action="maintenance", target=name or "*", edit=edit
        )

    async def events(request: Request) -> Response:
        bus = ctx.events
        if bus is None:
            raise ApiError(503, "no event stream on this instance")
        last = request.headers.get("last-event-id", "")
        sub = bus.subscribe()
        backlog = bus.since(int(last)) if last.isdigit() else []

        async def stream() -> AsyncIterator[bytes]:
            try:
                yield b"retry: 2000\n\n"
                for event in backlog:
                    yield _sse(event.id, event.kind, event.to_dict())
                while True:
                    try:
                        async with asyncio.timeout(SSE_KEEPALIVE_S):
                            event = await sub.queue.get()
                    except TimeoutError:
                        yield b": keep-alive\n\n"  # comment line: proxies keep the stream open
                        continue
                    yield _sse(event.id, event.kind, event.to_dict())
            finally:
                bus.unsubscribe(sub)

        return StreamingResponse(
            stream(),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
        )

    return [
        route("/api/v1/status", {"GET": status}),
        route("/api/v1/releases/{name}/health", {"GET": health}),
        route("/api/v1/releases/{name}/plan/{action}", {"POST": plan_action}),
        route("/api/v1/releases/{name}/maintenance", {"POST": maintenance}),
        route("/api/v1/maintenance", {"POST": maintenance}),
        route("/api/v1/events", {"GET": events}),
    ]


def _sse(event_id: int, kind: str, data: dict[str, Any]) -> bytes:
    """One event in the WHATWG server-sent events format (one `data:` line of JSON)."""
    return b"id: %d\nevent: %s\ndata: %s\n\n" % (event_id, kind.encode(), orjson.dumps(data))
