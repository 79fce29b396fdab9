"""The edge's access log (issue #13): one line per exchange, formatted and written off the
request path in batches; JSON or human; the unit id hashed or omitted; and end to end through
a real Turnout instance with real upstreams."""

from __future__ import annotations

import asyncio
import io
import json
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge.accesslog import AccessLog
from tests.harness import TurnoutInstance, backends, release_doc, wait_until

pytestmark = pytest.mark.timeout(60)


class CountingSink(io.BytesIO):
    """A sink that counts its writes (a batch must be one write)."""

    def __init__(self) -> None:
        super().__init__()
        self.writes = 0

    def write(self, data: Any) -> int:
        self.writes += 1
        return super().write(data)


class FakeTarget:
    release = "web"
    arm = "canary"
    log_label = ("web", "canary")


class FakePool:
    host = "127.0.0.1"
    port = 9002
    label = "127.0.0.1:9002"


def _record(log: AccessLog, unit: str | None = "alice", path: bytes = b"/a/b") -> None:
    log.record(
        "GET",
        b"example.com",
        path,
        200,
        42,
        0.0015,
        FakeTarget(),
        FakePool(),
        unit,  # type: ignore[arg-type]
    )


def test_record_does_no_io_and_flush_writes_one_batch() -> None:
    """`record` only queues; `flush` formats every pending line and writes them in one call."""
    sink = CountingSink()
    log = AccessLog(sink, clock=lambda: 0.0)
    for _ in range(3):
        _record(log)
    assert sink.writes == 0
    assert log.flush() == 3
    assert sink.writes == 1
    lines = sink.getvalue().decode().splitlines()
    assert len(lines) == 3
    entry = json.loads(lines[0])
    assert entry == {
        "time": "1970-01-01T00:00:00.000Z",
        "method": "GET",
        "host": "example.com",
        "path": "/a/b",
        "status": 200,
        "bytes": 42,
        "duration_ms": 1.5,
        "release": "web",
        "arm": "canary",
        "upstream": "127.0.0.1:9002",
        "unit": entry["unit"],
    }
    assert entry["unit"] != "alice" and len(entry["unit"]) == 16


def test_unit_digest_is_keyed_and_stable() -> None:
    """The same key gives the same digest for the same unit (a fleet agrees); another key
    gives another (nobody can reverse it by hashing guesses without the key)."""
    a = AccessLog(io.BytesIO(), unit_key=b"secret-1")
    b = AccessLog(io.BytesIO(), unit_key=b"secret-1")
    c = AccessLog(io.BytesIO(), unit_key=b"secret-2")
    assert a.unit_digest("alice") == b.unit_digest("alice")
    assert a.unit_digest("alice") != c.unit_digest("alice")
    assert a.unit_digest("alice") != a.unit_digest("bob")


def test_unit_can_be_omitted() -> None:
    """`access_log_unit_id: omit` leaves the unit out of the line altogether."""
    sink = io.BytesIO()
    log = AccessLog(sink, unit_id="omit")
    _record(log)
    log.flush()
    assert "unit" not in json.loads(sink.getvalue())


def test_human_format_escapes_client_text() -> None:
    """A human line is one line even when the path holds control characters or spaces."""
    sink = io.BytesIO()
    log = AccessLog(sink, fmt="human", clock=lambda: 0.0)
    _record(log, path=b"/x\n2026 fake line")
    log.flush()
    text = sink.getvalue().decode()
    assert text.count("\n") == 1
    assert "GET example.com/x\\x0a2026\\x20fake\\x20line 200 42 1.5ms web/canary" in text


def test_full_batch_is_flushed_on_the_next_loop_turn_not_inside_record() -> None:
    """Reaching `max_batch` schedules a flush with call_soon; `record` itself never writes."""

    async def scenario() -> tuple[int, int]:
        sink = CountingSink()
        log = AccessLog(sink, max_batch=2, flush_interval_s=3600)
        _record(log)
        _record(log)
        during = sink.writes
        await asyncio.sleep(0)
        return during, sink.writes

    assert asyncio.run(scenario()) == (0, 1)


