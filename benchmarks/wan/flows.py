"""What each TCP connection carried across the link, counted by the forwarder (no I/O here).

The harness compares methods that talk very differently (a stock pull's many requests over a
few connections, starlight's one request, curl's one request), so it counts at the one place
every byte passes: the forwarder. For each connection, keyed by its edge-side port and its
cloud-side port, ``FlowTable`` keeps

- when its SYN reached the cloud (``opened``), when the first and the last byte of payload
  reached the edge (``first_down``, ``last_down``);
- the bytes it put on the wire each way (IP bytes of every segment, retransmissions
  included: what the link really carried) and the payload bytes;
- ``requests``: how many times the client began to send after having received (a request
  after its response, as HTTP/1.1 on a kept-alive connection does): with the handshake, these
  are the round trips the client waited on.

Times are those of the caller's clock (the forwarder passes ``time.monotonic()``, which is
system-wide, so the harness can compare them with its own). Only IPv4 TCP is counted (the
link carries nothing else: IPv6 is off on its devices).
"""

from __future__ import annotations

from typing import Any, Final

import attrs

from benchmarks.wan.packet import VNET_HDR_LEN, wire_size

__all__ = ["Flow", "FlowSummary", "FlowTable", "summarise"]

_TCP: Final = 6
_SYN: Final = 0x02
_ACK: Final = 0x10


@attrs.define
class Flow:
    edge_port: int
    cloud_port: int
    opened: float | None = None
    first_down: float | None = None
    last_down: float | None = None
    down_bytes: int = 0
    up_bytes: int = 0
    down_payload: int = 0
    up_payload: int = 0
    requests: int = 0
    awaiting: bool = False
    """The client sent payload and has not yet received any since."""

    def as_dict(self) -> dict[str, Any]:
        return attrs.asdict(self)


class FlowTable:
    """Connections seen since the last ``reset``; ``observe`` every delivered frame."""

    def __init__(self) -> None:
        self._flows: dict[tuple[int, int], Flow] = {}
        self._closed: list[Flow] = []

    def observe(self, up: bool, frame: bytes, now: float) -> None:
        """Count ``frame`` (vnet header + IP packet), delivered at ``now``; ``up`` is edge →
        cloud."""
        ip = VNET_HDR_LEN
        if len(frame) < ip + 20 or frame[ip] >> 4 != 4 or frame[ip + 9] != _TCP:
            return
        tcp = ip + (frame[ip] & 0x0F) * 4
        if len(frame) < tcp + 20:
            return
        source = int.from_bytes(frame[tcp : tcp + 2], "big")
        destination = int.from_bytes(frame[tcp + 2 : tcp + 4], "big")
        flags = frame[tcp + 13]
        payload = len(frame) - tcp - (frame[tcp + 12] >> 4) * 4
        key = (source, destination) if up else (destination, source)
        flow = self._flows.get(key)
        if up and flags & _SYN and not flags & _ACK:
            # A new connection (or a port reused after the old one closed).
            if flow is not None:
                self._closed.append(flow)
            flow = self._flows[key] = Flow(edge_port=key[0], cloud_port=key[1], opened=now)
        elif flow is None:
            flow = self._flows[key] = Flow(edge_port=key[0], cloud_port=key[1])
        size = wire_size(frame)
        if up:
            flow.up_bytes += size
            if payload > 0:
                flow.up_payload += payload
                if not flow.awaiting:
                    flow.requests += 1
                    flow.awaiting = True
        else:
            flow.down_bytes += size
            if payload > 0:
                flow.down_payload += payload
                flow.awaiting = False
                if flow.first_down is None:
                    flow.first_down = now
                flow.last_down = now

    def flows(self) -> list[Flow]:
        return [*self._closed, *self._flows.values()]

    def report(self) -> list[dict[str, Any]]:
        return [flow.as_dict() for flow in self.flows()]

    def reset(self) -> None:
        self._flows.clear()
        self._closed.clear()


@attrs.frozen
class FlowSummary:
    """What a measurement's connections add up to."""

    connections: int
    requests: int
    wire_bytes: int
    down_payload: int
    first_down: float | None
    last_down: float | None

    @property
    def round_trips(self) -> int:
        """Handshakes plus request/response exchanges the client waited on."""
        return self.connections + self.requests


def summarise(flows: list[dict[str, Any]], *, since: float = float("-inf")) -> FlowSummary:
    """Add up ``FlowTable.report()`` rows (connections opened before ``since`` still count
    their bytes, not their handshake)."""
    firsts = [f["first_down"] for f in flows if f["first_down"] is not None]
    lasts = [f["last_down"] for f in flows if f["last_down"] is not None]
    return FlowSummary(
        connections=sum(1 for f in flows if f["opened"] is not None and f["opened"] >= since),
        requests=sum(int(f["requests"]) for f in flows),
        wire_bytes=sum(int(f["down_bytes"]) + int(f["up_bytes"]) for f in flows),
        down_payload=sum(int(f["down_payload"]) for f in flows),
        first_down=min(firsts) if firsts else None,
        last_down=max(lasts) if lasts else None,
    )
