"""Frames as a TUN device with IFF_VNET_HDR delivers them: segment counts, wire sizes, and
cutting a GSO super-packet to its first segments."""

from __future__ import annotations

import os
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from benchmarks.wan.packet import (
    GSO_NONE,
    GSO_TCPV4,
    GSO_TCPV6,
    VNET_HDR,
    VNET_HDR_LEN,
    headers_length,
    segment_size,
    segments,
    truncate,
    wire_size,
)

SRC4, DST4 = bytes([10, 77, 0, 1]), bytes([10, 77, 0, 2])
SRC6, DST6 = bytes(15) + b"\x01", bytes(15) + b"\x02"
FIN, PSH, ACK = 0x01, 0x08, 0x10
TCP_HEADER = 32  # with the timestamps option, as Linux sends it
MSS = 1448


def _sum16(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total > 0xFFFF:
        total = (total & 0xFFFF) + (total >> 16)
    return total


def _pseudo_sum(src: bytes, dst: bytes, tcp_length: int) -> int:
    """What the kernel leaves in the TCP check field of a CHECKSUM_PARTIAL packet: the folded,
    uncomplemented sum of the pseudo header (which includes the TCP length)."""
    if len(src) == 4:
        pseudo = src + dst + struct.pack("!BBH", 0, 6, tcp_length)
    else:
        pseudo = src + dst + struct.pack("!I3xB", tcp_length, 6)
    return _sum16(pseudo)


def _tcp(payload: bytes, flags: int, src: bytes, dst: bytes) -> bytes:
    header = bytearray(TCP_HEADER)
    struct.pack_into("!HHIIBB", header, 0, 40000, 5000, 1, 1, (TCP_HEADER // 4) << 4, flags)
    header[20:32] = b"\x01\x01\x08\x0a" + bytes(8)  # NOP NOP timestamps
    check = _pseudo_sum(src, dst, TCP_HEADER + len(payload))
    header[16:18] = check.to_bytes(2, "big")
    return bytes(header) + payload


def frame4(payload: bytes, *, gso_size: int = MSS, flags: int = ACK | PSH | FIN) -> bytes:
    tcp = _tcp(payload, flags, SRC4, DST4)
    ip = bytearray(struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(tcp), 7, 0x4000, 64, 6, 0,
                               SRC4, DST4))  # fmt: skip
    ip[10:12] = (~_sum16(bytes(ip)) & 0xFFFF).to_bytes(2, "big")
    gso = GSO_TCPV4 if len(payload) > gso_size else GSO_NONE
    vnet = VNET_HDR.pack(1, gso, 20 + TCP_HEADER, gso_size if gso else 0, 20, 16)
    return vnet + bytes(ip) + tcp


def frame6(payload: bytes, *, gso_size: int = MSS, flags: int = ACK | FIN) -> bytes:
    tcp = _tcp(payload, flags, SRC6, DST6)
    ip = struct.pack("!IHBB16s16s", 6 << 28, len(tcp), 6, 64, SRC6, DST6)
    gso = GSO_TCPV6 if len(payload) > gso_size else GSO_NONE
    vnet = VNET_HDR.pack(1, gso, 40 + TCP_HEADER, gso_size if gso else 0, 40, 16)
    return vnet + ip + tcp


def test_a_plain_packet_is_one_segment_of_its_own_size() -> None:
    frame = frame4(bytes(100))
    assert segments(frame) == 1
    assert wire_size(frame) == 20 + TCP_HEADER + 100
    assert segment_size(frame) == 0
    assert headers_length(frame) == 20 + TCP_HEADER


@pytest.mark.parametrize(("payload", "count"), [(MSS * 10, 10), (MSS * 10 + 1, 11)])
def test_a_super_packet_costs_the_headers_of_every_segment(payload: int, count: int) -> None:
    frame = frame4(os.urandom(payload))
    assert segments(frame) == count
    assert wire_size(frame) == payload + count * (20 + TCP_HEADER)
    frame = frame6(os.urandom(payload))
    assert segments(frame) == count
    assert wire_size(frame) == payload + count * (40 + TCP_HEADER)


def test_something_else_than_tcp_counts_as_one_packet() -> None:
    udp = bytearray(frame4(bytes(3000)))
    udp[VNET_HDR_LEN + 9] = 17
    assert segments(bytes(udp)) == 1
    assert wire_size(bytes(udp)) == len(udp) - VNET_HDR_LEN


def _check_cut(original: bytes, cut: bytes, keep: int) -> None:
    ip = VNET_HDR_LEN
    version = cut[ip] >> 4
    ip_len = 20 if version == 4 else 40
    headers = ip_len + TCP_HEADER
    payload = original[ip + headers :]
    assert cut[ip + headers :] == payload[: keep * MSS]  # the head, byte for byte
    assert segments(cut) == keep
    assert wire_size(cut) == keep * (MSS + headers)
    tcp = ip + ip_len
    if version == 4:
        assert int.from_bytes(cut[ip + 2 : ip + 4], "big") == headers + keep * MSS
        assert _sum16(cut[ip : ip + 20]) == 0xFFFF  # a valid IPv4 header checksum
        src, dst = SRC4, DST4
    else:
        assert int.from_bytes(cut[ip + 4 : ip + 6], "big") == TCP_HEADER + keep * MSS
        src, dst = SRC6, DST6
    check = int.from_bytes(cut[tcp + 16 : tcp + 18], "big")
    expected = _pseudo_sum(src, dst, TCP_HEADER + keep * MSS)
    assert check % 0xFFFF == expected % 0xFFFF  # 0 and 0xFFFF are one value
    assert cut[tcp + 13] & (FIN | PSH) == 0  # they belong to the dropped last segment
    assert cut[tcp + 13] & ACK
    flags, gso_type, *_rest = VNET_HDR.unpack_from(cut)
    original_type = VNET_HDR.unpack_from(original)[1]
    assert flags == 1
    assert gso_type == (GSO_NONE if keep == 1 else original_type)
    # Everything else in the headers is untouched.
    assert cut[tcp : tcp + 13] == original[tcp : tcp + 13]


@given(st.integers(2, 44), st.integers(0, MSS - 1), st.data())  # ≤ 64 KiB IP packets
def test_truncate_keeps_a_consistent_head(full: int, extra: int, data: st.DataObject) -> None:
    count = full + (1 if extra else 0)
    keep = data.draw(st.integers(1, count - 1))
    payload = os.urandom(full * MSS + extra)
    for make in (frame4, frame6):
        original = make(payload)
        assert segments(original) == count
        _check_cut(original, truncate(original, keep), keep)


@pytest.mark.parametrize("keep", [0, 3, 4])
def test_truncate_refuses_to_keep_nothing_or_everything(keep: int) -> None:
    with pytest.raises(ValueError, match="cannot keep"):
        truncate(frame4(bytes(3 * MSS)), keep)


def test_truncate_refuses_a_plain_packet() -> None:
    with pytest.raises(ValueError, match="cannot keep"):
        truncate(frame4(bytes(100)), 1)
