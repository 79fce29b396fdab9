"""Active health checks: an HTTP GET per upstream every `interval_s`, off the request path.

As nginx Plus `health_check` and Envoy's HTTP health checker: an upstream becomes unhealthy
after `unhealthy_threshold` failed probes in a row and healthy again after
`healthy_threshold` good ones (a probe is good when it answers within `timeout_s` with a
status in `expected_statuses`). Upstreams start healthy, so turning checks on never takes
traffic away before a probe has failed. The request path only reads `healthy`.

Rules of this file: `HealthState` is pure; `HealthChecker` owns the probing tasks and is the
only part that does I/O (one short-lived connection per probe, `Connection: close`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from urllib.parse import urlsplit

log = logging.getLogger("turnout.healthcheck")

DEFAULT_INTERVAL_S = 5.0
DEFAULT_TIMEOUT_S = 2.0
DEFAULT_HEALTHY_THRESHOLD = 2
DEFAULT_UNHEALTHY_THRESHOLD = 3
MAX_STATUS_LINE_BYTES = 1024


@dataclass(frozen=True)
class HealthCheck:
    path: str = "/healthz"
    interval_s: float = DEFAULT_INTERVAL_S
    timeout_s: float = DEFAULT_TIMEOUT_S
    healthy_threshold: int = DEFAULT_HEALTHY_THRESHOLD
    unhealthy_threshold: int = DEFAULT_UNHEALTHY_THRESHOLD
    expected_statuses: tuple[int, int] = (200, 399)  # inclusive range

    def __post_init__(self) -> None:
        if not self.path.startswith("/") or any(c in self.path for c in " \r\n\t#"):
            raise ValueError(f"path: must be an origin-form path, got {self.path!r}")
        if self.interval_s <= 0 or self.timeout_s <= 0:
            raise ValueError("interval_s, timeout_s: must be > 0")
        if self.healthy_threshold < 1 or self.unhealthy_threshold < 1:
            raise ValueError("healthy_threshold, unhealthy_threshold: must be at least 1")


class HealthState:
    """One upstream's health as the probes see it."""

    __slots__ = ("upstream", "check", "healthy", "successes", "failures", "last_error", "probes")

    def __init__(self, upstream: str, check: HealthCheck) -> None:
        self.upstream = upstream
        self.check = check
        self.healthy = True
        self.successes = 0  # consecutive
        self.failures = 0  # consecutive
        self.last_error = ""
        self.probes = 0

    def observe(self, ok: bool, error: str = "") -> bool:
        """Record one probe; True if the health changed."""
        self.probes += 1
        if ok:
            self.failures = 0
            self.successes += 1
            if not self.healthy and self.successes >= self.check.healthy_threshold:
                self.healthy = True
                return True
        else:
            self.successes = 0
            self.failures += 1
            self.last_error = error
            if self.healthy and self.failures >= self.check.unhealthy_threshold:
                self.healthy = False
                return True
        return False

    def snapshot(self) -> dict[str, object]:
        return {
            "upstream": self.upstream,
            "healthy": self.healthy,
            "consecutive_successes": self.successes,
            "consecutive_failures": self.failures,
            "last_error": self.last_error,
            "probes": self.probes,
        }


async def probe(url: str, check: HealthCheck) -> tuple[bool, str]:
    """One GET of `check.path` on `url`: (good, why not)."""
    parts = urlsplit(url)
    host = parts.hostname or "127.0.0.1"
    tls = parts.scheme == "https"
    port = parts.port or (443 if tls else 80)
    authority = parts.netloc.rsplit("@", 1)[-1]
    writer: asyncio.StreamWriter | None = None
    try:
        async with asyncio.timeout(check.timeout_s):
            reader, writer = await asyncio.open_connection(host, port, ssl=tls or None)
            writer.write(
                b"GET "
                + check.path.encode()
                + b" HTTP/1.1\r\nHost: "
                + authority.encode()
                + b"\r\nUser-Agent: turnout-healthcheck\r\nConnection: close\r\n\r\n"
            )
            line = await reader.readuntil(b"\r\n")
    except TimeoutError:
        return False, f"no answer within {check.timeout_s:g} s"
    except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as exc:
        return False, f"{type(exc).__name__}: {exc}"
    finally:
        if writer is not None:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
    parts_line = line[:MAX_STATUS_LINE_BYTES].split(b" ", 2)
    if (
        len(parts_line) < 2
        or not parts_line[0].startswith(b"HTTP/1.")
        or not parts_line[1].isdigit()
    ):
        return False, "not an HTTP/1.x status line"
    status = int(parts_line[1])
    low, high = check.expected_statuses
    if low <= status <= high:
        return True, ""
    return False, f"status {status}"


class HealthChecker:
    """The probing tasks of a set of upstreams (one task per upstream)."""

    def __init__(
        self,
        on_change: Callable[[HealthState], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.on_change = on_change
        self.clock = clock
        self.states: dict[str, HealthState] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}

    def healthy(self, upstream: str) -> bool:
        state = self.states.get(upstream)
        return state is None or state.healthy

    def configure(self, checks: Iterable[tuple[str, HealthCheck]]) -> None:
        """Set the checked upstreams; a kept upstream with the same check keeps its state."""
        wanted = dict(checks)
        for url in list(self.states):
            if url not in wanted or wanted[url] != self.states[url].check:
                del self.states[url]
        for url, check in wanted.items():
            if url not in self.states:
                self.states[url] = HealthState(url, check)

    async def check_once(self, url: str) -> bool:
        """Probe one upstream now; True if its health changed."""
        state = self.states[url]
        ok, error = await probe(url, state.check)
        if self.states.get(url) is not state:
            return False  # reconfigured meanwhile
        changed = state.observe(ok, error)
        if changed:
            log.warning(
                "upstream %s is now %s%s",
                url,
                "healthy" if state.healthy else "unhealthy",
                f" ({error})" if error else "",
            )
            if self.on_change is not None:
                self.on_change(state)
        return changed

    async def check_all(self) -> None:
        await asyncio.gather(*(self.check_once(url) for url in list(self.states)))

    async def _loop(self, url: str) -> None:
        while url in self.states:
            try:
                await self.check_once(url)
            except Exception:  # a bug in one probe must not stop the others; it is logged
                log.exception("health check of %s failed", url)
            state = self.states.get(url)
            if state is None:
                return
            await asyncio.sleep(state.check.interval_s)

    def start(self) -> None:
        """A task per configured upstream (those already running are kept)."""
        for url in self.states:
            task = self._tasks.get(url)
            if task is None or task.done():
                self._tasks[url] = asyncio.get_running_loop().create_task(self._loop(url))
        for url in [u for u in self._tasks if u not in self.states]:
            self._tasks.pop(url).cancel()

    async def aclose(self) -> None:
        tasks = list(self._tasks.values())
        self._tasks.clear()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def report(self) -> list[dict[str, object]]:
        return [state.snapshot() for state in self.states.values()]
