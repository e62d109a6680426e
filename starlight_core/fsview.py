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

from collections import defaultdict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Final

import attrs

from starlight_core.errors import CorruptLayer
from starlight_core.layer.toc import TOC, Entry, EntryType

__all__ = ["IMPLIED_DIR_MODE", "MergedView", "Node", "implied_dir", "merge", "visible"]

IMPLIED_DIR_MODE: Final = 0o755

# A name inside one layer's own directory is one int, ``index << 2 | kind`` (index -1 for an
# implied directory), and in the merged view ``(layer << 32 | index + 1) << 1 | is_dir``: plain
# ints keep a 100,000-entry stack cheap to build and invisible to the garbage collector.
_DIR: Final = 0
_OTHER: Final = 1
_WHITEOUT: Final = 2
_IMPLIED: Final = -1 << 2 | _DIR
_PLAIN: Final = frozenset(
    {EntryType.FILE, EntryType.SYMLINK, EntryType.CHAR, EntryType.BLOCK, EntryType.FIFO}
)
_INDEX_MASK: Final = (1 << 32) - 1


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


def _children_index(names: Iterable[str]) -> defaultdict[str, set[str]]:
    children: defaultdict[str, set[str]] = defaultdict(set)
    for name in names:
        children[_parent(name)].add(name)
    return children


class _LayerTree:
    """One layer unpacked on its own: the names it holds, whiteouts and opaque flags.

    ``names`` keeps insertion order, and every name is inserted after its parent and removed
    together with its subtree, so iterating it visits parents before children.
    """

    def __init__(self, toc: TOC, layer: int) -> None:
        self.names: dict[str, int] = {}
        """name -> ``index << 2 | kind``; for a hard link, the index of the entry it shows."""
        self.links: dict[str, int] = {}
        """hard link name -> index of the link entry."""
        self.opaque: set[str] = set()
        """Opaque directories (``""``: the root)."""
        self.root: int | None = None
        """Index of the last entry for the root directory."""
        # Built on the first in-layer replacement of a directory (rare), then kept up to date.
        self._children: defaultdict[str, set[str]] | None = None
        self._toc = toc
        self._layer = layer
        names = self.names
        for index, entry in enumerate(toc.entries):
            if entry.type not in _PLAIN:
                self._add(index, entry)
                continue
            # The common case, inlined: a new non-directory under an existing directory.
            name = entry.name
            parent = name.rpartition("/")[0]
            if parent:
                value = names.get(parent)
                if value is None or value & 3 != _DIR:
                    self._ensure_dir(parent)
            if name in names or not name:
                self._add(index, entry)
                continue
            names[name] = index << 2 | _OTHER
            if self._children is not None:
                self._children[parent].add(name)

    def _insert(self, name: str, value: int) -> None:
        self.names[name] = value
        if self._children is not None:
            self._children[_parent(name)].add(name)

    def _drop(self, name: str) -> None:
        if self._children is None:
            self._children = _children_index(self.names)
        children = self._children
        children[_parent(name)].discard(name)
        stack = [name]
        while stack:
            current = stack.pop()
            del self.names[current]
            self.links.pop(current, None)
            self.opaque.discard(current)
            stack.extend(children.pop(current, ()))

    def _ensure_dir(self, directory: str) -> None:
        """Make ``directory`` and its ancestors directories of this layer (implied if new)."""
        missing: list[str] = []
        while directory:
            value = self.names.get(directory)
            if value is not None and value & 3 == _DIR:
                break
            missing.append(directory)
            directory = _parent(directory)
        for path in reversed(missing):
            if path in self.names:
                self._drop(path)
            self._insert(path, _IMPLIED)

    def _corrupt(self, message: str) -> CorruptLayer:
        return CorruptLayer(f"layer {self._layer} ({self._toc.layer.digest}): {message}")

    def _add(self, index: int, entry: Entry) -> None:
        kind = entry.type
        name = entry.name
        parent = _parent(name)
        shown = index
        if kind is EntryType.HARDLINK:
            # Resolved before the parents are made: the target is what the layer held so far.
            target = self.names.get(entry.linkname)
            if target is None or target & 3 != _OTHER or entry.linkname == name:
                raise self._corrupt(
                    f"hard link {name!r} -> {entry.linkname!r}: the target is not a "
                    "non-directory entry earlier in the same layer"
                )
            shown = target >> 2
        if parent:
            value = self.names.get(parent)
            if value is None or value & 3 != _DIR:
                self._ensure_dir(parent)
        if kind is EntryType.OPAQUE:
            self.opaque.add(parent)
        elif kind is EntryType.WHITEOUT:
            target_name = entry.whiteout_target
            if target_name not in self.names:
                self._insert(target_name, index << 2 | _WHITEOUT)
        elif kind is EntryType.DIR:
            if name == "":
                self.root = index
                return
            value = self.names.get(name)
            if value is not None and value & 3 == _DIR:
                self.names[name] = index << 2 | _DIR  # keeps its place, children and flag
                return
            if value is not None:
                self._drop(name)
            self._insert(name, index << 2 | _DIR)
        else:
            if name == "":
                raise self._corrupt(f"the root is a {kind.value}, not a directory")
            if name in self.names:
                self._drop(name)
            self._insert(name, shown << 2 | _OTHER)
            if kind is EntryType.HARDLINK:
                self.links[name] = index


