"""The request pipeline: one proxied request's life as named phases (after Pingora), over one
per-request context (edge/context.py).

    request_filter          validate framing, Host and path; strip hop-by-hop, nominated and
                            internal headers; collect identity inputs; route  (HARDENING §2.1-2.6)
                            -- or, under the OFREP mount, hand the request to edge/ofrep.py
    identify                unit id (header > signed cookie > new signed cookie)
    decide                  maintenance holds all but the internal cohort (503, issue #10);
                            else the route's release assigns the unit an arm -> its target;
                            the document's rate limits admit it or answer 429 (issue #12)
    upstream_peer           the target's next upstream, round-robin over its pools, skipping
                            upstreams ejected by outlier detection (edge/outlier.py, #12)
    upstream_request_filter the upstream head, re-framed (never the client's CL/TE) with
                            X-Forwarded-*, Via, X-Turnout-* and the release's
                            upstream flags (edge/flagheader.py)           (DESIGN.md §5)
    forward                 the lean pool (edge/upstream.py), or a WebSocket tunnel after a 101
    response_filter         strip hop-by-hop both ways, decision headers, Set-Cookie
    logging                 the finished context: per-release, per-arm counters and latency,
                            the guard's per-arm windows (edge/armstats.py, issue #10), the
                            access log (edge/accesslog.py, issue #13), the outlier
                            detector's per-upstream streaks (issue #12)

Rules of this file:
* One admission (`admit`: request_filter -> identify -> decide) serves HTTP and WebSocket;
  every refusal is built by `error_response`; every upstream failure is mapped to a status
  and a metric kind by `edge.errors.classify`, nowhere else.
* `logging` is the one place a finished exchange is seen whole: hooks that need the outcome
  (access log, per-arm guard statistics, the outlier detector) belong there; the one exception
  is a failed connect that moves on to the arm's next upstream, which `logging` cannot see and
  `forward` tells the outlier detector itself. It runs for every exchange, refused,
  failed or answered, once the answer is written (off the latency path).
* `Downstream` is the one seam to the client side (edge/frontend.py implements it).
* It reads only the in-memory snapshot; it never touches the store.
* A connection with unread bytes or an unfinished request body never returns to a pool: on any
  error or client disconnect the upstream response is aborted, not released.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from typing import Protocol

from edge.accesslog import AccessLog
from edge.context import RequestContext
from edge.errors import UpstreamError, classify
from edge.flagheader import flag_header_entries
from edge.framing import CHUNKED, MAX_CONTENT_LENGTH_DIGITS, FramingError, request_framing
from edge.identity import Identity
from edge.maintenance import maintenance_answer
from edge.metrics import EdgeMetrics
from edge.ofrep import Ofrep
from edge.outlier import OutlierDetector
from edge.ratelimit import RateLimiter
from edge.redirects import LOCATION_FIELDS, relative_location, upstream_origins
from edge.targets import PoolSet, Target
from edge.tunnel import Handshake, Tunnel, TunnelRegistry, open_upstream
from edge.upstream import UpstreamPool, UpstreamResponse
from flags.evaluate import ARM_CANARY, REASON_TARGETING_MATCH, CompiledRelease, Snapshot
from flags.flageval import FlagSet
from flags.rollout import Maintenance

MAX_HEADERS = 100
MAX_HEADER_BYTES = 64 * 1024
CLIENT_CLOSED = 499  # nginx's status for "the client closed the connection before the answer"
IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})
# Upstream closes of a WebSocket that are not failures (RFC 6455 §7.4.1: normal closure, going
# away, no status code); any other code, or a dropped connection, is an error of the arm.
CLEAN_CLOSE_CODES = frozenset({1000, 1001, 1005})

# Header kinds for the one-pass request filter.
_HOST, _CL, _TE, _CONN, _DROP, _FWD, _VIA, _COOKIE, _UNIT, _EMAIL, _XFF, _XFP = range(12)
_REQUEST_KINDS: dict[bytes, int] = {
    b"host": _HOST,
    b"content-length": _CL,
    b"transfer-encoding": _TE,
    b"connection": _CONN,
    # RFC 9110 §7.6.1 hop-by-hop, and what nginx never passes (HARDENING §2.2).
    b"keep-alive": _DROP,
    b"proxy-connection": _DROP,
    b"te": _DROP,
    b"trailer": _DROP,
    b"upgrade": _DROP,
    b"proxy-authorization": _DROP,
    b"expect": _DROP,  # 100-continue is answered by the server when the body is read (§2.9)
    b"http2-settings": _DROP,
    # Forwarding headers are computed, never copied from the client (§2.3).
    b"x-forwarded-for": _XFF,
    b"x-forwarded-proto": _XFP,
    b"x-forwarded-host": _FWD,
    b"x-forwarded-port": _FWD,
    b"x-real-ip": _FWD,
    b"forwarded": _FWD,
    b"via": _VIA,
    b"cookie": _COOKIE,
}
# Names a client may not nominate in Connection (the hop-by-hop trick, §2.2).
_PROTECTED = frozenset(
    {
        b"host",
        b"content-length",
        b"transfer-encoding",
        b"forwarded",
        b"x-forwarded-for",
        b"x-forwarded-proto",
        b"x-forwarded-host",
        b"x-real-ip",
        b"authorization",
        b"cookie",
        b"via",
    }
)
_RESPONSE_DROP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"proxy-authenticate",
        b"content-length",
    }
)
_TOKEN_CHARS = frozenset(b"!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyz")
_HOST_CHARS = frozenset(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.-:[]")
_UNRESERVED = frozenset(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-._~")
_HEX = frozenset(b"0123456789abcdefABCDEF")


class Abortable(Protocol):
    """What a client disconnect aborts: a streamed upstream response, or an OFREP SSE
    stream's hang-up signal (edge/ofrep.py)."""

    def abort(self) -> None: ...


