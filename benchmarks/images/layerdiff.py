"""Image layers as ``docker build`` makes them: the difference between two root filesystems.

``snapshot(root)`` records every name of a tree (type, permission bits, owner, whole-second
mtime, size, symlink target, device numbers, kept xattrs, content digest, hard-link group);
``write_diff(before, after, out)`` writes the tar layer that turns ``before`` into ``after``:

* added and changed names (any recorded attribute or the content differs) with their parent
  directories, so the layer carries the metadata of every directory it touches;
* ``dir/.wh.name`` for each name that disappeared (only the top-most: a removed directory's
  children are gone with it);
* ``dir/.wh..wh..opq`` instead of per-name whiteouts when none of a directory's old names is
  left (the directory was emptied or replaced by a new one);
* a type change (directory ↔ file) is just the new entry, as containerd's own differ writes
  it: unpacking a non-directory over a directory replaces it;
* every name of a hard-link group when any of them is new or changed (a link must point to an
  earlier entry of the same layer): the first in tar order carries the content.

The tar is deterministic: entries in depth-first order with names sorted bytewise, PAX format,
numeric owners only (no names looked up on the build host), whole-second mtimes. With
``before=None`` the result is the whole tree (a base layer).
"""

from __future__ import annotations

import hashlib
import io
import os
import stat
import tarfile
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import BinaryIO, Final

import attrs

__all__ = [
    "KEPT_XATTRS",
    "OPAQUE_MARKER",
    "WHITEOUT_PREFIX",
    "DiffSummary",
    "FileNode",
    "TreeSnapshot",
    "diff_layer",
    "snapshot",
    "tree_layer",
    "write_diff",
]

WHITEOUT_PREFIX: Final = ".wh."
OPAQUE_MARKER: Final = ".wh..wh..opq"
KEPT_XATTRS: Final = ("security.capability", "user.")
"""Xattrs a layer carries. Never ``trusted.overlay.*`` (the build host's overlay bookkeeping) nor
``security.selinux`` (a label of the build host's policy, not of the image)."""

_KINDS: Final = (
    (stat.S_ISDIR, "dir"),
    (stat.S_ISREG, "file"),
    (stat.S_ISLNK, "symlink"),
    (stat.S_ISCHR, "char"),
    (stat.S_ISBLK, "block"),
    (stat.S_ISFIFO, "fifo"),
)
_TAR_TYPES: Final = {
    "dir": tarfile.DIRTYPE,
    "file": tarfile.REGTYPE,
    "symlink": tarfile.SYMTYPE,
    "char": tarfile.CHRTYPE,
    "block": tarfile.BLKTYPE,
    "fifo": tarfile.FIFOTYPE,
}


@attrs.frozen
class FileNode:
    """What a layer records about one name. Equal nodes need no entry in a diff."""

    kind: str
    """``dir``, ``file``, ``symlink``, ``char``, ``block`` or ``fifo`` (sockets are skipped)."""
    mode: int
    uid: int
    gid: int
    mtime: int
    size: int = 0
    target: str = ""
    rdev: tuple[int, int] = (0, 0)
    xattrs: tuple[tuple[str, bytes], ...] = ()
    digest: str = ""
    inode: tuple[int, int] = attrs.field(default=(0, 0), eq=False)
    """Where it lives on disk: which names are hard links of each other, not part of the
    image's content."""


@attrs.frozen
class TreeSnapshot:
    """A tree at one moment. ``nodes`` is in depth-first order (the order of a layer's tar)."""

    root: Path
    nodes: Mapping[str, FileNode]
    children: Mapping[str, tuple[str, ...]]
    """Directory (``""`` is the root) → its names, sorted bytewise."""
    links: Mapping[str, tuple[str, ...]]
    """For each regular file with several names: all of them, in depth-first order."""


@attrs.frozen
class DiffSummary:
    entries: int
    added: int
    changed: int
    whiteouts: int
    opaque: int
    content_bytes: int


def _kind(mode: int) -> str | None:
    for test, name in _KINDS:
        if test(mode):
            return name
    return None


