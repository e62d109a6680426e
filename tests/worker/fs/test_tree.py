"""LayerTree: a TOC applied the way containerd's overlay applier unpacks a layer (no I/O)."""

from __future__ import annotations

import os
import stat

from starlight_core.layer.toc import Entry, EntryType
from starlight_worker.fs.tree import OPAQUE_XATTR, LayerTree, fuse_name, toc_name


def _build(*entries: Entry, first_ino: int = 10) -> LayerTree:
    return LayerTree.build(entries, first_ino=first_ino, implied_mtime_ns=lambda name: 77)


def test_types_modes_and_devices() -> None:
    tree = _build(
        Entry("d", EntryType.DIR, mode=0o1777, uid=1, gid=2, mtime_ns=5),
        Entry("d/f", EntryType.FILE, mode=0o4755, size=9),
        Entry("d/l", EntryType.SYMLINK, mode=0o644, linkname="f"),
        Entry("d/c", EntryType.CHAR, mode=0o666, devmajor=1, devminor=3),
        Entry("d/b", EntryType.BLOCK, mode=0o660, devmajor=259, devminor=70000),
        Entry("d/p", EntryType.FIFO, mode=0o600),
    )
    nodes = tree.nodes
    assert nodes["d"].mode == stat.S_IFDIR | 0o1777
    assert (nodes["d"].uid, nodes["d"].gid) == (1, 2)
    assert nodes["d/f"].mode == stat.S_IFREG | 0o4755
    assert nodes["d/f"].size == 9
    # Linux shows every symlink as 0777 with the target's length as its size.
    assert nodes["d/l"].mode == stat.S_IFLNK | 0o777
    assert nodes["d/l"].size == 1
    assert nodes["d/c"].rdev == os.makedev(1, 3)
    assert nodes["d/b"].rdev == os.makedev(259, 70000)
    assert stat.S_ISFIFO(nodes["d/p"].mode)
    assert sorted(nodes[""].children or {}) == ["d"]
    assert nodes["d"].nlink == 2
    assert nodes[""].nlink == 3


def test_whiteouts_become_char_devices_and_opaque_markers_xattrs() -> None:
    tree = _build(
        Entry("d", EntryType.DIR),
        Entry("d/.wh.gone", EntryType.WHITEOUT, uid=3, gid=4, mtime_ns=8),
        Entry("d/.wh..wh..opq", EntryType.OPAQUE),
        Entry(".wh.top", EntryType.WHITEOUT),
    )
    gone = tree.nodes["d/gone"]
    assert gone.mode == stat.S_IFCHR
    assert gone.rdev == 0
    assert (gone.uid, gone.gid) == (3, 4)
    assert "d/.wh.gone" not in tree.nodes
    assert "d/.wh..wh..opq" not in tree.nodes
    assert tree.nodes["d"].xattrs == {OPAQUE_XATTR: b"y"}
    assert stat.S_ISCHR(tree.nodes["top"].mode)


def test_opaque_marker_survives_a_later_directory_entry() -> None:
    tree = _build(
        Entry("d/.wh..wh..opq", EntryType.OPAQUE),
        Entry("d", EntryType.DIR, mode=0o700, xattrs={"user.x": b"1"}),
    )
    assert tree.nodes["d"].xattrs == {"user.x": b"1", OPAQUE_XATTR: b"y"}
    assert not tree.nodes["d"].implied


def test_hard_links_share_one_inode_and_count_their_names() -> None:
    tree = _build(
        Entry("a/f", EntryType.FILE, size=3),
        Entry("b/g", EntryType.HARDLINK, linkname="a/f"),
        Entry("a/h", EntryType.HARDLINK, linkname="a/f"),
    )
    f, g, h = (tree.nodes[n] for n in ("a/f", "b/g", "a/h"))
    assert f is g is h
    assert f.nlink == 3
    assert f.names == ["a/f", "b/g", "a/h"]


def test_replacing_a_hard_linked_name_keeps_the_other_link() -> None:
    tree = _build(
        Entry("f", EntryType.FILE, size=3),
        Entry("g", EntryType.HARDLINK, linkname="f"),
        Entry("f", EntryType.FILE, size=5),
    )
    assert tree.nodes["f"] is not tree.nodes["g"]
    assert tree.nodes["g"].nlink == 1
    assert tree.nodes["g"].names == ["g"]
    assert tree.nodes["g"].size == 3
    assert tree.nodes["f"].size == 5


def test_later_entries_win_and_replace_whole_subtrees() -> None:
    tree = _build(
        Entry("d", EntryType.DIR, mode=0o700),
        Entry("d/x", EntryType.FILE),
        Entry("d/sub/y", EntryType.FILE),
        Entry("d", EntryType.DIR, mode=0o755),  # a directory over a directory keeps contents
        Entry("d/sub", EntryType.FILE, size=1),  # a file over a directory removes it
    )
    assert tree.nodes["d"].mode == stat.S_IFDIR | 0o755
    assert "d/x" in tree.nodes
    assert "d/sub/y" not in tree.nodes
    assert tree.nodes["d/sub"].is_file
    assert tree.nodes["d"].nlink == 2


def test_implied_parents_and_inode_numbers() -> None:
    tree = _build(Entry("a/b/c", EntryType.FILE), first_ino=100)
    for name in ("", "a", "a/b"):
        node = tree.nodes[name]
        assert node.implied
        assert node.mode == stat.S_IFDIR | 0o755
        assert node.mtime_ns == 77
    inos = sorted(node.ino for node in tree.nodes.values())
    assert inos == list(range(100, 104))
    assert tree.next_ino == 104


def test_root_entry_describes_the_root() -> None:
    tree = _build(Entry("", EntryType.DIR, mode=0o700, mtime_ns=9))
    assert tree.root.mode == stat.S_IFDIR | 0o700
    assert tree.root.mtime_ns == 9
    assert not tree.root.implied


def test_hostile_or_inconsistent_entries_are_skipped_with_a_warning() -> None:
    tree = _build(
        Entry("../escape", EntryType.FILE),
        Entry("a/./b", EntryType.FILE),
        Entry("/abs", EntryType.FILE),
        Entry("link", EntryType.HARDLINK, linkname="nowhere"),
        Entry("d", EntryType.DIR),
        Entry("dlink", EntryType.HARDLINK, linkname="d"),
    )
    assert sorted(tree.nodes) == ["", "d"]
    assert len(tree.warnings) == 5


def test_names_that_are_not_utf8_round_trip() -> None:
    name = b"caf\xe9/\xff".decode("utf-8", "surrogateescape")
    tree = _build(Entry(name, EntryType.FILE))
    assert fuse_name(name) in tree.nodes
    assert fuse_name(name).encode("latin-1") == b"caf\xe9/\xff"
    assert toc_name(fuse_name(name)) == name


def test_trusted_xattrs_from_a_layer_are_dropped() -> None:
    """A hostile layer must not forge overlayfs markers through FUSE (the store drops them too)."""
    entries = [
        Entry(
            "dir",
            EntryType.DIR,
            mode=0o755,
            xattrs={"trusted.overlay.opaque": b"y", "user.keep": b"1"},
        )
    ]
    node = LayerTree.build(entries, first_ino=1).nodes[fuse_name("dir")]
    assert node.xattrs == {fuse_name("user.keep"): b"1"}
