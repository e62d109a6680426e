"""The merged filesystem view: what an overlayfs mount of a stack of layers shows.

``merge(layers)`` applies layer TOCs in order (base first) the way containerd's overlayfs
snapshotter does: each layer is first unpacked into its own directory (as containerd's overlay
applier writes the snapshot's upper directory, whiteouts becoming overlay whiteouts), then the
directories are stacked. The rules, in the order they apply:

Inside one layer (tar order):

* A later entry replaces an earlier one of the same name. A directory over a directory updates
  its metadata and keeps what the layer already put in it; anything else drops the earlier entry
  and the layer's own subtree below it.
* Missing parent directories are implied. An implied directory shows the metadata (and
  xattrs) of the lower directory it merges with, even if it is itself marked opaque (containerd
  copies them, ``mkparent``); with no lower directory left visible there (none, a non-directory,
  or hidden by this layer's whiteouts and opaque parents) it is mode 0755, owner 0:0, mtime 0.
  A parent that the same layer made a non-directory is replaced by an implied directory.
* ``dir/.wh.name`` marks ``dir/name`` deleted; ``dir/.wh..wh..opq`` marks ``dir`` opaque. Both
  affect lower layers only. A whiteout for a name the layer already holds is ignored (overlay
  cannot store both; containerd fails on such a layer); a later entry of that name replaces the
  whiteout, as unpacking it over the whiteout device would.
* A hard link resolves to the entry its target names at that point of the same layer (tar
  order), which must be a non-directory: the two names then share an inode, even if the target
  name is later replaced or deleted. Anything else is a ``CorruptLayer``.

Stacking (overlayfs semantics), layer by layer:

* a whiteout deletes the name and everything below it from the lower layers;
* a non-directory hides whatever the lower layers have at that name, subtree included;
* a directory over a lower directory merges with it (its own metadata wins unless implied); an
  opaque one hides the lower directory's children;
* a directory over a lower non-directory replaces it.

The result maps each visible path (``""`` is the root, present only if some layer has an entry
for it) to a ``Node``: which layer's entry provides its metadata (and content), and for a hard
link the link entry itself. Names share an inode when their nodes' ``inode`` are equal.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Final

import attrs

from starlight_core.errors import CorruptLayer
from starlight_core.layer.toc import TOC, Entry, EntryType

__all__ = ["IMPLIED_DIR_MODE", "MergedView", "Node", "implied_dir", "merge", "visible"]

IMPLIED_DIR_MODE: Final = 0o755

# Kinds of names inside one layer's own directory.
_DIR: Final = 0
_OTHER: Final = 1
_WHITEOUT: Final = 2


def implied_dir(name: str) -> Entry:
    """The entry of a directory only its children imply, when no lower layer has it."""
    return Entry(name=name, type=EntryType.DIR, mode=IMPLIED_DIR_MODE)


def _parent(name: str) -> str:
    return name.rpartition("/")[0]


@attrs.frozen
class Node:
    """One visible name: the entry that defines it and where that entry lives."""

    layer: int
    """Index (in the stack given to ``merge``) of the layer whose entry is shown."""
    index: int
    """Position of ``entry`` in that layer's ``TOC.entries``; -1 for an implied directory."""
    entry: Entry
    """The entry shown. For a hard link: the entry it resolves to (its type, metadata, content)."""
    link: Entry | None = None
    """For a hard link: the link entry itself."""

    @property
    def implied(self) -> bool:
        return self.index < 0

    @property
    def inode(self) -> tuple[int, int] | None:
        """Names with equal (non-None) ``inode`` are hard links to the same file."""
        return None if self.index < 0 else (self.layer, self.index)


class _Local:
    """A name in one layer's own directory (before stacking)."""

    __slots__ = ("entry", "index", "kind", "link", "opaque")

    def __init__(self, kind: int, index: int, entry: Entry, link: Entry | None = None) -> None:
        self.kind = kind
        self.index = index
        self.entry = entry
        self.link = link
        self.opaque = False


class _LayerTree:
    """One layer unpacked on its own: the names it holds, whiteouts and opaque flags.

    ``names`` keeps insertion order, and every name is inserted after its parent and removed
    together with its subtree, so iterating it visits parents before children.
    """

    def __init__(self, toc: TOC, layer: int) -> None:
        self.names: dict[str, _Local] = {}
        self.root: _Local | None = None
        self._children: dict[str, set[str]] = {}
        self._toc = toc
        self._layer = layer
        for index, entry in enumerate(toc.entries):
            self._add(index, entry)

    def _insert(self, name: str, local: _Local) -> None:
        self.names[name] = local
        self._children.setdefault(_parent(name), set()).add(name)

    def _drop(self, name: str) -> None:
        self._children.get(_parent(name), set()).discard(name)
        stack = [name]
        while stack:
            current = stack.pop()
            self.names.pop(current, None)
            stack.extend(self._children.pop(current, ()))

    def _ensure_parents(self, name: str) -> None:
        missing: list[str] = []
        parent = _parent(name)
        while parent:
            local = self.names.get(parent)
            if local is not None and local.kind == _DIR:
                break
            missing.append(parent)
            parent = _parent(parent)
        for path in reversed(missing):
            if path in self.names:
                self._drop(path)
            self._insert(path, _Local(_DIR, -1, implied_dir(path)))

    def _corrupt(self, message: str) -> CorruptLayer:
        return CorruptLayer(f"layer {self._layer} ({self._toc.layer.digest}): {message}")

    def _add(self, index: int, entry: Entry) -> None:
        kind = entry.type
        name = entry.name
        if kind is EntryType.OPAQUE:
            directory = entry.parent
            if directory == "":
                if self.root is None:
                    self.root = _Local(_DIR, -1, implied_dir(""))
                self.root.opaque = True
                return
            self._ensure_parents(name)
            self.names[directory].opaque = True
        elif kind is EntryType.WHITEOUT:
            self._ensure_parents(name)
            target = entry.whiteout_target
            if target not in self.names:
                self._insert(target, _Local(_WHITEOUT, index, entry))
        elif kind is EntryType.DIR:
            if name == "":
                if self.root is None:
                    self.root = _Local(_DIR, index, entry)
                else:
                    self.root.index, self.root.entry = index, entry
                return
            self._ensure_parents(name)
            local = self.names.get(name)
            if local is not None and local.kind == _DIR:
                local.index, local.entry = index, entry
                return
            if local is not None:
                self._drop(name)
            self._insert(name, _Local(_DIR, index, entry))
        else:
            if name == "":
                raise self._corrupt(f"the root is a {kind.value}, not a directory")
            shown, shown_index, link = entry, index, None
            if kind is EntryType.HARDLINK:
                target_local = self.names.get(entry.linkname)
                if target_local is None or target_local.kind != _OTHER or entry.linkname == name:
                    raise self._corrupt(
                        f"hard link {name!r} -> {entry.linkname!r}: the target is not a "
                        "non-directory entry earlier in the same layer"
                    )
                shown, shown_index, link = target_local.entry, target_local.index, entry
            self._ensure_parents(name)
            if name in self.names:
                self._drop(name)
            self._insert(name, _Local(_OTHER, shown_index, shown, link))


