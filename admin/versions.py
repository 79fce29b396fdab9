"""The version history: list it, read one version, restore one as a new version."""

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
from flags.changes import restore
from flags.document import Document

DEFAULT_HISTORY_LIMIT = 100
MAX_HISTORY_LIMIT = 1000


def _limit(request: Request) -> int:
    raw = request.query_params.get("limit")
    if raw is None:
        return DEFAULT_HISTORY_LIMIT
    if not raw.isdigit() or not 1 <= int(raw) <= MAX_HISTORY_LIMIT:
        raise ApiError(422, f"must be an integer from 1 to {MAX_HISTORY_LIMIT}", field="limit")
    return int(raw)


def routes(ctx: AdminContext) -> list[Route]:
    async def list_versions(request: Request) -> Response:
        limit = _limit(request)
        current = await ctx.current_version()
        infos = await ctx.history(limit)
        return json_response({"current": current, "versions": [info.to_dict() for info in infos]})

    async def get_version(request: Request) -> Response:
        revision = await ctx.get_version(request.path_params["version"])
        body = {
            "version": revision.version,
            "info": revision.info.to_dict(),
            "document": revision.document.model_dump(mode="json"),
        }
        return versioned_response(body, revision.version)

    async def restore_version(request: Request) -> Response:
        version: int = request.path_params["version"]

        async def edit(doc: Document, body: dict[str, Any]) -> tuple[Document, str]:
            check_fields(body, ("reason",))
            reason = body.get("reason", "")
            if not isinstance(reason, str):
                raise ApiError(422, "must be a string", field="reason")
            old = await ctx.get_version(version)
            new, summary = restore(doc, old.document)
            return new, f"{summary} ({reason.strip()})" if reason.strip() else summary

        return await perform_write(
            ctx,
            request,
            action="version.restore",
            target=str(version),
            edit=edit,
            body_required=False,
        )

    return [
        route("/api/v1/versions", {"GET": list_versions}),
        route("/api/v1/versions/{version:int}", {"GET": get_version}),
        route("/api/v1/versions/{version:int}/restore", {"POST": restore_version}),
    ]
