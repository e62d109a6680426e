"""A tiny runnable base layer: the host's static busybox and its applet links."""

from __future__ import annotations

import shutil
from pathlib import Path

from starlight_core.testing import TarMember

__all__ = ["busybox_members"]

_APPLETS = (
    "sh",
    "ls",
    "cat",
    "find",
    "stat",
    "sha256sum",
    "echo",
    "sleep",
    "test",
    "wc",
    "head",
    "sort",
    "xargs",
    "readlink",
    "mkdir",
    "rm",
    "cp",
    "mv",
    "grep",
    "sed",
    "awk",
    "tr",
    "date",
    "env",
    "id",
    "true",
    "false",
    "printf",
    "getfattr",
    "md5sum",
    "tail",
    "uniq",
    "cut",
    "dd",
    "touch",
    "mknod",
    "ln",
    "chmod",
    "wget",
    "nc",
    "hostname",
    "ps",
    "kill",
    "du",
    "tee",
)


def _busybox_path() -> Path:
    for candidate in ("/bin/busybox", "/usr/bin/busybox"):
        if Path(candidate).is_file():
            return Path(candidate)
    found = shutil.which("busybox")
    if found is None:
        raise FileNotFoundError("busybox-static is not installed (apt-get install busybox-static)")
    return Path(found)


def busybox_members(mtime: float = 1_700_000_000) -> list[TarMember]:
    """bin/busybox plus a symlink per applet, and the usual top-level directories."""
    data = _busybox_path().read_bytes()
    members = [
        TarMember(name, kind="dir", mode=0o755, mtime=mtime)
        for name in ("bin", "dev", "etc", "proc", "sys", "tmp", "usr", "usr/bin", "var")
    ]
    members[5] = TarMember("tmp", kind="dir", mode=0o1777, mtime=mtime)
    members.append(TarMember("bin/busybox", data=data, mode=0o755, mtime=mtime))
    members.extend(
        TarMember(f"bin/{applet}", kind="symlink", linkname="busybox", mtime=mtime)
        for applet in _APPLETS
    )
    members.append(TarMember("etc/passwd", data=b"root:x:0:0:root:/root:/bin/sh\n", mtime=mtime))
    members.append(TarMember("etc/group", data=b"root:x:0:\n", mtime=mtime))
    return members
