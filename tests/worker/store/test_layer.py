"""Building and filling layers on a real filesystem: the tree at begin, contents and their hard
links as they arrive, local copies across layers, finalize, hostile trees, concurrency."""

from __future__ import annotations

import os
import stat
import struct
import threading
from pathlib import Path

import pytest

from starlight_core.digest import sha256_digest
from starlight_core.errors import FailedPrecondition, InvalidInput, NotFound, UnsafePath
from starlight_core.layer.toc import Entry, EntryType
from starlight_worker.store import COMPLETE_MARKER, LayerState, Store
from tests.worker.store.support import (
    dir_entry,
    entries_layer,
    file_entry,
    fill,
    place_bytes,
    snapshot,
)

pytestmark = pytest.mark.e2e  # owners, devices, trusted xattrs: root

T = 1_700_000_000_123_456_789
CAP_NET_RAW = struct.pack("<5I", 0x02000001, 1 << 13, 0, 0, 0)
BIG = bytes(range(256)) * 4096

LAYER = entries_layer(
    dir_entry("etc", mtime_ns=T - 1),
    file_entry("etc/passwd", b"root:x:0:0::/root:/bin/sh\n", mtime_ns=T,
               xattrs={"user.note": b"base"}),
    dir_entry("bin", mode=0o750, uid=1, gid=2, mtime_ns=T - 2),
    file_entry("bin/ping", b"ping", mode=0o4755, uid=0, gid=0, mtime_ns=T + 1,
               xattrs={"security.capability": CAP_NET_RAW}),
    file_entry("bin/owned", b"owned", mode=0o6750, uid=1000, gid=1000, mtime_ns=T + 2),
    Entry("sbin/ping", EntryType.HARDLINK, linkname="bin/ping", mode=0o4755, mtime_ns=T + 1,
          xattrs={"security.capability": CAP_NET_RAW}),
    file_entry("big", BIG, mtime_ns=T + 3),
    file_entry("copy-of-big", BIG, mode=0o600, mtime_ns=T + 4),
    file_entry("empty", b"", mode=0o640, uid=5, mtime_ns=T + 5),
    Entry("empty-link", EntryType.HARDLINK, linkname="empty", mode=0o640, uid=5,
          mtime_ns=T + 5),
    Entry("lib", EntryType.SYMLINK, linkname="/usr/lib", uid=3, mtime_ns=T + 6),
    dir_entry("dev", mtime_ns=T + 7),
    Entry("dev/null", EntryType.CHAR, mode=0o666, devmajor=1, devminor=3, mtime_ns=T),
    Entry("dev/sda", EntryType.BLOCK, mode=0o660, gid=6, devmajor=8, mtime_ns=T),
    Entry("dev/fifo", EntryType.FIFO, mode=0o620, mtime_ns=T),
    dir_entry("tmp", mode=0o1777, mtime_ns=T + 8),
    dir_entry("opq", mtime_ns=T + 9),
    Entry("opq/.wh..wh..opq", EntryType.OPAQUE),
    Entry("opq/.wh.gone", EntryType.WHITEOUT, uid=7, gid=8),
    file_entry("implied/deep/file", b"deep", mtime_ns=T + 10),
)  # fmt: skip


