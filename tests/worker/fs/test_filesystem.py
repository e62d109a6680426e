"""LayerFilesystem driven directly, as fusepy would call it, without a mount (no root needed)."""

from __future__ import annotations

import errno
import os
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from starlight_core import wire
from starlight_core.errors import AlreadyExists, InvalidInput
from starlight_core.layer.toc import Entry, EntryType
from starlight_worker.fs.filesystem import LayerFilesystem
from tests.worker.fs.layers import Layer

BOUND = 30.0

LAYER = Layer.of(
    Entry("d", EntryType.DIR, mode=0o750, mtime_ns=3),
    (Entry("d/here", EntryType.FILE, xattrs={"user.k": b"v"}), b"present"),
    (Entry("d/late", EntryType.FILE), b"late bytes"),
    (Entry("d/empty", EntryType.FILE), b""),
    Entry("d/link", EntryType.SYMLINK, linkname="here"),
    Entry("d/.wh.old", EntryType.WHITEOUT),
)


def _layer_dir(root: Path, *, withhold: tuple[str, ...] = ("d/late",)) -> Path:
    """A layer directory with regular files only (no mknod/chown: runs unprivileged)."""
    (root / "fs" / "d").mkdir(parents=True)
    (root / "toc.json").write_bytes(wire.dumps(LAYER.toc()))
    for name, data in LAYER.contents.items():
        if name not in withhold:
            (root / "fs" / name).write_bytes(data)
    return root


@pytest.fixture
def fs() -> LayerFilesystem:
    return LayerFilesystem("/mnt/unused", content_timeout=BOUND, poll_interval=BOUND)


def test_attach_presents_the_tree(fs: LayerFilesystem, tmp_path: Path) -> None:
    assert fs.attach("k1", str(_layer_dir(tmp_path))) == Path("/mnt/unused/k1")
    assert [entry[0] for entry in fs.readdir("/", 0)][2:] == ["k1"]
    names = [e if isinstance(e, str) else e[0] for e in fs.readdir("/k1/d", 0)]
    assert names == [".", "..", "here", "late", "empty", "link", "old"]
    st = fs.getattr("/k1/d")
    assert st["st_mode"] == stat.S_IFDIR | 0o750
    assert st["st_mtime"] == 3
    assert stat.S_ISCHR(fs.getattr("/k1/d/old")["st_mode"])
    assert fs.readlink("/k1/d/link") == "here"
    assert fs.getxattr("/k1/d/here", "user.k") == b"v"
    assert fs.listxattr("/k1/d/here") == ["user.k"]
    assert fs.getattr("/")["st_nlink"] == 3
    for path, call in (("/k1/nope", fs.getattr), ("/other", fs.getattr)):
        with pytest.raises(OSError) as excinfo:
            call(path)
        assert excinfo.value.errno == errno.ENOENT
    with pytest.raises(OSError) as excinfo:
        fs.getxattr("/k1/d/here", "trusted.overlay.opaque")
    assert excinfo.value.errno == errno.ENODATA


def test_reads_wait_for_their_own_file(fs: LayerFilesystem, tmp_path: Path) -> None:
    layer_dir = _layer_dir(tmp_path)
    fs.attach("k", str(layer_dir))
    late = fs.open("/k/d/late", os.O_RDONLY)
    got: list[bytes] = []
    reader = threading.Thread(target=lambda: got.append(fs.read(None, 100, 0, late)))
    reader.start()
    event = threading.Event()
    while fs.waiting() == 0 and reader.is_alive():
        event.wait(0.01)
    here = fs.open("/k/d/here", os.O_RDONLY)
    assert fs.read(None, 100, 0, here) == b"present"
    assert fs.read(None, 100, 0, fs.open("/k/d/empty", os.O_RDONLY)) == b""
    assert reader.is_alive()
    assert got == []

    (layer_dir / "fs/d/late").write_bytes(b"late bytes")
    assert fs.arrived("k", ["d/late"]) == 1
    reader.join(BOUND)
    assert got == [b"late bytes"]
    assert fs.read(None, 4, 5, late) == b"byte"
    fs.release(None, late)
    fs.release(None, here)
    assert fs.open_files() == 1  # the empty file's handle


def test_content_is_never_read_through_a_symlink(fs: LayerFilesystem, tmp_path: Path) -> None:
    layer_dir = _layer_dir(tmp_path, withhold=("d/here", "d/late"))
    secret = tmp_path / "secret"
    secret.write_bytes(b"host data")
    (layer_dir / "fs/d/here").symlink_to(secret)
    fs.attach("k", str(layer_dir))
    handle = fs.open("/k/d/here", os.O_RDONLY)
    with pytest.raises(OSError) as excinfo:
        fs.read(None, 100, 0, handle)
    assert excinfo.value.errno == errno.EIO


def test_attach_is_idempotent_and_detach_forgets(fs: LayerFilesystem, tmp_path: Path) -> None:
    layer_dir = _layer_dir(tmp_path / "a")
    assert fs.attach("k", str(layer_dir)) == fs.attach("k", str(layer_dir))
    with pytest.raises(AlreadyExists):
        fs.attach("k", str(_layer_dir(tmp_path / "b")))
    with pytest.raises(InvalidInput):
        fs.attach("k", "relative/dir")
    assert fs.detach("k")
    assert not fs.detach("k")
    with pytest.raises(OSError):
        fs.getattr("/k")


def test_writes_are_refused(fs: LayerFilesystem, tmp_path: Path) -> None:
    fs.attach("k", str(_layer_dir(tmp_path)))
    with pytest.raises(OSError) as excinfo:
        fs.open("/k/d/here", os.O_RDWR)
    assert excinfo.value.errno == errno.EROFS


def test_importing_the_package_does_not_load_libfuse() -> None:
    code = "import sys, starlight_worker.fs; assert 'fuse' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
