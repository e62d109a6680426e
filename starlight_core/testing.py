"""Public test helpers: build tar layers from a description, keep blobs in memory.

Shipped with the package (like ``httpx``'s mock transport) so that tools built on
``starlight_core`` can test themselves against the same fakes we use.
"""

from __future__ import annotations

import gzip
import io
import tarfile
from collections.abc import Iterable, Mapping, Sequence

import attrs

from starlight_core.digest import Digest, sha256_digest
from starlight_core.errors import NotFound
from starlight_core.layer.toc import TOC
from starlight_core.layer.writer import LayerWriter

__all__ = ["MemoryBlobs", "TarMember", "build_tar", "convert_bytes", "gzip_bytes"]


@attrs.frozen
class TarMember:
    """One entry to put in a test tar. ``kind``: file, dir, symlink, hardlink, char, block,
    fifo, whiteout (name is the deleted path), opaque (name is the directory)."""

    name: str
    kind: str = "file"
    data: bytes = b""
    mode: int | None = None
    uid: int = 0
    gid: int = 0
    uname: str = "root"
    gname: str = "root"
    mtime: float = 1_700_000_000
    linkname: str = ""
    devmajor: int = 0
    devminor: int = 0
    xattrs: Mapping[str, str] = attrs.field(factory=dict)


_KINDS = {
    "file": tarfile.REGTYPE,
    "dir": tarfile.DIRTYPE,
    "symlink": tarfile.SYMTYPE,
    "hardlink": tarfile.LNKTYPE,
    "char": tarfile.CHRTYPE,
    "block": tarfile.BLKTYPE,
    "fifo": tarfile.FIFOTYPE,
    "whiteout": tarfile.REGTYPE,
    "opaque": tarfile.REGTYPE,
}
_DEFAULT_MODES = {"dir": 0o755, "symlink": 0o777}


def build_tar(members: Iterable[TarMember], *, format: int = tarfile.PAX_FORMAT) -> bytes:
    """A tar archive of ``members`` in order, as ``tarfile`` writes it (PAX by default)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=format) as archive:
        for member in members:
            name = member.name
            if member.kind == "whiteout":
                head, _, base = name.rpartition("/")
                name = f"{head}/.wh.{base}" if head else f".wh.{base}"
            elif member.kind == "opaque":
                name = f"{name}/.wh..wh..opq" if name else ".wh..wh..opq"
            info = tarfile.TarInfo(name)
            info.type = _KINDS[member.kind]
            info.mode = (
                member.mode if member.mode is not None else _DEFAULT_MODES.get(member.kind, 0o644)
            )
            info.uid, info.gid = member.uid, member.gid
            info.uname, info.gname = member.uname, member.gname
            info.mtime = member.mtime
            info.linkname = member.linkname
            info.devmajor, info.devminor = member.devmajor, member.devminor
            if member.xattrs:
                info.pax_headers = {f"SCHILY.xattr.{k}": v for k, v in member.xattrs.items()}
            if member.kind == "file":
                info.size = len(member.data)
                archive.addfile(info, io.BytesIO(member.data))
            else:
                archive.addfile(info)
    return buffer.getvalue()


def gzip_bytes(data: bytes, level: int = 6) -> bytes:
    """Plain single-member gzip (what ``docker push`` produces), deterministic."""
    return gzip.compress(data, compresslevel=level, mtime=0)


def convert_bytes(
    tar: bytes, *, chunk_size: int | None = None, step: int = 65536
) -> tuple[bytes, TOC]:
    """Run the Starlight writer over an uncompressed tar held in memory."""
    writer = LayerWriter(chunk_size=chunk_size) if chunk_size else LayerWriter()
    out = [writer.write(tar[i : i + step]) for i in range(0, len(tar), step)]
    out.append(writer.close())
    return b"".join(out), writer.result.toc


class MemoryBlobs:
    """An in-memory content-addressed blob store with range reads (a registry stand-in)."""

    def __init__(self, blobs: Sequence[bytes] = ()) -> None:
        self._blobs: dict[Digest, bytes] = {}
        for blob in blobs:
            self.add(blob)

    def add(self, data: bytes) -> Digest:
        digest = sha256_digest(data)
        self._blobs[digest] = data
        return digest

    def get(self, digest: Digest) -> bytes:
        try:
            return self._blobs[digest]
        except KeyError:
            raise NotFound(f"blob {digest} not found") from None

    def read_range(self, digest: Digest, offset: int, length: int) -> bytes:
        data = self.get(digest)
        if offset < 0 or length < 0 or offset + length > len(data):
            raise ValueError(f"range {offset}+{length} outside blob of {len(data)} bytes")
        return data[offset : offset + length]

    def __contains__(self, digest: object) -> bool:
        return digest in self._blobs
