"""The test image for the containerd end-to-end tests, built without any tool: busybox (the
host's static binary, with applet symlinks) in a first layer, and a second layer with a
whiteout, an opaque directory, a hard link and a symlink; written as an OCI image layout
tarball (what ``ctr images import`` reads). Also the shell command that lists a container's
root filesystem."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import tarfile
from pathlib import Path

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


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def compressed_layers() -> list[bytes]:
    """The layer blobs as stored in the image (gzip, deterministic)."""
    return [gzip.compress(layer, mtime=0) for layer in (base_layer(), top_layer())]


def build_oci_archive(path: Path) -> None:
    """An OCI image layout tarball (what ``ctr images import`` reads)."""
    blobs: dict[str, bytes] = {}

    def blob(data: bytes) -> str:
        digest = digest_of(data)
        blobs[digest] = data
        return digest

    layers = [base_layer(), top_layer()]
    compressed = compressed_layers()
    config = json.dumps(
        {
            "architecture": "amd64",
            "os": "linux",
            "config": {"Env": ["PATH=/bin:/usr/bin"], "Cmd": ["/bin/sh"]},
            "rootfs": {"type": "layers", "diff_ids": [digest_of(layer) for layer in layers]},
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


def chain_ids() -> list[str]:
    """The chain IDs of the image's layers (what containerd names its snapshots after)."""
    ids: list[str] = []
    for layer in (base_layer(), top_layer()):
        diff_id = digest_of(layer)
        ids.append(diff_id if not ids else digest_of(f"{ids[-1]} {diff_id}".encode()))
    return ids
