"""Deadlines for the front-end's and the upstream pool's connections, on one loop timer.

Rules of this file:
* Moving a deadline is one float assignment. A deadline is (re)scheduled only when it moves
  *earlier* than the moment it is already scheduled for; a deadline moved later is found when
  its scheduled moment comes and is scheduled again then. Under keep-alive load that makes
  re-arming free for most requests (PERF.md: timers showed in the profile).
* All deadlines of one event loop share one `Timers` heap and one loop timer handle. A loop
  `TimerHandle` per connection cost 0.7 KiB (measured with 9,000 idle uvloop connections),
  a fifth of an idle keep-alive connection's memory (issue #9: 10,000 idle connections in
  80 MB); a heap entry is one small tuple.
* `clear()` disarms without touching the heap; a scheduled moment with nothing armed does
  nothing. `cancel()` also drops the owner's callback, so a closed connection is not kept
  alive by a heap entry that has yet to come due; stale entries are compacted away once they
  outnumber the live ones.
* The owner says what expiry means (`on_expiry`); this module knows no HTTP.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import weakref
from collections.abc import Callable

__all__ = ["Deadline", "Timers"]

CLOCK_SLACK_S = 0.001  # a moment reached this early counts as on time (loop clock granularity)
COMPACT_MIN_ENTRIES = 1024  # never compact a small heap: a rebuild would cost more than it saves


class Timers:
    """One heap of scheduled deadlines and one loop timer for the earliest of them."""

    __slots__ = ("loop", "heap", "live", "_handle", "_handle_at", "_running", "_seq", "__weakref__")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.heap: list[tuple[float, int, Deadline]] = []
        self.live = 0  # deadlines with an entry that is theirs (not stale)
        self._handle: asyncio.TimerHandle | None = None
        self._handle_at = 0.0
        self._running = False  # inside _run: it sets the next handle itself when done
        self._seq = itertools.count()  # ties: never compare two Deadline objects

    def schedule(self, deadline: Deadline, at: float) -> None:
        heapq.heappush(self.heap, (at, next(self._seq), deadline))
        if self._running:
            return
        if self._handle is None or at < self._handle_at:
            if self._handle is not None:
                self._handle.cancel()
            self._handle_at = at
            self._handle = self.loop.call_at(at, self._run)
        elif len(self.heap) > COMPACT_MIN_ENTRIES and len(self.heap) > 2 * self.live:
            self._compact()

    def _compact(self) -> None:
        self.heap = [entry for entry in self.heap if entry[2]._scheduled_at == entry[0]]
        heapq.heapify(self.heap)

    def _run(self) -> None:
        self._handle = None
        self._running = True
        try:
            due = self.loop.time() + CLOCK_SLACK_S
            while self.heap and self.heap[0][0] <= due:
                at, _, deadline = heapq.heappop(self.heap)
                if deadline._scheduled_at == at:  # else stale: rescheduled or cancelled
                    deadline._come_due()  # may schedule again (later than `due`)
        finally:
            self._running = False
            if self.heap:
                self._handle_at = self.heap[0][0]
                self._handle = self.loop.call_at(self._handle_at, self._run)


_TIMERS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Timers] = weakref.WeakKeyDictionary()


def timers_for(loop: asyncio.AbstractEventLoop) -> Timers:
    """The loop's shared `Timers` (made on first use; gone with the loop)."""
    timers = _TIMERS.get(loop)
    if timers is None:
        timers = _TIMERS[loop] = Timers(loop)
    return timers


class Deadline:
    """A single re-armable deadline; `on_expiry` runs once when it passes while armed."""

    __slots__ = ("timers", "on_expiry", "when", "_scheduled_at")

    def __init__(self, loop: asyncio.AbstractEventLoop, on_expiry: Callable[[], None]) -> None:
        self.timers = timers_for(loop)
        self.on_expiry: Callable[[], None] | None = on_expiry
        self.when = 0.0  # loop time of the deadline; 0.0 when disarmed
        self._scheduled_at = 0.0  # the heap moment that is this deadline's; 0.0: none

    @property
    def armed(self) -> bool:
        return self.when != 0.0

    def arm(self, seconds: float) -> None:
        """Expire `seconds` from now (replacing any earlier or later deadline)."""
        timers = self.timers
        when = self.when = timers.loop.time() + seconds
        scheduled = self._scheduled_at
        if scheduled == 0.0 or when < scheduled:
            if scheduled == 0.0:
                timers.live += 1
            self._scheduled_at = when
            timers.schedule(self, when)

    def clear(self) -> None:
        """Disarm; the scheduled moment (if any) comes into nothing."""
        self.when = 0.0

    def cancel(self) -> None:
        """Disarm for good: for a connection that is closing (its heap entry goes stale)."""
        self.when = 0.0
        self.on_expiry = None
        if self._scheduled_at != 0.0:
            self._scheduled_at = 0.0
            self.timers.live -= 1

    def _come_due(self) -> None:
        timers = self.timers
        self._scheduled_at = 0.0
        timers.live -= 1
        when = self.when
        if not when:
            return
        if when - timers.loop.time() > CLOCK_SLACK_S:
            # Moved later since it was scheduled: wait again.
            self._scheduled_at = when
            timers.live += 1
            timers.schedule(self, when)
            return
        self.when = 0.0
        on_expiry = self.on_expiry
        if on_expiry is not None:
            on_expiry()
