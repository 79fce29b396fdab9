"""The access log's writer process: formats and writes what an edge process recorded.

    python -m edge.logwriter      (started by edge/accesslog.py, never by hand)

Why a process (issue #13, "written off the request path"): formatting a line (the keyed
unit digest, JSON escaping) costs several µs of Python per request, 10-15 % of a request's
CPU on one core. nginx writes its log in the worker in C; Envoy formats on a flush thread;
a Python thread would hold the same GIL as the event loop. So the edge process only
appends a tuple per request and, per batch, hands the batch to `marshal` (C) and one pipe
write; this process, on another core when there is one, turns batches into lines with
`AccessLog.flush` (the same formats, digests and whole-line write rules as in-process).

Protocol on stdin: frames of a 4-byte little-endian length and a payload. The first
payload is the JSON configuration (destination, format, unit-id mode, the digest key); every
later one is a `marshal`led list of `Entry` tuples. At EOF (the edge closed the pipe, or
died) the writer flushes and exits. SIGINT is ignored (a Ctrl-C to the process group must
not lose the lines the edge flushes while it shuts down).
"""

from __future__ import annotations

import marshal
import signal
import struct
import sys
from pathlib import Path
from typing import BinaryIO

import orjson

from edge.accesslog import AccessLog

_LENGTH = struct.Struct("<I")


def read_frame(stream: BinaryIO) -> bytes | None:
    head = stream.read(_LENGTH.size)
    if len(head) < _LENGTH.size:
        return None
    (size,) = _LENGTH.unpack(head)
    payload = stream.read(size)
    return payload if len(payload) == size else None


def main() -> int:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    stdin = sys.stdin.buffer
    first = read_frame(stdin)
    if first is None:
        return 0
    config = orjson.loads(first)
    destination = config["destination"]
    if destination == "stdout":
        sink: BinaryIO = sys.stdout.buffer
    elif destination == "stderr":
        sink = sys.stderr.buffer
    else:
        sink = Path(destination).open("ab")
    log = AccessLog(
        sink,
        fmt=config["format"],
        unit_id=config["unit_id"],
        unit_key=bytes.fromhex(config["unit_key"]),
    )
    while True:
        frame = read_frame(stdin)
        if frame is None:
            break
        # The only peer is the edge process that started this one, over its private pipe.
        log.pending = marshal.loads(frame)  # noqa: S302
        log.flush()
    log.flush()
    if destination not in ("stdout", "stderr"):
        sink.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
