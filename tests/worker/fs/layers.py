"""Layer directories for the FUSE tests, and a reference unpacker that does what containerd's
applier does for its overlay snapshotter (whiteouts as char 0/0, opaque dirs as the
``trusted.overlay.opaque`` xattr), plus a tree walker that records what a container would see.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import subprocess
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import attrs

from starlight_core import wire
from starlight_core.digest import sha256_digest
from starlight_core.layer.toc import TOC, Entry, EntryType, LayerInfo

__all__ = [
    "Layer",
    "Meta",
    "extract",
    "overlay",
    "place",
    "snapshot",
    "write_layer_dir",
]

_MEDIA_TYPE = "application/vnd.oci.image.layer.v1.tar+gzip"


@attrs.frozen
class Layer:
    """Entries in tar order, and the content of each regular file with content."""

    entries: tuple[Entry, ...]
    contents: Mapping[str, bytes] = attrs.field(factory=dict)

    @classmethod
    def of(cls, *items: Entry | tuple[Entry, bytes]) -> Layer:
        entries: list[Entry] = []
        contents: dict[str, bytes] = {}
        for item in items:
            if isinstance(item, tuple):
                entry, data = item
                entry = attrs.evolve(entry, size=len(data), digest=sha256_digest(data))
                contents[entry.name] = data
            else:
                entry = item
            entries.append(entry)
        return cls(tuple(entries), contents)

    def toc(self) -> TOC:
        blob = sha256_digest(repr(self.entries).encode())
        return TOC(LayerInfo(blob, 1, blob, _MEDIA_TYPE), self.entries)


def _b(name: str) -> bytes:
    return os.fsencode(name)


def _remove(path: bytes) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.unlink(path)


def extract(layer: Layer, dest: Path, *, withhold: Iterable[str] = ()) -> None:
    """Unpack ``layer`` into ``dest`` like containerd's applier; files named in ``withhold``
    (and hard links to them) are left out, as the puller does until their content arrives."""
    root = _b(str(dest))
    withheld = set(withhold)
    os.makedirs(root, exist_ok=True)
    dirs: list[tuple[bytes, int]] = []
    for entry in layer.entries:
        path = os.path.join(root, _b(entry.name)) if entry.name else root
        parent = os.path.dirname(path)
        if not os.path.isdir(parent):
            os.makedirs(parent, 0o755)
        kind = entry.type
        if kind is EntryType.OPAQUE:
            os.setxattr(parent, "trusted.overlay.opaque", b"y")
            continue
        if kind is EntryType.WHITEOUT:
            target = os.path.join(root, _b(entry.whiteout_target))
            _remove(target)
            os.mknod(target, stat.S_IFCHR, 0)
            os.lchown(target, entry.uid, entry.gid)
            continue
        if os.path.lexists(path) and not (kind is EntryType.DIR and os.path.isdir(path)):
            _remove(path)
        if kind is EntryType.DIR:
            if not os.path.isdir(path):
                os.mkdir(path)
        elif kind is EntryType.FILE:
            if entry.name in withheld:
                continue
            with open(path, "wb") as f:
                f.write(layer.contents.get(entry.name, b""))
        elif kind is EntryType.SYMLINK:
            os.symlink(_b(entry.linkname), path)
        elif kind is EntryType.HARDLINK:
            if entry.linkname not in withheld:
                os.link(os.path.join(root, _b(entry.linkname)), path, follow_symlinks=False)
            continue
        elif kind in (EntryType.CHAR, EntryType.BLOCK):
            bits = stat.S_IFCHR if kind is EntryType.CHAR else stat.S_IFBLK
            os.mknod(path, bits | 0o600, os.makedev(entry.devmajor, entry.devminor))
        elif kind is EntryType.FIFO:
            os.mkfifo(path, 0o600)
        os.lchown(path, entry.uid, entry.gid)
        for name, value in entry.xattrs.items():
            os.setxattr(path, name, value, follow_symlinks=False)
        if kind is not EntryType.SYMLINK:
            os.chmod(path, entry.mode & 0o7777)
        if kind is EntryType.DIR:
            dirs.append((path, entry.mtime_ns))
        else:
            os.utime(path, ns=(entry.mtime_ns, entry.mtime_ns), follow_symlinks=False)
    # Directory times last: creating their children moved them.
    for path, mtime_ns in reversed(dirs):
        os.utime(path, ns=(mtime_ns, mtime_ns))


def write_layer_dir(layer: Layer, layer_dir: Path, *, withhold: Iterable[str] = ()) -> Path:
    """The daemon's layer directory: ``toc.json`` and ``fs/`` filled except ``withhold``."""
    layer_dir.mkdir(parents=True)
    (layer_dir / "toc.json").write_bytes(wire.dumps(layer.toc()))
    extract(layer, layer_dir / "fs", withhold=withhold)
    return layer_dir


