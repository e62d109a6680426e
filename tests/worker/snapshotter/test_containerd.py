"""End to end: a real containerd 1.6 uses our snapshotter as ``proxy_plugins.starlight``.

An OCI image (``images.py``: busybox plus a second layer with a whiteout, an opaque directory
and a hard link) is imported and unpacked through our snapshotter, run
with ``ctr run --snapshotter starlight``, and the container's view of its root filesystem
(listing with types, modes, owners, sizes, link counts, symlink targets, and checksums) must
equal the view of the same image on containerd's own overlayfs snapshotter. Finally removing
the image lets containerd's garbage collector remove our snapshots again.
"""

from __future__ import annotations

import hashlib
import os
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import attrs
import pytest

from benchmarks.services import wait_for
from benchmarks.services.containerd import Containerd
from tests.worker.snapshotter.images import BUSYBOX, IMAGE, LISTING, build_oci_archive

pytestmark = pytest.mark.e2e


@attrs.frozen
class Stack:
    containerd: Containerd
    snapshotter_root: Path


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    if not os.access(BUSYBOX, os.X_OK):
        pytest.skip(f"{BUSYBOX} missing: apt-get install busybox-static")
    work = tmp_path_factory.mktemp("containerd-e2e")
    socket_path = work / "snapshotter.sock"
    snapshotter_root = work / "snapshotter"
    log = (work / "snapshotter.log").open("wb")
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "starlight_worker.snapshotter",
            "--root",
            str(snapshotter_root),
            "--address",
            str(socket_path),
            "--log-level",
            "INFO",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        wait_for(socket_path.exists, timeout=60, what="the starlight snapshotter")
        with Containerd(work / "containerd", snapshotter_socket=str(socket_path)) as containerd:
            archive = work / "image.tar"
            build_oci_archive(archive)
            containerd.ctr("images", "import", "--snapshotter", "starlight", str(archive))
            yield Stack(containerd, snapshotter_root)
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


def run_listing(containerd: Containerd, snapshotter: str, name: str) -> str:
    result = containerd.ctr(
        "run", "--rm", "--snapshotter", snapshotter, IMAGE, name, "/bin/sh", "-c", LISTING
    )
    return result.stdout


# --- tests ------------------------------------------------------------------------------


def test_container_sees_the_same_root_as_with_overlayfs(stack: Stack) -> None:
    ours = run_listing(stack.containerd, "starlight", "on-starlight").split("===\n")
    stock = run_listing(stack.containerd, "overlayfs", "on-overlayfs").split("===\n")
    # Inode numbers differ between snapshotters; within each run, the hard link shares one.
    assert ours[:2] == stock[:2]
    assert len(set(stock[2].split())) == 1

    listing, checksums, inodes = ours
    entries = {line.split("|")[0]: line.split("|") for line in listing.splitlines()}
    assert "/etc/to-delete" not in entries  # whiteout
    assert entries["/etc/modified"][1:6] == ["regular file", "644", "0", "0", "23"]
    assert [p for p in entries if p.startswith("/opaque/")] == ["/opaque/new"]  # opaque dir
    assert entries["/opaque"][2] == "750"
    assert entries["/data/original"][6] == "2"  # hard link count
    assert entries["/data/hardlink"][6] == "2"
    assert entries["/home/user"][2:5] == ["700", "1000", "1000"]
    assert entries["/tmp"][2] == "1777"
    assert entries["/empty"][5] == "0"
    assert entries["/bin/sh"][7] == "'/bin/sh' -> '/usr/bin/busybox'"
    busybox_sum = hashlib.sha256(Path(BUSYBOX).read_bytes()).hexdigest()
    assert f"{busybox_sum}  /usr/bin/busybox" in checksums
    original, hardlink = inodes.split()
    assert original == hardlink


def test_layers_are_stored_as_overlay_upper_directories(stack: Stack) -> None:
    """containerd unpacked into our overlay mounts: whiteouts became 0/0 character devices
    and the opaque directory carries overlayfs' xattr, as with its own snapshotter."""
    listed = stack.containerd.ctr("snapshots", "--snapshotter", "starlight", "ls").stdout
    committed = [line for line in listed.splitlines()[1:] if "Committed" in line]
    assert len(committed) == 2

    whiteouts, opaque = [], []
    for fs in (stack.snapshotter_root / "snapshots").glob("*/fs"):
        gone = fs / "etc" / "to-delete"
        if gone.exists() or gone.is_symlink():
            st = gone.lstat()
            if stat.S_ISCHR(st.st_mode) and st.st_rdev == 0:
                whiteouts.append(gone)
        if (fs / "opaque").is_dir() and "trusted.overlay.opaque" in os.listxattr(fs / "opaque"):
            assert os.getxattr(fs / "opaque", "trusted.overlay.opaque") == b"y"
            opaque.append(fs)
    assert len(whiteouts) == 1
    assert len(opaque) == 1


def test_removing_the_image_removes_our_snapshots(stack: Stack) -> None:
    ctr = stack.containerd.ctr
    ctr("images", "rm", "--sync", IMAGE)
    listed = ctr("snapshots", "--snapshotter", "starlight", "ls").stdout
    assert listed.splitlines()[1:] == []
    # containerd's GC called Remove (children first) and Cleanup: no directory is left.
    assert list((stack.snapshotter_root / "snapshots").iterdir()) == []
