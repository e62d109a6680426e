"""containerd's snapshotter testsuite, the parts that mount: the mounts we hand out are
performed for real (bind and overlayfs, as root) and the trees seen through them are compared
with a plain directory that had the same changes applied (containerd's ``checkSnapshots``)."""

from __future__ import annotations

import errno
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.worker.snapshotter.support import Client, mounted, tree

pytestmark = [pytest.mark.anyio, pytest.mark.e2e]

Applier = Callable[[Path], None]


def write(rel: str, data: bytes, mode: int) -> Applier:
    def apply(root: Path) -> None:
        path = root / rel
        path.write_bytes(data)
        os.chmod(path, mode)

    return apply


def mkdir(rel: str, mode: int) -> Applier:
    def apply(root: Path) -> None:
        path = root / rel
        path.mkdir()
        os.chmod(path, mode)

    return apply


def remove_all(rel: str) -> Applier:
    def apply(root: Path) -> None:
        path = root / rel
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()

    return apply


def link(src: str, dst: str) -> Applier:
    return lambda root: os.link(root / src, root / dst)


def symlink(target: str, rel: str) -> Applier:
    return lambda root: os.symlink(target, root / rel)


def chown(rel: str, uid: int, gid: int) -> Applier:
    return lambda root: os.lchown(root / rel, uid, gid)


def chmod(rel: str, mode: int) -> Applier:
    return lambda root: os.chmod(root / rel, mode)


def apply_all(*steps: Applier) -> Applier:
    def apply(root: Path) -> None:
        for step in steps:
            step(root)

    return apply


async def check_snapshots(client: Client, work: Path, *layers: Applier) -> None:
    """containerd's checkSnapshots: each layer is prepared on the previous one, must equal the
    flat directory before and after the change, and is committed; a final view equals it too."""
    flat = work / "flat"
    flat.mkdir(parents=True)
    os.chmod(flat, 0o755)
    parent = ""
    for i, layer in enumerate(layers):
        key, name = f"prepare-{i}", f"committed-{i}"
        mounts = await client.prepare(key, parent)
        with mounted(mounts, work / key) as target:
            assert tree(target) == tree(flat), f"layer {i} before applying"
            layer(flat)
            layer(target)
            assert tree(target) == tree(flat), f"layer {i} after applying"
        await client.commit(name, key)
        parent = name
    with mounted(await client.view("final", parent), work / "final") as target:
        assert tree(target) == tree(flat)


async def test_basic_contents(client: Client, tmp_path: Path) -> None:
    initial = apply_all(
        write("foo", b"foo\n", 0o777),
        mkdir("a", 0o755),
        mkdir("a/b", 0o755),
        mkdir("a/b/c", 0o755),
    )
    diff = apply_all(
        write("bar", b"bar\n", 0o777),
        write("foo", b"bar\n", 0o777),
        remove_all("a/b"),
    )
    expected_initial, expected_both = tmp_path / "e1", tmp_path / "e2"
    for directory in (expected_initial, expected_both):
        directory.mkdir()
        os.chmod(directory, 0o755)
    initial(expected_initial)
    initial(expected_both)
    diff(expected_both)

    with mounted(await client.prepare("preparing"), tmp_path / "preparing") as target:
        initial(target)
    await client.commit("committed", "preparing")
    with mounted(await client.prepare("next", "committed"), tmp_path / "next") as target:
        assert tree(target) == tree(expected_initial)
        diff(target)
    await client.commit("committed-next", "next")
    with mounted(await client.view("nextnext", "committed-next"), tmp_path / "nn") as target:
        assert tree(target) == tree(expected_both)
    await client.remove("nextnext")
    await client.remove("committed-next")
    await client.remove("committed")


