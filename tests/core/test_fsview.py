"""The merged view against a brute-force overlayfs model, plus hand-written corner cases.

The reference unpacks each layer with prefix scans and then answers every path by an overlayfs
lookup (walk the components top layer first, stop at whiteouts, non-directories and opaque
directories), a different formulation from the incremental stacking ``merge`` does.
"""

from __future__ import annotations

import itertools
import posixpath
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from starlight_core.digest import Digest, sha256_digest
from starlight_core.errors import CorruptLayer
from starlight_core.fsview import IMPLIED_DIR_MODE, implied_dir, merge, visible
from starlight_core.layer.toc import TOC, Entry, EntryType, LayerInfo

_counter = itertools.count(1)


def _layer_info(n: int) -> LayerInfo:
    digest = sha256_digest(f"layer {n}".encode())
    return LayerInfo(digest=digest, size=1, diff_id=digest, media_type="x")


def toc(*entries: Entry, n: int = 0) -> TOC:
    return TOC(layer=_layer_info(n), entries=tuple(entries))


def f(name: str, content: bytes = b"x", **kw: Any) -> Entry:
    return Entry(
        name=name,
        type=EntryType.FILE,
        size=len(content),
        digest=sha256_digest(content),
        mtime_ns=next(_counter),
        **kw,
    )


def d(name: str, **kw: Any) -> Entry:
    kw.setdefault("mode", 0o700)
    return Entry(name=name, type=EntryType.DIR, mtime_ns=next(_counter), **kw)


def sym(name: str, target: str = "t") -> Entry:
    return Entry(name=name, type=EntryType.SYMLINK, linkname=target, mtime_ns=next(_counter))


def hl(name: str, target: str) -> Entry:
    return Entry(name=name, type=EntryType.HARDLINK, linkname=target, mtime_ns=next(_counter))


def wh(path: str) -> Entry:
    parent, base = posixpath.split(path)
    return Entry(name=posixpath.join(parent, ".wh." + base), type=EntryType.WHITEOUT)


def opq(directory: str) -> Entry:
    return Entry(name=posixpath.join(directory, ".wh..wh..opq"), type=EntryType.OPAQUE)


# -- the brute-force reference -------------------------------------------------------------


def _ancestors(name: str) -> list[str]:
    parts = name.split("/")
    return ["/".join(parts[:i]) for i in range(1, len(parts))]


def ref_layer(layer: TOC) -> tuple[dict[str, list[Any]], list[Any] | None]:
    """name -> [kind, index, entry, link, opaque]; root -> [index, entry, opaque] or None."""
    tree: dict[str, list[Any]] = {}
    root: list[Any] | None = None

    def remove(name: str) -> None:
        for key in [k for k in tree if k == name or k.startswith(name + "/")]:
            del tree[key]

    def make_parents(name: str) -> None:
        for path in _ancestors(name):
            if path in tree and tree[path][0] == "dir":
                continue
            remove(path)
            tree[path] = ["dir", -1, implied_dir(path), None, False]

    for index, e in enumerate(layer.entries):
        if e.type is EntryType.OPAQUE:
            directory = posixpath.dirname(e.name)
            if directory == "":
                root = root or [-1, implied_dir(""), False]
                root[2] = True
                continue
            make_parents(e.name)
            tree[directory][4] = True
        elif e.type is EntryType.WHITEOUT:
            make_parents(e.name)
            target = e.whiteout_target
            if target not in tree:
                tree[target] = ["wh", index, e, None, False]
        elif e.type is EntryType.DIR:
            if e.name == "":
                if root is None:
                    root = [index, e, False]
                else:
                    root[0], root[1] = index, e
                continue
            make_parents(e.name)
            if e.name in tree and tree[e.name][0] == "dir":
                tree[e.name][1:3] = [index, e]
            else:
                remove(e.name)
                tree[e.name] = ["dir", index, e, None, False]
        else:
            shown: list[Any] = [index, e, None]
            if e.type is EntryType.HARDLINK:
                target_local = tree.get(e.linkname)
                if target_local is None or target_local[0] != "other" or e.linkname == e.name:
                    raise CorruptLayer("bad hard link")
                shown = [target_local[1], target_local[2], e]
            make_parents(e.name)
            remove(e.name)
            tree[e.name] = ["other", *shown, False]
    return tree, root


