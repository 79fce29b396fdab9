"""SIGHUP (issue #12 point 7) on a real `turnout serve`, with one process and with two
workers: the settings file is read again; what can change live does (shown here by the
client connection cap taking effect), every other change is named in one log line as
waiting for a restart, a bad file changes nothing, and the seed is only written to an
empty store."""

from __future__ import annotations

import json
import signal
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness import ThreadedServer, backends, release_doc, wait_until
from tests.serveproc import LOOPBACK, ServeProcess

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def up() -> Iterator[dict[str, ThreadedServer]]:
    with backends("stable", "canary") as servers:
        yield servers


def refused_at_cap(proc: ServeProcess) -> bool:
    """With one connection held open, is a second one answered 503 at once?"""
    with socket.create_connection((LOOPBACK, proc.edge_port), timeout=5) as held:
        held.sendall(b"GET / HTTP/1.1\r\nHost: a\r\nX-User-Id: u1\r\n\r\n")
        assert held.recv(65536).startswith(b"HTTP/1.1 200 ")
        with socket.create_connection((LOOPBACK, proc.edge_port), timeout=5) as extra:
            extra.sendall(b"GET / HTTP/1.1\r\nHost: a\r\nX-User-Id: u2\r\n\r\n")
            return extra.recv(65536).startswith(b"HTTP/1.1 503 ")


@pytest.mark.parametrize("workers", [1, 2], ids=["one-process", "two-workers"])
def test_sighup_applies_live_settings_and_names_the_rest(
    tmp_path: Path, up: dict[str, ThreadedServer], workers: int
) -> None:
    seed = release_doc(up["stable"].url, up["canary"].url, stage="ga")
    proc = ServeProcess(tmp_path, workers=workers, seed=seed, access_log="off").start()
    try:
        assert not refused_at_cap(proc)
        edited = {
            **proc.settings,
            "max_client_connections": 1,
            "admin_port": proc.admin_port + 1,  # needs a restart: named, not applied
            "seed": release_doc(up["stable"].url, up["canary"].url, stage="off"),
        }
        proc.config.write_text(json.dumps(edited))
        proc.proc.send_signal(signal.SIGHUP)  # type: ignore[union-attr]
        assert wait_until(lambda: "SIGHUP: max_client_connections applied" in proc.log_text(), 10)
        log = proc.log_text()
        assert "SIGHUP: admin_port changed; not applied live, restart Turnout to apply it" in log
        assert "the seed is only written to an empty store" in log
        if workers == 1:
            assert refused_at_cap(proc)
        else:  # each worker holds its own connections: one per worker is allowed
            assert wait_until(
                lambda: proc.log_text().count("settings from SIGHUP applied") == 2, 10
            )
        assert proc.admin("GET", "/readyz")[0] == 200  # the admin port did not move

        proc.config.write_text("max_client_connections: [not, a, number]\n")
        proc.proc.send_signal(signal.SIGHUP)  # type: ignore[union-attr]
        assert wait_until(lambda: "settings not reloaded, nothing changed" in proc.log_text(), 10)
        assert proc.proc.poll() is None  # type: ignore[union-attr]
    finally:
        proc.stop()
