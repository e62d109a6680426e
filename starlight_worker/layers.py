"""Starlight layers as seen by the snapshotter: where each one is, and when FUSE is needed.

``StarlightLayers`` is the snapshotter's ``LayerSource`` and ``RemoteLayers``:

- At Prepare time (containerd's remote-snapshot protocol) it accepts a layer the store knows
  (labelled with ``containerd.io/snapshot/starlight.layer``): the snapshotter then commits an
  *external* snapshot for it and answers ALREADY_EXISTS, and containerd never unpacks it.
  A layer labelled only with the image it belongs to (containerd's own client pulling:
  ``ctr-remote image rpull``, the CRI plugin) goes to ``remote_fallback``
  (``starlight_worker.remote``), which pulls the image through the proxy and names the layer;
  that name is added to the labels the snapshotter stores with the external snapshot.
- At mount time it answers the layer's directory: the plain on-disk tree once the layer is
  complete (steady state, no FUSE), else the layer's path in the FUSE mount, attaching it to
  the FUSE server on first use.
- A reaper detaches complete layers from FUSE once no overlay mount references them (for
  ``detach_grace`` seconds: a mount list handed to containerd may not be mounted yet).
- After a daemon restart, ``recover`` adopts the layers the FUSE server (which outlived the
  daemon) still serves and attaches those that existing snapshots need.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, MutableMapping
from pathlib import Path
from typing import TYPE_CHECKING

import anyio

from starlight_core.errors import FailedPrecondition, StarlightError
from starlight_worker.fs import AsyncFsClient
from starlight_worker.metrics import Metrics
from starlight_worker.snapshotter import Mounting, SnapshotInfo
from starlight_worker.store import LayerState, Store

if TYPE_CHECKING:
    from starlight_worker.tracer import Tracer

__all__ = ["LABEL_IMAGE", "LABEL_LAYER", "StarlightLayers", "fuse_layers_in_use"]

log = logging.getLogger(__name__)

# containerd passes only labels under this prefix (and snapshot.ref) on to the snapshotter.
LABEL_LAYER = "containerd.io/snapshot/starlight.layer"
LABEL_IMAGE = "containerd.io/snapshot/starlight.image"

RemoteHook = Callable[[str, str, Mapping[str, str]], Awaitable[Mapping[str, str] | None]]
"""(key, parent, labels) → labels to add to the external snapshot (naming its starlight
layer), or None to decline (containerd unpacks the layer itself)."""
_DETACH_GRACE = 30.0  # seconds a complete layer stays attached before the reaper may detach it


def fuse_layers_in_use(mountinfo: str, fuse_mountpoint: Path | str) -> set[str]:
    """The layer keys that overlay mounts in ``mountinfo`` (``/proc/self/mountinfo``) use
    through the FUSE mount at ``fuse_mountpoint``.

    containerd shortens a long option string by moving to the lower directories' common
    parent and naming them relative to it; that parent is not in the mount table, so a
    relative ``lowerdir`` item is resolved against every ancestor of the FUSE mountpoint (the
    common parent of a FUSE layer and anything else is one of them). A name that is not a
    layer key at all can come out of that; it only keeps nothing attached needlessly.
    """
    mountpoint = os.path.normpath(str(fuse_mountpoint))
    prefix = mountpoint + "/"
    ancestors = [mountpoint]
    while ancestors[-1] != "/":
        ancestors.append(os.path.dirname(ancestors[-1]))
    used: set[str] = set()
    for line in mountinfo.splitlines():
        if " - overlay " not in line:
            continue
        for option in line.split(" - overlay ", 1)[1].split(" ")[-1].split(","):
            if not option.startswith("lowerdir="):
                continue
            for item in option[len("lowerdir=") :].split(":"):
                path = item.replace("\\040", " ")
                candidates = (
                    [path] if path.startswith("/") else [os.path.join(a, path) for a in ancestors]
                )
                for candidate in candidates:
                    candidate = os.path.normpath(candidate)
                    if candidate.startswith(prefix):
                        name = candidate[len(prefix) :].split("/", 1)[0]
                        # ``<layer>@<view>``: another attachment of the same layer directory.
                        used.update({name, name.split("@", 1)[0]})
    return used


class StarlightLayers:
    def __init__(
        self,
        store: Store,
        fused: AsyncFsClient,
        fuse_mountpoint: Path,
        *,
        remote_fallback: RemoteHook | None = None,
        detach_grace: float = _DETACH_GRACE,
        metrics: Metrics | None = None,
    ) -> None:
        self.store = store
        self.fused = fused
        self.fuse_mountpoint = fuse_mountpoint
        self._attached: dict[str, float] = {}  # layer key -> when it was seen complete (0: not)
        self._lock = anyio.Lock()
        self.remote_fallback = remote_fallback
        self.detach_grace = detach_grace
        self.metrics = metrics

    # -- RemoteLayers --------------------------------------------------------------------

    async def prepare_remote(self, key: str, parent: str, labels: Mapping[str, str]) -> bool:
        layer = labels.get(LABEL_LAYER)
        if layer:
            state = await anyio.to_thread.run_sync(self.store.state, layer)
            return state is not LayerState.ABSENT
        if self.remote_fallback is None:
            return False
        added = await self.remote_fallback(key, parent, labels)
        if added is None:
            return False
        # The snapshotter stores the labels it asked with: ours name the layer for lower_dir.
        if not isinstance(labels, MutableMapping):
            log.warning("snapshot %s: cannot label it with its starlight layer; declined", key)
            return False
        labels.update(added)
        return True

    # -- LayerSource ---------------------------------------------------------------------

    tracer: Tracer | None = None
    """The optimizer (set by the daemon): while it is on, each container's mounts get views
    of their layers of their own, served through FUSE (see ``starlight_worker.tracer``)."""

    async def lower_dir_for(self, snapshot: SnapshotInfo, mounting: Mounting) -> str:
        """``lower_dir`` when the snapshot being mounted is known: the tracer's view of the
        layer for that container if it traces it, else as ``lower_dir``."""
        layer = snapshot.labels.get(LABEL_LAYER)
        if self.tracer is None or not layer:
            return await self.lower_dir(snapshot)
        state = await anyio.to_thread.run_sync(self.store.state, layer)
        if state is LayerState.ABSENT:
            return await self.lower_dir(snapshot)  # says what is wrong
        try:
            traced = await self.tracer.lower_dir(layer, mounting)
        except StarlightError as exc:
            # Tracing must never keep a container from starting.
            log.warning("not tracing %s in %s: %s", layer, mounting.snapshot.name, exc)
            traced = None
        if traced is None:
            return await self.lower_dir(snapshot)
        if state is LayerState.RECEIVING:
            # Arrivals are announced for the layer's own key and reach its views from there.
            await self.attach(layer)
        return str(traced)

    async def lower_dir(self, snapshot: SnapshotInfo) -> str:
        layer = snapshot.labels.get(LABEL_LAYER)
        if not layer:
            raise FailedPrecondition(
                f"snapshot {snapshot.name} is external but names no starlight layer"
            )
        state = await anyio.to_thread.run_sync(self.store.state, layer)
        if state is LayerState.COMPLETE:
            return str(self.store.layer_dir(layer) / "fs")
        if state is LayerState.ABSENT:
            raise FailedPrecondition(
                f"layer {layer} of snapshot {snapshot.name} is not in the starlight store",
                hint="pull the image again (ctr-starlight pull)",
            )
        return str(await self.attach(layer))

    async def attach(self, layer: str) -> Path:
        async with self._lock:
            path = await self.fused.attach(layer, self.store.layer_dir(layer))
            self._attached.setdefault(layer, 0.0)
            return path

    async def detach(self, layer: str) -> None:
        async with self._lock:
            await self.fused.detach(layer)
            self._attached.pop(layer, None)

    async def arrived(self, layer: str, names: list[str]) -> None:
        """Wake FUSE readers waiting for ``names`` of ``layer`` (if FUSE serves it)."""
        if layer in self._attached and names:
            await self.fused.arrived(layer, names)

    # -- restarts --------------------------------------------------------------------------

    async def recover(self, needed: Iterable[str] = ()) -> tuple[list[str], list[str]]:
        """After a daemon restart: adopt every layer the FUSE server still serves (running
        containers read through them; the reaper detaches them once complete and unused), and
        attach the layers in ``needed`` that are still being received (snapshots stack them:
        their mounts name FUSE paths). Idempotent. Returns (adopted, newly attached)."""
        served = await self.fused.list()
        adopted: list[str] = []
        async with self._lock:
            for info in served:
                # Aliases (``<layer>@…``) are the tracer's, which detaches them itself.
                if info.layer_key not in self._attached and "@" not in info.layer_key:
                    self._attached[info.layer_key] = 0.0
                    adopted.append(info.layer_key)
        attached: list[str] = []
        for layer in needed:
            if layer in self._attached:
                continue
            state = await anyio.to_thread.run_sync(self.store.state, layer)
            if state is LayerState.RECEIVING:
                await self.attach(layer)
                attached.append(layer)
        return adopted, attached

    # -- the reaper ------------------------------------------------------------------------

    def _mounted_fuse_layers(self) -> set[str]:
        try:
            text = Path("/proc/self/mountinfo").read_text()
        except OSError:
            return set(self._attached)  # cannot tell: keep everything
        return fuse_layers_in_use(text, self.fuse_mountpoint)

    async def reap(self) -> list[str]:
        """Detach complete layers no overlay uses any more; returns the keys detached."""
        detached: list[str] = []
        async with self._lock:
            now = time.monotonic()
            in_use = await anyio.to_thread.run_sync(self._mounted_fuse_layers)
            for layer, complete_since in list(self._attached.items()):
                state = await anyio.to_thread.run_sync(self.store.state, layer)
                if state is LayerState.RECEIVING:
                    continue
                if complete_since == 0.0:
                    self._attached[layer] = now
                    continue
                if layer in in_use:
                    self._attached[layer] = now  # the grace counts from the last use seen
                    continue
                if now - complete_since < self.detach_grace:
                    continue
                await self.fused.detach(layer)
                del self._attached[layer]
                detached.append(layer)
                if self.metrics is not None:
                    self.metrics.fuse_detached.inc()
                log.info("layer %s is complete and unused: detached from FUSE", layer)
        return detached

    @property
    def attached(self) -> list[str]:
        return sorted(self._attached)
