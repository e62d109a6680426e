"""A layer's file tree as overlayfs expects a lower directory, built from its TOC. No I/O.

The TOC lists tar entries; a lower layer of overlayfs is a directory tree in which a deleted
path is a character device 0/0 and an opaque directory carries ``trusted.overlay.opaque=y``.
``LayerTree.build`` does what containerd's applier does when it unpacks a layer for its overlay
snapshotter, but into memory: later entries replace earlier ones, hard links share one node,
missing parents become implied directories.

Names are kept in *FUSE form*: the path's bytes decoded as Latin-1. fusepy decodes every path it
receives with one codec and Latin-1 maps each byte to one character, so any byte string (tar
names need not be UTF-8) survives the trip; ``fuse_name``/``toc_name`` convert.
"""

from __future__ import annotations

import posixpath
import stat
from collections.abc import Callable, Iterable, Mapping
from typing import Final

import attrs

from starlight_core.layer.toc import TOC, Entry, EntryType

__all__ = [
    "OPAQUE_XATTR",
    "LayerTree",
    "Node",
    "fuse_name",
    "toc_name",
]

OPAQUE_XATTR: Final = "trusted.overlay.opaque"
_DIR_SIZE: Final = 4096

_TYPE_BITS: Final = {
    EntryType.FILE: stat.S_IFREG,
    EntryType.DIR: stat.S_IFDIR,
    EntryType.SYMLINK: stat.S_IFLNK,
    EntryType.CHAR: stat.S_IFCHR,
    EntryType.BLOCK: stat.S_IFBLK,
    EntryType.FIFO: stat.S_IFIFO,
}


def fuse_name(name: str) -> str:
    """A TOC name (``str``, surrogate-escaped where not UTF-8) in FUSE form."""
    return name.encode("utf-8", "surrogateescape").decode("latin-1")


def toc_name(name: str) -> str:
    """The inverse of ``fuse_name``."""
    return name.encode("latin-1").decode("utf-8", "surrogateescape")


def _makedev(major: int, minor: int) -> int:
    # os.makedev without the os import: this module does no I/O (glibc's encoding).
    return (
        ((major & 0xFFFFF000) << 32)
        | ((major & 0xFFF) << 8)
        | ((minor & 0xFFFFFF00) << 12)
        | (minor & 0xFF)
    )


@attrs.define(eq=False, slots=True)
class Node:
    """One inode. Hard-linked names share the node; ``names`` lists them (FUSE form).

    A regular file's content can be read at ``fs/<n>`` for any ``n`` in ``names`` once it
    has arrived (the puller links every name of an inode once the content is there).
    """

    ino: int
    mode: int
    """``st_mode``: type bits and permission bits."""
    uid: int = 0
    gid: int = 0
    mtime_ns: int = 0
    size: int = 0
    rdev: int = 0
    target: str = ""
    """Symlink target, FUSE form."""
    xattrs: dict[str, bytes] = attrs.field(factory=dict)
    """Extended attributes, names in FUSE form."""
    children: dict[str, Node] | None = None
    """Directory entries by base name; ``None`` for non-directories."""
    names: list[str] = attrs.field(factory=list)
    nlink: int = 1
    implied: bool = False
    """A directory no entry described (a parent that the layer left out)."""

    @property
    def is_dir(self) -> bool:
        return self.children is not None

    @property
    def is_file(self) -> bool:
        return stat.S_ISREG(self.mode)

    def stat(self) -> dict[str, int]:
        """The attributes fusepy wants from ``getattr`` (times in ns: ``use_ns``)."""
        return {
            "st_ino": self.ino,
            "st_mode": self.mode,
            "st_nlink": self.nlink,
            "st_uid": self.uid,
            "st_gid": self.gid,
            "st_rdev": self.rdev,
            "st_size": self.size,
            "st_blksize": 4096,
            "st_blocks": (self.size + 511) // 512 if self.is_file else 0,
            "st_atime": self.mtime_ns,
            "st_mtime": self.mtime_ns,
            "st_ctime": self.mtime_ns,
        }


