"""The one deadline helper (edge/deadline.py) on a driven clock: lazy re-arming, clear, cancel,
and many deadlines sharing one loop timer."""

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
    assert deadline.timers.live == 0 and deadline.on_expiry is None  # the owner is let go
    clock.advance(2)
    assert fired == []


def test_many_deadlines_share_one_loop_timer_and_fire_in_order() -> None:
    """Thousands of deadlines cost one pending loop handle; each fires at its own time."""
    clock = Clock()
    loop: Any = clock
    fired: list[int] = []
    deadlines = [Deadline(loop, lambda k=k: fired.append(k)) for k in range(2000)]
    for k, deadline in enumerate(deadlines):
        deadline.arm(1 + (k % 10))
    assert clock.live == 1
    clock.advance(5)
    assert sorted(fired) == [k for k in range(2000) if k % 10 < 5]
    assert clock.live == 1
    clock.advance(5)
    assert sorted(fired) == list(range(2000))
    assert clock.live == 0


def test_cancelled_entries_are_compacted_away() -> None:
    """Connections that come and go leave stale heap entries; they never outgrow the live ones
    for long, so closed connections are not held until their old deadline comes."""
    clock = Clock()
    loop: Any = clock
    keeper = Deadline(loop, lambda: None)
    keeper.arm(1)  # the earliest: later entries never move the loop handle
    timers = keeper.timers
    for _ in range(10_000):
        gone = Deadline(loop, lambda: None)
        gone.arm(60)
        gone.cancel()
    assert timers.live == 1
    assert len(timers.heap) <= 2 * 1024 + 2


def test_a_deadline_moved_later_never_delays_an_earlier_one() -> None:
    """When a deadline that moved later is scheduled again, a sooner one still fires on time."""
    clock = Clock()
    loop: Any = clock
    fired: list[tuple[str, float]] = []
    moving = Deadline(loop, lambda: fired.append(("moving", clock.now)))
    soon = Deadline(loop, lambda: fired.append(("soon", clock.now)))
    moving.arm(1)
    soon.arm(3)
    moving.arm(10)  # moves later: found at t=101 and scheduled again for t=110
    clock.advance(1)
    assert fired == []
    clock.advance(2)
    assert fired == [("soon", 103.0)]
    clock.advance(7)
    assert fired == [("soon", 103.0), ("moving", 110.0)]
