"""Test helpers for anyone checking a proxy: decode a whole bundle, rebuild an image's files.

``decode_bundle(data)`` runs ``BundleReader`` over a complete stream, verifies every extent and
reassembles whole contents; ``materialize(header, image, contents)`` gives the files the image
shows (merged view of its layers) with their contents from ``contents`` — the bundle's plus
whatever the worker copies locally. Tests compare that against an independent expectation.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping

import attrs

from starlight_core.bundle import BundleHeader, BundleReader, End, Extent, Header
from starlight_core.digest import Digest
from starlight_core.errors import BundleProtocolError, DigestMismatch
from starlight_core.fsview import merge
from starlight_core.layer.toc import Entry, EntryType

__all__ = ["DecodedBundle", "FileState", "decode_bundle", "file_state", "materialize"]


@attrs.frozen
class DecodedBundle:
    header: BundleHeader
    header_size: int
    extents: tuple[int, ...]
    """Indexes of the EXTENT records received, in order."""
    contents: dict[Digest, bytes]
    """Every content the bundle carried in full, verified."""
    size: int
    complete: bool
    """The END record arrived."""


def decode_bundle(chunks: bytes | Iterable[bytes]) -> DecodedBundle:
    """Decode a bundle stream (bytes, or pieces); ERROR records raise their error."""
    reader = BundleReader()
    if isinstance(chunks, bytes | bytearray):
        chunks = [bytes(chunks)]
    header: Header | None = None
    received: list[int] = []
    parts: dict[Digest, list[bytes]] = {}
    complete = False
    size = 0
    for chunk in [*chunks, b""]:
        size += len(chunk)
        reader.receive_data(chunk)
        while True:
            event = reader.next_event()
            if isinstance(event, Header):
                header = event
            elif isinstance(event, Extent):
                received.append(event.index)
                parts.setdefault(event.descriptor.content, []).append(event.verified_data())
            elif isinstance(event, End):
                complete = True
            else:
                break
    if header is None:
        raise BundleProtocolError("no header in the bundle")
    contents: dict[Digest, bytes] = {}
    for digest, pieces in parts.items():
        data = b"".join(pieces)
        actual = "sha256:" + hashlib.sha256(data).hexdigest()
        if actual != digest:
            raise DigestMismatch(f"content {digest} reassembles to {actual}")
        contents[digest] = data
    return DecodedBundle(header.header, header.size, tuple(received), contents, size, complete)


@attrs.frozen
class FileState:
    """What a container sees at one path (hard links show their target's state)."""

    type: EntryType
    mode: int
    uid: int
    gid: int
    mtime_ns: int
    linkname: str = ""
    devmajor: int = 0
    devminor: int = 0
    xattrs: Mapping[str, bytes] = attrs.field(factory=dict)
    data: bytes | None = None


def file_state(entry: Entry, data: bytes | None) -> FileState:
    return FileState(
        type=entry.type,
        mode=entry.mode & 0o7777,
        uid=entry.uid,
        gid=entry.gid,
        mtime_ns=entry.mtime_ns,
        linkname=entry.linkname if entry.type is EntryType.SYMLINK else "",
        devmajor=entry.devmajor,
        devminor=entry.devminor,
        xattrs=dict(entry.xattrs),
        data=data,
    )


def materialize(
    header: BundleHeader, image: int, contents: Mapping[Digest, bytes]
) -> dict[str, FileState]:
    """The files of ``header.images[image]`` (merged view, root excluded) with their data.

    ``KeyError`` names a content that is neither in ``contents`` nor empty.
    """
    layers = [header.layers[i] for i in header.images[image].layers]
    files: dict[str, FileState] = {}
    for name, node in merge(layers).items():
        if not name:
            continue
        entry = node.entry
        data = None
        if entry.type is EntryType.FILE:
            data = contents[entry.digest] if entry.size and entry.digest else b""
        files[name] = file_state(entry, data)
    return files
