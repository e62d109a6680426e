"""Measure an open ``WanLink`` against its configuration, with plain TCP from edge to cloud.

- RTT: the time of TCP connects from edge to a listener in cloud (SYN out, SYN-ACK back: one
  round trip, nothing of ours in between) and of one-byte echoes on an established connection;
  plus the kernel's own smoothed RTT (``TCP_INFO``) of that connection and its MSS.
- Throughput: a bulk download (cloud sends, edge receives, the direction of image pulls) on a
  connection the edge opens, long enough to leave slow start (``ramp_seconds``); the rate is
  taken after the ramp from the sender's count of delivered segments (see ``_steady_rate``),
  the average as the receiver saw it over the whole transfer too. TCP payload is at
  most ``MSS / MTU`` (1448 / 1500 ≈ 96.5 %) of the link's IP rate; ``expected_goodput_mbit``
  says so.
- The forwarder's counters over the transfer: packets dropped by the router queue, its CPU time.

The helpers of the measurement (a tiny TCP server in cloud, clients in edge) run on threads of
this process placed in the namespaces (``WanLink.call``); they need nothing installed.
"""

from __future__ import annotations

import contextlib
import math
import socket
import statistics
import struct
import sys
import threading
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, Final

import attrs

from benchmarks.wan.link import MTU, LinkConfig

if TYPE_CHECKING:
    from benchmarks.wan.link import WanLink

__all__ = ["LinkReport", "default_transfer_seconds", "ramp_seconds", "verify_link"]

_ECHO: Final = b"E"
_SEND: Final = b"S"
_CHUNK: Final = 64 * 1024
_TCP_NOTSENT_LOWAT: Final = 25  # linux/tcp.h
_SERVER_TIMEOUT: Final = 60.0
# Offsets of u32 fields in the kernel's struct tcp_info (linux/tcp.h).
_TCP_INFO_SIZE: Final = 232
_TCPI_SND_MSS: Final = 16
_TCPI_RTT: Final = 68  # smoothed RTT, microseconds
_TCPI_DELIVERED: Final = 192  # segments delivered (cumulatively acked or SACKed), Linux ≥ 4.18
_HEADERS_WITH_TIMESTAMPS: Final = 52  # IPv4 20 + TCP 20 + timestamps option 12


@attrs.frozen
class LinkReport:
    config: LinkConfig
    connect_rtt_ms: float  # median of the TCP connect times
    connect_rtt_min_ms: float
    connect_rtt_max_ms: float
    echo_rtt_ms: float  # median one-byte echo round trip
    kernel_rtt_ms: float  # the kernel's srtt of the echo connection (TCP_INFO)
    mss: int
    throughput_mbit: float  # TCP payload delivered per second, second half of the transfer
    average_mbit: float  # received over the whole transfer, slow start included
    transfer_bytes: int
    transfer_seconds: float
    dropped_packets: int  # by the router queue during the transfer (both directions)
    forwarder_cpu: float  # forwarder CPU seconds per second during the transfer
    forwarder_priority: str
    max_segments: int  # the largest GSO super-packet seen, in segments
    congestion: str  # the congestion control in effect in both namespaces

    @property
    def rtt_ms(self) -> float:
        return self.connect_rtt_ms

    @property
    def expected_goodput_mbit(self) -> float:
        """The most TCP payload the configured IP rate can carry with full-size segments."""
        return self.config.rate_mbit * self.mss / (self.mss + _HEADERS_WITH_TIMESTAMPS)

    def rtt_error(self) -> float:
        """Relative error of the measured RTT (connect median) against the configured one."""
        return (self.connect_rtt_ms - self.config.rtt_ms) / max(self.config.rtt_ms, 1e-9)

    def throughput_error(self) -> float:
        return (self.throughput_mbit - self.expected_goodput_mbit) / self.expected_goodput_mbit

    def render(self) -> str:
        c = self.config
        return (
            f"WAN link {c.label} (queue {c.effective_queue_bytes / 1024:.0f} KiB, MTU {MTU}, "
            f"MSS {self.mss}, {self.congestion})\n"
            f"  RTT        configured {c.rtt_ms:8.2f} ms   measured {self.connect_rtt_ms:8.2f} ms"
            f" (connect; min {self.connect_rtt_min_ms:.2f}, max {self.connect_rtt_max_ms:.2f}),"
            f" echo {self.echo_rtt_ms:.2f} ms, kernel srtt {self.kernel_rtt_ms:.2f} ms\n"
            f"  throughput configured {c.rate_mbit:8.2f} Mbit/s (≤ {self.expected_goodput_mbit:.2f}"
            f" TCP payload)   measured {self.throughput_mbit:8.2f} Mbit/s steady,"
            f" {self.average_mbit:.2f} average over {self.transfer_bytes / 1e6:.1f} MB in"
            f" {self.transfer_seconds:.2f} s\n"
            f"  forwarder  {self.forwarder_cpu * 100:.0f} % of a core ({self.forwarder_priority}),"
            f" {self.dropped_packets} drops, super-packets up to {self.max_segments} segments"
        )

    def as_dict(self) -> dict[str, Any]:
        data = attrs.asdict(self)
        data["expected_goodput_mbit"] = self.expected_goodput_mbit
        return data


