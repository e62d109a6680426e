"""Delta bundles: plan one from the store, then stream it from the registry.

``BundlePlanner.prepare(request)`` resolves the target and ``from`` images, asks the store which
of the target's contents the worker already holds, plans the bundle (``starlight_core.delta``)
and encodes its header; ``stream_bundle`` then produces the stream from any offset.

Contents are read with HTTP Range requests, one per ``RangeRead`` of ``delta.coalesce``
(neighbouring extents of one blob merged), a bounded number in flight and a bounded number of
bytes fetched ahead, consumed in plan order. Each range is checked in a worker thread before a
byte of it is sent: every extent must inflate to exactly its chunk (``decompress_extent``). A
mismatch ends the stream with an ERROR record after the last good extent; so does a registry
that keeps failing after the client's retries. Memory is bounded by the fetch-ahead budget
plus one range, whatever the image size.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Final

import anyio.to_thread
import attrs

from starlight_core.bundle import (
    BundleHeader,
    BundleLayout,
    ExtentDescriptor,
    ImageInfo,
    decompress_extent,
    encode_end,
    encode_error,
    encode_extent,
    start_bundle,
)
from starlight_core.delta import (
    DeltaPlan,
    PlannedExtent,
    PlanOptions,
    RangeRead,
    Target,
    coalesce,
    plan,
)
from starlight_core.digest import Digest
from starlight_core.errors import (
    BundleChanged,
    DigestMismatch,
    FailedPrecondition,
    ImageNotFound,
    InvalidInput,
    InvalidPlatform,
    NotFound,
    RegistryError,
    RegistryNotServed,
    StarlightError,
)
from starlight_core.platform import Platform
from starlight_core.proxy_client import DeltaRequest
from starlight_core.reference import Reference
from starlight_proxy.config import ProxyConfig
from starlight_proxy.metrics import Metrics
from starlight_proxy.notify import Indexer
from starlight_proxy.store import ImageRecord, ImageState, MetadataStore
from starlight_proxy.upstream import Upstream, Upstreams

__all__ = ["BundlePlanner", "PreparedBundle", "StreamOptions", "stream_bundle"]

log = logging.getLogger(__name__)

_FLUSH: Final = 1 << 20
"""Small records are sent in pieces of about this size: fewer writes for 100,000 tiny files."""


@attrs.frozen
class StreamOptions:
    ranges_in_flight: int = 4
    buffer_bytes: int = 48 * 1024 * 1024
    max_range: int = 8 * 1024 * 1024
    max_gap: int = 64 * 1024

    @classmethod
    def of(cls, config: ProxyConfig) -> StreamOptions:
        return cls(config.ranges_in_flight, config.buffer_bytes, config.max_range, config.max_gap)


@attrs.frozen
class PreparedBundle:
    """What streaming a planned bundle needs, and no more: the encoded header and the extents.

    The TOCs are dropped once the header is encoded (100,000 entries weigh more than their
    JSON), so a long stream holds only its extent table.
    """

    bundle_id: str
    header_bytes: bytes = attrs.field(repr=lambda data: f"<{len(data)} bytes>")
    layout: BundleLayout
    extents: tuple[PlannedExtent, ...]
    """Where each EXTENT record's bytes are in the layer blobs, in stream order."""
    descriptors: tuple[ExtentDescriptor, ...]
    """What each must inflate to (the header's view)."""
    local: int
    """Contents the worker copies from what it holds."""
    sources: tuple[Upstream, ...]
    """Per plan layer: the registry and repository to read the blob from."""
    offset: int = 0
    """Where the response starts (a byte resume)."""


