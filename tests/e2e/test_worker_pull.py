"""Pulling through starlight, end to end: start before arrival, updates, fidelity, bad input.

Real registry, real proxy, real containerd with the starlight proxy plugin, runc. The bundle
stream passes through a fault-injecting forwarder (``stack.link``) so tests can throttle it.
"""

from __future__ import annotations

import difflib
import json
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from benchmarks.fstree import snapshot_tree
from benchmarks.images.busybox import busybox_members
from benchmarks.images.fidelity import LISTING_COMMAND, fidelity_layers
from benchmarks.services.faulty import Fault
from benchmarks.stack import Stack
from starlight_core.reference import Reference
from starlight_core.testing import TarMember, build_tar
from tests.e2e.conftest import Publish

pytestmark = pytest.mark.e2e

T = 1_700_000_000


def _is_delta(method: str, path: str) -> bool:
    return path == "/starlight/delta"


def _images(stack: Stack) -> dict[str, dict[str, Any]]:
    """``ctr-starlight images --json`` by reference."""
    code, out, err = stack.cli("images", "--json")
    assert code == 0, err
    return {row["reference"]: row for row in json.loads(out)}


def _diff(expected: str, actual: str) -> list[str]:
    return [
        line
        for line in difflib.unified_diff(expected.splitlines(), actual.splitlines(), lineterm="")
        if line[:1] in "+-" and line[:3] not in ("+++", "---")
    ]


# --- start before arrival ------------------------------------------------------------------


def test_container_starts_before_the_bundle_completes(stack: Stack, publish: Publish) -> None:
    # A big, incompressible file in the top layer travels last (layer order): the container
    # only needs busybox and a small file from the base layer.
    big = random.Random(7).randbytes(6 << 20)
    layers = [
        build_tar([*busybox_members(), TarMember("etc/hello", data=b"hello from the base\n")]),
        build_tar([TarMember("data", kind="dir"), TarMember("data/big.bin", data=big)]),
    ]
    _, converted = publish(layers, name="early", cmd=["/bin/sh", "-c", "cat /etc/hello"])
    throttle = stack.link.add(Fault(match=_is_delta, times=1, rate=500_000))
    try:
        stack.pull(converted)  # returns when READY: snapshots exist, contents still streaming
        output = stack.run(converted)
        assert output == "hello from the base\n"
        row = _images(stack)[str(converted)]
        # The container has run and exited while the image is still being received.
        assert not row.get("complete"), row
        assert int(row.get("bytes_local", 0)) < int(row["bytes_total"])
    finally:
        stack.link.clear()
    assert throttle.hits == 1
    stack.pull(converted, "--wait")  # joins the pull under way
    assert _images(stack)[str(converted)]["complete"] is True


# --- updates -------------------------------------------------------------------------------


def _app_layer(version: str) -> bytes:
    rng = random.Random(11)
    files = [TarMember("app", kind="dir", mtime=T)]
    for i in range(40):
        files.append(TarMember(f"app/lib{i}.so", data=rng.randbytes(40_000), mtime=T))
    files.append(TarMember("app/VERSION", data=version.encode() + b"\n", mtime=T))
    return build_tar(files)


def test_update_transfers_only_the_changed_contents(stack: Stack, publish: Publish) -> None:
    base = build_tar(busybox_members())
    listing = ["/bin/sh", "-c", "cat /app/VERSION; sha256sum /app/lib7.so"]
    source1, v1 = publish([base, _app_layer("1.0")], name="update", tag="v1", cmd=listing)
    source2, v2 = publish([base, _app_layer("2.0")], name="update", tag="v2", cmd=listing)
    out1 = stack.pull(v1, "--wait")
    out2 = stack.pull(v2, "--wait")
    received1 = int(out1.split("(")[1].split()[0])
    received2 = int(out2.split("(")[1].split()[0])
    # v1 carried its application's 1.6 MB (busybox may be held already from another image);
    # v2 only its new VERSION file and the headers.
    assert received1 > 1_600_000
    assert received2 < 60_000, out2
    assert "copied locally" in out2
    for source, converted in ((source1, v1), (source2, v2)):
        stack.containerd.ctr("images", "pull", "--plain-http", str(source))
        assert stack.run(converted) == stack.run(source, snapshotter="overlayfs")
    assert stack.run(v2).startswith("2.0\n")


# --- fidelity corner cases, each through a real container -----------------------------------


@pytest.fixture(scope="module")
def listings(stack: Stack, publish: Publish) -> tuple[str, str, Reference]:
    source, converted = publish(
        fidelity_layers(), name="corners", cmd=LISTING_COMMAND, chunk_size="64KiB"
    )
    stack.containerd.ctr("images", "pull", "--plain-http", str(source))
    stock = stack.run(source, snapshotter="overlayfs")
    # Throttled: the container lists and checksums its root filesystem through FUSE while the
    # contents are still arriving.
    stack.link.add(Fault(match=_is_delta, times=1, rate=300_000))
    try:
        stack.pull(converted)
        through = stack.run(converted)
    finally:
        stack.link.clear()
    return stock, through, converted


def _lines(listing: str, path: str) -> list[str]:
    return [
        line
        for line in listing.splitlines()
        if line.startswith(path + " ") or line.endswith("  " + path)
    ]


