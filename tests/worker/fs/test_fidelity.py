"""Overlayfs over our FUSE layers equals overlayfs over the same layers unpacked by containerd's
rules: every name, type, mode, owner, time, size, xattr, link target, content and hard link."""

from __future__ import annotations

import os
import stat
import struct
from pathlib import Path

import pytest

from starlight_core.layer.toc import Entry, EntryType
from tests.worker.fs.conftest import Server
from tests.worker.fs.layers import Layer, overlay, snapshot, write_layer_dir

pytestmark = pytest.mark.e2e

T = 1_700_000_000_123_456_789
# security.capability, VFS_CAP_REVISION_2 with the effective bit: cap_net_raw permitted.
CAP_NET_RAW = struct.pack("<5I", 0x02000001, 1 << 13, 0, 0, 0)
BIG = bytes(range(256)) * 1200  # 300 KiB: several FUSE reads


def _file(name: str, data: bytes, **kw: object) -> tuple[Entry, bytes]:
    return Entry(name, EntryType.FILE, **kw), data  # type: ignore[arg-type]


def _dir(name: str, **kw: object) -> Entry:
    return Entry(name, EntryType.DIR, **{"mode": 0o755, "mtime_ns": T, **kw})  # type: ignore[arg-type]


BASE = Layer.of(
    _dir("", mtime_ns=T - 7),
    _dir("etc", mtime_ns=T - 1),
    _file("etc/passwd", b"root:x:0:0::/root:/bin/sh\n", mode=0o644, mtime_ns=T,
          xattrs={"user.note": b"from base"}),
    _file("etc/shadow", b"root:*:19000::::::\n", mode=0o640, gid=42, mtime_ns=T + 1),
    _dir("bin"),
    _file("bin/sh", b"#!shell\n" * 100, mode=0o755, mtime_ns=T + 2),
    _file("bin/su", b"setuid binary", mode=0o4755, mtime_ns=T + 3),
    _file("bin/ping", b"ping binary", mode=0o755, mtime_ns=T + 4,
          xattrs={"security.capability": CAP_NET_RAW}),
    # usr/bin is never described: an implied directory.
    Entry("usr/bin/sh", EntryType.HARDLINK, linkname="bin/sh"),
    _dir("usr/lib", mtime_ns=T + 5),
    _file("usr/lib/libx.so.1", BIG, mode=0o644, mtime_ns=T + 6),
    Entry("usr/lib/libx.so", EntryType.SYMLINK, linkname="libx.so.1", mtime_ns=T + 7),
    Entry("usr/lib/libx.so.0", EntryType.SYMLINK, linkname="libx.so", mtime_ns=T + 8),
    Entry("usr/lib/abs", EntryType.SYMLINK, linkname="/usr/lib/libx.so.0", mtime_ns=T + 8),
    _dir("data"),
    _file("data/a.txt", b"a", mtime_ns=T + 9),
    _file("data/b.txt", b"b", mtime_ns=T + 10),
    _dir("data/sub"),
    _file("data/sub/c.txt", b"c", mtime_ns=T + 11),
    _dir("todelete"),
    _file("todelete/x", b"x"),
    _file("old.txt", b"old content", mode=0o600, uid=1000, gid=1000, mtime_ns=T + 12),
    _file("gone.txt", b"to be whited out"),
    _dir("opq", uid=5, gid=6),
    _file("opq/x", b"x"),
    _file("opq/y", b"y"),
    _file("empty", b"", mtime_ns=T + 13),
    _dir("dev"),
    Entry("dev/null", EntryType.CHAR, mode=0o666, devmajor=1, devminor=3, mtime_ns=T),
    Entry("dev/sda", EntryType.BLOCK, mode=0o660, gid=6, devmajor=8, devminor=0, mtime_ns=T),
    _dir("run"),
    Entry("run/fifo", EntryType.FIFO, mode=0o620, mtime_ns=T),
    _dir("tmp", mode=0o1777),
    _dir("var"),
    _dir("var/tmp", mode=0o1777),
    _file("implied/deep/file", b"deep", mtime_ns=T),
)  # fmt: skip

MIDDLE = Layer.of(
    Entry(".wh.gone.txt", EntryType.WHITEOUT, mtime_ns=T),
    Entry(".wh.todelete", EntryType.WHITEOUT, mtime_ns=T),
    _dir("opq", mode=0o700, uid=7, gid=8, mtime_ns=T + 20),
    Entry("opq/.wh..wh..opq", EntryType.OPAQUE),
    _file("opq/z", b"z only", mtime_ns=T + 21),
    _file("old.txt", b"new content, replaced", mode=0o644, uid=0, gid=0, mtime_ns=T + 22),
    _dir("data", mtime_ns=T + 23),
    Entry("data/b.txt", EntryType.SYMLINK, linkname="a.txt", mtime_ns=T + 24),
    _file("data/sub", b"a directory became a file", mtime_ns=T + 25),
    _dir("newdir"),
    _file("newdir/f", b"linked thrice", uid=33, gid=33, mtime_ns=T + 26),
    Entry("newdir/g", EntryType.HARDLINK, linkname="newdir/f"),
    _dir("x"),
    Entry("x/h", EntryType.HARDLINK, linkname="newdir/f"),
    _file("dup", b"first"),
    _file("dup", b"second wins", mtime_ns=T + 27),
)  # fmt: skip