def test_timer_flushes_and_close_writes_the_rest() -> None:
    """The timer writes pending lines; `aclose` writes what is left and stops the timer."""

    async def scenario() -> tuple[int, int]:
        sink = CountingSink()
        log = AccessLog(sink, flush_interval_s=0.01)
        log.start()
        _record(log)
        for _ in range(500):  # bounded: the timer fires within a few ticks
            if log.written_lines:
                break
            await asyncio.sleep(0.01)
        first = log.written_lines
        _record(log)
        await log.aclose()
        return first, log.written_lines

    assert asyncio.run(scenario()) == (1, 2)


def test_a_failing_sink_drops_the_batch_without_raising() -> None:
    """A closed sink (a full disk, a closed pipe) counts dropped lines; nothing raises."""
    sink = io.BytesIO()
    sink.close()
    log = AccessLog(sink)
    _record(log)
    assert log.flush() == 0
    assert log.dropped_lines == 1


def test_access_log_end_to_end(tmp_path: Path) -> None:
    """Through a real instance: one JSON line per request with release, arm, upstream,
    status and bytes; no query string; a 404 and a 502 are logged too."""
    log_file = tmp_path / "access.log"
    with backends("stable", "canary") as servers:
        seed = release_doc(servers["stable"].url, servers["canary"].url, stage="ga")
        seed["releases"]["down"] = {
            "stable": ["http://127.0.0.1:1"],
            "canary": ["http://127.0.0.1:1"],
        }
        seed["routes"].append({"host": "*", "path_prefix": "/down", "release": "down"})
        seed["routes"][0]["host"] = "app.test"
        instance = TurnoutInstance(tmp_path / "state", seed=seed, access_log=str(log_file))
        instance.start()
        try:
            with httpx.Client(base_url=instance.edge_url) as client:
                ok = client.get(
                    "/hello?token=secret", headers={"X-User-Id": "u1", "Host": "app.test"}
                )
                assert ok.status_code == 200
                assert client.get("/nowhere", headers={"Host": "other.test"}).status_code == 404
                assert client.get("/down/x", headers={"Host": "other.test"}).status_code == 502

            def three_lines() -> bool:
                return log_file.exists() and len(log_file.read_text().splitlines()) >= 3

            assert wait_until(three_lines, 10)
        finally:
            instance.stop()
    lines = [json.loads(line) for line in log_file.read_text().splitlines()]
    first = lines[0]
    assert (first["method"], first["host"], first["path"], first["status"]) == (
        "GET",
        "app.test",
        "/hello",
        200,
    )
    assert (first["release"], first["arm"]) == ("web", "canary")
    assert first["upstream"] == servers["canary"].url.removeprefix("http://")
    assert first["bytes"] == len(ok.content)
    assert "secret" not in log_file.read_text()
    assert (lines[1]["status"], lines[1]["release"]) == (404, None)
    assert (lines[2]["status"], lines[2]["release"]) == (502, "down")


def test_a_pathological_line_is_capped_to_one_atomic_write() -> None:
    """A path of escaped control characters still makes one whole line of at most PIPE_BUF
    bytes, so workers sharing a pipe never splice each other's lines."""
    from edge.accesslog import LINE_MAX_BYTES

    sink = CountingSink()
    log = AccessLog(sink)
    _record(log, path=b"/" + b"\x01" * 8000)
    _record(log)
    log.flush()
    lines = sink.getvalue().splitlines(keepends=True)
    assert len(lines) == 2
    assert all(len(line) <= LINE_MAX_BYTES for line in lines)
    assert json.loads(lines[0])["path"].startswith("/\x01")


def test_a_websocket_upgrade_is_one_line_when_the_101_is_answered(tmp_path: Path) -> None:
    """A WebSocket through the tunnel gets one access log line, written when the upgrade is
    answered (101, the release and arm), and no second line when the tunnel closes."""
    from websockets.sync.client import connect as ws_connect

    log_file = tmp_path / "access.log"
    with backends("stable", "canary") as servers:
        seed = release_doc(servers["stable"].url, servers["canary"].url, stage="off")
        instance = TurnoutInstance(tmp_path / "state", seed=seed, access_log=str(log_file))
        instance.start()
        try:
            url = f"ws://127.0.0.1:{instance.edge_port}/ws"
            with ws_connect(url, additional_headers={"x-user-id": "bob"}) as ws:
                assert ws.recv(timeout=5) == "hello from stable arm=stable"

                def one_line() -> bool:
                    return log_file.exists() and len(log_file.read_text().splitlines()) >= 1

                assert wait_until(one_line, 10)
        finally:
            instance.stop()
    lines = [json.loads(line) for line in log_file.read_text().splitlines()]
    assert len(lines) == 1
    assert (lines[0]["path"], lines[0]["status"], lines[0]["release"], lines[0]["arm"]) == (
        "/ws",
        101,
        "web",
        "stable",
    )


