"""Helpers for the store tests: layers from tar members or bare entries, their contents, filling
a store the way the daemon does, and a walker recording what a container would see."""

from __future__ import annotations

import gzip
import hashlib
import os
import stat
import subprocess
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

import attrs

from starlight_core.digest import Digest, sha256_digest
from starlight_core.layer.toc import TOC, Entry, EntryType, LayerInfo
from starlight_core.testing import TarMember, build_tar, convert_bytes
from starlight_worker.store import LayerHandle, NodeKind, Store, plan_layer

__all__ = [
    "Layer",
    "Meta",
    "contents_of",
    "differences",
    "dir_entry",
    "entries_layer",
    "file_entry",
    "fill",
    "overlay",
    "place_bytes",
    "snapshot",
    "tar_layer",
    "untimed_names",
]

_MEDIA_TYPE = "application/vnd.oci.image.layer.v1.tar+gzip"


@attrs.frozen
class Layer:
    toc: TOC
    contents: Mapping[Digest, bytes]

    @property
    def key(self) -> str:
        return Store.layer_key(self.toc.layer.diff_id)


def contents_of(blob: bytes, toc: TOC) -> dict[Digest, bytes]:
    """Every content of a converted layer, cut from the blob by its chunk ranges (the way the
    proxy sends them) and checked against its digest."""
    found: dict[Digest, bytes] = {}
    for entry in toc.files():
        data = b"".join(
            gzip.decompress(blob[c.compressed_offset : c.compressed_offset + c.compressed_size])
            for c in entry.chunks
        )
        assert entry.digest is not None
        assert sha256_digest(data) == entry.digest, entry.name
        found[entry.digest] = data
    return found


def tar_layer(members: Sequence[TarMember] | bytes, *, chunk_size: int | None = None) -> Layer:
    """A layer as the proxy knows it (from tar members or a tar): converted, its TOC and its
    contents."""
    tar = members if isinstance(members, bytes) else build_tar(members)
    blob, toc = convert_bytes(tar, chunk_size=chunk_size)
    return Layer(toc, contents_of(blob, toc))


def entries_layer(*items: Entry | tuple[Entry, bytes], salt: str = "") -> Layer:
    """A layer from bare TOC entries (for shapes a tar writer would not produce); a file given
    with its bytes gets their size and digest."""
    entries: list[Entry] = []
    contents: dict[Digest, bytes] = {}
    for item in items:
        if isinstance(item, tuple):
            entry, data = item
            digest = sha256_digest(data)
            entry = attrs.evolve(entry, size=len(data), digest=digest)
            contents[digest] = data
        else:
            entry = item
        entries.append(entry)
    ident = sha256_digest((salt + repr(entries)).encode("utf-8", "surrogateescape"))
    return Layer(TOC(LayerInfo(ident, 1, ident, _MEDIA_TYPE), tuple(entries)), contents)


def untimed_names(layers: Sequence[Layer]) -> tuple[list[set[bytes]], set[str]]:
    """Per layer, the names whose times the unpacker makes "now" (implied directories something
    was created in, whiteout devices); and the merged names whose time is such a layer's."""
    per_layer: list[set[bytes]] = []
    topmost_dirs: dict[str, bool] = {}
    for layer in layers:
        names: set[bytes] = set()
        for node in plan_layer(layer.toc).nodes:
            now = (node.kind is NodeKind.DIR and node.implied and node.has_children) or (
                node.kind is NodeKind.WHITEOUT
            )
            if now:
                names.update(n.encode("utf-8", "surrogateescape") for n in node.names)
            if node.kind is NodeKind.DIR:
                topmost_dirs[node.name] = now
        per_layer.append(names)
    return per_layer, {name for name, now in topmost_dirs.items() if now}


def place_bytes(store: Store, handle: LayerHandle, digest: Digest, data: bytes) -> list[str]:
    path = store.staging_file()
    path.write_bytes(data)
    return handle.place(digest, path)


def fill(
    store: Store, layer: Layer, *, lower: Sequence[str] = (), finalize: bool = True
) -> LayerHandle:
    """Begin the layer and place every content it misses, as the daemon does."""
    handle = store.begin_layer(layer.toc, lower=lower)
    for digest in handle.missing():
        place_bytes(store, handle, digest, layer.contents[digest])
    if finalize:
        handle.finalize()
    return handle