class BundlePlanner:
    def __init__(
        self,
        store: MetadataStore,
        upstreams: Upstreams,
        indexer: Indexer,
        metrics: Metrics,
        *,
        auto_notify: bool = False,
    ) -> None:
        self._store = store
        self._upstreams = upstreams
        self._indexer = indexer
        self._metrics = metrics
        self._auto_notify = auto_notify

    async def prepare(self, request: DeltaRequest) -> PreparedBundle:
        # All input is checked before any lookup: a malformed request is always a 400.
        explicit = _platform(request.platform)
        platform = explicit or Platform.host()
        wanted = [Reference.parse(text) for text in request.to]
        held_images = [Reference.parse(text) for text in request.from_]
        targets: list[tuple[Reference, ImageRecord]] = []
        for reference in wanted:
            image = await self._target(reference, explicit, platform)
            if all(image.id != other.id for _, other in targets):
                targets.append((reference, image))
        holders = await self._holders(held_images, explicit, platform)

        start = time.monotonic()
        metas = [await self._store.load_image(image.id) for _, image in targets]
        held: set[str] = set(request.have)
        if holders:
            for _, image in targets:
                held |= await self._store.shared_contents(image.id, holders)
        ranks = await self._ranks([image.id for _, image in targets], request.ordering)
        plan_targets = [
            Target(layers=meta.tocs, ranks=ranks.get(image.id, {}))
            for meta, (_, image) in zip(metas, targets, strict=True)
        ]

        def compute() -> tuple[DeltaPlan, BundleHeader, bytes]:
            delta = plan(plan_targets, held, PlanOptions(ordering=request.ordering))
            images = [
                ImageInfo(
                    reference=str(reference),
                    manifest_digest=image.digest,
                    manifest_media_type=image.manifest_media_type or "",
                    manifest=_text(meta.manifest, "manifest", image),
                    config_digest=_config_digest(image),
                    config=_text(meta.config, "config", image),
                    platform=str(image.platform),
                    layers=layers,
                )
                for (reference, image), meta, layers in zip(
                    targets, metas, delta.targets, strict=True
                )
            ]
            header, header_bytes = start_bundle(
                delta, images, resume=request.resumes, omit=request.tocs
            )
            return delta, header, header_bytes

        delta, header, header_bytes = await anyio.to_thread.run_sync(compute)
        self._metrics.plan_seconds.observe(time.monotonic() - start)
        layout = BundleLayout.of(header, len(header_bytes))
        if request.bundle_id is not None and request.bundle_id != header.bundle_id:
            raise BundleChanged(
                f"bundle {request.bundle_id[:12]} cannot be resumed: the proxy now plans bundle "
                f"{header.bundle_id[:12]} for this request"
            )
        if request.offset > layout.total:
            raise InvalidInput(
                f"offset {request.offset} is past the end of bundle {header.bundle_id[:12]} "
                f"({layout.total} bytes)"
            )
        # Each layer's blob is read from the repository of the first target that lists it.
        owner: dict[int, Upstream] = {}
        for (_, image), layers in zip(targets, delta.targets, strict=True):
            upstream = self._upstreams.resolve(Reference.parse(image.name))
            for layer in layers:
                owner.setdefault(layer, upstream)
        return PreparedBundle(
            bundle_id=header.bundle_id,
            header_bytes=header_bytes,
            layout=layout,
            extents=delta.extents,
            descriptors=header.extents,
            local=len(header.local),
            sources=tuple(owner[i] for i in range(len(delta.layers))),
            offset=request.offset,
        )

    async def _ranks(self, image_ids: list[int], ordering: bool) -> dict[int, dict[str, float]]:
        """The start-up order of each target: its own ranking; for several targets, the joint
        ranking of the group that ranks most of them together (ties: the first name), with the
        files only their own rankings know after every jointly ranked one."""
        if not ordering:
            return {}
        own = await self._store.get_ranks(image_ids)
        if len(image_ids) < 2:
            return own
        groups = await self._store.ranked_groups(image_ids)
        chosen = min(groups.items(), key=lambda item: (-len(item[1]), item[0]), default=None)
        if chosen is None or len(chosen[1]) < 2:
            return own
        group, members = chosen
        joint = await self._store.get_ranks(sorted(members), group=group)
        after = 1 + max((rank for r in joint.values() for rank in r.values()), default=-1)
        log.debug("delta: joint start-up order of group %s for images %s", group, sorted(members))
        return {
            image_id: {
                **{path: after + rank for path, rank in own.get(image_id, {}).items()},
                **joint.get(image_id, {}),
            }
            for image_id in image_ids
        }

    async def _find(
        self, reference: Reference, explicit: Platform | None, platform: Platform
    ) -> ImageRecord:
        if reference.digest is not None:
            # A manifest digest names one platform already; an index digest needs one.
            return await self._store.find_image(
                reference.name, digest=reference.digest, platform=explicit
            )
        return await self._store.find_image(reference.name, tag=reference.tag, platform=platform)

    async def _target(
        self, reference: Reference, explicit: Platform | None, platform: Platform
    ) -> ImageRecord:
        self._upstreams.check(reference)
        try:
            image = await self._find(reference, explicit, platform)
        except ImageNotFound:
            if not self._auto_notify:
                raise
            await self._indexer.notify(reference, platform=platform)
            image = await self._find(reference, explicit, platform)
        if image.state is ImageState.INDEXING:
            raise FailedPrecondition(
                f"image {reference} is being indexed", hint="retry when its notify has finished"
            )
        if image.state is ImageState.FAILED:
            raise FailedPrecondition(
                f"indexing image {reference} failed: {image.error}",
                hint="fix the image and notify again",
            )
        return image

    async def _holders(
        self, references: Sequence[Reference], explicit: Platform | None, platform: Platform
    ) -> list[int]:
        """The images the worker holds that the proxy knows; others are skipped (the worker
        may hold images this proxy never indexed)."""
        holders: list[int] = []
        for reference in references:
            try:
                self._upstreams.check(reference)
                image = await self._find(reference, explicit, platform)
            except (ImageNotFound, RegistryNotServed) as exc:
                log.info("delta: ignoring unknown from-image %s: %s", reference, exc.message)
                continue
            if image.ready:
                holders.append(image.id)
            else:
                log.info("delta: ignoring from-image %s: %s", reference, image.state.value)
        return holders


