#!/usr/bin/env python3
"""Fuzz the front-end's request handling: bytes from a client, fed to the protocol object.

    python fuzz/fuzz_request.py [atheris/libFuzzer options] [CORPUS_DIR ...]

The first input byte chooses how the rest is split into `data_received` calls (all at once,
or in pieces of 1-16 bytes); split inputs also run at once, and both must get the same
answers (a parser must agree with itself however bytes arrive; h11's afl harness checks the
same). The other invariants are fuzz/harness.py's.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from typing import Any

_rig: Any = None


def split(data: bytes) -> list[bytes]:
    """Byte 0 picks the piece size (0: all at once); the rest is the client's bytes."""
    if not data:
        return []
    size, body = data[0] % 17, data[1:]
    if size == 0:
        return [body]
    return [body[i : i + size] for i in range(0, len(body), size)]


def one_input(data: bytes) -> None:
    global _rig
    from fuzz.harness import EdgeRig, check_split_agrees

    if _rig is None:
        _rig = EdgeRig("request")
    pieces = split(data)
    if len(pieces) > 1:
        check_split_agrees(_rig, data[1:], pieces)
    else:
        _rig.run(pieces)


def main() -> None:
    import atheris

    # Coverage of Turnout's own code (instrumenting every loaded module is slow to start).
    with atheris.instrument_imports(include=["edge", "flags", "fuzz"]):
        import fuzz.harness  # noqa: F401

    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