# containerd's layered scenarios: each is a list of layers, each layer a change to apply.
SCENARIOS: dict[str, list[Applier]] = {
    "deleted files in child snapshot": [
        apply_all(write("foo", b"foo\n", 0o777), write("foobar", b"foobar\n", 0o777)),
        remove_all("foobar"),
        apply_all(),
    ],
    "move file from lower layer": [
        apply_all(
            mkdir("dir1", 0o700),
            write("dir1/f1", b"Hello", 0o644),
            mkdir("dir2", 0o700),
            write("dir2/f2", b"...", 0o644),
        ),
        apply_all(
            mkdir("dir3", 0o700),
            write("dir3/f1", b"Hello", 0o644),
            remove_all("dir1"),
            link("dir2/f2", "dir3/f2"),
            remove_all("dir2/f2"),
        ),
    ],
    "layer file update": [
        apply_all(
            mkdir("etc", 0o755),
            write("etc/hosts", b"mydomain 10.0.0.1", 0o644),
            write("etc/profile", b"PATH=/usr/bin", 0o644),
            symlink("profile", "etc/profile.link"),
        ),
        apply_all(
            write("etc/hosts", b"mydomain 10.0.0.2", 0o644),
            chmod("etc/profile", 0o600),
            remove_all("etc/profile.link"),
            symlink("hosts", "etc/profile.link"),
        ),
        apply_all(write("etc/hosts", b"mydomain 10.0.0.3", 0o600)),
    ],
    "remove directory in lower layer": [
        apply_all(
            mkdir("lib", 0o700),
            write("lib/hidden", b"", 0o644),
            mkdir("lib/sub", 0o755),
            write("lib/sub/deep", b"x", 0o644),
        ),
        apply_all(remove_all("lib"), mkdir("lib", 0o755), write("lib/new", b"y", 0o644)),
        apply_all(remove_all("lib/new")),
    ],
    "chown and permissions": [
        apply_all(
            mkdir("opt", 0o711),
            write("opt/a", b"a", 0o640),
            mkdir("home", 0o755),
            mkdir("home/user", 0o700),
        ),
        apply_all(
            chown("opt", 1, 2),
            chown("opt/a", 3, 4),
            chown("home/user", 1000, 1000),
            chmod("home/user", 0o750),
        ),
    ],
}


@pytest.mark.parametrize("scenario", SCENARIOS)
async def test_layered_changes(client: Client, tmp_path: Path, scenario: str) -> None:
    await check_snapshots(client, tmp_path, *SCENARIOS[scenario])


async def test_many_layers_top_layer_wins(client: Client, tmp_path: Path) -> None:
    """Each layer overwrites one file and replaces one directory: the merged view must show
    the TOP layer's version (overlayfs takes the first lowerdir as the highest)."""
    layers = [
        apply_all(
            write("bottom", b"way at the bottom\n", 0o777),
            write("overwriteme", b"FIRST!\n", 0o777),
            mkdir("ADDHERE", 0o755),
            mkdir("ONLYME", 0o755),
            write("ONLYME/bottom", b"bye!\n", 0o777),
        )
    ]
    for i in range(1, 12):
        layers.append(
            apply_all(
                write("overwriteme", f"{i} WAS HERE!\n".encode(), 0o777),
                write(f"ADDHERE/file-{i}", b"same\n", 0o755),
                remove_all("ONLYME"),
                mkdir("ONLYME", 0o755),
                write(f"ONLYME/file-{i}", b"only me!\n", 0o777),
            )
        )
    await check_snapshots(client, tmp_path, *layers)
    with mounted(await client.view("check", "committed-11"), tmp_path / "check") as target:
        assert (target / "overwriteme").read_bytes() == b"11 WAS HERE!\n"
        assert sorted(os.listdir(target / "ONLYME")) == ["file-11"]


def assert_read_only(target: Path) -> None:
    with pytest.raises(OSError) as caught:
        (target / "testfile").write_text("testcontent")
    assert caught.value.errno == errno.EROFS


async def test_view_is_read_only(client: Client, tmp_path: Path) -> None:
    await client.prepare("preparing")
    await client.commit("committed", "preparing")
    await client.prepare("p2", "committed")
    await client.commit("c2", "p2")
    # No parent and one parent: read-only binds; two: a lower-only (read-only) overlay.
    for key, parent in (("view-0", ""), ("view-1", "committed"), ("view-2", "c2")):
        with mounted(await client.view(key, parent), tmp_path / key) as target:
            assert_read_only(target)


async def test_usage_counts_the_upper_layer_only(client: Client, tmp_path: Path) -> None:
    with mounted(await client.prepare("base"), tmp_path / "base") as target:
        (target / "lower-file").write_bytes(b"l" * 200_000)
    await client.commit("c", "base")
    with mounted(await client.prepare("top", "c"), tmp_path / "top") as target:
        (target / "upper-file").write_bytes(b"u" * 10_000)
    usage = await client.usage("top")
    assert usage.inodes == 2  # the upper root and upper-file
    assert 10_000 <= usage.size < 200_000
