"""What the forwarder needs to know about a packet read from a TUN device with ``IFF_VNET_HDR``.

Each read yields a ``struct virtio_net_hdr`` (10 bytes, little endian on the hosts we run on)
followed by one IP packet. With TSO offload on, that packet may be a GSO *super-packet*: one
IP and TCP header followed by up to 64 KiB of payload that stands for ``ceil(payload /
gso_size)`` real segments, each of which would carry its own headers on a real wire. The link
charges the bytes those real segments would occupy, so a super-packet costs exactly what its
segments would.

When the router queue has room for only the first few segments of a super-packet,
``truncate`` cuts it to those (as a drop-tail queue would drop the rest one by one): the IP
length and header checksum, the partial TCP checksum (the pseudo-header sum the offload keeps
there includes the length) and the FIN/PSH flags, which belong to the last segment, are fixed.
"""

from __future__ import annotations

import struct
from typing import Final

__all__ = [
    "GSO_NONE",
    "GSO_TCPV4",
    "GSO_TCPV6",
    "VNET_HDR",
    "VNET_HDR_LEN",
    "headers_length",
    "segment_size",
    "segments",
    "truncate",
    "wire_size",
]

# struct virtio_net_hdr: flags, gso_type, hdr_len, gso_size, csum_start, csum_offset.
VNET_HDR: Final = struct.Struct("<BBHHHH")
VNET_HDR_LEN: Final = VNET_HDR.size
GSO_NONE: Final = 0
GSO_TCPV4: Final = 1
GSO_UDP: Final = 3
GSO_TCPV6: Final = 4
_GSO_ECN: Final = 0x80
_IPV4_HEADER_MIN: Final = 20
_IPV6_HEADER: Final = 40
_TCP: Final = 6
_TCP_FIN: Final = 0x01
_TCP_PSH: Final = 0x08


def headers_length(frame: bytes) -> int | None:
    """IP + TCP header length of the packet in ``frame`` (after the vnet header), if TCP."""
    ip = VNET_HDR_LEN
    if len(frame) < ip + _IPV4_HEADER_MIN:
        return None
    version = frame[ip] >> 4
    if version == 4:
        ip_len = (frame[ip] & 0x0F) * 4
        protocol = frame[ip + 9]
    elif version == 6:
        ip_len = _IPV6_HEADER
        protocol = frame[ip + 6]
    else:
        return None
    tcp = ip + ip_len
    if protocol != _TCP or len(frame) < tcp + 13:
        return None
    return ip_len + (frame[tcp + 12] >> 4) * 4


def segments(frame: bytes) -> int:
    """How many packets ``frame`` (vnet header + IP packet) stands for on a real wire."""
    _flags, gso_type, _hdr_len, gso_size, _start, _offset = VNET_HDR.unpack_from(frame)
    if gso_type & ~_GSO_ECN == GSO_NONE or gso_size == 0:
        return 1
    headers = headers_length(frame)
    if headers is None:
        # UDP fragmentation offload or something unexpected: count bytes as one packet.
        return 1
    payload = len(frame) - VNET_HDR_LEN - headers
    return max(1, -(-payload // int(gso_size)))


def wire_size(frame: bytes) -> int:
    """Bytes the packet(s) in ``frame`` occupy on the link: IP packets, headers of each segment.

    Link-layer framing is not charged: the configured rate is a rate of IP bytes.
    """
    count = segments(frame)
    size = len(frame) - VNET_HDR_LEN
    if count == 1:
        return size
    headers = headers_length(frame)
    assert headers is not None  # segments() found TCP headers, or count would be 1
    return size + (count - 1) * headers


def segment_size(frame: bytes) -> int:
    """The payload bytes per segment of a super-packet (0 when ``frame`` is a plain packet)."""
    _flags, gso_type, _hdr_len, gso_size, _start, _offset = VNET_HDR.unpack_from(frame)
    return 0 if gso_type & ~_GSO_ECN == GSO_NONE else gso_size


def _ones_complement_add(a: int, b: int) -> int:
    total = a + b
    while total > 0xFFFF:
        total = (total & 0xFFFF) + (total >> 16)
    return total


def _ipv4_header_checksum(header: bytes | bytearray) -> int:
    total = 0
    for i in range(0, len(header), 2):
        if i != 10:  # the checksum field itself counts as zero
            total = _ones_complement_add(total, (header[i] << 8) | header[i + 1])
    return ~total & 0xFFFF


def truncate(frame: bytes, keep: int) -> bytes:
    """The first ``keep`` segments (``1 <= keep < segments(frame)``) of a TCP super-packet."""
    count = segments(frame)
    headers = headers_length(frame)
    if headers is None or not 1 <= keep < count:
        raise ValueError(f"cannot keep {keep} of the {count} segments of this frame")
    flags, gso_type, hdr_len, gso_size, csum_start, csum_offset = VNET_HDR.unpack_from(frame)
    ip = VNET_HDR_LEN
    out = bytearray(frame[: ip + headers + keep * gso_size])
    old_length = len(frame) - ip
    new_length = len(out) - ip
    if frame[ip] >> 4 == 4:
        ip_len = (frame[ip] & 0x0F) * 4
        out[ip + 2 : ip + 4] = new_length.to_bytes(2, "big")
        out[ip + 10 : ip + 12] = _ipv4_header_checksum(out[ip : ip + ip_len]).to_bytes(2, "big")
    else:
        ip_len = _IPV6_HEADER
        out[ip + 4 : ip + 6] = (new_length - _IPV6_HEADER).to_bytes(2, "big")
    tcp = ip + ip_len
    out[tcp + 13] &= ~(_TCP_FIN | _TCP_PSH) & 0xFF
    # The check field holds the (uncomplemented) pseudo-header sum, whose TCP length changed:
    # take the old length out and put the new one in (RFC 1624 arithmetic).
    check = int.from_bytes(out[tcp + 16 : tcp + 18], "big")
    old_tcp_length = old_length - ip_len
    new_tcp_length = new_length - ip_len
    check = _ones_complement_add(check, ~old_tcp_length & 0xFFFF)
    check = _ones_complement_add(check, new_tcp_length)
    out[tcp + 16 : tcp + 18] = check.to_bytes(2, "big")
    if keep == 1:
        gso_type, gso_size = GSO_NONE, 0
    VNET_HDR.pack_into(out, 0, flags, gso_type, hdr_len, gso_size, csum_start, csum_offset)
    return bytes(out)
