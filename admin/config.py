"""The whole configuration document: read it, replace its content (`turnout apply`)."""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from admin.context import AdminContext
from admin.responses import ApiError, versioned_response
from admin.routing import route
from admin.writes import perform_write
from flags.changes import replace_document
from flags.diff import diff_documents, emptying_problem
from flags.document import Document

_TRUE = ("1", "true", "yes")
_FLAGS = ("", "0", "1", "true", "false", "yes", "no")


def _flag(request: Request, name: str) -> bool:
    """A boolean query parameter (`?dry_run=true`); anything else is a 422 naming it."""
    value = request.query_params.get(name, "").strip().lower()
    if value not in _FLAGS:
        raise ApiError(422, "must be true or false", field=name)
    return value in _TRUE


def routes(ctx: AdminContext) -> list[Route]:
    async def get_config(request: Request) -> Response:
        doc = await ctx.latest_document()
        return versioned_response(
            {"version": doc.version, "document": doc.model_dump(mode="json")},
            doc.version,
        )

    async def put_config(request: Request) -> Response:
        """Replace the document. `?dry_run=true` validates and describes the change without
        writing; a document that would stop serving everything served today (no route left,
        or no routed release left) is refused unless `?allow_empty=true` (issue #13)."""
        dry_run = _flag(request, "dry_run")
        allow_empty = _flag(request, "allow_empty")

        async def edit(doc: Document, body: dict[str, Any]) -> tuple[Document, str]:
            new, summary = replace_document(doc, body)
            problem = emptying_problem(doc, new)
            if problem is not None and not allow_empty:
                field, message = problem
                raise ApiError(
                    422,
                    f"{message}; nothing was changed (to mean it: turnout apply --allow-empty, "
                    "or ?allow_empty=true)",
                    field=field,
                )
            changes = diff_documents(doc, new)
            if changes:
                more = f" (+{len(changes) - 1} more)" if len(changes) > 1 else ""
                summary = f"{summary}: {changes[0].text}{more}"
            return new, summary

        return await perform_write(
            ctx,
            request,
            action="config.replace",
            target="document",
            edit=edit,
            dry_run=dry_run,
            skip_identical=True,
        )

    return [route("/api/v1/config", {"GET": get_config, "PUT": put_config})]
