"""Reading layers: the TOC of an already-converted blob, and plain decompression of any layer.

``LayerScanner`` takes a blob's compressed bytes and rebuilds its TOC from the gzip member
boundaries, checking on the way that the blob *is* in Starlight format: every regular file's
content starts a member, each chunk is exactly one member, and content ends at a member
boundary. A blob that is not (a layer compressed as one gzip stream, say) fails fast with
``NotStarlightFormat`` at its first file. The proxy scans a layer once, on notify.

``LayerDecoder`` turns any supported layer blob (gzip, possibly multi-member, or plain tar) into
the uncompressed tar stream, for the converter.
"""

from __future__ import annotations

import hashlib
from typing import Final

import attrs

from starlight_core.digest import Digest
from starlight_core.errors import CorruptLayer, NotStarlightFormat, UnsupportedLayer
from starlight_core.layer.members import (
    GZIP_MAGIC,
    MemberDecoder,
    MemberEnd,
    MemberStart,
    Uncompressed,
    parse_marker,
)
from starlight_core.layer.tar import (
    NEED_DATA,
    ArchiveEnd,
    Content,
    EntryEnd,
    EntryStart,
    TarReader,
)
from starlight_core.layer.toc import DEFAULT_CHUNK_SIZE, TOC, Chunk, Entry, LayerInfo
from starlight_core.oci import OCI_LAYER_GZIP

__all__ = ["LayerDecoder", "LayerScanner", "is_starlight_prefix", "sniff_compression"]

ZSTD_MAGIC: Final = b"\x28\xb5\x2f\xfd"
MARKER_PREFIX_SIZE: Final = 128


def is_starlight_prefix(prefix: bytes) -> bool:
    """Quick check on a blob's first bytes (``MARKER_PREFIX_SIZE`` are enough): does it carry
    the Starlight marker? The marker is a promise; ``LayerScanner`` verifies it."""
    return parse_marker(prefix) is not None


def sniff_compression(prefix: bytes) -> str:
    """``"gzip"``, ``"tar"`` or raise ``UnsupportedLayer`` for what we cannot read."""
    if prefix[:2] == GZIP_MAGIC:
        return "gzip"
    if prefix[:4] == ZSTD_MAGIC:
        raise UnsupportedLayer("zstd-compressed layers are not supported; use gzip layers")
    if len(prefix) >= 263 and prefix[257:262] == b"ustar":
        return "tar"
    if len(prefix) >= 512 and prefix[:1024].strip(b"\x00") == b"":
        return "tar"  # an empty archive
    raise CorruptLayer("layer is neither gzip nor tar")


class LayerDecoder:
    """Any layer blob in, the uncompressed tar out (sans-I/O, bounded memory)."""

    def __init__(self) -> None:
        self._kind: str | None = None
        self._prefix = b""
        self._members = MemberDecoder()
        self._in_hash = hashlib.sha256()
        self.compressed_size = 0

    def feed(self, data: bytes) -> list[bytes]:
        """Return the uncompressed pieces for ``data`` (``b""`` at end of input)."""
        self._in_hash.update(data)
        self.compressed_size += len(data)
        if self._kind is not None:
            return self._decode(data)
        self._prefix += data
        if data and len(self._prefix) < 1024:
            return []  # not enough to tell gzip from tar yet
        if not self._prefix:
            raise CorruptLayer("empty layer blob")
        self._kind = sniff_compression(self._prefix)
        pieces = self._decode(self._prefix)
        self._prefix = b""
        if not data:
            pieces += self._decode(b"")
        return pieces

    def _decode(self, data: bytes) -> list[bytes]:
        if self._kind == "tar":
            return [data] if data else []
        return [e.data for e in self._members.feed(data) if isinstance(e, Uncompressed)]

    @property
    def digest(self) -> Digest:
        """Digest of the compressed input seen so far (the blob digest once complete)."""
        return Digest.from_hasher(self._in_hash.copy())


@attrs.define
class _OpenChunk:
    """A chunk being scanned: its compressed size is known once the next member starts."""

    offset: int
    compressed_offset: int
    member_index: int
    hasher: hashlib._Hash
    size: int = 0