class Downstream(Protocol):
    """What the pipeline needs from the client side (edge/frontend.py implements it)."""

    async def read_body(self) -> tuple[bytes, bool]:
        """Next request body chunk and whether more follows; raises `ClientGone`."""

    async def respond(self, status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
        """A whole response at once."""

    async def start(self, status: int, headers: list[tuple[bytes, bytes]]) -> None:
        """A response head; body follows through `write`."""

    async def write(self, data: bytes, more: bool) -> bool:
        """A body chunk; False when the client is gone."""

    def watch_disconnect(self, on_gone: Abortable) -> None:
        """Abort `on_gone` when the client disconnects during a streamed response."""


class RecordedDownstream:
    """A `Downstream` that notes the status and body bytes of what is answered through it in
    the context, for answers made outside the pipeline's own phases (OFREP, edge/ofrep.py),
    so the logging phase sees them like any other exchange."""

    __slots__ = ("downstream", "ctx")

    def __init__(self, downstream: Downstream, ctx: RequestContext) -> None:
        self.downstream = downstream
        self.ctx = ctx

    async def read_body(self) -> tuple[bytes, bool]:
        return await self.downstream.read_body()

    async def respond(self, status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
        self.ctx.status = status
        self.ctx.bytes_sent = len(body)
        await self.downstream.respond(status, headers, body)

    async def start(self, status: int, headers: list[tuple[bytes, bytes]]) -> None:
        self.ctx.status = status
        await self.downstream.start(status, headers)

    async def write(self, data: bytes, more: bool) -> bool:
        self.ctx.bytes_sent += len(data)
        return await self.downstream.write(data, more)

    def watch_disconnect(self, on_gone: Abortable) -> None:
        self.downstream.watch_disconnect(on_gone)


class UpstreamHead(Protocol):
    """The parts of an upstream answer `response_filter` reads (a pooled response, or the
    answer to a WebSocket upgrade)."""

    status: int
    headers: list[tuple[bytes, bytes]]
    body_length: int | None
    has_body: bool


class ClientGone(Exception):
    """The client disconnected before its request body was complete."""


class BodyTimedOut(ClientGone):
    """The request body stalled past the client deadline: the front-end answers 408."""


def _client_left(ctx: RequestContext, exc: ClientGone) -> None:
    # What `logging` writes for an exchange whose body never completed: 408 when the edge
    # gave up on a stalled body (the client gets that 408), 499 when the client went away.
    if type(exc) is BodyTimedOut:
        ctx.status = 408
    else:
        ctx.client_closed = True


class Reject(Exception):
    """A request refused before anything was sent upstream."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        close: bool = True,
        headers: list[tuple[bytes, bytes]] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.close = close
        self.headers = headers  # extra fields of the refusal (429's Retry-After, RateLimit)


class Held(Reject):
    """Maintenance (issue #10): a 503 answered by `maintenance_response`, not refused."""

    def __init__(self, maintenance: Maintenance) -> None:
        super().__init__(503, maintenance.message, close=False)
        self.maintenance = maintenance


def upstream_name(arm: str, pool: UpstreamPool) -> str:
    """The outlier detector's name of an arm's upstream: "arm|scheme://host:port"."""
    scheme = "https" if pool.ssl is not None else "http"
    host = f"[{pool.host}]" if ":" in pool.host else pool.host
    return f"{arm}|{scheme}://{host}:{pool.port}"


def canonical_path(raw: bytes) -> bytes:
    """One canonical path for routing and forwarding (HARDENING §2.5).

    Percent-escapes of unreserved characters are decoded (`/%61dmin` is `/admin`), other
    escapes are kept with upper-case hex; encoded `/`, `\\`, NUL/controls, dot segments and
    fragments are refused rather than guessed at, so routing, blocking and the backend can
    never see two different paths.
    """
    if not raw.startswith(b"/"):
        raise Reject(400, "request target must be an absolute path")
    if b"%" not in raw and b"/." not in raw and b"\\" not in raw and b"#" not in raw:
        return raw  # the common case: nothing to decode or refuse
    if b"#" in raw or b"\\" in raw:
        raise Reject(400, "fragment or backslash in request path")
    out = bytearray()
    i, n = 0, len(raw)
    while i < n:
        c = raw[i]
        if c == 0x25:  # '%'
            if i + 2 >= n:
                raise Reject(400, "truncated percent-escape in path")
            h1, h2 = raw[i + 1], raw[i + 2]
            if h1 not in _HEX or h2 not in _HEX:
                raise Reject(400, "invalid percent-escape in path")
            value = int(raw[i + 1 : i + 3], 16)
            if value in (0x2F, 0x5C) or value < 0x20 or value == 0x7F:
                raise Reject(400, "encoded slash, backslash or control character in path")
            if value in _UNRESERVED:
                out.append(value)
            else:
                out += b"%%%02X" % value
            i += 3
        else:
            out.append(c)
            i += 1
    path = bytes(out)
    for segment in path.split(b"/"):
        if segment in (b".", b".."):
            raise Reject(400, "dot segment in path")
    return path


def _host_key(value: bytes) -> str:
    """Routing key of a Host header: lower case, port removed; `Reject` when malformed."""
    if not value or len(value) > 255 or not all(c in _HOST_CHARS for c in value):
        raise Reject(400, "invalid Host header")
    text = value.decode("ascii").lower()
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise Reject(400, "invalid Host header")
        host, rest = text[: end + 1], text[end + 1 :]
    else:
        host, _, port = text.partition(":")
        rest = ":" + port if _ else ""
    if rest and (not rest.startswith(":") or not rest[1:].isdigit()):
        raise Reject(400, "invalid Host header")
    return host


class BodyStream:
    """The rest of a request body larger than the buffer, read as it is sent on, at no less
    than `min_rate_bps` over each `window_s` (else 408: a client trickling a large body must
    not pin an upstream connection; Envoy's and nginx's minimum-rate checks do the same).

    An async iterator class rather than an async generator: mypyc, which compiles this module
    (scripts/compile), cannot compile async generators."""

    __slots__ = (
        "downstream",
        "first",
        "total",
        "limit",
        "more",
        "min_rate_bps",
        "window_s",
        "window_waited",
        "window_bytes",
    )

    def __init__(
        self,
        downstream: Downstream,
        first: bytes,
        limit: int,
        min_rate_bps: int = 0,
        window_s: float = 10.0,
    ) -> None:
        self.downstream = downstream
        self.first: bytes | None = first
        self.total = len(first)
        self.limit = limit
        self.more = True
        self.min_rate_bps = min_rate_bps
        self.window_s = window_s
        self.window_waited = 0.0  # seconds spent waiting for the client in this window
        self.window_bytes = 0

    async def _read(self) -> tuple[bytes, bool]:
        """The next chunk. Only the time spent waiting for the client counts toward the
        rate (not the time the upstream took to accept what was sent: its back-pressure
        must not be blamed on the client): each `window_s` of waiting must bring at least
        `min_rate_bps * window_s` bytes."""
        if self.min_rate_bps <= 0:
            return await self.downstream.read_body()
        while True:
            left = self.window_s - self.window_waited
            started = time.monotonic()
            try:
                async with asyncio.timeout(max(left, 0.0)):
                    data, more = await self.downstream.read_body()
            except TimeoutError:
                data, more = b"", True
            self.window_waited += time.monotonic() - started
            self.window_bytes += len(data)
            if self.window_waited >= self.window_s:
                if self.window_bytes < self.min_rate_bps * self.window_waited:
                    raise Reject(408, "request body too slow")
                self.window_waited, self.window_bytes = 0.0, 0
            if data or not more:
                return data, more

    def __aiter__(self) -> BodyStream:
        return self

    async def __anext__(self) -> bytes:
        first = self.first
        if first is not None:
            self.first = None
            return first
        while self.more:
            data, self.more = await self._read()
            self.total += len(data)
            if self.total > self.limit:
                raise Reject(413, "request body too large")
            if data:
                return data
        raise StopAsyncIteration


class Pipeline:
    """Everything a proxied request needs, built once; `handle` and `upgrade` run the phases."""

    def __init__(
        self,
        *,
        identity: Identity,
        pools: PoolSet,
        metrics: EdgeMetrics,
        unit_header: str,
        email_header: str,
        trusted_hops: int,
        expose_decision_headers: bool,
        via_name: str,
        max_body_bytes: int,
        via_upstream: bool = False,
        rewrite_redirects: bool = True,
    ) -> None:
        self.identity = identity
        self.pools = pools
        self.metrics = metrics
        self.tunnels = TunnelRegistry(on_end=self._tunnel_ended)
        metrics.open_tunnels = self.tunnels.counts
        self.kinds = dict(_REQUEST_KINDS)
        self.kinds[unit_header.encode("ascii")] = _UNIT
        self.kinds[email_header.encode("ascii")] = _EMAIL
        self.protected = _PROTECTED | {unit_header.encode("ascii"), email_header.encode("ascii")}
        self.trusted_hops = trusted_hops
        self.expose = expose_decision_headers
        self.via = b"1.1 " + via_name.encode("ascii")
        self.via_upstream = via_upstream  # issue #12: off, as nginx, Envoy and HAProxy
        self.rewrite_redirects = rewrite_redirects
        self.max_body_bytes = max_body_bytes
        self.body_buffer_bytes = 1024 * 1024
        self.body_timeout_s = 60.0
        self.body_min_rate_bps = 1024
        self.body_rate_window_s = 10.0
        self.snapshot: Snapshot | None = None
        self.flags: FlagSet | None = None  # the snapshot's compiled flags (flags/flageval.py)
        self.targets: dict[str, tuple[Target, Target]] = {}
        self._version_header = b"0"
        self._host_cache: dict[bytes, str] = {}
        self.ofrep: Ofrep | None = None  # OFREP endpoints under /ofrep/ (edge/ofrep.py, #11)
        # The logging phase's access log (set by edge.app.Edge; None when `access_log: off`).
        self.access_log: AccessLog | None = None
        self.ratelimiter = RateLimiter()  # the document's rate_limits (issue #12)
        self.outliers = OutlierDetector()  # passive: fed by `logging` (issue #12)
        self._upstream_names: dict[int, str] = {}  # id(pool) -> "arm|origin"
        self._ejecting = False  # true once anything was ejected: upstream_peer then checks
        metrics.upstream_ejected = self._ejected_upstreams

    # -- configuration -----------------------------------------------------------------------

    def apply(self, snapshot: Snapshot) -> list[UpstreamPool]:
        """Swap in a new snapshot with its targets (one assignment each, same tick).
        Returns pools nobody uses any more, for the caller to close."""
        targets = self.pools.targets(snapshot)
        self.ratelimiter.apply(snapshot.document.rate_limits)  # unchanged limits keep state
        names: dict[int, str] = {}
        groups: list[tuple[str, ...]] = []
        for pair in targets.values():
            for target in pair:
                group = []
                for pool in target.pools:
                    name = names[id(pool)] = upstream_name(target.arm, pool)
                    group.append(name)
                groups.append(tuple(group))
        self.outliers.set_groups(groups)  # known upstreams keep their state
        self._upstream_names = names
        self.targets = targets
        self.snapshot = snapshot
        self.flags = snapshot.flags
        self._version_header = str(snapshot.version).encode()
        return self.pools.unused(targets.values())

    # -- admission: request_filter -> identify -> decide ---------------------------------------

    def admit(self, ctx: RequestContext) -> None:
        """The admission steps every exchange (HTTP or WebSocket) takes; `Reject` refuses.
        An OFREP request (`ctx.ofrep`) is admitted by `request_filter` alone: it has no route,
        no unit cookie and no arm; the caller hands it to edge/ofrep.py."""
        self.request_filter(ctx)
        if ctx.ofrep:
            return
        self.identify(ctx)
        self.decide(ctx)

    def request_filter(self, ctx: RequestContext) -> None:
        """The canonical path, one pass over the client's headers, the route.

        Sets host, kept header lines, identity inputs, body framing and route on `ctx`."""
        ctx.path = path = canonical_path(ctx.path)
        if b"#" in ctx.query:
            raise Reject(400, "fragment in request target")  # HARDENING row 24
        headers = ctx.headers
        if len(headers) > MAX_HEADERS:
            raise Reject(431, "too many request headers")
        kinds = self.kinds
        kept: list[bytes] = []
        host = unit = cookie = email = conn = cl = te = xff = xfp = via = None
        size = 0
        for name, value in headers:
            size += len(name) + len(value)
            kind = kinds.get(name)
            if kind is None:
                if name.startswith(b"x-turnout-") or b"_" in name:
                    continue  # internal control headers and CGI-ambiguous names (§2.3, row 15)
                kept += (name, b": ", value, b"\r\n")
            elif kind == _COOKIE:
                cookie = value if cookie is None else cookie + b"; " + value
                kept += (name, b": ", value, b"\r\n")
            elif kind == _UNIT:
                if unit is not None:
                    raise Reject(400, "more than one unit id header")
                unit = value
                kept += (name, b": ", value, b"\r\n")
            elif kind == _EMAIL:
                email = value
                kept += (name, b": ", value, b"\r\n")
            elif kind == _HOST:
                if host is not None:
                    raise Reject(400, "more than one Host header")
                host = value
            elif kind == _CL:
                if cl is not None:
                    raise Reject(400, "more than one Content-Length")
                cl = value
            elif kind == _TE:
                if te is not None:
                    raise Reject(400, "more than one Transfer-Encoding")
                te = value
            elif kind == _CONN:
                conn = value if conn is None else conn + b"," + value
            elif kind == _XFF:
                xff = value if xff is None else xff + b", " + value
            elif kind == _XFP:
                xfp = value
            elif kind == _VIA:
                via = value if via is None else via + b", " + value
            # _DROP and _FWD: not forwarded
        if size > MAX_HEADER_BYTES:
            raise Reject(431, "request header block too large")
        version = ctx.version
        if host is None and version != "1.0":
            raise Reject(400, "missing Host header")
        if cl is not None or te is not None:
            try:
                framing, length = request_framing(version, cl, te)
            except FramingError as exc:
                raise Reject(exc.status, exc.message) from None
            if length > self.max_body_bytes:
                raise Reject(413, "request body too large")
            ctx.length = length
            ctx.chunked = framing == CHUNKED
        if conn is not None:
            kept = self._strip_nominated(conn, kept)
        kept += self._forwarding(ctx, host, xff, xfp, via)
        ctx.kept = kept
        ctx.host = host
        ctx.unit_header = unit
        ctx.cookie = cookie
        ctx.email = email
        ofrep = self.ofrep
        if ofrep is not None and path.startswith(ofrep.mount):
            ctx.ofrep = True  # served by the edge itself, before any route (issue #11)
            return
        route = self.route(host, path)
        if route is None:
            raise Reject(404, "no route for this host and path", close=False)
        ctx.route = route

    def identify(self, ctx: RequestContext) -> None:
        """The unit: the trusted header, else the signed cookie, else a new signed cookie."""
        ctx.unit, ctx.set_cookie = self.identity.resolve(ctx.unit_header, ctx.cookie)

    def decide(self, ctx: RequestContext) -> None:
        """The route's release assigns the unit an arm (the bucketing contract, DESIGN.md §2).

        Maintenance first (issue #10): everyone but the internal cohort, who pass so the team
        can test, is held with a 503 before an arm is chosen, so a held request is never
        counted against an arm."""
        route = ctx.route
        assert route is not None
        email = ctx.email.decode("utf-8", "replace") if ctx.email is not None else None
        maintenance = route.maintenance
        if maintenance is not None and not route.is_internal(ctx.unit, email):
            raise Held(maintenance)
        decision = route.assign(ctx.unit, email)
        target = self.targets[route.name][1 if decision.arm == ARM_CANARY else 0]
        limiter = self.ratelimiter
        if limiter.buckets:
            # Before ctx.target is set, so a 429 is not judged against the arm (issue #10's
            # windows), like a maintenance hold. `client` keys on the address after the
            # trusted hops; `route` keys on the route entry that matched (host + prefix).
            client_ip = ctx.client_ip
            if client_ip is None:
                client_ip = ctx.client[0] if ctx.client else "unknown"
            refusal = limiter.check(
                target.release,
                target.arm,
                route.route_key,
                ctx.unit,
                client_ip,
                decision.reason == REASON_TARGETING_MATCH,  # the internal cohort
            )
            if refusal is not None:
                name = refusal.bucket.name
                self.metrics.rate_limited[name] = self.metrics.rate_limited.get(name, 0) + 1
                raise Reject(429, f"rate limited ({name})", close=False, headers=refusal.headers())
        ctx.target = target
        ctx.release = target.release
        ctx.arm = target.arm
        ctx.cohort = decision.cohort

    def _strip_nominated(self, conn: bytes, kept: list[bytes]) -> list[bytes]:
        nominated = set()
        for token in conn.lower().split(b","):
            token = token.strip()
            if not token or token in (b"close", b"keep-alive"):
                continue
            if token in self.protected or not all(c in _TOKEN_CHARS for c in token):
                raise Reject(400, "Connection header nominates a protected header")
            nominated.add(token)
        if not nominated:
            return kept
        out: list[bytes] = []
        for i in range(0, len(kept), 4):
            if kept[i] not in nominated:
                out += kept[i : i + 4]
        return out

    def _forwarding(
        self,
        ctx: RequestContext,
        host: bytes | None,
        xff: bytes | None,
        xfp: bytes | None,
        via: bytes | None,
    ) -> list[bytes]:
        """X-Forwarded-* (and Via) for the upstream; sets `ctx.client_ip` to the client's
        address as the trusted hops tell it (the left-most entry they vouch for)."""
        client, scheme = ctx.client, ctx.scheme
        peer = client[0].encode("ascii") if client else b"unknown"
        if self.trusted_hops and xff:
            # Keep only the entries our trusted hops vouch for (the N right-most), then the peer.
            entries = [e.strip() for e in xff.split(b",") if e.strip()]
            vouched = entries[-self.trusted_hops :]
            chain = b", ".join([*vouched, peer])
            if vouched:
                ctx.client_ip = vouched[0].decode("latin-1")
            proto = xfp.strip() if xfp in (b"http", b"https") else scheme.encode("ascii")
        else:
            chain = peer
            proto = scheme.encode("ascii")
        # Entries of four (name, ": ", value, CRLF), like `kept`, so both can be walked alike.
        out = [
            b"x-forwarded-for",
            b": ",
            chain,
            b"\r\n",
            b"x-forwarded-proto",
            b": ",
            proto,
            b"\r\n",
        ]
        if host is not None:
            out += (b"x-forwarded-host", b": ", host, b"\r\n")
        if self.via_upstream:
            out += (b"via", b": ", (via + b", " + self.via) if via else self.via, b"\r\n")
        elif via:
            out += (b"via", b": ", via, b"\r\n")  # the client's, passed on as nginx does
        return out

    def route(self, host: bytes | None, path: bytes) -> CompiledRelease | None:
        snapshot = self.snapshot
        if snapshot is None:
            return None
        if host is None:
            return snapshot.match("*", path.decode("latin-1"))
        key = self._host_cache.get(host)
        if key is None:
            key = _host_key(host)
            if len(self._host_cache) > 4096:
                self._host_cache.clear()
            self._host_cache[host] = key
        return snapshot.match(key, path.decode("latin-1"))

    # -- upstream ----------------------------------------------------------------------------

    def upstream_peer(self, ctx: RequestContext) -> UpstreamPool:
        """The target's next upstream (round-robin); called again for a retry."""
        target = ctx.target
        assert target is not None
        pool = target.pick()
        if self._ejecting and len(target.pools) > 1:
            # The detector never ejects an arm's last upstream, so one of them is in.
            names, outliers = self._upstream_names, self.outliers
            for _ in range(len(target.pools) - 1):
                if not outliers.is_ejected(names.get(id(pool), "")):
                    break
                pool = target.pick()
        ctx.upstream = pool
        return pool

    def _ejected_upstreams(self) -> dict[tuple[str, str], int]:
        """(arm, upstream) -> 1 if ejected now, else 0 (a gauge, read at scrape time)."""
        out: dict[tuple[str, str], int] = {}
        for name in self.outliers.status:
            arm, _, origin = name.partition("|")
            out[(arm, origin)] = 1 if self.outliers.is_ejected(name) else 0
        return out

    def _failed_before_retry(self, pool: UpstreamPool, error: UpstreamError) -> None:
        name = self._upstream_names.get(id(pool))
        if name is not None and classify(error)[2] in ("connect", "timeout"):
            self._count_ejection(name, self.outliers.record_connect_failure(name))

    def _count_ejection(self, name: str, ejected: bool) -> None:
        if ejected:
            self._ejecting = True
            arm, _, origin = name.partition("|")
            key = (arm, origin)
            counts = self.metrics.outlier_ejections
            counts[key] = counts.get(key, 0) + 1

    def _observe_upstream(self, ctx: RequestContext) -> None:
        """Feed the outlier detector the upstream that answered last: a failed connect or a
        timeout is a connect failure (Envoy's gateway failure), an invalid response a 502, an
        answer its status. Pool exhaustion is ours, not the upstream's; a 101 is judged by
        its tunnel's guard statistics only."""
        pool = ctx.upstream
        if pool is None:
            return
        name = self._upstream_names.get(id(pool))
        if name is None:
            return
        error = ctx.error
        if error == "connect" or error == "timeout":
            ejected = self.outliers.record_connect_failure(name)
        elif error == "protocol":
            ejected = self.outliers.record(name, 502)
        elif ctx.upstream_s >= 0 and ctx.status != 101:
            ejected = self.outliers.record(name, ctx.status)
        else:
            return
        self._count_ejection(name, ejected)

    def upstream_request_filter(self, ctx: RequestContext) -> bytes:
        """The upstream request head: re-framed, never the client's CL/TE (RFC 9112 §6.1)."""
        target = ctx.target
        assert target is not None
        host = ctx.host
        parts = [ctx.method.encode("ascii"), b" ", ctx.path]
        if ctx.query:
            parts += (b"?", ctx.query)
        parts.append(b" HTTP/1.1\r\nhost: ")
        parts.append(host if host is not None else target.pools[0].host.encode("ascii"))
        parts.append(b"\r\n")
        parts += ctx.kept
        route = ctx.route
        flags = self.flags
        if flags is not None and route is not None and route.upstream_flags:
            # The route's upstream flags for this unit, one capped header (edge/flagheader.py).
            email = ctx.email.decode("utf-8", "replace") if ctx.email is not None else None
            parts += flag_header_entries(flags, route.upstream_flags, ctx.unit, email)
        parts.append(target.upstream_headers)
        if ctx.websocket:
            parts.append(b"connection: upgrade\r\nupgrade: websocket\r\n")  # RFC 6455 §4.1
        elif ctx.chunked:
            parts.append(b"transfer-encoding: chunked\r\n")
        elif ctx.length >= 0:
            parts.append(b"content-length: %d\r\n" % ctx.length)
        parts.append(b"\r\n")
        return b"".join(parts)

    def response_filter(self, ctx: RequestContext, resp: UpstreamHead) -> list[tuple[bytes, bytes]]:
        """The client's response headers: hop-by-hop and nominated ones out, framing
        re-derived, Via, decision headers and the new unit's cookie in."""
        out: list[tuple[bytes, bytes]] = []
        nominated: bytes | None = None
        declared: bytes | None = None
        for name, value in resp.headers:
            if name in _RESPONSE_DROP:
                if name == b"connection":
                    nominated = value if nominated is None else nominated + b"," + value
                elif name == b"content-length":
                    declared = value
                continue
            if name in LOCATION_FIELDS and self.rewrite_redirects:
                assert ctx.target is not None
                value = relative_location(value, upstream_origins(ctx.target.pools))
            out.append((name, value))
        if nominated is not None and nominated.lower() not in (b"keep-alive", b"close"):
            names = {t.strip() for t in nominated.lower().split(b",")}
            out = [(n, v) for n, v in out if n not in names]
        if resp.body_length is not None:
            out.append((b"content-length", b"%d" % resp.body_length))
        elif (
            not resp.has_body
            and resp.status not in (204, 304)  # so: a response to HEAD
            and declared is not None
            and declared.isdigit()
            and len(declared) <= MAX_CONTENT_LENGTH_DIGITS
        ):
            # A response to HEAD may state the length a GET would get, and no other value;
            # 204 never has one (RFC 9110 §8.6). A 304's is dropped: it is optional there.
            out.append((b"content-length", declared))
        out.append((b"via", self.via))
        if self.expose:
            out.append((b"x-turnout-arm", ctx.arm.encode()))
            out.append((b"x-turnout-config-version", self._version_header))
        if ctx.set_cookie is not None:
            out.append((b"set-cookie", ctx.set_cookie))
        return out

    def error_response(
        self,
        status: int,
        message: str,
        ctx: RequestContext | None = None,
        *,
        close: bool = False,
        headers: list[tuple[bytes, bytes]] | None = None,
    ) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
        """Every answer the edge makes up itself: a short text naming the release and arm
        once they are known, never cached, with the new unit's cookie if one was minted;
        `headers` are the refusal's own fields (a 429's Retry-After and RateLimit)."""
        target = ctx.target if ctx is not None else None
        if target is not None:
            text = f"turnout: {message} (release {target.release}, arm {target.arm})\n"
        else:
            text = f"turnout: {message}\n"
        body = text.encode()
        out = [
            (b"content-type", b"text/plain; charset=utf-8"),
            (b"content-length", b"%d" % len(body)),
            (b"cache-control", b"no-store"),
        ]
        if headers:
            out += headers
        if close:
            out.append((b"connection", b"close"))
        if self.expose:
            out.append((b"x-turnout-config-version", self._version_header))
            if target is not None:
                out.append((b"x-turnout-arm", target.arm.encode()))
        if ctx is not None and ctx.set_cookie is not None:
            out.append((b"set-cookie", ctx.set_cookie))
        return status, out, body

    def maintenance_response(
        self, maintenance: Maintenance, ctx: RequestContext, *, close: bool = False
    ) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
        """error_response's sibling for maintenance: 503 with Retry-After (RFC 9110 §15.6.4,
        §10.2.3), JSON or a short HTML page by Accept, never cached, the new unit's cookie."""
        status, headers, body = maintenance_answer(maintenance, ctx.headers)
        if close:
            headers.append((b"connection", b"close"))
        if self.expose:
            headers.append((b"x-turnout-config-version", self._version_header))
        if ctx.set_cookie is not None:
            headers.append((b"set-cookie", ctx.set_cookie))
        return status, headers, body

    async def _refuse(
        self,
        ctx: RequestContext,
        downstream: Downstream,
        status: int,
        message: str,
        close: bool,
        headers: list[tuple[bytes, bytes]] | None = None,
    ) -> None:
        ctx.status = status
        answer = self.error_response(status, message, ctx, close=close, headers=headers)
        await downstream.respond(*answer)

    async def _turn_away(
        self, ctx: RequestContext, downstream: Downstream, exc: Reject, close: bool
    ) -> None:
        """Answer an admission that did not pass: held for maintenance, or refused."""
        if isinstance(exc, Held):
            ctx.status = exc.status
            answer = self.maintenance_response(exc.maintenance, ctx, close=close)
            await downstream.respond(*answer)
            return
        await self._refuse(ctx, downstream, exc.status, exc.message, close, exc.headers)

    # -- the whole exchange ------------------------------------------------------------------

    async def handle(self, ctx: RequestContext, downstream: Downstream) -> None:
        """One HTTP exchange: admission, forward, then `logging` whatever happened."""
        try:
            try:
                self.admit(ctx)
            except Reject as exc:
                await self._turn_away(ctx, downstream, exc, exc.close)
                return
            if ctx.ofrep:
                assert self.ofrep is not None
                answered = RecordedDownstream(downstream, ctx) if self.access_log else downstream
                await self.ofrep.handle(ctx.method, ctx.path, ctx.query, ctx.headers, answered)
                return
            await self.forward(ctx, self.upstream_request_filter(ctx), downstream)
        except asyncio.CancelledError:
            ctx.client_closed = True  # the front-end abandons an exchange whose client left
            raise
        finally:
            self.logging(ctx)

    def body_limits(
        self, *, buffer_bytes: int, timeout_s: float, min_rate_bps: int, rate_window_s: float
    ) -> None:
        """Request buffering (settings `client_body_*`, issue #12)."""
        self.body_buffer_bytes = buffer_bytes
        self.body_timeout_s = timeout_s
        self.body_min_rate_bps = min_rate_bps
        self.body_rate_window_s = rate_window_s

    async def _request_body(
        self, downstream: Downstream, length: int
    ) -> bytes | AsyncIterator[bytes]:
        """The request body, read before any upstream connection is taken (nginx's
        `proxy_request_buffering on`): whole when it fits `body_buffer_bytes`, so a slow
        client holds only its own connection and a body whose framing turns out bad (the
        front-end then refuses it) or that stalls never reaches an upstream; past the
        buffer, the part read so far and then a stream at a minimum rate."""
        if length == 0:
            return b""
        data, more = await downstream.read_body()
        if not more:  # the common case: the body came with the head
            if len(data) > self.max_body_bytes:
                raise Reject(413, "request body too large")
            return data
        return await self._buffer_body(downstream, data)

    async def _buffer_body(self, downstream: Downstream, first: bytes) -> bytes | BodyStream:
        parts = [first]
        size = len(first)
        buffer_bytes = self.body_buffer_bytes
        try:
            async with asyncio.timeout(self.body_timeout_s):
                while size <= buffer_bytes:
                    data, more = await downstream.read_body()
                    parts.append(data)
                    size += len(data)
                    if size > self.max_body_bytes:
                        raise Reject(413, "request body too large")
                    if not more:
                        return b"".join(parts)
        except TimeoutError:
            raise Reject(408, "request body timed out") from None
        return BodyStream(
            downstream,
            b"".join(parts),
            self.max_body_bytes,
            self.body_min_rate_bps,
            self.body_rate_window_s,
        )

    async def forward(self, ctx: RequestContext, head: bytes, downstream: Downstream) -> None:
        """Send the request through the lean pool and relay the answer.

        A failure with nothing sent moves on to the arm's next upstream, once (nginx's
        `proxy_next_upstream error timeout`); one that may have reached an upstream is never
        replayed elsewhere (RFC 9110 §9.2.2)."""
        target = ctx.target
        assert target is not None
        body: bytes | AsyncIterator[bytes] | None = None
        chunked = ctx.chunked
        if ctx.length >= 0 or chunked:
            try:
                body = await self._request_body(downstream, ctx.length)
            except ClientGone as gone:
                _client_left(ctx, gone)
                return
            except Reject as exc:
                await self._refuse(ctx, downstream, exc.status, exc.message, True)
                return
        replayable = body is None or type(body) is bytes  # not an ABC check: hot path
        attempts = 2 if replayable and len(target.pools) > 1 else 1
        method = ctx.method
        started = time.perf_counter()
        resp: UpstreamResponse | None = None
        failure: UpstreamError | None = None
        for _ in range(attempts):
            pool = self.upstream_peer(ctx)
            # Queued for a slot: a client that closes meanwhile abandons the exchange, so
            # the request is never sent (the front-end cancels it, issue #12).
            ctx.queued = pool.full
            try:
                resp = await pool.request(
                    head,
                    body,
                    chunked=chunked,
                    is_head=method == "HEAD",
                    idempotent=method in IDEMPOTENT_METHODS,
                )
                ctx.queued = False
                break
            except UpstreamError as error:  # one name per exception type: mypyc types `as` names
                failure = error
                if error.sent:
                    break
                if attempts > 1:
                    # Moving on to the next upstream: `logging` sees only the last one, so the
                    # one that failed is told to the outlier detector here (issue #12).
                    self._failed_before_retry(pool, error)
            except ClientGone as left:  # distinct names: mypyc types `as` names
                _client_left(ctx, left)
                return
            except Reject as exc:  # raised by the streamed body: too large
                await self._refuse(ctx, downstream, exc.status, exc.message, True)
                return
        if resp is None:
            assert failure is not None
            status, message, ctx.error = classify(failure)
            await self._refuse(ctx, downstream, status, message, False)
            return
        ctx.upstream_s = time.perf_counter() - started
        ctx.status = status = resp.status
        headers = self.response_filter(ctx, resp)
        if resp.complete:  # the common case: one write, then count (off the latency path)
            data = resp.take()
            resp.release()
            await downstream.respond(status, headers, data)
            ctx.bytes_sent = len(data)
            return
        await self.response_body(ctx, resp, headers, downstream)

    async def response_body(
        self,
        ctx: RequestContext,
        resp: UpstreamResponse,
        headers: list[tuple[bytes, bytes]],
        downstream: Downstream,
    ) -> None:
        """Stream a response whose body is still arriving, flow-controlled both ways."""
        downstream.watch_disconnect(resp)
        try:
            await downstream.start(resp.status, headers)
            while True:
                try:
                    chunk = await resp.read()
                except UpstreamError:
                    # Head already sent: abort the client connection, never end "cleanly" (§2.12).
                    ctx.error = "midstream"
                    resp.abort()
                    return
                if not chunk:
                    resp.release()
                    await downstream.write(b"", False)
                    return
                ctx.bytes_sent += len(chunk)
                if not await downstream.write(chunk, True):
                    resp.abort()
                    return
        finally:
            resp.abort()  # no-op after release(); frees the connection on any other exit

    # -- WebSocket ---------------------------------------------------------------------------

    async def upgrade(
        self,
        ctx: RequestContext,
        downstream: Downstream,
        take_client: Callable[[], asyncio.Transport | None],
        client_bytes: bytes,
    ) -> None:
        """A WebSocket exchange: the same admission as HTTP, the upgrade request on a fresh
        upstream connection, then a byte tunnel after its `101` (edge/tunnel.py); any other
        answer is relayed as a normal response. `take_client` hands over the client's
        transport (None if it is gone); `client_bytes` arrived after the handshake."""
        ctx.websocket = True
        try:
            try:
                self.admit(ctx)
            except Reject as exc:
                await self._turn_away(ctx, downstream, exc, True)
                return
            if ctx.ofrep:  # OFREP's SSE streams are plain HTTP; nothing there upgrades
                await self._refuse(ctx, downstream, 400, "no WebSocket endpoint under OFREP", True)
                return
            head = self.upstream_request_filter(ctx)
            target = ctx.target
            assert target is not None
            # Like HTTP: an upgrade that reached no upstream moves on to the arm's next one,
            # once (nginx's `proxy_next_upstream error timeout`); the failed one is told to
            # the outlier detector.
            attempts = 2 if len(target.pools) > 1 else 1
            started = time.perf_counter()
            answer: Handshake | None = None
            for attempt in range(attempts):
                pool = self.upstream_peer(ctx)
                timeouts = pool.timeouts
                try:
                    answer = await open_upstream(
                        pool.host,
                        pool.port,
                        head,
                        ssl=pool.ssl,
                        connect_timeout_s=timeouts.connect_s,
                        read_timeout_s=timeouts.read_s,
                    )
                    break
                except UpstreamError as error:  # one name per exception type (mypyc)
                    if error.sent or attempt + 1 == attempts:
                        status, message, ctx.error = classify(error)
                        await self._refuse(ctx, downstream, status, message, True)
                        return
                    self._failed_before_retry(pool, error)
            assert answer is not None
            ctx.upstream_s = time.perf_counter() - started
            ctx.status = answer.status
            if answer.status != 101:
                await downstream.respond(
                    answer.status, self.response_filter(ctx, answer), answer.body
                )
                ctx.bytes_sent = len(answer.body)
                return
            self._open_tunnel(ctx, answer, take_client(), client_bytes)
        finally:
            self.logging(ctx)

    def _open_tunnel(
        self,
        ctx: RequestContext,
        answer: Handshake,
        client: asyncio.Transport | None,
        client_bytes: bytes,
    ) -> None:
        if client is None:  # the client left while the upstream answered
            ctx.client_closed = True
            if answer.transport is not None:
                answer.transport.close()
            return
        # The 101's head as the upstream sent it (Upgrade, Connection, Sec-WebSocket-*
        # belong to this hop too: RFC 6455 §4.2.2), plus Via and the decision headers.
        lines = [b"HTTP/1.1 101 Switching Protocols\r\n"]
        for name, value in answer.headers:
            if name not in (b"content-length", b"transfer-encoding", b"keep-alive"):
                lines += (name, b": ", value, b"\r\n")
        lines += (b"via: ", self.via, b"\r\n")
        if self.expose:
            lines += (b"x-turnout-arm: ", ctx.arm.encode(), b"\r\n")
        if ctx.set_cookie is not None:
            lines += (b"set-cookie: ", ctx.set_cookie, b"\r\n")
        lines.append(b"\r\n")
        key = (ctx.release, ctx.arm)
        websockets = self.metrics.websockets
        websockets[key] = websockets.get(key, 0) + 1
        tunnel = Tunnel(ctx.release, ctx.arm, client, answer, self.tunnels)
        tunnel.start(b"".join(lines), client_bytes, answer.tunnel_bytes)

    # -- logging -----------------------------------------------------------------------------

    def logging(self, ctx: RequestContext) -> None:
        """The last phase: the finished exchange, refused, failed or answered.

        Counts per-release, per-arm metrics and feeds the guard's per-arm windows (issue #10),
        once per exchange, from the answer as the client got it: Turnout's own 502/503/504
        for a dead or slow upstream count against the arm, and a body cut off mid-stream
        (`error` "midstream" after a 2xx head) is an error of its one request. The latency is
        the time to the upstream's response head, or to Turnout's own answer. A `101` is
        judged when its tunnel ends (`_tunnel_ended`). Exchanges refused before a release was
        chosen (and maintenance holds) have no per-arm series and are not counted here.

        The access log (issue #13) gets one line for every exchange, counted or not: a
        WebSocket's line is written when its upgrade is answered (101, the time to it), not
        when the tunnel closes; a client that left before its answer is logged as 499, and
        an exchange the pipeline left unanswered (an unexpected error) as the front-end's 500."""
        access_log = self.access_log
        if access_log is not None:
            # One tuple appended; formatting and I/O happen off the request path.
            access_log.record(
                ctx.method,
                ctx.host,
                ctx.path,
                CLIENT_CLOSED if ctx.client_closed else ctx.status or 500,
                ctx.bytes_sent,
                time.perf_counter() - ctx.started,
                ctx.target,
                ctx.upstream,
                ctx.unit or None,
            )
        if ctx.target is None:
            return
        metrics = self.metrics
        release, arm = ctx.release, ctx.arm
        error = ctx.error
        self._observe_upstream(ctx)
        if error is not None:
            metrics.error(release, arm, error)
        upstream_s = ctx.upstream_s
        if upstream_s >= 0:
            metrics.upstream_latency[arm].observe(upstream_s)
        status = ctx.status
        if status:
            metrics.count(release, arm, status)
            if status != 101:
                elapsed = upstream_s if upstream_s >= 0 else time.perf_counter() - ctx.started
                metrics.arms.record(release, arm, status, elapsed, error is not None)

    def _tunnel_ended(self, release: str, arm: str, upstream_code: int | None) -> None:
        """A tunnel closed (edge/tunnel.py): counted once in the guard's windows when the
        upstream ended it, as an error for an error close code or a dropped connection (issue
        #10: "monitor WebSocket connections"). Closed by the client or by the edge: not judged."""
        if upstream_code is None:
            return
        failed = upstream_code not in CLEAN_CLOSE_CODES
        self.metrics.arms.record(release, arm, 500 if failed else 200, None, failed)
        if failed:
            self.metrics.error(release, arm, "websocket_close")
