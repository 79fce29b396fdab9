"""The rollout event stream: versions, guard verdicts and plan events, for SSE and webhooks.

Rules of this file:
* `publish` never blocks and never raises: it is called by the guard runner right after a
  rollback, which nothing may delay (issue #10). A subscriber whose queue is full loses its
  oldest events (and is told how many), it never slows the publisher.
* The bus keeps the last `HISTORY` events so a new SSE client can resume (`Last-Event-ID`).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger("turnout.events")

SUBSCRIBER_QUEUE = 256
HISTORY = 256

# Event kinds
VERSION = "version"
GUARD_VERDICT = "guard.verdict"
GUARD_ROLLBACK = "guard.rollback"
PLAN_ADVANCE = "plan.advance"
PLAN_HOLD = "plan.hold"
PLAN_APPROVAL = "plan.approval_requested"
PLAN_DONE = "plan.done"


@dataclass(frozen=True, slots=True)
class Event:
    id: int
    kind: str
    at: float
    data: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "kind": self.kind, "at": self.at, "data": self.data}


@dataclass(slots=True, eq=False)  # hashed by identity: kept in a set
class Subscription:
    queue: asyncio.Queue[Event] = field(default_factory=lambda: asyncio.Queue(SUBSCRIBER_QUEUE))
    dropped: int = 0


class EventBus:
    """In-process fan-out of rollout events."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        self.next_id = 1
        self.history: collections.deque[Event] = collections.deque(maxlen=HISTORY)
        self.subscribers: set[Subscription] = set()
        self.hooks: list[Callable[[Event], None]] = []

    def publish(self, kind: str, data: dict[str, Any]) -> Event:
        event = Event(self.next_id, kind, self.clock(), data)
        self.next_id += 1
        self.history.append(event)
        for sub in list(self.subscribers):
            if sub.queue.full():
                sub.queue.get_nowait()
                sub.dropped += 1
            sub.queue.put_nowait(event)
        for hook in self.hooks:
            try:
                hook(event)
            except Exception:  # a notifier bug must not break the guard
                log.exception("event hook failed")
        return event

    def subscribe(self) -> Subscription:
        sub = Subscription()
        self.subscribers.add(sub)
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        self.subscribers.discard(sub)

    def since(self, last_id: int) -> list[Event]:
        return [e for e in self.history if e.id > last_id]
