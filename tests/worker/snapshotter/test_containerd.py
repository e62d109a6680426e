"""End to end: a real containerd 1.6 uses our snapshotter as ``proxy_plugins.starlight``.

An OCI image is built here from busybox (host binary) plus a second layer with a whiteout, an
opaque directory and a hard link; it is imported and unpacked through our snapshotter, run
with ``ctr run --snapshotter starlight``, and the container's view of its root filesystem
(listing with types, modes, owners, sizes, link counts, symlink targets, and checksums) must
equal the view of the same image on containerd's own overlayfs snapshotter. Finally removing
the image lets containerd's garbage collector remove our snapshots again.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import stat
import subprocess
import sys
import tarfile
from collections.abc import Iterator
from pathlib import Path

import attrs
import pytest

from benchmarks.services import wait_for
from benchmarks.services.containerd import Containerd

pytestmark = pytest.mark.e2e

IMAGE = "docker.io/starlight/snapshotter-e2e:latest"
BUSYBOX = "/usr/bin/busybox"
APPLETS = ("sh", "find", "stat", "sha256sum", "sort", "cat", "ls", "xargs")
MTIME = 1_700_000_000

# Everything under / except the kernel and runtime mounts (their contents are not the image's).
LISTING = (
    "find / -xdev \\( -path /proc -o -path /sys -o -path /dev -o -path /run \\) -prune"
    " -o -print0 | xargs -0 stat -c '%n|%F|%a|%u|%g|%s|%h|%N' | sort;"
    " echo ===;"
    " find / -xdev \\( -path /proc -o -path /sys -o -path /dev -o -path /run \\) -prune"
    " -o -type f -print0 | xargs -0 sha256sum | sort;"
    " echo ===;"
    " stat -c %i /data/original /data/hardlink"
)


# --- the image -------------------------------------------------------------------------------


class Layer:
    def __init__(self) -> None:
        self.buffer = io.BytesIO()
        self.tar = tarfile.TarFile(fileobj=self.buffer, mode="w", format=tarfile.PAX_FORMAT)

    def _add(self, info: tarfile.TarInfo, data: bytes | None = None) -> None:
        info.mtime = MTIME
        info.uname = info.gname = ""
        self.tar.addfile(info, io.BytesIO(data) if data is not None else None)

    def dir(self, name: str, mode: int = 0o755, uid: int = 0, gid: int = 0) -> None:
        info = tarfile.TarInfo(name)
        info.type, info.mode, info.uid, info.gid = tarfile.DIRTYPE, mode, uid, gid
        self._add(info)

    def file(self, name: str, data: bytes, mode: int = 0o644, uid: int = 0, gid: int = 0) -> None:
        info = tarfile.TarInfo(name)
        info.size, info.mode, info.uid, info.gid = len(data), mode, uid, gid
        self._add(info, data)

    def symlink(self, name: str, target: str) -> None:
        info = tarfile.TarInfo(name)
        info.type, info.linkname, info.mode = tarfile.SYMTYPE, target, 0o777
        self._add(info)

    def hardlink(self, name: str, target: str) -> None:
        info = tarfile.TarInfo(name)
        info.type, info.linkname, info.mode = tarfile.LNKTYPE, target, 0o644
        self._add(info)

    def finish(self) -> bytes:
        self.tar.close()
        return self.buffer.getvalue()


def base_layer() -> bytes:
    layer = Layer()
    for directory in ("bin", "usr", "usr/bin", "etc", "keep", "opaque", "opaque/sub", "data"):
        layer.dir(directory)
    layer.dir("tmp", 0o1777)
    layer.file("usr/bin/busybox", Path(BUSYBOX).read_bytes(), 0o755)
    for applet in APPLETS:
        layer.symlink(f"bin/{applet}", "/usr/bin/busybox")
    layer.file("etc/to-delete", b"goodbye\n")
    layer.file("etc/modified", b"first version\n", 0o600)
    layer.file("keep/file", b"kept\n")
    layer.file("opaque/old-a", b"hidden by the opaque dir\n")
    layer.file("opaque/sub/old-b", b"also hidden\n")
    layer.file("empty", b"")
    layer.dir("home/user", 0o700, uid=1000, gid=1000)  # parent implied, as some tars do
    layer.file("home/user/.profile", b"export X=1\n", 0o640, uid=1000, gid=1000)
    return layer.finish()


def top_layer() -> bytes:
    layer = Layer()
    layer.dir("etc")
    layer.file("etc/.wh.to-delete", b"")
    layer.file("etc/modified", b"second version, longer\n", 0o644)
    layer.dir("opaque", 0o750)
    layer.file("opaque/.wh..wh..opq", b"")
    layer.file("opaque/new", b"only this survives\n")
    layer.dir("data")
    layer.file("data/original", b"shared content\n", 0o640)
    layer.hardlink("data/hardlink", "data/original")
    layer.symlink("data/link", "original")
    return layer.finish()


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def build_oci_archive(path: Path) -> None:
    """An OCI image layout tarball (what ``ctr images import`` reads)."""
    blobs: dict[str, bytes] = {}

    def blob(data: bytes) -> str:
        digest = _digest(data)
        blobs[digest] = data
        return digest

    layers = [base_layer(), top_layer()]
    compressed = [gzip.compress(layer, mtime=0) for layer in layers]
    config = json.dumps(
        {
            "architecture": "amd64",
            "os": "linux",
            "config": {"Env": ["PATH=/bin:/usr/bin"], "Cmd": ["/bin/sh"]},
            "rootfs": {"type": "layers", "diff_ids": [_digest(layer) for layer in layers]},
        }
    ).encode()
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": blob(config),
                "size": len(config),
            },
            "layers": [
                {
                    "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                    "digest": blob(data),
                    "size": len(data),
                }
                for data in compressed
            ],
        }
    ).encode()
    index = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.index.v1+json",
            "manifests": [
                {
                    "mediaType": "application/vnd.oci.image.manifest.v1+json",
                    "digest": blob(manifest),
                    "size": len(manifest),
                    "platform": {"architecture": "amd64", "os": "linux"},
                    "annotations": {
                        "io.containerd.image.name": IMAGE,
                        "org.opencontainers.image.ref.name": "latest",
                    },
                }
            ],
        }
    ).encode()
    with tarfile.open(path, "w") as archive:

        def add(name: str, data: bytes) -> None:
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(data), MTIME
            archive.addfile(info, io.BytesIO(data))

        add("oci-layout", b'{"imageLayoutVersion":"1.0.0"}')
        add("index.json", index)
        for digest, data in blobs.items():
            add("blobs/sha256/" + digest.removeprefix("sha256:"), data)


# --- the stack ---------------------------------------------------------------------------


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
