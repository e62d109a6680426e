"""The daemon: one process wiring the store, the FUSE server, the snapshotter and the pulls.

Sockets (under ``run_dir``): ``snapshotter.sock`` for containerd's proxy plugin,
``daemon.sock`` for ``ctr-starlight``, ``fused.sock`` for the FUSE server — a separate,
long-lived process (started here when absent) so that restarting the daemon never breaks a
running container's mounts.

Restarts: the FUSE server outlives the daemon, so containers keep reading what is on disk
while the daemon is away (a read of a content still missing waits, up to ``content_timeout``).
On start the daemon adopts the layers the FUSE server still serves, attaches those the
snapshots need, and resumes every pull the store recorded as RUNNING from what is verified on
disk (``Pull`` names those contents to the proxy: nothing travels twice). A pull that fails
after its image was READY is retried in the background with a growing delay, forever: running
containers depend on it.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
from collections.abc import Awaitable, Callable

import anyio
import anyio.abc
import attrs

from starlight_core.errors import StarlightError
from starlight_core.platform import Platform
from starlight_core.proxy_client import ProxyClient
from starlight_core.reference import Reference
from starlight_worker.config import DaemonConfig
from starlight_worker.containerd import ContainerdClient
from starlight_worker.fs import AsyncFsClient, ensure_running
from starlight_worker.layers import LABEL_LAYER, StarlightLayers
from starlight_worker.metrics import Metrics, serve_metrics
from starlight_worker.puller import Pull, PullOptions
from starlight_worker.remote import RemoteSnapshots
from starlight_worker.snapshotter import Snapshotter, serve_snapshots, serve_unix
from starlight_worker.store import PullState, Store
from starlight_worker.tracer import Tracer, snapshot_exists

__all__ = ["Daemon", "PullManager", "retry_delay"]

log = logging.getLogger(__name__)

_REAP_INTERVAL = 10.0
_FIRST_RETRY = 1.0


def retry_delay(attempt: int, maximum: float) -> float:
    """Seconds before background retry number ``attempt`` (1, 2, ...): doubling from one
    second, at most ``maximum``."""
    return min(maximum, _FIRST_RETRY * math.pow(2, min(attempt - 1, 30)))


class PullManager:
    """Runs pulls in the daemon's task group; a second request for the same image joins the
    pull under way instead of starting another.

    A pull that fails once its image is READY (``Pull.usable``) is continued in the background
    (``register=False``, same store record) after ``retry_delay``, again and again until it
    completes: containers started on the image need its contents, and the proxy or the disk
    may come back at any time. A new request for the image meanwhile simply starts it now."""

    def __init__(
        self,
        tasks: anyio.abc.TaskGroup,
        make: Callable[[PullOptions], Pull],
        *,
        backoff_max: float = 60.0,
        wanted: Callable[[PullOptions], Awaitable[bool]] | None = None,
    ) -> None:
        self._tasks = tasks
        self._make = make
        self.backoff_max = backoff_max
        self._wanted = wanted
        """Asked before each background retry: False (the image was removed meanwhile, e.g.
        by ``ctr-starlight reset``) ends the retries."""
        self._active: dict[tuple[str, str, str], Pull] = {}
        self._scopes: dict[int, anyio.CancelScope] = {}  # id(pull) -> where it runs
        self._retrying: dict[tuple[str, str, str], int] = {}
        """Images waiting for a background retry → attempts so far."""

    @staticmethod
    def _key(options: PullOptions) -> tuple[str, str, str]:
        return (str(options.reference), str(options.platform), options.namespace)

    def start(self, options: PullOptions) -> Pull:
        key = self._key(options)
        pull = self._active.get(key)
        if pull is not None and not pull.done.is_set():
            return pull
        pull = self._make(options)
        self._active[key] = pull
        self._tasks.start_soon(self._run, key, pull)
        return pull

    async def _run(self, key: tuple[str, str, str], pull: Pull) -> None:
        scope = self._scopes[id(pull)] = anyio.CancelScope()
        try:
            with scope:
                await pull.run()
        finally:
            del self._scopes[id(pull)]
            if self._active.get(key) is pull:
                del self._active[key]
        if scope.cancel_called:  # stopped (reset): no retry
            self._retrying.pop(key, None)
            return
        if pull.error is None:
            self._retrying.pop(key, None)
        elif pull.usable and pull.record_id is not None:
            attempt = self._retrying.get(key, 0) + 1
            self._retrying[key] = attempt
            delay = retry_delay(attempt, self.backoff_max)
            log.warning(
                "pull of %s stopped (%s); its image is in use: retrying in %.0fs (attempt %d)",
                pull.options.reference,
                pull.error,
                delay,
                attempt,
            )
            continuation = attrs.evolve(pull.options, register=False, record_id=pull.record_id)
            self._tasks.start_soon(self._retry, key, continuation, delay)

    async def _retry(self, key: tuple[str, str, str], options: PullOptions, delay: float) -> None:
        await anyio.sleep(delay)
        if key in self._active:
            return  # someone asked for the image meanwhile: that pull carries on
        if self._wanted is not None and not await self._wanted(options):
            self._retrying.pop(key, None)
            log.info("pull of %s: its image was removed; no more retries", options.reference)
            return
        self.start(options)

    async def stop_all(self) -> list[str]:
        """Cancel every pull under way and forget pending retries (a retry due later also
        ends once its image is gone); returns when the cancelled pulls have ended."""
        pulls = list(self._active.values())
        for pull in pulls:
            scope = self._scopes.get(id(pull))
            if scope is not None:
                scope.cancel()
        self._retrying.clear()
        for pull in pulls:
            await pull.done.wait()
        return [str(pull.options.reference) for pull in pulls]

    @property
    def retrying(self) -> list[str]:
        """References waiting for a background retry."""
        return sorted({key[0] for key in self._retrying if key not in self._active})

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
    metrics: Metrics = attrs.Factory(Metrics)
    remote: RemoteSnapshots | None = None
    tracer: Tracer | None = None

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
            metrics=self.metrics,
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
        self.layers = StarlightLayers(
            self.store,
            self.fused,
            config.fuse_mountpoint,
            detach_grace=config.detach_after,
            metrics=self.metrics,
        )
        self.snapshotter = Snapshotter(
            str(config.snapshotter_root), layer_source=self.layers, remote=self.layers
        )
        self.tracer = self.layers.tracer = Tracer(
            root=config.root,
            store=self.store,
            fused=self.fused,
            fuse_mountpoint=config.fuse_mountpoint,
            snapshot_exists=snapshot_exists(self.snapshotter, self.containerd),
        )
        try:
            async with anyio.create_task_group() as tasks:
                self.pulls = PullManager(
                    tasks,
                    self._make_pull,
                    backoff_max=config.retry_backoff_max,
                    wanted=self._still_wanted,
                )
                self.remote = RemoteSnapshots(
                    self.pulls,
                    namespace=config.namespace,
                    timeout=config.remote_timeout,
                    metrics=self.metrics,
                )
                self.layers.remote_fallback = self.remote.prepare
                if config.metrics_address:
                    await tasks.start(serve_metrics, self.metrics, config.metrics_address)
                await self._recover()
                await self.tracer.load()
                tasks.start_soon(self.tracer.run)
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
        """Stop the pulls under way, then remove what starlight created, and nothing else of
        containerd's: containers on the starlight snapshotter (their tasks killed), images
        starlight pulled (when containerd's record still points at what we pulled), the
        snapshots in the starlight snapshotter, the FUSE attachments, and the store's images and
        layers. Returns what was (or would be) removed."""
        assert self.store is not None
        assert self.layers is not None
        assert self.fused is not None
        assert self.snapshotter is not None
        removed: list[str] = []
        # A pull going on would recreate what is removed: stop them first.
        if self.pulls is not None:
            if dry_run:
                removed.extend(f"pull of {pull.options.reference}" for pull in self.pulls.active)
            else:
                removed.extend(f"pull of {ref}" for ref in await self.pulls.stop_all())
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
        if self.tracer is not None:
            views = await self.tracer.release(dry_run=dry_run)
            removed.extend(f"fuse layer {key}" for key in views)
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

    # -- restarts --------------------------------------------------------------------------

    async def _recover(self) -> None:
        """After a start: adopt what the FUSE server still serves, attach what snapshots need,
        and resume interrupted pulls. Idempotent (a first start finds nothing to do)."""
        assert self.layers is not None
        assert self.snapshotter is not None
        snapshots = await self.snapshotter.walk()
        needed = sorted({s.labels[LABEL_LAYER] for s in snapshots if s.labels.get(LABEL_LAYER)})
        try:
            adopted, attached = await self.layers.recover(needed)
        except StarlightError as exc:
            # Not fatal: each layer is attached again when a mount asks for it.
            log.warning("re-attaching FUSE layers after the restart failed: %s", exc)
        else:
            if adopted or attached:
                log.info(
                    "FUSE server still serves %d layers; attached %d more for existing snapshots",
                    len(adopted),
                    len(attached),
                )
        await self._resume_pulls()

    async def _still_wanted(self, options: PullOptions) -> bool:
        """A pull to retry is still wanted while the store records its image (reset removes
        it) and its record is RUNNING; otherwise its record is closed."""
        assert self.store is not None
        store = self.store
        image = await anyio.to_thread.run_sync(
            functools.partial(store.image, str(options.reference), namespace=options.namespace)
        )
        if image is not None:
            return True
        if options.record_id is not None:
            with contextlib.suppress(StarlightError):
                await anyio.to_thread.run_sync(
                    functools.partial(
                        store.finish_pull, options.record_id, error="the image was removed"
                    )
                )
        return False

    async def _resume_pulls(self) -> None:
        """Continue every pull the store recorded as RUNNING (newest per image). One that had
        not reached READY is marked failed: its caller saw the error and pulls again."""
        assert self.store is not None
        assert self.pulls is not None
        store = self.store
        records = await anyio.to_thread.run_sync(store.pulls, PullState.RUNNING)
        seen: set[tuple[str, str]] = set()
        for record in records:  # newest first
            image = await anyio.to_thread.run_sync(
                functools.partial(store.image, record.reference, namespace=record.namespace)
            )
            why = ""
            if (record.reference, record.namespace) in seen:
                why = "superseded by a later pull of the same image"
            elif not record.bundle_id or image is None:
                why = "interrupted by a daemon restart before the image was ready; pull again"
            if why:
                await anyio.to_thread.run_sync(
                    functools.partial(store.finish_pull, record.id, error=why)
                )
                continue
            assert image is not None
            seen.add((record.reference, record.namespace))
            if image.complete:
                await anyio.to_thread.run_sync(store.finish_pull, record.id)
                continue
            log.info(
                "resuming the pull of %s after a restart (%d of %d bytes local)",
                record.reference,
                image.bytes_local,
                image.bytes_total,
            )
            self.metrics.pulls.labels("resumed").inc()
            self.pulls.start(
                PullOptions(
                    reference=Reference.parse(record.reference),
                    platform=Platform.parse(image.platform),
                    namespace=record.namespace,
                    register=False,
                    record_id=record.id,
                )
            )

    async def _reaper(self) -> None:
        assert self.layers is not None
        interval = max(0.2, min(_REAP_INTERVAL, self.config.detach_after / 3))
        while True:
            await anyio.sleep(interval)
            try:
                await self.layers.reap()
            except Exception:
                log.exception("reaping FUSE layers failed")
