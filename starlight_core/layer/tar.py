"""A sans-I/O tar reader: feed it bytes, get events that cover every byte of the archive.

``TarReader`` knows ustar, GNU (long names ``L``/``K``, base-256 numbers) and PAX (per-entry
``x`` records: path, linkpath, size, ids, names, sub-second mtime, ``SCHILY.xattr.*``). It never
copies file content: ``Content`` events carry views of the input. Every byte of the input is
reported exactly once, in order, as one of ``Header`` (header blocks and extension records),
``Content`` (a regular file's bytes), ``Padding`` (zeros up to the next 512-byte block) or
``Trailer`` (the end-of-archive blocks and whatever follows them): the Starlight writer re-encodes
those bytes, so the output decompresses to exactly the input.

Hostile input is refused with ``CorruptLayer`` / ``UnsafePath`` / ``UnsupportedLayer``: bad
checksums, truncation inside an entry, paths that escape the root, absurd extension records,
sparse files.
"""

from __future__ import annotations

import hashlib
import posixpath
from typing import Final

import attrs

from starlight_core.digest import EMPTY_SHA256, Digest
from starlight_core.errors import CorruptLayer, UnsafePath, UnsupportedLayer
from starlight_core.layer.toc import OPAQUE_MARKER, WHITEOUT_PREFIX, Entry, EntryType

__all__ = [
    "BLOCK",
    "NEED_DATA",
    "ArchiveEnd",
    "Content",
    "EntryEnd",
    "EntryStart",
    "Header",
    "NeedData",
    "Padding",
    "TarEvent",
    "TarReader",
    "Trailer",
    "normalize_name",
]

BLOCK: Final = 512
MAX_EXTENSION_SIZE: Final = 1 << 20  # PAX / GNU long-name records, like Go's archive/tar
MAX_PATH: Final = 4096
MAX_COMPONENT: Final = 255

_TYPES: Final = {
    b"0": EntryType.FILE,
    b"\x00": EntryType.FILE,
    b"7": EntryType.FILE,  # contiguous file: a regular file everywhere that matters
    b"1": EntryType.HARDLINK,
    b"2": EntryType.SYMLINK,
    b"3": EntryType.CHAR,
    b"4": EntryType.BLOCK,
    b"5": EntryType.DIR,
    b"6": EntryType.FIFO,
}
_HEADER_ONLY: Final = frozenset(
    {
        EntryType.HARDLINK,
        EntryType.SYMLINK,
        EntryType.CHAR,
        EntryType.BLOCK,
        EntryType.DIR,
        EntryType.FIFO,
    }
)


class NeedData:
    """The reader needs more bytes (or ``receive_data(b"")`` for end of input)."""

    _instance: NeedData | None = None

    def __new__(cls) -> NeedData:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA: Final = NeedData()


@attrs.frozen
class Header:
    """Header blocks (and PAX / GNU extension records) of the next entry."""

    offset: int
    data: bytes


@attrs.frozen
class EntryStart:
    """An entry's metadata; for a regular file, ``Content`` events follow."""

    entry: Entry


@attrs.frozen
class Content:
    offset: int
    data: memoryview


@attrs.frozen
class Padding:
    offset: int
    data: bytes


@attrs.frozen
class EntryEnd:
    """The entry is complete; regular files now carry their content ``digest``."""

    entry: Entry


@attrs.frozen
class Trailer:
    offset: int
    data: bytes


@attrs.frozen
class ArchiveEnd:
    size: int
    """Total bytes in the archive (the uncompressed layer size)."""


TarEvent = Header | EntryStart | Content | Padding | EntryEnd | Trailer | ArchiveEnd


