"""The final tree of one layer directory, computed from its TOC. No I/O.

containerd unpacks a layer for its overlayfs snapshotter by replaying the tar entries onto disk
(``archive/tar.go`` ``applyNaive`` with ``OverlayConvertWhiteout`` and the parent layers): later
entries replace earlier ones, whiteouts become character devices 0/0, opaque markers become the
``trusted.overlay.opaque`` xattr, missing parents are made. We compute the tree that replay
ends with instead, so that it can be built in any order, resumed after a crash, and filled file
by file as contents arrive. The rules (containerd's, except where it would fail the whole layer;
there we follow ``starlight_core.fsview``, which the FUSE view and delta planning share):

* The root entry is ignored (containerd ignores it); an opaque marker at the root marks it.
* A later entry replaces an earlier one of the same name, subtree included; a directory over a
  directory only applies its metadata (ownership, mode and time replaced, xattrs *added*).
* A missing parent, or a parent this layer made a non-directory, becomes an *implied* directory:
  0755 root, or — like containerd's ``mkparent`` — the mode, owner and (non-``trusted.``) xattrs
  of the nearest lower layer's directory of that name. The store resolves that on disk.
* A whiteout of a name the layer already holds is ignored (containerd fails such a layer); a
  later entry of that name replaces the whiteout.
* A hard link must name a non-directory, non-whiteout entry earlier in the layer; it shares that
  entry's inode, and — as containerd's applier does (lchown, xattrs, chmod, chtimes on the link
  path) — its own header's owner, mode, time and xattrs then apply to the shared inode. A chown
  of a non-directory drops ``security.capability``, so a link header without it removes it.
* ``trusted.*`` xattrs in entries are dropped (containerd refuses admin attributes from layers;
  honouring them would let a layer forge overlayfs' own ``trusted.overlay.*`` markers).
* Times before the epoch become the epoch (containerd's ``boundTime``).
* containerd sets directory times after the whole layer, once per directory entry, on whatever
  holds that name by then: a file that replaced a directory of the layer gets the directory
  entry's time. We do the same, except through a symlink (containerd would follow it).

Names are validated here: an absolute name, an empty, ``.`` or ``..`` component, a NUL byte, or a
whiteout of ``.``/``..`` raises ``UnsafePath`` before anything touches the disk.
"""

from __future__ import annotations

import enum
from collections.abc import Iterator, Mapping
from typing import Final

import attrs

from starlight_core.digest import Digest
from starlight_core.errors import CorruptLayer, UnsafePath
from starlight_core.layer.toc import (
    OPAQUE_MARKER,
    TOC,
    WHITEOUT_PREFIX,
    Entry,
    EntryType,
)

__all__ = [
    "IMPLIED_MODE",
    "OPAQUE_XATTR",
    "LayerPlan",
    "NodeKind",
    "PlanNode",
    "check_name",
    "plan_layer",
]

IMPLIED_MODE: Final = 0o755
OPAQUE_XATTR: Final = "trusted.overlay.opaque"
CAPABILITY_XATTR: Final = "security.capability"
_MAX_ID: Final = 2**32 - 2
"""Owner ids above this are refused: ``(uid_t)-1`` means "leave unchanged" to chown."""
_MAX_TIME_NS: Final = 2**63 - 1


class NodeKind(enum.Enum):
    DIR = "dir"
    FILE = "file"
    SYMLINK = "symlink"
    CHAR = "char"
    BLOCK = "block"
    FIFO = "fifo"
    WHITEOUT = "whiteout"
    """A character device 0/0 owned by the whiteout entry's owner (overlayfs' whiteout)."""


_KINDS: Final = {
    EntryType.FILE: NodeKind.FILE,
    EntryType.SYMLINK: NodeKind.SYMLINK,
    EntryType.CHAR: NodeKind.CHAR,
    EntryType.BLOCK: NodeKind.BLOCK,
    EntryType.FIFO: NodeKind.FIFO,
}


@attrs.define(eq=False)
class PlanNode:
    """One inode of the final tree. Hard-linked names share the node; ``names[0]`` is the name
    it is created at (its parents come earlier in ``LayerPlan.nodes``), the others are links."""

    kind: NodeKind
    names: list[str] = attrs.field(factory=list)
    mode: int = 0
    """Permission bits with setuid/setgid/sticky; unused for symlinks and whiteouts."""
    uid: int = 0
    gid: int = 0
    mtime_ns: int | None = None
    """``None``: left as created (whiteouts, implied directories: containerd never sets it)."""
    xattrs: dict[str, bytes] = attrs.field(factory=dict)
    size: int = 0
    digest: Digest | None = None
    """Content digest of a regular file with content (``size > 0``)."""
    target: str = ""
    """Symlink target, as written."""
    devmajor: int = 0
    devminor: int = 0
    implied: bool = False
    """A directory no entry described: its metadata comes from the lower layers (or 0755 root)."""
    made_implied: bool = False
    """A directory first made as an implied parent, described later: containerd copied the
    lower directory's xattrs when it made it, and the description only adds to them."""
    opaque: bool = False
    has_children: bool = False
    index: int = -1
    """Position in ``LayerPlan.nodes``."""

    @property
    def name(self) -> str:
        return self.names[0]

    @property
    def has_content(self) -> bool:
        return self.kind is NodeKind.FILE and self.size > 0