@attrs.frozen
class Meta:
    """What a container can observe of one path."""

    kind: str
    mode: int
    uid: int
    gid: int
    mtime_ns: int | None
    size: int | None
    nlink: int
    rdev: int = 0
    target: bytes = b""
    xattrs: tuple[tuple[str, bytes], ...] = ()
    sha256: str = ""


_KINDS = {
    stat.S_IFREG: "file",
    stat.S_IFDIR: "dir",
    stat.S_IFLNK: "symlink",
    stat.S_IFCHR: "char",
    stat.S_IFBLK: "block",
    stat.S_IFIFO: "fifo",
}


def snapshot(
    root: Path, *, skip_times: Iterable[bytes] = (), dir_sizes: bool = False
) -> tuple[dict[bytes, Meta], set[frozenset[bytes]]]:
    """Every path below ``root`` (bytes, relative) and the groups of hard-linked names.
    ``skip_times``: paths whose time is not compared (made "now" by the unpacker)."""
    base = os.fsencode(root)
    skipped = set(skip_times)
    found: dict[bytes, Meta] = {}
    inodes: dict[tuple[int, int], set[bytes]] = {}
    for rel in _walk(base, b""):
        path = os.path.join(base, rel)
        st = os.lstat(path)
        kind = _KINDS[stat.S_IFMT(st.st_mode)]
        xattrs = tuple(
            sorted(
                (name, os.getxattr(path, name, follow_symlinks=False))
                for name in os.listxattr(path, follow_symlinks=False)
            )
        )
        digest = ""
        if kind == "file":
            with open(path, "rb") as f:
                digest = hashlib.file_digest(f, "sha256").hexdigest()
        found[rel] = Meta(
            kind=kind,
            mode=stat.S_IMODE(st.st_mode),
            uid=st.st_uid,
            gid=st.st_gid,
            mtime_ns=None if rel in skipped else st.st_mtime_ns,
            size=st.st_size if kind != "dir" or dir_sizes else None,
            nlink=st.st_nlink if kind != "dir" else 0,
            rdev=st.st_rdev,
            target=os.readlink(path) if kind == "symlink" else b"",
            xattrs=xattrs,
            sha256=digest,
        )
        if kind != "dir":
            inodes.setdefault((st.st_dev, st.st_ino), set()).add(rel)
    links = {frozenset(names) for names in inodes.values() if len(names) > 1}
    return found, links


def differences(
    ours: tuple[dict[bytes, Meta], set[frozenset[bytes]]],
    theirs: tuple[dict[bytes, Meta], set[frozenset[bytes]]],
) -> list[str]:
    """Readable differences between two ``snapshot`` results (empty when equal)."""
    problems = []
    for name in sorted(set(ours[0]) | set(theirs[0])):
        a, b = ours[0].get(name), theirs[0].get(name)
        if a != b:
            problems.append(f"{name!r}: ours {a} != theirs {b}")
    if ours[1] != theirs[1]:
        problems.append(f"hard links: ours {sorted(ours[1])} != theirs {sorted(theirs[1])}")
    return problems


def _walk(base: bytes, rel: bytes) -> Iterator[bytes]:
    with os.scandir(os.path.join(base, rel) if rel else base) as it:
        names = sorted(entry.name for entry in it)
    for name in names:
        child = os.path.join(rel, name) if rel else name
        yield child
        if stat.S_ISDIR(os.lstat(os.path.join(base, child)).st_mode):
            yield from _walk(base, child)


@contextmanager
def overlay(lowers: Sequence[Path], target: Path) -> Iterator[Path]:
    """A read-only overlay of ``lowers`` (top layer first, as containerd orders them)."""
    target.mkdir(parents=True, exist_ok=True)
    options = "ro,lowerdir=" + ":".join(str(p) for p in lowers)
    subprocess.run(
        ["mount", "-t", "overlay", "overlay", "-o", options, str(target)],
        check=True,
        capture_output=True,
    )
    try:
        yield target
    finally:
        subprocess.run(["umount", str(target)], check=True, capture_output=True)


def file_entry(name: str, data: bytes, **kw: object) -> tuple[Entry, bytes]:
    return Entry(name, EntryType.FILE, **kw), data  # type: ignore[arg-type]


def dir_entry(name: str, **kw: object) -> Entry:
    return Entry(name, EntryType.DIR, **{"mode": 0o755, **kw})  # type: ignore[arg-type]
