"""The forwarder: the process that *is* the emulated link.

``python -m benchmarks.wan.forwarder --edge NS --cloud NS --rtt-ms 150 --rate-mbit 100
--queue-bytes N`` attaches to the TUN device ``wan0`` of each namespace, reads every packet the
kernel routes into one of them, holds it in that direction's ``Channel`` (queue, rate, half the
RTT) and writes it into the other one at its delivery time. Packets keep their headers: the
two TCP stacks talk end to end and see the link's delay, rate and drops as they would on a
real path.

With ``--offload`` (the default) the devices have checksum and TCP segmentation offload on:
the sender's kernel hands over GSO super-packets of up to 64 KiB, each standing for many
MSS-sized segments, and the receiver's kernel takes them back as they are (as it takes a GRO
batch from a NIC). One read and one write move tens of segments, which is what lets a Python
process carry 200 Mbit/s; the ``Channel`` charges a super-packet the wire bytes of all its
segments, and TCP still works in MSS-sized segments (MTU 1500).

Control over stdin/stdout, one JSON object per line: after start-up it prints
``{"ready": true, ...}``; every line read on stdin is answered with the current statistics; EOF
on stdin (the harness exited, however it died) makes it exit. The line ``flows`` is answered
with what each TCP connection carried since the last ``flows reset`` (``benchmarks.wan.flows``).
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import select
import struct
import sys
import time
from collections.abc import Callable
from typing import Any, Final

from benchmarks.wan.channel import Channel
from benchmarks.wan.flows import FlowTable
from benchmarks.wan.netns import call_in_netns
from benchmarks.wan.packet import headers_length, segment_size, segments, truncate, wire_size

__all__ = ["main", "open_tun"]

_TUNSETIFF: Final = 0x400454CA
_TUNSETOFFLOAD: Final = 0x400454D0
_IFF_TUN: Final = 0x0001
_IFF_NO_PI: Final = 0x1000
_IFF_VNET_HDR: Final = 0x4000
_TUN_F_CSUM: Final = 0x01
_TUN_F_TSO4: Final = 0x02
_TUN_F_TSO6: Final = 0x04
_PR_SET_TIMERSLACK: Final = 29
# A GSO super-packet is at most 64 KiB of IP packet; the vnet header and slack on top.
_READ_SIZE: Final = 65536 + 512
# Packets read from one device before looking at the clock again: bounds the time a burst on
# one side can delay deliveries on the other.
_READ_BATCH: Final = 64


def open_tun(netns: str, name: str, *, offload: bool) -> int:
    """Attach to the persistent TUN device ``name`` of ``netns``; a non-blocking fd."""

    def attach() -> int:
        fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            flags = _IFF_TUN | _IFF_NO_PI | _IFF_VNET_HDR
            fcntl.ioctl(fd, _TUNSETIFF, struct.pack("16sH22x", name.encode(), flags))
            features = _TUN_F_CSUM | _TUN_F_TSO4 | _TUN_F_TSO6 if offload else 0
            fcntl.ioctl(fd, _TUNSETOFFLOAD, features)
        except BaseException:
            os.close(fd)
            raise
        return fd

    # The device is looked up in the namespace of the thread that opens /dev/net/tun.
    return call_in_netns(netns, attach)


def raise_priority(fifo_priority: int) -> str:
    """Real-time scheduling if allowed (no timer slack either then), else a nice of -10."""
    try:
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(fifo_priority))
        return f"SCHED_FIFO {fifo_priority}"
    except OSError:
        pass
    try:
        import ctypes

        ctypes.CDLL(None).prctl(_PR_SET_TIMERSLACK, 1, 0, 0, 0)
        os.setpriority(os.PRIO_PROCESS, 0, -10)
        return "nice -10"
    except OSError:
        return "default"


class Forwarder:
    """Moves frames between two TUN fds through one ``Channel`` per direction."""

    def __init__(
        self, edge_fd: int, cloud_fd: int, *, up: Channel[bytes], down: Channel[bytes]
    ) -> None:
        self.edge_fd = edge_fd
        self.cloud_fd = cloud_fd
        self.up = up  # edge → cloud
        self.down = down  # cloud → edge
        self.frames = 0
        self.super_frames = 0
        self.max_segments = 1
        self.cut_frames = 0  # super-packets of which only the head fitted in the queue
        self.write_errors = 0
        self.last_write_error = ""
        self.flows = FlowTable()

    def _deliver(self, now: float) -> None:
        for channel, out in ((self.up, self.cloud_fd), (self.down, self.edge_fd)):
            up = channel is self.up
            for frame in channel.pop_due(now):
                self.flows.observe(up, frame, now)
                try:
                    os.write(out, frame)
                except OSError as exc:
                    # The far kernel refused one packet (as a NIC may): TCP will resend it.
                    self.write_errors += 1
                    self.last_write_error = str(exc)

    def _receive(self, fd: int, channel: Channel[bytes], now: float) -> None:
        for _ in range(_READ_BATCH):
            try:
                frame = os.read(fd, _READ_SIZE)
            except BlockingIOError:
                return
            self.frames += 1
            count = segments(frame)
            size = wire_size(frame)
            if count > 1:
                self.super_frames += 1
                self.max_segments = max(self.max_segments, count)
                if size > channel.room(now):
                    frame, kept, size = _admit_head(channel, now, frame, count, size)
                    self.cut_frames += kept < count
                    count = kept
            channel.offer(now, frame, size, count)

    def run(self, control_in: int, on_control: Callable[[str], None]) -> None:
        """Forward until ``control_in`` reaches EOF; call ``on_control(line)`` per line."""
        readers = [self.edge_fd, self.cloud_fd, control_in]
        pending = b""
        while True:
            now = time.monotonic()
            self._deliver(now)
            deadlines = [
                d for d in (self.up.next_delivery(), self.down.next_delivery()) if d is not None
            ]
            timeout = max(0.0, min(deadlines) - time.monotonic()) if deadlines else None
            readable, _, _ = select.select(readers, [], [], timeout)
            now = time.monotonic()
            for fd in readable:
                if fd == self.edge_fd:
                    self._receive(fd, self.up, now)
                elif fd == self.cloud_fd:
                    self._receive(fd, self.down, now)
                else:
                    chunk = os.read(control_in, 4096)
                    if not chunk:
                        return
                    pending += chunk
                    while b"\n" in pending:
                        line, pending = pending.split(b"\n", 1)
                        on_control(line.decode().strip())

    def answer(self, line: str) -> dict[str, Any]:
        """The reply to one control line: ``flows``, ``flows reset`` or (any other) stats."""
        if line == "flows":
            return {"flows": self.flows.report()}
        if line == "flows reset":
            self.flows.reset()
            return {"flows": []}
        return self.stats()

    def stats(self) -> dict[str, Any]:
        times = os.times()
        return {
            "cpu_seconds": times.user + times.system,
            "cpu_user": times.user,
            "cpu_system": times.system,
            "frames": self.frames,
            "super_frames": self.super_frames,
            "max_segments": self.max_segments,
            "cut_frames": self.cut_frames,
            "write_errors": self.write_errors,
            "last_write_error": self.last_write_error,
            "up": _channel_stats(self.up),
            "down": _channel_stats(self.down),
        }


def _admit_head(
    channel: Channel[bytes], now: float, frame: bytes, count: int, size: int
) -> tuple[bytes, int, int]:
    """Cut a super-packet that does not fit to the segments that do, as a drop-tail queue
    would (it takes them one by one until it is full); the tail is counted as dropped."""
    headers = headers_length(frame)
    assert headers is not None  # count > 1 means a TCP super-packet
    keep = int(channel.room(now) // (headers + segment_size(frame)))
    if keep < 1:
        return frame, count, size  # not even one segment fits: offer() drops it whole
    head = truncate(frame, keep)
    head_size = wire_size(head)
    channel.record_drop(size - head_size, count - keep)
    return head, keep, head_size


def _channel_stats(channel: Channel[bytes]) -> dict[str, float]:
    stats = channel.stats
    return {
        "offered_packets": stats.offered_packets,
        "offered_bytes": stats.offered_bytes,
        "dropped_packets": stats.dropped_packets,
        "dropped_bytes": stats.dropped_bytes,
        "delivered_packets": stats.delivered_packets,
        "delivered_bytes": stats.delivered_bytes,
        "max_backlog_bytes": stats.max_backlog_bytes,
    }


def _say(message: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.wan.forwarder")
    parser.add_argument("--edge", required=True, help="network namespace of the edge side")
    parser.add_argument("--cloud", required=True, help="network namespace of the cloud side")
    parser.add_argument("--device", required=True, help="the TUN device in both namespaces")
    parser.add_argument("--rtt-ms", type=float, required=True)
    parser.add_argument("--rate-mbit", type=float, required=True)
    parser.add_argument("--queue-bytes", type=int, required=True)
    parser.add_argument("--offload", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--fifo-priority", type=int, default=10)
    args = parser.parse_args(argv)

    priority = raise_priority(args.fifo_priority)
    edge_fd = open_tun(args.edge, args.device, offload=args.offload)
    cloud_fd = open_tun(args.cloud, args.device, offload=args.offload)

    def channel() -> Channel[bytes]:
        return Channel(
            delay=args.rtt_ms / 2000.0,
            rate_bps=args.rate_mbit * 1e6,
            queue_bytes=args.queue_bytes,
        )

    forwarder = Forwarder(edge_fd, cloud_fd, up=channel(), down=channel())
    _say({"ready": True, "pid": os.getpid(), "priority": priority, "offload": args.offload})
    forwarder.run(sys.stdin.fileno(), lambda line: _say(forwarder.answer(line)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
