"""Releases: list, read, create/replace, move between stages, roll back, explain."""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from admin.context import AdminContext
from admin.inputs import check_fields
from admin.responses import ApiError, json_response, versioned_response
from admin.routing import route
from admin.writes import perform_write
from flags.changes import put_release, rollback, set_stage
from flags.document import Document, effective_percent
from flags.evaluate import explain

MAX_EXPLAIN_EMAIL_CHARS = 320


def release_view(doc: Document, name: str) -> dict[str, Any]:
    """A release as the API shows it: its document form plus the percentage it stands for."""
    release = doc.releases[name]
    return {
        "name": name,
        **release.model_dump(mode="json"),
        "effective_percent": effective_percent(doc, release),
    }


def require_release(doc: Document, name: str) -> None:
    if name not in doc.releases:
        raise ApiError(404, f"unknown release {name!r}", field="release")


def routes(ctx: AdminContext) -> list[Route]:
    async def list_releases(request: Request) -> Response:
        """The store's releases; while the store is unreachable, the ones this instance
        serves (its own snapshot), marked stale, so `turnout status` answers during an
        outage (issue #13)."""
        try:
            doc = await ctx.latest_document()
        except ApiError as exc:
            if exc.status != 503:
                raise
            doc = ctx.watcher.snapshot.document
            views = [release_view(doc, name) for name in sorted(doc.releases)]
            body = {
                "version": doc.version,
                "releases": views,
                "source": "instance",
                "stale": True,
                "store_error": exc.message,
            }
            return versioned_response(body, doc.version)
        views = [release_view(doc, name) for name in sorted(doc.releases)]
        return versioned_response(
            {"version": doc.version, "releases": views, "source": "store", "stale": False},
            doc.version,
        )

    async def get_release(request: Request) -> Response:
        name = request.path_params["name"]
        doc = await ctx.latest_document()
        require_release(doc, name)
        return versioned_response(
            {"version": doc.version, "release": release_view(doc, name)}, doc.version
        )

    async def put(request: Request) -> Response:
        name = request.path_params["name"]

        async def edit(doc: Document, body: dict[str, Any]) -> tuple[Document, str]:
            return put_release(doc, name, body)

        return await perform_write(ctx, request, action="release.put", target=name, edit=edit)

    async def stage(request: Request) -> Response:
        name = request.path_params["name"]

        async def edit(doc: Document, body: dict[str, Any]) -> tuple[Document, str]:
            require_release(doc, name)
            check_fields(body, ("stage", "percent"))
            return set_stage(doc, name, stage=body.get("stage"), percent=body.get("percent"))

        return await perform_write(
            ctx, request, action="release.stage", target=name, edit=edit, local_override=True
        )

    async def roll_back(request: Request) -> Response:
        name = request.path_params["name"]

        async def edit(doc: Document, body: dict[str, Any]) -> tuple[Document, str]:
            require_release(doc, name)
            check_fields(body, ("reason",))
            return rollback(doc, name, body.get("reason", ""))

        return await perform_write(
            ctx, request, action="release.rollback", target=name, edit=edit, local_override=True
        )

    async def explain_unit(request: Request) -> Response:
        """Why a unit gets its arm, over the snapshot this instance serves right now."""
        name = request.path_params["name"]
        unit_id = request.query_params.get("unit_id")
        email = request.query_params.get("email") or None
        if not unit_id:
            raise ApiError(422, "the query parameter unit_id is required", field="unit_id")
        if email is not None and len(email) > MAX_EXPLAIN_EMAIL_CHARS:
            raise ApiError(422, "e-mail address too long", field="email")
        snapshot = ctx.watcher.snapshot
        if name not in snapshot.releases:
            raise ApiError(
                404,
                f"release {name!r} is not in the served configuration",
                field="release",
            )
        result = explain(snapshot, name, unit_id, email)
        return json_response({**result, "stale": ctx.watcher.stale})

    return [
        route("/api/v1/releases", {"GET": list_releases}),
        route("/api/v1/releases/{name}", {"GET": get_release, "PUT": put}),
        route("/api/v1/releases/{name}/stage", {"POST": stage}),
        route("/api/v1/releases/{name}/rollback", {"POST": roll_back}),
        route("/api/v1/releases/{name}/explain", {"GET": explain_unit}),
    ]
