"""Waiting for one file's content, without holding anything that other files' readers need.

A FUSE thread that reads a file whose content is not on disk yet parks on an event of its own
inode. The daemon's ``arrived`` notification sets that event; a periodic re-check covers the
arrivals nobody announced (the daemon placed the file and crashed before telling us). The one
lock here guards the event table for a few dictionary operations and is never held while
waiting.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from typing import TypeVar

__all__ = ["Arrivals"]

T = TypeVar("T")


class Arrivals:
    def __init__(self, *, poll_interval: float) -> None:
        self._poll_interval = poll_interval
        self._lock = threading.Lock()
        self._events: dict[int, tuple[threading.Event, list[int]]] = {}
        """ino → (event, [number of waiters]); an event is set once and then replaced."""

    def wait(
        self,
        ino: int,
        probe: Callable[[], T | None],
        *,
        timeout: float,
        cancelled: Callable[[], bool] = lambda: False,
    ) -> T | None:
        """``probe()`` until it returns something, woken by ``wake(ino)`` or every poll
        interval; ``None`` once ``timeout`` seconds have passed or ``cancelled()``."""
        deadline = time.monotonic() + timeout
        while True:
            # Register before probing: an arrival between the probe and the wait still wakes us.
            event = self._register(ino)
            try:
                found = probe()
                if found is not None:
                    return found
                remaining = deadline - time.monotonic()
                if remaining <= 0 or cancelled():
                    return None
                event.wait(min(self._poll_interval, remaining))
            finally:
                self._unregister(ino, event)

    def wake(self, inos: Iterable[int]) -> int:
        """Wake the waiters of these inodes; returns how many inodes had waiters."""
        woken = 0
        with self._lock:
            for ino in inos:
                entry = self._events.pop(ino, None)
                if entry is not None:
                    entry[0].set()
                    woken += 1
        return woken

    def wake_range(self, inos: range) -> int:
        """Wake every waiter in an inode range (a detached layer, a stopping server)."""
        with self._lock:
            hit = [ino for ino in self._events if ino in inos]
        return self.wake(hit)

    def waiting(self) -> int:
        """Inodes with at least one waiter right now."""
        with self._lock:
            return len(self._events)

    def _register(self, ino: int) -> threading.Event:
        with self._lock:
            entry = self._events.get(ino)
            if entry is None:
                entry = (threading.Event(), [0])
                self._events[ino] = entry
            entry[1][0] += 1
            return entry[0]

    def _unregister(self, ino: int, event: threading.Event) -> None:
        with self._lock:
            entry = self._events.get(ino)
            if entry is not None and entry[0] is event:
                entry[1][0] -= 1
                if entry[1][0] == 0:
                    del self._events[ino]
