"""The layer filesystem: attached layers, one directory each, served read-only to FUSE.

``LayerFilesystem`` is both the fusepy operations object (its FUSE methods run on libfuse's
worker threads) and the state the control server changes (attach, detach, arrivals, tracing).
It imports no FUSE: errors are plain ``OSError`` (fusepy turns them into errno replies), so it
can be driven directly in tests.

Threads: FUSE callbacks read ``_layers`` and the immutable trees without locks; control
commands replace ``_layers`` entries under ``_control_lock``, which no FUSE callback takes. A read
of a missing file waits in ``Arrivals`` on that file's own event.
"""

from __future__ import annotations

import errno
import itertools
import logging
import os
import re
import stat
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, Final, Protocol

import attrs

from starlight_core import wire
from starlight_core.errors import AlreadyExists, InvalidInput, NotFound
from starlight_core.layer.toc import TOC
from starlight_worker.fs.arrivals import Arrivals
from starlight_worker.fs.protocol import ALIAS_SEPARATOR, AttachedLayerInfo
from starlight_worker.fs.tracing import Tracer
from starlight_worker.fs.tree import LayerTree, Node, fuse_name, toc_name

__all__ = ["LAYER_KEY_RE", "AttachedLayer", "KernelCache", "LayerFilesystem"]

log = logging.getLogger(__name__)

LAYER_KEY_RE: Final = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+@=-]{0,199}$")
"""Keys become path components and overlay ``lowerdir`` items: no ``/``, ``:`` or ``,``."""

_ROOT_INO: Final = 1
_RETRY_GRACE: Final = 1.0
"""Seconds after a read of a file timed out during which reads of it fail at once: the kernel
retries a failed page read straight away, and one EIO should cost one timeout, not two."""
_O_ACCMODE: Final = os.O_RDONLY | os.O_WRONLY | os.O_RDWR


class KernelCache(Protocol):
    """Drops what the kernel cached about the mount's root (attach and detach change it)."""

    def invalidate_root_entry(self, name: str) -> None: ...

    def invalidate_root(self) -> None: ...


@attrs.define(eq=False)
class AttachedLayer:
    key: str
    layer_dir: Path
    fs_dir: bytes
    tree: LayerTree
    attached_ns: int
    """``time.monotonic_ns()`` at attach: the origin of this layer's trace times."""
    content_size: int
    detached: bool = False


@attrs.define(eq=False)
class _Handle:
    layer: AttachedLayer
    node: Node
    name: str
    fd: int | None = None
    lock: threading.Lock = attrs.Factory(threading.Lock)


