"""Upstream failures: one exception tree, mapped to an answer in one place (DESIGN.md §1 rule 4).

Rules of this file:
* Modelled on httpx's tree: callers catch the kind of failure, never compare strings. The
  upstream pool (edge/upstream.py) and the WebSocket tunnel (edge/tunnel.py) raise them; the
  pipeline turns them into a status and a metric `kind` with `classify`, and nowhere else.
* `sent` says whether the request may have reached the upstream. Only a failure with nothing
  sent may be tried on another upstream of the arm (RFC 9110 §9.2.2: a request that went out
  is never replayed elsewhere).

    UpstreamError                  502 protocol
    ├── ConnectError               502 connect   refused, unreachable, pool closed
    │   └── ClosedBeforeResponse   502 connect   the connection closed before any byte
    ├── UpstreamTimeout            504 timeout
    │   ├── ConnectTimeout
    │   ├── ReadTimeout
    │   ├── WriteTimeout
    │   └── PoolTimeout            503 pool      no free connection in time
    ├── ProtocolError              502 protocol  invalid framing or status, reset mid-response
    └── ResponseAborted            502 protocol  read after the response was given up
"""

from __future__ import annotations

__all__ = [
    "ClosedBeforeResponse",
    "ConnectError",
    "ConnectTimeout",
    "PoolTimeout",
    "ProtocolError",
    "ReadTimeout",
    "ResponseAborted",
    "UpstreamError",
    "UpstreamTimeout",
    "WriteTimeout",
    "classify",
]


class UpstreamError(Exception):
    """Any failure talking to an upstream."""

    sent = True  # the request may have reached the upstream (class default, per kind)


class ConnectError(UpstreamError):
    """Refused, unreachable, or the pool is closed: nothing was sent."""

    sent = False


class ClosedBeforeResponse(ConnectError):
    """The upstream closed the connection after the request, before any response byte."""

    sent = True


class UpstreamTimeout(UpstreamError):
    """A deadline on the upstream side passed."""


class ConnectTimeout(UpstreamTimeout):
    sent = False


class ReadTimeout(UpstreamTimeout):
    """No response head, or no further body bytes, within the read timeout."""


class WriteTimeout(UpstreamTimeout):
    """A streamed request body could not be written within the write timeout."""


class PoolTimeout(UpstreamTimeout):
    """Every connection of the pool stayed busy for the whole pool timeout."""

    sent = False


class ProtocolError(UpstreamError):
    """Invalid framing, status or version from the upstream, or a reset mid-response."""


class ResponseAborted(UpstreamError):
    """A read on a response that was already given up (`abort()`)."""


# The one mapping from failure to answer: first match wins, so subclasses come first.
_ANSWERS: tuple[tuple[type[UpstreamError], int, str, str], ...] = (
    (PoolTimeout, 503, "upstream connection pool exhausted", "pool"),
    (UpstreamTimeout, 504, "upstream timed out", "timeout"),
    (ConnectError, 502, "upstream refused or unreachable", "connect"),
    (UpstreamError, 502, "invalid response from upstream", "protocol"),
)


def classify(exc: UpstreamError) -> tuple[int, str, str]:
    """(status, message for the client, metric kind) for an upstream failure."""
    for kind, status, message, metric in _ANSWERS:
        if isinstance(exc, kind):
            return status, message, metric
    raise AssertionError("unreachable: UpstreamError matches the last row")  # pragma: no cover