@attrs.frozen
class LayerTree:
    """The tree of one layer: every path (FUSE form, ``""`` is the root) to its node."""

    root: Node
    nodes: Mapping[str, Node]
    first_ino: int
    next_ino: int
    """One past the highest inode number used: the next layer's ``first_ino``."""
    warnings: tuple[str, ...] = ()
    """Entries that could not be placed (hostile or inconsistent TOCs), for the log."""

    @property
    def inodes(self) -> range:
        return range(self.first_ino, self.next_ino)

    def content_size(self) -> int:
        seen: set[int] = set()
        total = 0
        for node in self.nodes.values():
            if node.is_file and node.ino not in seen:
                seen.add(node.ino)
                total += node.size
        return total

    @classmethod
    def build(
        cls,
        toc: TOC | Iterable[Entry],
        *,
        first_ino: int,
        implied_mtime_ns: Callable[[str], int] = lambda _name: 0,
    ) -> LayerTree:
        """Apply the entries in order. ``implied_mtime_ns(name)`` dates implied directories
        (containerd creates them at unpack time, so the caller decides what "then" is)."""
        entries = toc.entries if isinstance(toc, TOC) else toc
        builder = _Builder(first_ino, implied_mtime_ns)
        for entry in entries:
            builder.apply(entry)
        return builder.finish()


