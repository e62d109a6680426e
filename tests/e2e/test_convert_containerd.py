"""Invariant 1: a converted image pulled and run by stock containerd is the original.

A real docker-registry, a real containerd (its own overlayfs snapshotter) and runc: the
original image and its Starlight conversion produce the same container output and the same
root filesystem, entry by entry (names, types, modes, owners, mtimes, xattrs, links, bytes).
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from benchmarks.fstree import Node, diff_trees, snapshot_tree
from benchmarks.images.build import push_image
from benchmarks.images.fidelity import LISTING_COMMAND, fidelity_layers
from benchmarks.services.containerd import Containerd
from benchmarks.services.registry import Registry
from starlight_cli.main import cli
from starlight_core.reference import Reference
from starlight_core.registry import RegistryClient

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def containerd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Containerd]:
    with Containerd(tmp_path_factory.mktemp("containerd")) as instance:
        yield instance


@pytest.fixture(scope="module")
def images(registry: Registry) -> tuple[Reference, Reference]:
    source = Reference.parse(f"{registry.host}/fidelity-{uuid.uuid4().hex[:8]}:v1")

    async def push() -> None:
        async with RegistryClient(plain_http=True) as client:
            await push_image(client, source, fidelity_layers(), docker=True, cmd=LISTING_COMMAND)

    asyncio.run(push())
    converted = source.with_tag("v1-starlight")
    result = CliRunner().invoke(
        cli, ["convert", "-q", "--plain-http", "--chunk-size", "64KiB", str(source), str(converted)]
    )
    assert result.exit_code == 0, result.stderr
    return source, converted


def _mounted_tree(containerd: Containerd, ref: Reference, where: Path) -> dict[str, Node]:
    where.mkdir()
    containerd.ctr("images", "mount", str(ref), str(where))
    try:
        return snapshot_tree(where)
    finally:
        containerd.ctr("images", "unmount", str(where))


def test_stock_containerd_runs_the_converted_image_identically(
    containerd: Containerd, images: tuple[Reference, Reference], tmp_path: Path
) -> None:
    source, converted = images
    for ref in images:
        containerd.ctr("images", "pull", "--plain-http", str(ref))
    outputs = []
    for ref in images:
        name = f"c-{uuid.uuid4().hex[:8]}"
        result = containerd.ctr("run", "--rm", str(ref), name)
        outputs.append(result.stdout)
    assert outputs[0] == outputs[1]
    listing = outputs[0]
    assert "./srv/setuid regular file 4755" in listing
    assert "./opt/gone" not in listing
    assert "./var/cache/old" not in listing
    assert "./var/cache/new" in listing

    original = _mounted_tree(containerd, source, tmp_path / "original")
    starlight = _mounted_tree(containerd, converted, tmp_path / "converted")
    assert diff_trees(original, starlight) == []
    # The tree really has the corner cases (the comparison is not vacuous).
    assert original["srv/xattr"].xattrs == (("user.color", b"blue"), ("user.shape", b"round"))
    assert original["srv/hard/a"].inode_group == original["usr/hardlink-b"].inode_group != ""
    assert original["srv/null"].rdev == (1, 3)
    assert original["srv/fifo"].kind == "fifo"
    assert original["srv/link1"].link == "link2"
    assert "opt/dir-gone" not in original
    assert original["etc/replaced"].size == len(b"version 2\n")