def test_begin_makes_everything_but_the_contents(store: Store) -> None:
    handle = store.begin_layer(LAYER.toc)
    assert handle.key == LAYER.key == "sha256-" + LAYER.toc.layer.diff_id.hex
    assert store.state(handle.key) is LayerState.RECEIVING
    assert not handle.complete
    assert not handle.finalized
    layer_dir = store.layer_dir(handle.key)
    assert (layer_dir / "toc.json").is_file()
    assert not (layer_dir / COMPLETE_MARKER).exists()
    fs = handle.fs_dir
    tree, links = snapshot(fs)
    # Contents and the names linked to them are not there yet; everything else is.
    for absent in (b"etc/passwd", b"bin/ping", b"sbin/ping", b"big", b"copy-of-big"):
        assert absent not in tree
    assert tree[b"bin"].mode == 0o750
    assert (tree[b"bin"].uid, tree[b"bin"].gid) == (1, 2)
    assert tree[b"tmp"].mode == 0o1777
    assert tree[b"empty"].kind == "file"
    assert tree[b"empty"].size == 0
    assert (tree[b"empty"].mode, tree[b"empty"].uid, tree[b"empty"].mtime_ns) == (0o640, 5, T + 5)
    assert frozenset({b"empty", b"empty-link"}) in links
    assert tree[b"lib"].kind == "symlink"
    assert tree[b"lib"].target == b"/usr/lib"
    assert tree[b"lib"].uid == 3
    assert tree[b"lib"].mtime_ns == T + 6
    assert tree[b"dev/null"].kind == "char"
    assert tree[b"dev/null"].rdev == os.makedev(1, 3)
    assert tree[b"dev/null"].mode == 0o666
    assert tree[b"dev/sda"].kind == "block"
    assert tree[b"dev/sda"].gid == 6
    assert tree[b"dev/fifo"].kind == "fifo"
    assert tree[b"dev/fifo"].mode == 0o620
    gone = tree[b"opq/gone"]
    assert (gone.kind, gone.rdev, gone.mode, gone.uid, gone.gid) == ("char", 0, 0, 7, 8)
    assert dict(tree[b"opq"].xattrs) == {"trusted.overlay.opaque": b"y"}
    assert tree[b"implied"].mode == 0o755
    assert tree[b"implied/deep"].uid == 0
    assert not any(b".wh." in name for name in tree)

    missing = handle.missing()
    assert missing == {
        sha256_digest(b"root:x:0:0::/root:/bin/sh\n"): ["etc/passwd"],
        sha256_digest(b"ping"): ["bin/ping", "sbin/ping"],
        sha256_digest(b"owned"): ["bin/owned"],
        sha256_digest(BIG): ["big", "copy-of-big"],
        sha256_digest(b"deep"): ["implied/deep/file"],
    }
    assert handle.missing_size() == (6, 4 + 5 + len(b"root:x:0:0::/root:/bin/sh\n")
                                     + 2 * len(BIG) + 4)  # fmt: skip


def test_place_installs_whole_files_with_their_metadata_and_links(store: Store) -> None:
    handle = store.begin_layer(LAYER.toc)
    fs = handle.fs_dir
    staged = store.staging_file()
    staged.write_bytes(b"ping")
    assert handle.place(sha256_digest(b"ping"), staged) == ["bin/ping", "sbin/ping"]
    assert not staged.exists()  # consumed
    st = os.lstat(fs / "bin/ping")
    assert stat.S_IMODE(st.st_mode) == 0o4755
    assert st.st_mtime_ns == T + 1
    assert os.getxattr(fs / "bin/ping", "security.capability") == CAP_NET_RAW
    assert os.lstat(fs / "sbin/ping").st_ino == st.st_ino
    assert st.st_nlink == 2
    assert (fs / "bin/ping").read_bytes() == b"ping"

    # chown would clear setuid/setgid if it came after chmod.
    place_bytes(store, handle, sha256_digest(b"owned"), b"owned")
    st = os.lstat(fs / "bin/owned")
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o6750, 1000, 1000)

    # Two files with one content: each its own inode and metadata, from one placement.
    kept = store.staging_file()
    kept.write_bytes(BIG)
    assert sorted(handle.place(sha256_digest(BIG), kept, keep=True)) == ["big", "copy-of-big"]
    assert kept.exists()  # keep: left for another layer
    big, copy = os.lstat(fs / "big"), os.lstat(fs / "copy-of-big")
    assert big.st_ino != copy.st_ino
    assert (stat.S_IMODE(big.st_mode), big.st_mtime_ns) == (0o644, T + 3)
    assert (stat.S_IMODE(copy.st_mode), copy.st_mtime_ns) == (0o600, T + 4)
    assert (fs / "copy-of-big").read_bytes() == BIG
    # Placing what is already there changes nothing (and consumes the staged file).
    assert handle.place(sha256_digest(BIG), kept) == []
    assert not kept.exists()
    assert not handle.complete
    with pytest.raises(FailedPrecondition, match="2 files still miss"):
        handle.finalize()
    assert list(store.staging_dir.iterdir()) == []


