"""Copy one file's bytes into another, as cheaply as the filesystem allows.

A reflink (``FICLONE``) shares the blocks until either side changes — free in time and space on
btrfs and XFS; layer files never change, so the sharing lasts. Elsewhere ``copy_file_range``
copies in the kernel (and may itself share blocks), then ``sendfile``, then plain reads and
writes.
"""

from __future__ import annotations

import errno
import fcntl
import os
from typing import Final

__all__ = ["clone_file"]

FICLONE: Final = 0x40049409
"""``_IOW(0x94, 9, int)`` from ``linux/fs.h``."""
_NOT_HERE: Final = frozenset(
    {errno.EOPNOTSUPP, errno.ENOTTY, errno.EXDEV, errno.EINVAL, errno.ENOSYS}
)
"""What a filesystem (or kernel) answers when it cannot do that kind of copy."""
_STEP: Final = 1 << 30


def clone_file(src_fd: int, dst_fd: int, size: int) -> str:
    """Make ``dst_fd`` (empty, open for writing) a copy of the first ``size`` bytes of
    ``src_fd``; returns how (``"reflink"``, ``"copy_file_range"``, ``"sendfile"``, ``"read"``)."""
    try:
        fcntl.ioctl(dst_fd, FICLONE, src_fd)
        if os.fstat(dst_fd).st_size == size:
            return "reflink"
        os.ftruncate(dst_fd, 0)
    except OSError as exc:
        if exc.errno not in _NOT_HERE:
            raise
    for method in (_copy_file_range, _sendfile):
        try:
            method(src_fd, dst_fd, size)
            return method.__name__[1:]
        except OSError as exc:
            if exc.errno not in _NOT_HERE:
                raise
            os.ftruncate(dst_fd, 0)
            os.lseek(dst_fd, 0, os.SEEK_SET)
    _read_write(src_fd, dst_fd, size)
    return "read"


def _copy_file_range(src_fd: int, dst_fd: int, size: int) -> None:
    offset = 0
    while offset < size:
        copied = os.copy_file_range(src_fd, dst_fd, min(_STEP, size - offset), offset, offset)
        if copied == 0:
            raise OSError(errno.EIO, "source ended early")
        offset += copied


def _sendfile(src_fd: int, dst_fd: int, size: int) -> None:
    offset = 0
    os.lseek(dst_fd, 0, os.SEEK_SET)
    while offset < size:
        sent = os.sendfile(dst_fd, src_fd, offset, min(_STEP, size - offset))
        if sent == 0:
            raise OSError(errno.EIO, "source ended early")
        offset += sent


def _read_write(src_fd: int, dst_fd: int, size: int) -> None:
    offset = 0
    while offset < size:
        data = os.pread(src_fd, min(1 << 20, size - offset), offset)
        if not data:
            raise OSError(errno.EIO, "source ended early")
        view = memoryview(data)
        while view:
            written = os.pwrite(dst_fd, view, offset)
            view = view[written:]
            offset += written
