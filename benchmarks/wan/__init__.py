"""The emulated WAN link of the benchmark harness: a "cloud" and an "edge" network namespace
joined by a link of chosen round-trip time, rate and router buffer.

    from benchmarks.wan import WanLink
    with WanLink(rtt_ms=150, rate_mbit=100) as link:
        print(link.verify().render())            # measured RTT and throughput vs configured
        registry = Registry(workdir, netns=link.cloud, listen=link.cloud_ip)
        ...                                      # containerd, daemon: netns=link.edge

or from a shell: ``python -m benchmarks.wan.link --rtt 150 --rate 100 --verify`` (``--sweep`` for
the default settings, no ``--verify`` to keep the link up until Ctrl-C). Needs root.
``python -m benchmarks.wan`` runs the whole benchmark over such links (``harness.py``).

How the link is emulated, and why so
------------------------------------
The kernels we run on have no ``netem`` (CONFIG_NET_SCH_NETEM unset), so the link is emulated
at the *packet* level by a process of ours, never by a TCP relay: a relay would end each TCP
connection at itself and hide the RTT from both ends. Each namespace routes the other's
address through a TUN device (``wan0``, MTU 1500); the forwarder (``forwarder.py``) reads each
IP packet the kernel sends into one device, keeps it for the link's time and writes it,
unchanged, into the other device. The two TCP stacks talk end to end: the handshake costs one
real RTT, slow start grows the window once per RTT from 10 segments, and the window needed to
fill the link is the real bandwidth-delay product.

Per direction (``channel.py``, no I/O): a drop-tail router queue of ``queue_bytes`` (default one
bandwidth-delay product, at least 64 KiB), a serialiser at the configured rate
(``depart = max(arrival, previous departure) + size / rate``), then half the RTT of
propagation (``deliver = depart + rtt / 2``). The rate counts IP bytes (headers of every
segment included, no link-layer framing), so TCP's payload peaks at 1448 / 1500 ≈ 96.5 % of
it.

Packet rate. 200 Mbit/s of 1500-byte packets is 17,000 packets per second, plus their ACKs:
moved one by one, that costs the forwarder most of a core on this VM. Instead of a huge MTU
(which would make the initial window 10 × a huge MSS and slow start unrealistically fast) the
devices use TUN offloads
(``IFF_VNET_HDR`` with checksum and TCP segmentation offload): the sending kernel hands over
GSO super-packets of several 1448-byte segments in one read, the forwarder charges each the
wire bytes of all its segments, and the receiving kernel takes it back as it takes a GRO batch
from a NIC. TCP still works with MSS 1448 (10 segments initial window, real slow start).

The price is grain: a super-packet crosses the link as one unit (its first segment arrives
when its last would) and is acknowledged with one ACK. The devices' ``gso_max_segs`` bounds a
super-packet to about 1 ms of link time (2 segments at 10 Mbit/s, 8 at 100, 17 at 200;
``LinkConfig.effective_gso_segments``): far below every RTT of the sweep, and small enough that
the ACK aggregation does not inflate BBR's window (with the kernel's 45-segment maximum it
multiplied drops at 200 Mbit/s). When the queue has room for only the head of a super-packet,
the head is admitted and the tail dropped (``packet.truncate``), as a drop-tail queue fed
segment by segment would. The forwarder runs as its own process with real-time priority
(``SCHED_FIFO``; ``nice -10`` where that is refused), so the benchmark's own CPU use does not
disturb it.

Measured on the development VM (2 shared cores, other work running), every setting of
``DEFAULT_SWEEP``: RTT within 0.5 ms of the configured one (connect time; the forwarder and
the measuring code add 0.15-0.3 ms per round trip, which only the 2 ms link notices),
steady-state TCP payload rate within 0.5 % of the ceiling ``rate × 1448 / 1500``; the
forwarder used 15-16 % of one core at 100 Mbit/s and 16-18 % at 200 Mbit/s (without offload:
26 % at 50, 71 % at 200), and held its rate with two CPU hogs running beside it.

Host tuning in both namespaces (``link.py``): no TCP metrics cache (every connection starts
from a fresh slow start), socket-buffer maxima well above the path's capacity, IPv6 off on
``wan0``; the congestion control is the host's default, inherited (a namespace may not pick one
the host does not allow).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from benchmarks.wan.link import CLOUD_IP, DEFAULT_SWEEP, EDGE_IP, LinkConfig, WanLink
    from benchmarks.wan.netns import call_in_netns, netns_argv, remove_stale
    from benchmarks.wan.verify import LinkReport, verify_link

# Imported on first use, not here: ``python -m benchmarks.wan.link`` runs that module as
# ``__main__``, which the package must not have imported already.
_HOMES = {
    "CLOUD_IP": "link",
    "DEFAULT_SWEEP": "link",
    "EDGE_IP": "link",
    "LinkConfig": "link",
    "WanLink": "link",
    "call_in_netns": "netns",
    "netns_argv": "netns",
    "remove_stale": "netns",
    "LinkReport": "verify",
    "verify_link": "verify",
}


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"benchmarks.wan.{home}"), name)


__all__ = [
    "CLOUD_IP",
    "DEFAULT_SWEEP",
    "EDGE_IP",
    "LinkConfig",
    "LinkReport",
    "WanLink",
    "call_in_netns",
    "netns_argv",
    "remove_stale",
    "verify_link",
]
