"""Upstream failures: the exception tree, its one mapping to status and metric kind, and the
pipeline answering each kind through that mapping against real (raw) upstream servers."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable, Callable

import pytest

from edge.context import RequestContext
from edge.errors import (
    ClosedBeforeResponse,
    ConnectError,
    ConnectTimeout,
    PoolTimeout,
    ProtocolError,
    ReadTimeout,
    ResponseAborted,
    UpstreamError,
    UpstreamTimeout,
    WriteTimeout,
    classify,
)
from edge.identity import CookieSigner, Identity
from edge.metrics import EdgeMetrics
from edge.pipeline import Pipeline
from edge.targets import PoolSet
from edge.upstream import Timeouts, UpstreamResponse
from flags.document import load_document
from flags.evaluate import compile_snapshot
from tests.rawserver import RawConn, RawServer

pytestmark = pytest.mark.timeout(30)


@pytest.mark.parametrize(
    ("error", "status", "kind", "sent"),
    [
        (ConnectError, 502, "connect", False),
        (ClosedBeforeResponse, 502, "connect", True),
        (ConnectTimeout, 504, "timeout", False),
        (ReadTimeout, 504, "timeout", True),
        (WriteTimeout, 504, "timeout", True),
        (PoolTimeout, 503, "pool", False),
        (ProtocolError, 502, "protocol", True),
        (ResponseAborted, 502, "protocol", True),
        (UpstreamError, 502, "protocol", True),
        (UpstreamTimeout, 504, "timeout", True),
    ],
)
def test_each_failure_maps_to_one_status_and_kind(
    error: type[UpstreamError], status: int, kind: str, sent: bool
) -> None:
    """Every class of the tree has exactly the status, metric kind and `sent` flag of its row."""
    got_status, message, got_kind = classify(error("secret detail 10.0.0.7"))
    assert (got_status, got_kind) == (status, kind)
    assert message and "10.0.0.7" not in message  # the client never sees upstream details
    assert error("x").sent is sent


class Recorder:
    """The `Downstream` seam, recording what the pipeline answers."""

    def __init__(self) -> None:
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.body = b""

    async def read_body(self) -> tuple[bytes, bool]:
        return b"", False

    async def respond(self, status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
        self.status, self.headers, self.body = status, headers, body

    async def start(self, status: int, headers: list[tuple[bytes, bytes]]) -> None:
        self.status, self.headers = status, headers

    async def write(self, data: bytes, more: bool) -> bool:
        self.body += data
        return True

    def watch_disconnect(self, on_gone: UpstreamResponse) -> None:
        return None


def make_pipeline(url: str, timeouts: Timeouts, max_connections: int = 8) -> Pipeline:
    document = load_document(
        {
            "releases": {"web": {"stable": [url], "canary": [url], "stage": "off"}},
            "routes": [{"host": "*", "path_prefix": "/", "release": "web"}],
        }
    )
    pipeline = Pipeline(
        identity=Identity(
            CookieSigner(b"secret-for-tests-0123456789"),
            cookie_name="uid",
            max_age_s=3600,
            secure=False,
        ),
        pools=PoolSet(timeouts, max_connections),
        metrics=EdgeMetrics(),
        unit_header="x-user-id",
        email_header="x-user-email",
        trusted_hops=0,
        expose_decision_headers=True,
        via_name="turnout",
        max_body_bytes=1024,
    )
    pipeline.apply(compile_snapshot(document))
    return pipeline


def context() -> RequestContext:
    headers = [(b"host", b"example.test"), (b"x-user-id", b"bob")]
    return RequestContext("GET", b"/x", b"", headers, "1.1", ("127.0.0.1", 1), "http", 0.0)


async def exchange(pipeline: Pipeline) -> tuple[Recorder, RequestContext]:
    downstream, ctx = Recorder(), context()
    await pipeline.handle(ctx, downstream)
    return downstream, ctx


def free_closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def silent(conn: RawConn) -> None:
    await conn.read_request()
    await asyncio.sleep(5)


async def garbage(conn: RawConn) -> None:
    await conn.read_request()
    conn.writer.write(b"NOT HTTP AT ALL\r\n\r\n")
    await conn.writer.drain()
    await asyncio.sleep(1)


async def hang_up(conn: RawConn) -> None:
    await conn.read_request()


def run(main: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(main())


@pytest.mark.parametrize(
    ("handler", "timeouts", "status", "kind"),
    [
        (None, Timeouts(), 502, "connect"),
        (silent, Timeouts(read_s=0.2), 504, "timeout"),
        (garbage, Timeouts(), 502, "protocol"),
        (hang_up, Timeouts(), 502, "connect"),
    ],
    ids=["refused", "read-timeout", "invalid-response", "closed-before-response"],
)
def test_pipeline_answers_each_failure_through_the_mapping(
    handler: Callable[[RawConn], Awaitable[None]] | None,
    timeouts: Timeouts,
    status: int,
    kind: str,
) -> None:
    """A real upstream failing in each way gives the client the mapped status (naming release
    and arm) and counts exactly one error of the mapped kind and one response."""

    async def main() -> None:
        if handler is None:
            pipeline = make_pipeline(f"http://127.0.0.1:{free_closed_port()}", timeouts)
            downstream, ctx = await exchange(pipeline)
        else:
            async with RawServer(handler) as srv:
                pipeline = make_pipeline(f"http://127.0.0.1:{srv.port}", timeouts)
                downstream, ctx = await exchange(pipeline)
        assert downstream.status == status, downstream.body
        assert b"release web, arm stable" in downstream.body
        assert ctx.error == kind and ctx.status == status
        metrics = pipeline.metrics
        assert metrics.upstream_errors == {("web", "stable", kind): 1}
        assert metrics.requests == {("web", "stable", status // 100): 1}
        await pipeline.pools.aclose()

    run(main)


def test_pool_exhaustion_is_503_pool() -> None:
    """With the arm's only connection held, the next request waits pool_s and gets 503, kind pool."""

    async def handler(conn: RawConn) -> None:
        while await conn.read_request() is not None:
            conn.writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")

    async def main() -> None:
        async with RawServer(handler) as srv:
            pipeline = make_pipeline(
                f"http://127.0.0.1:{srv.port}", Timeouts(pool_s=0.2), max_connections=1
            )
            pool = next(iter(pipeline.pools.pools.values()))
            held = await pool.request(b"GET / HTTP/1.1\r\nhost: a\r\n\r\n")
            downstream, ctx = await exchange(pipeline)
            held.release()
            assert downstream.status == 503 and ctx.error == "pool"
            assert pipeline.metrics.upstream_errors == {("web", "stable", "pool"): 1}
            downstream, ctx = await exchange(pipeline)  # the slot is back: served
            assert downstream.status == 200 and downstream.body == b"ok"
            assert ctx.bytes_sent == 2 and ctx.upstream_s >= 0
            await pipeline.pools.aclose()

    run(main)


def test_refusals_are_built_by_error_response() -> None:
    """A request refused in admission (fragment in the query) gets error_response's body and
    no per-arm count: no release was chosen."""

    async def main() -> None:
        pipeline = make_pipeline("http://127.0.0.1:9", Timeouts())
        downstream, ctx = Recorder(), context()
        ctx.query = b"a#b"
        await pipeline.handle(ctx, downstream)
        assert downstream.status == 400
        assert downstream.body == b"turnout: fragment in request target\n"
        assert (b"connection", b"close") in downstream.headers
        assert ctx.target is None and pipeline.metrics.requests == {}

    run(main)
