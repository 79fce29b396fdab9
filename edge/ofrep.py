"""OFREP on the edge listener: flag evaluation for the apps' own OpenFeature clients.

    POST /ofrep/v1/evaluate/flags/{key}   one flag            (OFREP v0.3.0, ../shared/OFREP.md §1)
    POST /ofrep/v1/evaluate/flags[/]      every flag of the key's set, ETag + If-None-Match -> 304
    GET  /ofrep/v1/events                 SSE: `refetchEvaluation` on every applied version
    OPTIONS /ofrep/v1/...                 CORS preflight for browser apps

Rules of this file:
* The pipeline hands over every request whose canonical path starts with `/ofrep/` (one hook
  in `Pipeline.handle`); nothing here touches the store: the snapshot is the watcher's, each
  flag already compiled (flags/flageval.py).
* Every request needs an application's key (`Authorization: Bearer` or `X-API-Key`; the SSE
  stream also takes `?key=` because a browser's EventSource cannot set headers). The document
  stores only SHA-256 hashes (`api_keys`); a missing, unknown or revoked key is 401, a flag
  outside the key's set 403 (single) or left out (bulk).
* Answers follow OFREP.md §3 exactly, including the real Python client's quirks: `variant`
  always a string on 200, `errorDetails` on every 400, integer `Retry-After` on 429.
* A key's rate is a token bucket per worker process (`rate_per_s`, `burst`), on an injectable
  clock so tests drive time explicitly.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import math
import time
from collections.abc import Callable, Iterator
from typing import Any, Protocol
from urllib.parse import unquote_to_bytes

import orjson
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

from edge.metrics import exposure_family
from flags.evaluate import Snapshot
from flags.flageval import (
    ERROR_FLAG_NOT_FOUND,
    ERROR_TARGETING_KEY_MISSING,
    FlagResult,
    FlagSet,
    unit_of,
)
from flags.flagmodel import ApiKey, hash_key
from flags.store import Revision

PREFIX = b"/ofrep/v1/"
MAX_CONTEXT_BYTES = 64 * 1024  # a context is a user's attributes, not a payload (413 past it)
SSE_KEEPALIVE_S = 15.0  # below common proxies' 30-60 s idle timeouts
SSE_INACTIVITY_DELAY_S = 120  # OFREP's default: clients may drop the stream when hidden
CORS_MAX_AGE_S = 600
STREAM_PATH = "/ofrep/v1/events"
EXPOSURE_BUFFER = 10_000  # events held per slow exposure reader before the oldest are dropped

_JSON = b"application/json"
_CORS = [
    (b"access-control-allow-origin", b"*"),
    # Browsers hide every other response header from scripts unless it is exposed.
    (b"access-control-expose-headers", b"ETag, Retry-After"),
]
_PREFLIGHT = [
    *_CORS,
    (b"access-control-allow-methods", b"GET, POST, OPTIONS"),
    (b"access-control-allow-headers", b"Authorization, X-API-Key, Content-Type, If-None-Match"),
    (b"access-control-max-age", str(CORS_MAX_AGE_S).encode()),
]


class Downstream(Protocol):
    """The part of the pipeline's client seam this module uses (edge/pipeline.py)."""

    async def read_body(self) -> tuple[bytes, bool]: ...

    async def respond(
        self, status: int, headers: list[tuple[bytes, bytes]], body: bytes
    ) -> None: ...

    async def start(self, status: int, headers: list[tuple[bytes, bytes]]) -> None: ...

    async def write(self, data: bytes, more: bool) -> bool: ...

    def watch_disconnect(self, on_gone: Any) -> None:
        """`on_gone.abort()` is called when the client disconnects."""


class _Hangup:
    """Told by the client seam when the client goes (it calls `abort`, as for an upstream)."""

    __slots__ = ("gone",)

    def __init__(self) -> None:
        self.gone = asyncio.Event()

    def abort(self) -> None:
        self.gone.set()


class Refusal(Exception):
    """An OFREP request answered with an error status and a JSON body."""

    def __init__(
        self,
        status: int,
        body: dict[str, Any] | None,
        headers: list[tuple[bytes, bytes]] | None = None,
    ) -> None:
        super().__init__(status)
        self.status = status
        self.body = body
        self.headers = headers or []


