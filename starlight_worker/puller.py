"""Pulling an image through the proxy: one bundle, decoded and applied as it streams.

``Pull.run`` asks the proxy for the bundle that turns what the worker holds into the target
image, then:

1. on the header: begins every layer in the store (their trees appear at once, contents
   missing), records the image, writes manifest and config into containerd's content store,
   creates the committed snapshot chain through containerd (our snapshotter provides each
   layer) and the image record — the image is READY: containers can start;
2. on each extent: the chunk is decompressed and verified (no byte reaches a container
   before its digest matched), appended to its content's staging file, and when the content is
   whole its digest is checked and it is placed into every layer that needs it; FUSE readers
   waiting for those files are woken;
3. contents the worker already holds (``header.local``) are copied locally meanwhile;
4. when every layer is complete the image is COMPLETE (steady state: plain overlayfs).

A broken connection is resumed: byte for byte at the same offset of the same bundle when the
proxy still plans the same bundle, else by a new request naming every content already present
(nothing is fetched twice).

Every pull is recorded in the store (``Store.start_pull``): RUNNING until it completes. Once
its image is READY, a failed attempt leaves the record RUNNING (containers may already read
from the image, so the daemon retries it in the background, and resumes it after a restart);
before that the failure is the caller's to see and the record is FAILED. A pull whose store
already holds part of the image (a resume, a retry, a repeated pull) names those contents in
its first request (``have``).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import itertools
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO

import anyio
import attrs
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from starlight_core import oci, wire
from starlight_core.bundle import (
    NEED_DATA,
    BundleHeader,
    BundleReader,
    End,
    Extent,
    Header,
    decompress_extent,
    fill_omitted,
)
from starlight_core.digest import Digest
from starlight_core.errors import (
    BundleProtocolError,
    DigestMismatch,
    NotFound,
    ProxyUnavailable,
    StarlightError,
)
from starlight_core.layer.toc import TOC, LayerInfo
from starlight_core.oci import chain_ids
from starlight_core.platform import Platform
from starlight_core.proxy_client import DeltaRequest, ProxyClient
from starlight_core.reference import Reference
from starlight_worker.containerd import (
    LABEL_GC_CONFIG,
    LABEL_GC_SNAPSHOT,
    ContainerdClient,
    SnapshotLayer,
)
from starlight_worker.layers import LABEL_IMAGE, LABEL_LAYER, StarlightLayers
from starlight_worker.metrics import Metrics
from starlight_worker.store import LayerHandle, Store
from starlight_worker.store.beneath import disk_error
from starlight_worker.store.store import layer_diff_id, layer_key

__all__ = ["Phase", "Pull", "PullOptions", "PullProgress"]

log = logging.getLogger(__name__)

_PROGRESS_INTERVAL = 0.2
_BACKOFF = (0.2, 0.5, 1.0, 2.0, 4.0, 8.0)


class Phase:
    REQUESTED = 1
    READY = 2
    CONTENTS = 3
    COMPLETE = 4


@attrs.frozen
class PullOptions:
    reference: Reference
    platform: Platform
    namespace: str
    ordering: bool = True
    from_refs: tuple[str, ...] | None = None
    """Images to compute the delta from; None lets the daemon choose."""
    register: bool = True
    """Write the image into containerd (content, snapshot chain, image record). False when
    containerd's own client is pulling the image (remote snapshots) and when continuing a pull
    whose image was registered before (a retry, a resume after a restart)."""
    record_id: int | None = None
    """The store's record of the pull this one continues; None records a new pull."""


@attrs.frozen
class PullProgress:
    phase: int
    reference: str
    manifest_digest: str = ""
    bundle_id: str = ""
    from_refs: tuple[str, ...] = ()
    bytes_received: int = 0
    bytes_expected: int = 0
    files_done: int = 0
    files_total: int = 0
    contents_local: int = 0
    elapsed: float = 0.0
    resumes: int = 0
    message: str = ""


@attrs.define
class _Content:
    """A content being received: its staging file and running digest."""

    digest: Digest
    size: int
    path: Path
    file: IO[bytes]
    hasher: hashlib._Hash
    received: int = 0