class MergedView(Mapping[str, Node]):
    """The merged root filesystem of a layer stack: a read-only mapping path -> ``Node``.

    ``Node`` objects are made on access; ``file_entries`` walks the files without them.
    """

    __slots__ = ("_children", "_links", "_nodes", "layers")

    def __init__(self, layers: Sequence[TOC]) -> None:
        self.layers: tuple[TOC, ...] = tuple(layers)
        self._nodes: dict[str, int] = {}
        self._links: dict[str, int] = {}
        """hard link name -> ``layer << 32 | index`` of the link entry."""
        # Built when a directory is first deleted (or listed), then kept up to date.
        self._children: defaultdict[str, set[str]] | None = None
        for layer, toc in enumerate(self.layers):
            self._stack(_LayerTree(toc, layer), layer)

    # -- building ------------------------------------------------------------------------------

    def _index(self) -> defaultdict[str, set[str]]:
        if self._children is None:
            self._children = _children_index(name for name in self._nodes if name)
        return self._children

    def _delete(self, name: str, value: int) -> None:
        del self._nodes[name]
        self._links.pop(name, None)
        children = self._children
        if not value & 1:
            if children is not None:
                children[_parent(name)].discard(name)
            return
        children = self._index()
        children[_parent(name)].discard(name)
        stack = list(children.pop(name, ()))
        while stack:
            current = stack.pop()
            del self._nodes[current]
            self._links.pop(current, None)
            stack.extend(children.pop(current, ()))

    def _delete_children(self, name: str) -> None:
        for child in list(self._index().get(name, ())):
            self._delete(child, self._nodes[child])

    def _stack(self, tree: _LayerTree, layer: int) -> None:
        # Parents come before children in ``tree.names``, so deleting what lower layers hold
        # (whiteouts, opaque directories, replaced names) never touches this layer's own names.
        nodes = self._nodes
        base = layer << 32
        if "" in tree.opaque:
            self._delete_children("")
        if tree.root is not None:
            nodes[""] = (base | tree.root + 1) << 1 | 1
        opaque = tree.opaque
        for name, local in tree.names.items():
            current = nodes.get(name)
            kind = local & 3
            if kind == _WHITEOUT:
                if current is not None:
                    self._delete(name, current)
                continue
            value = (base | (local >> 2) + 1) << 1
            if kind == _DIR:
                value |= 1
                if current is not None and current & 1:
                    if name in opaque:
                        self._delete_children(name)
                    if local != _IMPLIED:
                        nodes[name] = value
                    continue
            if current is not None:
                self._delete(name, current)
            nodes[name] = value
            if self._children is not None:
                self._children[_parent(name)].add(name)
            if kind == _OTHER:
                link = tree.links.get(name)
                if link is not None:
                    self._links[name] = base | link

    # -- decoding ------------------------------------------------------------------------------

    def _node(self, name: str, value: int) -> Node:
        rest = value >> 1
        layer, index = rest >> 32, (rest & _INDEX_MASK) - 1
        if index < 0:
            return Node(layer, -1, implied_dir(name))
        link = self._links.get(name)
        return Node(
            layer,
            index,
            self.layers[layer].entries[index],
            None if link is None else self.layers[layer].entries[link & _INDEX_MASK],
        )

    # -- the Mapping protocol ------------------------------------------------------------------

    def __getitem__(self, name: str) -> Node:
        return self._node(name, self._nodes[name])

    def __iter__(self) -> Iterator[str]:
        return iter(self._nodes)

    def __len__(self) -> int:
        return len(self._nodes)

    def __contains__(self, name: object) -> bool:
        return name in self._nodes

    # -- questions -----------------------------------------------------------------------------

    def listdir(self, name: str) -> list[str]:
        """Base names in directory ``name`` (``""`` for the root), sorted."""
        value = self._nodes.get(name)
        if name and (value is None or not value & 1):
            raise KeyError(name)
        return sorted(child.rpartition("/")[2] for child in self._index().get(name, ()))

    def visible(self) -> set[tuple[int, str]]:
        """``(layer index, name)`` of every layer entry that can be seen (implied dirs excluded).

        A hard link is seen under its own name in its layer; the entry it resolves to is seen
        only if its own name is still visible.
        """
        return {
            (value >> 33, name) for name, value in self._nodes.items() if (value >> 1) & _INDEX_MASK
        }

    def hardlinks(self) -> list[tuple[str, ...]]:
        """Groups (sorted) of two or more visible names that share an inode, sorted."""
        groups: dict[int, list[str]] = {}
        for name, value in self._nodes.items():
            if not value & 1:
                groups.setdefault(value, []).append(name)
        return sorted(tuple(sorted(names)) for names in groups.values() if len(names) > 1)

    def file_entries(self) -> Iterator[tuple[str, int, int, Entry]]:
        """``(name, layer, index, entry)`` of the visible regular files that have content (hard
        links included, with the entry they resolve to)."""
        layers = self.layers
        for name, value in self._nodes.items():
            if value & 1:
                continue
            rest = value >> 1
            layer, index = rest >> 32, (rest & _INDEX_MASK) - 1
            entry = layers[layer].entries[index]
            if entry.type is EntryType.FILE and entry.size > 0:
                yield name, layer, index, entry

    def files(self) -> Iterator[tuple[str, Node]]:
        """Visible regular files that have content to fetch (hard links included)."""
        return ((name, self[name]) for name, _, _, _ in self.file_entries())


def merge(layers: Sequence[TOC]) -> MergedView:
    """The merged view of ``layers`` (base first), as overlayfs shows it."""
    return MergedView(layers)


def visible(layers: Sequence[TOC]) -> set[tuple[int, str]]:
    """Which layer entries (``(layer index, name)``) the merged view of ``layers`` shows."""
    return merge(layers).visible()
