"""The edge's access log: one line per finished exchange, as nginx, Envoy and HAProxy write.

Rules of this file (issue #13):
* The request path only appends one tuple to a list (`record`): no formatting, no hashing,
  no I/O, no allocation beyond the tuple. A timer every `flush_interval_s` (100 ms) formats
  the batch and writes it in one call; a batch that reaches `max_batch` lines is flushed at
  the next turn of the event loop (`call_soon`), never inside the request.
* Lines are JSON objects (`log_format: json`, the default for machines) or a human line in
  the spirit of nginx's combined format. Fields: time (RFC 3339 UTC, ms), method, host,
  path (never the query: it may carry tokens, RFC 6750 §5.3), status, bytes (response body
  bytes sent), duration_ms, release, arm, upstream, unit.
* The unit id is a secret-ish identifier (a user id): by default it is written as a keyed
  digest (BLAKE2b, 8 bytes, keyed from the cookie secret so a fleet agrees and nobody can
  reverse it by hashing guesses without the key), or omitted (`access_log_unit_id: omit`).
* Every string that came from a client is escaped for the human format (control characters
  cannot forge a line); JSON escapes them by construction.
* A failing sink (disk full, closed pipe) drops the batch and counts it; it never raises
  into the server.
* Whole lines per `write` (issue #13, `workers: N`): every edge worker writes its own lines
  to the same stdout, stderr or file (opened in append mode by each worker). A sink with a
  file descriptor gets `os.write` calls of whole lines, each at most `PIPE_BUF` bytes (lines
  are capped to fit), so lines of different workers never interleave mid-line: POSIX makes a
  pipe write of up to `PIPE_BUF` bytes atomic, and O_APPEND writes to a file land whole.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import marshal
import os
import re
import select
import stat
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

import orjson

if TYPE_CHECKING:
    from edge.targets import Target
    from edge.upstream import UpstreamPool

log = logging.getLogger("turnout.accesslog")

DEFAULT_FLUSH_INTERVAL_S = 0.1
# Batches waiting for a writer process that is behind are kept up to this many bytes, then
# dropped (and counted): the edge never waits for its log.
MAX_PIPE_BUFFER_BYTES = 16 * 1024 * 1024
WRITER_RESTART_S = 1.0  # a writer that died is started again at most this often
WRITER_EXIT_S = 5.0  # on shutdown, how long the writer may take to write what it has
_FRAME = struct.Struct("<I")
# A full batch is formatted in one go on the loop: 512 lines are about 1 ms of work, so a
# flush never holds other requests back for longer (4,096 made a 20 ms p99, issue #13).
DEFAULT_MAX_BATCH = 512
UNIT_DIGEST_BYTES = 8
MAX_CACHED_DIGESTS = 65_536  # returning users are the common case; the cache is bounded
MAX_FIELD_CHARS = 2048
UNIT_HASH = "hash"
UNIT_OMIT = "omit"
FORMAT_JSON = "json"
FORMAT_HUMAN = "human"
# The largest write POSIX keeps whole on a pipe (4096 on Linux); a line never exceeds it.
LINE_MAX_BYTES = select.PIPE_BUF
# A write to a regular file opened O_APPEND lands whole (Linux holds the inode lock for the
# whole write), so a file sink gets runs of whole lines up to this size per write.
FILE_WRITE_BYTES = 1 << 16
MAX_CACHED_FRAGMENTS = 1024  # (method, host) and (arm, upstream) pairs seen; cleared when full
# Bytes that need no JSON escaping: printable ASCII except `"` and `\`. A path made only of
# these (nearly every path) is copied into the line as it is; anything else goes through orjson.
_JSON_UNSAFE = re.compile(rb"[^\x20\x21\x23-\x5b\x5d-\x7e]")
_LINE = b'{"time":"%s",%s"path":"%s","status":%d,"bytes":%d,"duration_ms":%.3f,%s%s}\n'
SHORT_FIELD_CHARS = 256  # a line over LINE_MAX_BYTES is formatted again with these limits

# (epoch seconds, method, Host (as received), canonical path, status, body bytes, duration s,
#  (release, arm) of the target, "host:port" of the upstream that answered, unit id): what the
#  request path already holds (`Target.log_label`, `UpstreamPool.label`), nothing built for the
#  log, and only values `marshal` can carry to the writer process.
Entry = tuple[
    float,
    str,
    "bytes | None",
    bytes,
    int,
    int,
    float,
    "tuple[str, str] | None",
    "str | None",
    "str | None",
]


class _Stamps:
    """RFC 3339 UTC times with milliseconds; the seconds part is formatted once per second
    (strftime is most of a line's cost otherwise)."""

    __slots__ = ("_second", "_prefix", "_prefix_bytes", "_last_ms", "_last")

    def __init__(self) -> None:
        self._second = -1
        self._prefix = ""
        self._prefix_bytes = b""
        self._last_ms = -1
        self._last = b""

    def _at(self, second: int) -> None:
        self._second = second
        self._prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        self._prefix_bytes = self._prefix.encode()

    def __call__(self, epoch_s: float) -> str:
        second, ms = divmod(int(epoch_s * 1000), 1000)
        if second != self._second:
            self._at(second)
        return self._prefix + _MILLIS[ms]

    def encoded(self, epoch_s: float) -> bytes:
        total_ms = int(epoch_s * 1000)
        if total_ms == self._last_ms:  # a busy edge logs many lines per millisecond
            return self._last
        second, ms = divmod(total_ms, 1000)
        if second != self._second:
            self._at(second)
        self._last_ms = total_ms
        self._last = stamp = self._prefix_bytes + _MILLIS_BYTES[ms]
        return stamp


_MILLIS = [f".{ms:03d}Z" for ms in range(1000)]
_MILLIS_BYTES = [m.encode() for m in _MILLIS]


def _printable(text: str) -> str:
    text = text[:MAX_FIELD_CHARS]
    if text.isprintable() and " " not in text:
        return text
    return "".join(
        c if c.isprintable() and c != " " else f"\\x{ord(c):02x}" if ord(c) <= 0xFF else "?"
        for c in text
    )


class AccessLog:
    """Collects finished exchanges on the request path; formats and writes them in batches."""

    def __init__(
        self,
        sink: BinaryIO | None,
        *,
        fmt: str = FORMAT_JSON,
        unit_id: str = UNIT_HASH,
        unit_key: bytes = b"",
        flush_interval_s: float = DEFAULT_FLUSH_INTERVAL_S,
        max_batch: int = DEFAULT_MAX_BATCH,
        clock: Callable[[], float] = time.time,
        writer: WriterProcess | None = None,
    ) -> None:
        if fmt not in (FORMAT_JSON, FORMAT_HUMAN):
            raise ValueError(f"access log format must be json or human, got {fmt!r}")
        if unit_id not in (UNIT_HASH, UNIT_OMIT):
            raise ValueError(f"access_log_unit_id must be hash or omit, got {unit_id!r}")
        self.sink = sink
        self.human = fmt == FORMAT_HUMAN
        self.hash_units = unit_id == UNIT_HASH
        # A key of its own, derived from the given secret (never the secret itself).
        self._key = hashlib.blake2b(unit_key, digest_size=32, person=b"turnout-access").digest()
        self.flush_interval_s = flush_interval_s
        self.max_batch = max_batch
        self.clock = clock
        self.pending: list[Entry] = []
        self.dropped_lines = 0
        self.written_lines = 0
        self._stamp = _Stamps()
        self._digests: dict[str, str] = {}  # unit -> digest, cleared when it grows large
        # Pieces of the JSON line that repeat from request to request, encoded once each:
        # `"method":…,"host":…,` per (method, Host); `"release":…,"arm":…,"upstream":…` per
        # (arm, upstream pool); `,"unit":"…"` per unit id.
        self._heads: dict[tuple[str, bytes | None], bytes] = {}
        self._arms: dict[tuple[tuple[str, str] | None, str | None], bytes] = {}
        self._units: dict[str, bytes] = {}
        self._write_bytes = LINE_MAX_BYTES
        try:
            if sink is not None and stat.S_ISREG(os.fstat(sink.fileno()).st_mode):
                self._write_bytes = FILE_WRITE_BYTES
        except (OSError, ValueError, AttributeError):
            pass
        self._timer: asyncio.Task[None] | None = None
        self._flush_scheduled = False
        self._owns_sink = False
        # The writer process that formats and writes the batches (edge/logwriter.py); None:
        # this process formats and writes them to `sink` itself.
        self.writer = writer

    @classmethod
    def open(
        cls,
        destination: str,
        *,
        fmt: str,
        unit_id: str,
        unit_key: bytes,
        in_process: bool = False,
    ) -> AccessLog | None:
        """The access log the `access_log` setting names: "stdout", "stderr", a file path
        (appended to), or "off" (None). Its lines are formatted and written by a writer
        process (edge/logwriter.py), or by this process with `in_process`. A file that
        cannot be opened is an `OSError` here, at start-up."""
        if destination == "off":
            return None
        if destination == "stdout":
            sink: BinaryIO = sys.stdout.buffer
        elif destination == "stderr":
            sink = sys.stderr.buffer
        else:
            sink = Path(destination).open("ab")
        if not in_process:
            if destination not in ("stdout", "stderr"):
                sink.close()  # opened to check it can be; the writer opens it for itself
            config = {
                "destination": destination,
                "format": fmt,
                "unit_id": unit_id,
                "unit_key": unit_key.hex(),
            }
            writer = WriterProcess(orjson.dumps(config))
            return cls(None, fmt=fmt, unit_id=unit_id, unit_key=unit_key, writer=writer)
        log = cls(sink, fmt=fmt, unit_id=unit_id, unit_key=unit_key)
        log._owns_sink = destination not in ("stdout", "stderr")
        return log

    # -- the request path ----------------------------------------------------------------------

    def record(
        self,
        method: str,
        host: bytes | None,
        path: bytes,
        status: int,
        body_bytes: int,
        duration_s: float,
        target: Target | None,
        upstream: UpstreamPool | None,
        unit: str | None,
    ) -> None:
        """One finished exchange: a tuple appended, nothing else (flushes are scheduled)."""
        pending = self.pending
        pending.append(
            (
                self.clock(),
                method,
                host,
                path,
                status,
                body_bytes,
                duration_s,
                target.log_label if target is not None else None,
                upstream.label if upstream is not None else None,
                unit,
            )
        )
        if len(pending) >= self.max_batch and not self._flush_scheduled:
            self._flush_scheduled = True
            try:
                asyncio.get_running_loop().call_soon(self.flush)
            except RuntimeError:  # no loop (a synchronous caller): flush right away
                self.flush()

    # -- off the request path ------------------------------------------------------------------

    def unit_digest(self, unit: str) -> str:
        digest = self._digests.get(unit)
        if digest is None:
            if len(self._digests) >= MAX_CACHED_DIGESTS:
                self._digests.clear()
            digest = hashlib.blake2b(
                unit.encode("utf-8", "surrogatepass"), digest_size=UNIT_DIGEST_BYTES, key=self._key
            ).hexdigest()
            self._digests[unit] = digest
        return digest

    def format(self, entry: Entry) -> bytes:
        """One line (with its newline) for one exchange, at most `LINE_MAX_BYTES` long."""
        line = self._format(entry, MAX_FIELD_CHARS) if self.human else self._json(entry)
        if len(line) > LINE_MAX_BYTES:  # a pathological host or path: shortened, still one line
            line = self._format(entry, SHORT_FIELD_CHARS)
        return line

    def _json(self, entry: Entry) -> bytes:
        """The JSON line from cached pieces and one bytes `%` (about 1 µs; building a dict
        for orjson was most of the access log's cost). Same fields, same order as
        `_format`, which stays the reference and the path for oversized fields."""
        stamp, method, raw_host, raw_path, status, size, duration, target, peer, unit = entry
        head = self._heads.get((method, raw_host))
        if head is None:
            head = self._head(method, raw_host)
        arm = self._arms.get((target, peer))
        if arm is None:
            arm = self._arm(target, peer)
        if unit is None or not self.hash_units:
            tail = b""
        else:
            tail = self._units.get(unit) or self._unit(unit)
        if len(raw_path) > MAX_FIELD_CHARS or _JSON_UNSAFE.search(raw_path) is not None:
            path = orjson.dumps(raw_path.decode("utf-8", "replace")[:MAX_FIELD_CHARS])[1:-1]
        else:
            path = raw_path
        return _LINE % (
            self._stamp.encoded(stamp),
            head,
            path,
            status,
            size,
            duration * 1000,
            arm,
            tail,
        )

    def _head(self, method: str, raw_host: bytes | None) -> bytes:
        heads = self._heads
        if len(heads) >= MAX_CACHED_FRAGMENTS:
            heads.clear()
        host = raw_host.decode("latin-1")[:MAX_FIELD_CHARS] if raw_host is not None else ""
        head = b'"method":%s,"host":%s,' % (
            orjson.dumps(method[:MAX_FIELD_CHARS]),
            orjson.dumps(host),
        )
        heads[(method, raw_host)] = head
        return head

    def _arm(self, target: tuple[str, str] | None, peer: str | None) -> bytes:
        arms = self._arms
        if len(arms) >= MAX_CACHED_FRAGMENTS:
            arms.clear()
        release, arm = target if target is not None else (None, None)
        fragment = b'"release":%s,"arm":%s,"upstream":%s' % (
            orjson.dumps(release or None),
            orjson.dumps(arm or None),
            orjson.dumps(peer or None),
        )
        arms[(target, peer)] = fragment
        return fragment

    def _unit(self, unit: str) -> bytes:
        units = self._units
        if len(units) >= MAX_CACHED_DIGESTS:
            units.clear()
        fragment = b',"unit":"%s"' % self.unit_digest(unit).encode()
        units[unit] = fragment
        return fragment

    def _format(self, entry: Entry, max_chars: int) -> bytes:
        stamp, method, raw_host, raw_path, status, size, duration, target, peer, unit = entry
        host = raw_host.decode("latin-1")[:max_chars] if raw_host is not None else ""
        path = raw_path.decode("utf-8", "replace")[:max_chars]
        method = method[:max_chars]
        release, arm = target if target is not None else ("", "")
        upstream = peer or ""
        if unit is not None:
            unit = self.unit_digest(unit) if self.hash_units else None
        if self.human:
            duration_ms = round(duration * 1000, 3)
            return (
                f"{self._stamp(stamp)} {_printable(method)} {_printable(host) or '-'}"
                f"{_printable(path)} {status} {size} {duration_ms}ms "
                f"{release or '-'}/{arm or '-'} {upstream or '-'} unit={unit or '-'}\n"
            ).encode("utf-8", "replace")
        record = {
            "time": self._stamp(stamp),
            "method": method,
            "host": host,
            "path": path[:MAX_FIELD_CHARS],
            "status": status,
            "bytes": size,
            "duration_ms": round(duration * 1000, 3),
            "release": release or None,
            "arm": arm or None,
            "upstream": upstream or None,
        }
        if unit is not None:
            record["unit"] = unit
        return orjson.dumps(record, option=orjson.OPT_APPEND_NEWLINE)

    def flush(self) -> int:
        """Format and write everything pending in one write; the number of lines written."""
        self._flush_scheduled = False
        batch, self.pending = self.pending, []
        if not batch:
            return 0
        writer = self.writer
        if writer is not None:  # one marshal (C) and one pipe write; formatted elsewhere
            if writer.send(batch):
                self.written_lines += len(batch)
                return len(batch)
            self.dropped_lines += len(batch)
            return 0
        lines = [self.format(entry) for entry in batch]
        try:
            self._write(lines)
        except (OSError, ValueError):  # a full disk or a closed pipe: drop, never raise
            self.dropped_lines += len(batch)
            return 0
        self.written_lines += len(batch)
        return len(batch)

    def _write(self, lines: list[bytes]) -> None:
        """The lines in as few writes as possible, each a run of whole lines of at most
        `LINE_MAX_BYTES` (see the rules above); a sink without a descriptor (a test's
        buffer) gets one write."""
        sink = self.sink
        assert sink is not None  # in-process logs have a sink
        try:
            fd = sink.fileno()
        except (OSError, ValueError, AttributeError):
            sink.write(b"".join(lines))
            sink.flush()
            return
        sink.flush()  # whatever the process wrote through the buffered object goes first
        limit = self._write_bytes
        data = b"".join(lines)
        if len(data) <= limit:  # the common case: the whole batch in one write
            _write_all(fd, data)
            return
        chunk: list[bytes] = []
        size = 0
        for line in lines:
            if size + len(line) > limit and chunk:
                _write_all(fd, b"".join(chunk))
                chunk, size = [], 0
            chunk.append(line)
            size += len(line)
        if chunk:
            _write_all(fd, b"".join(chunk))

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.flush_interval_s)
            self.flush()

    def start(self) -> None:
        """Start the flush timer on the running loop."""
        if self._timer is None:
            self._timer = asyncio.get_running_loop().create_task(
                self._run(), name="turnout-access-log"
            )

    async def aclose(self) -> None:
        """Stop the timer and write what is left."""
        if self._timer is not None:
            self._timer.cancel()
            try:
                await self._timer
            except asyncio.CancelledError:
                pass
            self._timer = None
        self.flush()
        if self.writer is not None:
            await self.writer.aclose()
        if self._owns_sink and self.sink is not None:
            try:
                self.sink.close()
            except OSError:
                pass


