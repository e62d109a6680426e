"""The snapshotter: containerd's snapshot semantics over a metadata store and directories.

``Snapshotter`` is what the gRPC adapter calls; it is async because starlight plugs async code
into it, and it runs the blocking parts (SQLite, directory work) on worker threads.

The seam for starlight's lazily fetched layers has two parts:

- ``RemoteLayers.prepare_remote`` is asked on every Prepare that carries containerd's
  ``containerd.io/snapshot.ref`` label (the name the layer would be committed under). If it
  answers True, the snapshotter creates that committed snapshot itself, marked *external*, with
  the requested parent and labels, and answers ALREADY_EXISTS: containerd's metadata layer
  then finds it by walking with ``labels."containerd.io/snapshot.ref"==<ref>,parent==<parent>``
  and skips downloading and unpacking the layer. ``NoRemoteLayers`` (the default) declines.
- ``LayerSource.lower_dir`` gives the directory that stands for an external snapshot whenever
  mounts are computed (Prepare, View, Mounts): a FUSE path while the layer is still arriving,
  its on-disk directory once complete. A non-external snapshot is always its own ``fs``
  directory. A source that also has ``lower_dir_for`` is asked that instead, with the snapshot
  being mounted (``Mounting``): starlight's tracer gives each container its own view of its
  layers, to tell its file accesses from those of other containers.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Mapping, Sequence
from typing import Protocol

import anyio.to_thread
import attrs

from starlight_core.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidInput,
    NotFound,
    StarlightError,
)
from starlight_worker.snapshotter.filesystem import SnapshotDirectories, disk_usage
from starlight_worker.snapshotter.filters import parse_all
from starlight_worker.snapshotter.metastore import MetaStore, Snapshot
from starlight_worker.snapshotter.model import (
    LABEL_SNAPSHOT_REF,
    Kind,
    Mount,
    SnapshotInfo,
    Usage,
)
from starlight_worker.snapshotter.mounts import default_overlay_options, snapshot_mounts

__all__ = ["LayerSource", "Mounting", "NoRemoteLayers", "RemoteLayers", "Snapshotter"]

log = logging.getLogger(__name__)


class LayerSource(Protocol):
    """Where the contents of an external committed snapshot are."""

    async def lower_dir(self, snapshot: SnapshotInfo) -> str:
        """A directory to use as this snapshot's overlay lower directory right now.

        Called each time mounts that include ``snapshot`` are computed; ``snapshot.labels``
        holds what Prepare was given (``containerd.io/snapshot.ref`` is the chain ID).
        """
        ...


@attrs.frozen
class Mounting:
    """Whose mounts are being computed, for ``lower_dir_for``."""

    snapshot: SnapshotInfo
    """The active or view snapshot being mounted (a container's root filesystem…)."""
    chain: tuple[SnapshotInfo, ...]
    """Its committed parents, base layer first."""
    index: int
    """Position in ``chain`` of the parent asked about."""


class RemoteLayers(Protocol):
    """The remote-snapshot hook consulted by Prepare (see the module docstring)."""

    async def prepare_remote(self, key: str, parent: str, labels: Mapping[str, str]) -> bool:
        """True if the layer named by ``labels["containerd.io/snapshot.ref"]`` on top of
        committed ``parent`` can be provided without containerd unpacking it."""
        ...


class NoRemoteLayers:
    """The default hook: every layer is unpacked by containerd."""

    async def prepare_remote(self, key: str, parent: str, labels: Mapping[str, str]) -> bool:
        return False


class Snapshotter:
    """Snapshots under ``root`` (``metadata.db`` and ``snapshots/<id>/``)."""

    def __init__(
        self,
        root: str,
        *,
        layer_source: LayerSource | None = None,
        remote: RemoteLayers | None = None,
        overlay_options: Sequence[str] | None = None,
        async_remove: bool = False,
    ) -> None:
        self.dirs = SnapshotDirectories(root)
        self.root = self.dirs.root
        self.store = MetaStore(os.path.join(self.root, "metadata.db"))
        self.layer_source = layer_source
        self.remote: RemoteLayers = remote if remote is not None else NoRemoteLayers()
        self.overlay_options = tuple(
            default_overlay_options() if overlay_options is None else overlay_options
        )
        # Like containerd's AsynchronousRemove: Remove only forgets, Cleanup frees the disk.
        self.async_remove = async_remove

    def close(self) -> None:
        self.store.close()

    # -- queries -------------------------------------------------------------------------

    async def stat(self, key: str) -> SnapshotInfo:
        def run() -> SnapshotInfo:
            with self.store.transaction() as tx:
                return tx.get(key).info

        return await anyio.to_thread.run_sync(run)

    async def walk(self, filters: Sequence[str] = ()) -> list[SnapshotInfo]:
        """Snapshots matching any of ``filters`` (containerd filter syntax); all without."""
        match = parse_all(filters)

        def run() -> list[SnapshotInfo]:
            with self.store.transaction() as tx:
                return tx.walk(match)

        return await anyio.to_thread.run_sync(run)

    async def usage(self, key: str) -> Usage:
        """Committed: the usage measured at commit. Active: measured now (may take a while)."""

        def run() -> Usage:
            with self.store.transaction() as tx:
                stored = tx.get(key)
            if stored.info.kind is Kind.ACTIVE:
                return self._measure(key, stored.id)
            return stored.usage

        return await anyio.to_thread.run_sync(run)

    async def mounts(self, key: str) -> list[Mount]:
        def run() -> Snapshot:
            with self.store.transaction() as tx:
                return tx.snapshot(key)

        return await self._mounts(await anyio.to_thread.run_sync(run))

    # -- changes -------------------------------------------------------------------------

    async def update(self, info: SnapshotInfo, fieldpaths: Sequence[str] = ()) -> SnapshotInfo:
        """Only labels are mutable (paths ``labels`` / ``labels.<key>``; none: all labels)."""
        if not info.name:
            raise InvalidInput("Update needs the snapshot's name")

        def run() -> SnapshotInfo:
            with self.store.transaction() as tx:
                return tx.update(info, fieldpaths)

        return await anyio.to_thread.run_sync(run)

    async def prepare(
        self, key: str, parent: str = "", labels: Mapping[str, str] | None = None
    ) -> list[Mount]:
        labels = dict(labels or {})
        target = labels.get(LABEL_SNAPSHOT_REF, "")
        if target and await self._provide_remote(key, parent, target, labels):
            raise AlreadyExists(f"target snapshot {target!r} already exists")
        return await self._create(Kind.ACTIVE, key, parent, labels)

    async def view(
        self, key: str, parent: str = "", labels: Mapping[str, str] | None = None
    ) -> list[Mount]:
        return await self._create(Kind.VIEW, key, parent, dict(labels or {}))

    async def commit(self, name: str, key: str, labels: Mapping[str, str] | None = None) -> None:
        """Active ``key`` becomes committed ``name``; its labels are replaced by ``labels``."""

        def run() -> None:
            with self.store.transaction() as tx:
                stored = tx.get(key)
            # Measured outside the lock (it walks the whole layer); the id check below makes
            # sure the snapshot measured is still the one committed.
            usage = Usage()
            if stored.info.kind is Kind.ACTIVE:
                usage = self._measure(key, stored.id)
            with self.store.transaction() as tx:
                if tx.commit(key, name, usage, labels) != stored.id:
                    raise FailedPrecondition(f"snapshot {key!r} was replaced during Commit")

        await anyio.to_thread.run_sync(run)

    async def remove(self, key: str) -> None:
        """Forget ``key`` (``FailedPrecondition`` while it has children) and, unless removal
        is asynchronous, delete its directory at once."""

        def run() -> None:
            with self.store.transaction() as tx:
                tx.remove(key)
                # Listed under the lock: no creation is half-way while we look.
                doomed = [] if self.async_remove else self.dirs.orphans(tx.ids())
            self.dirs.remove(doomed)

        await anyio.to_thread.run_sync(run)

    async def cleanup(self) -> None:
        """Delete every directory no stored snapshot owns."""

        def run() -> None:
            with self.store.transaction() as tx:
                doomed = self.dirs.orphans(tx.ids())
            self.dirs.remove(doomed)

        await anyio.to_thread.run_sync(run)

    # -- internals -----------------------------------------------------------------------

    async def _create(
        self,
        kind: Kind,
        key: str,
        parent: str,
        labels: Mapping[str, str],
        *,
        external: bool = False,
    ) -> list[Mount]:
        def run() -> Snapshot:
            with self.store.transaction() as tx:
                temporary = self.dirs.make_temporary(kind)
                try:
                    snapshot = tx.create(kind, key, parent, labels, external=external)
                    top = snapshot.parents[0] if snapshot.parents else None
                    # An external top layer may not be reachable yet (and is root-owned in
                    # practice): the new root directory keeps our default owner, root.
                    if top is not None and not top.external:
                        fs = os.path.join(temporary, "fs")
                        self.dirs.chown_like(fs, self.dirs.fs(top.id))
                    self.dirs.install(temporary, snapshot.id)
                except BaseException:
                    self.dirs.remove([temporary])
                    raise
                return snapshot

        snapshot = await anyio.to_thread.run_sync(run)
        if kind is Kind.COMMITTED:
            return []
        return await self._mounts(snapshot)

    def _measure(self, key: str, snapshot_id: int) -> Usage:
        try:
            return disk_usage(self.dirs.fs(snapshot_id))
        except FileNotFoundError:
            # Removed while we were about to measure it.
            raise NotFound(f"snapshot {key!r} does not exist") from None

    async def _mounts(self, snapshot: Snapshot) -> list[Mount]:
        lowers = [await self._lower_dir(snapshot, i) for i in range(len(snapshot.parents))]
        return snapshot_mounts(
            snapshot.kind,
            self.dirs.fs(snapshot.id),
            self.dirs.work(snapshot.id),
            lowers,
            self.overlay_options,
        )

    async def _lower_dir(self, snapshot: Snapshot, index: int) -> str:
        parent = snapshot.parents[index]
        if not parent.external:
            return self.dirs.fs(parent.id)
        if self.layer_source is None:
            raise FailedPrecondition(
                f"snapshot {parent.info.name!r} is provided by starlight but no layer source"
                " is configured"
            )
        lower_dir_for = getattr(self.layer_source, "lower_dir_for", None)
        if lower_dir_for is not None and snapshot.info is not None:
            chain = tuple(p.info for p in reversed(snapshot.parents))
            mounting = Mounting(snapshot.info, chain, len(chain) - 1 - index)
            path: str = await lower_dir_for(parent.info, mounting)
            return path
        return await self.layer_source.lower_dir(parent.info)

    async def _provide_remote(
        self, key: str, parent: str, target: str, labels: Mapping[str, str]
    ) -> bool:
        """Try to satisfy Prepare with an external committed snapshot named ``target``.

        True when such a snapshot exists on ``parent`` afterwards; False sends Prepare down
        the ordinary path (which also reports a missing or uncommitted parent).
        """

        def existing() -> str:
            with self.store.transaction() as tx:
                if parent:
                    stored_parent = tx.find(parent)
                    if stored_parent is None or stored_parent.info.kind is not Kind.COMMITTED:
                        return "bad parent"
                found = tx.find(target)
            if found is None:
                return "missing"
            # Only a committed target on the same parent is what containerd will look for;
            # anything else under that name means: unpack as usual.
            if found.info.kind is Kind.COMMITTED and found.info.parent == parent:
                return "present"
            return "taken"

        state = await anyio.to_thread.run_sync(existing)
        if state != "missing":
            return state == "present"
        try:
            provided = await self.remote.prepare_remote(key, parent, labels)
        except StarlightError as exc:
            log.warning("remote layer %s unavailable, containerd will unpack it: %s", target, exc)
            return False
        if not provided:
            return False
        # AlreadyExists: another Prepare of the same layer won the race; the layer is there.
        with contextlib.suppress(AlreadyExists):
            await self._create(Kind.COMMITTED, target, parent, labels, external=True)
        return True
