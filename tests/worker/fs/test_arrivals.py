"""Arrivals: per-file waits, woken by their own notification or a re-check, never others'."""

from __future__ import annotations

import threading
from collections.abc import Callable

from starlight_worker.fs.arrivals import Arrivals

BOUND = 30.0


class Waiter(threading.Thread):
    def __init__(
        self,
        arrivals: Arrivals,
        ino: int,
        box: dict[int, str],
        cancelled: Callable[[], bool] = lambda: False,
    ) -> None:
        super().__init__(daemon=True)
        self.arrivals, self.ino, self.box, self.cancelled = arrivals, ino, box, cancelled
        self.result: str | None = None
        self.done = threading.Event()

    def run(self) -> None:
        self.result = self.arrivals.wait(
            self.ino, lambda: self.box.get(self.ino), timeout=BOUND, cancelled=self.cancelled
        )
        self.done.set()


def _until(predicate: Callable[[], bool]) -> None:
    event = threading.Event()
    for _ in range(int(BOUND / 0.01)):
        if predicate():
            return
        event.wait(0.01)
    raise AssertionError("condition never held")


def test_wake_releases_only_the_waiters_of_that_inode() -> None:
    # A poll interval longer than the test: only wake() can release them.
    arrivals = Arrivals(poll_interval=BOUND)
    box: dict[int, str] = {}
    first, second = Waiter(arrivals, 1, box), Waiter(arrivals, 2, box)
    also_first = Waiter(arrivals, 1, box)
    for waiter in (first, second, also_first):
        waiter.start()
    _until(lambda: arrivals.waiting() == 2)

    box[2] = "two"
    assert arrivals.wake([2]) == 1
    assert second.done.wait(BOUND)
    assert second.result == "two"
    assert not first.done.is_set()
    assert not also_first.done.is_set()

    box[1] = "one"
    arrivals.wake([1])
    assert first.done.wait(BOUND)
    assert also_first.done.wait(BOUND)
    assert first.result == also_first.result == "one"
    assert arrivals.waiting() == 0


def test_arrival_without_notification_is_found_by_polling() -> None:
    arrivals = Arrivals(poll_interval=0.01)
    box: dict[int, str] = {}
    waiter = Waiter(arrivals, 5, box)
    waiter.start()
    _until(lambda: arrivals.waiting() == 1)
    box[5] = "quiet"
    assert waiter.done.wait(BOUND)
    assert waiter.result == "quiet"


def test_timeout_and_cancellation_return_none() -> None:
    arrivals = Arrivals(poll_interval=0.01)
    assert arrivals.wait(1, lambda: None, timeout=0.05) is None
    assert arrivals.wait(1, lambda: None, timeout=0) is None
    cancelled = threading.Event()
    waiter = Waiter(Arrivals(poll_interval=BOUND), 3, {}, cancelled=cancelled.is_set)
    waiter.start()
    _until(lambda: waiter.arrivals.waiting() == 1)
    cancelled.set()
    waiter.arrivals.wake_range(range(10))
    assert waiter.done.wait(BOUND)
    assert waiter.result is None
    assert arrivals.waiting() == 0


def test_present_content_is_returned_without_waiting() -> None:
    arrivals = Arrivals(poll_interval=BOUND)
    assert arrivals.wait(1, lambda: "here", timeout=BOUND) == "here"
    assert arrivals.waiting() == 0