def ref_merge(layers: list[TOC]) -> dict[str, tuple[int, int, Entry, Entry | None]]:
    trees = [ref_layer(layer) for layer in layers]
    root_stack: list[int] = []
    for i in reversed(range(len(trees))):
        root_stack.append(i)
        r = trees[i][1]
        if r is not None and r[2]:
            break

    def lookup(path: str) -> tuple[int, int, Entry, Entry | None] | None:
        """What the stack shows at ``path``, by an overlayfs lookup."""
        stack = root_stack
        parts = path.split("/")
        chain: list[tuple[int, list[Any]]] = []
        for depth in range(len(parts)):
            last = depth == len(parts) - 1
            prefix = "/".join(parts[: depth + 1])
            chain = []  # the layers merged at prefix, top first
            for i in stack:
                local = trees[i][0].get(prefix)
                if local is None:
                    continue
                if local[0] == "wh" or (local[0] != "dir" and chain):
                    break
                chain.append((i, local))
                if local[0] != "dir":
                    break
                # An opaque directory hides the lower layers from its children; its own
                # metadata, if implied, still comes from the directory it merges with
                # (containerd copies it).
                if local[4] and not last:
                    break
            if not chain:
                return None
            i, local = chain[0]
            if local[0] != "dir":
                return (i, local[1], local[2], local[3]) if last else None
            stack = [j for j, _ in chain]
        explicit = [(j, local) for j, local in chain if local[1] >= 0]
        if explicit:
            j, local = explicit[0]
            return (j, local[1], local[2], None)
        return (chain[-1][0], -1, implied_dir(path), None)

    result: dict[str, tuple[int, int, Entry, Entry | None]] = {}
    roots = [(i, r) for i, (_, r) in enumerate(trees) if r is not None and r[0] >= 0]
    if roots:
        i, r = roots[-1]
        result[""] = (i, r[0], r[1], None)
    for path in set().union(*(tree.keys() for tree, _ in trees)):
        shown = lookup(path)
        if shown is not None:
            result[path] = shown
    return result


def actual(layers: list[TOC]) -> dict[str, tuple[int, int, Entry, Entry | None]]:
    return {name: (n.layer, n.index, n.entry, n.link) for name, n in merge(layers).items()}


# -- generated stacks ----------------------------------------------------------------------

_names = st.lists(st.sampled_from("abc"), min_size=1, max_size=3).map("/".join)


@st.composite
def layer_stacks(draw: st.DrawFn) -> list[TOC]:
    layers = []
    for n in range(draw(st.integers(1, 4))):
        entries: list[Entry] = []
        for _ in range(draw(st.integers(0, 8))):
            kind = draw(
                st.sampled_from(["file", "file", "dir", "dir", "sym", "link", "wh", "opq", "root"])
            )
            name = draw(_names)
            if kind == "file":
                entries.append(f(name, draw(st.sampled_from([b"1", b"2", b""]))))
            elif kind == "dir":
                entries.append(d(name, mode=draw(st.sampled_from([0o700, 0o750]))))
            elif kind == "sym":
                entries.append(sym(name))
            elif kind == "link" and entries:
                target = draw(st.sampled_from(entries)).name
                entries.append(hl(name, target))
            elif kind == "wh":
                entries.append(wh(name))
            elif kind == "opq":
                entries.append(opq(draw(st.sampled_from(["", posixpath.dirname(name)]))))
            elif kind == "root":
                entries.append(d(""))
        layers.append(toc(*entries, n=n))
    return layers


