"""One layer of the store: its tree on disk, built from the TOC, filled as contents arrive.

``LayerHandle`` is what ``Store.begin_layer`` returns. Building (``_build``) makes every entry
that needs no content — directories with their final owner, mode and xattrs, symlinks, devices,
fifos, whiteouts, empty files and their hard links — and, on a layer a crash interrupted, looks
at what is already there: an entry of the right kind is kept and its metadata applied again, a
wrong one replaced, a regular file of the right size at a content's name is that content (it
only ever arrives there by ``rename`` after verification), its missing hard links made.

``place`` and ``copy_local`` fill one content: a staged file gets its owner (before the mode:
chown clears setuid), xattrs (after chown: it clears ``security.capability``), mode and time,
then is renamed to its final name, and its hard links follow. Several files of the layer with the
same content each get their own copy (a reflink where the filesystem can). Nothing is ever
visible at a final name half-written, and a full disk leaves no temporary behind.

``finalize`` sets directory times (creating entries moved them) and writes ``complete``.

Threads: ``place`` and ``copy_local`` of different digests run in parallel; the same digest is
serialised by a lock of its own; the handle's lock guards only its small bookkeeping.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
import stat
import threading
import uuid
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Final

import attrs

from starlight_core.digest import Digest
from starlight_core.errors import (
    CorruptLayer,
    FailedPrecondition,
    InvalidInput,
    NotFound,
    StarlightError,
    UnsafePath,
)
from starlight_core.layer.toc import TOC
from starlight_worker.store import beneath
from starlight_worker.store.beneath import (
    DirCache,
    disk_error,
    fd_path,
    open_dir_beneath,
    proc_path,
    split,
)
from starlight_worker.store.clone import clone_file
from starlight_worker.store.lifecycle import LayerEvent, LayerState, transition
from starlight_worker.store.plan import OPAQUE_XATTR, LayerPlan, NodeKind, PlanNode

if TYPE_CHECKING:
    from starlight_worker.store.store import Store

__all__ = ["COMPLETE_MARKER", "FS_DIR", "TOC_FILE", "LayerHandle"]

log = logging.getLogger(__name__)

TOC_FILE: Final = "toc.json"
FS_DIR: Final = "fs"
COMPLETE_MARKER: Final = "complete"
_STRIPES: Final = 32
_CREATE_FLAGS: Final = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


@attrs.frozen
class _Lower:
    """A lower layer's directory that an implied directory takes its metadata from."""

    mode: int
    uid: int
    gid: int
    mtime_ns: int
    xattrs: Mapping[str, bytes]


def _name(name: str) -> bytes:
    return os.fsencode(name)


def _remove_at(dir_fd: int, base: bytes, st: os.stat_result) -> None:
    if stat.S_ISDIR(st.st_mode):
        shutil.rmtree(base, dir_fd=dir_fd)
    else:
        os.unlink(base, dir_fd=dir_fd)