# --- the measuring server, inside cloud ----------------------------------------------------


class _Server:
    """Accepts connections in cloud: ``E`` echoes bytes back, ``S<seconds:double>`` sends
    for that long and closes."""

    def __init__(self, listener: socket.socket, unsent_bytes: int) -> None:
        self.listener = listener
        self.unsent_bytes = unsent_bytes
        self.port = int(listener.getsockname()[1])
        self.send_marks: list[tuple[float, int]] = []
        self._thread = threading.Thread(target=self._accept, daemon=True, name="wan-verify")
        self._thread.start()

    def _accept(self) -> None:
        while True:
            try:
                connection, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(connection,), daemon=True).start()

    def _serve(self, connection: socket.socket) -> None:
        connection.settimeout(_SERVER_TIMEOUT)
        with connection:
            try:
                mode = connection.recv(1)
                if mode == _ECHO:
                    connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    while data := connection.recv(4096):
                        connection.sendall(data)
                elif mode == _SEND:
                    (seconds,) = struct.unpack("!d", _recv_exactly(connection, 8))
                    self.send_marks = self._send(connection, seconds, self.unsent_bytes)
            except OSError:
                return

    @staticmethod
    def _send(
        connection: socket.socket, seconds: float, unsent_bytes: int
    ) -> list[tuple[float, int]]:
        """Send for ``seconds``; return (time, segments delivered so far) after each chunk."""
        # A bounded amount of unsent data: sending stops close to the deadline, not after the
        # autotuned send buffer (megabytes) has drained over a slow link; yet enough that a
        # sending thread kept off the CPU by other work does not leave the link idle.
        connection.setsockopt(socket.IPPROTO_TCP, _TCP_NOTSENT_LOWAT, unsent_bytes)
        payload = bytes(_CHUNK)
        marks = []
        started = time.monotonic()
        deadline = started + seconds
        while (now := time.monotonic()) < deadline:
            marks.append((now - started, _tcp_info(connection, _TCPI_DELIVERED)))
            connection.sendall(payload)
        return marks

    def close(self) -> None:
        # shutdown() wakes the accept() blocked on the other thread; close() alone may not.
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)
        self.listener.close()
        self._thread.join(timeout=5)


def _tcp_info(sock: socket.socket, offset: int) -> int:
    info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCP_INFO_SIZE)
    return int.from_bytes(info[offset : offset + 4], sys.byteorder)


