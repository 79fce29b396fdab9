"""WebSocket upgrades, proxied to the same arm a plain request of the unit would reach.

The client side is uvicorn's WebSocket protocol (ASGI `websocket` scope); the upstream side is
the `websockets` library's client. The decision is made before the 101, with the same
identity and snapshot as HTTP; messages are relayed both ways and close codes passed through.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from typing import Any

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

from edge.pipeline import Pipeline, Reject, canonical_path

log = logging.getLogger("turnout.edge.websocket")

DEFAULT_OPEN_TIMEOUT_S = 5.0
MAX_MESSAGE_BYTES = 16 * 1024 * 1024
# Headers the websockets client writes itself, or that are hop-by-hop.
_SKIP = frozenset(
    {
        b"host",
        b"connection",
        b"upgrade",
        b"sec-websocket-key",
        b"sec-websocket-version",
        b"sec-websocket-extensions",
        b"sec-websocket-protocol",
        b"sec-websocket-accept",
        b"origin",
        b"user-agent",
    }
)
# Close codes that must not be sent on the wire (RFC 6455 §7.4.1).
_RESERVED_CLOSE = {1005: 1000, 1006: 1011, 1015: 1011}
# Upstream closes that are not failures (RFC 6455 §7.4.1: normal, going away, no status).
_CLEAN_CLOSE = frozenset({1000, 1001, 1005})
# Issue #10: canary tunnels are asked to reconnect after a rollback with 1012 "Service
# Restart" (IANA WebSocket close code registry), spread over [grace, 1.5 x grace] so the
# clients do not all reconnect in the same instant.
CLOSE_SERVICE_RESTART = 1012
DEFAULT_ROLLBACK_GRACE_S = 5.0


class WebSocketProxy:
    def __init__(
        self,
        pipeline: Pipeline,
        *,
        open_timeout_s: float = DEFAULT_OPEN_TIMEOUT_S,
        rollback_grace_s: float = DEFAULT_ROLLBACK_GRACE_S,
    ) -> None:
        self.pipeline = pipeline
        self.open_timeout_s = open_timeout_s
        self.rollback_grace_s = rollback_grace_s
        # (release, arm) -> one event per open tunnel; setting it closes the tunnel (1012).
        self.tunnels: dict[tuple[str, str], set[asyncio.Event]] = {}

    def shed(self, release: str, arm: str) -> int:
        """Close the arm's open tunnels with 1012 after the grace (a rollback). Returns how
        many were scheduled; new upgrades already follow the new snapshot."""
        tunnels = self.tunnels.get((release, arm), set())
        loop = asyncio.get_running_loop()
        for event in tunnels:
            loop.call_later(self.rollback_grace_s * (1 + random.random() / 2), event.set)
        return len(tunnels)

    async def _refuse(self, send: Any, scope: dict[str, Any], status: int, message: str) -> None:
        if "websocket.http.response" in scope.get("extensions", {}):
            body = f"turnout: {message}\n".encode()
            await send(
                {
                    "type": "websocket.http.response.start",
                    "status": status,
                    "headers": [
                        (b"content-type", b"text/plain"),
                        (b"content-length", b"%d" % len(body)),
                    ],
                }
            )
            await send({"type": "websocket.http.response.body", "body": body})
        else:
            await send({"type": "websocket.close", "code": 1008})

    async def handle(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        pipeline = self.pipeline
        message = await receive()
        if message["type"] != "websocket.connect":
            return
        try:
            path = canonical_path(scope.get("raw_path") or scope["path"].encode("latin-1"))
            kept, host, unit_raw, cookie, email_raw, _, _ = pipeline.request_filter(
                scope["headers"],
                scope.get("http_version", "1.1"),
                scope.get("client"),
                "http",
            )
            rel = pipeline.route(host, path)
            if rel is None:
                await self._refuse(send, scope, 404, "no route for this host and path")
                return
            if rel.maintenance is not None and (
                pipeline.maintenance_response(rel, scope["headers"], unit_raw, cookie, email_raw)
                is not None
            ):  # issue #10: maintenance holds upgrades too; the internal cohort passes
                await self._refuse(send, scope, 503, rel.maintenance.message)
                return
            target, set_cookie = pipeline.upstream_peer(rel, unit_raw, cookie, email_raw)
        except Reject as exc:
            await self._refuse(send, scope, exc.status, exc.message)
            return
        pool = target.pick()
        query = scope.get("query_string", b"")
        uri = f"{'wss' if pool.ssl else 'ws'}://{pool.host}:{pool.port}{path.decode('latin-1')}"
        if query:
            uri += "?" + query.decode("latin-1")
        headers: list[tuple[str, str]] = []
        for i in range(0, len(kept), 4):
            name = kept[i]
            if name in _SKIP:
                continue
            headers.append((name.decode("latin-1"), kept[i + 2].decode("latin-1")))
        extra = target.upstream_headers.decode().strip().split("\r\n")
        headers += [tuple(h.split(": ", 1)) for h in extra]  # type: ignore[misc]
        origin = next((v.decode("latin-1") for n, v in scope["headers"] if n == b"origin"), None)
        subprotocols = [
            p.strip()
            for n, v in scope["headers"]
            if n == b"sec-websocket-protocol"
            for p in v.decode().split(",")
        ]
        try:
            upstream = await connect(
                uri,
                additional_headers=headers,
                subprotocols=subprotocols or None,
                origin=origin,
                open_timeout=self.open_timeout_s,
                max_size=MAX_MESSAGE_BYTES,
                compression=None,
                user_agent_header=None,
                proxy=None,
            )
        except (OSError, TimeoutError, InvalidHandshake, InvalidStatus) as exc:
            pipeline.metrics.error(target.release, target.arm, "websocket")
            log.info("websocket upstream %s failed: %s", uri, exc)
            await self._refuse(
                send,
                scope,
                502,
                f"websocket upstream unavailable (release {target.release}, arm {target.arm})",
            )
            return
        key = (target.release, target.arm)
        pipeline.metrics.websockets[key] = pipeline.metrics.websockets.get(key, 0) + 1
        accept_headers: list[tuple[bytes, bytes]] = []
        if set_cookie is not None:
            accept_headers.append((b"set-cookie", set_cookie))
        if pipeline.expose:
            accept_headers.append((b"x-turnout-arm", target.arm.encode()))
        await send(
            {
                "type": "websocket.accept",
                "subprotocol": upstream.subprotocol,
                "headers": accept_headers,
            }
        )
        shed = asyncio.Event()
        tunnels = self.tunnels.setdefault(key, set())
        tunnels.add(shed)
        metrics = pipeline.metrics
        metrics.websockets_open[key] = len(tunnels)
        try:
            code = await self._relay(upstream, receive, send, shed)
        finally:
            tunnels.discard(shed)
            metrics.websockets_open[key] = len(tunnels)
        if code is not None:
            # A tunnel counts once in the guard's windows, as an error when the upstream
            # closed it with an error code (issue #10: "monitor WebSocket connections").
            failed = code not in _CLEAN_CLOSE
            metrics.arms.record(target.release, target.arm, 500 if failed else 200, None)
            if failed:
                metrics.error(target.release, target.arm, "websocket_close")

    async def _relay(
        self, upstream: ClientConnection, receive: Any, send: Any, shed: asyncio.Event
    ) -> int | None:
        """Relay until either side closes or `shed` is set; the upstream's close code when it
        closed first, else None."""

        async def client_to_upstream() -> None:
            while True:
                message = await receive()
                if message["type"] == "websocket.receive":
                    data = message.get("bytes")
                    await upstream.send(data if data is not None else message.get("text", ""))
                elif message["type"] == "websocket.disconnect":
                    code = message.get("code", 1000)
                    await upstream.close(
                        _RESERVED_CLOSE.get(code, code), message.get("reason", "") or ""
                    )
                    return

        async def upstream_to_client() -> None:
            try:
                async for data in upstream:
                    if isinstance(data, bytes):
                        await send({"type": "websocket.send", "bytes": data})
                    else:
                        await send({"type": "websocket.send", "text": data})
            except ConnectionClosed:
                pass
            code = upstream.close_code if upstream.close_code is not None else 1000
            reason = upstream.close_reason or ""
            with contextlib.suppress(Exception):
                await send(
                    {
                        "type": "websocket.close",
                        "code": _RESERVED_CLOSE.get(code, code),
                        "reason": reason,
                    }
                )

        from_upstream = asyncio.create_task(upstream_to_client())
        tasks = [
            asyncio.create_task(client_to_upstream()),
            from_upstream,
            asyncio.create_task(shed.wait()),
        ]
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            if shed.is_set() and not from_upstream.done():
                with contextlib.suppress(Exception):
                    await send(
                        {
                            "type": "websocket.close",
                            "code": CLOSE_SERVICE_RESTART,
                            "reason": "rolled back: reconnect",
                        }
                    )
                return None
            if from_upstream.done():
                return upstream.close_code if upstream.close_code is not None else 1006
            return None
        finally:
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
            with contextlib.suppress(Exception):
                await upstream.close()
