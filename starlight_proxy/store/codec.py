"""TOC entries to ``files`` rows and back, losslessly and fast enough for 100k-entry layers.

Text that comes from tar headers (paths, link targets, owner names, xattr names) may not be
UTF-8: the layer reader keeps such bytes surrogate-escaped, and we store them as the original
bytes. Rows read back were validated on their way in, so digests are rebuilt without running
the validator again (that check would be most of the decoding time).
"""

from __future__ import annotations

import base64
import gc
import json
import threading
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Final

from starlight_core.digest import Digest
from starlight_core.errors import InvalidInput
from starlight_core.layer.toc import Chunk, Entry, EntryType

__all__ = [
    "FILE_COLUMNS",
    "FILE_SELECT",
    "decode_entries",
    "decode_text",
    "encode_entries",
    "encode_text",
    "trusted_digest",
]

FILE_COLUMNS: Final = (
    "layer_id",
    "idx",
    "name",
    "type",
    "mode",
    "uid",
    "gid",
    "uname",
    "gname",
    "mtime_ns",
    "size",
    "linkname",
    "devmajor",
    "devminor",
    "xattrs",
    "digest",
    "content_offset",
    "chunk_offset",
    "chunk_size",
    "chunks",
)
FILE_SELECT: Final = ", ".join(FILE_COLUMNS[2:])
"""The columns ``decode_entries`` expects, in order (everything but the key)."""

_TYPES: Final = {t.value: t for t in EntryType}
_JSON_SEPARATORS: Final = (",", ":")


def encode_text(text: str) -> bytes:
    try:
        return text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError as exc:
        raise InvalidInput(f"{text!r} cannot be stored: not a tar name ({exc.reason})") from exc


def decode_text(data: bytes) -> str:
    return bytes(data).decode("utf-8", "surrogateescape")


def trusted_digest(value: str) -> Digest:
    """A ``Digest`` from a value this store validated before writing it."""
    return str.__new__(Digest, value)


def _encode_chunks(entry: Entry) -> tuple[int | None, int | None, str | None]:
    chunks = entry.chunks
    if not chunks:
        return None, None, None
    first = chunks[0]
    if (
        len(chunks) == 1
        and first.offset == 0
        and first.size == entry.size
        and first.digest == entry.digest
    ):
        return first.compressed_offset, first.compressed_size, None
    encoded = [
        [c.offset, c.size, c.compressed_offset, c.compressed_size, str(c.digest)] for c in chunks
    ]
    return None, None, json.dumps(encoded, separators=_JSON_SEPARATORS)


def _encode_xattrs(entry: Entry) -> str | None:
    if not entry.xattrs:
        return None
    # ensure_ascii turns surrogate-escaped names into \udcXX escapes that json.loads restores.
    return json.dumps(
        {name: base64.b64encode(value).decode("ascii") for name, value in entry.xattrs.items()},
        separators=_JSON_SEPARATORS,
        ensure_ascii=True,
        sort_keys=True,
    )


def encode_entries(layer_id: int, entries: Iterable[Entry]) -> Iterator[tuple[Any, ...]]:
    """Rows for ``files`` in ``FILE_COLUMNS`` order, one per entry, lazily."""
    for idx, entry in enumerate(entries):
        chunk_offset, chunk_size, chunks = _encode_chunks(entry)
        yield (
            layer_id,
            idx,
            encode_text(entry.name),
            entry.type.value,
            entry.mode,
            entry.uid,
            entry.gid,
            encode_text(entry.uname),
            encode_text(entry.gname),
            entry.mtime_ns,
            entry.size,
            encode_text(entry.linkname),
            entry.devmajor,
            entry.devminor,
            _encode_xattrs(entry),
            None if entry.digest is None else str(entry.digest),
            entry.offset,
            chunk_offset,
            chunk_size,
            chunks,
        )


class _GCPause:
    """Hold off the cyclic GC while building many objects that cannot form cycles.

    Allocating 100k entries otherwise triggers repeated full collections over everything
    already built, which doubles the decoding time. Nested and concurrent pauses are counted;
    the GC comes back as it was when the last one ends.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._depth = 0
        self._was_enabled = False

    @contextmanager
    def __call__(self) -> Iterator[None]:
        with self._lock:
            if self._depth == 0:
                self._was_enabled = gc.isenabled()
                gc.disable()
            self._depth += 1
        try:
            yield
        finally:
            with self._lock:
                self._depth -= 1
                if self._depth == 0 and self._was_enabled:
                    gc.enable()


_gc_paused: Final = _GCPause()


def decode_entries(rows: Sequence[Sequence[Any]]) -> tuple[Entry, ...]:
    """Entries from rows of ``SELECT {FILE_SELECT} ... ORDER BY idx``."""
    with _gc_paused():
        return _decode_entries(rows)


def _decode_entries(rows: Sequence[Sequence[Any]]) -> tuple[Entry, ...]:
    # Owner names and link targets repeat a lot (root, "", ...): decode each once.
    texts: dict[bytes, str] = {b"": ""}
    entries: list[Entry] = []
    append = entries.append
    for (
        name,
        type_,
        mode,
        uid,
        gid,
        uname,
        gname,
        mtime_ns,
        size,
        linkname,
        devmajor,
        devminor,
        xattrs,
        digest,
        offset,
        chunk_offset,
        chunk_size,
        chunks,
    ) in rows:
        file_digest = None if digest is None else str.__new__(Digest, digest)
        if chunk_offset is not None:
            chunk_tuple: tuple[Chunk, ...] = (
                Chunk(0, size, chunk_offset, chunk_size, file_digest),  # type: ignore[arg-type]
            )
        elif chunks is not None:
            chunk_tuple = tuple(
                Chunk(o, s, co, cs, str.__new__(Digest, d))
                for o, s, co, cs, d in json.loads(chunks)
            )
        else:
            chunk_tuple = ()
        uname_text = texts.get(uname)
        if uname_text is None:
            uname_text = texts[bytes(uname)] = decode_text(uname)
        gname_text = texts.get(gname)
        if gname_text is None:
            gname_text = texts[bytes(gname)] = decode_text(gname)
        link_text = texts.get(linkname)
        if link_text is None:
            link_text = decode_text(linkname)
        append(
            Entry(
                decode_text(name),
                _TYPES[type_],
                mode,
                uid,
                gid,
                uname_text,
                gname_text,
                mtime_ns,
                size,
                link_text,
                devmajor,
                devminor,
                {}
                if xattrs is None
                else {k: base64.b64decode(v) for k, v in json.loads(xattrs).items()},
                file_digest,
                offset,
                chunk_tuple,
            )
        )
    return tuple(entries)