def _recv_exactly(connection: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = connection.recv(size - len(data))
        if not chunk:
            raise ConnectionError("peer closed early")
        data += chunk
    return data


@contextlib.contextmanager
def _server(link: WanLink) -> Iterator[_Server]:
    def listen() -> socket.socket:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((link.cloud_ip, 0))
        listener.listen(64)
        return listener

    # 100 ms of the link's rate may wait unsent in the sender's socket.
    unsent = max(4 * _CHUNK, int(link.config.rate_mbit * 1e6 / 8 / 10))
    server = _Server(link.call("cloud", listen), unsent)
    try:
        yield server
    finally:
        server.close()


def _edge_socket(link: WanLink, timeout: float) -> socket.socket:
    sock = link.call("edge", lambda: socket.socket(socket.AF_INET, socket.SOCK_STREAM))
    # A dead link (the forwarder gone) fails the verification instead of hanging it.
    sock.settimeout(timeout)
    return sock


# --- the measurements ----------------------------------------------------------------------


def _connect_times(link: WanLink, port: int, samples: int, timeout: float) -> list[float]:
    times = []
    for _ in range(samples):
        with _edge_socket(link, timeout) as sock:
            started = time.perf_counter()
            sock.connect((link.cloud_ip, port))
            times.append(time.perf_counter() - started)
            sock.sendall(_ECHO)  # tell the server what this connection is, so it ends quietly
    return times


def _echo(link: WanLink, port: int, samples: int, timeout: float) -> tuple[list[float], float, int]:
    """Echo round trips, then the kernel's srtt and MSS of that connection."""
    with _edge_socket(link, timeout) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.connect((link.cloud_ip, port))
        sock.sendall(_ECHO)
        times = []
        for _ in range(samples):
            started = time.perf_counter()
            sock.sendall(b"x")
            _recv_exactly(sock, 1)
            times.append(time.perf_counter() - started)
        srtt_us = _tcp_info(sock, _TCPI_RTT)
        mss = _tcp_info(sock, _TCPI_SND_MSS)
    return times, srtt_us / 1000.0, mss


def _download(link: WanLink, port: int, seconds: float, timeout: float) -> tuple[int, float]:
    """(bytes, seconds) of a bulk transfer from cloud to edge, as the edge receives it."""
    with _edge_socket(link, timeout) as sock:
        sock.connect((link.cloud_ip, port))
        sock.sendall(_SEND + struct.pack("!d", seconds))
        received = 0
        buffer = bytearray(_CHUNK)
        started = time.perf_counter()
        while count := sock.recv_into(buffer):
            received += count
        elapsed = time.perf_counter() - started
    if not received:
        raise ConnectionError("the bulk transfer over the WAN link carried no data")
    return received, elapsed


def _steady_rate(marks: list[tuple[float, int]], mss: int, after: float) -> float:
    """Payload bits/s delivered from ``after`` seconds into the sending time to its end.

    Counted at the sender from what the receiver acknowledged *or SACKed*: bytes received
    out of order after a loss count when they cross the link, not when the hole is filled
    (a rate read by the receiving application bunches them up there and overshoots).
    """
    window = [(t, c) for t, c in marks if t >= after]
    if len(window) < 2 or window[-1][0] <= window[0][0]:
        raise ConnectionError("the bulk transfer over the WAN link was too short to measure")
    (start_time, start_count), (end_time, end_count) = window[0], window[-1]
    return (end_count - start_count) * mss * 8 / (end_time - start_time)


def ramp_seconds(config: LinkConfig) -> float:
    """How long TCP takes to fill the path: slow start from 10 segments to the path's
    capacity (BDP + queue) takes log2(capacity / 10 MSS) round trips, and a few more go to
    the loss, or the drain of the queue, that ends it."""
    capacity = config.bdp_bytes + config.effective_queue_bytes
    round_trips = math.log2(max(2.0, capacity / (10 * 1448))) + 6
    return round_trips * config.rtt_ms / 1000


def default_transfer_seconds(config: LinkConfig) -> float:
    """The ramp, then at least 1.5 s (and 8 round trips) of steady state to measure."""
    return max(2.0, ramp_seconds(config) + max(1.5, 8 * config.rtt_ms / 1000))


def verify_link(
    link: WanLink,
    *,
    samples: int = 5,
    transfer_seconds: float | None = None,
    measure_after: float | None = None,
    timeout: float = 10.0,
) -> LinkReport:
    """Measure ``link`` (RTT, throughput, forwarder load) and return the report.

    The bulk transfer lasts ``transfer_seconds``; its rate is measured from
    ``measure_after`` seconds on (defaults: ``default_transfer_seconds``, ``ramp_seconds``;
    with only ``transfer_seconds`` given, its second half). A socket operation that waits
    longer than ``timeout`` seconds (plus 20 RTTs) raises ``TimeoutError``: the link is dead.
    """
    config = link.config
    if transfer_seconds is None:
        seconds = default_transfer_seconds(config)
        after = ramp_seconds(config) if measure_after is None else measure_after
    else:
        seconds = transfer_seconds
        after = seconds / 2 if measure_after is None else measure_after
    if not 0 <= after < seconds:
        raise ValueError(f"measure_after={after} must lie within the {seconds} s transfer")
    timeout += 20 * config.rtt_ms / 1000
    with _server(link) as server:
        # A first connect also waits out the link coming up (carrier on both devices).
        _connect_times(link, server.port, 1, timeout)
        connects = _connect_times(link, server.port, samples, timeout)
        echoes, kernel_rtt, mss = _echo(link, server.port, samples, timeout)
        stats_before = link.forwarder_stats()
        wall = time.monotonic()
        total, elapsed = _download(link, server.port, seconds, timeout)
        wall = time.monotonic() - wall
        stats_after = link.forwarder_stats()
        steady = _steady_rate(server.send_marks, mss, after)
    drops = sum(
        stats_after[d]["dropped_packets"] - stats_before[d]["dropped_packets"]
        for d in ("up", "down")
    )
    return LinkReport(
        config=config,
        connect_rtt_ms=statistics.median(connects) * 1000,
        connect_rtt_min_ms=min(connects) * 1000,
        connect_rtt_max_ms=max(connects) * 1000,
        echo_rtt_ms=statistics.median(echoes) * 1000,
        kernel_rtt_ms=kernel_rtt,
        mss=mss,
        throughput_mbit=steady / 1e6,
        average_mbit=total * 8 / elapsed / 1e6,
        transfer_bytes=total,
        transfer_seconds=elapsed,
        dropped_packets=drops,
        forwarder_cpu=(stats_after["cpu_seconds"] - stats_before["cpu_seconds"]) / wall,
        forwarder_priority=str(link.forwarder_info.get("priority", "?")),
        max_segments=int(stats_after["max_segments"]),
        congestion=link.congestion,
    )