def normalize_name(raw: str, *, what: str = "path") -> str:
    """Normalise a tar path: no ``./``, no leading or trailing ``/``. The root is ``""``.

    ``..`` components and absolute paths are refused: an entry must stay inside the layer.
    """
    if "\x00" in raw:
        raise CorruptLayer(f"{what} {raw!r} contains a NUL byte")
    if raw.startswith("/"):
        raise UnsafePath(f"{what} {raw!r} is absolute; layer entries must be relative")
    parts: list[str] = []
    for part in raw.split("/"):
        if part in ("", "."):
            continue
        if part == "..":
            raise UnsafePath(f"{what} {raw!r} escapes the root filesystem")
        if len(part.encode("utf-8", "surrogateescape")) > MAX_COMPONENT:
            raise CorruptLayer(f"{what} {raw[:80]!r}…: a component is longer than 255 bytes")
        parts.append(part)
    name = "/".join(parts)
    if len(name) > MAX_PATH:
        raise CorruptLayer(f"{what} {raw[:80]!r}… is longer than {MAX_PATH} bytes")
    return name


def _cstring(field: bytes) -> bytes:
    end = field.find(b"\x00")
    return field if end < 0 else field[:end]


def _text(field: bytes) -> str:
    return _cstring(field).decode("utf-8", "surrogateescape")


def _number(field: bytes, what: str, offset: int) -> int:
    """A numeric header field: octal ASCII, or GNU base-256 when the high bit is set."""
    if field and field[0] & 0x80:
        value = int.from_bytes(field[1:], "big")
        if field[0] & 0x40:  # negative base-256 (two's complement over the whole field)
            value = int.from_bytes(field, "big") - (1 << (8 * len(field)))
        return value
    text = _cstring(field).strip(b" \x00")
    if not text:
        return 0
    try:
        return int(text, 8)
    except ValueError:
        raise CorruptLayer(f"tar header at offset {offset}: bad {what} field {field!r}") from None


def _checksum_ok(block: bytes) -> bool:
    stored_field = block[148:156]
    if not _cstring(stored_field).strip(b" \x00"):
        return False
    try:
        stored = int(_cstring(stored_field).strip(b" \x00"), 8)
    except ValueError:
        return False
    unsigned = sum(block[:148]) + 8 * 0x20 + sum(block[156:])
    if stored == unsigned:
        return True
    signed = sum((b ^ 0x80) - 0x80 for b in block[:148] + block[156:]) + 8 * 0x20
    return stored == signed


def _parse_pax(data: bytes, offset: int) -> dict[str, bytes]:
    """PAX records ``"%d %s=%s\\n"``; values stay bytes (xattr values are binary)."""
    records: dict[str, bytes] = {}
    pos = 0
    while pos < len(data):
        if data[pos:].strip(b"\x00") == b"":
            break
        space = data.find(b" ", pos)
        if space < 0:
            raise CorruptLayer(f"PAX header at offset {offset}: malformed record")
        try:
            length = int(data[pos:space])
        except ValueError:
            raise CorruptLayer(f"PAX header at offset {offset}: bad record length") from None
        end = pos + length
        if length <= 0 or end > len(data) or data[end - 1 : end] != b"\n":
            raise CorruptLayer(f"PAX header at offset {offset}: bad record length {length}")
        key, sep, value = data[space + 1 : end - 1].partition(b"=")
        if not sep:
            raise CorruptLayer(f"PAX header at offset {offset}: record without '='")
        records[key.decode("utf-8", "surrogateescape")] = value
        pos = end
    return records


def _pax_time_ns(value: bytes, offset: int) -> int:
    text = value.decode("ascii", "replace")
    try:
        sign = -1 if text.startswith("-") else 1
        whole, _, frac = text.lstrip("-").partition(".")
        seconds = int(whole or "0")
        nanos = int((frac + "000000000")[:9]) if frac else 0
    except ValueError:
        raise CorruptLayer(f"PAX header at offset {offset}: bad time {text!r}") from None
    return sign * (seconds * 1_000_000_000 + nanos)


