"""HTTP/1.1 body framing (edge/framing.py) as tables: requests, upstream responses and the
responses the edge writes (RFC 9112 §6)."""

from __future__ import annotations

import pytest

from edge.framing import (
    CHUNKED,
    CONTENT_LENGTH,
    NO_BODY,
    UNTIL_CLOSE,
    FramingError,
    outgoing_framing,
    parse_content_length,
    request_framing,
    response_framing,
    response_has_body,
)

# version, Content-Length, Transfer-Encoding -> (framing, length) or the refusal's status
REQUESTS = [
    ("1.1", None, None, (NO_BODY, -1)),
    ("1.0", None, None, (NO_BODY, -1)),
    ("1.1", b"0", None, (CONTENT_LENGTH, 0)),
    ("1.1", b"12", None, (CONTENT_LENGTH, 12)),
    ("1.0", b"12", None, (CONTENT_LENGTH, 12)),
    ("1.1", b"007", None, 400),  # a leading zero: 7 or octal? (HARDENING table (a) row 5)
    ("1.1", None, b"chunked", (CHUNKED, -1)),
    ("1.1", None, b"Chunked ", (CHUNKED, -1)),
    ("1.1", b"5", b"chunked", 400),  # both: a smuggling vector (§6.1)
    ("1.1", None, b"gzip, chunked", 501),
    ("1.1", None, b"identity", 501),
    ("1.0", None, b"chunked", 501),  # HTTP/1.0 has no transfer codings
    ("1.1", b"-1", None, 400),
    ("1.1", b"+5", None, 400),
    ("1.1", b"5, 5", None, 400),
    ("1.1", b"1 2", None, 400),
    ("1.1", b"0x10", None, 400),
    ("1.1", b"", None, 400),
    ("1.1", b"9" * 16, None, 400),  # longer than 15 digits
    ("1.1", b"\xd9\xa3", None, 400),  # a non-ASCII digit
]


@pytest.mark.parametrize(("version", "cl", "te", "expected"), REQUESTS)
def test_request_framing(
    version: str, cl: bytes | None, te: bytes | None, expected: tuple[int, int] | int
) -> None:
    """Each request row is framed, or refused with its status, exactly as the table says."""
    if isinstance(expected, int):
        with pytest.raises(FramingError) as info:
            request_framing(version, cl, te)
        assert info.value.status == expected
    else:
        assert request_framing(version, cl, te) == expected


# status, CL, TE, number of TE fields, HEAD?, CONNECT? -> (framing, length) or 502
RESPONSES = [
    (200, b"5", None, 0, False, False, (CONTENT_LENGTH, 5)),
    (200, None, b"chunked", 1, False, False, (CHUNKED, -1)),
    (200, None, None, 0, False, False, (UNTIL_CLOSE, -1)),
    (200, b"5", None, 0, True, False, (NO_BODY, -1)),  # response to HEAD
    (200, None, None, 0, False, True, (NO_BODY, -1)),  # 2xx to CONNECT: a tunnel
    (407, None, None, 0, False, True, (UNTIL_CLOSE, -1)),  # a refused CONNECT has a body
    (204, None, None, 0, False, False, (NO_BODY, -1)),
    (304, b"5", None, 0, False, False, (NO_BODY, -1)),
    (101, None, None, 0, False, False, (NO_BODY, -1)),
    (103, None, None, 0, False, False, (NO_BODY, -1)),
    (500, b"0", None, 0, False, False, (CONTENT_LENGTH, 0)),
    (200, b"5", b"chunked", 1, False, False, 502),
    (200, None, b"chunked", 2, False, False, 502),  # two Transfer-Encoding fields
    (200, None, b"gzip", 1, False, False, 502),
    (200, b"abc", None, 0, False, False, 502),
    (200, b"9" * 16, None, 0, False, False, 502),
    (200, b"010", None, 0, False, False, 502),  # a leading zero, as for requests
]


@pytest.mark.parametrize(("status", "cl", "te", "te_n", "head", "connect", "expected"), RESPONSES)
def test_response_framing(
    status: int,
    cl: bytes | None,
    te: bytes | None,
    te_n: int,
    head: bool,
    connect: bool,
    expected: tuple[int, int] | int,
) -> None:
    """Each upstream response row is framed, or refused as the upstream's fault (502)."""
    kwargs = {"transfer_encodings": te_n, "head": head, "connect": connect}
    if isinstance(expected, int):
        with pytest.raises(FramingError) as info:
            response_framing(status, cl, te, **kwargs)  # type: ignore[arg-type]
        assert info.value.status == expected
    else:
        assert response_framing(status, cl, te, **kwargs) == expected  # type: ignore[arg-type]


# status, client version, known length, HEAD? -> how the edge frames its answer
OUTGOING = [
    (200, "1.1", 10, False, CONTENT_LENGTH),
    (200, "1.1", -1, False, CHUNKED),
    (200, "1.0", -1, False, UNTIL_CLOSE),
    (200, "1.0", 10, False, CONTENT_LENGTH),
    (200, "1.1", -1, True, NO_BODY),
    (204, "1.1", -1, False, NO_BODY),
    (304, "1.0", 5, False, NO_BODY),
    (100, "1.1", -1, False, NO_BODY),
]


@pytest.mark.parametrize(("status", "version", "length", "head", "expected"), OUTGOING)
def test_outgoing_framing(
    status: int, version: str, length: int, head: bool, expected: int
) -> None:
    """The edge writes Content-Length when it knows the body, chunked to 1.1, close to 1.0."""
    assert outgoing_framing(status, version, length, head=head) == expected


def test_body_rules_agree_and_content_length_is_strict() -> None:
    """response_has_body is the NO_BODY rule of both other functions; digits only, 15 at most."""
    for status in (100, 101, 199, 200, 204, 206, 304, 404, 599):
        for head in (False, True):
            has = response_has_body(status, head=head)
            assert (outgoing_framing(status, "1.1", -1, head=head) != NO_BODY) is has
            assert (response_framing(status, None, None, head=head)[0] != NO_BODY) is has
    assert parse_content_length(b"9" * 15) == 10**15 - 1
    with pytest.raises(FramingError):
        parse_content_length(b" 5")
