"""The edge fuzzers (fuzz/): every regression input of the checked-in corpus replays through
the harnesses with their invariants (HARDENING §6: no exception escapes, nothing ambiguous
forwarded, one response per request, no upstream's extra bytes served); when atheris is
installed, each harness also runs a short coverage-guided session."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from fuzz.fuzz_request import split
from fuzz.harness import EdgeRig, Violation, check_response_input, check_split_agrees

REPO = Path(__file__).resolve().parents[1]
CORPUS = REPO / "fuzz" / "corpus"
SHORT_RUNS = 2000  # inputs per harness in the test suite (scripts/fuzz runs for a time)


def corpus(name: str) -> list[Path]:
    return sorted(p for p in (CORPUS / name).iterdir() if p.is_file())


@pytest.fixture(scope="module")
def request_rig() -> Iterator[EdgeRig]:
    rig = EdgeRig("request")
    yield rig
    rig.close()


@pytest.fixture(scope="module")
def response_rig() -> Iterator[EdgeRig]:
    rig = EdgeRig("response")
    yield rig
    rig.close()


@pytest.mark.parametrize("path", corpus("request"), ids=lambda p: p.name)
def test_request_corpus(request_rig: EdgeRig, path: Path) -> None:
    """A regression input of the request fuzzer holds every invariant, gets an answer, and
    gets the same answers at once and in pieces."""
    data = path.read_bytes()
    out = request_rig.run([data[1:]])
    assert out.startswith(b"HTTP/1.1 ")
    check_split_agrees(request_rig, data[1:], split(data))


@pytest.mark.parametrize("path", corpus("response"), ids=lambda p: p.name)
def test_response_corpus(response_rig: EdgeRig, path: Path) -> None:
    """A regression input of the response fuzzer holds every invariant."""
    check_response_input(response_rig, path.read_bytes())


def test_harness_catches_a_smuggled_forward(request_rig: EdgeRig) -> None:
    """The invariant checks can fail: two framings in what reaches the upstream is caught."""
    from fuzz.harness import check_forwarded

    with pytest.raises(Violation, match="two framings|Content-Length"):
        check_forwarded(
            b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"0\r\n\r\n"
        )


def test_harness_catches_extra_upstream_bytes_served() -> None:
    """The invariant checks can fail: a second answer that is neither a clean upstream's nor
    Turnout's own error is caught."""
    from fuzz.harness import check_second_answer

    first = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"
    with pytest.raises(Violation, match="extra bytes"):
        check_second_answer(first + b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nevil")
    check_second_answer(first + b"HTTP/1.1 200 OK\r\nX-Clean: 1\r\nContent-Length: 0\r\n\r\n")
    check_second_answer(first + b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\n\r\n")


@pytest.mark.skipif(importlib.util.find_spec("atheris") is None, reason="atheris not installed")
@pytest.mark.parametrize("name", ["request", "response"])
def test_short_fuzz_session(name: str, tmp_path: Path) -> None:
    """A short coverage-guided run of each harness finds no crash (new inputs go to a scratch
    corpus; the checked-in one is only read)."""
    runs = SHORT_RUNS if name == "request" else SHORT_RUNS // 2
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "fuzz" / f"fuzz_{name}.py"),
            f"-runs={runs}",
            "-max_total_time=60",
            f"-artifact_prefix={tmp_path}/",
            str(tmp_path),
            str(CORPUS / name),
        ],
        capture_output=True,
        text=True,
        timeout=110,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Done" in proc.stderr
    assert not list(tmp_path.glob("crash-*"))