@settings(max_examples=400)
@given(layer_stacks())
def test_merge_matches_overlay_lookup(layers: list[TOC]) -> None:
    try:
        expected = ref_merge(layers)
    except CorruptLayer:
        with pytest.raises(CorruptLayer):
            merge(layers)
        return
    assert actual(layers) == expected
    view = merge(layers)
    assert view.visible() == {(v[0], name) for name, v in expected.items() if v[1] >= 0}
    for name in view:
        if name:
            assert posixpath.dirname(name) == "" or view[posixpath.dirname(name)].entry.type is (
                EntryType.DIR
            )


# -- corner cases --------------------------------------------------------------------------


def test_whiteout_deletes_file_and_subtree_of_lower_layers_only() -> None:
    base = toc(d("etc"), f("etc/passwd"), d("usr"), d("usr/lib"), f("usr/lib/x"), f("keep"), n=0)
    upper = toc(wh("usr"), wh("etc/passwd"), wh("missing"), n=1)
    view = merge([base, upper])
    assert sorted(view) == ["etc", "keep"]
    assert view.listdir("etc") == []


def test_whiteout_never_hides_the_same_layer() -> None:
    base = toc(d("a"), f("a/old"), n=0)
    upper = toc(d("a"), f("a/new"), wh("a"), n=1)  # whiteout after a same-named entry: ignored
    assert sorted(merge([base, upper])) == ["a", "a/new", "a/old"]
    upper = toc(wh("a"), d("a"), f("a/new"), n=1)  # entry after its whiteout replaces it
    assert sorted(merge([base, upper])) == ["a", "a/new", "a/old"]
    upper = toc(wh("a"), f("a/new"), n=1)  # the whiteout is replaced by an implied parent
    view = merge([base, upper])
    assert sorted(view) == ["a", "a/new", "a/old"]
    assert view["a"].layer == 0  # implied: keeps the lower directory's metadata


def test_opaque_hides_lower_children_but_keeps_its_own() -> None:
    base = toc(d("a"), f("a/lower"), d("a/sub"), f("a/sub/deep"), f("b"), n=0)
    upper = toc(f("a/mine"), opq("a"), n=1)
    view = merge([base, upper])
    assert sorted(view) == ["a", "a/mine", "b"]
    assert view["a"].layer == 0
    assert view["a"].entry.mode == 0o700


def test_root_opaque_hides_everything_below() -> None:
    base = toc(d(""), f("x"), d("y"), f("y/z"), n=0)
    upper = toc(opq(""), f("w"), n=1)
    view = merge([base, upper])
    assert sorted(view) == ["", "w"]
    assert view[""].layer == 0  # the root itself stays


def test_file_replacing_dir_drops_subtree_for_good() -> None:
    base = toc(d("a"), f("a/x"), n=0)
    middle = toc(f("a"), n=1)
    top = toc(d("a"), f("a/y"), n=2)
    view = merge([base, middle])
    assert sorted(view) == ["a"]
    assert view["a"].entry.type is EntryType.FILE
    view = merge([base, middle, top])
    assert sorted(view) == ["a", "a/y"]
    assert view["a"].layer == 2


def test_dir_replacing_file_and_dir_over_dir_merging() -> None:
    base = toc(f("a"), d("b", mode=0o700), f("b/x"), n=0)
    upper = toc(d("a"), d("b", mode=0o711), f("b/y"), n=1)
    view = merge([base, upper])
    assert sorted(view) == ["a", "b", "b/x", "b/y"]
    assert view["a"].entry.type is EntryType.DIR
    assert view["b"].layer == 1
    assert view["b"].entry.mode == 0o711