def _xattrs(path: str, kept: tuple[str, ...]) -> tuple[tuple[str, bytes], ...]:
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError:
        return ()
    result = []
    for name in sorted(names):
        if not name.startswith(kept):
            continue
        try:
            result.append((name, os.getxattr(path, name, follow_symlinks=False)))
        except OSError:
            continue
    return tuple(result)


def _file_digest(path: str) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def _sorted(names: Iterable[str]) -> list[str]:
    return sorted(names, key=os.fsencode)


def snapshot(root: Path | str, *, kept_xattrs: tuple[str, ...] = KEPT_XATTRS) -> TreeSnapshot:
    """Record ``root`` now (contents are hashed: the tree may change in place afterwards).

    Symlinks are not followed and mount points are not crossed into; sockets are skipped
    (a tar layer cannot hold them).
    """
    root = Path(root)
    root_dev = os.lstat(root).st_dev
    nodes: dict[str, FileNode] = {}
    children: dict[str, tuple[str, ...]] = {}
    inodes: dict[tuple[int, int], list[str]] = {}

    def visit(rel: str) -> None:
        directory = os.path.join(root, rel) if rel else str(root)
        kept: list[str] = []
        for name in _sorted(os.listdir(directory)):
            path = os.path.join(directory, name)
            st = os.lstat(path)
            kind = _kind(st.st_mode)
            if kind is None:
                continue
            kept.append(name)
            child = f"{rel}/{name}" if rel else name
            node = FileNode(
                kind=kind,
                mode=stat.S_IMODE(st.st_mode),
                uid=st.st_uid,
                gid=st.st_gid,
                mtime=st.st_mtime_ns // 1_000_000_000,
                size=st.st_size if kind == "file" else 0,
                target=os.readlink(path) if kind == "symlink" else "",
                rdev=(os.major(st.st_rdev), os.minor(st.st_rdev))
                if kind in ("char", "block")
                else (0, 0),
                xattrs=_xattrs(path, kept_xattrs),
                digest=_file_digest(path) if kind == "file" else "",
                inode=(st.st_dev, st.st_ino),
            )
            nodes[child] = node
            if kind == "file" and st.st_nlink > 1:
                inodes.setdefault(node.inode, []).append(child)
            if kind == "dir":
                if st.st_dev == root_dev:
                    visit(child)
                else:
                    children[child] = ()
        children[rel] = tuple(kept)

    visit("")
    links: dict[str, tuple[str, ...]] = {}
    for names in inodes.values():
        if len(names) > 1:
            for name in names:
                links[name] = tuple(names)
    return TreeSnapshot(root=root, nodes=nodes, children=children, links=links)


@attrs.frozen
class _Entry:
    path: str
    node: FileNode | None = None
    """The node written (None for a whiteout or an opaque marker)."""
    whiteout: bool = False
    opaque: bool = False
    new: bool = False
    link_to: str = ""


class _Differ:
    def __init__(self, before: TreeSnapshot | None, after: TreeSnapshot) -> None:
        self.before = before
        self.after = after
        self.forced = self._forced_links()

    def _old(self, path: str) -> FileNode | None:
        return None if self.before is None else self.before.nodes.get(path)

    def _forced_links(self) -> set[str]:
        """Every name of each hard-link group that a layer must (re)write as a whole."""
        forced: set[str] = set()
        old_links = self.before.links if self.before is not None else {}
        for path in {*self.after.links, *old_links}:
            if path in forced or path not in self.after.nodes:
                continue
            group = self.after.links.get(path, (path,))
            old_group = old_links.get(path, (path,))
            # A name that left or joined a group changes what it shares an inode with, even
            # when its own metadata and content are the same.
            if set(old_group) != set(group) or any(
                self._old(name) != self.after.nodes[name] for name in group
            ):
                forced.update(group)
        return forced

    def entries(self) -> list[_Entry]:
        return list(self._directory("", self.before is not None))

    def _directory(self, rel: str, had_dir: bool) -> Iterator[_Entry]:
        new_names = self.after.children.get(rel, ())
        old_names = self.before.children.get(rel, ()) if had_dir and self.before is not None else ()
        kept = set(new_names)
        opaque = bool(old_names) and not kept.intersection(old_names)
        if opaque:
            yield _Entry(f"{rel}/{OPAQUE_MARKER}" if rel else OPAQUE_MARKER, opaque=True)
        for name in _sorted(kept.union(old_names)):
            path = f"{rel}/{name}" if rel else name
            if name not in kept:
                if not opaque:
                    yield _Entry(self._whiteout_name(rel, name), whiteout=True)
                continue
            node = self.after.nodes[path]
            old = self._old(path) if had_dir else None
            if node.kind == "dir":
                inner = list(self._directory(path, old is not None and old.kind == "dir"))
                if old is None or old != node or inner:
                    yield _Entry(path, node, new=old is None or old.kind != "dir")
                    yield from inner
            elif old is None or old != node or path in self.forced:
                yield _Entry(path, node, new=old is None)

    @staticmethod
    def _whiteout_name(rel: str, name: str) -> str:
        marker = WHITEOUT_PREFIX + name
        return f"{rel}/{marker}" if rel else marker


