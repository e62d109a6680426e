"""Gzip members: writing them one at a time, and decoding a concatenation while reporting where
each member starts (in the compressed and the uncompressed stream).

A Starlight layer is a concatenation of gzip members (RFC 1952 allows any number); any gzip
reader decompresses it to the plain tar. The first member carries an ``SL`` extra subfield that
marks the blob as Starlight-format without changing a single decompressed byte.
"""

from __future__ import annotations

import struct
import zlib
from typing import Final

import attrs

from starlight_core.errors import CorruptLayer

__all__ = [
    "MARKER_ID",
    "MemberDecoder",
    "MemberEncoder",
    "MemberEnd",
    "MemberStart",
    "Uncompressed",
    "marker_payload",
    "parse_marker",
]

GZIP_MAGIC: Final = b"\x1f\x8b"
MARKER_ID: Final = b"SL"
_MARKER_PREFIX: Final = b"starlight/1;chunk="
_FEXTRA: Final = 0x04
_OS_UNKNOWN: Final = 255
MAX_OUTPUT_STEP: Final = 1 << 20  # bound what one decompress call may allocate
_FIRST_STEP: Final = 4096
_MAX_STEP: Final = 1 << 20


def marker_payload(chunk_size: int) -> bytes:
    return _MARKER_PREFIX + str(chunk_size).encode()


def _header(extra: bytes | None) -> bytes:
    flags = _FEXTRA if extra is not None else 0
    # mtime 0 and OS "unknown": the encoding is deterministic, so a re-conversion of the
    # same layer yields the same blob digest.
    head = GZIP_MAGIC + bytes([8, flags]) + b"\x00\x00\x00\x00" + bytes([0, _OS_UNKNOWN])
    if extra is None:
        return head
    subfield = MARKER_ID + struct.pack("<H", len(extra)) + extra
    return head + struct.pack("<H", len(subfield)) + subfield


class MemberEncoder:
    """One gzip member, written incrementally."""

    __slots__ = ("_compressor", "_crc", "_started", "size")

    def __init__(self, level: int, extra: bytes | None = None) -> None:
        self._compressor = zlib.compressobj(level, zlib.DEFLATED, -zlib.MAX_WBITS, 9)
        self._crc = 0
        self.size = 0
        self._started = _header(extra)

    def compress(self, data: bytes | memoryview) -> bytes:
        self._crc = zlib.crc32(data, self._crc)
        self.size += len(data)
        out = self._compressor.compress(data)
        if self._started:
            out, self._started = self._started + out, b""
        return out

    def finish(self) -> bytes:
        tail = self._compressor.flush(zlib.Z_FINISH)
        trailer = struct.pack("<II", self._crc, self.size & 0xFFFFFFFF)
        out = self._started + tail + trailer
        self._started = b""
        return out


def parse_marker(prefix: bytes) -> int | None:
    """The chunk size recorded by the Starlight marker in a blob's first bytes, else None.

    ``prefix`` must hold the whole first member header (64 bytes are plenty).
    """
    if len(prefix) < 12 or prefix[:2] != GZIP_MAGIC or not prefix[3] & _FEXTRA:
        return None
    (xlen,) = struct.unpack_from("<H", prefix, 10)
    extra = prefix[12 : 12 + xlen]
    pos = 0
    while pos + 4 <= len(extra):
        ident = extra[pos : pos + 2]
        (length,) = struct.unpack_from("<H", extra, pos + 2)
        data = extra[pos + 4 : pos + 4 + length]
        if ident == MARKER_ID and data.startswith(_MARKER_PREFIX):
            try:
                return int(data[len(_MARKER_PREFIX) :])
            except ValueError:
                return None
        pos += 4 + length
    return None


@attrs.frozen
class MemberStart:
    compressed_offset: int
    uncompressed_offset: int


@attrs.frozen
class Uncompressed:
    data: bytes


@attrs.frozen
class MemberEnd:
    compressed_offset: int
    """Offset just past the member's trailer."""
    uncompressed_offset: int


MemberEvent = MemberStart | Uncompressed | MemberEnd


class MemberDecoder:
    """Decompress concatenated gzip members, reporting their boundaries.

    Feed with ``feed(data)`` (``b""`` at end of input); it returns the events for those bytes.
    Output is produced in steps of at most 1 MiB per input slice, so a gzip bomb cannot make it
    allocate more than that at once.
    """

    def __init__(self) -> None:
        self._decompressor: zlib._Decompress | None = None
        self._compressed = 0  # compressed bytes consumed so far
        self._uncompressed = 0
        self._member_compressed_start = 0
        self._ended = False
        self._tail = b""  # a lone first byte of the next member's magic
        self._step = _FIRST_STEP

    @property
    def uncompressed_size(self) -> int:
        return self._uncompressed

    @property
    def compressed_size(self) -> int:
        return self._compressed

    def feed(self, data: bytes) -> list[MemberEvent]:
        if self._ended:
            raise RuntimeError("feed after end of input")
        events: list[MemberEvent] = []
        if not data:
            self._ended = True
            if self._decompressor is not None or self._tail:
                raise CorruptLayer(
                    f"truncated gzip stream: input ends inside a member at byte {self._compressed}"
                )
            return events
        view = memoryview(self._tail + data)
        self._tail = b""
        pos = 0
        while pos < len(view):
            if self._decompressor is None:
                if len(view) - pos < 2:
                    self._tail = bytes(view[pos:])
                    break
                if bytes(view[pos : pos + 2]) != GZIP_MAGIC:
                    raise CorruptLayer(
                        "not a gzip stream: unexpected bytes at compressed offset "
                        f"{self._compressed}"
                    )
                self._decompressor = zlib.decompressobj(16 + zlib.MAX_WBITS)
                self._member_compressed_start = self._compressed
                self._step = _FIRST_STEP
                events.append(MemberStart(self._compressed, self._uncompressed))
            decompressor = self._decompressor
            # Hand zlib a bounded slice: what it does not use comes back as a copy
            # (unused_data), so slices that grow only for long members keep the work linear.
            piece = view[pos : pos + self._step]
            try:
                out = decompressor.decompress(piece, MAX_OUTPUT_STEP)
                while True:
                    if out:
                        self._uncompressed += len(out)
                        events.append(Uncompressed(out))
                    if decompressor.eof:
                        break
                    if decompressor.unconsumed_tail:
                        out = decompressor.decompress(decompressor.unconsumed_tail, MAX_OUTPUT_STEP)
                    elif len(out) == MAX_OUTPUT_STEP:
                        out = decompressor.decompress(b"", MAX_OUTPUT_STEP)  # pending output
                    else:
                        break
            except zlib.error as exc:
                raise CorruptLayer(
                    f"corrupt gzip stream in the member at compressed offset "
                    f"{self._member_compressed_start}: {exc}"
                ) from None
            if decompressor.eof:
                used = len(piece) - len(decompressor.unused_data)
                pos += used
                self._compressed += used
                self._decompressor = None
                events.append(MemberEnd(self._compressed, self._uncompressed))
            else:
                pos += len(piece)
                self._compressed += len(piece)
                self._step = min(self._step * 2, _MAX_STEP)
        return events
