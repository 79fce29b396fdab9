"""JSON responses and the one error type the admin handlers raise.

Every error body has the same shape, `{"error": message}` plus `"field"` (a dotted path
such as ``releases.web.percent``) when one input is to blame, so the CLI and any other client
can show exactly what to fix.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import orjson
from starlette.responses import Response

JSON_MEDIA_TYPE = "application/json"


def etag(version: int) -> str:
    """A strong entity tag for a configuration version (RFC 9110 §8.8.3)."""
    return f'"{version}"'


def json_response(
    data: Any, *, status: int = 200, headers: Mapping[str, str] | None = None
) -> Response:
    return Response(
        orjson.dumps(data),
        status_code=status,
        headers=headers,
        media_type=JSON_MEDIA_TYPE,
    )


def versioned_response(data: Any, version: int) -> Response:
    """A 200 carrying a configuration version, with that version as its ETag."""
    return json_response(data, headers={"ETag": etag(version)})


class ApiError(Exception):
    """A request the API refuses, with the status and message the client should see."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        field: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.field = field
        self.headers = dict(headers or {})

    def body(self) -> dict[str, Any]:
        data: dict[str, Any] = {"error": self.message}
        if self.field is not None:
            data["field"] = self.field
        return data

    def response(self) -> Response:
        return json_response(self.body(), status=self.status, headers=self.headers)
