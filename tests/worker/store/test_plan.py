"""The final tree of a layer, computed from its TOC (no I/O): same-name rules, whiteouts,
implied directories, hard links, and refusing hostile names."""

from __future__ import annotations

import pytest

from benchmarks.images.fidelity import fidelity_layers
from starlight_core.errors import CorruptLayer, UnsafePath
from starlight_core.fsview import merge
from starlight_core.layer.toc import Entry, EntryType
from starlight_core.testing import convert_bytes
from starlight_worker.store import LayerPlan, NodeKind, PlanNode, plan_layer
from tests.worker.store.support import dir_entry, entries_layer, file_entry

T = 1_700_000_000_000_000_000
CAP = b"\x01\x00\x00\x02" + bytes(16)


def plan_of(*items: Entry | tuple[Entry, bytes]) -> LayerPlan:
    return plan_layer(entries_layer(*items).toc)


def by_name(plan: LayerPlan) -> dict[str, PlanNode]:
    return {name: node for node in plan.nodes for name in node.names}


def test_nodes_come_after_their_parents_and_contents_are_indexed() -> None:
    plan = plan_of(
        file_entry("a/b/c", b"deep"),
        dir_entry("a", mode=0o700),
        file_entry("x", b"deep"),
        file_entry("empty", b""),
    )
    seen: set[str] = {""}
    for node in plan.nodes:
        assert node.name.rpartition("/")[0] in seen, node.name
        seen.add(node.name)
    nodes = by_name(plan)
    assert nodes["a"].mode == 0o700
    assert not nodes["a"].implied
    assert nodes["a"].made_implied  # made as a parent first: containerd copied xattrs then
    assert nodes["a/b"].implied
    assert nodes["a/b"].mode == 0o755
    # One digest, two files (distinct inodes); the empty file needs no content.
    assert len(plan.contents) == 1
    (indexes,) = plan.contents.values()
    assert sorted(plan.nodes[i].name for i in indexes) == ["a/b/c", "x"]
    assert plan.files_total == 2
    assert plan.bytes_total == 8
    assert not nodes["empty"].has_content


def test_a_later_entry_replaces_an_earlier_one_subtree_included() -> None:
    plan = plan_of(
        dir_entry("d"),
        file_entry("d/inner", b"gone with d"),
        file_entry("d", b"now a file", mtime_ns=T),
        dir_entry("e", mtime_ns=T + 1),
        Entry("e", EntryType.SYMLINK, linkname="d", mtime_ns=T + 2),
        file_entry("f", b"first"),
        Entry("f", EntryType.SYMLINK, linkname="target"),
    )
    nodes = by_name(plan)
    assert "d/inner" not in nodes
    # containerd sets the times of directory entries last, by name: the file that replaced
    # the directory gets the directory entry's time.
    assert nodes["d"].kind is NodeKind.FILE
    assert nodes["d"].mtime_ns == 0
    assert nodes["f"].kind is NodeKind.SYMLINK
    assert nodes["f"].target == "target"
    assert nodes["e"].mtime_ns == T + 2  # never through a symlink
    assert plan.files_total == 1


def test_a_directory_over_a_directory_keeps_children_and_adds_xattrs() -> None:
    plan = plan_of(
        dir_entry("d", mode=0o700, uid=1, xattrs={"user.a": b"1"}, mtime_ns=T),
        file_entry("d/kept", b"kept"),
        dir_entry("d", mode=0o750, uid=2, xattrs={"user.b": b"2"}, mtime_ns=T + 1),
    )
    nodes = by_name(plan)
    assert "d/kept" in nodes
    d = nodes["d"]
    assert (d.mode, d.uid, d.mtime_ns) == (0o750, 2, T + 1)
    assert d.xattrs == {"user.a": b"1", "user.b": b"2"}  # setxattr adds, never removes


def test_a_non_directory_parent_becomes_an_implied_directory() -> None:
    plan = plan_of(
        Entry("lib", EntryType.SYMLINK, linkname="/etc"),
        file_entry("lib/passwd", b"never written through the symlink"),
    )
    nodes = by_name(plan)
    assert nodes["lib"].kind is NodeKind.DIR
    assert nodes["lib"].implied
    assert nodes["lib/passwd"].kind is NodeKind.FILE


def test_whiteouts_and_opaque_markers() -> None:
    plan = plan_of(
        Entry("a/.wh.gone", EntryType.WHITEOUT, uid=3, gid=4, mtime_ns=T),
        file_entry("held", b"held"),
        Entry(".wh.held", EntryType.WHITEOUT),
        Entry(".wh.replaced", EntryType.WHITEOUT),
        file_entry("replaced", b"replaces the whiteout"),
        dir_entry("o"),
        Entry("o/.wh..wh..opq", EntryType.OPAQUE),
        Entry(".wh..wh..opq", EntryType.OPAQUE),
    )
    nodes = by_name(plan)
    gone = nodes["a/gone"]
    assert gone.kind is NodeKind.WHITEOUT
    assert (gone.uid, gone.gid) == (3, 4)
    assert gone.mtime_ns is None  # containerd leaves the device's time as made
    assert nodes["a"].implied
    assert nodes["held"].kind is NodeKind.FILE  # a whiteout of a held name is ignored
    assert nodes["replaced"].kind is NodeKind.FILE
    assert nodes["o"].opaque
    assert plan.root_opaque
    assert not any(".wh." in name for name in nodes)


