"""The write pipeline every mutation goes through, so each rule is enforced once.

    authenticate -> If-Match syntax -> body -> store's latest revision -> If-Match check
    -> pure edit (flags.changes) -> compare-and-set commit -> watcher.offer -> audit

Rules of this file:
* The edit starts from the store's latest revision, never the watcher's snapshot (which may
  lag), and commits with `expected_version` = that revision's version: a concurrent writer
  makes this one fail (409/412) instead of being overwritten (HARDENING.md §8 row 16).
* Nothing is written unless every step before the commit passed; an error response always
  means the store is unchanged or (503) that nothing was confirmed.
* After the commit the revision is offered to this instance's watcher, so the change applies
  here on the very next request instead of at the next poll.
* Every attempt, including refused and unauthenticated ones, leaves one audit line.
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from admin.audit import (
    RESULT_DENIED,
    RESULT_FAILED,
    RESULT_OK,
    RESULT_REFUSED,
    AuditEvent,
)
from admin.auth import actor_from
from admin.context import AdminContext
from admin.inputs import parse_if_match, read_json
from admin.responses import ApiError, json_response, versioned_response
from flags.diff import diff_documents
from flags.document import Document
from flags.errors import ConfigError

Edit = Callable[[Document, dict[str, Any]], Awaitable[tuple[Document, str]]]
"""A change: (the store's latest document, the request body) -> (new document, summary)."""

REQUEST_ID_HEADER = "x-request-id"
LOCAL_OVERRIDE_FIELD = "local_override"
_UNAUTHORIZED_HEADERS = {"WWW-Authenticate": 'Bearer realm="turnout-admin"'}


def _request_id(request: Request) -> str:
    given = request.headers.get(REQUEST_ID_HEADER, "")
    return given[:64] if given.isascii() and given.isprintable() and given else uuid.uuid4().hex


async def perform_write(
    ctx: AdminContext,
    request: Request,
    *,
    action: str,
    target: str,
    edit: Edit,
    body_required: bool = True,
    local_override: bool = False,
    dry_run: bool = False,
    skip_identical: bool = False,
) -> Response:
    """Run one write through the pipeline; the response for the client.

    With `local_override` (stage and rollback only), a body field `"local_override": true`
    lets ops change this instance even while the store is unreachable (HARDENING.md §4.3
    rule 6): the edit is applied to the snapshot being served, kept in the bootstrap file,
    answered with 202, and committed as a new version when the store returns."""
    event = AuditEvent(
        actor=actor_from(request.headers),
        action=action,
        target=target,
        client=request.client.host if request.client else "",
        request_id=_request_id(request),
    )
    if dry_run:
        event.detail = "dry run: nothing written"
    try:
        response = await _write(
            ctx,
            request,
            event,
            edit,
            body_required,
            local_override and not dry_run,
            dry_run,
            skip_identical,
        )
    except ApiError as exc:
        event.status = exc.status
        event.detail = f"{exc.field}: {exc.message}" if exc.field else exc.message
        if exc.status == 401:
            event.result = RESULT_DENIED
        elif exc.status >= 500:
            event.result = RESULT_FAILED
        else:
            event.result = RESULT_REFUSED
        event.emit()
        return exc.response()
    except BaseException:
        event.emit()  # result "error": a bug, or the request was cancelled
        raise
    event.result = RESULT_OK
    event.status = response.status_code
    event.emit()
    return response


async def _write(
    ctx: AdminContext,
    request: Request,
    event: AuditEvent,
    edit: Edit,
    body_required: bool,
    local_override_allowed: bool,
    dry_run: bool = False,
    skip_identical: bool = False,
) -> Response:
    authorization = request.headers.get("authorization")
    if not ctx.auth.check(authorization):
        headers = dict(_UNAUTHORIZED_HEADERS)
        if authorization:
            # RFC 6750 §3: tell a client with a wrong token apart from one without any.
            headers["WWW-Authenticate"] += ', error="invalid_token"'
        raise ApiError(401, "a valid 'Authorization: Bearer <token>' is required", headers=headers)
    event.authenticated = True
    accepted = parse_if_match(request.headers.get("if-match"))
    body = await read_json(request, required=body_required)
    reason = body.get("reason")
    if isinstance(reason, str):
        event.reason = reason
    local = body.pop(LOCAL_OVERRIDE_FIELD, False) if local_override_allowed else False
    if not isinstance(local, bool):
        raise ApiError(422, "must be true or false", field=LOCAL_OVERRIDE_FIELD)
    try:
        return await _commit(ctx, event, edit, body, accepted, dry_run, skip_identical)
    except ApiError as exc:
        if not (local and exc.status == 503):
            raise
        return await _apply_locally(ctx, event, edit, body, exc.message)


async def _apply_locally(
    ctx: AdminContext, event: AuditEvent, edit: Edit, body: dict[str, Any], why: str
) -> Response:
    """The store is down: change what this instance serves, commit later."""
    base = ctx.watcher.snapshot.document
    try:
        new, summary = await edit(base, body)
    except ConfigError as exc:
        raise ApiError(422, exc.message, field=exc.field or None) from None
    try:
        await ctx.watcher.apply_local_override(new, summary, event.actor)
    except ConfigError as exc:
        raise ApiError(422, exc.message, field=exc.field or None) from None
    event.before_version = base.version
    event.detail = f"local override while the store is down ({why})"
    return json_response(
        {
            "local_override": True,
            "pending": True,
            "summary": summary,
            "served_version": base.version,
            "message": "applied on this instance only; it becomes a new version when the "
            "store is reachable again",
        },
        status=202,
    )


async def _commit(
    ctx: AdminContext,
    event: AuditEvent,
    edit: Edit,
    body: dict[str, Any],
    accepted: frozenset[int] | None,
    dry_run: bool = False,
    skip_identical: bool = False,
) -> Response:
    latest = await ctx.latest()
    before = latest.version if latest is not None else 0
    event.before_version = before
    if before < ctx.watcher.version:
        # Versions never go back, so the store lost data (HARDENING.md §4.2: an emptied or
        # failed-over Redis). Writing on top would build on a stale base; re-seed first.
        raise ApiError(
            503,
            f"the store is at version {before} but this instance serves version "
            f"{ctx.watcher.version}: the store lost data; re-seed it before writing",
        )
    if accepted is not None and before not in accepted:
        wanted = ", ".join(str(v) for v in sorted(accepted))
        raise ApiError(
            412,
            f"version is {before}, not {wanted}; nothing was changed",
            field="If-Match",
        )
    current = latest.document if latest is not None else Document()
    try:
        new, summary = await edit(current, body)
    except ConfigError as exc:
        raise ApiError(422, exc.message, field=exc.field or None) from None
    changes = [change.to_dict() for change in diff_documents(current, new)]
    if dry_run:
        return versioned_response(
            {"version": before, "dry_run": True, "summary": summary, "changes": changes}, before
        )
    if skip_identical and new.content() == current.content():
        # Applying the document in force is not a new version (issue #13). Other writes keep
        # making a version each, as their callers (and the guard's audit trail) expect.
        event.after_version = before
        event.detail = "no change"
        return versioned_response(
            {"version": before, "changed": False, "summary": "no change", "changes": []}, before
        )

    revision = await ctx.commit(
        new,
        expected_version=before,
        actor=event.actor,
        summary=summary,
        conditional=accepted is not None,
    )
    event.after_version = revision.version
    ctx.watcher.offer(revision)
    return versioned_response(
        {"version": revision.version, "changed": True, "summary": summary, "changes": changes},
        revision.version,
    )
