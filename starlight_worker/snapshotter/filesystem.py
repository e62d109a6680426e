"""The snapshotter's directories: ``<root>/snapshots/<id>/{fs,work}``, their usage and removal.

Laid out as containerd's overlay snapshotter does: ``fs`` is the snapshot's own layer (the
overlay upper directory while active, a lower directory once committed), ``work`` is overlayfs'
scratch directory (active snapshots only). A new snapshot's directory is built under a
temporary ``new-*`` name and renamed to its id only once it is complete, so a crash never
leaves a half-made snapshot under a real id; ``orphans`` finds what no stored snapshot owns
(removed snapshots, interrupted creations) for Cleanup.

Everything here blocks; the snapshotter calls it from worker threads.
"""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
from collections.abc import Iterable

from starlight_worker.snapshotter.model import Kind, Usage

__all__ = ["SnapshotDirectories", "disk_usage"]

# st_blocks counts 512-byte units whatever the filesystem's block size.
_BLOCK_UNIT = 512


class SnapshotDirectories:
    def __init__(self, root: str) -> None:
        self.root = os.path.abspath(root)
        self.snapshots = os.path.join(self.root, "snapshots")
        os.makedirs(self.root, mode=0o700, exist_ok=True)
        os.makedirs(self.snapshots, mode=0o700, exist_ok=True)

    def path(self, snapshot_id: int) -> str:
        return os.path.join(self.snapshots, str(snapshot_id))

    def fs(self, snapshot_id: int) -> str:
        return os.path.join(self.snapshots, str(snapshot_id), "fs")

    def work(self, snapshot_id: int) -> str:
        return os.path.join(self.snapshots, str(snapshot_id), "work")

    def make_temporary(self, kind: Kind) -> str:
        """A ``new-*`` directory holding ``fs`` (0755: the container's root directory mode)
        and, for active snapshots, overlayfs' ``work`` (0711, as containerd)."""
        temp = tempfile.mkdtemp(prefix="new-", dir=self.snapshots)
        try:
            os.mkdir(os.path.join(temp, "fs"))
            os.chmod(os.path.join(temp, "fs"), 0o755)  # mkdir's mode is filtered by the umask
            if kind is Kind.ACTIVE:
                os.mkdir(os.path.join(temp, "work"))
                os.chmod(os.path.join(temp, "work"), 0o711)
        except BaseException:
            shutil.rmtree(temp, ignore_errors=True)
            raise
        return temp

    def install(self, temporary: str, snapshot_id: int) -> str:
        """Give a finished temporary directory its snapshot id."""
        final = self.path(snapshot_id)
        os.rename(temporary, final)
        return final

    def orphans(self, live_ids: Iterable[int]) -> list[str]:
        """Directories under ``snapshots/`` that belong to no stored snapshot."""
        live = {str(i) for i in live_ids}
        return sorted(
            os.path.join(self.snapshots, name)
            for name in os.listdir(self.snapshots)
            if name not in live
        )

    @staticmethod
    def remove(paths: Iterable[str]) -> None:
        for path in paths:
            shutil.rmtree(path, ignore_errors=True)

    @staticmethod
    def chown_like(path: str, reference: str) -> None:
        """Give ``path`` the owner of ``reference`` (the parent's top directory), so that the
        container's root directory keeps the image's owner (user-namespaced images)."""
        st = os.stat(reference)
        os.lchown(path, st.st_uid, st.st_gid)


def disk_usage(root: str) -> Usage:
    """Allocated bytes and inodes under ``root`` (itself included), hard links counted once;
    as containerd's ``fs.DiskUsage``."""
    seen: set[tuple[int, int]] = set()
    size = 0
    pending = [root]
    first = True
    while pending:
        path = pending.pop()
        st = os.lstat(path)
        if first and not stat.S_ISDIR(st.st_mode):
            raise NotADirectoryError(path)
        first = False
        inode = (st.st_dev, st.st_ino)
        if inode not in seen:
            seen.add(inode)
            size += st.st_blocks * _BLOCK_UNIT
        if stat.S_ISDIR(st.st_mode):
            with os.scandir(path) as entries:
                pending.extend(entry.path for entry in entries)
    return Usage(size=size, inodes=len(seen))
