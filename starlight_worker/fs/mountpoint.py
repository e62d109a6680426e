"""Mountpoint housekeeping that needs no libfuse: dead mounts and unmounting."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
from pathlib import Path

__all__ = ["is_dead_mount", "unmount"]


def is_dead_mount(path: str | os.PathLike[str]) -> bool:
    """A FUSE mount whose server is gone ("Transport endpoint is not connected")."""
    try:
        os.stat(path)
    except OSError as exc:
        return exc.errno == errno.ENOTCONN
    return False


def unmount(path: str | os.PathLike[str], *, lazy: bool = False) -> str | None:
    """Unmount a FUSE mount; ``None`` on success, else why not (busy, not mounted…).

    Without ``lazy`` a mount still in use (an overlay over it, an open file) stays mounted.
    """
    target = str(Path(path))
    attempts: list[list[str]] = []
    if shutil.which("fusermount"):
        attempts.append(["fusermount", "-u", *(["-z"] if lazy else []), target])
    attempts.append(["umount", *(["-l"] if lazy else []), target])
    reasons = []
    for argv in attempts:
        done = subprocess.run(argv, capture_output=True, text=True, check=False)
        if done.returncode == 0:
            return None
        reasons.append(done.stderr.strip() or f"{argv[0]} exited {done.returncode}")
    return "; ".join(reasons)