class _Bucket:
    __slots__ = ("tokens", "stamp")

    def __init__(self, tokens: float, stamp: float) -> None:
        self.tokens = tokens
        self.stamp = stamp


class Keys:
    """An applied version's API keys, by hash."""

    __slots__ = ("by_hash",)

    def __init__(self, keys: dict[str, ApiKey]) -> None:
        self.by_hash = {k.sha256: (name, k) for name, k in keys.items()}


class Ofrep:
    """The OFREP endpoints of one worker."""

    def __init__(
        self,
        clock: Callable[[], float] = time.monotonic,
        path_prefix: str = "",
        exposures: dict[tuple[str, str], int] | None = None,
    ) -> None:
        self.clock = clock
        # Requests whose path starts with `mount` are OFREP's (the pipeline's one check).
        self.mount = path_prefix.encode("ascii") + b"/ofrep/"
        self.prefix = path_prefix.encode("ascii") + PREFIX
        self.stream_path = path_prefix + STREAM_PATH
        self.flags: FlagSet | None = None
        self.keys = Keys({})
        self.version = 0
        self.buckets: dict[str, _Bucket] = {}
        # (flag, variant) -> count: bounded to declared flags and variants (issue #11, 6).
        # The edge passes `EdgeMetrics.exposures`, so a worker's snapshot carries them.
        self.exposures: dict[tuple[str, str], int] = {} if exposures is None else exposures
        # Python >= 3.10: an Event binds to a loop on first wait, so one can be made here.
        self._changed = asyncio.Event()
        self._last_modified = int(time.time())
        self.closing = False
        self.sinks: set[_Sink] = set()

    def close(self) -> None:
        """End every SSE stream now (shutdown), so a graceful stop need not wait them out."""
        self.closing = True
        self._changed.set()

    # -- configuration -----------------------------------------------------------------------

    def apply(self, snapshot: Snapshot, revision: Revision | None = None) -> None:
        """A watcher listener: the new version's flags and keys, and a poke to SSE streams."""
        self.flags = snapshot.flags
        self.keys = Keys(snapshot.document.api_keys)
        if snapshot.version != self.version:
            self.version = snapshot.version
            self._last_modified = int(time.time())
            changed, self._changed = self._changed, asyncio.Event()
            changed.set()
        live = {name for name, _ in self.keys.by_hash.values()}
        for name in [n for n in self.buckets if n not in live]:
            del self.buckets[name]  # a deleted key's bucket goes with it

    # -- entry -------------------------------------------------------------------------------

    async def handle(
        self,
        method: str,
        path: bytes,
        query: bytes,
        headers: list[tuple[bytes, bytes]],
        downstream: Downstream,
    ) -> None:
        try:
            if method == "OPTIONS":
                await downstream.respond(204, [*_PREFLIGHT, (b"content-length", b"0")], b"")
                return
            prefix = self.prefix
            route = path[len(prefix) :] if path.startswith(prefix) else None
            if route in (b"events", b"exposures"):
                if method != "GET":
                    raise Refusal(405, {"errorDetails": "use GET"}, [(b"allow", b"GET")])
                if route == b"events":
                    await self._stream(headers, query, downstream)
                else:
                    await self._exposure_stream(headers, query, downstream)
                return
            if route is None or not (route.startswith(b"evaluate/flags") or route == b""):
                raise Refusal(404, {"errorDetails": "no such OFREP endpoint"})
            rest = route[len(b"evaluate/flags") :]
            if rest and not rest.startswith(b"/"):
                raise Refusal(404, {"errorDetails": "no such OFREP endpoint"})
            key = rest[1:].decode("utf-8", "replace")
            if method != "POST":
                raise Refusal(405, {"errorDetails": "use POST"}, [(b"allow", b"POST, OPTIONS")])
            api = self._authorize(headers, None)
            ctx, unit = await self._context(headers, downstream, key or None)
            if key:
                await self._single(api, key, ctx, unit, downstream)
            else:
                await self._bulk(api, ctx, unit, headers, downstream)
        except Refusal as exc:
            await self._refuse(exc, downstream)
        except Exception as exc:  # noqa: BLE001 - OFREP.md §3 item 5: 500 with errorDetails
            await self._refuse(Refusal(500, {"errorDetails": f"internal error: {exc}"}), downstream)

    async def _refuse(self, exc: Refusal, downstream: Downstream) -> None:
        body = orjson.dumps(exc.body) if exc.body is not None else b""
        headers = [*_CORS, *exc.headers, (b"content-length", b"%d" % len(body))]
        if body:
            headers.append((b"content-type", _JSON))
        if exc.status == 413:
            headers.append((b"connection", b"close"))  # the rest of the body is not read
        await downstream.respond(exc.status, headers, body)

    # -- auth and rate -----------------------------------------------------------------------

    def _authorize(self, headers: list[tuple[bytes, bytes]], query_key: str | None) -> ApiKey:
        secret = query_key
        for name, value in headers:
            if name == b"authorization":
                scheme, _, token = value.decode("latin-1").strip().partition(" ")
                if scheme.lower() == "bearer" and token.strip():
                    secret = token.strip()
            elif name == b"x-api-key" and value.strip():
                secret = value.decode("latin-1").strip()
        unauthorized = [(b"www-authenticate", b'Bearer realm="ofrep"')]
        if secret is None:
            raise Refusal(401, {"errorDetails": "an API key is required"}, unauthorized)
        found = self.keys.by_hash.get(hash_key(secret))
        if found is None or found[1].revoked:
            raise Refusal(401, {"errorDetails": "unknown or revoked API key"}, unauthorized)
        key_name, api = found
        if api.rate_per_s is not None:
            self._spend(key_name, api.rate_per_s, api.burst or max(1, math.ceil(api.rate_per_s)))
        return api

    def _spend(self, name: str, rate: float, burst: int) -> None:
        now = self.clock()
        bucket = self.buckets.get(name)
        if bucket is None:
            bucket = self.buckets[name] = _Bucket(float(burst), now)
        bucket.tokens = min(float(burst), bucket.tokens + (now - bucket.stamp) * rate)
        bucket.stamp = now
        if bucket.tokens < 1.0:
            # OFREP.md §2: the Python client reads only integer seconds or an HTTP-date.
            wait_s = max(1, math.ceil((1.0 - bucket.tokens) / rate))
            raise Refusal(
                429,
                {"errorDetails": f"rate limit of {rate:g}/s exceeded"},
                [(b"retry-after", b"%d" % wait_s)],
            )
        bucket.tokens -= 1.0

    # -- context ---------------------------------------------------------------------------------

    async def _context(
        self, headers: list[tuple[bytes, bytes]], downstream: Downstream, key: str | None
    ) -> tuple[dict[str, Any], str | None]:
        length = -1
        chunked = False
        for name, value in headers:
            if name == b"content-length":
                length = int(value) if value.isdigit() else -1
            elif name == b"transfer-encoding":
                chunked = True
        too_big = Refusal(
            413, _error(key, "INVALID_CONTEXT", f"context larger than {MAX_CONTEXT_BYTES} bytes")
        )
        if length > MAX_CONTEXT_BYTES:
            raise too_big
        body = b""
        if length > 0 or chunked:
            more = True
            parts: list[bytes] = []
            size = 0
            while more:
                data, more = await downstream.read_body()
                size += len(data)
                if size > MAX_CONTEXT_BYTES:
                    raise too_big
                parts.append(data)
            body = b"".join(parts)
        if not body.strip():
            return {}, None  # OFREP.md §3 item 1: tolerate a missing context
        try:
            raw = orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            raise Refusal(400, _error(key, "PARSE_ERROR", f"body is not JSON: {exc}")) from None
        if not isinstance(raw, dict):
            raise Refusal(400, _error(key, "INVALID_CONTEXT", "body must be a JSON object"))
        ctx = raw.get("context", {})
        if ctx is None:
            ctx = {}
        if not isinstance(ctx, dict):
            raise Refusal(400, _error(key, "INVALID_CONTEXT", "context must be a JSON object"))
        tk = ctx.get("targetingKey")
        if tk is not None and not isinstance(tk, str):
            raise Refusal(400, _error(key, "INVALID_CONTEXT", "targetingKey must be a string"))
        unit = unit_of(ctx)
        if tk is not None and tk.strip() and unit is None:
            raise Refusal(
                400,
                _error(key, "INVALID_CONTEXT", "targetingKey is not a usable id (<= 256 bytes)"),
            )
        return ctx, unit

    # -- evaluation --------------------------------------------------------------------------

    def _count(self, result: FlagResult, unit: str | None) -> None:
        if result.error_code is None and result.variant is not None:
            pair = (result.key, result.variant)
            self.exposures[pair] = self.exposures.get(pair, 0) + 1
            if self.sinks:  # only while an analytics reader is connected
                event = (time.time(), result.key, result.variant, result.reason, unit)
                for sink in self.sinks:
                    sink.push(event)

    async def _single(
        self,
        api: ApiKey,
        key: str,
        ctx: dict[str, Any],
        unit: str | None,
        downstream: Downstream,
    ) -> None:
        flags = self.flags
        if flags is None:
            raise Refusal(500, {"errorDetails": "no configuration applied yet"})
        if api.flags is not None and key not in api.flags and key in flags.flags:
            raise Refusal(403, {"errorDetails": f"this API key may not read flag {key!r}"})
        result = flags.evaluate(key, unit, ctx)
        code = result.error_code
        if code == ERROR_FLAG_NOT_FOUND:
            raise Refusal(404, _error(key, code, result.error_details or "flag not found"))
        if code == ERROR_TARGETING_KEY_MISSING:
            raise Refusal(400, _error(key, code, result.error_details or "targetingKey missing"))
        if code is not None:
            raise Refusal(500, {"errorDetails": result.error_details or code})
        self._count(result, unit)
        body = orjson.dumps(_success(result))
        await downstream.respond(200, self._json_headers(body), body)

    async def _bulk(
        self,
        api: ApiKey,
        ctx: dict[str, Any],
        unit: str | None,
        headers: list[tuple[bytes, bytes]],
        downstream: Downstream,
    ) -> None:
        flags = self.flags
        if flags is None:
            raise Refusal(500, {"errorDetails": "no configuration applied yet"})
        keys = api.flags if api.flags is not None else flags.flags.keys()
        items: list[dict[str, Any]] = []
        results = flags.evaluate_all(unit, ctx, keys)
        for result in results:
            if result.error_code is None:
                items.append(_success(result))
            else:
                items.append(_error(result.key, result.error_code, result.error_details or "error"))
        payload = {
            "flags": items,
            "metadata": {"version": f"v{flags.version}"},
            "eventStreams": [
                {
                    "type": "sse",
                    "endpoint": {"requestUri": self.stream_path},
                    "inactivityDelaySec": SSE_INACTIVITY_DELAY_S,
                }
            ],
        }
        body = orjson.dumps(payload)
        # A weak validator over the whole answer: it changes with the context and the version
        # (OFREP.md §1 "ETag and caching", flagd's approach).
        etag = b'W/"' + hashlib.blake2b(body, digest_size=12).hexdigest().encode() + b'"'
        for name, value in headers:
            if name == b"if-none-match" and _etag_matches(value, etag):
                await downstream.respond(304, [*_CORS, (b"etag", etag)], b"")
                return
        for result in results:
            self._count(result, unit)
        await downstream.respond(200, [*self._json_headers(body), (b"etag", etag)], body)

    def _json_headers(self, body: bytes) -> list[tuple[bytes, bytes]]:
        return [
            *_CORS,
            (b"content-type", _JSON),
            (b"content-length", b"%d" % len(body)),
            # Answers depend on the context: revalidate every time, never share.
            (b"cache-control", b"private, no-cache"),
        ]

    # -- SSE ----------------------------------------------------------------------------------

    async def _stream(
        self, headers: list[tuple[bytes, bytes]], query: bytes, downstream: Downstream
    ) -> None:
        self._authorize(headers, _query_key(query))
        seen = [self.version]

        def refetch() -> bytes:
            if self.version == seen[0]:
                return b""
            seen[0] = self.version
            event = {"type": "refetchEvaluation", "lastModified": self._last_modified}
            return b"event: message\nid: v%d\ndata: %s\n\n" % (self.version, orjson.dumps(event))

        await self._serve_stream(downstream, b": turnout ofrep events\nretry: 2000\n\n", refetch)

    async def _exposure_stream(
        self, headers: list[tuple[bytes, bytes]], query: bytes, downstream: Downstream
    ) -> None:
        """SSE of exposures for an analytics sink (issue #11, 6): one `exposure` event per
        evaluation served while connected, `dropped` when the reader fell behind."""
        api = self._authorize(headers, _query_key(query))
        if not api.exposures:
            raise Refusal(403, {"errorDetails": "this API key may not read exposures"})
        sink = _Sink()
        self.sinks.add(sink)
        try:
            await self._serve_stream(downstream, b": turnout exposures\n\n", sink.drain, sink.ready)
        finally:
            self.sinks.discard(sink)

    async def _serve_stream(
        self,
        downstream: Downstream,
        banner: bytes,
        produce: Callable[[], bytes],
        ready: asyncio.Event | None = None,
    ) -> None:
        """An SSE response: wake on `ready`, on a new version, on the client leaving or every
        SSE_KEEPALIVE_S; write what `produce` has (a comment when nothing); end on shutdown."""
        await downstream.start(
            200,
            [
                *_CORS,
                (b"content-type", b"text/event-stream"),
                (b"cache-control", b"no-cache"),
                (b"x-accel-buffering", b"no"),  # nginx in front must not buffer the stream
            ],
        )
        if not await downstream.write(banner, True):
            return
        hangup = _Hangup()
        downstream.watch_disconnect(hangup)  # the front-end aborts it on disconnect
        while True:
            events = (
                [hangup.gone, self._changed]
                if ready is None
                else [hangup.gone, self._changed, ready]
            )
            waits = [asyncio.ensure_future(event.wait()) for event in events]
            try:
                await asyncio.wait(
                    waits, timeout=SSE_KEEPALIVE_S, return_when=asyncio.FIRST_COMPLETED
                )
            finally:
                for waiter in waits:
                    waiter.cancel()
            if hangup.gone.is_set():
                return
            if self.closing:
                await downstream.write(b"", False)
                return
            if not await downstream.write(produce() or b": keep-alive\n\n", True):
                return


