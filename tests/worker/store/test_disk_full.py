"""A full disk: the store on a small tmpfs. Placing or building fails with ResourceExhausted,
nothing half-written is visible, no temporary is left behind, and the same call succeeds once
space is freed."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from starlight_core.digest import sha256_digest
from starlight_core.errors import ResourceExhausted
from starlight_core.layer.toc import Entry, EntryType
from starlight_worker.store import LayerState, Store
from tests.worker.store.support import dir_entry, entries_layer, file_entry, snapshot

pytestmark = pytest.mark.e2e  # mount

MIB = 1 << 20


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    where = tmp_path / "small"
    where.mkdir()
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=4m,nr_inodes=2000,mode=0700", "tmpfs", str(where)],
        check=True,
        capture_output=True,
    )
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False, capture_output=True)


def _free(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def test_place_on_a_full_disk_then_again_after_freeing_space(small_fs: Path) -> None:
    data = bytes(range(256)) * (MIB // 256 + 1)  # a little over 1 MiB
    digest = sha256_digest(data)
    layer = entries_layer(
        dir_entry("d"),
        file_entry("d/a", data, mode=0o640),
        file_entry("d/b", data, mode=0o600),
        Entry("d/b-link", EntryType.HARDLINK, linkname="d/b", mode=0o600),
        file_entry("small", b"small"),
    )
    with Store(small_fs / "store") as store:
        handle = store.begin_layer(layer.toc)
        staged = store.staging_file()
        staged.write_bytes(data)
        # Leave room for less than one more copy.
        filler = small_fs / "filler"
        with open(filler, "wb") as f:
            f.write(b"\0" * (_free(small_fs) - MIB // 4))
        before = handle.missing()
        with pytest.raises(ResourceExhausted) as excinfo:
            handle.place(digest, staged)
        assert "No space left" in str(excinfo.value)
        assert excinfo.value.http_status == 507
        # Nothing at a final name, no temporary copy, the staged file intact for a retry.
        for name in ("d/a", "d/b", "d/b-link"):
            assert not os.path.lexists(handle.fs_dir / name)
        assert list(store.staging_dir.iterdir()) == [staged]
        assert staged.read_bytes() == data
        assert handle.missing() == before
        assert store.state(handle.key) is LayerState.RECEIVING

        filler.unlink()
        assert sorted(handle.place(digest, staged)) == ["d/a", "d/b", "d/b-link"]
        assert not staged.exists()
        path = store.staging_file()
        path.write_bytes(b"small")
        handle.place(sha256_digest(b"small"), path)
        handle.finalize()
        tree, links = snapshot(handle.fs_dir)
        assert tree[b"d/a"].sha256 == tree[b"d/b"].sha256 == digest.hex
        assert (tree[b"d/a"].mode, tree[b"d/b"].mode) == (0o640, 0o600)
        assert frozenset({b"d/b", b"d/b-link"}) in links
        assert list(store.staging_dir.iterdir()) == []


def test_begin_without_inodes_then_again(small_fs: Path) -> None:
    layer = entries_layer(
        *[dir_entry(f"dir{i:03}") for i in range(150)],
        *[Entry(f"dir{i:03}/link", EntryType.SYMLINK, linkname="..") for i in range(150)],
        file_entry("dir000/file", b"content"),
    )
    with Store(small_fs / "store") as store:
        used = os.statvfs(small_fs)
        # Room for the store's own files and some of the tree, not all of it.
        subprocess.run(
            ["mount", "-o", f"remount,nr_inodes={used.f_files - used.f_ffree + 60}",
             str(small_fs)],
            check=True, capture_output=True,
        )  # fmt: skip
        with pytest.raises(ResourceExhausted, match="layer sha256-"):
            store.begin_layer(layer.toc)
        assert store.state(layer.key) is LayerState.RECEIVING
        subprocess.run(
            ["mount", "-o", "remount,nr_inodes=2000", str(small_fs)],
            check=True,
            capture_output=True,
        )
        handle = store.begin_layer(layer.toc)
        tree, _ = snapshot(handle.fs_dir)
        assert sum(1 for meta in tree.values() if meta.kind == "dir") == 150
        assert sum(1 for meta in tree.values() if meta.kind == "symlink") == 150
        assert handle.missing() == {sha256_digest(b"content"): ["dir000/file"]}
