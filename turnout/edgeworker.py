"""One edge worker process of `turnout serve --workers N` (started by turnout/workers.py).

    python -m turnout.edgeworker --worker K --control-fd FD   (settings as JSON on stdin)

Rules of this file:
* The worker runs only the data plane: its own listening socket (SO_REUSEPORT, shared with
  the other workers), its own store client, watcher and snapshot. No admin listener, no seed:
  the supervisor did both before starting it.
* Settings arrive on stdin, not in argv or the environment, so the cookie secret and admin
  token never show in `ps` or /proc/PID/environ; every worker gets the same secret and thus
  signs and checks the same cookies.
* The control socket (a Unix socketpair with the supervisor) carries one JSON line per
  message, worker -> supervisor only: `{"ready": pid}` once listening, then
  `{"metrics": snapshot, "arms": rows}` every METRICS_PUSH_INTERVAL_S and after each applied
  config; `arms` are the guard's per-arm counts since the previous push (edge/armstats.py
  `take`), judged by the one guard runner in the supervisor (turnout/workers.py).
  End of file on it means the supervisor is gone: the worker drains and exits.
* SIGTERM / SIGINT drain: stop accepting, finish requests in flight within the graceful
  deadline, exit 0.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
from typing import Any

import orjson

from edge.app import Edge
from edge.frontend import EdgeServer
from edge.listener import bind_listener
from edge.metricsnapshot import take_snapshot
from flags.errors import ConfigError
from stores.settings import Settings
from stores.watch import ConfigWatcher
from turnout.server import edge_server, install_event_loop_policy, make_store
from turnout.startup import configure_logging

log = logging.getLogger("turnout.worker")

# Push, not pull: a scrape then never waits on a worker (one that is busy, stuck or dead
# answers nothing, and the supervisor's admin loop must not block on it), the request path
# is untouched (the push is a timer on the worker's loop: one serialisation and one write per
# second), and the supervisor always holds a last snapshot to keep when a worker dies. The
# price is that the summed counters may be up to this old when scraped; a new config version
# is pushed at once, so `turnout_config_version{worker}` is current.
METRICS_PUSH_INTERVAL_S = 1.0
EXIT_CANNOT_LISTEN = 3
EXIT_BAD_SETTINGS = 4


def settings_payload(settings: Settings) -> bytes:
    """The settings as JSON, secrets included (for the worker's stdin only)."""
    data: dict[str, Any] = {}
    for name, value in settings.model_dump().items():
        if hasattr(value, "get_secret_value"):
            value = value.get_secret_value()
        data[name] = value
    return orjson.dumps(data)


class ControlChannel:
    """The worker's end of the socketpair to its supervisor."""

    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self.writer = writer

    def send(self, message: dict[str, Any]) -> None:
        if self.writer.is_closing():
            return
        self.writer.write(orjson.dumps(message) + b"\n")


async def run_worker(settings: Settings, worker: int, control_fd: int, workers: int = 1) -> int:
    try:
        sock = bind_listener(settings.edge_host, settings.edge_port, reuse_port=True, listen=False)
    except OSError as exc:
        log.error("worker %d: %s", worker, exc.strerror or exc)
        return EXIT_CANNOT_LISTEN
    store = make_store(settings)
    watcher = ConfigWatcher(
        store, bootstrap_path=settings.bootstrap_file, poll_interval_s=settings.poll_interval_s
    )
    await watcher.start()
    edge = Edge(settings, watcher, None)
    edge.start_rate_sync(store, workers)  # issue #12: in every worker
    server = edge_server(edge, settings)
    assert isinstance(server, EdgeServer), "workers run the native front-end only"
    server.sock = sock
    control_sock = socket.socket(fileno=control_fd)
    reader, writer = await asyncio.open_unix_connection(sock=control_sock)
    channel = ControlChannel(writer)

    def push(*_: Any) -> None:
        snapshot = take_snapshot(edge.metrics, watcher)
        channel.send({"metrics": snapshot, "arms": edge.metrics.arms.take()})

    watcher.listeners.append(push)  # a new version is visible in /metrics at once

    def stop() -> None:
        edge.ofrep.close()  # OFREP SSE streams end now rather than at the graceful deadline
        server.should_exit = True

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop)

    async def pusher() -> None:
        while True:
            await asyncio.sleep(METRICS_PUSH_INTERVAL_S)
            push()

    async def orphan_watch() -> None:
        # The supervisor holds the other end; EOF means it exited (even by SIGKILL). It also
        # sends the live part of the settings it read again on SIGHUP (turnout/workers.py).
        while line := await reader.readline():
            try:
                message = orjson.loads(line)
                if "settings" in message:
                    new = Settings(**message["settings"])
                    if new.log_level != settings.log_level or new.log_format != settings.log_format:
                        configure_logging(new, worker=worker)
                    edge.apply_live_settings(new, server)
                    log.info("worker %d: settings from SIGHUP applied", worker)
            except (ValueError, ConfigError) as exc:
                log.warning("worker %d: bad message from supervisor: %s", worker, exc)
        log.warning("worker %d: supervisor gone; draining and exiting", worker)
        stop()

    async def announce() -> None:
        while not server.started:
            await asyncio.sleep(0.01)
        push()
        channel.send({"ready": os.getpid()})

    tasks = [
        asyncio.create_task(pusher()),
        asyncio.create_task(orphan_watch()),
        asyncio.create_task(announce()),
    ]
    try:
        await server.serve()
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        push()  # the final counts, so the supervisor keeps them
        with contextlib.suppress(OSError, ConnectionError):
            await writer.drain()
        writer.close()
        await edge.stop_rate_sync()  # shares the store's Redis pool: before it closes
        await watcher.stop()
        await edge.aclose()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="turnout-worker", description=__doc__)
    parser.add_argument("--worker", type=int, required=True)
    parser.add_argument("--control-fd", type=int, required=True)
    # How many workers share the port (rate limits without a fleet sync: 1/N each).
    parser.add_argument("--of", type=int, default=1)
    args = parser.parse_args(argv)
    try:
        settings = Settings(**orjson.loads(sys.stdin.buffer.read()))
    except (ValueError, ConfigError) as exc:
        print(f"turnout worker {args.worker}: bad settings from supervisor: {exc}", file=sys.stderr)
        return EXIT_BAD_SETTINGS
    # The same log format and level as the supervisor (log_format), tagged with the worker.
    configure_logging(settings, worker=args.worker)
    install_event_loop_policy()
    return asyncio.run(run_worker(settings, args.worker, args.control_fd, args.of))


if __name__ == "__main__":
    sys.exit(main())
