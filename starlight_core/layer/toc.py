"""The TOC of a Starlight layer: every entry's metadata and where its content lives in the blob.

A ``TOC`` is what the proxy stores per layer and what the worker receives in a bundle header.
Its JSON form (``starlight_core.wire``) is versioned and stable: ``{"version": 1, ...}``.
"""

from __future__ import annotations

import enum
import posixpath
from collections.abc import Iterator, Mapping
from typing import Final

import attrs

from starlight_core.digest import EMPTY_SHA256, Digest

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "OPAQUE_MARKER",
    "TOC",
    "TOC_VERSION",
    "WHITEOUT_PREFIX",
    "Chunk",
    "Entry",
    "EntryType",
    "LayerInfo",
]

TOC_VERSION: Final = 1
DEFAULT_CHUNK_SIZE: Final = 4 * 1024 * 1024
WHITEOUT_PREFIX: Final = ".wh."
OPAQUE_MARKER: Final = ".wh..wh..opq"
WHITEOUT_META_PREFIX: Final = ".wh..wh."


class EntryType(enum.Enum):
    FILE = "reg"
    DIR = "dir"
    SYMLINK = "symlink"
    HARDLINK = "hardlink"
    CHAR = "char"
    BLOCK = "block"
    FIFO = "fifo"
    WHITEOUT = "whiteout"
    """``dir/.wh.name``: ``dir/name`` from lower layers is deleted."""
    OPAQUE = "opaque"
    """``dir/.wh..wh..opq``: ``dir`` hides everything lower layers put in it."""


@attrs.frozen
class Chunk:
    """One independently decompressible piece of a file's content: one gzip member."""

    offset: int
    """Offset of this chunk within the file's content."""
    size: int
    """Uncompressed size."""
    compressed_offset: int
    """Offset of the gzip member within the layer blob."""
    compressed_size: int
    digest: Digest
    """sha256 of the uncompressed chunk."""


@attrs.frozen
class Entry:
    """One tar entry, as the root filesystem needs it.

    ``name`` is the normalised path (no leading ``./`` or ``/``, no trailing ``/``); for
    whiteouts and opaque markers it is the marker's own path (see ``whiteout_target``).
    """

    name: str
    type: EntryType
    mode: int = 0o644
    """Permission bits including setuid/setgid/sticky (``& 0o7777``)."""
    uid: int = 0
    gid: int = 0
    uname: str = ""
    gname: str = ""
    mtime_ns: int = 0
    size: int = 0
    linkname: str = ""
    """Symlink target as written; hard link target as a normalised path in the same layer."""
    devmajor: int = 0
    devminor: int = 0
    xattrs: Mapping[str, bytes] = attrs.field(factory=dict)
    digest: Digest | None = None
    """sha256 of the content, for regular files (hard links share their target's)."""
    offset: int = 0
    """Offset of the content in the uncompressed tar stream."""
    chunks: tuple[Chunk, ...] = ()

    @property
    def is_file(self) -> bool:
        return self.type is EntryType.FILE

    @property
    def has_content(self) -> bool:
        """A regular file whose bytes must travel (empty files need none)."""
        return self.type is EntryType.FILE and self.size > 0

    @property
    def content_digest(self) -> Digest | None:
        if self.type is EntryType.FILE:
            return self.digest or (EMPTY_SHA256 if self.size == 0 else None)
        return None

    @property
    def parent(self) -> str:
        return posixpath.dirname(self.name)

    @property
    def basename(self) -> str:
        return posixpath.basename(self.name)

    @property
    def whiteout_target(self) -> str:
        """For a whiteout, the path it deletes; for an opaque marker, the directory it hides."""
        base = self.basename
        if self.type is EntryType.OPAQUE:
            return self.parent
        if self.type is EntryType.WHITEOUT:
            return posixpath.join(self.parent, base[len(WHITEOUT_PREFIX) :])
        raise ValueError(f"{self.name} is not a whiteout")


@attrs.frozen
class LayerInfo:
    """Which blob a TOC describes."""

    digest: Digest
    """Digest of the compressed (Starlight-format) blob."""
    size: int
    diff_id: Digest
    """Digest of the uncompressed tar stream (the image config's ``diff_ids`` entry)."""
    media_type: str


@attrs.frozen
class TOC:
    layer: LayerInfo
    entries: tuple[Entry, ...]
    chunk_size: int = DEFAULT_CHUNK_SIZE
    version: int = TOC_VERSION

    def files(self) -> Iterator[Entry]:
        return (e for e in self.entries if e.has_content)

    def by_name(self) -> dict[str, Entry]:
        return {e.name: e for e in self.entries}

    @property
    def content_size(self) -> int:
        return sum(e.size for e in self.files())