class LayerFilesystem:
    use_ns = True
    """fusepy: times are integer nanoseconds."""

    def __init__(
        self, mountpoint: str | os.PathLike[str], *, content_timeout: float, poll_interval: float
    ) -> None:
        self.mountpoint = Path(mountpoint)
        self.content_timeout = content_timeout
        self.tracer = Tracer()
        self.kernel: KernelCache | None = None
        self.on_init: Callable[[], None] | None = None
        self.mounted = threading.Event()
        self._arrivals = Arrivals(poll_interval=poll_interval)
        self._layers: dict[str, AttachedLayer] = {}
        self._control_lock = threading.Lock()
        self._next_ino = _ROOT_INO + 1
        self._root_mtime_ns = time.time_ns()
        self._handles: dict[int, _Handle] = {}
        self._fh = itertools.count(1)
        self._stopping = False
        self._failed: dict[int, float] = {}
        """ino → when a read of it last timed out."""

    # --- control side -------------------------------------------------------------------

    def path_of(self, layer_key: str) -> Path:
        return self.mountpoint / layer_key

    def attach(self, layer_key: str, layer_dir: str) -> Path:
        if not LAYER_KEY_RE.match(layer_key):
            raise InvalidInput(
                f"invalid layer key {layer_key!r}",
                hint="use letters, digits and ._+@=- (no '/', ':' or ','), at most 200",
            )
        if not os.path.isabs(layer_dir):
            raise InvalidInput(f"layer directory {layer_dir!r} must be an absolute path")
        directory = Path(os.path.realpath(layer_dir))
        with self._control_lock:
            current = self._layers.get(layer_key)
            if current is not None:
                if current.layer_dir == directory:
                    return self.path_of(layer_key)
                raise AlreadyExists(
                    f"layer {layer_key} is attached from {current.layer_dir}, not {directory}",
                    hint="detach it first",
                )
            try:
                data = (directory / "toc.json").read_bytes()
            except FileNotFoundError as exc:
                raise NotFound(f"no TOC at {directory / 'toc.json'}") from exc
            except OSError as exc:
                raise NotFound(f"cannot read {directory / 'toc.json'}: {exc}") from exc
            toc = wire.loads(data, TOC, "TOC")
            fs_dir = os.fsencode(directory / "fs")
            now = time.time_ns()

            def implied_mtime_ns(name: str) -> int:
                # The puller made the directory: its time is what an unpack would show.
                try:
                    return os.lstat(os.path.join(fs_dir, name.encode("latin-1"))).st_mtime_ns
                except OSError:
                    return now

            tree = LayerTree.build(toc, first_ino=self._next_ino, implied_mtime_ns=implied_mtime_ns)
            for warning in tree.warnings:
                log.warning("layer %s: TOC entry %s", layer_key, warning)
            self._next_ino = tree.next_ino
            self._layers[layer_key] = AttachedLayer(
                layer_key, directory, fs_dir, tree, time.monotonic_ns(), tree.content_size()
            )
            self._root_changed(layer_key)
        log.info("attached layer %s from %s (%d entries)", layer_key, directory, len(tree.nodes))
        return self.path_of(layer_key)

    def detach(self, layer_key: str) -> bool:
        with self._control_lock:
            layer = self._layers.pop(layer_key, None)
            if layer is None:
                return False
            layer.detached = True
            self._root_changed(layer_key)
        self.tracer.forget(layer_key)
        self._arrivals.wake_range(layer.tree.inodes)
        log.info("detached layer %s", layer_key)
        return True

    def arrived(self, layer_key: str, names: Iterable[str]) -> int:
        """Wake the readers of these files in ``layer_key`` and in its aliases."""
        alias_prefix = layer_key + ALIAS_SEPARATOR
        layers = [
            layer
            for key, layer in list(self._layers.items())
            if key == layer_key or key.startswith(alias_prefix)
        ]
        if not layers:
            return 0
        wanted = [fuse_name(n) for n in names]
        inos = [
            node.ino
            for layer in layers
            for name in wanted
            if (node := layer.tree.nodes.get(name)) is not None
        ]
        return self._arrivals.wake(inos)

    def layers(self) -> list[AttachedLayerInfo]:
        return [
            AttachedLayerInfo(
                layer_key=layer.key,
                layer_dir=str(layer.layer_dir),
                path=str(self.path_of(layer.key)),
                entries=len(layer.tree.nodes),
                complete=(layer.layer_dir / "complete").exists(),
                attached_ns=layer.attached_ns,
            )
            for layer in list(self._layers.values())
        ]

    def layer_count(self) -> int:
        return len(self._layers)

    def open_files(self) -> int:
        return len(self._handles)

    def waiting(self) -> int:
        """Files that readers are waiting for right now."""
        return self._arrivals.waiting()

    def stop(self) -> None:
        """Fail every waiting reader now (the server is going away)."""
        self._stopping = True
        self._arrivals.wake_range(range(2**64))

    def _root_changed(self, layer_key: str) -> None:
        self._root_mtime_ns = time.time_ns()
        if self.kernel is not None:
            # The kernel may hold a negative entry for a key not attached before, or a positive
            # one for a key just detached; both would outlive us (timeouts are long).
            self.kernel.invalidate_root_entry(layer_key)
            self.kernel.invalidate_root()

    # --- FUSE operations ----------------------------------------------------------------

    def __call__(self, op: str, *args: Any) -> Any:
        return getattr(self, op)(*args)

    def init(self, _path: str) -> None:
        if self.on_init is not None:
            self.on_init()
        self.mounted.set()

    def destroy(self, _path: str) -> None:
        self.stop()

    def _lookup(self, path: str) -> tuple[AttachedLayer | None, Node | None, str]:
        """(layer, node, name in the layer); ``(None, None, "")`` is the mount's root."""
        if path == "/":
            return None, None, ""
        key, _, name = path[1:].partition("/")
        layer = self._layers.get(key)
        if layer is None:
            raise OSError(errno.ENOENT, "no such layer")
        node = layer.tree.nodes.get(name)
        if node is None:
            raise OSError(errno.ENOENT, "no such entry")
        return layer, node, name

    def _root_stat(self) -> dict[str, int]:
        return {
            "st_ino": _ROOT_INO,
            "st_mode": stat.S_IFDIR | 0o755,
            "st_nlink": 2 + len(self._layers),
            "st_size": 4096,
            "st_blksize": 4096,
            "st_atime": self._root_mtime_ns,
            "st_mtime": self._root_mtime_ns,
            "st_ctime": self._root_mtime_ns,
        }

    def getattr(self, path: str, fh: int | None = None) -> dict[str, int]:
        layer, node, name = self._lookup(path)
        if node is None or layer is None:
            return self._root_stat()
        if self.tracer.enabled and not node.is_dir:
            self.tracer.record(layer.key, layer.attached_ns, name, "getattr")
        return node.stat()

    def readlink(self, path: str) -> str:
        layer, node, name = self._lookup(path)
        if node is None or layer is None or not stat.S_ISLNK(node.mode):
            raise OSError(errno.EINVAL, "not a symbolic link")
        if self.tracer.enabled:
            self.tracer.record(layer.key, layer.attached_ns, name, "readlink")
        return node.target

    def open(self, path: str, flags: int) -> int:
        layer, node, name = self._lookup(path)
        if node is None or layer is None or node.is_dir:
            raise OSError(errno.EISDIR, "is a directory")
        if flags & _O_ACCMODE != os.O_RDONLY:
            raise OSError(errno.EROFS, "read-only file system")
        if self.tracer.enabled:
            self.tracer.record(layer.key, layer.attached_ns, name, "open")
        # Opening never waits (a process may open and never read, or read only later) and
        # never fails on content: the read that needs it reports a problem.
        fd = None
        if node.size > 0:
            try:
                fd = self._probe(layer, node)
            except OSError:
                fd = None
        fh = next(self._fh)
        self._handles[fh] = _Handle(layer, node, name, fd)
        return fh

    def read(self, path: str | None, size: int, offset: int, fh: int) -> bytes:
        handle = self._handles.get(fh)
        if handle is None:
            raise OSError(errno.EBADF, "unknown file handle")
        layer, node = handle.layer, handle.node
        if self.tracer.enabled:
            self.tracer.record(layer.key, layer.attached_ns, handle.name, "read")
        if offset >= node.size or size <= 0:
            return b""
        fd = handle.fd
        if fd is None:
            fd = self._await_content(layer, node, handle.name)
            with handle.lock:
                if handle.fd is None:
                    handle.fd = fd
                else:
                    os.close(fd)
                    fd = handle.fd
        return os.pread(fd, size, offset)

    def release(self, path: str | None, fh: int) -> None:
        handle = self._handles.pop(fh, None)
        if handle is not None and handle.fd is not None:
            os.close(handle.fd)

    def readdir(self, path: str, fh: int) -> Iterator[str | tuple[str, dict[str, int], int]]:
        _, node, _ = self._lookup(path)
        if node is None:
            yield (".", {"st_ino": _ROOT_INO, "st_mode": stat.S_IFDIR | 0o755}, 0)
            yield ".."
            for key, attached in list(self._layers.items()):
                root = attached.tree.root
                yield (key, {"st_ino": root.ino, "st_mode": root.mode}, 0)
            return
        if node.children is None:
            raise OSError(errno.ENOTDIR, "not a directory")
        yield (".", {"st_ino": node.ino, "st_mode": node.mode}, 0)
        yield ".."
        # Types matter: overlayfs looks for whiteouts among DT_CHR entries of lower dirs.
        for base, child in node.children.items():
            yield (base, {"st_ino": child.ino, "st_mode": child.mode}, 0)

    def getxattr(self, path: str, name: str, position: int = 0) -> bytes:
        _, node, _ = self._lookup(path)
        value = None if node is None else node.xattrs.get(name)
        if value is None:
            raise OSError(errno.ENODATA, "no such attribute")
        return value

    def listxattr(self, path: str) -> list[str]:
        _, node, _ = self._lookup(path)
        return [] if node is None else list(node.xattrs)

    def statfs(self, path: str) -> dict[str, int]:
        layers = list(self._layers.values())
        size = sum(layer.content_size for layer in layers)
        files = sum(len(layer.tree.nodes) for layer in layers)
        return {
            "f_bsize": 4096,
            "f_frsize": 4096,
            "f_blocks": (size + 4095) // 4096,
            "f_bfree": 0,
            "f_bavail": 0,
            "f_files": files,
            "f_ffree": 0,
            "f_favail": 0,
            "f_namemax": 255,
        }

    # --- content ------------------------------------------------------------------------

    def _probe(self, layer: AttachedLayer, node: Node) -> int | None:
        """An open descriptor on the content if it has arrived, else ``None``."""
        for name in list(node.names):
            try:
                return _open_beneath(layer.fs_dir, name.encode("latin-1"))
            except (FileNotFoundError, NotADirectoryError):
                continue
            except OSError as exc:
                log.error(
                    "layer %s: cannot open content of %r under %s: %s",
                    layer.key, toc_name(name), layer.layer_dir, exc,
                )  # fmt: skip
                raise OSError(errno.EIO, "content unreadable") from exc
        return None

    def _await_content(self, layer: AttachedLayer, node: Node, name: str) -> int:
        timeout = self.content_timeout
        failed = self._failed.get(node.ino)
        if failed is not None and time.monotonic() - failed < _RETRY_GRACE:
            timeout = 0.0
        fd = self._arrivals.wait(
            node.ino,
            lambda: self._probe(layer, node),
            timeout=timeout,
            cancelled=lambda: layer.detached or self._stopping,
        )
        if fd is not None:
            self._failed.pop(node.ino, None)
            return fd
        self._failed[node.ino] = time.monotonic()
        if timeout == 0:
            raise OSError(errno.EIO, "content not available")
        if layer.detached:
            why = "the layer was detached"
        elif self._stopping:
            why = "the server is stopping"
        else:
            why = f"it did not arrive within {timeout:g}s (is the daemon pulling?)"
        log.warning("layer %s: read of %r failed with EIO: %s", layer.key, toc_name(name), why)
        raise OSError(errno.EIO, "content not available")


def _open_beneath(root: bytes, name: bytes) -> int:
    """Open ``root/name`` for reading without following any symlink on the way: the tree
    holds the image's own symlinks, which must never lead a read outside the layer."""
    parts = name.split(b"/")
    dirfd = os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for part in parts[:-1]:
            child = os.open(
                part, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dirfd
            )
            os.close(dirfd)
            dirfd = child
        # O_NONBLOCK: a FIFO where content belongs must not hang us; checked right after.
        fd = os.open(
            parts[-1], os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dirfd
        )
    finally:
        os.close(dirfd)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OSError(errno.EINVAL, "content is not a regular file")
    return fd