def test_ofrep_answers_are_logged_with_their_status_and_bytes(tmp_path: Path) -> None:
    """An OFREP evaluation (answered by the edge itself, no release) is one access log line
    with the status and body bytes the client got, like any other exchange."""
    from tests.test_flagheader import SECRET, cohort_doc

    log_file = tmp_path / "access.log"
    with backends("stable", "canary") as servers:
        seed = cohort_doc(servers["stable"].url, servers["canary"].url)
        instance = TurnoutInstance(tmp_path / "state", seed=seed, access_log=str(log_file))
        instance.start()
        try:
            with httpx.Client(base_url=instance.edge_url) as client:
                answer = client.post(
                    "/ofrep/v1/evaluate/flags/staff",
                    json={"context": {"targetingKey": "u1"}},
                    headers={"authorization": f"Bearer {SECRET}"},
                )
                assert answer.status_code == 200
                assert client.post("/ofrep/v1/evaluate/flags/staff", json={}).status_code == 401

            def two_lines() -> bool:
                return log_file.exists() and len(log_file.read_text().splitlines()) >= 2

            assert wait_until(two_lines, 10)
        finally:
            instance.stop()
    lines = [json.loads(line) for line in log_file.read_text().splitlines()]
    assert (lines[0]["path"], lines[0]["status"], lines[0]["release"]) == (
        "/ofrep/v1/evaluate/flags/staff",
        200,
        None,
    )
    assert lines[0]["bytes"] == len(answer.content)
    assert lines[1]["status"] == 401


def _exchange(port: int, data: bytes, *, wait_s: float = 5.0) -> bytes:
    """Send raw bytes on a fresh connection; what came back until the edge closed it."""
    import socket

    with socket.create_connection(("127.0.0.1", port), timeout=wait_s) as sock:
        sock.sendall(data)
        chunks = []
        while True:
            try:
                chunk = sock.recv(65536)
            except (TimeoutError, ConnectionResetError):
                break
            if not chunk:
                break
            chunks.append(chunk)
    return b"".join(chunks)


def test_requests_the_front_end_refuses_are_logged(tmp_path: Path) -> None:
    """Input the front-end answers itself, before any pipeline phase (unparseable 400, 414,
    431, 505, the header deadline's 408) and a stalled body's 408 each get one line, with
    what was known of the request (`-` otherwise) and the status the client got."""
    log_file = tmp_path / "access.log"
    with backends("stable", "canary") as servers:
        seed = release_doc(servers["stable"].url, servers["canary"].url, stage="ga")
        instance = TurnoutInstance(
            tmp_path / "state",
            seed=seed,
            access_log=str(log_file),
            client_header_timeout_s=0.3,
            client_idle_timeout_s=0.3,
        )
        instance.start()
        try:
            port = instance.edge_port
            sent = {
                400: b"GET / HTTP/1.1\r\nHost: a\r\nBad Header: x\r\n\r\n",
                414: b"GET /" + b"a" * 70_000 + b" HTTP/1.1\r\nHost: a\r\n\r\n",
                431: b"GET /many HTTP/1.1\r\nHost: a\r\n"
                + b"".join(b"X-%d: v\r\n" % i for i in range(200))
                + b"\r\n",
                505: b"GET /two HTTP/2.0\r\nHost: h2.test\r\n\r\n",
            }
            for status, data in sent.items():
                assert _exchange(port, data).startswith(b"HTTP/1.1 %d " % status)
            # A head that never completes: 408 at the header deadline.
            assert _exchange(
                port, b"GET /slow HTTP/1.1\r\nHost: slow.test\r\nX-More: 1"
            ).startswith(b"HTTP/1.1 408 ")
            # A body that stalls: 408 at the body deadline, logged as 408 (not 499).
            stalled = b"POST /upload HTTP/1.1\r\nHost: body.test\r\nContent-Length: 10\r\n\r\nab"
            assert _exchange(port, stalled).startswith(b"HTTP/1.1 408 ")

            def six_lines() -> bool:
                return log_file.exists() and len(log_file.read_text().splitlines()) >= 6

            assert wait_until(six_lines, 10)
        finally:
            instance.stop()
    lines = [json.loads(line) for line in log_file.read_text().splitlines()]
    by_status: dict[int, list[dict[str, Any]]] = {}
    for line in lines:
        by_status.setdefault(line["status"], []).append(line)
    assert sorted(by_status) == [400, 408, 414, 431, 505]
    assert len(by_status[408]) == 2
    assert (by_status[505][0]["method"], by_status[505][0]["path"]) == ("GET", "/two")
    assert by_status[505][0]["host"] == "h2.test"
    assert by_status[431][0]["path"] == "/many"
    head_timeout = next(line for line in by_status[408] if line["path"] == "/slow")
    assert head_timeout["host"] == "slow.test"
    body_timeout = next(line for line in by_status[408] if line["path"] == "/upload")
    assert (body_timeout["method"], body_timeout["release"]) == ("POST", "web")
    assert all(line["bytes"] > 0 for line in by_status[400] + by_status[414])


