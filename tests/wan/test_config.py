"""What a link configuration implies: BDP, router buffer, GSO grain; the default sweep."""

from __future__ import annotations

import pytest

from benchmarks.wan import DEFAULT_SWEEP, LinkConfig
from benchmarks.wan.link import MIN_QUEUE_BYTES


def test_the_default_sweep_is_the_issues() -> None:
    assert [(c.rtt_ms, c.rate_mbit) for c in DEFAULT_SWEEP] == [
        (2, 100), (50, 100), (150, 100), (300, 100), (150, 10), (150, 50), (150, 200),
    ]  # fmt: skip


def test_the_router_buffer_defaults_to_one_bdp_with_a_floor() -> None:
    config = LinkConfig(rtt_ms=150, rate_mbit=100)
    assert config.bdp_bytes == 1_875_000
    assert config.effective_queue_bytes == 1_875_000
    assert LinkConfig(rtt_ms=2, rate_mbit=100).effective_queue_bytes == MIN_QUEUE_BYTES
    assert LinkConfig(rtt_ms=150, rate_mbit=100, queue_bytes=5000).effective_queue_bytes == 5000


@pytest.mark.parametrize(("rate", "segments"), [(10, 2), (50, 4), (100, 8), (200, 17), (1e4, 64)])
def test_a_super_packet_is_about_a_millisecond_of_the_link(rate: float, segments: int) -> None:
    assert LinkConfig(rtt_ms=50, rate_mbit=rate).effective_gso_segments == segments
    assert LinkConfig(rtt_ms=50, rate_mbit=rate, gso_segments=3).effective_gso_segments == 3


def test_a_link_needs_a_rate_and_a_nonnegative_rtt() -> None:
    with pytest.raises(ValueError, match="rate_mbit"):
        LinkConfig(rtt_ms=10, rate_mbit=0)
    with pytest.raises(ValueError, match="rtt_ms"):
        LinkConfig(rtt_ms=-1, rate_mbit=10)
    assert LinkConfig(rtt_ms=150, rate_mbit=100).label == "150 ms / 100 Mbit/s"
