"""``ctr-starlight reset`` removes what starlight created and nothing else of containerd's."""

from __future__ import annotations

import json

import pytest

from benchmarks.images.busybox import busybox_members
from benchmarks.services.faulty import Fault
from benchmarks.stack import Stack
from starlight_core.testing import TarMember, build_tar
from tests.e2e.conftest import Publish

pytestmark = pytest.mark.e2e


def test_reset_removes_only_what_starlight_created(stack: Stack, publish: Publish) -> None:
    layers = [build_tar([*busybox_members(), TarMember("etc/x", data=b"x\n")])]
    source, converted = publish(layers, name="reset", cmd=["/bin/sleep", "600"])
    ctr = stack.containerd.ctr
    # Stock containerd's own image and container (overlayfs): must survive.
    ctr("images", "pull", "--plain-http", str(source))
    ctr("run", "-d", "--snapshotter", "overlayfs", str(source), "stock-one")
    # Starlight's: an image and a running container whose layers are still on FUSE.
    stack.link.add(Fault(match=lambda m, p: p == "/starlight/delta", times=1, rate=100_000))
    try:
        stack.pull(converted)
        ctr("run", "-d", "--snapshotter", "starlight", str(converted), "starlight-one")
    finally:
        stack.link.clear()

    code, out, err = stack.cli("reset", "--dry-run")
    assert code == 0, err
    assert "would remove container" in out
    assert "starlight-one" in out
    assert "stock-one" not in out
    assert "starlight-one" in ctr("containers", "ls", "-q").stdout  # dry run removed nothing

    code, out, err = stack.cli("reset")
    assert code == 0, err
    assert f"removed image {stack.containerd.namespace}/{converted}" in out

    containers = ctr("containers", "ls", "-q").stdout.split()
    assert "starlight-one" not in containers
    assert "stock-one" in containers
    images = ctr("images", "ls", "-q").stdout.split()
    assert str(converted) not in images
    assert str(source) in images
    assert ctr("snapshots", "--snapshotter", "starlight", "ls").stdout.strip().count("\n") == 0
    assert ctr("snapshots", "--snapshotter", "overlayfs", "ls").stdout.count("\n") >= 2
    code, out, _ = stack.cli("images", "--json")
    assert json.loads(out) == []
    assert not any(stack.daemon.fuse_mountpoint.iterdir())
    # The stock container still runs; starlight can pull again from scratch.
    assert "RUNNING" in ctr("tasks", "ls").stdout
    ctr("tasks", "kill", "-s", "9", "stock-one")
    stack.pull(converted, "--wait")
    assert stack.run(converted, "/bin/cat", "/etc/x") == "x\n"