def _tarinfo(name: str, node: FileNode) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = _TAR_TYPES[node.kind]
    info.mode = node.mode
    info.uid = node.uid
    info.gid = node.gid
    info.uname = info.gname = ""
    info.mtime = node.mtime
    info.size = node.size if node.kind == "file" else 0
    info.linkname = node.target
    if node.kind in ("char", "block"):
        info.devmajor, info.devminor = node.rdev
    if node.xattrs:
        # Binary values (file capabilities) survive as raw bytes: tarfile marks the record set
        # hdrcharset=BINARY and writes the surrogate-escaped bytes back unchanged.
        info.pax_headers = {
            f"SCHILY.xattr.{key}": value.decode("utf-8", "surrogateescape")
            for key, value in node.xattrs
        }
    return info


def _marker(name: str, mtime: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = tarfile.REGTYPE
    info.mode = 0o644
    info.mtime = mtime
    info.uname = info.gname = ""
    return info


def write_diff(before: TreeSnapshot | None, after: TreeSnapshot, out: BinaryIO) -> DiffSummary:
    """Write to ``out`` the layer that turns ``before`` (None: nothing) into ``after``.

    ``after.root`` must still hold the tree ``after`` describes: contents are read from it.
    """
    entries = _Differ(before, after).entries()
    leaders: dict[tuple[str, ...], str] = {}
    added = changed = whiteouts = opaque = content = 0
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as archive:
        for entry in entries:
            if entry.node is None:
                parent = entry.path.rpartition("/")[0]
                mtime = after.nodes[parent].mtime if parent else 0
                archive.addfile(_marker(entry.path, mtime))
                opaque += entry.opaque
                whiteouts += entry.whiteout
                continue
            added += entry.new
            changed += not entry.new
            info = _tarinfo(entry.path, entry.node)
            group = after.links.get(entry.path)
            if group is not None:
                leader = leaders.setdefault(group, entry.path)
                if leader != entry.path:
                    info.type = tarfile.LNKTYPE
                    info.linkname = leader
                    info.size = 0
                    archive.addfile(info)
                    continue
            if entry.node.kind == "file":
                with open(after.root / entry.path, "rb") as handle:
                    archive.addfile(info, handle)
                content += info.size
            else:
                archive.addfile(info)
    return DiffSummary(
        entries=len(entries),
        added=added,
        changed=changed,
        whiteouts=whiteouts,
        opaque=opaque,
        content_bytes=content,
    )


def diff_layer(before: TreeSnapshot | Path | None, after: Path) -> bytes:
    """The layer from ``before`` (a snapshot, a tree, or nothing) to the tree at ``after``,
    in memory (small trees: tests, tiny layers)."""
    if isinstance(before, Path):
        before = snapshot(before)
    buffer = io.BytesIO()
    write_diff(before, snapshot(after), buffer)
    return buffer.getvalue()


def tree_layer(root: Path) -> bytes:
    """The whole tree at ``root`` as one layer."""
    return diff_layer(None, root)
