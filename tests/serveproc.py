"""`turnout serve` as a real process for tests and benchmarks, and which process answered.

`ServeProcess` writes a YAML settings file, runs `python -m turnout.cli serve --config FILE`
(with `--workers N`), waits for the admin `/readyz`, and stops it with SIGTERM (SIGKILL
after a bound). `connection_owner()` tells which process holds the server side of a client's
TCP connection by reading /proc (Linux), so a test can see which worker answered without the
edge telling clients anything.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parents[1]
LOOPBACK = "127.0.0.1"
TOKEN = "serveproc-admin-token-0123456789"
COOKIE_SECRET = "serveproc-cookie-secret-0123456789"
START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 30.0
OWNER_WAIT_S = 5.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


def children(pid: int) -> list[int]:
    """The direct children of `pid` (Linux /proc)."""
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(p) for p in text.split()]


def _tcp_inodes(local_port: int, remote_port: int) -> set[str]:
    """Inodes of the sockets whose local port is `local_port` and remote port `remote_port`."""
    found: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                fields = line.split()
                local, remote, inode = fields[1], fields[2], fields[9]
                if (
                    int(local.rsplit(":", 1)[1], 16) == local_port
                    and int(remote.rsplit(":", 1)[1], 16) == remote_port
                ):
                    found.add(inode)
    return found


def connection_owner(
    client: socket.socket, pids: list[int], wait_s: float = OWNER_WAIT_S
) -> int | None:
    """Which of `pids` holds the server end of `client`'s connection (None if none does
    within `wait_s`: a connection sits in the kernel's queue until a worker accepts it)."""
    client_port = client.getsockname()[1]
    server_port = client.getpeername()[1]
    deadline = time.monotonic() + wait_s
    while True:
        links = {f"socket:[{inode}]" for inode in _tcp_inodes(server_port, client_port)}
        for pid in pids:
            with contextlib.suppress(OSError):
                for fd in os.listdir(f"/proc/{pid}/fd"):
                    with contextlib.suppress(OSError):
                        if os.readlink(f"/proc/{pid}/fd/{fd}") in links:
                            return pid
        if time.monotonic() >= deadline:
            return None
        time.sleep(0.005)


class ServeProcess:
    """One `turnout serve` process (a supervisor with its workers, or a single process)."""

    def __init__(self, workdir: Path, *, workers: int | str = 1, **settings: Any) -> None:
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.workers = workers
        self.edge_port = settings.pop("edge_port", None) or free_port()
        self.admin_port = settings.pop("admin_port", None) or free_port()
        self.settings = {
            "edge_host": LOOPBACK,
            "edge_port": self.edge_port,
            "admin_host": LOOPBACK,
            "admin_port": self.admin_port,
            "admin_token": TOKEN,
            "cookie_secret": COOKIE_SECRET,
            "state_dir": str(workdir / "state"),
            "log_level": "info",
            **settings,
        }
        self.config = workdir / "settings.yaml"
        self.config.write_text(yaml.safe_dump(self.settings))
        self.log = workdir / "turnout.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def edge_url(self) -> str:
        return f"http://{LOOPBACK}:{self.edge_port}"

    @property
    def admin_url(self) -> str:
        return f"http://{LOOPBACK}:{self.admin_port}"

    @property
    def auth(self) -> dict[str, str]:
        return {"authorization": f"Bearer {TOKEN}"}

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def argv(self) -> list[str]:
        argv = [sys.executable, "-m", "turnout.cli", "serve", "--config", str(self.config)]
        return [*argv, "--workers", str(self.workers)]

    def start(self) -> ServeProcess:
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                self.argv(), cwd=ROOT, stdout=log, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"turnout exited {self.proc.returncode}: {self.log_text()}")
            if self._ready() and (self.workers == 1 or len(self.worker_pids()) >= 2):
                return self
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"turnout did not start: {self.log_text()}")

    def _ready(self) -> bool:
        with contextlib.suppress(OSError, http.client.HTTPException):
            status, _ = self.admin("GET", "/readyz")
            return status == 200
        return False

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]

    def worker_pids(self) -> list[int]:
        """The edge worker processes (the supervisor itself with workers: 1)."""
        return [self.pid] if self.workers == 1 else children(self.pid)

    def admin(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, bytes]:
        conn = http.client.HTTPConnection(LOOPBACK, self.admin_port, timeout=10)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            response = conn.getresponse()
            return response.status, response.read()
        finally:
            conn.close()

    def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        """Every sample of /metrics: (name, sorted labels) -> value."""
        status, body = self.admin("GET", "/metrics")
        assert status == 200, body
        out: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
        for family in text_string_to_metric_families(body.decode()):
            for sample in family.samples:
                out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
        return out

    def metric_sum(self, name: str, **labels: str) -> float:
        """The sum of `name`'s samples whose labels include `labels`."""
        return sum(
            value
            for (sample, sample_labels), value in self.metrics().items()
            if sample == name and set(labels.items()) <= set(sample_labels)
        )

    def signal(self, sig: int) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)

    def stop(self) -> int | None:
        """SIGTERM, wait (SIGKILL after a bound); the exit status."""
        if self.proc is None:
            return None
        workers = [] if self.workers == 1 else self.worker_pids()
        self.signal(signal.SIGTERM)
        try:
            self.proc.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        for pid in workers:  # never leave a worker behind, even when the test failed
            with contextlib.suppress(OSError):
                if b"turnout.edgeworker" in Path(f"/proc/{pid}/cmdline").read_bytes():
                    os.kill(pid, signal.SIGKILL)
        return self.proc.returncode