def test_the_root_entry_is_ignored() -> None:
    plan = plan_of(dir_entry("", mode=0o700, uid=5), file_entry("f", b"x"))
    assert [node.name for node in plan.nodes] == ["f"]


def test_a_hard_link_shares_the_inode_and_its_header_applies_to_it() -> None:
    plan = plan_of(
        file_entry("bin/ping", b"ping", mode=0o4755, mtime_ns=T,
                   xattrs={"security.capability": CAP, "user.x": b"1"}),
        Entry("sbin/ping", EntryType.HARDLINK, linkname="bin/ping", mode=0o755, uid=7,
              mtime_ns=T + 5),
        file_entry("a", b"aaa"),
        Entry("b", EntryType.HARDLINK, linkname="a"),
        file_entry("a", b"a was replaced; b keeps the old inode"),
    )  # fmt: skip
    nodes = by_name(plan)
    ping = nodes["bin/ping"]
    assert nodes["sbin/ping"] is ping
    assert ping.names == ["bin/ping", "sbin/ping"]
    # containerd: lchown + chmod + chtimes on the link path, i.e. on the shared inode; the
    # chown drops the capability the link header does not carry again.
    assert (ping.mode, ping.uid, ping.mtime_ns) == (0o755, 7, T + 5)
    assert ping.xattrs == {"user.x": b"1"}
    assert nodes["b"].names == ["b"]
    assert nodes["b"].size == 3
    assert nodes["a"] is not nodes["b"]
    assert len(plan.contents) == 3


def test_trusted_xattrs_are_dropped_and_times_are_bounded() -> None:
    plan = plan_of(
        file_entry("f", b"x", mtime_ns=-5,
                   xattrs={"trusted.overlay.opaque": b"y", "user.ok": b"1"}),
        dir_entry("d", mtime_ns=-1, xattrs={"trusted.overlay.redirect": b"/etc"}),
    )  # fmt: skip
    nodes = by_name(plan)
    assert nodes["f"].xattrs == {"user.ok": b"1"}
    assert nodes["f"].mtime_ns == 0
    assert nodes["d"].xattrs == {}
    assert nodes["d"].mtime_ns == 0


@pytest.mark.parametrize(
    "entry",
    [
        Entry("../escape", EntryType.FILE),
        Entry("a/../../escape", EntryType.FILE),
        Entry("/etc/passwd", EntryType.FILE),
        Entry("a//b", EntryType.FILE),
        Entry("a/./b", EntryType.DIR),
        Entry("a/", EntryType.DIR),
        Entry("nul\x00byte", EntryType.FILE),
        Entry("x", EntryType.HARDLINK, linkname="../../etc/shadow"),
        Entry("x", EntryType.HARDLINK, linkname="/etc/shadow"),
        Entry("a/.wh..", EntryType.WHITEOUT),
        Entry(".wh..", EntryType.WHITEOUT),
        Entry("a/.wh.", EntryType.WHITEOUT),
        Entry("../.wh..wh..opq", EntryType.OPAQUE),
    ],
    ids=repr,
)
def test_hostile_names_are_refused(entry: Entry) -> None:
    with pytest.raises(UnsafePath):
        plan_of(file_entry("ok", b"ok"), entry)


@pytest.mark.parametrize(
    "items",
    [
        [Entry("x", EntryType.HARDLINK, linkname="missing")],
        [dir_entry("d"), Entry("x", EntryType.HARDLINK, linkname="d")],
        [Entry(".wh.w", EntryType.WHITEOUT), Entry("x", EntryType.HARDLINK, linkname="w")],
        [file_entry("x", b"x"), Entry("x", EntryType.HARDLINK, linkname="x")],
        [Entry("f", EntryType.FILE, size=3)],  # content without a digest
        [Entry("f", EntryType.FILE, uid=2**32 - 1)],  # chown would read it as "unchanged"
        [Entry("", EntryType.FILE)],
        [Entry("notawhiteout", EntryType.WHITEOUT)],
        [Entry("s", EntryType.SYMLINK, linkname="a\x00b")],
    ],
    ids=repr,
)
def test_corrupt_entries_are_refused(items: list[Entry | tuple[Entry, bytes]]) -> None:
    with pytest.raises(CorruptLayer):
        plan_of(*items)


@pytest.mark.parametrize("index", range(4))
def test_names_agree_with_the_merged_view_of_one_layer(index: int) -> None:
    """The same-name rules are the ones delta planning and the FUSE view use (fsview)."""
    _, toc = convert_bytes(fidelity_layers()[index])
    plan = plan_layer(toc)
    ours = {name for node in plan.nodes if node.kind is not NodeKind.WHITEOUT
            for name in node.names}  # fmt: skip
    view = merge([toc])
    assert ours == set(view) - {""}
    groups = {frozenset(n.names) for n in plan.nodes if len(n.names) > 1}
    assert groups == {frozenset(g) for g in view.hardlinks()}