def _platform(text: str | None) -> Platform | None:
    if text is None:
        return None
    if not isinstance(text, str):
        raise InvalidPlatform("platform must be a string such as linux/amd64")
    return Platform.parse(text)


def _text(data: bytes, what: str, image: ImageRecord) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise StarlightError(
            f"the stored {what} of {image.name}@{image.digest} is not UTF-8"
        ) from exc


def _config_digest(image: ImageRecord) -> Digest:
    if image.config_digest is None:
        raise StarlightError(f"image {image.name}@{image.digest} is ready without a config")
    return image.config_digest


# --- streaming ------------------------------------------------------------------------------


@attrs.frozen
class _Checked:
    """One range, checked: the extents that passed, and why the next one did not."""

    pieces: list[memoryview]
    error: StarlightError | None


async def _prefetch(
    ranges: Sequence[RangeRead],
    fetch: Callable[[RangeRead], Awaitable[_Checked]],
    *,
    in_flight: int,
    buffer_bytes: int,
) -> AsyncIterator[tuple[RangeRead, _Checked]]:
    """Fetch ``ranges`` ahead (at most ``in_flight`` at once and ``buffer_bytes`` waiting),
    yielding them in order."""
    pending: deque[tuple[RangeRead, asyncio.Task[_Checked]]] = deque()
    buffered = 0
    launched = 0

    def launch() -> None:
        nonlocal buffered, launched
        while launched < len(ranges) and len(pending) < in_flight:
            next_range = ranges[launched]
            if pending and buffered + next_range.length > buffer_bytes:
                return
            pending.append((next_range, asyncio.ensure_future(fetch(next_range))))
            buffered += next_range.length
            launched += 1

    try:
        launch()
        while pending:
            current, task = pending.popleft()
            checked = await task
            buffered -= current.length
            launch()
            yield current, checked
    finally:
        for _, task in pending:
            task.cancel()
        if pending:
            await asyncio.gather(*(task for _, task in pending), return_exceptions=True)