@attrs.frozen
class LayerPlan:
    nodes: tuple[PlanNode, ...]
    """Every inode except the root, each after the directories that hold its first name."""
    root_opaque: bool
    contents: Mapping[Digest, tuple[int, ...]]
    """Content digest → indexes of the regular files with content that hold it."""

    def content_nodes(self) -> Iterator[PlanNode]:
        for indexes in self.contents.values():
            for index in indexes:
                yield self.nodes[index]

    @property
    def files_total(self) -> int:
        return sum(len(indexes) for indexes in self.contents.values())

    @property
    def bytes_total(self) -> int:
        return sum(node.size for node in self.content_nodes())


def check_name(name: str, what: str = "entry") -> None:
    """Refuse a name that is not a plain relative path inside the layer."""
    if "\x00" in name:
        raise UnsafePath(f"{what} {name!r} contains a NUL byte")
    if name.startswith("/"):
        raise UnsafePath(f"{what} {name!r} is absolute; layer entries must be relative")
    for part in name.split("/"):
        if part in ("", ".", ".."):
            raise UnsafePath(f"{what} {name!r} is not a normalised path inside the layer")


def _parent(name: str) -> str:
    return name.rpartition("/")[0]


def _bound_time(mtime_ns: int) -> int:
    return mtime_ns if 0 <= mtime_ns <= _MAX_TIME_NS else 0


