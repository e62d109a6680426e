"""Starlight layers as seen by the snapshotter: where each one is, and when FUSE is needed.

``StarlightLayers`` is the snapshotter's ``LayerSource`` and ``RemoteLayers``:

- At Prepare time (containerd's remote-snapshot protocol) it accepts a layer the store knows
  (labelled with ``containerd.io/snapshot/starlight.layer``): the snapshotter then commits an
  *external* snapshot for it and answers ALREADY_EXISTS, and containerd never unpacks it.
- At mount time it answers the layer's directory: the plain on-disk tree once the layer is
  complete (steady state, no FUSE), else the layer's path in the FUSE mount, attaching it to
  the FUSE server on first use.
- A reaper detaches complete layers from FUSE once no overlay mount references them.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path

import anyio

from starlight_core.errors import FailedPrecondition
from starlight_worker.fs import AsyncFsClient
from starlight_worker.snapshotter import SnapshotInfo
from starlight_worker.store import LayerState, Store

__all__ = ["LABEL_IMAGE", "LABEL_LAYER", "StarlightLayers"]

log = logging.getLogger(__name__)

# containerd passes only labels under this prefix (and snapshot.ref) on to the snapshotter.
LABEL_LAYER = "containerd.io/snapshot/starlight.layer"
LABEL_IMAGE = "containerd.io/snapshot/starlight.image"

RemoteHook = Callable[[str, str, Mapping[str, str]], Awaitable[bool]]
_DETACH_GRACE = 30.0  # seconds a complete layer stays attached before the reaper may detach it


class StarlightLayers:
    def __init__(
        self,
        store: Store,
        fused: AsyncFsClient,
        fuse_mountpoint: Path,
        *,
        remote_fallback: RemoteHook | None = None,
    ) -> None:
        self.store = store
        self.fused = fused
        self.fuse_mountpoint = fuse_mountpoint
        self._attached: dict[str, float] = {}  # layer key -> when it was seen complete (0: not)
        self._lock = anyio.Lock()
        self.remote_fallback = remote_fallback

    # -- RemoteLayers --------------------------------------------------------------------

    async def prepare_remote(self, key: str, parent: str, labels: Mapping[str, str]) -> bool:
        layer = labels.get(LABEL_LAYER)
        if layer:
            state = await anyio.to_thread.run_sync(self.store.state, layer)
            return state is not LayerState.ABSENT
        if self.remote_fallback is not None:
            return await self.remote_fallback(key, parent, labels)
        return False

    # -- LayerSource ---------------------------------------------------------------------

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

    # -- the reaper ------------------------------------------------------------------------

    def _mounted_fuse_layers(self) -> set[str]:
        prefix = str(self.fuse_mountpoint) + "/"
        used: set[str] = set()
        try:
            text = Path("/proc/self/mountinfo").read_text()
        except OSError:
            return set(self._attached)  # cannot tell: keep everything
        for line in text.splitlines():
            if " - overlay " not in line:
                continue
            for option in line.split(" - overlay ", 1)[1].split(","):
                if option.startswith("lowerdir="):
                    for path in option[len("lowerdir=") :].split(":"):
                        if not path.startswith("/"):
                            # containerd shortened a long option string to relative paths:
                            # we cannot tell which layers it uses, so keep them all.
                            return set(self._attached)
                        if path.startswith(prefix):
                            used.add(path[len(prefix) :].split("/", 1)[0])
        return used

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
                if layer in in_use or now - complete_since < _DETACH_GRACE:
                    continue
                await self.fused.detach(layer)
                del self._attached[layer]
                detached.append(layer)
                log.info("layer %s is complete and unused: detached from FUSE", layer)
        return detached

    @property
    def attached(self) -> list[str]:
        return sorted(self._attached)