def _check_range(
    data: bytes,
    read: RangeRead,
    first: int,
    extents: Sequence[PlannedExtent],
    descriptors: Sequence[ExtentDescriptor],
) -> _Checked:
    """Cut a range into its extents and verify each (runs in a worker thread)."""
    view = memoryview(data)
    pieces: list[memoryview] = []
    for k in range(read.count):
        index = first + read.first + k
        chunk = extents[index].chunk
        start = chunk.compressed_offset - read.offset
        piece = view[start : start + chunk.compressed_size]
        try:
            decompress_extent(descriptors[index], piece)  # type: ignore[arg-type]
        except DigestMismatch as exc:
            return _Checked(pieces, exc)
        pieces.append(piece)
    return _Checked(pieces, None)


async def stream_bundle(
    prepared: PreparedBundle, options: StreamOptions, metrics: Metrics
) -> AsyncIterator[bytes]:
    """The bundle stream from ``prepared.offset`` on; failures become an ERROR record."""
    layout, extents, descriptors = prepared.layout, prepared.extents, prepared.descriptors
    position = layout.locate(prepared.offset)
    skip = position.skip
    first = position.index
    outcome = "cancelled"
    sent = 0
    parts: list[bytes] = []
    size = 0

    def flush() -> bytes:
        nonlocal parts, size, sent
        data = parts[0] if len(parts) == 1 else b"".join(parts)
        parts, size = [], 0
        sent += len(data)
        return data

    async def fetch(read: RangeRead) -> _Checked:
        source = prepared.sources[read.layer]
        try:
            data = await source.client.read_range(
                source.reference, read.blob, read.offset, read.length
            )
        except NotFound as exc:
            raise RegistryError(
                f"blob {read.blob} of {source.reference.name} is gone from the registry ({exc})"
            ) from exc
        metrics.range_reads.inc()
        metrics.registry_bytes.labels("bundle").inc(len(data))
        return await anyio.to_thread.run_sync(_check_range, data, read, first, extents, descriptors)

    try:
        if position.record == "done":
            outcome = "complete"  # the worker has it all but did not see the end: nothing left
            return
        if position.record == "header":
            yield prepared.header_bytes[skip:]
            sent += len(prepared.header_bytes) - skip
            skip = 0
        ranges = coalesce(extents[first:], max_gap=options.max_gap, max_size=options.max_range)
        try:
            async for read, checked in _prefetch(
                ranges,
                fetch,
                in_flight=options.ranges_in_flight,
                buffer_bytes=options.buffer_bytes,
            ):
                for k, piece in enumerate(checked.pieces):
                    record = encode_extent(first + read.first + k, piece)  # type: ignore[arg-type]
                    if skip:
                        record, skip = record[skip:], 0
                    parts.append(record)
                    size += len(record)
                    metrics.extents.inc()
                    if size >= _FLUSH:
                        yield flush()
                if checked.error is not None:
                    metrics.digest_mismatches.inc()
                    source = prepared.sources[read.layer]
                    raise DigestMismatch(
                        f"layer {read.blob} of {source.reference.name}: the registry's bytes do "
                        f"not match the TOC ({checked.error.message}); the blob in the registry "
                        "is corrupt or the proxy's index is stale"
                    )
            parts.append(encode_end(len(descriptors), layout.end_start)[skip:])
            yield flush()
            outcome = "complete"
        except StarlightError as exc:
            outcome = "error"
            log.warning("bundle %s failed: %s", prepared.bundle_id[:12], exc)
            parts.append(encode_error(exc))
            yield flush()
        except Exception as exc:
            outcome = "error"
            log.exception("bundle %s failed", prepared.bundle_id[:12])
            parts.append(encode_error(StarlightError(f"internal error in the proxy: {exc!r}")))
            yield flush()
    finally:
        metrics.bundles.labels(outcome).inc()
        metrics.bundle_bytes.inc(sent)