class _Sink:
    """One exposure reader's bounded buffer."""

    __slots__ = ("events", "ready", "dropped")

    def __init__(self) -> None:
        self.events: collections.deque[tuple[float, str, str, str, str | None]] = collections.deque(
            maxlen=EXPOSURE_BUFFER
        )
        self.ready = asyncio.Event()
        self.dropped = 0

    def push(self, event: tuple[float, str, str, str, str | None]) -> None:
        if len(self.events) == EXPOSURE_BUFFER:
            self.dropped += 1
        self.events.append(event)
        self.ready.set()

    def drain(self) -> bytes:
        out = []
        if self.dropped:
            out.append(b"event: dropped\ndata: %s\n\n" % orjson.dumps({"count": self.dropped}))
            self.dropped = 0
        while self.events:
            ts, flag, variant, reason, unit = self.events.popleft()
            item = {"ts": ts, "flag": flag, "variant": variant, "reason": reason, "unit": unit}
            out.append(b"event: exposure\ndata: %s\n\n" % orjson.dumps(item))
        self.ready.clear()
        return b"".join(out)


def _query_key(query: bytes) -> str | None:
    """`?key=` for EventSource clients, which cannot set headers."""
    for part in query.split(b"&"):
        name, _, value = part.partition(b"=")
        if name == b"key" and value:
            return unquote_to_bytes(value).decode("utf-8", "replace")
    return None