def test_finalize_sets_directory_times_and_marks_the_layer_complete(store: Store) -> None:
    handle = fill(store, LAYER, finalize=False)
    assert handle.complete
    assert not handle.finalized
    assert handle.missing() == {}
    handle.finalize()
    handle.finalize()  # idempotent
    assert handle.finalized
    assert store.state(handle.key) is LayerState.COMPLETE
    assert (store.layer_dir(handle.key) / COMPLETE_MARKER).exists()
    tree, _ = snapshot(handle.fs_dir)
    assert tree[b"etc"].mtime_ns == T - 1
    assert tree[b"bin"].mtime_ns == T - 2
    assert tree[b"dev"].mtime_ns == T + 7
    assert tree[b"opq"].mtime_ns == T + 9
    assert tree[b"etc/passwd"].mtime_ns == T
    assert dict(tree[b"etc/passwd"].xattrs) == {"user.note": b"base"}
    record = store.layer(handle.key)
    assert record is not None
    assert (record.files_total, record.files_local) == (6, 6)
    assert record.bytes_total == record.bytes_local > 2 * len(BIG)
    # A complete layer takes nothing more and begins as complete.
    staged = store.staging_file()
    staged.write_bytes(b"ping")
    assert handle.place(sha256_digest(b"ping"), staged) == []
    assert store.begin_layer(LAYER.toc) is handle


def test_begin_is_idempotent_and_refuses_another_tree_under_the_same_key(store: Store) -> None:
    handle = store.begin_layer(LAYER.toc)
    assert store.begin_layer(LAYER.toc) is handle
    other = entries_layer(file_entry("different", b"tree"))
    import attrs

    forged = attrs.evolve(other.toc, layer=LAYER.toc.layer)
    with pytest.raises(FailedPrecondition, match="another TOC"):
        store.begin_layer(forged)
    assert store.state("sha256-" + "0" * 64) is LayerState.ABSENT
    with pytest.raises(InvalidInput):
        store.state("sha256:" + "0" * 64)
    with pytest.raises(InvalidInput):
        store.layer_dir("../../etc")


def test_local_copies_and_dedup_across_layers(store: Store) -> None:
    shared = b"the same library in two images\n" * 100
    one = entries_layer(file_entry("usr/lib/libx.so", shared, mtime_ns=T), salt="one")
    two = entries_layer(
        file_entry("opt/app/libx.so", shared, mode=0o755, uid=9, mtime_ns=T + 1),
        Entry("opt/app/libx.so.1", EntryType.HARDLINK, linkname="opt/app/libx.so", mode=0o755,
              uid=9, mtime_ns=T + 1),
        salt="two",
    )  # fmt: skip
    digest = sha256_digest(shared)
    h2 = store.begin_layer(two.toc)
    with pytest.raises(NotFound):
        h2.copy_local(digest)
    assert store.find_content(digest) is None
    assert store.contents_present([digest]) == set()

    fill(store, one)
    found = store.find_content(digest)
    assert found == store.layer_dir(one.key) / "fs" / "usr/lib/libx.so"
    assert store.contents_present([digest, sha256_digest(b"nope")]) == {digest}
    assert sorted(h2.copy_local(digest)) == ["opt/app/libx.so", "opt/app/libx.so.1"]
    assert h2.copy_local(digest) == []
    a = os.lstat(store.layer_dir(one.key) / "fs/usr/lib/libx.so")
    b = os.lstat(h2.fs_dir / "opt/app/libx.so")
    assert a.st_ino != b.st_ino  # never a hard link across layers: metadata differ
    assert (stat.S_IMODE(b.st_mode), b.st_uid, b.st_mtime_ns, b.st_nlink) == (0o755, 9, T + 1, 2)
    assert (h2.fs_dir / "opt/app/libx.so.1").read_bytes() == shared
    h2.finalize()


