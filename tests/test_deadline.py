"""The one deadline helper (edge/deadline.py) on a driven clock: lazy re-arming, clear, cancel."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from edge.deadline import Deadline


class Handle:
    def __init__(self, when: float, callback: Callable[[], None]) -> None:
        self.when, self.callback, self.cancelled = when, callback, False

    def cancel(self) -> None:
        self.cancelled = True


class Clock:
    """Just the loop methods Deadline uses, with time moved by the test."""

    def __init__(self) -> None:
        self.now = 100.0
        self.handles: list[Handle] = []

    def time(self) -> float:
        return self.now

    def call_at(self, when: float, callback: Callable[[], None]) -> Handle:
        handle = Handle(when, callback)
        self.handles.append(handle)
        return handle

    def advance(self, seconds: float) -> None:
        """Move time on and fire every due, live handle (in order), like the loop would."""
        self.now += seconds
        while due := [h for h in self.handles if not h.cancelled and h.when <= self.now]:
            for handle in due:
                self.handles.remove(handle)
                handle.callback()

    @property
    def live(self) -> int:
        return sum(not h.cancelled for h in self.handles)


def make() -> tuple[Clock, Deadline, list[float]]:
    clock = Clock()
    fired: list[float] = []
    loop: Any = clock
    return clock, Deadline(loop, lambda: fired.append(clock.now)), fired


def test_moving_a_deadline_later_schedules_nothing_and_fires_at_the_new_time() -> None:
    """Re-arming later keeps the one handle; it re-arms itself when it fires early."""
    clock, deadline, fired = make()
    deadline.arm(5)
    for _ in range(100):
        clock.advance(1)
        deadline.arm(5)  # progress: the deadline moves on
    assert fired == [] and len(clock.handles) == 1
    clock.advance(5)
    assert fired == [205.0] and not deadline.armed


def test_a_shorter_deadline_replaces_the_pending_handle() -> None:
    """Arming earlier than the pending handle cancels it and fires on time."""
    clock, deadline, fired = make()
    deadline.arm(60)
    deadline.arm(2)
    assert clock.live == 1
    clock.advance(2)
    assert fired == [102.0]


def test_clear_and_cancel_disarm() -> None:
    """A cleared deadline fires into nothing; cancel drops the handle too."""
    clock, deadline, fired = make()
    deadline.arm(1)
    deadline.clear()
    clock.advance(2)
    assert fired == []
    deadline.arm(1)
    deadline.cancel()
    assert clock.live == 0
    clock.advance(2)
    assert fired == []