class ExposureCollector(Collector):
    """`turnout_flag_exposures_total{flag, variant}` of this process for the admin's /metrics
    (with `workers: N` the supervisor sums the workers' snapshots instead)."""

    def __init__(self, ofrep: Ofrep) -> None:
        self.ofrep = ofrep

    def collect(self) -> Iterator[CounterMetricFamily]:
        yield exposure_family(self.ofrep.exposures, self.ofrep.flags)


def _error(key: str | None, code: str, details: str) -> dict[str, Any]:
    body: dict[str, Any] = {"errorCode": code, "errorDetails": details}
    if key is not None:
        body["key"] = key
    return body


def _success(result: FlagResult) -> dict[str, Any]:
    out: dict[str, Any] = {
        "key": result.key,
        "reason": result.reason,
        "variant": result.variant,
        "metadata": result.metadata,
    }
    if not result.deferred:  # ADR-0006: no value means "use your code default"
        out["value"] = result.value
    return out


def _etag_matches(header: bytes, etag: bytes) -> bool:
    """RFC 9110 §13.1.2: weak comparison; `*` matches any current representation."""
    ours = etag.removeprefix(b"W/")
    for candidate in header.split(b","):
        candidate = candidate.strip()
        if candidate == b"*" or candidate.removeprefix(b"W/") == ours:
            return True
    return False