def test_store_place_fills_every_layer_that_needs_the_content(store: Store) -> None:
    data = b"needed twice"
    one = entries_layer(file_entry("a", data), salt="1")
    two = entries_layer(file_entry("b", data), file_entry("c", b"other"), salt="2")
    h1, h2 = store.begin_layer(one.toc), store.begin_layer(two.toc)
    staged = store.staging_file()
    staged.write_bytes(data)
    assert store.place(sha256_digest(data), staged) == {one.key: ["a"], two.key: ["b"]}
    assert not staged.exists()
    assert h1.complete
    assert not h2.complete
    assert h2.missing() == {sha256_digest(b"other"): ["c"]}


def test_a_staged_file_must_hold_the_content(store: Store) -> None:
    handle = store.begin_layer(LAYER.toc)
    staged = store.staging_file()
    staged.write_bytes(b"pin")  # short
    with pytest.raises(InvalidInput):
        handle.place(sha256_digest(b"ping"), staged)
    assert staged.exists()
    assert not (handle.fs_dir / "bin/ping").exists()
    os.unlink(staged)
    os.symlink("/etc/passwd", staged)
    with pytest.raises(InvalidInput):
        handle.place(sha256_digest(b"ping"), staged)
    with pytest.raises(NotFound):
        handle.place(sha256_digest(b"ping"), store.staging_file())


