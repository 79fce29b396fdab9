"""HTTP/1.1 message framing, decided in one place for both sides (RFC 9112 §6; after h11's
`_body_framing`).

Rules of this file:
* "Does this message have a body, and how is it framed?" is answered here and nowhere else:
  the pipeline asks it of client requests (edge/pipeline.py), the upstream pool of upstream
  responses (edge/upstream.py), the front-end of the responses it writes (edge/frontend.py).
* Strict, because a proxy that frames a message differently from its neighbour is a request
  smuggling vector (RFC 9112 §11.2): Transfer-Encoding must be exactly `chunked` and never
  beside Content-Length (§6.1); Content-Length is 1*DIGIT without a leading zero and nothing else (RFC 9110 §8.6).
* Pure: bytes and numbers in, a framing out, `FramingError` (with the status a server
  would answer) for what must be refused. No I/O.

    message                                      body framing
    response to HEAD, 1xx, 204, 304              NO_BODY (RFC 9112 §6.3 item 1)
    2xx response to CONNECT                      NO_BODY, the connection becomes a tunnel (item 2)
    Transfer-Encoding: chunked                   CHUNKED (item 4)
    Content-Length: N                            CONTENT_LENGTH N (item 6)
    request with neither                         NO_BODY (item 7)
    response with neither                        UNTIL_CLOSE (item 8)
"""

from __future__ import annotations

__all__ = [
    "CHUNKED",
    "CONTENT_LENGTH",
    "MAX_CONTENT_LENGTH_DIGITS",
    "NO_BODY",
    "UNTIL_CLOSE",
    "FramingError",
    "outgoing_framing",
    "parse_content_length",
    "request_framing",
    "response_framing",
    "response_has_body",
]

NO_BODY, CONTENT_LENGTH, CHUNKED, UNTIL_CLOSE = range(4)
MAX_CONTENT_LENGTH_DIGITS = 15  # up to ~1 PB: a longer value is refused, never parsed
_NO_BODY_STATUSES = frozenset({204, 304})


class FramingError(Exception):
    """A message whose framing cannot be trusted; `status` is what a server answers."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def parse_content_length(value: bytes, status: int = 400) -> int:
    """A Content-Length value: 1*DIGIT (RFC 9110 §8.6), at most 15 digits; no sign, no
    spaces inside, no list of values, no leading zero ("010" is read as 10 by some parsers
    and 8 by others: HARDENING table (a) row 5, issue #12)."""
    if (
        not value.isdigit()
        or len(value) > MAX_CONTENT_LENGTH_DIGITS
        or not value.isascii()
        or (len(value) > 1 and value[:1] == b"0")
    ):
        raise FramingError(status, "invalid Content-Length")
    return int(value)


def request_framing(
    version: str, content_length: bytes | None, transfer_encoding: bytes | None
) -> tuple[int, int]:
    """(framing, length) of a client request; length is -1 unless CONTENT_LENGTH."""
    if transfer_encoding is not None:
        if content_length is not None:
            raise FramingError(400, "both Content-Length and Transfer-Encoding")  # §6.1
        if version == "1.0" or transfer_encoding.strip().lower() != b"chunked":
            raise FramingError(501, "unsupported Transfer-Encoding")  # §6.1: 1.0 has no TE
        return CHUNKED, -1
    if content_length is not None:
        return CONTENT_LENGTH, parse_content_length(content_length)
    return NO_BODY, -1


def response_has_body(status: int, *, head: bool = False, connect: bool = False) -> bool:
    """Whether a response to the given request can carry a body (RFC 9112 §6.3 items 1-2)."""
    if head or status < 200 or status in _NO_BODY_STATUSES:
        return False
    return not (connect and status < 300)


def response_framing(
    status: int,
    content_length: bytes | None,
    transfer_encoding: bytes | None,
    *,
    transfer_encodings: int = 1,
    head: bool = False,
    connect: bool = False,
) -> tuple[int, int]:
    """(framing, length) of an upstream response; `transfer_encodings` is how many
    Transfer-Encoding fields it had. Refusals carry 502: the upstream is at fault."""
    if not response_has_body(status, head=head, connect=connect):
        return NO_BODY, -1
    if transfer_encoding is not None:
        if (
            transfer_encodings > 1
            or content_length is not None
            or transfer_encoding.strip().lower() != b"chunked"
        ):
            raise FramingError(502, "invalid Transfer-Encoding from upstream")
        return CHUNKED, -1
    if content_length is not None:
        return CONTENT_LENGTH, parse_content_length(content_length, 502)
    return UNTIL_CLOSE, -1


def outgoing_framing(status: int, version: str, length: int, *, head: bool = False) -> int:
    """How the edge frames a response it writes to a client: no body where none is allowed,
    Content-Length when the whole body is known (`length` >= 0), else chunked for HTTP/1.1
    and close-delimited for HTTP/1.0, which has no chunked coding (RFC 9112 §6.1)."""
    if not response_has_body(status, head=head):
        return NO_BODY
    if length >= 0:
        return CONTENT_LENGTH
    return UNTIL_CLOSE if version == "1.0" else CHUNKED
