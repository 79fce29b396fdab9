#!/usr/bin/env python3
"""Fuzz the upstream response handling: an upstream answers with arbitrary bytes.

    python fuzz/fuzz_response.py [atheris/libFuzzer options] [CORPUS_DIR ...]

A client sends two pipelined GETs; the stub upstream answers the first with the input bytes
on its first connection and answers cleanly on any other. Invariants: fuzz/harness.py's, and
the second request is never answered from the first upstream connection's extra bytes.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from typing import Any

_rig: Any = None


def one_input(data: bytes) -> None:
    global _rig
    from fuzz.harness import EdgeRig, check_response_input

    if _rig is None:
        _rig = EdgeRig("response")
    check_response_input(_rig, data)


def main() -> None:
    import atheris

    # Coverage of Turnout's own code (instrumenting every loaded module is slow to start).
    with atheris.instrument_imports(include=["edge", "flags", "fuzz"]):
        import fuzz.harness  # noqa: F401

    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
