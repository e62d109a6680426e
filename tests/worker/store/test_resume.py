"""Crash and resume: a process killed (SIGKILL) at awkward moments, the store reopened.

Each scenario runs the store in a child process that kills itself at a chosen point — after
placing half the contents with a half-written staging file lying around, after a file was
renamed into place but before its hard links, in the middle of building the tree, after
``complete`` was written but before the database heard of it. The reopened store must then
know exactly what is missing, and finishing must give the same tree as an uninterrupted run.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from starlight_core import wire
from starlight_core.errors import FailedPrecondition
from starlight_core.layer.toc import Entry, EntryType
from starlight_worker.store import LayerState, Store, plan_layer
from tests.worker.store.support import (
    Layer,
    Meta,
    differences,
    dir_entry,
    entries_layer,
    file_entry,
    fill,
    place_bytes,
    snapshot,
)

pytestmark = pytest.mark.e2e

T = 1_700_000_000_000_000_000

LAYER = entries_layer(
    dir_entry("etc", mtime_ns=T),
    *[file_entry(f"etc/f{i:02}", f"file {i}\n".encode() * (i + 1), mode=0o640, uid=i,
                 mtime_ns=T + i) for i in range(12)],
    Entry("bin/linked", EntryType.HARDLINK, linkname="etc/f03", mode=0o640, uid=3,
          mtime_ns=T + 3),
    Entry("bin/linked2", EntryType.HARDLINK, linkname="etc/f03", mode=0o640, uid=3,
          mtime_ns=T + 3),
    file_entry("dup-of-f05", b"file 5\n" * 6, mtime_ns=T + 40),
    file_entry("empty", b"", mtime_ns=T + 41),
    Entry("dev/null", EntryType.CHAR, mode=0o666, devmajor=1, devminor=3, mtime_ns=T),
    Entry("run/fifo", EntryType.FIFO, mtime_ns=T),
    Entry("lib", EntryType.SYMLINK, linkname="usr/lib", mtime_ns=T),
    Entry("old/.wh.gone", EntryType.WHITEOUT),
    dir_entry("opq", mtime_ns=T + 50),
    Entry("opq/.wh..wh..opq", EntryType.OPAQUE),
)  # fmt: skip

# Made "now" by any unpacker (containerd too): implied directories, whiteout devices.
UNTIMED = [b"bin", b"dev", b"run", b"old", b"old/gone"]

Tree = tuple[dict[bytes, Meta], set[frozenset[bytes]]]

_CHILD = textwrap.dedent(
    """
    import os, signal, sys
    from pathlib import Path
    from starlight_core import wire
    from starlight_core.digest import Digest
    from starlight_core.layer.toc import TOC
    from starlight_worker.store import Store, layer as layer_module, database

    root, toc_path, contents, mode = sys.argv[1:5]
    toc = wire.loads(Path(toc_path).read_bytes(), TOC)

    def die(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGKILL)

    def place(handle, digest):
        path = store.staging_file()
        path.write_bytes((Path(contents) / Digest(digest).hex).read_bytes())
        handle.place(digest, path)

    store = Store(root)
    if mode == "mid-build":
        calls = [0]
        original = layer_module.LayerHandle._build_leaf
        def counting(self, *args):
            calls[0] += 1
            if calls[0] == 3:
                die()
            return original(self, *args)
        layer_module.LayerHandle._build_leaf = counting
    handle = store.begin_layer(toc)
    digests = sorted(handle.missing())
    if mode == "half":
        for digest in digests[: len(digests) // 2]:
            place(handle, digest)
        stray = store.staging_file()
        stray.write_bytes(b"half a cont")
        die()
    if mode == "before-links":
        layer_module.LayerHandle._link = die
        place(handle, sys.argv[5])
    if mode == "before-db-complete":
        for digest in digests:
            place(handle, digest)
        database.Database.complete_layer = die
        handle.finalize()
    raise SystemExit("the child was meant to die")
    """
)


def crash(tmp_path: Path, root: Path, layer: Layer, mode: str, *extra: str) -> None:
    toc_path = tmp_path / "toc.json"
    toc_path.write_bytes(wire.dumps(layer.toc))
    contents = tmp_path / "contents"
    contents.mkdir(exist_ok=True)
    for digest, data in layer.contents.items():
        (contents / digest.hex).write_bytes(data)
    result = subprocess.run(
        [sys.executable, "-c", _CHILD, str(root), str(toc_path), str(contents), mode, *extra],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == -signal.SIGKILL, result.stderr


def reference_tree(tmp_path: Path, layer: Layer) -> Tree:
    with Store(tmp_path / "reference") as reference:
        handle = fill(reference, layer)
        return snapshot(handle.fs_dir, skip_times=UNTIMED)


def finish(store: Store, layer: Layer, tmp_path: Path) -> list[str]:
    """Finish the layer; the differences from an uninterrupted run."""
    handle = store.begin_layer(layer.toc)
    for digest in handle.missing():
        place_bytes(store, handle, digest, layer.contents[digest])
    handle.finalize()
    tree = snapshot(handle.fs_dir, skip_times=UNTIMED)
    return differences(tree, reference_tree(tmp_path, layer))


def test_killed_after_placing_half(tmp_path: Path) -> None:
    root = tmp_path / "store"
    crash(tmp_path, root, LAYER, "half")
    assert len(list((root / "staging").iterdir())) == 1  # the half-written content
    all_digests = sorted(d for d, data in LAYER.contents.items() if data)  # as missing()
    placed = set(all_digests[: len(all_digests) // 2])
    with Store(root) as store:
        assert list(store.staging_dir.iterdir()) == []  # stray staging files are gone
        key = LAYER.key
        assert store.state(key) is LayerState.RECEIVING
        handle = store.begin_layer(LAYER.toc)
        plan = plan_layer(LAYER.toc)
        expected = {
            digest: [n for i in indexes for n in plan.nodes[i].names]
            for digest, indexes in plan.contents.items()
            if digest not in placed
        }
        assert handle.missing() == expected
        record = store.layer(key)
        assert record is not None
        assert record.files_local == plan.files_total - sum(
            len(indexes) for digest, indexes in plan.contents.items() if digest not in placed
        )
        assert store.contents_present(all_digests) == placed
        assert finish(store, LAYER, tmp_path) == []


def test_killed_between_the_rename_and_the_hard_links(tmp_path: Path) -> None:
    root = tmp_path / "store"
    linked = next(d for d, data in LAYER.contents.items() if data == b"file 3\n" * 4)
    crash(tmp_path, root, LAYER, "before-links", str(linked))
    fs = root / "layers" / LAYER.key / "fs"
    assert (fs / "etc/f03").exists()
    assert not (fs / "bin/linked").exists()
    with Store(root) as store:
        handle = store.begin_layer(LAYER.toc)
        # The file at its final name is the content: only the links were missing.
        assert linked not in handle.missing()
        assert os.lstat(fs / "bin/linked").st_ino == os.lstat(fs / "etc/f03").st_ino
        assert os.lstat(fs / "etc/f03").st_nlink == 3
        assert finish(store, LAYER, tmp_path) == []


def test_killed_while_building_the_tree(tmp_path: Path) -> None:
    root = tmp_path / "store"
    crash(tmp_path, root, LAYER, "mid-build")
    with Store(root) as store:
        # The database row is there (written before the tree), the tree is partial.
        assert store.state(LAYER.key) is LayerState.RECEIVING
        assert finish(store, LAYER, tmp_path) == []


def test_killed_after_the_marker_before_the_database(tmp_path: Path) -> None:
    root = tmp_path / "store"
    crash(tmp_path, root, LAYER, "before-db-complete")
    with Store(root) as store:
        assert store.state(LAYER.key) is LayerState.COMPLETE
        record = store.layer(LAYER.key)
        assert record is not None
        assert record.files_local == record.files_total
        handle = store.begin_layer(LAYER.toc)
        assert handle.finalized
        assert handle.missing() == {}


def test_one_process_at_a_time(store_root: Path) -> None:
    with Store(store_root), pytest.raises(FailedPrecondition, match="in use"):
        Store(store_root)
    Store(store_root).close()  # released on close


def test_a_tree_the_database_never_heard_of_is_rebuilt_from_scratch(store_root: Path) -> None:
    other = entries_layer(file_entry("stale", b"from another TOC"), file_entry("keep", b"k"))
    with Store(store_root) as store:
        fill(store, other)
    # As if a begin of LAYER (same key) stopped after writing its TOC and part of a tree.
    layer_dir = store_root / "layers" / LAYER.key
    (store_root / "layers" / other.key).rename(layer_dir)
    with Store(store_root) as store:
        assert store.state(LAYER.key) is LayerState.ABSENT
        handle = store.begin_layer(LAYER.toc)
        assert not (handle.fs_dir / "stale").exists()
        assert not (layer_dir / "complete").exists()
        assert sorted(handle.missing()) == sorted(d for d, data in LAYER.contents.items() if data)