class LayerHandle:
    """A layer being received (or already complete). Get one from ``Store.begin_layer``."""

    def __init__(
        self,
        store: Store,
        key: str,
        toc: TOC,
        plan: LayerPlan | None,
        state: LayerState,
        lower: Sequence[str] = (),
    ) -> None:
        self.key = key
        self.toc = toc
        self.layer_dir = store.layer_dir(key)
        self.fs_dir = self.layer_dir / FS_DIR
        self.lower = tuple(lower)
        self._store = store
        self._plan = plan
        self._state = state
        self._lock = threading.Lock()
        self._stripes = [threading.Lock() for _ in range(_STRIPES)]
        self._present: set[int] = set()
        self._unsynced: set[int] = set()
        self.defer_sync = False
        """When set, placements are written to the database only on ``sync()`` (and before
        ``finalize``): a puller placing thousands of small files batches them. Safe: after a
        crash, what is present is read back from the disk."""
        self._lower_timed: set[int] = set()
        """Implied directories that keep their lower directory's time (nothing is created in
        them, as when a layer only marks a directory opaque), by node index: read again at
        ``finalize``, when the lower layer's directory times are final (if it is complete)."""

    def __repr__(self) -> str:
        return f"<LayerHandle {self.key} {self._state.value}>"

    # -- what it holds -----------------------------------------------------------------------

    @property
    def diff_id(self) -> Digest:
        return self.toc.layer.diff_id

    @property
    def state(self) -> LayerState:
        return self._state

    @property
    def finalized(self) -> bool:
        """``complete`` is written: the layer needs no FUSE any more."""
        return self._state is LayerState.COMPLETE

    @property
    def complete(self) -> bool:
        """Every content is present (``finalize`` may still be due)."""
        if self._state is not LayerState.RECEIVING:
            return self._state is LayerState.COMPLETE
        plan = self._plan
        assert plan is not None
        with self._lock:
            return len(self._present) == plan.files_total

    def missing(self) -> dict[Digest, list[str]]:
        """Content digest → the names (hard links included) still waiting for it."""
        if self._state is not LayerState.RECEIVING:
            return {}
        plan = self._plan
        assert plan is not None
        with self._lock:
            present = set(self._present)
        result: dict[Digest, list[str]] = {}
        for digest, indexes in plan.contents.items():
            names = [n for i in indexes if i not in present for n in plan.nodes[i].names]
            if names:
                result[digest] = names
        return result

    def needs(self, digest: Digest | str) -> bool:
        """Does some name of this layer still wait for ``digest``?"""
        return bool(self._pending(Digest(digest)))

    def missing_size(self) -> tuple[int, int]:
        """(files, bytes) still missing."""
        if self._state is not LayerState.RECEIVING:
            return 0, 0
        plan = self._plan
        assert plan is not None
        with self._lock:
            nodes = [n for n in plan.content_nodes() if n.index not in self._present]
        return len(nodes), sum(n.size for n in nodes)

    # -- filling -------------------------------------------------------------------------------

    def place(self, digest: Digest | str, staged: Path | str, *, keep: bool = False) -> list[str]:
        """Install ``staged`` (a verified file holding ``digest``'s content, best in
        ``Store.staging_file()``) at every name of this layer that needs it; returns the names
        now present. Without ``keep`` the staged file is consumed (renamed into place or
        deleted) on success; on an error it is left where it was, for a retry."""
        digest = Digest(digest)
        staged = Path(staged)
        self._check_open()
        transition(self._state, LayerEvent.PLACE, self.key)
        if not self._pending(digest):
            if not keep:
                self._unlink_quietly(staged)
            return []
        with self._stripe(digest):
            nodes = self._pending(digest)
            if not nodes:
                if not keep:
                    self._unlink_quietly(staged)
                return []
            try:
                src_fd = os.open(staged, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            except FileNotFoundError:
                raise NotFound(f"staged file {staged} does not exist") from None
            except OSError as exc:
                raise InvalidInput(f"cannot open staged file {staged}: {exc}") from exc
            try:
                st = os.fstat(src_fd)
                if not stat.S_ISREG(st.st_mode) or st.st_size != nodes[0].size:
                    raise InvalidInput(
                        f"staged file {staged} for {digest} is not a regular file of "
                        f"{nodes[0].size} bytes"
                    )
                return self._install(nodes, src_fd, None if keep else staged)
            finally:
                os.close(src_fd)

    def copy_local(self, digest: Digest | str) -> list[str]:
        """Fill every name needing ``digest`` from a present file with that content anywhere
        in the store; ``NotFound`` if there is none. Returns the names now present."""
        digest = Digest(digest)
        self._check_open()
        transition(self._state, LayerEvent.PLACE, self.key)
        if not self._pending(digest):
            return []
        with self._stripe(digest):
            nodes = self._pending(digest)
            if not nodes:
                return []
            src_fd = self._store._open_content(digest, nodes[0].size)
            try:
                return self._install(nodes, src_fd, None)
            finally:
                os.close(src_fd)

    def finalize(self) -> None:
        """Set directory times and mark the layer complete. Idempotent; ``FailedPrecondition``
        while contents are missing."""
        self.sync()
        with self._lock:
            if self._state is LayerState.COMPLETE:
                return
            self._check_open()
            new_state = transition(self._state, LayerEvent.FINALIZE, self.key)
            plan = self._plan
            assert plan is not None
            missing = plan.files_total - len(self._present)
            if missing:
                raise FailedPrecondition(
                    f"layer {self.key}: {missing} files still miss their content"
                )
            try:
                self._set_dir_times(plan)
                self._write_marker()
            except OSError as exc:
                raise disk_error(exc, f"layer {self.key}: finalizing") from exc
            self._store._db.complete_layer(self.key)
            self._unsynced.clear()
            self._state = new_state
        log.info("layer %s complete", self.key)

    # -- internals: contents ---------------------------------------------------------------

    def _check_open(self) -> None:
        # Its descriptors are gone (and their numbers may be reused): never touch them.
        if self._store.closed:
            raise FailedPrecondition(f"layer {self.key}: the store is closed")

    @contextmanager
    def _stripe(self, digest: Digest) -> Iterator[None]:
        with self._stripes[hash(digest) % _STRIPES]:
            yield

    def _pending(self, digest: Digest) -> list[PlanNode]:
        if self._state is not LayerState.RECEIVING:
            return []
        plan = self._plan
        assert plan is not None
        indexes = plan.contents.get(digest, ())
        with self._lock:
            return [plan.nodes[i] for i in indexes if i not in self._present]

    @staticmethod
    def _unlink_quietly(path: Path) -> None:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        except OSError as exc:
            log.warning("cannot remove staged file %s: %s", path, exc)

    def _install(self, nodes: list[PlanNode], src_fd: int, consume: Path | None) -> list[str]:
        """Copies for all nodes but the last, then the last one from ``consume`` (renamed) or
        a copy: a failure before the end leaves ``consume`` untouched for a retry."""
        placed: list[PlanNode] = []
        try:
            for i, node in enumerate(nodes):
                if consume is not None and i == len(nodes) - 1:
                    self._install_consumed(node, src_fd, consume)
                else:
                    self._install_copy(node, src_fd)
                placed.append(node)
        except OSError as exc:
            raise disk_error(exc, f"layer {self.key}: placing {nodes[len(placed)].name!r}") from exc
        finally:
            if placed:
                self._record(placed)
        return [name for node in placed for name in node.names]

    def _install_copy(self, node: PlanNode, src_fd: int) -> None:
        store = self._store
        tmp = f"{uuid.uuid4().hex}.copy".encode()
        fd = os.open(tmp, _CREATE_FLAGS, 0o600, dir_fd=store._staging_fd)
        try:
            try:
                clone_file(src_fd, fd, node.size)
                if os.fstat(fd).st_size != node.size:
                    raise OSError(errno.EIO, "copy has the wrong size")
                self._describe_fd(fd, node)
            finally:
                os.close(fd)
            self._move_in(node, store._staging_fd, tmp)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp, dir_fd=store._staging_fd)
            raise

    def _install_consumed(self, node: PlanNode, src_fd: int, staged: Path) -> None:
        self._describe_fd(src_fd, node)
        try:
            self._move_in(node, None, os.fsencode(staged))
        except OSError as exc:
            if exc.errno != errno.EXDEV:
                raise
            # Staged on another filesystem: copy it in, then let it go.
            self._install_copy(node, src_fd)
            self._unlink_quietly(staged)

    def _describe_fd(self, fd: int, node: PlanNode) -> None:
        os.fchown(fd, node.uid, node.gid)
        for key, value in node.xattrs.items():
            self._setxattr(fd, key, value, node)
        os.fchmod(fd, node.mode)
        mtime = node.mtime_ns or 0
        os.utime(fd, ns=(mtime, mtime))
        if self._store.sync_contents:
            os.fsync(fd)

    def _move_in(self, node: PlanNode, src_dir_fd: int | None, src: bytes) -> None:
        """Rename ``src`` to the node's first name, then link its other names."""
        fs_fd = self._fs_fd()
        try:
            parent, base = split(_name(node.names[0]))
            dir_fd = open_dir_beneath(fs_fd, parent)
            try:
                os.rename(src, base, src_dir_fd=src_dir_fd, dst_dir_fd=dir_fd)
                for other in node.names[1:]:
                    self._link(fs_fd, dir_fd, base, _name(other))
            finally:
                os.close(dir_fd)
        finally:
            os.close(fs_fd)

    def _link(self, fs_fd: int, src_dir_fd: int, src_base: bytes, name: bytes) -> None:
        """Make ``name`` a hard link of ``src_base`` (in ``src_dir_fd``), replacing anything
        else there atomically."""
        parent, base = split(name)
        dir_fd = open_dir_beneath(fs_fd, parent)
        try:
            try:
                os.link(src_base, base, src_dir_fd=src_dir_fd, dst_dir_fd=dir_fd,
                        follow_symlinks=False)  # fmt: skip
                return
            except FileExistsError:
                pass
            src = os.stat(src_base, dir_fd=src_dir_fd, follow_symlinks=False)
            there = os.stat(base, dir_fd=dir_fd, follow_symlinks=False)
            if (there.st_dev, there.st_ino) == (src.st_dev, src.st_ino):
                return
            if stat.S_ISDIR(there.st_mode):
                shutil.rmtree(base, dir_fd=dir_fd)
                os.link(src_base, base, src_dir_fd=src_dir_fd, dst_dir_fd=dir_fd,
                        follow_symlinks=False)  # fmt: skip
                return
            staging_fd = self._store._staging_fd
            tmp = f"{uuid.uuid4().hex}.link".encode()
            os.link(src_base, tmp, src_dir_fd=src_dir_fd, dst_dir_fd=staging_fd,
                    follow_symlinks=False)  # fmt: skip
            try:
                os.rename(tmp, base, src_dir_fd=staging_fd, dst_dir_fd=dir_fd)
            except BaseException:
                os.unlink(tmp, dir_fd=staging_fd)
                raise
        finally:
            os.close(dir_fd)

    def sync(self) -> None:
        """Write the presence of placed contents to the database now (see ``defer_sync``)."""
        self._record(())

    def _record(self, nodes: Sequence[PlanNode], *, force: bool = False) -> None:
        with self._lock:
            for node in nodes:
                self._present.add(node.index)
                self._unsynced.add(node.index)
            if nodes and self.defer_sync and not force:
                return  # the disk is the truth; the rows catch up on sync()
            pending = set(self._unsynced)
        if not pending:
            return
        try:
            self._store._db.sync_present(self.key, pending)
        except StarlightError as exc:
            # The files are in place; the rows catch up on the next write (or the next
            # begin_layer, which reads the disk). Only a full disk lands here in practice.
            log.warning("layer %s: cannot record placed contents yet: %s", self.key, exc)
            return
        with self._lock:
            self._unsynced -= pending

    def _fs_fd(self) -> int:
        try:
            return beneath.open_dir(self.fs_dir)
        except FileNotFoundError:
            raise FailedPrecondition(
                f"layer {self.key}: {self.fs_dir} is gone (was the layer removed?)"
            ) from None

    # -- internals: metadata ---------------------------------------------------------------

    def _setxattr(self, target: int | bytes, key: str, value: bytes, node: PlanNode) -> None:
        try:
            if isinstance(target, int):
                os.setxattr(target, key, value)
            else:
                os.setxattr(target, key, value, follow_symlinks=False)
        except OSError as exc:
            if (
                exc.errno == errno.EPERM
                and key.startswith("user.")
                and node.kind
                not in (
                    NodeKind.FILE,
                    NodeKind.DIR,
                )
            ):
                return  # only files and directories take user.* xattrs (containerd skips too)
            if exc.errno in (errno.ENOTSUP, errno.EOPNOTSUPP):
                log.warning("layer %s: xattr %s on %r not supported here; ignored",
                            self.key, key, node.name)  # fmt: skip
                return
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise
            raise CorruptLayer(
                f"layer {self.key}: cannot set xattr {key!r} on {node.name!r}: {exc.strerror}"
            ) from exc

    def _describe_at(self, dir_fd: int, base: bytes, node: PlanNode) -> None:
        """containerd's order for an entry made in place: lchown, xattrs, chmod, times."""
        kind = node.kind
        os.chown(base, node.uid, node.gid, dir_fd=dir_fd, follow_symlinks=False)
        target = proc_path(dir_fd, base)
        for key, value in node.xattrs.items():
            self._setxattr(target, key, value, node)
        if kind not in (NodeKind.SYMLINK, NodeKind.WHITEOUT):
            # Never a symlink here (checked or just made), so following the last
            # component (chmod has no nofollow on Linux) cannot leave the tree.
            os.chmod(base, node.mode, dir_fd=dir_fd)
        if node.mtime_ns is not None and kind is not NodeKind.DIR:
            os.utime(base, ns=(node.mtime_ns, node.mtime_ns), dir_fd=dir_fd,
                     follow_symlinks=False)  # fmt: skip

    # -- building ------------------------------------------------------------------------------

    def _build(self) -> None:
        """Make everything that needs no content; see what a previous run left."""
        plan = self._plan
        assert plan is not None
        fresh = not self.fs_dir.exists()
        try:
            self.fs_dir.mkdir(mode=0o755, exist_ok=True)
            fs_fd = beneath.open_dir(self.fs_dir)
        except OSError as exc:
            raise disk_error(exc, f"layer {self.key}: creating {self.fs_dir}") from exc
        lower_fds = self._open_lowers()
        present: set[int] = set()
        node: PlanNode | None = None
        try:
            with DirCache(fs_fd) as dirs:
                # The layer's root: 0755 root, like the snapshot directory containerd makes.
                root_path = fd_path(fs_fd)
                os.chown(root_path, 0, 0)
                os.chmod(root_path, 0o755)
                if plan.root_opaque:
                    os.setxattr(root_path, OPAQUE_XATTR, b"y")
                for node in plan.nodes:
                    name = _name(node.names[0])
                    parent, base = split(name)
                    dir_fd = dirs.get(parent)
                    if node.kind is NodeKind.DIR:
                        self._build_dir(dirs, dir_fd, name, base, node, lower_fds)
                    elif node.has_content:
                        if not fresh and self._probe(dirs, node):
                            present.add(node.index)
                    else:
                        self._build_leaf(dirs, dir_fd, name, base, node, fresh)
                node = None
                for node in plan.nodes:
                    if len(node.names) > 1 and not node.has_content:
                        self._link_all(dirs, fs_fd, node)
                node = None
        except OSError as exc:
            where = f"building {node.name!r}" if node is not None else "building its tree"
            raise disk_error(exc, f"layer {self.key}: {where}") from exc
        finally:
            os.close(fs_fd)
            for fd in lower_fds:
                os.close(fd)
        with self._lock:
            self._present = present
            self._unsynced = set(present)
        self._store._db.sync_present(self.key, present)
        with self._lock:
            self._unsynced.clear()

    def _open_lowers(self) -> list[int]:
        fds = []
        for key in self.lower:
            try:
                fds.append(beneath.open_dir(self._store.layer_dir(key) / FS_DIR))
            except OSError:
                continue  # not in the store: containerd would not see it either
        return fds

    def _lower_dir(self, name: bytes, lower_fds: Sequence[int]) -> _Lower | None:
        """containerd's ``mkparent``: the first lower layer holding ``name`` decides — its
        directory's metadata if it is one, the defaults if it is anything else."""
        for root_fd in lower_fds:
            try:
                fd = open_dir_beneath(root_fd, name)
            except FileNotFoundError:
                continue
            except (UnsafePath, NotADirectoryError):
                return None
            try:
                st = os.fstat(fd)
                path = fd_path(fd)
                xattrs = {
                    key: os.getxattr(path, key)
                    for key in os.listxattr(path)
                    if not key.startswith("trusted.")
                }
            finally:
                os.close(fd)
            return _Lower(stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, st.st_mtime_ns, xattrs)
        return None

    def _build_dir(
        self,
        dirs: DirCache,
        dir_fd: int,
        name: bytes,
        base: bytes,
        node: PlanNode,
        lower_fds: Sequence[int],
    ) -> None:
        try:
            os.mkdir(base, 0o700, dir_fd=dir_fd)
        except FileExistsError:
            st = os.stat(base, dir_fd=dir_fd, follow_symlinks=False)
            if not stat.S_ISDIR(st.st_mode):
                _remove_at(dir_fd, base, st)
                dirs.forget(name)
                os.mkdir(base, 0o700, dir_fd=dir_fd)
        described = node
        if node.made_implied:
            lower = self._lower_dir(name, lower_fds) if lower_fds else None
            if lower is not None:
                if node.implied:
                    described = attrs.evolve(
                        node, mode=lower.mode, uid=lower.uid, gid=lower.gid, xattrs={}
                    )
                    if not node.has_children:
                        self._lower_timed.add(node.index)
                described = attrs.evolve(described, xattrs={**lower.xattrs, **node.xattrs})
        self._describe_at(dir_fd, base, described)
        if node.opaque:
            os.setxattr(proc_path(dir_fd, base), OPAQUE_XATTR, b"y", follow_symlinks=False)

    def _build_leaf(
        self, dirs: DirCache, dir_fd: int, name: bytes, base: bytes, node: PlanNode, fresh: bool
    ) -> None:
        try:
            self._create_leaf(dir_fd, base, node)
        except FileExistsError:
            st = os.stat(base, dir_fd=dir_fd, follow_symlinks=False)
            if fresh or not self._matches(dir_fd, base, node, st):
                _remove_at(dir_fd, base, st)
                dirs.forget(name)
                self._create_leaf(dir_fd, base, node)
        self._describe_at(dir_fd, base, node)

    @staticmethod
    def _create_leaf(dir_fd: int, base: bytes, node: PlanNode) -> None:
        kind = node.kind
        if kind is NodeKind.FILE:
            os.close(os.open(base, _CREATE_FLAGS, 0o600, dir_fd=dir_fd))
        elif kind is NodeKind.SYMLINK:
            os.symlink(_name(node.target), base, dir_fd=dir_fd)
        elif kind is NodeKind.CHAR:
            os.mknod(base, stat.S_IFCHR | 0o600, os.makedev(node.devmajor, node.devminor),
                     dir_fd=dir_fd)  # fmt: skip
        elif kind is NodeKind.BLOCK:
            os.mknod(base, stat.S_IFBLK | 0o600, os.makedev(node.devmajor, node.devminor),
                     dir_fd=dir_fd)  # fmt: skip
        elif kind is NodeKind.FIFO:
            os.mkfifo(base, 0o600, dir_fd=dir_fd)
        elif kind is NodeKind.WHITEOUT:
            # What containerd's OverlayConvertWhiteout makes: mknod(S_IFCHR, 0), no permissions.
            os.mknod(base, stat.S_IFCHR, 0, dir_fd=dir_fd)
        else:  # pragma: no cover - directories are built elsewhere
            raise AssertionError(kind)

    @staticmethod
    def _matches(dir_fd: int, base: bytes, node: PlanNode, st: os.stat_result) -> bool:
        kind, mode = node.kind, st.st_mode
        if kind is NodeKind.FILE:
            return stat.S_ISREG(mode) and st.st_size == 0
        if kind is NodeKind.SYMLINK:
            return stat.S_ISLNK(mode) and os.readlink(base, dir_fd=dir_fd) == _name(node.target)
        if kind is NodeKind.CHAR:
            rdev = os.makedev(node.devmajor, node.devminor)
            return stat.S_ISCHR(mode) and st.st_rdev == rdev
        if kind is NodeKind.BLOCK:
            rdev = os.makedev(node.devmajor, node.devminor)
            return stat.S_ISBLK(mode) and st.st_rdev == rdev
        if kind is NodeKind.FIFO:
            return stat.S_ISFIFO(mode)
        return stat.S_ISCHR(mode) and st.st_rdev == 0

    def _probe(self, dirs: DirCache, node: PlanNode) -> bool:
        """Is this content already at one of its names (a previous run placed it)? Then make
        sure every name links to it; anything else found at its names goes."""
        found: bytes | None = None
        for name in map(_name, node.names):
            parent, base = split(name)
            dir_fd = dirs.get(parent)
            try:
                st = os.stat(base, dir_fd=dir_fd, follow_symlinks=False)
            except FileNotFoundError:
                continue
            if found is None and stat.S_ISREG(st.st_mode) and st.st_size == node.size:
                found = name
            elif found is None:
                _remove_at(dir_fd, base, st)
                dirs.forget(name)
        if found is None:
            return False
        fs_fd = self._fs_fd()
        try:
            parent, base = split(found)
            with dirs.hold(parent) as dir_fd:
                for other in map(_name, node.names):
                    if other != found:
                        self._link(fs_fd, dir_fd, base, other)
        finally:
            os.close(fs_fd)
        return True

    def _link_all(self, dirs: DirCache, fs_fd: int, node: PlanNode) -> None:
        parent, base = split(_name(node.names[0]))
        with dirs.hold(parent) as dir_fd:
            for other in node.names[1:]:
                self._link(fs_fd, dir_fd, base, _name(other))

    # -- finishing -------------------------------------------------------------------------------

    def _set_dir_times(self, plan: LayerPlan) -> None:
        fs_fd = beneath.open_dir(self.fs_dir)
        lower_fds = self._open_lowers() if self._lower_timed else []
        try:
            with DirCache(fs_fd) as dirs:
                # Children before parents (a plan lists parents first); setting a time does
                # not touch the parent's, but this is the order a reader expects.
                for node in reversed(plan.nodes):
                    if node.kind is not NodeKind.DIR:
                        continue
                    mtime = node.mtime_ns if not node.implied else None
                    if node.index in self._lower_timed:
                        lower = self._lower_dir(_name(node.names[0]), lower_fds)
                        mtime = lower.mtime_ns if lower is not None else None
                    if mtime is None:
                        continue  # implied: the time it was last changed, as containerd's
                    parent, base = split(_name(node.names[0]))
                    os.utime(base, ns=(mtime, mtime), dir_fd=dirs.get(parent),
                             follow_symlinks=False)  # fmt: skip
        finally:
            os.close(fs_fd)
            for fd in lower_fds:
                os.close(fd)

    def _write_marker(self) -> None:
        tmp = self.layer_dir / f"{COMPLETE_MARKER}.tmp"
        tmp.write_bytes(b"")
        os.rename(tmp, self.layer_dir / COMPLETE_MARKER)

    def _mark_removed(self) -> None:
        with self._lock:
            self._state = LayerState.ABSENT
