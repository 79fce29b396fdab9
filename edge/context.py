"""The per-request context: what the phases of one exchange learn, in one slots object.

Rules of this file:
* One `RequestContext` per exchange (Pingora's per-request `CTX`), built by the front-end,
  filled in by the pipeline's phases (edge/pipeline.py) in order, and handed whole to the
  final `logging` phase. Phases read and write it instead of passing positional tuples, so a
  later hook (access log, per-arm guard statistics, rate limits) finds everything in one place.
* Plain `__slots__` attributes with defaults: no dict, no dataclass machinery on the hot path.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from edge.targets import Target
    from edge.upstream import UpstreamPool
    from flags.evaluate import CompiledRelease


class RequestContext:
    """One exchange, from the request head to the last response byte."""

    __slots__ = (
        # the request, as the front-end parsed it
        "method",
        "path",
        "query",
        "headers",
        "version",
        "client",
        "scheme",
        "websocket",
        # request_filter
        "host",
        "kept",
        "unit_header",
        "cookie",
        "email",
        "length",
        "chunked",
        "ofrep",
        # identify + decide
        "route",
        "release",
        "unit",
        "set_cookie",
        "arm",
        "cohort",
        "target",
        # upstream_peer + forward
        "upstream",
        "started",
        "upstream_s",
        # the answer
        "status",
        "bytes_sent",
        "error",
        "client_closed",
        "queued",
        "client_ip",
    )

    def __init__(
        self,
        method: str,
        path: bytes,
        query: bytes,
        headers: list[tuple[bytes, bytes]],
        version: str,
        client: tuple[str, int] | None,
        scheme: str,
        started: float,
    ) -> None:
        self.method = method
        self.path = path  # the raw target's path; canonical after request_filter
        self.query = query
        self.headers = headers
        self.version = version
        self.client = client
        self.scheme = scheme
        self.websocket = False
        self.host: bytes | None = None
        self.kept: list[bytes] = []  # forwarded header lines, in fours (name, ": ", value, CRLF)
        self.unit_header: bytes | None = None
        self.cookie: bytes | None = None
        self.email: bytes | None = None
        self.length = -1  # request body length; -1 when none is declared
        self.chunked = False
        self.ofrep = False  # under the OFREP mount: served by edge/ofrep.py, never routed
        self.route: CompiledRelease | None = None
        self.release = ""
        self.unit = ""
        self.set_cookie: bytes | None = None  # a new anonymous unit's signed cookie
        self.arm = ""
        self.cohort = ""
        self.target: Target | None = None
        self.upstream: UpstreamPool | None = None
        self.started = started  # perf_counter() when the request head was complete
        self.upstream_s = -1.0  # seconds until the upstream's response head; -1 if none came
        self.status = 0  # the status answered to the client; 0 if none was
        self.bytes_sent = 0  # response body bytes handed to the client
        self.error: str | None = None  # upstream failure kind (edge/errors.py `classify`)
        # The client went away before its answer was written (the access log's 499).
        self.client_closed = False
        self.queued = False  # waiting for a slot of a full upstream pool (edge/frontend.py)
        # The client's address after the trusted hops (X-Forwarded-For); None: the peer's.
        self.client_ip: str | None = None
