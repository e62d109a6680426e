"""Notify: index an image's layers into the metadata store, once.

For each selected manifest, every layer not already stored is streamed from the registry once
through ``LayerScanner`` (in a worker thread: decompressing and hashing is CPU work), which
rebuilds its TOC and checks that it is in Starlight format; its blob digest and diff_id are
checked against the manifest and the image config before the TOC is stored. The image becomes
ready atomically with its manifest, config and layer list.

Concurrent notifies of one image do the work once: within a process they share one task;
across processes (replicas on one PostgreSQL) the store's claim decides who indexes, and the
others wait for the winner's result.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Coroutine, Iterable
from typing import Any, Final

import anyio.to_thread
import attrs

from starlight_core import oci, wire
from starlight_core.digest import Digest
from starlight_core.errors import (
    CorruptLayer,
    DigestMismatch,
    FailedPrecondition,
    ImageNotFound,
    InvalidInput,
    NotFound,
    NotStarlightFormat,
    RegistryError,
    StarlightError,
)
from starlight_core.layer.scan import MARKER_PREFIX_SIZE, LayerScanner, is_starlight_prefix
from starlight_core.layer.toc import TOC
from starlight_core.platform import Platform
from starlight_core.reference import Reference
from starlight_core.registry import ManifestResponse
from starlight_proxy.metrics import Metrics
from starlight_proxy.store import (
    DEFAULT_CLAIM_TIMEOUT,
    ImageRecord,
    ImageState,
    IndexClaim,
    MetadataStore,
)
from starlight_proxy.upstream import Upstream, Upstreams

__all__ = ["Indexer", "NotifyOutcome"]

log = logging.getLogger(__name__)

_SCAN_BATCH: Final = 1 << 20
"""Bytes handed to the scanner thread at once: fewer thread hops, bounded memory."""
_WAIT_INTERVAL: Final = 0.2
_CONVERT_ADVICE: Final = "convert it first: ctr-starlight convert SOURCE DESTINATION"


@attrs.frozen
class NotifyOutcome:
    images: tuple[ImageRecord, ...]
    layers_scanned: int
    layers_known: int
    seconds: float


@attrs.frozen
class _Manifest:
    """One manifest to index, with its platform and where it was selected from."""

    response: ManifestResponse
    manifest: oci.Manifest
    platform: Platform | None
    """From the index descriptor; ``None`` (a lone manifest): from the config."""
    index_digest: Digest | None


@attrs.frozen
class _Indexed:
    image: ImageRecord
    scanned: int
    known: int


class Indexer:
    def __init__(
        self,
        store: MetadataStore,
        upstreams: Upstreams,
        metrics: Metrics,
        *,
        jobs: int = 3,
        claim_timeout: float = DEFAULT_CLAIM_TIMEOUT,
    ) -> None:
        self._store = store
        self._upstreams = upstreams
        self._metrics = metrics
        self._jobs = jobs
        self._claim_timeout = claim_timeout
        self._tasks: dict[tuple[str, Digest, str], asyncio.Task[_Indexed]] = {}

    async def notify(
        self,
        reference: Reference,
        *,
        platform: Platform | None = None,
        all_platforms: bool = False,
    ) -> NotifyOutcome:
        """Index ``reference`` (the manifest it names, or the manifests an index holds for
        ``platform`` — default the proxy's own — or for every platform)."""
        if all_platforms and platform is not None:
            raise InvalidInput("give a platform or all_platforms, not both")
        start = time.monotonic()
        outcome = "error"
        try:
            upstream = self._upstreams.resolve(reference)
            manifests = await self._manifests(upstream, platform, all_platforms)
            results = [
                await self._shared(reference, upstream, manifest, platform)
                for manifest in manifests
            ]
            outcome = "ok"
        finally:
            self._metrics.notify_seconds.labels(outcome).observe(time.monotonic() - start)
        return NotifyOutcome(
            images=tuple(r.image for r in results),
            layers_scanned=sum(r.scanned for r in results),
            layers_known=sum(r.known for r in results),
            seconds=time.monotonic() - start,
        )

    async def _manifests(
        self, upstream: Upstream, platform: Platform | None, all_platforms: bool
    ) -> list[_Manifest]:
        response = await upstream.client.get_manifest(upstream.reference)
        if response.media_type in oci.INDEX_MEDIA_TYPES:
            index = wire.loads(response.data, oci.Index, "image index")
            chosen = oci.select_manifests(
                index, [platform] if platform else None, all_platforms=all_platforms
            )
            manifests = []
            for descriptor in chosen:
                child = await upstream.client.get_manifest(
                    upstream.reference.with_digest(descriptor.digest)
                )
                described = descriptor.platform
                manifests.append(
                    _Manifest(
                        child,
                        _parse_manifest(child),
                        None if described is None else _normalized(described),
                        response.digest,
                    )
                )
            return manifests
        # A lone manifest's platform is its config's (checked against the wanted one later).
        return [_Manifest(response, _parse_manifest(response), None, None)]

    async def _shared(
        self,
        reference: Reference,
        upstream: Upstream,
        manifest: _Manifest,
        wanted: Platform | None,
    ) -> _Indexed:
        """Index one manifest, joining a notify of the same image already running here."""
        config_bytes = await _get_config(upstream, manifest.manifest)
        config = wire.loads(config_bytes, oci.ImageConfig, "image config")
        platform = manifest.platform or config.platform
        if wanted is not None and manifest.index_digest is None and not wanted.matches(platform):
            raise ImageNotFound(
                f"image {reference} is for {platform}, not {wanted}",
                hint="notify it without a platform, or with its own",
            )
        key = (reference.name, manifest.response.digest, str(platform))
        task = self._tasks.get(key)
        if task is None:
            task = asyncio.ensure_future(
                self._index(reference, upstream, manifest, config, config_bytes, platform)
            )
            self._tasks[key] = task
            task.add_done_callback(lambda done: self._forget(key, done))
        # Shielded: one caller going away does not cancel the others' indexing.
        result = await asyncio.shield(task)
        if reference.tag is not None and reference.tag not in result.image.tags:
            image = await self._store.tag_image(result.image.id, reference.tag)
            result = attrs.evolve(result, image=image)
        return result

    def _forget(self, key: tuple[str, Digest, str], task: asyncio.Task[_Indexed]) -> None:
        self._tasks.pop(key, None)
        if not task.cancelled():
            task.exception()  # retrieved: its waiters may all have gone away

    async def _index(
        self,
        reference: Reference,
        upstream: Upstream,
        manifest: _Manifest,
        config: oci.ImageConfig,
        config_bytes: bytes,
        platform: Platform,
    ) -> _Indexed:
        digest = manifest.response.digest
        layers = manifest.manifest.layers
        diff_ids = config.rootfs.diff_ids
        if len(diff_ids) != len(layers):
            raise CorruptLayer(
                f"image {reference.name}@{digest}: the manifest lists {len(layers)} layers but "
                f"the config {len(diff_ids)} diff_ids"
            )
        deadline = time.monotonic() + self._claim_timeout
        while True:
            claim = await self._store.begin_indexing(
                reference.name, digest, platform, stale_after=self._claim_timeout
            )
            if claim is not None:
                break
            # Ready already, or another proxy is at it: wait for its result.
            image = await self._store.find_image(reference.name, digest=digest, platform=platform)
            if image.ready:
                return _Indexed(image, 0, len(layers))
            if image.state is ImageState.FAILED:
                continue  # a failed image may be claimed again: try it ourselves
            if time.monotonic() > deadline:
                raise FailedPrecondition(
                    f"image {reference.name}@{digest} is being indexed by another proxy that "
                    "does not finish",
                    hint="notify again later",
                )
            await anyio.sleep(_WAIT_INTERVAL)

        # One scan per blob, even if the manifest lists it twice.
        todo: dict[Digest, list[int]] = {}
        refresher = asyncio.ensure_future(self._keep_claim(claim))
        try:
            known = await self._store.known_layers(d.digest for d in layers)
            for position, descriptor in enumerate(layers):
                if descriptor.digest not in known:
                    todo.setdefault(descriptor.digest, []).append(position)
            limiter = asyncio.Semaphore(self._jobs)

            async def scan(positions: list[int]) -> None:
                expected = {diff_ids[p] for p in positions}
                if len(expected) > 1:
                    raise CorruptLayer(
                        f"image {reference.name}@{digest}: layer {layers[positions[0]].digest} "
                        "is listed with different diff_ids"
                    )
                async with limiter:
                    toc = await self._scan(upstream, layers[positions[0]], expected.pop())
                    await self._store.put_layer(toc)

            await _all(scan(positions) for positions in todo.values())
            image = await self._store.finish_indexing(
                claim,
                manifest=manifest.response.data,
                manifest_media_type=manifest.response.media_type,
                config=config_bytes,
                config_digest=manifest.manifest.config.digest,
                layers=[d.digest for d in layers],
                index_digest=manifest.index_digest,
                tag=reference.tag,
            )
        except BaseException as exc:
            message = str(exc) if isinstance(exc, StarlightError) else repr(exc)
            try:
                await asyncio.shield(self._store.fail_indexing(claim, message))
            except StarlightError:
                log.exception("could not record the failed indexing of %s", reference)
            raise
        finally:
            refresher.cancel()
        log.info(
            "indexed %s@%s (%s): %d layers, %d scanned",
            reference.name,
            digest,
            platform,
            len(layers),
            len(todo),
        )
        return _Indexed(image, len(todo), len({d.digest for d in layers}) - len(todo))

    async def _keep_claim(self, claim: IndexClaim) -> None:
        while True:
            await anyio.sleep(self._claim_timeout / 4)
            await self._store.refresh_claim(claim)

    async def _scan(self, upstream: Upstream, descriptor: oci.Descriptor, diff_id: Digest) -> TOC:
        """Stream one layer blob through the scanner; its TOC, checked against the image."""
        digest = descriptor.digest
        describe = f"layer {digest} of {upstream.reference.name}"
        if descriptor.media_type not in oci.GZIP_LAYER_MEDIA_TYPES:
            raise NotStarlightFormat(
                f"{describe} is {descriptor.media_type}, not a gzip layer in Starlight format",
                hint=_CONVERT_ADVICE,
            )
        client, ref = upstream.client, upstream.reference
        try:
            # The first bytes say whether it is converted at all: a plain layer is refused
            # without downloading it.
            prefix = await client.read_range(
                ref, digest, 0, min(MARKER_PREFIX_SIZE, descriptor.size)
            )
            if not is_starlight_prefix(prefix):
                raise NotStarlightFormat(
                    f"{describe} is not in Starlight format", hint=_CONVERT_ADVICE
                )
            scanner = LayerScanner(media_type=descriptor.media_type)
            async with client.stream_blob(ref, digest) as stream:
                batch: list[bytes] = []
                size = 0
                async for chunk in stream:
                    batch.append(chunk)
                    size += len(chunk)
                    if size >= _SCAN_BATCH:
                        await anyio.to_thread.run_sync(scanner.receive_data, b"".join(batch))
                        self._metrics.registry_bytes.labels("notify").inc(size)
                        batch, size = [], 0
                if size:
                    await anyio.to_thread.run_sync(scanner.receive_data, b"".join(batch))
                    self._metrics.registry_bytes.labels("notify").inc(size)
            await anyio.to_thread.run_sync(scanner.receive_data, b"")
        except NotStarlightFormat as exc:
            exc.hint = _CONVERT_ADVICE
            raise
        except NotFound as exc:
            raise RegistryError(
                f"{describe}: the registry does not have this blob the manifest lists ({exc})"
            ) from exc
        self._metrics.layers_scanned.inc()
        toc = scanner.toc
        if toc.layer.digest != digest or toc.layer.size != descriptor.size:
            raise DigestMismatch(
                f"{describe}: the registry served {toc.layer.size} bytes with digest "
                f"{toc.layer.digest}, the manifest says {descriptor.size} bytes"
            )
        if toc.layer.diff_id != diff_id:
            raise CorruptLayer(
                f"{describe} decompresses to {toc.layer.diff_id}, but the image config's "
                f"diff_id is {diff_id}"
            )
        return toc


def _parse_manifest(response: ManifestResponse) -> oci.Manifest:
    if response.media_type not in oci.MANIFEST_MEDIA_TYPES:
        raise InvalidInput(f"{response.digest} is a {response.media_type}, not an image manifest")
    return wire.loads(response.data, oci.Manifest, "image manifest")


async def _get_config(upstream: Upstream, manifest: oci.Manifest) -> bytes:
    try:
        return await upstream.client.get_blob(upstream.reference, manifest.config.digest)
    except NotFound as exc:
        raise RegistryError(
            f"image config {manifest.config.digest} of {upstream.reference.name} is missing "
            f"from the registry ({exc})"
        ) from exc


def _normalized(platform: Platform) -> Platform:
    return Platform.create(platform.os, platform.architecture, platform.variant)


async def _all(coroutines: Iterable[Coroutine[Any, Any, None]]) -> None:
    """Run coroutines concurrently; the first failure cancels the rest and is raised as is."""
    tasks = [asyncio.ensure_future(c) for c in coroutines]
    try:
        await asyncio.gather(*tasks)
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise
