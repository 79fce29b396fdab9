"""The maintenance answer (issue #10): 503 + Retry-After, JSON or a short HTML page.

Built only when maintenance is on, so it costs the request path nothing otherwise.
"""

from __future__ import annotations

import html

import orjson

from flags.rollout import Maintenance

_JSON = b"application/json"


def wants_json(headers: list[tuple[bytes, bytes]]) -> bool:
    """Accept names application/json (or any +json type) ahead of text/html."""
    for name, value in headers:
        if name == b"accept":
            lowered = value.lower()
            json_at = min(
                (i for i in (lowered.find(_JSON), lowered.find(b"+json")) if i >= 0), default=-1
            )
            html_at = lowered.find(b"text/html")
            return json_at >= 0 and (html_at < 0 or json_at < html_at)
    return False


def maintenance_answer(
    maintenance: Maintenance | None, headers: list[tuple[bytes, bytes]]
) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    m = maintenance or Maintenance(enabled=True)
    if wants_json(headers):
        body = orjson.dumps(
            {"error": "maintenance", "message": m.message, "retry_after_s": m.retry_after_s}
        )
        media = b"application/json"
    else:
        text = html.escape(m.message)
        body = (
            "<!doctype html><html><head><meta charset=utf-8><title>Maintenance</title></head>"
            f"<body><h1>Maintenance</h1><p>{text}</p></body></html>\n"
        ).encode()
        media = b"text/html; charset=utf-8"
    return (
        503,
        [
            (b"content-type", media),
            (b"content-length", b"%d" % len(body)),
            (b"retry-after", b"%d" % m.retry_after_s),
            (b"cache-control", b"no-store"),
        ],
        body,
    )