class TarReader:
    """Incremental tar parser. ``receive_data(b"")`` marks the end of input."""

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._pending: list[memoryview] = []  # input not yet consumed, in order
        self._eof = False
        self._offset = 0  # absolute offset of the next unconsumed byte
        self._state = "header"
        self._header_bytes = bytearray()  # header blocks of the current entry so far
        self._header_offset = 0
        self._pax: dict[str, bytes] = {}
        self._long_name: str | None = None
        self._long_link: str | None = None
        self._entry: Entry | None = None
        self._remaining = 0
        self._padding = 0
        self._hasher: hashlib._Hash | None = None
        self._queue: list[TarEvent] = []
        self._names: set[str] = set()
        self._done = False

    @property
    def offset(self) -> int:
        return self._offset

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        if self._eof:
            raise RuntimeError("receive_data after end of input")
        if not data:
            self._eof = True
        else:
            self._pending.append(memoryview(data).cast("B"))

    # -- input helpers ---------------------------------------------------------------------

    def _available(self) -> int:
        return sum(len(v) for v in self._pending)

    def _take(self, n: int) -> bytes:
        """Consume exactly ``n`` bytes (caller checked availability) as a new bytes object."""
        out = bytearray()
        while len(out) < n:
            head = self._pending[0]
            need = n - len(out)
            if len(head) <= need:
                out += head
                self._pending.pop(0)
            else:
                out += head[:need]
                self._pending[0] = head[need:]
        self._offset += n
        return bytes(out)

    def _take_view(self, limit: int) -> memoryview:
        """Consume up to ``limit`` bytes from the first pending buffer without copying."""
        head = self._pending[0]
        if len(head) <= limit:
            self._pending.pop(0)
            view = head
        else:
            view = head[:limit]
            self._pending[0] = head[limit:]
        self._offset += len(view)
        return view

    # -- the state machine -----------------------------------------------------------------

    def next_event(self) -> TarEvent | NeedData:
        if self._queue:
            return self._queue.pop(0)
        if self._done:
            raise RuntimeError("next_event after ArchiveEnd")
        while True:
            event = self._step()
            if event is not None:
                return event
            if self._queue:
                return self._queue.pop(0)

    def _step(self) -> TarEvent | NeedData | None:
        if self._state == "header":
            return self._read_header()
        if self._state == "extension":
            return self._read_extension()
        if self._state == "content":
            return self._read_content()
        if self._state == "padding":
            return self._read_padding()
        return self._read_trailer()

    def _need(self, n: int, what: str) -> bool:
        if self._available() >= n:
            return True
        if self._eof:
            if self._state == "header" and not self._header_bytes and self._available() == 0:
                return False  # clean end without end-of-archive blocks: tolerated, as Go does
            raise CorruptLayer(
                f"truncated tar: input ends at offset {self._offset + self._available()} "
                f"inside {what}"
            )
        return False

    def _read_header(self) -> TarEvent | NeedData | None:
        if not self._need(BLOCK, "a header"):
            if self._eof:
                self._done = True
                return ArchiveEnd(size=self._offset)
            return NEED_DATA
        if not self._header_bytes:
            self._header_offset = self._offset
        offset = self._offset
        block = self._take(BLOCK)
        if block == bytes(BLOCK):
            if self._header_bytes:
                raise CorruptLayer(f"tar: extension header at offset {offset} has no entry")
            self._state = "trailer"
            self._queue.append(Trailer(offset=offset, data=block))
            return None
        if not _checksum_ok(block):
            raise CorruptLayer(f"tar: bad header checksum at offset {offset} (not a tar layer?)")
        self._header_bytes += block
        typeflag = block[156:157]
        size = _number(block[124:136], "size", offset)
        if size < 0:
            raise CorruptLayer(f"tar: negative size in header at offset {offset}")
        if typeflag in (b"x", b"g", b"L", b"K"):
            if size > MAX_EXTENSION_SIZE:
                raise CorruptLayer(
                    f"tar: extension record of {size} bytes at offset {offset} (limit 1 MiB)"
                )
            self._extension_type = typeflag
            self._extension_size = size
            self._state = "extension"
            return None
        if typeflag in (b"S",):
            raise UnsupportedLayer(f"tar: GNU sparse file at offset {offset} is not supported")
        entry_type = _TYPES.get(typeflag)
        if entry_type is None:
            raise UnsupportedLayer(f"tar: unsupported entry type {typeflag!r} at offset {offset}")
        entry = self._build_entry(block, entry_type, size, offset)
        header = Header(offset=self._header_offset, data=bytes(self._header_bytes))
        self._header_bytes = bytearray()
        self._pax = {}
        self._long_name = self._long_link = None
        self._queue.append(EntryStart(entry))
        if entry.type is EntryType.FILE and entry.size > 0:
            self._entry = entry
            self._remaining = entry.size
            self._padding = -entry.size % BLOCK
            self._hasher = hashlib.sha256()
            self._state = "content"
        else:
            if entry.type is EntryType.FILE:  # empty files have content too: none
                entry = attrs.evolve(entry, digest=EMPTY_SHA256)
            self._queue.append(EntryEnd(entry))
        return header

    def _read_extension(self) -> TarEvent | NeedData | None:
        padded = self._extension_size + (-self._extension_size % BLOCK)
        if not self._need(padded, "an extension record"):
            return NEED_DATA
        offset = self._offset
        data = self._take(padded)
        self._header_bytes += data
        body = data[: self._extension_size]
        kind = self._extension_type
        if kind == b"x":
            records = _parse_pax(body, offset)
            if any(k.startswith("GNU.sparse.") for k in records):
                raise UnsupportedLayer(f"tar: PAX sparse file at offset {offset} is not supported")
            self._pax.update(records)
        elif kind == b"L":
            self._long_name = _text(body)
        elif kind == b"K":
            self._long_link = _text(body)
        # b"g": global PAX headers are ignored, as containerd ignores them.
        self._state = "header"
        return None

    def _build_entry(self, block: bytes, entry_type: EntryType, size: int, offset: int) -> Entry:
        pax = self._pax
        name = _text(block[0:100])
        magic = block[257:263]
        if magic == b"ustar\x00":  # POSIX ustar: a prefix field may hold the leading part
            prefix = _text(block[345:500])
            if prefix:
                name = f"{prefix}/{name}"
        if self._long_name is not None:
            name = self._long_name
        if "path" in pax:
            name = pax["path"].decode("utf-8", "surrogateescape")
        linkname = _text(block[157:257])
        if self._long_link is not None:
            linkname = self._long_link
        if "linkpath" in pax:
            linkname = pax["linkpath"].decode("utf-8", "surrogateescape")
        if "size" in pax:
            try:
                size = int(pax["size"])
            except ValueError:
                raise CorruptLayer(f"tar: bad PAX size at offset {offset}") from None
        if name.endswith("/") and entry_type is EntryType.FILE and size == 0:
            entry_type = EntryType.DIR  # old tars mark directories by a trailing slash
        normalized = normalize_name(name)
        if entry_type in _HEADER_ONLY:
            size = 0
        if entry_type is EntryType.FILE:
            base = posixpath.basename(normalized)
            if base == OPAQUE_MARKER:
                entry_type = EntryType.OPAQUE
            elif base.startswith(WHITEOUT_PREFIX) and not base.startswith(".wh..wh."):
                entry_type = EntryType.WHITEOUT
            if entry_type is not EntryType.FILE and size != 0:
                raise CorruptLayer(f"tar: whiteout {normalized!r} has content")
        if entry_type is EntryType.HARDLINK:
            linkname = normalize_name(linkname, what="hard link target")
            if linkname not in self._names:
                raise CorruptLayer(
                    f"tar: hard link {normalized!r} points to {linkname!r}, "
                    "which is not an earlier entry of this layer"
                )
        elif entry_type is EntryType.SYMLINK and "\x00" in linkname:
            raise CorruptLayer(f"tar: symlink {normalized!r} target contains a NUL byte")
        if normalized == "" and entry_type is not EntryType.DIR:
            raise CorruptLayer(f"tar: the root at offset {offset} is not a directory")
        mode = _number(block[100:108], "mode", offset) & 0o7777
        uid = _number(block[108:116], "uid", offset)
        gid = _number(block[116:124], "gid", offset)
        mtime_ns = _number(block[136:148], "mtime", offset) * 1_000_000_000
        uname = _text(block[265:297])
        gname = _text(block[297:329])
        devmajor = devminor = 0
        if entry_type in (EntryType.CHAR, EntryType.BLOCK):
            devmajor = _number(block[329:337], "devmajor", offset)
            devminor = _number(block[337:345], "devminor", offset)
        xattrs: dict[str, bytes] = {}
        for key, value in pax.items():
            if key == "uid":
                uid = self._pax_int(value, key, offset)
            elif key == "gid":
                gid = self._pax_int(value, key, offset)
            elif key == "uname":
                uname = value.decode("utf-8", "surrogateescape")
            elif key == "gname":
                gname = value.decode("utf-8", "surrogateescape")
            elif key == "mtime":
                mtime_ns = _pax_time_ns(value, offset)
            elif key.startswith("SCHILY.xattr."):
                xattrs[key[len("SCHILY.xattr.") :]] = value
        if uid < 0 or gid < 0:
            raise CorruptLayer(f"tar: negative owner in header at offset {offset}")
        self._names.add(normalized)
        return Entry(
            name=normalized,
            type=entry_type,
            mode=mode,
            uid=uid,
            gid=gid,
            uname=uname,
            gname=gname,
            mtime_ns=mtime_ns,
            size=size,
            linkname=linkname,
            devmajor=devmajor,
            devminor=devminor,
            xattrs=dict(sorted(xattrs.items())),
            offset=offset + BLOCK if entry_type is EntryType.FILE else 0,
        )

    @staticmethod
    def _pax_int(value: bytes, key: str, offset: int) -> int:
        try:
            return int(value)
        except ValueError:
            raise CorruptLayer(f"tar: bad PAX {key} at offset {offset}") from None

    def _read_content(self) -> TarEvent | NeedData | None:
        if not self._pending:
            if self._eof:
                self._need(self._remaining, f"the content of {self._entry_name()}")
            return NEED_DATA
        offset = self._offset
        view = self._take_view(self._remaining)
        self._remaining -= len(view)
        assert self._hasher is not None
        self._hasher.update(view)
        if self._remaining == 0:
            self._state = "padding"
        return Content(offset=offset, data=view)

    def _entry_name(self) -> str:
        return repr(self._entry.name) if self._entry is not None else "an entry"

    def _read_padding(self) -> TarEvent | NeedData | None:
        entry = self._entry
        assert entry is not None
        assert self._hasher is not None
        done = EntryEnd(attrs.evolve(entry, digest=Digest.from_hasher(self._hasher)))
        if self._padding:
            if not self._need(self._padding, f"the padding after {self._entry_name()}"):
                return NEED_DATA
            offset = self._offset
            data = self._take(self._padding)
            self._queue.append(done)
            event: TarEvent | None = Padding(offset=offset, data=data)
        else:
            event = done
        self._entry = None
        self._hasher = None
        self._state = "header"
        return event

    def _read_trailer(self) -> TarEvent | NeedData | None:
        if self._pending:
            offset = self._offset
            view = self._take_view(1 << 20)
            return Trailer(offset=offset, data=bytes(view))
        if self._eof:
            self._done = True
            return ArchiveEnd(size=self._offset)
        return NEED_DATA
