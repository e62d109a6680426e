"""One direction of the emulated link, with no I/O: a router's drop-tail queue in front of a
serialiser of fixed rate, then a fixed propagation delay.

A packet offered at time ``now`` whose wire size is ``size`` bytes

- is dropped if the bytes still waiting to be serialised plus ``size`` exceed the queue limit
  (drop-tail: the queue never holds more than ``queue_bytes``);
- otherwise starts serialising when the serialiser is free (``start = max(now, free_at)``),
  finishes at ``free_at = start + size / rate`` and arrives at the far end at
  ``free_at + delay``.

Departures are in arrival order and the delay is fixed, so deliveries come out in order and a
FIFO holds them; the caller asks ``next_delivery()`` when to wake up and ``pop_due(now)`` what to
write. Times are seconds of any monotonic clock; nothing here reads a clock.

A packet may stand for several segments (a GSO super-packet): ``offer`` takes the count so the
statistics speak of real packets, and ``room(now)`` lets the caller admit just the head of a
super-packet that does not fit whole (``record_drop`` accounts for the cut tail).
"""

from __future__ import annotations

from collections import deque
from typing import Final, Generic, TypeVar

import attrs

__all__ = ["Channel", "ChannelStats"]

P = TypeVar("P")
_BITS_PER_BYTE: Final = 8


@attrs.define
class ChannelStats:
    """Counters in real packets (segments) and wire bytes."""

    offered_packets: int = 0
    offered_bytes: int = 0
    dropped_packets: int = 0
    dropped_bytes: int = 0
    delivered_packets: int = 0
    delivered_bytes: int = 0
    max_backlog_bytes: float = 0.0


class Channel(Generic[P]):
    """One direction: ``delay`` seconds one way, ``rate_bps`` bits per second, a drop-tail
    queue of ``queue_bytes`` bytes (the packet being serialised counts until it is out)."""

    def __init__(self, *, delay: float, rate_bps: float, queue_bytes: int) -> None:
        if delay < 0:
            raise ValueError(f"delay must not be negative, not {delay}")
        if rate_bps <= 0:
            raise ValueError(f"rate must be positive, not {rate_bps}")
        if queue_bytes <= 0:
            raise ValueError(f"queue must be positive, not {queue_bytes}")
        self.delay = delay
        self.bytes_per_second = rate_bps / _BITS_PER_BYTE
        self.queue_bytes = queue_bytes
        self.stats = ChannelStats()
        self._free_at = float("-inf")
        # (deliver at, count, size, packet)
        self._in_flight: deque[tuple[float, int, int, P]] = deque()

    def backlog(self, now: float) -> float:
        """Bytes accepted but not yet fully serialised at ``now``."""
        return max(0.0, self._free_at - now) * self.bytes_per_second

    def room(self, now: float) -> float:
        """Bytes the queue can still take at ``now``."""
        return self.queue_bytes - self.backlog(now)

    def offer(self, now: float, packet: P, size: int, count: int = 1) -> bool:
        """Take ``packet`` (``count`` segments, ``size`` bytes on the wire) at ``now``; False
        if it does not fit and the queue drops it."""
        backlog = self.backlog(now)
        if backlog + size > self.queue_bytes:
            self.record_drop(size, count)
            return False
        stats = self.stats
        stats.offered_packets += count
        stats.offered_bytes += size
        self._free_at = max(now, self._free_at) + size / self.bytes_per_second
        stats.max_backlog_bytes = max(stats.max_backlog_bytes, backlog + size)
        self._in_flight.append((self._free_at + self.delay, count, size, packet))
        return True

    def record_drop(self, size: int, count: int = 1) -> None:
        """Count ``count`` segments of ``size`` bytes the caller dropped for want of room."""
        stats = self.stats
        stats.offered_packets += count
        stats.offered_bytes += size
        stats.dropped_packets += count
        stats.dropped_bytes += size

    def next_delivery(self) -> float | None:
        """When the next accepted packet reaches the far end (None: nothing in flight)."""
        return self._in_flight[0][0] if self._in_flight else None

    def pop_due(self, now: float) -> list[P]:
        """The packets that have reached the far end by ``now``, oldest first."""
        due: list[P] = []
        in_flight = self._in_flight
        while in_flight and in_flight[0][0] <= now:
            _, count, size, packet = in_flight.popleft()
            self.stats.delivered_packets += count
            self.stats.delivered_bytes += size
            due.append(packet)
        return due

    def __len__(self) -> int:
        return len(self._in_flight)