def _first_error(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The error a task group failed with (its first leaf: the pull's own tasks fail alone)."""
    error: BaseException = group
    while isinstance(error, BaseExceptionGroup):
        error = error.exceptions[0]
    return error


class Pull:
    """One pull of one image; ``run`` it in a task group, watch it with ``subscribe``."""

    def __init__(
        self,
        options: PullOptions,
        *,
        store: Store,
        layers: StarlightLayers,
        proxy: Callable[[], ProxyClient],
        containerd: Callable[[str], ContainerdClient],
        retries: int = 5,
        snapshotter: str = "starlight",
        metrics: Metrics | None = None,
    ) -> None:
        self.options = options
        self.store = store
        self.layers = layers
        self._proxy = proxy
        self._containerd = containerd
        self.retries = retries
        self.snapshotter = snapshotter
        self.metrics = metrics
        self.ready = anyio.Event()
        self.done = anyio.Event()
        self.error: StarlightError | None = None
        self.record_id = options.record_id
        self.usable = False
        """The image reached READY in this pull or before it (a continuation): containers may
        read from it, so a failure is retried in the background rather than given up."""
        self._started = time.monotonic()
        self._progress = PullProgress(Phase.REQUESTED, str(options.reference))
        self._subscribers: list[MemoryObjectSendStream[PullProgress]] = []
        self._last_publish = 0.0
        # Set when the header arrives.
        self._header: BundleHeader | None = None
        self._handles: list[LayerHandle] = []
        self._needs: dict[Digest, list[LayerHandle]] = {}
        self._sizes: dict[Digest, int] = {}
        self._writing: dict[Digest, _Content] = {}
        self._needs_lock = threading.Lock()
        self._bytes = 0
        self._files_done = 0
        self._local = 0
        self._copies_done = anyio.Event()
        self._copies_done.set()
        self._tasks: anyio.abc.TaskGroup

    # -- observation ----------------------------------------------------------------------

    @property
    def progress(self) -> PullProgress:
        return self._progress

    @property
    def header(self) -> BundleHeader | None:
        """The header of the bundle being received (None before it arrived)."""
        return self._header

    def subscribe(self) -> MemoryObjectReceiveStream[PullProgress]:
        send, receive = anyio.create_memory_object_stream[PullProgress](64)
        send.send_nowait(self._progress)
        if self.done.is_set():
            send.close()
        else:
            self._subscribers.append(send)
        return receive

    def _publish(self, *, force: bool = False, **changes: object) -> None:
        self._progress = attrs.evolve(
            self._progress,
            bytes_received=self._bytes,
            files_done=self._files_done,
            contents_local=self._local,
            elapsed=time.monotonic() - self._started,
            **changes,  # type: ignore[arg-type]
        )
        now = time.monotonic()
        if not force and now - self._last_publish < _PROGRESS_INTERVAL:
            return
        self._last_publish = now
        for subscriber in list(self._subscribers):
            # A slow watcher misses an update; it never blocks the pull.
            with contextlib.suppress(
                anyio.WouldBlock, anyio.BrokenResourceError, anyio.ClosedResourceError
            ):
                subscriber.send_nowait(self._progress)

    def _close_subscribers(self) -> None:
        for subscriber in self._subscribers:
            subscriber.close()
        self._subscribers.clear()

    # -- the pull -------------------------------------------------------------------------

    async def run(self) -> None:
        outcome = ""
        try:
            try:
                await self._record_start()
                async with anyio.create_task_group() as tasks:
                    self._tasks = tasks
                    await self._run()
            except BaseExceptionGroup as group:
                raise _first_error(group) from group
            outcome = "complete"
            await self._record_end(None)
            self._publish(force=True, phase=Phase.COMPLETE, message="complete")
        except StarlightError as exc:
            self.error = exc
            self._publish(force=True, message=f"failed: {exc}")
            log.warning("pull of %s failed: %s", self.options.reference, exc)
        except Exception as exc:  # never let a bug leave watchers waiting forever
            self.error = StarlightError(f"pull of {self.options.reference} failed: {exc!r}")
            log.exception("pull of %s failed", self.options.reference)
        finally:
            self._discard_partial()
            if self.error is not None:
                outcome = "retrying" if self.usable else "failed"
                with anyio.CancelScope(shield=True):
                    await self._record_end(self.error)
            if self.metrics is not None and outcome:  # not when cancelled (daemon stopping)
                self.metrics.pulls.labels(outcome).inc()
            self.ready.set()
            self.done.set()
            self._close_subscribers()

    async def _record_start(self) -> None:
        if self.record_id is None:
            record = await anyio.to_thread.run_sync(
                lambda: self.store.start_pull(
                    str(self.options.reference), namespace=self.options.namespace
                )
            )
            self.record_id = record.id
        else:
            # A continuation: its image was READY before (the record names its bundle).
            self.usable = True

    async def _record_end(self, error: StarlightError | None) -> None:
        """DONE on success; FAILED if it failed before READY; else it stays RUNNING (it is
        retried, and resumed after a restart)."""
        record_id = self.record_id
        if record_id is None or (error is not None and self.usable):
            return
        try:
            await anyio.to_thread.run_sync(
                lambda: self.store.finish_pull(record_id, error=str(error) if error else None)
            )
        except StarlightError as exc:  # the store is closing, or the disk is full
            log.warning("pull of %s: cannot record its end: %s", self.options.reference, exc)

    def _discard_partial(self) -> None:
        """Forget contents received in part (a new bundle sends them again from the start)."""
        for content in self._writing.values():
            content.file.close()
            with contextlib.suppress(OSError):
                os.unlink(str(content.path))
        self._writing.clear()

    def _from_refs(self) -> tuple[tuple[str, ...], tuple[Digest, ...]]:
        """The images to name as held (newest of the same repository first), and the
        diff_ids of their layers: the store has their TOCs, the header need not carry them."""
        held = [image for image in self.store.images() if image.complete]
        if self.options.from_refs is not None:
            refs = list(self.options.from_refs)
        else:
            target = self.options.reference
            same = [i.reference for i in held if Reference.parse(i.reference).name == target.name]
            others = [i.reference for i in held if Reference.parse(i.reference).name != target.name]
            refs = [r for r in same + others if r != str(target)][:32]
        named = set(refs)
        keys = {key for image in held if image.reference in named for key in image.layers}
        tocs = [layer_diff_id(key) for key in sorted(keys)]
        return tuple(refs), tuple(tocs)

    def _held_toc(self, layer: LayerInfo) -> TOC:
        return self.store.open_layer(layer_key(layer.diff_id)).toc

    async def _run(self) -> None:
        from_refs, tocs = await anyio.to_thread.run_sync(self._from_refs)
        self._publish(force=True, from_refs=from_refs)
        reader: BundleReader | None = None
        header_size = 0
        resumes = 0
        have = await anyio.to_thread.run_sync(self._held_of_target)
        if have:
            log.info(
                "pull of %s: %d of its contents are already in the store; asking for the rest",
                self.options.reference,
                len(have),
            )
        use_from = True
        while True:
            exact = reader is not None and reader.header is not None and header_size > 0
            request = DeltaRequest(
                to=(str(self.options.reference),),
                from_=from_refs if use_from else (),
                platform=str(self.options.platform),
                have=have,
                offset=reader.offset if exact and reader is not None else 0,
                bundle_id=self._header.bundle_id if exact and self._header else None,
                ordering=self.options.ordering,
                tocs=tocs if use_from else (),
            )
            try:
                async with self._proxy() as proxy, proxy.delta(request) as stream:
                    if exact and reader is not None and self._header is not None:
                        reader = BundleReader.resume(
                            self._header,
                            header_size=header_size,
                            offset=reader.offset,
                            partial=reader.pending,
                        )
                    else:
                        reader = BundleReader()
                    async for chunk in stream:
                        self._bytes += len(chunk)
                        if self.metrics is not None:
                            self.metrics.bundle_bytes.inc(len(chunk))
                        reader.receive_data(chunk)
                        header_size = await self._drain(reader, header_size)
                    reader.receive_data(b"")
                    header_size = await self._drain(reader, header_size)
            except (ProxyUnavailable, BundleProtocolError, DigestMismatch) as exc:
                resumes += 1
                if self.metrics is not None:
                    self.metrics.pull_resumes.labels(exc.code).inc()
                if resumes > self.retries:
                    raise
                log.info("pull of %s interrupted (%s); resuming", self.options.reference, exc)
                self._publish(force=True, resumes=resumes, message=f"resuming: {exc}")
                if isinstance(exc, DigestMismatch | BundleProtocolError):
                    reader = None  # start a new bundle naming what we hold
                    self._discard_partial()
                    have, use_from = await self._present(), False
                await anyio.sleep(_BACKOFF[min(resumes - 1, len(_BACKOFF) - 1)])
                continue
            except StarlightError as exc:
                if exc.code == "bundle_changed" and reader is not None:
                    reader = None
                    self._discard_partial()
                    have, use_from = await self._present(), False
                    continue
                raise
            if await self._finished():
                return
            # The bundle ended but something is still missing (a local copy could not be
            # made): ask for exactly what is missing, naming everything we hold.
            resumes += 1
            if resumes > self.retries:
                raise StarlightError(
                    f"pull of {self.options.reference}: contents still missing after the bundle"
                )
            reader = None
            self._discard_partial()
            have, use_from = await self._present(), False

    def _held_of_target(self) -> tuple[Digest, ...]:
        """Contents of the target the store holds already, when it recorded the image before
        (a pull resumed after a restart, retried, or repeated): named in the first request so
        that none travels twice. Opening the layers reconciles the store with the disk (after
        a crash the database may lag behind the files placed)."""
        image = self.store.image(str(self.options.reference), namespace=self.options.namespace)
        if image is None:
            return ()
        wanted: set[Digest] = set()
        for key in image.layers:
            try:
                handle = self.store.open_layer(key)
            except NotFound:
                continue
            wanted.update(e.digest for e in handle.toc.entries if e.has_content and e.digest)
        return tuple(sorted(self.store.contents_present(wanted)))

    async def _present(self) -> tuple[Digest, ...]:
        wanted = list(self._sizes)
        present = await anyio.to_thread.run_sync(self.store.contents_present, wanted)
        return tuple(sorted(present))

    async def _drain(self, reader: BundleReader, header_size: int) -> int:
        extents: list[Extent] = []
        while True:
            event = reader.next_event()
            if event is NEED_DATA:
                break
            if isinstance(event, Header):
                if extents:
                    await self._apply(extents)
                    extents = []
                await self._on_header(event.header)
                header_size = event.size
            elif isinstance(event, Extent):
                extents.append(event)
            elif isinstance(event, End):
                break
        if extents:
            await self._apply(extents)
        return header_size

    # -- the header ------------------------------------------------------------------------

    async def _on_header(self, header: BundleHeader) -> None:
        if not header.images:
            raise BundleProtocolError("the bundle names no image")
        marks, omitted = [time.monotonic()], len(header.omitted)
        header = await anyio.to_thread.run_sync(fill_omitted, header, self._held_toc)
        marks.append(time.monotonic())
        image = header.images[0]
        self._header = header
        # Base first, each on the layers below it (nearest first): implied directories take
        # their metadata from those, as containerd's applier does.
        begun: dict[int, LayerHandle] = {}
        for position, index in enumerate(image.layers):
            lower = [begun[i].key for i in reversed(image.layers[:position])]
            begun[index] = await anyio.to_thread.run_sync(
                functools.partial(self.store.begin_layer, header.layers[index], lower=lower)
            )
        for index, toc in enumerate(header.layers):
            if index not in begun:
                begun[index] = await anyio.to_thread.run_sync(self.store.begin_layer, toc)
        handles = [begun[i] for i in range(len(header.layers))]
        for handle in handles:
            handle.defer_sync = True  # one database write per batch of extents, not per file
        self._handles = handles
        # The container's mounts will need the incomplete layers served by FUSE: have the
        # FUSE server load them now, while the image is registered and the container created.
        receiving = [handles[i].key for i in image.layers if not handles[i].complete]
        self._tasks.start_soon(self._attach_early, receiving)
        self._needs = {}
        self._sizes = {}
        files_total = 0
        for handle in handles:
            for digest, names in (await anyio.to_thread.run_sync(handle.missing)).items():
                self._needs.setdefault(digest, []).append(handle)
                files_total += len(names)
        for toc in header.layers:
            for entry in toc.entries:
                if entry.has_content and entry.digest is not None:
                    self._sizes[entry.digest] = entry.size
        layer_keys = [handles[i].key for i in image.layers]
        await anyio.to_thread.run_sync(
            lambda: self.store.record_image(
                reference=str(self.options.reference),
                manifest_digest=image.manifest_digest,
                config_digest=image.config_digest,
                platform=image.platform,
                namespace=self.options.namespace,
                layers=layer_keys,
                manifest=image.manifest.encode(),
                config=image.config.encode(),
            )
        )
        marks.append(time.monotonic())
        if self.options.register and not self.usable:
            await self._register_in_containerd(header)
        marks.append(time.monotonic())
        log.info(
            "pull of %s: header (%d layers, %d omitted, %d extents) in place in %.0f ms "
            "(file lists %.0f, store %.0f, containerd %.0f)",
            self.options.reference,
            len(header.layers),
            omitted,
            len(header.extents),
            *(1000 * (b - a) for a, b in ((marks[0], marks[-1]), *itertools.pairwise(marks))),
        )
        expected = sum(e.compressed_size for e in header.extents)
        self._publish(
            force=True,
            phase=Phase.READY,
            manifest_digest=image.manifest_digest,
            bundle_id=header.bundle_id,
            bytes_expected=expected,
            files_total=files_total,
        )
        self.usable = True
        if self.record_id is not None:
            record_id = self.record_id
            await anyio.to_thread.run_sync(
                lambda: self.store.update_pull(
                    record_id, bundle_id=header.bundle_id, bytes_received=self._bytes
                )
            )
        self.ready.set()
        if header.local:
            # Copy what we hold while the stream goes on (a task: copies must not stall it).
            self._copies_done = anyio.Event()
            self._tasks.start_soon(self._copy_local_task, list(header.local), self._copies_done)
        await self._complete_layers()

    async def _attach_early(self, keys: list[str]) -> None:
        for key in keys:
            try:
                await self.layers.attach(key)
            except (StarlightError, OSError) as exc:
                # Only a head start: the snapshot's mount attaches it, or says why it cannot.
                log.info("pull of %s: %s not attached early: %s", self.options.reference, key, exc)
                return

    async def _copy_local_task(self, digests: list[Digest], done: anyio.Event) -> None:
        try:
            for start in range(0, len(digests), 256):
                batch = digests[start : start + 256]
                arrived = await anyio.to_thread.run_sync(self._copy_local, batch)
                await self._notify(arrived)
                await self._complete_layers()
                self._publish(phase=Phase.CONTENTS)
        finally:
            done.set()

    def _copy_local(self, digests: Sequence[Digest]) -> list[tuple[str, list[str]]]:
        arrived: list[tuple[str, list[str]]] = []
        for digest in digests:
            with self._needs_lock:
                handles = self._needs.pop(digest, [])
            for handle in handles:
                try:
                    names = handle.copy_local(digest)
                except StarlightError as exc:
                    log.info("local copy of %s failed (%s); it will be fetched", digest, exc)
                    with self._needs_lock:
                        self._needs.setdefault(digest, []).append(handle)
                    continue
                if names:
                    self._files_done += len(names)
                    self._local += 1
                    arrived.append((handle.key, names))
        for handle in {id(h): h for h in self._handles}.values():
            handle.sync()
        return arrived

    async def _register_in_containerd(self, header: BundleHeader) -> None:
        image = header.images[0]
        config = wire.loads(image.config.encode(), oci.ImageConfig, "image config")
        chain = chain_ids(config.rootfs.diff_ids)
        layer_keys = [self._handles[i].key for i in image.layers]
        if len(chain) != len(layer_keys):
            raise BundleProtocolError(
                f"image {image.reference}: {len(layer_keys)} layers but {len(chain)} diff_ids"
            )
        labels = {
            LABEL_IMAGE: str(self.options.reference),
        }
        async with self._containerd(self.options.namespace) as ctrd, ctrd.lease():
            await ctrd.write_content(
                image.config_digest,
                image.config.encode(),
                {LABEL_GC_SNAPSHOT.format(snapshotter=self.snapshotter): str(chain[-1])},
            )
            await ctrd.write_content(
                image.manifest_digest,
                image.manifest.encode(),
                {LABEL_GC_CONFIG: str(image.config_digest)},
            )
            await ctrd.prepare_chain(
                [
                    SnapshotLayer(chain_id, {**labels, LABEL_LAYER: key})
                    for chain_id, key in zip(chain, layer_keys, strict=True)
                ]
            )
            await ctrd.set_image(
                str(self.options.reference),
                image.manifest_media_type,
                image.manifest_digest,
                len(image.manifest.encode()),
            )

    # -- extents ---------------------------------------------------------------------------

    async def _apply(self, extents: list[Extent]) -> None:
        arrived: list[tuple[str, list[str]]] = []
        try:
            await anyio.to_thread.run_sync(self._write_extents, extents, arrived)
        except StarlightError:
            # What was placed before a bad extent is there: wake its readers all the same.
            with contextlib.suppress(StarlightError):
                await self._notify(arrived)
            raise
        await self._notify(arrived)
        await self._complete_layers()
        self._publish(phase=Phase.CONTENTS)

    def _write_extents(self, extents: list[Extent], arrived: list[tuple[str, list[str]]]) -> None:
        """Decompress, verify and place ``extents``; what got placed goes to ``arrived`` (also
        when a later extent fails), and the store's database hears of it before returning, so
        that a resume names it (``have``)."""
        try:
            self._write_extents_to_disk(extents, arrived)
        except OSError as exc:  # staging: a full disk is ResourceExhausted, said plainly
            raise disk_error(exc, f"pull of {self.options.reference}: receiving contents") from exc
        finally:
            for handle in {id(h): h for h in self._handles}.values():
                with contextlib.suppress(StarlightError):
                    handle.sync()

    def _write_extents_to_disk(
        self, extents: list[Extent], arrived: list[tuple[str, list[str]]]
    ) -> None:
        for extent in extents:
            descriptor = extent.descriptor
            data = decompress_extent(descriptor, extent.compressed)
            content = self._writing.get(descriptor.content)
            if content is None:
                if descriptor.offset != 0:
                    raise BundleProtocolError(
                        f"content {descriptor.content}: chunk at offset {descriptor.offset} "
                        "arrived before its first chunk"
                    )
                path = self.store.staging_file()
                content = _Content(
                    digest=descriptor.content,
                    size=self._sizes.get(descriptor.content, descriptor.size),
                    path=path,
                    file=open(path, "wb"),  # noqa: SIM115 - closed when the content completes
                    hasher=hashlib.sha256(),
                )
                self._writing[descriptor.content] = content
            elif descriptor.offset != content.received:
                raise BundleProtocolError(
                    f"content {descriptor.content}: chunk at offset {descriptor.offset}, "
                    f"expected {content.received}"
                )
            content.file.write(data)
            content.hasher.update(data)
            content.received += len(data)
            if content.received >= content.size:
                arrived.extend(self._finish_content(content))

    def _finish_content(self, content: _Content) -> list[tuple[str, list[str]]]:
        del self._writing[content.digest]
        content.file.close()
        actual = "sha256:" + content.hasher.hexdigest()
        path = content.path
        if actual != content.digest or content.received != content.size:
            os.unlink(str(path))
            raise DigestMismatch(
                f"content {content.digest}: received {content.received} bytes hashing to {actual}"
            )
        with self._needs_lock:
            handles = self._needs.pop(content.digest, [])
        arrived: list[tuple[str, list[str]]] = []
        try:
            for i, handle in enumerate(handles):
                names = handle.place(content.digest, path, keep=i < len(handles) - 1)
                self._files_done += len(names)
                arrived.append((handle.key, names))
        except BaseException:
            # A failed placement (a full disk) leaves the staged file for a retry; this pull
            # will not retry it (the next bundle sends the content again): do not leak it.
            with self._needs_lock:
                self._needs.setdefault(content.digest, []).extend(handles[len(arrived) :])
            with contextlib.suppress(OSError):
                os.unlink(str(path))
            raise
        if not handles:
            os.unlink(str(path))
        return arrived

    async def _notify(self, arrived: list[tuple[str, list[str]]]) -> None:
        by_layer: dict[str, list[str]] = {}
        for key, names in arrived:
            by_layer.setdefault(key, []).extend(names)
        for key, names in by_layer.items():
            await self.layers.arrived(key, names)

    async def _complete_layers(self) -> None:
        for handle in self._handles:
            if not handle.finalized and handle.complete:
                await anyio.to_thread.run_sync(handle.finalize)

    async def _finished(self) -> bool:
        await self._copies_done.wait()
        await self._complete_layers()
        if all(handle.finalized for handle in self._handles):
            await anyio.to_thread.run_sync(
                lambda: self.store.mark_image_complete(
                    str(self.options.reference), namespace=self.options.namespace
                )
            )
            return True
        return False