class MergedView(Mapping[str, Node]):
    """The merged root filesystem of a layer stack: a read-only mapping path -> ``Node``."""

    __slots__ = ("_children", "_nodes", "layers")

    def __init__(self, layers: Sequence[TOC]) -> None:
        self.layers: tuple[TOC, ...] = tuple(layers)
        self._nodes: dict[str, Node] = {}
        self._children: dict[str, set[str]] = {}
        for layer, toc in enumerate(self.layers):
            self._stack(_LayerTree(toc, layer), layer)

    # -- building ------------------------------------------------------------------------------

    def _add(self, name: str, node: Node) -> None:
        self._nodes[name] = node
        self._children.setdefault(_parent(name), set()).add(name)

    def _delete(self, name: str) -> None:
        if self._nodes.pop(name, None) is None:
            return
        self._children.get(_parent(name), set()).discard(name)
        stack = list(self._children.pop(name, ()))
        while stack:
            current = stack.pop()
            del self._nodes[current]
            stack.extend(self._children.pop(current, ()))

    def _delete_children(self, name: str) -> None:
        for child in list(self._children.get(name, ())):
            self._delete(child)

    def _stack(self, tree: _LayerTree, layer: int) -> None:
        # Parents come before children in ``tree.names``, so deleting what lower layers hold
        # (whiteouts, opaque directories, replaced names) never touches this layer's own names.
        root = tree.root
        if root is not None:
            if root.opaque:
                self._delete_children("")
            if root.index >= 0:
                self._nodes[""] = Node(layer, root.index, root.entry)
        nodes = self._nodes
        for name, local in tree.names.items():
            current = nodes.get(name)
            if local.kind == _WHITEOUT:
                if current is not None:
                    self._delete(name)
            elif local.kind == _DIR:
                if current is not None and current.entry.type is EntryType.DIR:
                    if local.opaque:
                        self._delete_children(name)
                    if local.index >= 0:
                        nodes[name] = Node(layer, local.index, local.entry)
                else:
                    if current is not None:
                        self._delete(name)
                    self._add(name, Node(layer, local.index, local.entry))
            else:
                if current is not None:
                    self._delete(name)
                self._add(name, Node(layer, local.index, local.entry, local.link))

    # -- the Mapping protocol ------------------------------------------------------------------

    def __getitem__(self, name: str) -> Node:
        return self._nodes[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._nodes)

    def __len__(self) -> int:
        return len(self._nodes)

    def __contains__(self, name: object) -> bool:
        return name in self._nodes

    # -- questions -----------------------------------------------------------------------------

    def listdir(self, name: str) -> list[str]:
        """Base names in directory ``name`` (``""`` for the root), sorted."""
        node = self._nodes.get(name)
        if name and (node is None or node.entry.type is not EntryType.DIR):
            raise KeyError(name)
        return sorted(child.rpartition("/")[2] for child in self._children.get(name, ()))

    def visible(self) -> set[tuple[int, str]]:
        """``(layer index, name)`` of every layer entry that can be seen (implied dirs excluded).

        A hard link is seen under its own name in its layer; the entry it resolves to is seen
        only if its own name is still visible.
        """
        return {(node.layer, name) for name, node in self._nodes.items() if node.index >= 0}

    def hardlinks(self) -> list[tuple[str, ...]]:
        """Groups (sorted) of two or more visible names that share an inode, sorted."""
        groups: dict[tuple[int, int], list[str]] = {}
        for name, node in self._nodes.items():
            if node.index >= 0 and node.entry.type is not EntryType.DIR:
                groups.setdefault((node.layer, node.index), []).append(name)
        return sorted(tuple(sorted(names)) for names in groups.values() if len(names) > 1)

    def files(self) -> Iterator[tuple[str, Node]]:
        """Visible regular files that have content to fetch (hard links included)."""
        return ((name, node) for name, node in self._nodes.items() if node.entry.has_content)


def merge(layers: Sequence[TOC]) -> MergedView:
    """The merged view of ``layers`` (base first), as overlayfs shows it."""
    return MergedView(layers)


def visible(layers: Sequence[TOC]) -> set[tuple[int, str]]:
    """Which layer entries (``(layer index, name)``) the merged view of ``layers`` shows."""
    return merge(layers).visible()