def test_a_symlink_in_the_tree_never_leads_a_write_outside(store: Store, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    # From the TOC: the symlink becomes an implied directory, the file lands inside the layer.
    hostile = entries_layer(
        Entry("evil", EntryType.SYMLINK, linkname=str(outside)),
        file_entry("evil/passwd", b"owned"),
        dir_entry("d"),
        file_entry("d/f", b"in d"),
    )
    handle = store.begin_layer(hostile.toc)
    assert (handle.fs_dir / "evil").is_dir()
    assert not (handle.fs_dir / "evil").is_symlink()
    # Planted on disk where a directory must be: placing refuses to follow it.
    os.rename(handle.fs_dir / "d", tmp_path / "d-moved")
    os.symlink(outside, handle.fs_dir / "d")
    with pytest.raises(UnsafePath):
        place_bytes(store, handle, sha256_digest(b"in d"), b"in d")
    place_bytes(store, handle, sha256_digest(b"owned"), b"owned")
    assert list(outside.iterdir()) == []
    assert (handle.fs_dir / "evil/passwd").read_bytes() == b"owned"
    assert [p.name for p in store.staging_dir.iterdir()] != []  # the caller's, for a retry
    # Reopening heals the tree: begin replaces the planted symlink with the directory.
    store.close()
    with Store(store.root) as again:
        handle = again.begin_layer(hostile.toc)
        assert not (handle.fs_dir / "d").is_symlink()
        place_bytes(again, handle, sha256_digest(b"in d"), b"in d")
        handle.finalize()
    assert list(outside.iterdir()) == []


def test_implied_directories_take_metadata_from_the_lower_layer(store: Store) -> None:
    base = entries_layer(
        dir_entry("srv", mode=0o700, uid=5, gid=6, mtime_ns=T, xattrs={"user.k": b"v"}),
        dir_entry("only-opaque", mode=0o711, mtime_ns=T - 100),
        Entry("gone", EntryType.SYMLINK, linkname="x"),
        salt="base",
    )
    upper = entries_layer(
        file_entry("srv/new", b"new"),
        Entry("only-opaque/.wh..wh..opq", EntryType.OPAQUE),
        file_entry("gone/f", b"f"),
        file_entry("fresh/f", b"g"),
        salt="upper",
    )
    fill(store, base)
    handle = fill(store, upper, lower=[base.key])
    tree, _ = snapshot(handle.fs_dir)
    srv = tree[b"srv"]
    assert (srv.mode, srv.uid, srv.gid, dict(srv.xattrs)) == (0o700, 5, 6, {"user.k": b"v"})
    # Nothing was created in it, so it keeps the lower directory's time too (as containerd).
    opq = tree[b"only-opaque"]
    assert (opq.mode, opq.mtime_ns) == (0o711, T - 100)
    assert dict(opq.xattrs) == {"trusted.overlay.opaque": b"y"}
    # Below it a non-directory, or nothing at all: the defaults.
    assert (tree[b"gone"].mode, tree[b"gone"].uid) == (0o755, 0)
    assert tree[b"fresh"].mode == 0o755
    record = store.layer(handle.key)
    assert record is not None
    assert record.lower == (base.key,)


def test_place_from_many_threads(store: Store) -> None:
    items: list[Entry | tuple[Entry, bytes]] = []
    for i in range(48):
        data = f"content {i % 24}\n".encode() * (i + 1)
        items.append(file_entry(f"d{i % 5}/f{i}", data, mode=0o640, uid=i, mtime_ns=T + i))
        if i % 3 == 0:
            items.append(Entry(f"links/l{i}", EntryType.HARDLINK, linkname=f"d{i % 5}/f{i}",
                               mode=0o640, uid=i, mtime_ns=T + i))  # fmt: skip
    layer = entries_layer(*items)
    handle = store.begin_layer(layer.toc)
    digests = list(handle.missing())
    errors: list[BaseException] = []
    placed: list[str] = []
    lock = threading.Lock()

    def worker(part: list) -> None:  # type: ignore[type-arg]
        try:
            for digest in part:
                names = place_bytes(store, handle, digest, layer.contents[digest])
                with lock:
                    placed.extend(names)
        except BaseException as exc:
            errors.append(exc)

    # Every digest twice, from different threads: one places it, the other finds it done.
    parts = [digests[i::6] for i in range(6)] + [digests[::-1][i::2] for i in range(2)]
    threads = [threading.Thread(target=worker, args=(part,)) for part in parts]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert sorted(placed) == sorted(n for names in layer_names(layer) for n in names)
    assert handle.complete
    handle.finalize()
    tree, links = snapshot(handle.fs_dir)
    assert tree[b"d3/f13"].uid == 13
    assert tree[b"d3/f13"].mtime_ns == T + 13
    assert frozenset({b"d0/f0", b"links/l0"}) in links
    assert list(store.staging_dir.iterdir()) == []


def layer_names(layer: object) -> list[list[str]]:
    from starlight_worker.store import plan_layer

    plan = plan_layer(layer.toc)  # type: ignore[attr-defined]
    return [node.names for node in plan.content_nodes()]


def test_remove_layer(store: Store) -> None:
    handle = fill(store, LAYER)
    key = handle.key
    store.record_image(
        reference="example.com/app:v1",
        manifest_digest=sha256_digest(b"m"),
        config_digest=sha256_digest(b"c"),
        platform="linux/amd64",
        namespace="default",
        layers=[key],
        manifest=b"m",
        config=b"c",
    )
    store.mark_image_complete("example.com/app:v1")
    assert store.unused_layers() == []
    with pytest.raises(FailedPrecondition, match=r"example\.com/app:v1"):
        store.remove_layer(key)
    assert store.remove_layer(key, force=True)
    assert store.state(key) is LayerState.ABSENT
    assert not store.layer_dir(key).exists()
    assert handle.state is LayerState.ABSENT
    assert store.find_content(sha256_digest(b"ping")) is None
    image = store.image("example.com/app:v1")
    assert image is not None
    assert not image.complete
    with pytest.raises(FailedPrecondition):
        handle.place(sha256_digest(b"ping"), store.staging_file())
    assert not store.remove_layer(key, force=True)
    assert list(store.trash_dir.iterdir()) == []
    # And it can come back.
    assert fill(store, LAYER).finalized
