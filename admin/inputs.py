"""Reading what a client sends: a capped JSON body, `If-Match`, the allowed body fields.

Rules of this file:
* A body is read at most `max_bytes` (HARDENING.md §5: body-size limits): a larger declared
  `Content-Length` is refused before reading, a longer stream as soon as it passes the cap.
* Bad JSON is 400; JSON of the wrong shape or with unknown fields is 422 naming the field.
* `If-Match` takes the ETags this API hands out (`"5"`), and, leniently, `5` and `W/"5"`
  (a weak tag of a version names the same version), a list of them, or `*` (RFC 9110 §13.1.1).
"""

from __future__ import annotations

import re
from collections.abc import Collection
from typing import Any

import orjson
from starlette.requests import Request

from admin.responses import ApiError

MAX_BODY_BYTES = 1024 * 1024
MAX_VERSION_DIGITS = 18
_VERSION_TAG = re.compile(rf'^(?:W/)?"?([0-9]{{1,{MAX_VERSION_DIGITS}}})"?$')


async def read_body(request: Request, max_bytes: int = MAX_BODY_BYTES) -> bytes:
    """The raw body, refused with 413 once it is longer than `max_bytes`."""
    too_large = ApiError(413, f"request body larger than {max_bytes} bytes")
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise ApiError(400, "invalid Content-Length", field="Content-Length")
        if int(declared) > max_bytes:
            raise too_large
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)


async def read_json(
    request: Request, *, required: bool = True, max_bytes: int = MAX_BODY_BYTES
) -> dict[str, Any]:
    """The body as a JSON object. An empty body is `{}` when not `required`."""
    body = await read_body(request, max_bytes)
    if not body.strip():
        if required:
            raise ApiError(400, "a JSON object body is required", field="body")
        return {}
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise ApiError(400, f"invalid JSON: {exc}", field="body") from None
    if not isinstance(data, dict):
        raise ApiError(422, "the body must be a JSON object", field="body")
    return data


def check_fields(body: dict[str, Any], allowed: Collection[str]) -> None:
    """Refuse fields this endpoint does not know (a typo must not be silently ignored)."""
    for key in body:
        if key not in allowed:
            known = ", ".join(sorted(allowed)) or "none"
            raise ApiError(422, f"unknown field (known: {known})", field=key)


def parse_if_match(value: str | None) -> frozenset[int] | None:
    """The versions an `If-Match` header accepts; None when absent or `*` (no condition)."""
    if value is None:
        return None
    if value.strip() == "*":
        return None
    versions: set[int] = set()
    for part in value.split(","):
        match = _VERSION_TAG.match(part.strip())
        if match is None:
            raise ApiError(
                400,
                f'If-Match must be a version such as "5", got {value[:40]!r}',
                field="If-Match",
            )
        versions.add(int(match.group(1)))
    return frozenset(versions)