@given(
    method=st.text(max_size=20),
    host=st.one_of(st.none(), st.binary(max_size=300)),
    path=st.binary(max_size=3000),
    unit=st.one_of(st.none(), st.text(max_size=50)),
)
@settings(max_examples=300, deadline=None)
def test_every_json_line_is_one_valid_object_whatever_the_client_sent(
    method: str, host: bytes | None, path: bytes, unit: str | None
) -> None:
    """The fast line (cached pieces, paths copied when they need no escaping) is always one
    line of valid JSON with the client's path, host and method as sent (decoded, capped)."""
    from edge.accesslog import LINE_MAX_BYTES, MAX_FIELD_CHARS

    log = AccessLog(io.BytesIO(), clock=lambda: 1.5)
    entry = (1.5, method, host, path, 200, 7, 0.25, ("web", "canary"), "127.0.0.1:9002", unit)
    line = log.format(entry)  # type: ignore[arg-type]
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    assert len(line) <= LINE_MAX_BYTES
    record = json.loads(line)
    decoded = path.decode("utf-8", "replace")
    assert decoded.startswith(record["path"])
    if len(line) < LINE_MAX_BYTES // 2:  # not shortened to fit one atomic write
        assert record["path"] == decoded[:MAX_FIELD_CHARS]
        assert record["method"] == method
        assert record["host"] == (host.decode("latin-1") if host is not None else "")
    assert (record["status"], record["bytes"], record["duration_ms"]) == (200, 7, 250.0)


def test_the_writer_process_formats_every_line_and_is_restarted_when_it_dies(
    tmp_path: Path,
) -> None:
    """With a file destination the edge only ships batches to its writer process
    (edge/logwriter.py), which formats and appends them. A writer killed by a signal is
    started again; batches sent after that arrive; close hands over what is left and the
    writer exits."""
    import os
    import signal

    target = tmp_path / "access.log"

    async def scenario() -> tuple[int, int, int]:
        log = AccessLog.open(str(target), fmt="json", unit_id="hash", unit_key=b"k")
        assert log is not None and log.writer is not None
        for i in range(1000):
            _record(log, path=b"/first/%d" % i)
        log.flush()
        await asyncio.sleep(0)
        first = log.writer.proc
        assert first is not None

        def lines() -> int:
            return len(target.read_text().splitlines()) if target.exists() else 0

        for _ in range(500):
            if lines() == 1000:
                break
            await asyncio.sleep(0.01)
        os.kill(first.pid, signal.SIGKILL)
        first.wait()
        await asyncio.sleep(1.1)  # past the restart guard
        sent = 0
        for i in range(50):  # the first send after the death finds the pipe broken
            _record(log, path=b"/second/%d" % i)
            sent += log.flush()
            await asyncio.sleep(0.01)
        restarted = log.writer.proc is not None and log.writer.proc.pid != first.pid
        await log.aclose()
        return lines(), sent, int(restarted)

    total, sent, restarted = asyncio.run(scenario())
    assert restarted == 1
    assert 1000 + sent == total and sent >= 49
    paths = [json.loads(line)["path"] for line in target.read_text().splitlines()]
    assert paths[:1000] == [f"/first/{i}" for i in range(1000)]
    assert all(p.startswith("/second/") for p in paths[1000:])