TOP = Layer.of(
    _dir("data", mtime_ns=T + 30),
    Entry("data/.wh.a.txt", EntryType.WHITEOUT, mtime_ns=T),
    Entry(".wh.never-existed", EntryType.WHITEOUT, mtime_ns=T),
    _dir("etc", mtime_ns=T + 31),
    _file("etc/passwd", b"root:x:0:0::/root:/bin/ash\n", mode=0o644, mtime_ns=T + 32),
    _file("caf\udce9", b"a name that is not UTF-8", mtime_ns=T + 33),
    _file("naïve.txt", b"utf-8 name", mtime_ns=T + 34),
    _file("tmp/.hidden", b"dotfile", mtime_ns=T + 35),
)  # fmt: skip

LAYERS = {"base": BASE, "middle": MIDDLE, "top": TOP}


@pytest.fixture(scope="module")
def attached(server: Server, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Layer key → (FUSE path, complete layer directory)."""
    root = tmp_path_factory.mktemp("fidelity-layers")
    paths = {}
    for key, layer in LAYERS.items():
        layer_dir = write_layer_dir(layer, root / key)
        paths[key] = server.client.attach(f"fid-{key}", layer_dir)
    return paths


def test_each_layer_matches_its_unpacked_directory(
    server: Server, attached: dict[str, Path], tmp_path: Path
) -> None:
    for key, fuse_path in attached.items():
        unpacked = Path(server.client.list()[0].layer_dir).parent / key / "fs"
        ours, our_links = snapshot(fuse_path, whiteout_times=False)
        theirs, their_links = snapshot(unpacked, whiteout_times=False)
        assert sorted(ours) == sorted(theirs), key
        for name in theirs:
            assert ours[name] == theirs[name], (key, name)
        assert our_links == their_links, key


def test_overlay_over_fuse_layers_equals_overlay_over_unpacked_layers(
    server: Server, attached: dict[str, Path], tmp_path: Path
) -> None:
    order = ["top", "middle", "base"]  # overlayfs: the first lowerdir is the top layer
    unpacked_root = Path(server.client.list()[0].layer_dir).parent
    with (
        overlay([attached[k] for k in order], tmp_path / "ours") as ours_root,
        overlay([unpacked_root / k / "fs" for k in order], tmp_path / "theirs") as theirs_root,
    ):
        ours, our_links = snapshot(ours_root)
        theirs, their_links = snapshot(theirs_root)
    # The merged roots are the two fresh upper directories; everything below must be equal.
    assert sorted(ours) == sorted(theirs)
    for name in theirs:
        assert ours[name] == theirs[name], name
    assert our_links == their_links

    # And the view is the one the layers describe, not merely the same wrong one twice.
    assert b"gone.txt" not in ours
    assert b"todelete" not in ours
    assert b"data/a.txt" not in ours
    assert b"never-existed" not in ours
    assert sorted(n for n in ours if n.startswith(b"opq/")) == [b"opq/z"]
    assert ours[b"opq"].mode == 0o700
    assert (ours[b"opq"].uid, ours[b"opq"].gid) == (7, 8)
    assert ours[b"old.txt"].size == len(b"new content, replaced")
    assert ours[b"data/b.txt"].kind == "symlink"
    assert ours[b"data/b.txt"].target == b"a.txt"
    assert ours[b"data/sub"].kind == "file"
    assert ours[b"bin/su"].mode == 0o4755
    assert dict(ours[b"bin/ping"].xattrs)["security.capability"] == CAP_NET_RAW
    assert dict(ours[b"etc/passwd"].xattrs) == {}  # the top layer's passwd has no xattrs
    assert ours[b"dev/null"].kind == "char"
    assert ours[b"dev/null"].rdev == os.makedev(1, 3)
    assert ours[b"dev/sda"].kind == "block"
    assert ours[b"run/fifo"].kind == "fifo"
    assert ours[b"var/tmp"].mode == 0o1777
    # The top layer's tmp/.hidden implies a 0755 tmp, and overlayfs takes the top layer's.
    assert ours[b"tmp"].mode == 0o755
    assert ours[b"empty"].size == 0
    assert ours[b"empty"].mtime_ns == T + 13
    assert ours[b"usr/lib/libx.so.1"].mtime_ns == T + 6
    assert ours[b"caf\xe9"].kind == "file"
    assert ours["naïve.txt".encode()].kind == "file"
    assert ours[b"dup"].size == len(b"second wins")
    assert frozenset({b"newdir/f", b"newdir/g", b"x/h"}) in our_links
    assert frozenset({b"bin/sh", b"usr/bin/sh"}) in our_links
    assert ours[b"newdir/f"].nlink == 3


def test_fuse_layer_presents_whiteouts_and_opaque_dirs_as_overlayfs_expects(
    attached: dict[str, Path],
) -> None:
    middle = attached["middle"]
    st = os.lstat(middle / "gone.txt")
    assert stat.S_ISCHR(st.st_mode)
    assert st.st_rdev == 0
    assert not os.path.lexists(middle / ".wh.gone.txt")
    assert os.getxattr(middle / "opq", "trusted.overlay.opaque") == b"y"
    assert ".wh..wh..opq" not in os.listdir(middle / "opq")
    with pytest.raises(OSError) as excinfo:
        os.getxattr(middle / "newdir", "trusted.overlay.opaque")
    assert excinfo.value.errno == 61  # ENODATA, which overlayfs reads as "not opaque"


def test_symlink_chain_resolves_through_the_mount(attached: dict[str, Path]) -> None:
    base = attached["base"]
    assert os.readlink(base / "usr/lib/libx.so.0") == "libx.so"
    with open(base / "usr/lib/libx.so.0", "rb") as f:
        assert f.read() == BIG
