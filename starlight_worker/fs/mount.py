"""Mounting ``LayerFilesystem`` through fusepy (libfuse 2), and the kernel cache controls.

The only module of the package that loads libfuse.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import logging
import os
from typing import Final

import fuse

from starlight_worker.fs.filesystem import LayerFilesystem

__all__ = ["MOUNT_OPTIONS", "KernelNotifier", "serve"]

log = logging.getLogger(__name__)

_DAY: Final = 86400
MOUNT_OPTIONS: Final[dict[str, bool | int | str]] = {
    "foreground": True,
    "ro": True,
    "allow_other": True,
    "default_permissions": True,
    "use_ino": True,
    # Image contents never change: cache pages across opens, attributes and lookups for long.
    # Attach and detach change the root only, and invalidate what they change.
    "kernel_cache": True,
    "entry_timeout": _DAY,
    "attr_timeout": _DAY,
    "negative_timeout": _DAY,
    "max_read": 1024 * 1024,
    "max_readahead": 1024 * 1024,
    # Synchronous reads: a read waiting for a missing file occupies its reader only, never one
    # of the kernel's shared background slots (12); with those taken, every other file's
    # readahead would drop to page-sized requests.
    "sync_read": True,
    "fsname": "starlight",
    "subtype": "starlight",
}

_FUSE_ROOT_ID: Final = 1


class KernelNotifier:
    """Invalidates the kernel's cached entries and attributes of the mount's root.

    libfuse 2's high-level API has no call for this; its low-level notifications do, given the
    session channel, which we reach from ``struct fuse`` captured during ``init``.
    """

    def __init__(self, lib: ctypes.CDLL, channel: int) -> None:
        self._lib = lib
        self._channel = ctypes.c_void_p(channel)

    @classmethod
    def from_context(cls) -> KernelNotifier | None:
        """Build one from the calling FUSE thread's context (call it from ``init``)."""
        path = ctypes.util.find_library("fuse")
        if path is None:
            return None
        lib = ctypes.CDLL(path)
        try:
            lib.fuse_get_context.restype = ctypes.POINTER(ctypes.c_void_p)
            lib.fuse_get_session.restype = ctypes.c_void_p
            lib.fuse_get_session.argtypes = [ctypes.c_void_p]
            lib.fuse_session_next_chan.restype = ctypes.c_void_p
            lib.fuse_session_next_chan.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
            lib.fuse_lowlevel_notify_inval_entry.restype = ctypes.c_int
            lib.fuse_lowlevel_notify_inval_entry.argtypes = [
                ctypes.c_void_p, ctypes.c_ulong, ctypes.c_char_p, ctypes.c_size_t
            ]  # fmt: skip
            lib.fuse_lowlevel_notify_inval_inode.restype = ctypes.c_int
            lib.fuse_lowlevel_notify_inval_inode.argtypes = [
                ctypes.c_void_p, ctypes.c_ulong, ctypes.c_longlong, ctypes.c_longlong
            ]  # fmt: skip
        except AttributeError:
            log.warning("libfuse lacks cache notifications; attach/detach rely on timeouts")
            return None
        context = lib.fuse_get_context()
        fuse_ptr = context[0] if context else None
        session = lib.fuse_get_session(fuse_ptr) if fuse_ptr else None
        channel = lib.fuse_session_next_chan(session, None) if session else None
        if not channel:
            log.warning("no FUSE channel in this context; attach/detach rely on timeouts")
            return None
        return cls(lib, channel)

    def invalidate_root_entry(self, name: str) -> None:
        encoded = name.encode("latin-1")
        rc = self._lib.fuse_lowlevel_notify_inval_entry(
            self._channel, _FUSE_ROOT_ID, encoded, len(encoded)
        )
        # ENOENT: the kernel had nothing cached under that name, which is fine.
        if rc not in (0, -errno.ENOENT):
            log.warning("kernel entry invalidation of %r failed: %s", name, os.strerror(-rc))

    def invalidate_root(self) -> None:
        rc = self._lib.fuse_lowlevel_notify_inval_inode(self._channel, _FUSE_ROOT_ID, 0, 0)
        if rc not in (0, -errno.ENOENT):
            log.warning("kernel inode invalidation of the root failed: %s", os.strerror(-rc))


def serve(fs: LayerFilesystem, mountpoint: str | os.PathLike[str]) -> None:
    """Mount ``fs`` and serve it until unmounted; blocks the calling thread.

    Paths travel as Latin-1 (see ``tree``), so every byte string is a valid name.
    """

    def on_init() -> None:
        fs.kernel = KernelNotifier.from_context()

    fs.on_init = on_init
    target = os.fsencode(mountpoint).decode("latin-1")
    fuse.FUSE(fs, target, encoding="latin-1", **MOUNT_OPTIONS)
