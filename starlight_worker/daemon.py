"""The daemon: one process wiring the store, the FUSE server, the snapshotter and the pulls.

Sockets (under ``run_dir``): ``snapshotter.sock`` for containerd's proxy plugin,
``daemon.sock`` for ``ctr-starlight``, ``fused.sock`` for the FUSE server — a separate,
long-lived process (started here when absent) so that restarting the daemon never breaks a
running container's mounts.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable

import anyio
import anyio.abc
import attrs

from starlight_core.proxy_client import ProxyClient
from starlight_worker.config import DaemonConfig
from starlight_worker.containerd import ContainerdClient
from starlight_worker.fs import AsyncFsClient, ensure_running
from starlight_worker.layers import StarlightLayers
from starlight_worker.puller import Pull, PullOptions
from starlight_worker.snapshotter import Snapshotter, serve_snapshots, serve_unix
from starlight_worker.store import Store

__all__ = ["Daemon", "PullManager"]

log = logging.getLogger(__name__)

_REAP_INTERVAL = 10.0


class PullManager:
    """Runs pulls in the daemon's task group; a second request for the same image joins the
    pull under way instead of starting another."""

    def __init__(self, tasks: anyio.abc.TaskGroup, make: Callable[[PullOptions], Pull]) -> None:
        self._tasks = tasks
        self._make = make
        self._active: dict[tuple[str, str, str], Pull] = {}

    def start(self, options: PullOptions) -> Pull:
        key = (str(options.reference), str(options.platform), options.namespace)
        pull = self._active.get(key)
        if pull is not None and not pull.done.is_set():
            return pull
        pull = self._make(options)
        self._active[key] = pull
        self._tasks.start_soon(self._run, key, pull)
        return pull

    async def _run(self, key: tuple[str, str, str], pull: Pull) -> None:
        try:
            await pull.run()
        finally:
            if self._active.get(key) is pull:
                del self._active[key]

    @property
    def active(self) -> list[Pull]:
        return list(self._active.values())


@attrs.define
class Daemon:
    config: DaemonConfig
    store: Store | None = None
    layers: StarlightLayers | None = None
    snapshotter: Snapshotter | None = None
    pulls: PullManager | None = None
    fused: AsyncFsClient | None = None

    def proxy_client(self) -> ProxyClient:
        return ProxyClient(self.config.proxy, user=self.config.proxy_user or None, timeout=60.0)

    def containerd(self, namespace: str) -> ContainerdClient:
        return ContainerdClient(self.config.containerd_address, namespace)

    def _make_pull(self, options: PullOptions) -> Pull:
        assert self.store is not None
        assert self.layers is not None
        return Pull(
            options,
            store=self.store,
            layers=self.layers,
            proxy=self.proxy_client,
            containerd=self.containerd,
            retries=self.config.pull_retries,
        )

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        from starlight_worker.control import ControlService

        config = self.config
        for directory in (config.root, config.run_dir, config.fuse_mountpoint):
            directory.mkdir(parents=True, exist_ok=True)
        self.store = await anyio.to_thread.run_sync(Store, config.root)
        await anyio.to_thread.run_sync(
            lambda: ensure_running(
                config.fused_socket,
                config.fuse_mountpoint,
                content_timeout=config.content_timeout,
            )
        )
        self.fused = AsyncFsClient(config.fused_socket)
        self.layers = StarlightLayers(self.store, self.fused, config.fuse_mountpoint)
        self.snapshotter = Snapshotter(
            str(config.snapshotter_root), layer_source=self.layers, remote=self.layers
        )
        try:
            async with anyio.create_task_group() as tasks:
                self.pulls = PullManager(tasks, self._make_pull)
                await tasks.start(serve_snapshots, self.snapshotter, str(config.snapshotter_socket))
                await tasks.start(serve_unix, [ControlService(self)], str(config.control_socket))
                tasks.start_soon(self._reaper)
                log.info(
                    "starlight-daemon ready: snapshotter %s, control %s, proxy %s",
                    config.snapshotter_socket,
                    config.control_socket,
                    config.proxy,
                )
                task_status.started()
        finally:
            self.snapshotter.close()
            self.store.close()

    async def reset(self, *, dry_run: bool = False) -> list[str]:
        """Remove what starlight created, and nothing else of containerd's: containers on the
        starlight snapshotter (their tasks killed), images starlight pulled (when containerd's
        record still points at what we pulled), the snapshots in the starlight snapshotter, the
        FUSE attachments, and the store's images and layers. Returns what was (or would be)
        removed."""
        assert self.store is not None
        assert self.layers is not None
        assert self.fused is not None
        assert self.snapshotter is not None
        removed: list[str] = []
        images = await anyio.to_thread.run_sync(self.store.images)
        namespaces = {self.config.namespace} | {image.namespace for image in images}
        for namespace in sorted(namespaces):
            async with self.containerd(namespace) as ctrd:
                # containerd's container filters know no "snapshotter" field: filter here.
                containers = await ctrd.list_containers()
                for container in (c for c in containers if c.snapshotter == "starlight"):
                    removed.append(f"container {namespace}/{container.id}")
                    if not dry_run:
                        await ctrd.stop_task(container.id)
                        await ctrd.delete_container(container.id)
                        if container.snapshot_key:
                            await ctrd.remove_snapshot(container.snapshot_key)
                for image in images:
                    if image.namespace != namespace:
                        continue
                    record = await ctrd.get_image(image.reference)
                    if record is not None and record.target.digest == image.manifest_digest:
                        removed.append(f"image {namespace}/{image.reference}")
                        if not dry_run:
                            await ctrd.delete_image(image.reference)
                # Leaf first: a snapshot with children cannot go before them.
                snapshots = await ctrd.list_snapshots()
                removed.extend(f"snapshot {namespace}/{s.name}" for s in snapshots)
                while snapshots and not dry_run:
                    parents = {s.parent for s in snapshots}
                    leaves = [s for s in snapshots if s.name not in parents]
                    for leaf in leaves:
                        await ctrd.remove_snapshot(leaf.name)
                    snapshots = [s for s in snapshots if s.name in parents]
        for key in self.layers.attached:
            removed.append(f"fuse layer {key}")
            if not dry_run:
                await self.layers.detach(key)
        for image in images:
            if not dry_run:
                await anyio.to_thread.run_sync(
                    functools.partial(
                        self.store.remove_image, image.reference, namespace=image.namespace
                    )
                )
        for layer in await anyio.to_thread.run_sync(self.store.layers):
            removed.append(f"layer {layer.key}")
            if not dry_run:
                await anyio.to_thread.run_sync(
                    functools.partial(self.store.remove_layer, layer.key, force=True)
                )
        if not dry_run:
            await self.snapshotter.cleanup()
        return removed

    async def _reaper(self) -> None:
        assert self.layers is not None
        while True:
            await anyio.sleep(_REAP_INTERVAL)
            try:
                await self.layers.reap()
            except Exception:
                log.exception("reaping FUSE layers failed")
