"""File operations beneath a layer's ``fs/`` directory that never follow a symlink.

A layer's tree holds the image's own symlinks (``lib -> /usr/lib``, ``evil -> /etc``); following
one while creating or filling entries could write outside the layer. Every path is therefore
walked one component at a time from a directory descriptor with ``O_NOFOLLOW | O_DIRECTORY``,
and every change is made with the ``*at`` calls relative to the parent's descriptor. A symlink or
non-directory where a directory must be is ``UnsafePath``. Extended attributes have no ``*at``
call: they go through ``/proc/self/fd/<parent>/<name>``, which resolves the parent by descriptor
and does not follow the last component.

``disk_error`` turns an ``OSError`` into the ``StarlightError`` a caller should see: a full disk
or quota is ``ResourceExhausted``, anything else an internal error naming the path.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections import OrderedDict
from collections.abc import Iterator
from typing import Final

from starlight_core.errors import ResourceExhausted, StarlightError, UnsafePath

__all__ = [
    "DirCache",
    "disk_error",
    "fd_path",
    "open_dir",
    "open_dir_beneath",
    "open_file_beneath",
    "proc_path",
    "split",
]

_DIR_FLAGS: Final = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FULL: Final = (errno.ENOSPC, errno.EDQUOT)


def disk_error(exc: OSError, what: str) -> StarlightError:
    """The error to raise for ``exc`` met while doing ``what``."""
    if exc.errno in _FULL:
        return ResourceExhausted(
            f"{what}: {os.strerror(exc.errno or 0)}",
            hint="free disk space (or inodes) on the store's filesystem, then pull again",
        )
    return StarlightError(f"{what}: {exc}")


def split(name: bytes) -> tuple[bytes, bytes]:
    """``(parent, base)`` of a relative name; the parent of a top-level name is ``b""``."""
    parent, _, base = name.rpartition(b"/")
    return parent, base


def fd_path(fd: int) -> bytes:
    """A path naming what ``fd`` is open on (usable where no ``f*`` call exists)."""
    return b"/proc/self/fd/%d" % fd


def proc_path(dir_fd: int, base: bytes) -> bytes:
    """A path naming ``base`` inside the directory open as ``dir_fd`` (for the xattr calls)."""
    return b"/proc/self/fd/%d/%s" % (dir_fd, base)


def open_dir(path: str | bytes | os.PathLike[str]) -> int:
    """An ``O_PATH`` descriptor of a directory we own (the layer's ``fs/``, the staging dir)."""
    return os.open(path, _DIR_FLAGS)


def open_dir_beneath(root_fd: int, name: bytes) -> int:
    """A new ``O_PATH`` descriptor of directory ``name`` below ``root_fd`` (``b""``: a copy of
    ``root_fd``). ``UnsafePath`` if a component is a symlink or not a directory; a missing
    component raises ``FileNotFoundError``."""
    fd = os.dup(root_fd)
    if not name:
        return fd
    try:
        for part in name.split(b"/"):
            try:
                child = os.open(part, _DIR_FLAGS, dir_fd=fd)
            except OSError as exc:
                if exc.errno in (errno.ENOTDIR, errno.ELOOP):
                    raise UnsafePath(
                        f"{os.fsdecode(name)!r}: {os.fsdecode(part)!r} is a symlink or not a "
                        "directory; refusing to follow it"
                    ) from None
                raise
            os.close(fd)
            fd = child
    except BaseException:
        os.close(fd)
        raise
    return fd


def open_file_beneath(root_fd: int, name: bytes) -> int:
    """A read-only descriptor of regular file ``name`` below ``root_fd``, following no symlink.
    ``FileNotFoundError`` if it is missing or not a regular file."""
    parent, base = split(name)
    dir_fd = open_dir_beneath(root_fd, parent)
    try:
        try:
            fd = os.open(
                base, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dir_fd
            )
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.ENXIO):
                raise FileNotFoundError(errno.ENOENT, "not a regular file", name) from None
            raise
    finally:
        os.close(dir_fd)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise FileNotFoundError(errno.ENOENT, "not a regular file", name)
    return fd


class DirCache:
    """Directory descriptors below one root, kept for a burst of work (building a tree).

    ``get`` returns a descriptor owned by the cache, valid until the next ``get``/``clear``;
    ``hold`` lends a private duplicate for operations that need two directories at once.
    """

    def __init__(self, root_fd: int, capacity: int = 128) -> None:
        self._root_fd = root_fd
        self._capacity = capacity
        self._fds: OrderedDict[bytes, int] = OrderedDict()

    def get(self, name: bytes) -> int:
        if not name:
            return self._root_fd
        fd = self._fds.get(name)
        if fd is not None:
            self._fds.move_to_end(name)
            return fd
        # Iterative (depth is the layer's choice): from the deepest cached ancestor down.
        missing = [name]
        parent = split(name)[0]
        while parent and parent not in self._fds:
            missing.append(parent)
            parent = split(parent)[0]
        fd = self._fds[parent] if parent else self._root_fd
        for path in reversed(missing):
            try:
                child = os.open(split(path)[1], _DIR_FLAGS, dir_fd=fd)
            except OSError as exc:
                if exc.errno in (errno.ENOTDIR, errno.ELOOP):
                    raise UnsafePath(
                        f"{os.fsdecode(path)!r} is a symlink or not a directory; "
                        "refusing to follow it"
                    ) from None
                raise
            self._fds[path] = fd = child
        while len(self._fds) > self._capacity:
            oldest = next(iter(self._fds))
            if oldest == name:
                break
            os.close(self._fds.pop(oldest))
        return fd

    @contextlib.contextmanager
    def hold(self, name: bytes) -> Iterator[int]:
        fd = os.dup(self.get(name))
        try:
            yield fd
        finally:
            os.close(fd)

    def forget(self, name: bytes) -> None:
        """Drop ``name`` and everything below it (it was removed or replaced)."""
        prefix = name + b"/"
        for key in [k for k in self._fds if k == name or k.startswith(prefix)]:
            os.close(self._fds.pop(key))

    def clear(self) -> None:
        while self._fds:
            _, fd = self._fds.popitem()
            os.close(fd)

    def __enter__(self) -> DirCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.clear()