def _write_all(fd: int, data: bytes) -> None:
    # A blocking descriptor writes up to PIPE_BUF bytes whole; the loop is for a signal's
    # short write on a regular file.
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


class WriterProcess:
    """The pipe to the access log's writer process (edge/logwriter.py), never blocking the
    loop: batches go out through a non-blocking pipe, what the pipe cannot take at once waits
    in a bounded buffer drained when the pipe is writable, and past the bound batches are
    dropped and counted. A writer that dies is started again (at most once a second); the
    batches in flight to it are lost and counted."""

    def __init__(self, config: bytes) -> None:
        self.config = config
        self.proc: subprocess.Popen[bytes] | None = None
        self.fd = -1
        self.buffer = bytearray()
        self.watching: asyncio.AbstractEventLoop | None = None
        self.started_at = 0.0
        self.restarts = 0
        self.spawn()

    def spawn(self) -> bool:
        now = time.monotonic()
        if self.proc is not None and now - self.started_at < WRITER_RESTART_S:
            return False
        if self.proc is not None:
            self.restarts += 1
            log.warning("access log writer (pid %d) exited; starting a new one", self.proc.pid)
            self._close_pipe()
        self.started_at = now
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "edge.logwriter"], stdin=subprocess.PIPE, close_fds=True
        )
        assert self.proc.stdin is not None
        self.fd = self.proc.stdin.fileno()
        os.set_blocking(self.fd, False)
        self.buffer = bytearray()
        self._frame(self.config)
        return True

    def send(self, batch: list[Entry]) -> bool:
        """Queue one batch for the writer; False when it had to be dropped."""
        if self.fd < 0 and not self.spawn():
            return False
        if len(self.buffer) > MAX_PIPE_BUFFER_BYTES:
            return False  # the writer is far behind: the edge does not wait for its log
        return self._frame(marshal.dumps(batch))

    def _frame(self, payload: bytes) -> bool:
        self.buffer += _FRAME.pack(len(payload))
        self.buffer += payload
        return self._drain()

    def _drain(self) -> bool:
        buffer = self.buffer
        while buffer:
            try:
                written = os.write(self.fd, buffer)
            except BlockingIOError:
                self._watch(True)
                return True
            except OSError:  # the writer is gone (EPIPE): what it had not read is lost
                self._watch(False)
                self._close_pipe()
                return False
            del buffer[:written]
        self._watch(False)
        return True

    def _watch(self, on: bool) -> None:
        if on and self.watching is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:  # no loop (start-up, a synchronous caller): wait here
                os.set_blocking(self.fd, True)
                try:
                    os.write(self.fd, bytes(self.buffer))
                    self.buffer.clear()
                except OSError:
                    self._close_pipe()
                    return
                os.set_blocking(self.fd, False)
                return
            loop.add_writer(self.fd, self._drain)
            self.watching = loop
        elif not on and self.watching is not None:
            self.watching.remove_writer(self.fd)
            self.watching = None

    def _close_pipe(self) -> None:
        if self.watching is not None:
            self.watching.remove_writer(self.fd)
            self.watching = None
        if self.proc is not None and self.proc.stdin is not None:
            try:
                self.proc.stdin.close()
            except OSError:
                pass
        self.fd = -1
        self.buffer = bytearray()

    async def aclose(self) -> None:
        """Hand over what is buffered, close the pipe (the writer flushes and exits at EOF)
        and wait for it, up to WRITER_EXIT_S; then it is killed."""
        proc = self.proc
        if proc is None:
            return
        deadline = time.monotonic() + WRITER_EXIT_S
        while self.buffer and self.fd >= 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.01)  # the loop's writer callback drains the pipe
        self._close_pipe()
        while proc.poll() is None and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        if proc.poll() is None:
            log.warning("access log writer (pid %d) did not exit; killing it", proc.pid)
            proc.kill()
            proc.wait()
        self.proc = None
