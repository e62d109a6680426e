"""An image that exercises every corner of the layer format and of overlayfs semantics."""

from __future__ import annotations

from benchmarks.images.busybox import busybox_members
from starlight_core.testing import TarMember, build_tar

__all__ = ["LISTING_COMMAND", "fidelity_layers"]

# What the container prints about its own root filesystem: type, mode, owner, size, mtime,
# link count and checksum of everything outside the kernel's pseudo filesystems.
LISTING_COMMAND = [
    "/bin/sh",
    "-c",
    "cd / && find . -mindepth 1 -xdev "
    "\\( -path ./proc -o -path ./sys -o -path ./dev -o -path ./run \\) -prune -o -print "
    "| sort | while read -r f; do "
    "stat -c '%n %F %a %u %g %s %Y %h %t:%T' \"$f\"; "
    'if [ -f "$f" ] && [ ! -L "$f" ]; then sha256sum "$f"; fi; '
    'if [ -L "$f" ]; then readlink "$f"; fi; done',
]


def fidelity_layers() -> list[bytes]:
    """Base (busybox) + three layers: whiteouts, opaque dirs, hard links, xattrs, devices…"""
    t = 1_700_000_000
    base = busybox_members(mtime=t)
    base += [
        TarMember("opt", kind="dir", mtime=t),
        TarMember("opt/keep", data=b"keep me\n", mtime=t),
        TarMember("opt/gone", data=b"deleted later\n", mtime=t),
        TarMember("opt/dir-gone", kind="dir", mtime=t),
        TarMember("opt/dir-gone/inner", data=b"inner\n", mtime=t),
        TarMember("var/cache", kind="dir", mtime=t),
        TarMember("var/cache/old", data=b"old cache\n", mtime=t),
        TarMember("etc/replaced", data=b"version 1\n", mtime=t),
    ]
    app = [
        TarMember("usr", kind="dir", mtime=t + 10),
        TarMember("srv", kind="dir", mtime=t + 10),
        TarMember("srv/data", kind="dir", mtime=t + 10),
        TarMember("srv/data/big", data=bytes(range(256)) * 20_000, mtime=t + 10.5),
        TarMember("srv/empty", data=b"", mtime=t + 10),
        TarMember("srv/setuid", data=b"#!/bin/sh\necho suid\n", mode=0o4755, mtime=t + 10),
        TarMember("srv/setgid-dir", kind="dir", mode=0o2775, gid=100, mtime=t + 10),
        TarMember("srv/sticky", kind="dir", mode=0o1777, mtime=t + 10),
        TarMember(
            "srv/owned", data=b"owned\n", uid=1000, gid=1000, uname="app", gname="app", mtime=t + 10
        ),
        TarMember(
            "srv/xattr",
            data=b"has xattrs\n",
            xattrs={"user.color": "blue", "user.shape": "round"},
            mtime=t + 10,
        ),
        TarMember("srv/link1", kind="symlink", linkname="link2", mtime=t + 10),
        TarMember("srv/link2", kind="symlink", linkname="/srv/data/big", mtime=t + 10),
        TarMember("srv/hard", kind="dir", mtime=t + 10),
        TarMember("srv/hard/a", data=b"shared inode\n", mtime=t + 10),
        TarMember("usr/hardlink-b", kind="hardlink", linkname="srv/hard/a", mtime=t + 10),
        TarMember("srv/null", kind="char", devmajor=1, devminor=3, mode=0o666, mtime=t + 10),
        TarMember("srv/fifo", kind="fifo", mode=0o644, mtime=t + 10),
        TarMember("srv/" + "long-name-" * 12, data=b"long\n", mtime=t + 10),
    ]
    # As docker does, a layer that changes a directory carries that directory's entry: its
    # mtime is then restored after the whiteouts in it are applied.
    update = [
        TarMember("opt", kind="dir", mtime=t + 20),
        TarMember("var", kind="dir", mtime=t + 20),
        TarMember("var/cache", kind="dir", mtime=t + 20),
        TarMember("etc", kind="dir", mtime=t + 20),
        TarMember("opt/gone", kind="whiteout", mtime=t + 20),
        TarMember("opt/dir-gone", kind="whiteout", mtime=t + 20),
        TarMember("var/cache", kind="opaque", mtime=t + 20),
        TarMember("var/cache/new", data=b"new cache\n", mtime=t + 20),
        TarMember("etc/replaced", data=b"version 2\n", mtime=t + 20),
    ]
    top = [
        TarMember("etc", kind="dir", mtime=t + 30),
        TarMember("etc/app.conf", data=b"answer=42\n", mtime=t + 30),
    ]
    return [build_tar(layer) for layer in (base, app, update, top)]