CASES = {
    "whiteout of a file": ("./opt/gone", None),
    "whiteout of a directory": ("./opt/dir-gone", None),
    "opaque directory hides lower contents": ("./var/cache/old", None),
    "opaque directory keeps its own": ("./var/cache/new", "regular file 644 0 0 10"),
    "hard link across directories": ("./usr/hardlink-b", "regular file 644 0 0 13"),
    "empty file": ("./srv/empty", "regular empty file 644 0 0 0"),
    "symlink chain": ("./srv/link1", "symbolic link 777 0 0 5"),
    "setuid binary": ("./srv/setuid", "regular file 4755"),
    "setgid directory": ("./srv/setgid-dir", "directory 2775 0 100"),
    "sticky directory": ("./srv/sticky", "directory 1777"),
    "owned by another user": ("./srv/owned", "regular file 644 1000 1000"),
    "device node": ("./srv/null", "character special file 666 0 0 0"),
    "fifo": ("./srv/fifo", "fifo 644"),
    "file replaced in a later layer": ("./etc/replaced", "regular file 644 0 0 10"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_corner_case(listings: tuple[str, str, Reference], case: str) -> None:
    stock, through, _ = listings
    path, expected = CASES[case]
    assert _lines(through, path) == _lines(stock, path)
    if expected is None:
        assert _lines(stock, path) == []
    else:
        assert expected in _lines(stock, path)[0]


def test_hard_links_share_a_link_count(listings: tuple[str, str, Reference]) -> None:
    stock, through, _ = listings
    for listing in (stock, through):
        a = _lines(listing, "./srv/hard/a")[0].split()
        b = _lines(listing, "./usr/hardlink-b")[0].split()
        assert a[-2] == b[-2] == "2"  # %h: two names, one inode


def test_symlink_chain_resolves(stack: Stack, listings: tuple[str, str, Reference]) -> None:
    _, _, converted = listings
    out = stack.run(converted, "/bin/sh", "-c", "sha256sum < /srv/link1")
    assert out.split()[0] == _lines(listings[0], "./srv/data/big")[1].split()[0]


def test_whole_listing_equal(listings: tuple[str, str, Reference]) -> None:
    stock, through, _ = listings
    assert _diff(stock, through) == []


def test_xattrs_and_inodes_in_the_mounted_rootfs(
    stack: Stack, listings: tuple[str, str, Reference], tmp_path: Path
) -> None:
    """What containerd mounts for a container (our snapshotter's mounts), read on the host."""
    _, _, converted = listings
    target = tmp_path / "root"
    target.mkdir()
    stack.containerd.ctr(
        "images", "mount", "--snapshotter", "starlight", str(converted), str(target)
    )
    try:
        tree = snapshot_tree(target)
    finally:
        stack.containerd.ctr("images", "unmount", str(target))
    assert tree["srv/xattr"].xattrs == (("user.color", b"blue"), ("user.shape", b"round"))
    assert tree["srv/hard/a"].inode_group == tree["usr/hardlink-b"].inode_group != ""
    assert tree["srv/null"].rdev == (1, 3)
    assert "opt/gone" not in tree


# --- bad input -----------------------------------------------------------------------------


def _one_line(err: str, *needles: str) -> None:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("ctr-starlight: error: "), lines[0]
    for needle in needles:
        assert needle in lines[0], lines[0]


def _containerd_state(stack: Stack) -> tuple[str, str]:
    images = stack.containerd.ctr("images", "ls", "-q").stdout
    snapshots = stack.containerd.ctr("snapshots", "--snapshotter", "starlight", "ls").stdout
    return images, snapshots


def test_pull_of_an_unknown_image(stack: Stack) -> None:
    before = _containerd_state(stack)
    ref = f"{stack.registry.host}/never-notified:v1"
    code, _, err = stack.cli("pull", "-q", "-n", stack.containerd.namespace, ref)
    assert code == 1
    _one_line(err, "never-notified")
    assert _containerd_state(stack) == before


def test_pull_of_a_malformed_reference(stack: Stack) -> None:
    code, _, err = stack.cli("pull", "Not A Reference")
    assert code == 2
    assert "invalid image reference" in err


def test_pull_with_the_proxy_unreachable(stack: Stack, publish: Publish) -> None:
    _, converted = publish([build_tar(busybox_members())], name="unreachable")
    before = _containerd_state(stack)
    stack.link.add(Fault(match=_is_delta, times=1000, status=503))
    try:
        code, _, err = stack.cli("pull", "-q", "-n", stack.containerd.namespace, str(converted))
    finally:
        stack.link.clear()
    assert code == 3, err
    _one_line(err, "503")
    assert _containerd_state(stack) == before


def test_pull_with_the_daemon_not_running(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from starlight_cli.main import cli

    socket = str(tmp_path / "nothing.sock")
    result = CliRunner().invoke(cli, ["pull", "--socket", socket, "redis"])
    assert result.exit_code == 3
    _one_line(result.stderr, "not running", "starlight-daemon")


def test_daemon_refuses_a_second_instance(stack: Stack) -> None:
    """The store is locked: a second daemon on the same root fails clearly instead of
    corrupting it."""
    result = subprocess.run(
        [
            str(Path(sys.executable).with_name("starlight-daemon")),
            "--root",
            str(stack.daemon.root),
            "--run-dir",
            str(stack.daemon.run_dir) + "-2",
            "--proxy",
            stack.proxy.url,
            "--containerd-address",
            stack.containerd.address,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode != 0
    assert "lock" in (result.stderr + result.stdout).lower()
