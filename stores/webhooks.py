"""Webhooks for rollout events: signed JSON POSTs, retried with backoff, never in the way.

Rules of this file:
* `notify` (called from the event bus, so right after a rollback) only puts the event on a
  bounded queue and returns: a receiver that hangs, refuses or answers 500 can never delay a
  rollback or the request path. A full queue drops the event and counts it.
* One worker task delivers, each URL in turn, with a timeout per attempt, exponential backoff
  (0.5 s, 1 s, 2 s ... capped at 10 s) and two bounds: `max_attempts` and `deadline_s` per
  delivery. 2xx is success; 4xx other than 408/429 is final (the receiver refuses it).
* Signature as GitHub and Stripe do it: `X-Turnout-Signature: sha256=<hex HMAC-SHA256 of
  "<timestamp>.<body>">` with `X-Turnout-Timestamp`, so a receiver can check authenticity
  and refuse replays. `X-Turnout-Event` names the kind, `X-Turnout-Delivery` is unique.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import time
import uuid

import httpx
import orjson

from stores.events import Event
from stores.settings import Settings

log = logging.getLogger("turnout.webhooks")

QUEUE_SIZE = 1000
BACKOFF_FIRST_S = 0.5
BACKOFF_MAX_S = 10.0
NOTIFIED_KINDS = frozenset(
    {
        "guard.rollback",
        "plan.advance",
        "plan.hold",
        "plan.approval_requested",
        "plan.done",
    }
)


def sign(secret: bytes, timestamp: str, body: bytes) -> str:
    mac = hmac.new(secret, timestamp.encode() + b"." + body, hashlib.sha256)
    return "sha256=" + mac.hexdigest()


class Notifier:
    """Delivers rollout events to the configured URLs in the background."""

    def __init__(
        self,
        urls: list[str],
        secret: bytes,
        *,
        timeout_s: float = 2.0,
        max_attempts: int = 5,
        deadline_s: float = 60.0,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.urls = list(urls)
        self.secret = secret
        self.timeout_s = timeout_s
        self.max_attempts = max_attempts
        self.deadline_s = deadline_s
        self.queue: asyncio.Queue[Event] = asyncio.Queue(QUEUE_SIZE)
        self.delivered = 0
        self.failed = 0
        self.dropped = 0
        self._client = httpx.AsyncClient(timeout=timeout_s, transport=transport)
        self._task: asyncio.Task[None] | None = None

    @classmethod
    def from_settings(cls, settings: Settings) -> Notifier | None:
        if not settings.webhook_urls:
            return None
        # Settings refuse webhook_urls without a secret, so every delivery is signed.
        secret = settings.webhook_secret.get_secret_value() if settings.webhook_secret else ""
        return cls(
            settings.webhook_urls,
            secret.encode(),
            timeout_s=settings.webhook_timeout_s,
            max_attempts=settings.webhook_max_attempts,
            deadline_s=settings.webhook_deadline_s,
        )

    def notify(self, event: Event) -> None:
        if event.kind not in NOTIFIED_KINDS:
            return
        try:
            self.queue.put_nowait(event)
        except asyncio.QueueFull:
            self.dropped += 1
            log.error("webhook queue full: event %d (%s) dropped", event.id, event.kind)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._work(), name="turnout-webhooks")

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        await self._client.aclose()

    async def _work(self) -> None:
        while True:
            event = await self.queue.get()
            body = orjson.dumps({"event": event.kind, **event.to_dict()})
            for url in self.urls:
                try:
                    ok = await self.deliver(url, event, body)
                except Exception:
                    log.exception("webhook delivery to %s failed", url)
                    ok = False
                if ok:
                    self.delivered += 1
                else:
                    self.failed += 1

    async def deliver(self, url: str, event: Event, body: bytes) -> bool:
        """POST with retries; True on a 2xx."""
        started = time.monotonic()
        backoff = BACKOFF_FIRST_S
        delivery = uuid.uuid4().hex
        for attempt in range(1, self.max_attempts + 1):
            timestamp = str(int(time.time()))
            headers = {
                "content-type": "application/json",
                "x-turnout-event": event.kind,
                "x-turnout-delivery": delivery,
                "x-turnout-timestamp": timestamp,
                "x-turnout-signature": sign(self.secret, timestamp, body),
            }
            try:
                resp = await self._client.post(url, content=body, headers=headers)
                if 200 <= resp.status_code < 300:
                    return True
                if 400 <= resp.status_code < 500 and resp.status_code not in (408, 429):
                    log.error("webhook %s refused event %d: %d", url, event.id, resp.status_code)
                    return False
                why = f"HTTP {resp.status_code}"
            except httpx.HTTPError as exc:
                why = type(exc).__name__
            left = self.deadline_s - (time.monotonic() - started)
            if attempt == self.max_attempts or left <= backoff:
                log.error(
                    "webhook %s gave up on event %d after %d attempts (%s)",
                    url,
                    event.id,
                    attempt,
                    why,
                )
                return False
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, BACKOFF_MAX_S)
        return False
