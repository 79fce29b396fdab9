"""The whole configuration document: read it, replace its content (`turnout apply`)."""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from admin.context import AdminContext
from admin.responses import versioned_response
from admin.routing import route
from admin.writes import perform_write
from flags.changes import replace_document
from flags.document import Document


def routes(ctx: AdminContext) -> list[Route]:
    async def get_config(request: Request) -> Response:
        doc = await ctx.latest_document()
        return versioned_response(
            {"version": doc.version, "document": doc.model_dump(mode="json")},
            doc.version,
        )

    async def put_config(request: Request) -> Response:
        async def edit(doc: Document, body: dict[str, Any]) -> tuple[Document, str]:
            return replace_document(doc, body)

        return await perform_write(
            ctx, request, action="config.replace", target="document", edit=edit
        )

    return [route("/api/v1/config", {"GET": get_config, "PUT": put_config})]
