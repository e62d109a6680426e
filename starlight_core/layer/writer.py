"""The Starlight layer writer: re-encode a tar stream so every file's content is addressable.

Feed it the *uncompressed* tar (``write``), collect the compressed output it returns, then
``close()``. The output is a concatenation of gzip members that decompresses to exactly the
input, with a member boundary at the start of every regular file's content, at every
``chunk_size`` boundary inside it, and at its end. Everything between file contents (headers,
padding, the end-of-archive blocks) shares "metadata" members. The result's TOC records, for
every chunk, where its member lies in the blob, so any file can be fetched with one HTTP Range
read and decompressed on its own. Memory stays constant: nothing is buffered beyond the
compressor's own window.
"""

from __future__ import annotations

import hashlib
from typing import Final

import attrs

from starlight_core.digest import Digest
from starlight_core.layer.members import MemberEncoder, marker_payload
from starlight_core.layer.tar import (
    NEED_DATA,
    ArchiveEnd,
    Content,
    EntryEnd,
    EntryStart,
    Header,
    Padding,
    TarReader,
    Trailer,
)
from starlight_core.layer.toc import DEFAULT_CHUNK_SIZE, TOC, Chunk, Entry, LayerInfo
from starlight_core.oci import OCI_LAYER_GZIP

__all__ = ["DEFAULT_LEVEL", "LayerWriter", "WrittenLayer"]

DEFAULT_LEVEL: Final = 6


@attrs.frozen
class WrittenLayer:
    toc: TOC
    uncompressed_size: int

    @property
    def digest(self) -> Digest:
        return self.toc.layer.digest

    @property
    def size(self) -> int:
        return self.toc.layer.size

    @property
    def diff_id(self) -> Digest:
        return self.toc.layer.diff_id


class LayerWriter:
    """Sans-I/O Starlight encoder: tar bytes in, gzip bytes out, a TOC at the end."""

    def __init__(
        self,
        *,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        level: int = DEFAULT_LEVEL,
        media_type: str = OCI_LAYER_GZIP,
    ) -> None:
        if chunk_size <= 0:
            raise ValueError("chunk_size must be positive")
        self._chunk_size = chunk_size
        self._level = level
        self._media_type = media_type
        self._reader = TarReader()
        self._out: list[bytes] = []
        self._out_offset = 0
        self._out_hash = hashlib.sha256()
        self._in_hash = hashlib.sha256()
        self._member: MemberEncoder | None = None
        self._member_start = 0
        self._member_is_content = False
        self._first = True
        self._entries: list[Entry] = []
        # The regular file whose content is flowing.
        self._chunks: list[Chunk] = []
        self._file_position = 0
        self._file_size = 0
        self._chunk_start = 0
        self._chunk_hash = hashlib.sha256()
        self._result: WrittenLayer | None = None

    # -- output ----------------------------------------------------------------------------

    def _emit(self, data: bytes) -> None:
        if data:
            self._out.append(data)
            self._out_offset += len(data)
            self._out_hash.update(data)

    def _open(self, *, content: bool) -> MemberEncoder:
        extra = marker_payload(self._chunk_size) if self._first else None
        self._first = False
        self._member = MemberEncoder(self._level, extra)
        self._member_start = self._out_offset
        self._member_is_content = content
        return self._member

    def _close_member(self) -> None:
        if self._member is not None:
            self._emit(self._member.finish())
            self._member = None

    def _meta(self, data: bytes) -> None:
        if self._member is None or self._member_is_content:
            self._close_member()
            self._open(content=False)
        assert self._member is not None
        self._emit(self._member.compress(data))

    def _drain(self) -> bytes:
        out = b"".join(self._out)
        self._out.clear()
        return out

    # -- input -----------------------------------------------------------------------------

    def write(self, data: bytes | bytearray | memoryview) -> bytes:
        """Feed uncompressed tar bytes; returns the compressed bytes ready so far."""
        if self._result is not None:
            raise RuntimeError("write after close")
        if data:
            self._in_hash.update(data)
            self._reader.receive_data(data)
            self._process()
        return self._drain()

    def close(self) -> bytes:
        """End of input: returns the last compressed bytes. ``result`` is available after."""
        if self._result is None:
            self._reader.receive_data(b"")
            self._process()
        return self._drain()

    @property
    def result(self) -> WrittenLayer:
        if self._result is None:
            raise RuntimeError("the layer is not finished: call close()")
        return self._result

    def _process(self) -> None:
        while True:
            event = self._reader.next_event()
            if event is NEED_DATA:
                return
            if isinstance(event, Header | Padding | Trailer):
                self._meta(event.data)
            elif isinstance(event, Content):
                self._content(event.data)
            elif isinstance(event, EntryStart):
                if event.entry.has_content:
                    self._close_member()
                    self._chunks = []
                    self._file_position = 0
                    self._chunk_start = 0
                    self._file_size = event.entry.size
            elif isinstance(event, EntryEnd):
                entry = event.entry
                if entry.has_content:
                    entry = attrs.evolve(entry, chunks=tuple(self._chunks))
                    self._chunks = []
                self._entries.append(entry)
            elif isinstance(event, ArchiveEnd):
                self._finish(event.size)
                return

    def _content(self, data: memoryview) -> None:
        while data:
            if self._member is None:
                self._open(content=True)
                self._chunk_start = self._file_position
                self._chunk_hash = hashlib.sha256()
            member = self._member
            assert member is not None
            room = self._chunk_size - (self._file_position - self._chunk_start)
            piece, data = data[:room], data[room:]
            self._emit(member.compress(piece))
            self._chunk_hash.update(piece)
            self._file_position += len(piece)
            if self._file_position - self._chunk_start == self._chunk_size:
                self._end_chunk()
        if self._file_position == self._file_size and self._member is not None:
            self._end_chunk()

    def _end_chunk(self) -> None:
        assert self._member is not None
        assert self._member_is_content
        self._close_member()
        self._chunks.append(
            Chunk(
                offset=self._chunk_start,
                size=self._file_position - self._chunk_start,
                compressed_offset=self._member_start,
                compressed_size=self._out_offset - self._member_start,
                digest=Digest.from_hasher(self._chunk_hash),
            )
        )

    def _finish(self, tar_size: int) -> None:
        if self._first:  # an empty input still becomes a valid (empty) gzip stream
            self._open(content=False)
        self._close_member()
        info = LayerInfo(
            digest=Digest.from_hasher(self._out_hash),
            size=self._out_offset,
            diff_id=Digest.from_hasher(self._in_hash),
            media_type=self._media_type,
        )
        self._result = WrittenLayer(
            TOC(layer=info, entries=tuple(self._entries), chunk_size=self._chunk_size),
            uncompressed_size=tar_size,
        )