def place(layer_dir: Path, name: str, data: bytes, *, links: Iterable[str] = ()) -> None:
    """Put one file's content in place the way the puller does: write aside, rename in."""
    target = os.path.join(_b(str(layer_dir / "fs")), _b(name))
    temporary = target + b".part"
    with open(temporary, "wb") as f:
        f.write(data)
    os.rename(temporary, target)
    for link in links:
        os.link(target, os.path.join(_b(str(layer_dir / "fs")), _b(link)))


@attrs.frozen
class Meta:
    """What a container can observe of one path (``error`` if lstat fails)."""

    kind: str = ""
    mode: int = 0
    uid: int = 0
    gid: int = 0
    mtime_ns: int | None = None
    size: int | None = None
    nlink: int | None = None
    rdev: int = 0
    target: bytes = b""
    xattrs: tuple[tuple[str, bytes], ...] = ()
    sha256: str = ""
    error: int = 0


_KINDS = {
    stat.S_IFREG: "file",
    stat.S_IFDIR: "dir",
    stat.S_IFLNK: "symlink",
    stat.S_IFCHR: "char",
    stat.S_IFBLK: "block",
    stat.S_IFIFO: "fifo",
}


def snapshot(
    root: Path, *, whiteout_times: bool = True
) -> tuple[dict[bytes, Meta], set[frozenset[bytes]]]:
    """Every path under ``root`` (bytes, relative) with its metadata and content digest, and
    the sets of paths that are hard links of one another."""
    base = _b(str(root))
    found: dict[bytes, Meta] = {}
    inodes: dict[tuple[int, int], set[bytes]] = {}
    for rel in _walk(base, b""):
        path = os.path.join(base, rel)
        try:
            st = os.lstat(path)
        except OSError as exc:
            found[rel] = Meta(error=exc.errno or -1)
            continue
        kind = _KINDS[stat.S_IFMT(st.st_mode)]
        is_dir = kind == "dir"
        whiteout = kind == "char" and st.st_rdev == 0
        xattrs = tuple(
            sorted(
                (name, os.getxattr(path, name, follow_symlinks=False))
                for name in os.listxattr(path, follow_symlinks=False)
            )
        )
        digest = ""
        if kind == "file":
            with open(path, "rb") as f:
                digest = hashlib.sha256(f.read()).hexdigest()
        found[rel] = Meta(
            kind=kind,
            mode=stat.S_IMODE(st.st_mode),
            uid=st.st_uid,
            gid=st.st_gid,
            mtime_ns=None if whiteout and not whiteout_times else st.st_mtime_ns,
            size=None if is_dir else st.st_size,
            nlink=st.st_nlink,
            rdev=st.st_rdev,
            target=os.readlink(path) if kind == "symlink" else b"",
            xattrs=xattrs,
            sha256=digest,
        )
        if not is_dir:
            inodes.setdefault((st.st_dev, st.st_ino), set()).add(rel)
    links = {frozenset(paths) for paths in inodes.values() if len(paths) > 1}
    return found, links


def _walk(base: bytes, rel: bytes) -> Iterator[bytes]:
    with os.scandir(os.path.join(base, rel) if rel else base) as it:
        names = sorted(entry.name for entry in it)
    for name in names:
        child = os.path.join(rel, name) if rel else name
        yield child
        full = os.path.join(base, child)
        try:
            if stat.S_ISDIR(os.lstat(full).st_mode):
                yield from _walk(base, child)
        except OSError:
            continue


@contextmanager
def overlay(lowers: list[Path], scratch: Path) -> Iterator[Path]:
    """An overlay mount like containerd's for a container: ``lowers`` top first, plus a
    fresh upper and work directory."""
    upper, work, merged = scratch / "upper", scratch / "work", scratch / "merged"
    for d in (upper, work, merged):
        d.mkdir(parents=True)
    options = f"lowerdir={':'.join(map(str, lowers))},upperdir={upper},workdir={work}"
    subprocess.run(
        ["mount", "-t", "overlay", "overlay", "-o", options, str(merged)],
        check=True,
        capture_output=True,
    )
    try:
        yield merged
    finally:
        subprocess.run(["umount", str(merged)], check=True, capture_output=True)