class _Builder:
    def __init__(self, toc: TOC) -> None:
        self._toc = toc
        self.root = PlanNode(NodeKind.DIR, names=[""], mode=IMPLIED_MODE)
        self.names: dict[str, PlanNode] = {"": self.root}
        """Every name in the tree, in creation order (a parent before what it holds)."""
        self.children: dict[str, set[str]] = {"": set()}
        self.dir_times: dict[str, int] = {}
        """The time of the last directory entry of each name (see the module docstring)."""

    def _corrupt(self, entry: Entry, why: str) -> CorruptLayer:
        return CorruptLayer(f"layer {self._toc.layer.diff_id}: entry {entry.name!r}: {why}")

    # -- the tree -------------------------------------------------------------------------

    def _insert(self, name: str, node: PlanNode) -> None:
        self.names[name] = node
        self.children[_parent(name)].add(name)
        node.names.append(name)
        if node.kind is NodeKind.DIR:
            self.children[name] = set()

    def _remove(self, name: str) -> None:
        """Drop ``name`` and, for a directory, everything below it."""
        self.children[_parent(name)].discard(name)
        stack = [name]
        while stack:
            current = stack.pop()
            node = self.names.pop(current)
            node.names.remove(current)
            if node.kind is NodeKind.DIR:
                stack.extend(self.children.pop(current))

    def _ensure_dir(self, name: str) -> PlanNode:
        node = self.names.get(name)
        if node is not None and node.kind is NodeKind.DIR:
            return node
        path = ""
        current = self.root
        for part in name.split("/"):
            path = f"{path}/{part}" if path else part
            node = self.names.get(path)
            if node is None or node.kind is not NodeKind.DIR:
                if node is not None:
                    self._remove(path)
                node = PlanNode(NodeKind.DIR, mode=IMPLIED_MODE, implied=True, made_implied=True)
                self._insert(path, node)
            current = node
        return current

    # -- entries --------------------------------------------------------------------------

    def _check(self, entry: Entry) -> None:
        if entry.name:
            check_name(entry.name)
        if not (0 <= entry.uid <= _MAX_ID and 0 <= entry.gid <= _MAX_ID):
            raise self._corrupt(entry, f"owner {entry.uid}:{entry.gid} out of range")
        if entry.mode < 0:
            raise self._corrupt(entry, f"negative mode {entry.mode}")

    def _describe(self, node: PlanNode, entry: Entry) -> None:
        """What containerd's ``createTarFile`` does after creating the path: lchown, xattrs,
        chmod, chtimes — applied to the node (for a hard link: the shared inode)."""
        node.uid, node.gid = entry.uid, entry.gid
        if node.kind is not NodeKind.DIR:
            # chown(2) of a non-directory drops the file capability (and setuid, which the
            # chmod below restores from the header).
            node.xattrs.pop(CAPABILITY_XATTR, None)
        for key, value in entry.xattrs.items():
            if not key.startswith("trusted."):
                node.xattrs[key] = bytes(value)
        node.mode = entry.mode & 0o7777
        node.mtime_ns = _bound_time(entry.mtime_ns)

    def apply(self, entry: Entry) -> None:
        self._check(entry)
        kind = entry.type
        name = entry.name
        if kind is EntryType.HARDLINK:
            self._hardlink(entry)
            return
        if kind is EntryType.OPAQUE:
            if name.rpartition("/")[2] != OPAQUE_MARKER:
                raise self._corrupt(entry, "an opaque marker must be named .wh..wh..opq")
            self._ensure_dir(_parent(name)).opaque = True
            return
        if kind is EntryType.WHITEOUT:
            self._whiteout(entry)
            return
        if not name:
            if kind is EntryType.DIR:
                return  # containerd ignores the root entry
            raise self._corrupt(entry, f"the root is a {kind.value}, not a directory")
        parent = _parent(name)
        if parent:
            self._ensure_dir(parent)
        existing = self.names.get(name)
        if kind is EntryType.DIR:
            self.dir_times[name] = _bound_time(entry.mtime_ns)
            if existing is not None and existing.kind is NodeKind.DIR:
                existing.implied = False
                self._describe(existing, entry)
                return
            node = PlanNode(NodeKind.DIR)
        else:
            node = self._leaf(entry)
        if existing is not None:
            self._remove(name)
        self._describe(node, entry)
        self._insert(name, node)

    def _leaf(self, entry: Entry) -> PlanNode:
        kind = _KINDS[entry.type]
        node = PlanNode(kind)
        if kind is NodeKind.FILE:
            node.size = entry.size
            if entry.size < 0:
                raise self._corrupt(entry, f"negative size {entry.size}")
            if entry.size > 0:
                if entry.digest is None:
                    raise self._corrupt(entry, "a regular file with content has no digest")
                node.digest = Digest(entry.digest)
        elif kind is NodeKind.SYMLINK:
            if "\x00" in entry.linkname:
                raise self._corrupt(entry, "symlink target contains a NUL byte")
            node.target = entry.linkname
        elif kind in (NodeKind.CHAR, NodeKind.BLOCK):
            if not (0 <= entry.devmajor < 2**32 and 0 <= entry.devminor < 2**32):
                raise self._corrupt(entry, f"device {entry.devmajor}:{entry.devminor}")
            node.devmajor, node.devminor = entry.devmajor, entry.devminor
        return node

    def _whiteout(self, entry: Entry) -> None:
        name = entry.name
        base = name.rpartition("/")[2]
        if not base.startswith(WHITEOUT_PREFIX):
            raise self._corrupt(entry, "a whiteout must be named .wh.<name>")
        deleted = base[len(WHITEOUT_PREFIX) :]
        if deleted in ("", ".", ".."):
            raise UnsafePath(f"whiteout {name!r} does not name an entry of its directory")
        parent = _parent(name)
        if parent:
            self._ensure_dir(parent)
        target = f"{parent}/{deleted}" if parent else deleted
        if target in self.names:
            return  # overlay cannot hold both; the layer's own entry stays (fsview's rule)
        node = PlanNode(NodeKind.WHITEOUT, uid=entry.uid, gid=entry.gid)
        self._insert(target, node)

    def _hardlink(self, entry: Entry) -> None:
        name = entry.name
        if not name:
            raise self._corrupt(entry, "a hard link cannot be the root")
        check_name(entry.linkname, "hard link target")
        # Resolved before the parents are made: the target is what the layer held so far.
        node = self.names.get(entry.linkname)
        if node is None or node.kind in (NodeKind.DIR, NodeKind.WHITEOUT) or entry.linkname == name:
            raise self._corrupt(
                entry,
                f"hard link to {entry.linkname!r}, which is not a non-directory entry "
                "earlier in the same layer",
            )
        parent = _parent(name)
        if parent:
            self._ensure_dir(parent)
        if name in self.names:
            self._remove(name)
        self._insert(name, node)
        self._describe(node, entry)

    def finish(self) -> LayerPlan:
        for name, mtime_ns in self.dir_times.items():
            node = self.names.get(name)
            if node is not None and node.kind not in (NodeKind.DIR, NodeKind.SYMLINK):
                node.mtime_ns = mtime_ns
        nodes: list[PlanNode] = []
        contents: dict[Digest, list[int]] = {}
        self.root.has_children = bool(self.children[""])
        for name, node in self.names.items():
            if not name or node.index >= 0:
                continue
            node.index = len(nodes)
            nodes.append(node)
            if node.kind is NodeKind.DIR:
                node.has_children = bool(self.children[name])
            elif node.digest is not None and node.size > 0:
                contents.setdefault(node.digest, []).append(node.index)
        return LayerPlan(
            nodes=tuple(nodes),
            root_opaque=self.root.opaque,
            contents={digest: tuple(indexes) for digest, indexes in contents.items()},
        )


def plan_layer(toc: TOC) -> LayerPlan:
    """The final tree of ``toc``'s layer; ``UnsafePath``/``CorruptLayer`` for hostile TOCs."""
    builder = _Builder(toc)
    for entry in toc.entries:
        builder.apply(entry)
    return builder.finish()