class LayerScanner:
    """Rebuild the TOC of a Starlight-format blob from its bytes; refuse other blobs."""

    def __init__(self, *, media_type: str = OCI_LAYER_GZIP) -> None:
        self._media_type = media_type
        self._members = MemberDecoder()
        self._tar = TarReader()
        self._blob_hash = hashlib.sha256()
        self._tar_hash = hashlib.sha256()
        self._prefix = b""
        self._chunk_size: int | None = None
        # Member starts: uncompressed offset -> (compressed offset, index).
        self._member_at: dict[int, tuple[int, int]] = {}
        self._member_compressed_starts: list[int] = []
        self._member_uncompressed_ends: list[int] = []
        # Entries in order; a file's chunks stay open until the members' extents are known.
        self._entries: list[tuple[Entry, list[_OpenChunk]]] = []
        self._open_entry: Entry | None = None
        self._file_chunks: list[_OpenChunk] = []
        self._file_end: int | None = None
        self._boundaries_to_check: list[tuple[int, str]] = []
        self._toc: TOC | None = None

    def receive_data(self, data: bytes) -> None:
        """Feed the blob's compressed bytes in order; ``b""`` ends the input."""
        if self._toc is not None:
            raise RuntimeError("receive_data after the end")
        if data and self._chunk_size is None and len(self._prefix) < 128:
            self._prefix += data[: 128 - len(self._prefix)]
        self._blob_hash.update(data)
        for event in self._members.feed(data):
            if isinstance(event, MemberStart):
                index = len(self._member_compressed_starts)
                self._member_at[event.uncompressed_offset] = (event.compressed_offset, index)
                self._member_compressed_starts.append(event.compressed_offset)
            elif isinstance(event, MemberEnd):
                self._member_uncompressed_ends.append(event.uncompressed_offset)
            else:
                self._tar_hash.update(event.data)
                self._tar.receive_data(event.data)
                self._drain_tar()
        if not data:
            self._tar.receive_data(b"")
            self._drain_tar()

    def _drain_tar(self) -> None:
        while True:
            event = self._tar.next_event()
            if event is NEED_DATA:
                return
            if isinstance(event, EntryStart):
                if event.entry.has_content:
                    self._start_file(event.entry)
            elif isinstance(event, Content):
                self._content(event)
            elif isinstance(event, EntryEnd):
                self._end_entry(event.entry)
            elif isinstance(event, ArchiveEnd):
                self._finish(event.size)
                return

    def _not_starlight(self, reason: str) -> NotStarlightFormat:
        return NotStarlightFormat(f"layer is not in Starlight format: {reason}")

    def _start_file(self, entry: Entry) -> None:
        # Whether the content starts a member is checked at its first byte: the member's
        # start is only seen once the decoder reaches it, after the tar header was parsed.
        self._open_entry = entry
        self._file_chunks = []
        self._file_end = entry.offset + entry.size

    def _content(self, event: Content) -> None:
        entry = self._open_entry
        assert entry is not None
        start = self._member_at.get(event.offset)
        if start is None and not self._file_chunks:
            raise self._not_starlight(
                f"the content of {entry.name!r} (tar offset {entry.offset}) "
                "does not start a gzip member"
            )
        if start is not None:
            compressed_offset, index = start
            self._file_chunks.append(
                _OpenChunk(
                    offset=event.offset - entry.offset,
                    compressed_offset=compressed_offset,
                    member_index=index,
                    hasher=hashlib.sha256(),
                )
            )
        current = self._file_chunks[-1]
        current.hasher.update(event.data)
        current.size += len(event.data)

    def _end_entry(self, entry: Entry) -> None:
        chunks: list[_OpenChunk] = []
        if entry.has_content:
            assert self._file_end is not None
            # The member holding the file's last byte must end exactly where the content ends.
            self._boundaries_to_check.append((self._file_end, entry.name))
            chunks = self._file_chunks
            self._open_entry = None
            self._file_chunks = []
            self._file_end = None
        self._entries.append((entry, chunks))

    def _finish(self, tar_size: int) -> None:
        ends = set(self._member_uncompressed_ends)
        for offset, name in self._boundaries_to_check:
            if offset not in ends:
                raise self._not_starlight(f"the content of {name!r} does not end a gzip member")
        blob_size = self._members.compressed_size
        starts = [*self._member_compressed_starts, blob_size]
        entries: list[Entry] = []
        for entry, open_chunks in self._entries:
            if open_chunks:
                chunks = tuple(
                    Chunk(
                        offset=c.offset,
                        size=c.size,
                        compressed_offset=c.compressed_offset,
                        compressed_size=starts[c.member_index + 1] - c.compressed_offset,
                        digest=Digest.from_hasher(c.hasher),
                    )
                    for c in open_chunks
                )
                entry = attrs.evolve(entry, chunks=chunks)
            entries.append(entry)
        chunk_size = parse_marker(self._prefix) or max(
            (c.size for e in entries for c in e.chunks), default=DEFAULT_CHUNK_SIZE
        )
        info = LayerInfo(
            digest=Digest.from_hasher(self._blob_hash),
            size=blob_size,
            diff_id=Digest.from_hasher(self._tar_hash),
            media_type=self._media_type,
        )
        self._toc = TOC(layer=info, entries=tuple(entries), chunk_size=chunk_size)

    @property
    def toc(self) -> TOC:
        if self._toc is None:
            raise RuntimeError("the blob is not finished: call receive_data(b'')")
        return self._toc
