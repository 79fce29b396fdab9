"""The request pipeline: one proxied request's life as named phases (after Pingora).

    request_filter          validate framing, Host and path; strip hop-by-hop, nominated and
                            internal headers; collect identity inputs        (HARDENING §2.1-2.6)
    identify + decide       unit id (header > signed cookie > new cookie) -> Decision
    upstream_peer           the release's stable or canary target, round-robin over its pools
    upstream_request_filter the upstream head, re-framed (never the client's CL/TE) with
                            X-Forwarded-*, Via and X-Turnout-*            (DESIGN.md §5)
    forward                 lean pool; 502 refused/invalid, 504 timeout, 503 pool full
    response_filter         strip hop-by-hop both ways, decision headers, Set-Cookie
    logging                 per-release, per-arm counters and latency

Rules of this file:
* It does not know ASGI: `Downstream` is the one seam (edge/asgi.py adapts ASGI to it), so a
  native front-end can drive the same pipeline later.
* It reads only the in-memory snapshot; it never touches the store.
* A connection with unread bytes or an unfinished request body never returns to a pool: on any
  error or client disconnect the upstream response is aborted, not released.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Protocol

from edge.identity import Identity
from edge.metrics import EdgeMetrics
from edge.redirects import LOCATION_FIELDS, relative_location, upstream_origins
from edge.targets import PoolSet, Target
from edge.upstream import (
    UpstreamConnectError,
    UpstreamError,
    UpstreamPool,
    UpstreamProtocolError,
    UpstreamResponse,
    UpstreamTimeout,
)
from flags.evaluate import ARM_CANARY, CompiledRelease, Snapshot

MAX_HEADERS = 100
MAX_HEADER_BYTES = 64 * 1024
MAX_CONTENT_LENGTH_DIGITS = 15
IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})

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


class Downstream(Protocol):
    """What the pipeline needs from the client side (edge/asgi.py implements it)."""

    async def read_body(self) -> tuple[bytes, bool]:
        """Next request body chunk and whether more follows; raises `ClientGone`."""

    async def respond(self, status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
        """A whole response at once."""

    async def start(self, status: int, headers: list[tuple[bytes, bytes]]) -> None:
        """A response head; body follows through `write`."""

    async def write(self, data: bytes, more: bool) -> bool:
        """A body chunk; False when the client is gone."""

    def watch_disconnect(self, on_gone: UpstreamResponse) -> asyncio.Task[None] | None:
        """Abort `on_gone` when the client disconnects during a streamed response."""


class ClientGone(Exception):
    """The client disconnected before its request body was complete."""


class Reject(Exception):
    """A request refused before anything was sent upstream."""

    def __init__(self, status: int, message: str, *, close: bool = True) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.close = close


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


class Pipeline:
    """Everything a proxied request needs, built once; `handle` runs the phases."""

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
        self.snapshot: Snapshot | None = None
        self.targets: dict[str, tuple[Target, Target]] = {}
        self._version_header = b"0"
        self._host_cache: dict[bytes, str] = {}

    # -- configuration -----------------------------------------------------------------------

    def apply(self, snapshot: Snapshot) -> list[UpstreamPool]:
        """Swap in a new snapshot with its targets (one assignment each, same tick).
        Returns pools nobody uses any more, for the caller to close."""
        targets = self.pools.targets(snapshot)
        self.targets = targets
        self.snapshot = snapshot
        self._version_header = str(snapshot.version).encode()
        return self.pools.unused(targets.values())

    # -- phases --------------------------------------------------------------------------------

    def request_filter(
        self,
        headers: list[tuple[bytes, bytes]],
        http_version: str,
        client: tuple[str, int] | None,
        scheme: str,
    ) -> tuple[list[bytes], bytes | None, bytes | None, bytes | None, bytes | None, int, bool]:
        """One pass over the client's headers.

        Returns (kept header bytes, host, unit header, cookie, email, content length or -1,
        chunked)."""
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
        if host is None and http_version != "1.0":
            raise Reject(400, "missing Host header")
        length = -1
        chunked = False
        if te is not None:
            if cl is not None:
                raise Reject(400, "both Content-Length and Transfer-Encoding")  # RFC 9112 §6.1
            if te.strip().lower() != b"chunked" or http_version == "1.0":
                raise Reject(501, "unsupported Transfer-Encoding")
            chunked = True
        elif cl is not None:
            # A leading zero ("010") is read as 10 by some parsers and 8 by others: refuse it
            # (HARDENING table (a) row 5).
            if (
                not cl.isdigit()
                or len(cl) > MAX_CONTENT_LENGTH_DIGITS
                or (len(cl) > 1 and cl[:1] == b"0")
            ):
                raise Reject(400, "invalid Content-Length")
            length = int(cl)
            if length > self.max_body_bytes:
                raise Reject(413, "request body too large")
        if conn is not None:
            kept = self._strip_nominated(conn, kept)
        kept += self._forwarding(host, client, scheme, xff, xfp, via)
        return kept, host, unit, cookie, email, length, chunked

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
        host: bytes | None,
        client: tuple[str, int] | None,
        scheme: str,
        xff: bytes | None,
        xfp: bytes | None,
        via: bytes | None,
    ) -> list[bytes]:
        peer = client[0].encode("ascii") if client else b"unknown"
        if self.trusted_hops and xff:
            # Keep only the entries our trusted hops vouch for (the N right-most), then the peer.
            entries = [e.strip() for e in xff.split(b",") if e.strip()]
            chain = b", ".join([*entries[-self.trusted_hops :], peer])
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

    def response_filter(
        self, resp: UpstreamResponse, target: Target, set_cookie: bytes | None
    ) -> list[tuple[bytes, bytes]]:
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
                value = relative_location(value, upstream_origins(target.pools))
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
            out.append((b"x-turnout-arm", target.arm.encode()))
            out.append((b"x-turnout-config-version", self._version_header))
        if set_cookie is not None:
            out.append((b"set-cookie", set_cookie))
        return out

    def error_response(
        self,
        status: int,
        message: str,
        target: Target | None,
        set_cookie: bytes | None = None,
        close: bool = False,
    ) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
        if target is not None:
            text = f"turnout: {message} (release {target.release}, arm {target.arm})\n"
        else:
            text = f"turnout: {message}\n"
        body = text.encode()
        headers = [
            (b"content-type", b"text/plain; charset=utf-8"),
            (b"content-length", b"%d" % len(body)),
            (b"cache-control", b"no-store"),
        ]
        if close:
            headers.append((b"connection", b"close"))
        if self.expose:
            headers.append((b"x-turnout-config-version", self._version_header))
            if target is not None:
                headers.append((b"x-turnout-arm", target.arm.encode()))
        if set_cookie is not None:
            headers.append((b"set-cookie", set_cookie))
        return status, headers, body

    # -- the whole request -----------------------------------------------------------------------

    async def handle(
        self,
        method: str,
        raw_path: bytes,
        query: bytes,
        headers: list[tuple[bytes, bytes]],
        http_version: str,
        client: tuple[str, int] | None,
        scheme: str,
        downstream: Downstream,
    ) -> None:
        target: Target | None = None
        set_cookie: bytes | None = None
        try:
            path = canonical_path(raw_path)
            if b"#" in query:
                raise Reject(400, "fragment in request target")  # HARDENING row 24
            kept, host, unit_raw, cookie, email_raw, length, chunked = self.request_filter(
                headers, http_version, client, scheme
            )
            rel = self.route(host, path)
            if rel is None:
                await downstream.respond(
                    *self.error_response(404, "no route for this host and path", None)
                )
                return
            target, set_cookie = self.upstream_peer(rel, unit_raw, cookie, email_raw)
        except Reject as exc:
            await downstream.respond(
                *self.error_response(exc.status, exc.message, None, close=exc.close)
            )
            return
        head = self.upstream_request_head(method, path, query, host, kept, target, length, chunked)
        await self.forward(method, head, length, chunked, target, set_cookie, downstream)

    def upstream_peer(
        self,
        rel: CompiledRelease,
        unit_raw: bytes | None,
        cookie: bytes | None,
        email_raw: bytes | None,
    ) -> tuple[Target, bytes | None]:
        """identify + decide + upstream_peer, shared by HTTP and WebSocket: the unit's target,
        and the Set-Cookie value when a new anonymous id was assigned."""
        unit, set_cookie = self.identity.resolve(unit_raw, cookie)
        email = email_raw.decode("utf-8", "replace") if email_raw is not None else None
        decision = rel.assign(unit, email)
        return self.targets[rel.name][1 if decision.arm == ARM_CANARY else 0], set_cookie

    def upstream_request_head(
        self,
        method: str,
        path: bytes,
        query: bytes,
        host: bytes | None,
        kept: list[bytes],
        target: Target,
        length: int,
        chunked: bool,
    ) -> bytes:
        parts = [method.encode("ascii"), b" ", path]
        if query:
            parts += (b"?", query)
        parts.append(b" HTTP/1.1\r\nhost: ")
        parts.append(host if host is not None else target.pools[0].host.encode("ascii"))
        parts.append(b"\r\n")
        parts += kept
        parts.append(target.upstream_headers)
        if chunked:
            parts.append(b"transfer-encoding: chunked\r\n")
        elif length >= 0:
            parts.append(b"content-length: %d\r\n" % length)
        parts.append(b"\r\n")
        return b"".join(parts)

    async def _request_body(
        self, downstream: Downstream, length: int, chunked: bool
    ) -> bytes | AsyncIterator[bytes]:
        if length == 0:
            return b""
        data, more = await downstream.read_body()
        if not more:
            if len(data) > self.max_body_bytes:
                raise Reject(413, "request body too large")
            return data
        return self._stream_body(downstream, data)

    async def _stream_body(self, downstream: Downstream, first: bytes) -> AsyncIterator[bytes]:
        total = len(first)
        yield first
        more = True
        while more:
            data, more = await downstream.read_body()
            total += len(data)
            if total > self.max_body_bytes:
                raise Reject(413, "request body too large")
            if data:
                yield data

    async def forward(
        self,
        method: str,
        head: bytes,
        length: int,
        chunked: bool,
        target: Target,
        set_cookie: bytes | None,
        downstream: Downstream,
    ) -> None:
        metrics = self.metrics
        release, arm = target.release, target.arm
        body: bytes | AsyncIterator[bytes] | None = None
        if length >= 0 or chunked:
            try:
                body = await self._request_body(downstream, length, chunked)
            except ClientGone:
                return
            except Reject as exc:
                await downstream.respond(
                    *self.error_response(exc.status, exc.message, target, set_cookie, close=True)
                )
                metrics.count(release, arm, exc.status)
                return
        replayable = body is None or type(body) is bytes  # not an ABC check: hot path
        attempts = len(target.pools) if replayable else 1
        started = time.perf_counter()
        resp: UpstreamResponse | None = None
        error: tuple[int, str, str] | None = None
        for _ in range(min(attempts, 2)):
            pool = target.pick()
            try:
                resp = await pool.request(
                    head,
                    body,
                    chunked=chunked,
                    is_head=method == "HEAD",
                    idempotent=method in IDEMPOTENT_METHODS,
                )
                break
            except UpstreamConnectError as exc:
                error = (502, "upstream refused or unreachable", "connect")
                if exc.phase in ("connect", "pool"):
                    continue  # nothing was sent: the arm's next upstream may answer (§8 row 1)
                break  # the request went out: never replay it elsewhere (RFC 9110 §9.2.2)
            except UpstreamTimeout as exc:
                if exc.phase == "pool":
                    error = (503, "upstream connection pool exhausted", "pool")
                else:
                    error = (504, "upstream timed out", "timeout")
                break
            except (UpstreamProtocolError, UpstreamError):
                error = (502, "invalid response from upstream", "protocol")
                break
            except (ClientGone, Reject) as exc:
                if isinstance(exc, Reject):
                    await downstream.respond(
                        *self.error_response(
                            exc.status, exc.message, target, set_cookie, close=True
                        )
                    )
                return
        if resp is None:
            status, message, kind = error or (502, "upstream unavailable", "connect")
            metrics.error(release, arm, kind)
            metrics.count(release, arm, status)
            await downstream.respond(*self.error_response(status, message, target, set_cookie))
            return
        elapsed = time.perf_counter() - started
        status = resp.status
        headers = self.response_filter(resp, target, set_cookie)
        if resp.complete:  # the common case: answer first, count after (off the latency path)
            data = resp.take()
            resp.release()
            await downstream.respond(status, headers, data)
            metrics.upstream_latency[arm].observe(elapsed)
            metrics.count(release, arm, status)
            return
        metrics.upstream_latency[arm].observe(elapsed)
        metrics.count(release, arm, status)
        await self._stream_response(resp, status, headers, downstream, release, arm)

    async def _stream_response(
        self,
        resp: UpstreamResponse,
        status: int,
        headers: list[tuple[bytes, bytes]],
        downstream: Downstream,
        release: str,
        arm: str,
    ) -> None:
        watcher = downstream.watch_disconnect(resp)
        try:
            await downstream.start(status, headers)
            while True:
                try:
                    chunk = await resp.read()
                except UpstreamError:
                    # Head already sent: abort the client connection, never end "cleanly" (§2.12).
                    self.metrics.error(release, arm, "midstream")
                    resp.abort()
                    return
                if not chunk:
                    resp.release()
                    await downstream.write(b"", False)
                    return
                if not await downstream.write(chunk, True):
                    resp.abort()
                    return
        finally:
            resp.abort()  # no-op after release(); frees the connection on any other exit
            if watcher is not None:
                watcher.cancel()
