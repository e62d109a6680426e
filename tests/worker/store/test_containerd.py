"""Fidelity against containerd itself (invariant 2).

The same image is pushed to a real registry and pulled by a real containerd 1.6 (its overlayfs
snapshotter unpacks each layer into its own directory), and filled into our store from the
TOCs and the contents cut from the converted blobs. Then:

* the overlay of our complete layer directories (top layer first) equals containerd's mount of
  the image — names, types, modes, owners, ns times, sizes, xattrs, devices, link targets,
  contents and hard links;
* each of our layer directories equals containerd's directory for that layer (found through
  the ``lowerdir`` of its mount), whiteout devices and opaque xattrs included.

Times containerd itself makes "now" are not compared: implied directories that something was
created in, and whiteout devices.
"""

from __future__ import annotations

import asyncio
import struct
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path

import attrs
import pytest

from benchmarks.fstree import Node, diff_trees, snapshot_tree
from benchmarks.images.build import push_image
from benchmarks.images.fidelity import fidelity_layers
from benchmarks.services.containerd import Containerd
from benchmarks.services.registry import Registry
from starlight_core.reference import Reference
from starlight_core.registry import RegistryClient
from starlight_core.testing import TarMember, build_tar
from starlight_worker.store import LayerHandle, Store
from tests.worker.store.support import (
    differences,
    fill,
    overlay,
    snapshot,
    tar_layer,
    untimed_names,
)

pytestmark = pytest.mark.e2e

t = 1_700_000_000
CAP_NET_RAW = struct.pack("<5I", 0x02000001, 1 << 13, 0, 0, 0).decode("utf-8", "surrogateescape")


def corner_layers() -> list[bytes]:
    """What the fidelity image does not exercise: containerd's own rules for implied parents
    (metadata copied from the lower layer), hard-link headers, repeated and replaced names."""
    base = [
        TarMember("keep", kind="dir", mode=0o700, uid=5, gid=6, xattrs={"user.k": "v"}, mtime=t),
        TarMember("keep/old", data=b"old\n", mtime=t),
        TarMember("op", kind="dir", mtime=t),
        TarMember("op/sub", kind="dir", mode=0o711, uid=7, mtime=t),
        TarMember("op/sub/f", data=b"hidden by the opaque op\n", mtime=t),
        TarMember("onlyopq", kind="dir", mode=0o750, mtime=t - 100),
        TarMember("onlyopq/x", data=b"x\n", mtime=t),
        TarMember("bin", kind="dir", mtime=t),
        TarMember("bin/cap", data=b"cap\n", mode=0o4755,
                  xattrs={"security.capability": CAP_NET_RAW}, mtime=t),
        TarMember("bin/cap-link", kind="hardlink", linkname="bin/cap", mode=0o4755,
                  xattrs={"security.capability": CAP_NET_RAW}, mtime=t),
        TarMember("bin/ping", data=b"ping\n", mode=0o4755,
                  xattrs={"security.capability": CAP_NET_RAW}, mtime=t),
        TarMember("bin/plain-link", kind="hardlink", linkname="bin/ping", mode=0o755,
                  mtime=t + 1),
        TarMember("dev", kind="dir", mtime=t),
        TarMember("dev/null", kind="char", devmajor=1, devminor=3, mode=0o666, mtime=t),
        TarMember("dev/loop0", kind="block", devmajor=7, devminor=0, mode=0o660, gid=6, mtime=t),
    ]  # fmt: skip
    middle = [
        TarMember("keep/new", data=b"new\n", mtime=t + 10),  # keep: implied, from the base
        TarMember("op", kind="opaque", mtime=t + 10),  # op: implied and opaque
        TarMember("op/sub/g", data=b"g\n", mtime=t + 10),  # op/sub: implied, from the base
        TarMember("onlyopq", kind="opaque", mtime=t + 10),  # implied, nothing made in it
        TarMember("h1", data=b"hard\n", mode=0o644, mtime=t + 10),
        TarMember("h2", kind="hardlink", linkname="h1", mode=0o600, uid=9, mtime=t + 15),
        TarMember("d", kind="dir", mode=0o700, mtime=t + 10),
        TarMember("d/x", data=b"in d\n", mtime=t + 10),
        TarMember("d", kind="dir", mode=0o750, uid=3, mtime=t + 11),
        TarMember("x", kind="dir", mtime=t + 17),
        TarMember("x", data=b"a file now\n", mtime=t + 18),
        TarMember("tr", data=b"trusted\n", xattrs={"trusted.evil": "1", "user.ok": "1"},
                  mtime=t + 10),
        TarMember("a", data=b"first a\n", mtime=t + 10),
        TarMember("b", kind="hardlink", linkname="a", mtime=t + 10),
        TarMember("a", data=b"second a\n", mtime=t + 12),
        TarMember("dup", data=b"one\n", mtime=t + 10),
        TarMember("dup", data=b"two\n", mtime=t + 13),
        TarMember("dev/loop0", kind="whiteout", mtime=t + 10),
    ]  # fmt: skip
    top = [TarMember("etc/app.conf", data=b"answer=42\n", mtime=t + 30)]
    return [build_tar(layer) for layer in (base, middle, top)]


@pytest.fixture(scope="module")
def containerd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Containerd]:
    with Containerd(tmp_path_factory.mktemp("containerd")) as instance:
        yield instance


def _push(registry: Registry, tars: Sequence[bytes], name: str) -> Reference:
    reference = Reference.parse(f"{registry.host}/{name}-{uuid.uuid4().hex[:8]}:v1")

    async def push() -> None:
        async with RegistryClient(plain_http=True) as client:
            await push_image(client, reference, tars, docker=True)

    asyncio.run(push())
    return reference