class _Builder:
    def __init__(self, first_ino: int, implied_mtime_ns: Callable[[str], int]) -> None:
        self._next_ino = first_ino
        self._first_ino = first_ino
        self._implied_mtime_ns = implied_mtime_ns
        self._warnings: list[str] = []
        self.root = self._implied_dir("")
        self.nodes: dict[str, Node] = {"": self.root}

    def _ino(self) -> int:
        ino = self._next_ino
        self._next_ino += 1
        return ino

    def _implied_dir(self, name: str) -> Node:
        return Node(
            ino=self._ino(),
            mode=stat.S_IFDIR | 0o755,
            mtime_ns=self._implied_mtime_ns(name),
            size=_DIR_SIZE,
            children={},
            implied=True,
        )

    def _warn(self, entry: Entry, why: str) -> None:
        self._warnings.append(f"{entry.name!r} ({entry.type.value}): {why}")

    def apply(self, entry: Entry) -> None:
        name = fuse_name(entry.name)
        if not _is_clean(name):
            self._warn(entry, "not a normalised relative path; skipped")
            return
        kind = entry.type
        if kind is EntryType.OPAQUE:
            directory = self._ensure_dir(posixpath.dirname(name))
            directory.xattrs[OPAQUE_XATTR] = b"y"
            return
        if kind is EntryType.WHITEOUT:
            target = fuse_name(entry.whiteout_target)
            if not _is_clean(target) or not target:
                self._warn(entry, "whiteout of nothing; skipped")
                return
            # What containerd's overlay applier creates: mknod(S_IFCHR, 0) then chown.
            node = Node(
                ino=self._ino(),
                mode=stat.S_IFCHR,
                uid=entry.uid,
                gid=entry.gid,
                mtime_ns=entry.mtime_ns,
            )
            self._place(target, node)
            return
        if kind is EntryType.HARDLINK:
            linked = self.nodes.get(fuse_name(entry.linkname))
            if linked is None or linked.is_dir:
                self._warn(entry, f"hard link to missing or directory {entry.linkname!r}; skipped")
                return
            if not name:
                self._warn(entry, "hard link as the root; skipped")
                return
            self._place(name, linked)
            return
        if kind is EntryType.DIR:
            existing = self.nodes.get(name)
            if existing is not None and existing.is_dir:
                # A directory over a directory keeps its contents (containerd does the same).
                self._describe(existing, entry)
                existing.implied = False
                return
            if not name:
                self._describe(self.root, entry)
                self.root.implied = False
                return
            node = Node(ino=self._ino(), mode=stat.S_IFDIR, size=_DIR_SIZE, children={})
            self._describe(node, entry)
            self._place(name, node)
            return
        if not name:
            self._warn(entry, "a non-directory as the root; skipped")
            return
        node = Node(ino=self._ino(), mode=_TYPE_BITS[kind])
        self._describe(node, entry)
        if kind is EntryType.FILE:
            node.size = entry.size
        elif kind is EntryType.SYMLINK:
            node.target = fuse_name(entry.linkname)
            # Linux symlinks are always 0777 and their size is the target's length.
            node.mode = stat.S_IFLNK | 0o777
            node.size = len(node.target)
        elif kind in (EntryType.CHAR, EntryType.BLOCK):
            node.rdev = _makedev(entry.devmajor, entry.devminor)
        self._place(name, node)

    @staticmethod
    def _describe(node: Node, entry: Entry) -> None:
        node.mode = stat.S_IFMT(node.mode) | (entry.mode & 0o7777)
        node.uid = entry.uid
        node.gid = entry.gid
        node.mtime_ns = entry.mtime_ns
        opaque = node.xattrs.get(OPAQUE_XATTR)
        # trusted.* attributes from a layer are dropped, as the store and containerd drop them:
        # served through FUSE, a layer could otherwise forge overlayfs' trusted.overlay.*
        # markers (whiteouts, opaque directories, redirects) under the container's rootfs.
        node.xattrs = {
            fuse_name(k): bytes(v) for k, v in entry.xattrs.items() if not k.startswith("trusted.")
        }
        if opaque is not None:
            node.xattrs[OPAQUE_XATTR] = opaque

    def _ensure_dir(self, name: str) -> Node:
        """The directory at ``name``, creating implied directories on the way (a non-directory
        in the way is replaced, as a later entry wins). Iterative: depth is the layer's choice."""
        node = self.nodes.get(name)
        if node is not None and node.is_dir:
            return node
        current = self.root
        path = ""
        for part in name.split("/"):
            path = f"{path}/{part}" if path else part
            child = self.nodes.get(path)
            if child is None or not child.is_dir:
                if child is not None:
                    self._unlink(path)
                child = self._implied_dir(path)
                assert current.children is not None
                current.children[part] = child
                self.nodes[path] = child
            current = child
        return current

    def _place(self, name: str, node: Node) -> None:
        parent = self._ensure_dir(posixpath.dirname(name))
        if name in self.nodes:
            self._unlink(name)
        assert parent.children is not None
        parent.children[posixpath.basename(name)] = node
        self.nodes[name] = node
        if not node.is_dir:
            node.names.append(name)

    def _unlink(self, name: str) -> None:
        """Remove ``name`` and, for a directory, everything below it."""
        node = self.nodes.pop(name)
        parent = self.nodes[posixpath.dirname(name)]
        assert parent.children is not None
        parent.children.pop(posixpath.basename(name), None)
        stack = [(name, node)]
        while stack:
            path, current = stack.pop()
            if current.children is None:
                current.names.remove(path)
                continue
            for base, child in current.children.items():
                child_path = posixpath.join(path, base)
                self.nodes.pop(child_path, None)
                stack.append((child_path, child))

    def finish(self) -> LayerTree:
        for node in self.nodes.values():
            if node.children is not None:
                node.nlink = 2 + sum(1 for c in node.children.values() if c.is_dir)
            else:
                node.nlink = len(node.names)
        return LayerTree(
            root=self.root,
            nodes=self.nodes,
            first_ino=self._first_ino,
            next_ino=self._next_ino,
            warnings=tuple(self._warnings),
        )


def _is_clean(name: str) -> bool:
    if name == "":
        return True
    if name.startswith("/") or name.endswith("/") or "\x00" in name:
        return False
    return all(part not in ("", ".", "..") for part in name.split("/"))