def test_implied_parents() -> None:
    view = merge([toc(f("a/b/c"), n=0)])
    assert view["a"].implied
    assert view["a/b"].implied
    assert view["a"].entry.mode == IMPLIED_DIR_MODE
    assert view.visible() == {(0, "a/b/c")}
    # Over a lower directory: the lower one's metadata shows (containerd's mkparent copies it).
    view = merge([toc(d("a", mode=0o700, uid=7), n=0), toc(f("a/x"), n=1)])
    assert view["a"].layer == 0
    assert view["a"].entry.uid == 7
    assert view.visible() == {(0, "a"), (1, "a/x")}
    # Over a lower non-directory: an implied directory replaces it.
    view = merge([toc(sym("a", "/elsewhere"), n=0), toc(f("a/x"), n=1)])
    assert view["a"].implied
    assert view["a"].layer == 1


def test_same_layer_duplicates() -> None:
    view = merge([toc(d("a", mode=0o700), f("a/x"), d("a", mode=0o755), n=0)])
    assert sorted(view) == ["a", "a/x"]
    assert view["a"].entry.mode == 0o755
    view = merge([toc(d("a"), f("a/x"), f("a"), n=0)])
    assert sorted(view) == ["a"]
    view = merge([toc(f("a"), f("a/x"), n=0)])  # a child turns its file parent into a dir
    assert view["a"].implied
    assert sorted(view) == ["a", "a/x"]


def test_hard_links_share_an_inode() -> None:
    layer = toc(d("bin"), f("bin/busybox", b"bb"), hl("bin/sh", "bin/busybox"), n=0)
    layer2 = toc(hl("bin/ls", "bin/busybox"), n=1)  # target not in this layer
    view = merge([layer])
    assert view.hardlinks() == [("bin/busybox", "bin/sh")]
    sh = view["bin/sh"]
    assert sh.entry == layer.entries[1]
    assert sh.link == layer.entries[2]
    assert sh.inode == view["bin/busybox"].inode
    with pytest.raises(CorruptLayer, match="bin/ls"):
        merge([layer, layer2])


def test_hard_link_survives_replacement_and_deletion_of_its_target() -> None:
    old = f("a", b"old")
    layer = toc(old, hl("b", "a"), hl("c", "b"), f("a", b"new"), n=0)
    view = merge([layer])
    assert view["b"].entry == old
    assert view["c"].entry == old
    assert view.hardlinks() == [("b", "c")]
    view = merge([layer, toc(wh("b"), n=1)])
    assert view["c"].entry == old
    assert view.hardlinks() == []
    assert view.visible() == {(0, "a"), (0, "c")}


@pytest.mark.parametrize(
    "entries",
    [
        [d("a"), hl("b", "a")],  # to a directory
        [f("a"), hl("a", "a")],  # to itself
        [f("x/a"), f("x"), hl("b", "x/a")],  # to a name the layer dropped
        [wh("a"), hl("b", "a")],  # to a whiteout
    ],
)
def test_bad_hard_links(entries: list[Entry]) -> None:
    with pytest.raises(CorruptLayer, match="hard link"):
        merge([toc(*entries)])


def test_root_must_be_a_directory() -> None:
    with pytest.raises(CorruptLayer, match="root"):
        merge([toc(Entry(name="", type=EntryType.FILE, digest=Digest(sha256_digest(b""))))])


def test_visible_function_and_listdir() -> None:
    base = toc(d("a"), f("a/x"), f("a/y"), n=0)
    upper = toc(f("a/x", b"2"), n=1)
    assert visible([base, upper]) == {(0, "a"), (0, "a/y"), (1, "a/x")}
    view = merge([base, upper])
    assert view.listdir("a") == ["x", "y"]
    assert view.listdir("") == ["a"]
    with pytest.raises(KeyError):
        view.listdir("a/x")
    assert sorted(name for name, _ in view.files()) == ["a/x", "a/y"]
    view = merge([toc(f("empty", b""), f("full"), n=0)])
    assert [name for name, _ in view.files()] == ["full"]