def _lowerdirs(target: Path) -> list[Path]:
    """The ``lowerdir`` list (top first) of the overlay mounted at ``target``."""
    with open("/proc/self/mountinfo") as mountinfo:
        for line in mountinfo:
            fields = line.split()
            if fields[4] != str(target):
                continue
            options = fields[fields.index("-") + 3]
            for option in options.split(","):
                if option.startswith("lowerdir="):
                    return [Path(p) for p in option[len("lowerdir=") :].split(":")]
    raise AssertionError(f"no overlay with lowerdirs at {target}")


def _without_times(tree: dict[str, Node], names: set[str]) -> dict[str, Node]:
    return {k: attrs.evolve(v, mtime_ns=None) if k in names else v for k, v in tree.items()}


def _compare(
    containerd: Containerd, registry: Registry, tars: Sequence[bytes], tmp_path: Path, name: str
) -> tuple[dict[str, Node], dict[str, Node]]:
    reference = _push(registry, tars, name)
    containerd.ctr("images", "pull", "--plain-http", str(reference))
    layers = [tar_layer(tar, chunk_size=64 * 1024) for tar in tars]
    untimed_layers, untimed_merged = untimed_names(layers)

    theirs_mount = tmp_path / "containerd"
    theirs_mount.mkdir()
    containerd.ctr("images", "mount", str(reference), str(theirs_mount))
    try:
        theirs = snapshot_tree(theirs_mount)
        their_layers = list(reversed(_lowerdirs(theirs_mount)))  # base first
        assert len(their_layers) == len(layers)
        their_layer_trees = [
            snapshot(d, skip_times=untimed) for d, untimed in zip(their_layers, untimed_layers,
                                                                   strict=True)
        ]  # fmt: skip
    finally:
        containerd.ctr("images", "unmount", str(theirs_mount))

    with Store(tmp_path / "store") as store:
        handles: list[LayerHandle] = []
        for layer in layers:
            lower = [h.key for h in reversed(handles)]
            handles.append(fill(store, layer, lower=lower))
        dirs = [handle.fs_dir for handle in handles]
        with overlay(list(reversed(dirs)), tmp_path / "ours") as merged:
            ours = snapshot_tree(merged)
        for index, (directory, untimed) in enumerate(zip(dirs, untimed_layers, strict=True)):
            mine = snapshot(directory, skip_times=untimed)
            assert differences(mine, their_layer_trees[index]) == [], f"layer {index}"

    theirs_cmp = _without_times(theirs, untimed_merged)
    ours_cmp = _without_times(ours, untimed_merged)
    assert diff_trees(theirs_cmp, ours_cmp) == []
    return theirs, ours


def test_the_fidelity_image_equals_containerds_unpack(
    containerd: Containerd, registry: Registry, tmp_path: Path
) -> None:
    _theirs, ours = _compare(containerd, registry, fidelity_layers(), tmp_path, "store-fidelity")
    # The comparison is not vacuous: the corner cases are in the tree.
    assert ours["srv/setuid"].mode == 0o4755
    assert ours["srv/xattr"].xattrs == (("user.color", b"blue"), ("user.shape", b"round"))
    assert ours["srv/hard/a"].inode_group == ours["usr/hardlink-b"].inode_group != ""
    assert ours["srv/null"].rdev == (1, 3)
    assert ours["srv/fifo"].kind == "fifo"
    assert ours["srv/link1"].link == "link2"
    assert ours["srv/empty"].size == 0
    assert "opt/gone" not in ours
    assert "opt/dir-gone" not in ours
    assert "var/cache/old" not in ours
    assert "var/cache/new" in ours
    assert ours["etc/replaced"].size == len(b"version 2\n")
    assert ours["srv/sticky"].mode == 0o1777
    assert ours["srv/setgid-dir"].mode == 0o2775


def test_containerds_own_rules_for_parents_links_and_replaced_names(
    containerd: Containerd, registry: Registry, tmp_path: Path
) -> None:
    _theirs, ours = _compare(containerd, registry, corner_layers(), tmp_path, "store-corners")
    keep = ours["keep"]
    assert (keep.mode, keep.uid, keep.gid, keep.xattrs) == (0o700, 5, 6, (("user.k", b"v"),))
    assert "keep/old" in ours
    assert "keep/new" in ours
    assert sorted(n for n in ours if n.startswith("op/")) == ["op/sub", "op/sub/g"]
    assert (ours["op/sub"].mode, ours["op/sub"].uid) == (0o711, 7)
    assert ours["onlyopq"].mtime_ns == (t - 100) * 10**9
    assert "onlyopq/x" not in ours
    h1 = ours["h1"]
    assert (h1.mode, h1.uid, h1.mtime_ns) == (0o600, 9, (t + 15) * 10**9)
    cap = CAP_NET_RAW.encode("utf-8", "surrogateescape")
    assert ours["bin/cap"].xattrs == (("security.capability", cap),)
    assert ours["bin/cap"].mode == 0o4755
    assert ours["bin/cap"].links == 2
    # A link header without the capability: its chown dropped it, its mode applies.
    ping = ours["bin/ping"]
    assert (ping.xattrs, ping.mode, ping.mtime_ns) == ((), 0o755, (t + 1) * 10**9)
    assert (ours["d"].mode, ours["d"].uid) == (0o750, 3)
    assert "d/x" in ours
    assert ours["x"].kind == "file"
    assert ours["x"].mtime_ns == (t + 17) * 10**9
    assert ours["tr"].xattrs == (("user.ok", b"1"),)
    assert ours["b"].size == len(b"first a\n")
    assert ours["a"].size == len(b"second a\n")
    assert ours["dup"].size == len(b"two\n")
    assert "dev/loop0" not in ours
    assert ours["dev/null"].rdev == (1, 3)
