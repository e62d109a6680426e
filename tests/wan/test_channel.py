"""One direction of the emulated link, without I/O: delay, serialisation at the rate, drop-tail."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from benchmarks.wan.channel import Channel

MBIT = 1_000_000


def test_a_lone_packet_arrives_after_its_serialisation_and_the_delay() -> None:
    channel: Channel[str] = Channel(delay=0.075, rate_bps=8 * MBIT, queue_bytes=100_000)
    assert channel.offer(10.0, "p", 1000)  # 1000 bytes at 1 MB/s: 1 ms on the wire
    assert channel.next_delivery() == pytest.approx(10.076)
    assert channel.pop_due(10.0759) == []
    assert channel.pop_due(10.076) == ["p"]
    assert channel.next_delivery() is None
    assert len(channel) == 0


def test_back_to_back_packets_are_paced_to_the_rate() -> None:
    channel: Channel[int] = Channel(delay=0.0, rate_bps=8 * MBIT, queue_bytes=1_000_000)
    for i in range(5):
        assert channel.offer(0.0, i, 1000)
    deliveries = []
    while (at := channel.next_delivery()) is not None:
        deliveries.append((at, channel.pop_due(at)))
    assert [at for at, _ in deliveries] == pytest.approx([0.001, 0.002, 0.003, 0.004, 0.005])
    assert [packets for _, packets in deliveries] == [[0], [1], [2], [3], [4]]


def test_an_idle_link_does_not_bank_credit() -> None:
    # The serialiser was free long ago; a packet arriving now still takes its own time.
    channel: Channel[str] = Channel(delay=0.01, rate_bps=8 * MBIT, queue_bytes=10_000)
    channel.offer(0.0, "a", 1000)
    assert channel.pop_due(5.0) == ["a"]
    channel.offer(5.0, "b", 2000)
    assert channel.next_delivery() == pytest.approx(5.0 + 0.002 + 0.01)


def test_drop_tail_refuses_what_does_not_fit_and_counts_it() -> None:
    channel: Channel[int] = Channel(delay=0.0, rate_bps=8 * MBIT, queue_bytes=3000)
    assert channel.offer(0.0, 1, 1500, count=1)
    assert channel.offer(0.0, 2, 1500, count=1)
    assert channel.room(0.0) == pytest.approx(0.0)
    assert not channel.offer(0.0, 3, 1500, count=1)  # full: dropped
    # After 1.5 ms the first packet is out: room for one more.
    assert channel.room(0.0015) == pytest.approx(1500)
    assert channel.offer(0.0015, 4, 1500)
    stats = channel.stats
    assert (stats.offered_packets, stats.dropped_packets) == (4, 1)
    assert (stats.offered_bytes, stats.dropped_bytes) == (6000, 1500)
    assert channel.pop_due(1.0) == [1, 2, 4]
    assert (stats.delivered_packets, stats.delivered_bytes) == (3, 4500)


def test_super_packets_count_as_their_segments() -> None:
    channel: Channel[str] = Channel(delay=0.0, rate_bps=8 * MBIT, queue_bytes=100_000)
    channel.offer(0.0, "gso", 15_000, count=10)
    channel.record_drop(3000, count=2)
    channel.pop_due(1.0)
    stats = channel.stats
    assert (stats.offered_packets, stats.dropped_packets, stats.delivered_packets) == (12, 2, 10)


@pytest.mark.parametrize(("delay", "rate", "queue"), [(-1.0, 1.0, 1), (0.0, 0.0, 1), (0.0, 1.0, 0)])
def test_nonsense_parameters_are_refused(delay: float, rate: float, queue: int) -> None:
    with pytest.raises(ValueError, match="must"):
        Channel(delay=delay, rate_bps=rate, queue_bytes=queue)


arrivals = st.lists(st.tuples(st.floats(0, 0.01), st.integers(40, 65_000)), min_size=1, max_size=60)


@given(arrivals, st.floats(0, 0.2), st.floats(1e5, 1e9), st.integers(1500, 500_000))
def test_what_the_link_promises(
    gaps_and_sizes: list[tuple[float, int]], delay: float, rate: float, queue: int
) -> None:
    """For any arrivals: deliveries in order, never earlier than the delay plus the wire time
    of the packet (and of everything admitted before it), the queue never over its limit, and
    every packet either delivered or counted as dropped."""
    channel: Channel[int] = Channel(delay=delay, rate_bps=rate, queue_bytes=queue)
    now = 0.0
    admitted: dict[int, tuple[float, int]] = {}
    for index, (gap, size) in enumerate(gaps_and_sizes):
        now += gap
        if channel.offer(now, index, size):
            admitted[index] = (now, size)
        assert channel.backlog(now) <= queue + 1e-6
    delivered: list[tuple[float, int]] = []
    while (at := channel.next_delivery()) is not None:
        delivered.extend((at, packet) for packet in channel.pop_due(at))
    assert [packet for _, packet in delivered] == sorted(admitted)
    assert [at for at, _ in delivered] == sorted(at for at, _ in delivered)
    wire_time_so_far = 0.0
    for at, packet in delivered:
        arrived, size = admitted[packet]
        wire_time_so_far += size * 8 / rate
        assert at >= arrived + size * 8 / rate + delay - 1e-9
        assert at >= wire_time_so_far + delay - 1e-9  # the rate is never exceeded
    stats = channel.stats
    assert stats.delivered_packets + stats.dropped_packets == len(gaps_and_sizes)
    assert stats.delivered_bytes + stats.dropped_bytes == sum(s for _, s in gaps_and_sizes)
