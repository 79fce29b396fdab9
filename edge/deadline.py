"""One deadline per connection, on one lazily re-armed timer: the client side
(edge/frontend.py) and the upstream side (edge/upstream.py) both keep time with it.

Rules of this file:
* Moving a deadline is one float assignment: the loop's timer handle is replaced only when
  the new deadline is *earlier* than the pending one. A deadline moved later is found when the
  old handle fires and re-armed then. Under keep-alive load that turns a `call_at` and a
  `cancel` per request into none for most requests (PERF.md: timers showed in the profile).
* `clear()` disarms without touching the handle; a fire with nothing armed does nothing.
* The owner says what expiry means (`on_expiry`); this module knows no HTTP.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

__all__ = ["Deadline"]

CLOCK_SLACK_S = 0.001  # a handle firing this early counts as on time (loop clock granularity)


class Deadline:
    """A single re-armable deadline; `on_expiry` runs once when it passes while armed."""

    __slots__ = ("loop", "on_expiry", "when", "_timer", "_timer_at")

    def __init__(self, loop: asyncio.AbstractEventLoop, on_expiry: Callable[[], None]) -> None:
        self.loop = loop
        self.on_expiry = on_expiry
        self.when = 0.0  # loop time of the deadline; 0.0 when disarmed
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0

    @property
    def armed(self) -> bool:
        return self.when != 0.0

    def arm(self, seconds: float) -> None:
        """Expire `seconds` from now (replacing any earlier or later deadline)."""
        when = self.when = self.loop.time() + seconds
        timer = self._timer
        if timer is None or when < self._timer_at:
            if timer is not None:
                timer.cancel()
            self._timer_at = when
            self._timer = self.loop.call_at(when, self._fire)

    def clear(self) -> None:
        """Disarm; the pending handle (if any) fires into nothing."""
        self.when = 0.0

    def cancel(self) -> None:
        """Disarm and drop the handle: for a connection that is closing."""
        self.when = 0.0
        timer = self._timer
        if timer is not None:
            self._timer = None
            timer.cancel()

    def _fire(self) -> None:
        self._timer = None
        when = self.when
        if not when:
            return
        if when - self.loop.time() > CLOCK_SLACK_S:
            self._timer_at = when  # moved later since this handle was set: wait again
            self._timer = self.loop.call_at(when, self._fire)
            return
        self.when = 0.0
        self.on_expiry()
