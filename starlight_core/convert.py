"""Convert an image to the Starlight format, registry to registry, streaming.

For each layer: stream the source blob, decompress it, re-encode it with ``LayerWriter`` and
upload the result as it is produced — a layer is never held in memory whole. The image config
(and therefore every ``diff_id``) is unchanged; only layer descriptors change. Several layers are
converted at once (``jobs``). The destination manifest (or index) is pushed last, so a failed
conversion leaves nothing tagged.

Idempotent: a layer already in Starlight format is reused as it is, and when the destination
already holds a converted image with the same config, its layers are reused instead of being
re-encoded.

This module does I/O (through ``RegistryClient``); it is not imported by ``starlight_core``.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Sequence

import attrs

from starlight_core import oci, wire
from starlight_core.digest import Digest, sha256_digest
from starlight_core.errors import (
    CorruptLayer,
    ImageNotFound,
    InvalidInput,
    RegistryUnavailable,
    StarlightError,
    UnsupportedLayer,
)
from starlight_core.layer.scan import MARKER_PREFIX_SIZE, LayerDecoder, is_starlight_prefix
from starlight_core.layer.toc import DEFAULT_CHUNK_SIZE
from starlight_core.layer.writer import DEFAULT_LEVEL, LayerWriter
from starlight_core.platform import Platform
from starlight_core.reference import Reference
from starlight_core.registry import ManifestResponse, RegistryClient

__all__ = [
    "ConvertOptions",
    "ConvertResult",
    "ConvertedImage",
    "ConvertedLayer",
    "LayerProgress",
    "convert_image",
]

_THREAD_BATCH = 1 << 20  # hand CPU work to a thread in pieces of about this size
_LAYER_ATTEMPTS = 3


@attrs.frozen
class ConvertOptions:
    platforms: tuple[Platform, ...] = ()
    """Platforms to convert from a multi-platform image; empty means the host's platform."""
    all_platforms: bool = False
    chunk_size: int = DEFAULT_CHUNK_SIZE
    level: int = DEFAULT_LEVEL
    jobs: int = 3
    """Layers converted and uploaded at once."""


@attrs.frozen
class LayerProgress:
    """Progress of one layer: ``done`` of ``total`` source bytes (``total`` may be unknown)."""

    platform: str
    index: int
    digest: Digest
    done: int
    total: int
    state: str
    """``converting``, ``converted``, ``reused`` or ``failed``."""


@attrs.frozen
class ConvertedLayer:
    source: oci.Descriptor
    target: oci.Descriptor
    reused: bool
    uncompressed_size: int | None = None
    files: int | None = None


@attrs.frozen
class ConvertedImage:
    platform: str
    manifest: oci.Descriptor
    config: oci.Descriptor
    layers: tuple[ConvertedLayer, ...]


@attrs.frozen
class ConvertResult:
    reference: Reference
    """The destination, pinned to the digest pushed."""
    media_type: str
    images: tuple[ConvertedImage, ...]


ProgressCallback = Callable[[LayerProgress], None]


def _gzip_media_type(manifest_media_type: str) -> str:
    return (
        oci.DOCKER_LAYER_GZIP if manifest_media_type == oci.DOCKER_MANIFEST else oci.OCI_LAYER_GZIP
    )


class _Converter:
    def __init__(
        self,
        client: RegistryClient,
        source: Reference,
        destination: Reference,
        options: ConvertOptions,
        progress: ProgressCallback | None,
    ) -> None:
        self.client = client
        self.source = source
        self.destination = destination
        self.options = options
        self.progress = progress or (lambda _: None)
        self.jobs = asyncio.Semaphore(max(1, options.jobs))
        self.same_registry = source.domain == destination.domain
        # Layers that appear in several platforms' manifests are converted once.
        self._layer_tasks: dict[Digest, asyncio.Task[ConvertedLayer]] = {}
        # Converted manifests waiting to be pushed (last, so nothing half-done is tagged).
        self._manifests: dict[Digest, tuple[bytes, str]] = {}

    async def run(self) -> ConvertResult:
        response = await self.client.get_manifest(self.source)
        previous = await self._previous_layers()
        if response.media_type in oci.INDEX_MEDIA_TYPES:
            index = wire.loads(response.data, oci.Index, "image index")
            wanted = oci.select_manifests(
                index, self.options.platforms or None, all_platforms=self.options.all_platforms
            )
            if not wanted:
                raise ImageNotFound(f"{self.source}: the index lists no image manifests")
            images = await asyncio.gather(
                *(self._convert_manifest(d, None, previous) for d in wanted)
            )
            for image in images:  # platform manifests first: the index refers to them
                await self._push_manifest_blob(image)
            descriptors = tuple(
                attrs.evolve(source, digest=image.manifest.digest, size=image.manifest.size)
                for source, image in zip(wanted, images, strict=True)
            )
            new_index = attrs.evolve(index, manifests=descriptors)
            data = wire.dumps(new_index)
            media_type = index.media_type or response.media_type
            digest = await self.client.put_manifest(self.destination, data, media_type)
            return ConvertResult(self.destination.with_digest(digest), media_type, tuple(images))
        image = await self._convert_manifest(None, response, previous)
        data, media_type = self._manifests[image.manifest.digest]
        digest = await self.client.put_manifest(self.destination, data, media_type)
        return ConvertResult(self.destination.with_digest(digest), media_type, (image,))

    async def _push_manifest_blob(self, image: ConvertedImage) -> None:
        data, media_type = self._manifests[image.manifest.digest]
        await self.client.put_manifest(
            self.destination.with_digest(image.manifest.digest), data, media_type
        )

    async def _previous_layers(self) -> dict[Digest, tuple[oci.Descriptor, ...]]:
        """Layers of what the destination already holds, by config digest (for idempotency)."""
        try:
            response = await self.client.get_manifest(self.destination)
        except ImageNotFound:
            return {}
        manifests: list[ManifestResponse] = [response]
        if response.media_type in oci.INDEX_MEDIA_TYPES:
            index = wire.loads(response.data, oci.Index, "image index")
            manifests = [
                await self.client.get_manifest(self.destination.with_digest(d.digest))
                for d in index.manifests
                if d.media_type in oci.MANIFEST_MEDIA_TYPES
            ]
        found: dict[Digest, tuple[oci.Descriptor, ...]] = {}
        for item in manifests:
            if item.media_type in oci.MANIFEST_MEDIA_TYPES:
                manifest = wire.loads(item.data, oci.Manifest, "manifest")
                found[manifest.config.digest] = manifest.layers
        return found

    async def _convert_manifest(
        self,
        descriptor: oci.Descriptor | None,
        response: ManifestResponse | None,
        previous: dict[Digest, tuple[oci.Descriptor, ...]],
    ) -> ConvertedImage:
        if response is None:
            assert descriptor is not None
            response = await self.client.get_manifest(self.source.with_digest(descriptor.digest))
        if response.media_type not in oci.MANIFEST_MEDIA_TYPES:
            raise InvalidInput(f"{self.source}: unsupported manifest type {response.media_type}")
        manifest = wire.loads(response.data, oci.Manifest, "manifest")
        config_bytes = await self.client.get_blob(self.source, manifest.config.digest)
        config = wire.loads(config_bytes, oci.ImageConfig, "image config")
        platform = str(config.platform)
        diff_ids = config.rootfs.diff_ids
        if len(diff_ids) != len(manifest.layers):
            raise InvalidInput(
                f"{self.source} ({platform}): the manifest has {len(manifest.layers)} layers "
                f"but the config lists {len(diff_ids)} diff_ids"
            )
        await self._ensure_blob(manifest.config.digest, config_bytes)
        media_type = manifest.effective_media_type
        reusable = previous.get(manifest.config.digest, ())
        layers = await asyncio.gather(
            *(
                self._layer(platform, i, layer, diff_ids[i], media_type, reusable)
                for i, layer in enumerate(manifest.layers)
            )
        )
        new_manifest = attrs.evolve(
            manifest,
            media_type=manifest.media_type or media_type,
            layers=tuple(layer.target for layer in layers),
        )
        data = wire.dumps(new_manifest)
        digest = sha256_digest(data)
        self._manifests[digest] = (data, media_type)
        return ConvertedImage(
            platform=platform,
            manifest=oci.Descriptor(media_type=media_type, digest=digest, size=len(data)),
            config=manifest.config,
            layers=tuple(layers),
        )

    async def _ensure_blob(self, digest: Digest, data: bytes) -> None:
        if await self.client.head_blob(self.destination, digest) is not None:
            return
        if self.same_registry and await self.client.mount_blob(
            self.destination, digest, self.source.path
        ):
            return
        await self.client.upload_blob(self.destination, data, digest)

    def _layer(
        self,
        platform: str,
        index: int,
        layer: oci.Descriptor,
        diff_id: Digest,
        manifest_media_type: str,
        reusable: Sequence[oci.Descriptor],
    ) -> asyncio.Task[ConvertedLayer]:
        task = self._layer_tasks.get(layer.digest)
        if task is None:
            task = asyncio.ensure_future(
                self._convert_layer(platform, index, layer, diff_id, manifest_media_type, reusable)
            )
            self._layer_tasks[layer.digest] = task
        return task

    async def _convert_layer(
        self,
        platform: str,
        index: int,
        layer: oci.Descriptor,
        diff_id: Digest,
        manifest_media_type: str,
        reusable: Sequence[oci.Descriptor],
    ) -> ConvertedLayer:
        if layer.media_type not in oci.LAYER_MEDIA_TYPES:
            raise UnsupportedLayer(
                f"{self.source} layer {index} ({layer.digest}): unsupported media type "
                f"{layer.media_type}"
            )
        report = self._reporter(platform, index, layer)
        async with self.jobs:
            # Already converted (the source is a Starlight image): copy as it is.
            if layer.media_type in oci.GZIP_LAYER_MEDIA_TYPES and await self._is_starlight(
                self.source, layer.digest
            ):
                await self._copy_blob(layer)
                report(layer.size, "reused")
                return ConvertedLayer(source=layer, target=layer, reused=True)
            # Converted before into the destination (same config, so same diff_id here).
            if index < len(reusable):
                previous = reusable[index]
                if await self.client.head_blob(
                    self.destination, previous.digest
                ) is not None and await self._is_starlight(self.destination, previous.digest):
                    report(layer.size, "reused")
                    return ConvertedLayer(source=layer, target=previous, reused=True)
            for attempt in range(_LAYER_ATTEMPTS):
                try:
                    return await self._reencode(layer, diff_id, manifest_media_type, report)
                except RegistryUnavailable:
                    if attempt == _LAYER_ATTEMPTS - 1:
                        report(0, "failed")
                        raise
                    await asyncio.sleep(0.5 * 2**attempt)
            raise AssertionError("unreachable")

    def _reporter(
        self, platform: str, index: int, layer: oci.Descriptor
    ) -> Callable[[int, str], None]:
        def report(done: int, state: str) -> None:
            self.progress(LayerProgress(platform, index, layer.digest, done, layer.size, state))

        return report

    async def _is_starlight(self, ref: Reference, digest: Digest) -> bool:
        size = await self.client.head_blob(ref, digest)
        if size is None or size < 12:
            return False
        prefix = await self.client.read_range(ref, digest, 0, min(size, MARKER_PREFIX_SIZE))
        return is_starlight_prefix(prefix)

    async def _copy_blob(self, layer: oci.Descriptor) -> None:
        if await self.client.head_blob(self.destination, layer.digest) is not None:
            return
        if self.same_registry and await self.client.mount_blob(
            self.destination, layer.digest, self.source.path
        ):
            return

        async def body() -> AsyncIterator[bytes]:
            async with self.client.stream_blob(self.source, layer.digest) as stream:
                async for chunk in stream:
                    yield chunk

        await self.client.upload_blob_stream(self.destination, body(), digest=layer.digest)

    async def _reencode(
        self,
        layer: oci.Descriptor,
        diff_id: Digest,
        manifest_media_type: str,
        report: Callable[[int, str], None],
    ) -> ConvertedLayer:
        target_type = _gzip_media_type(manifest_media_type)
        decoder = LayerDecoder()
        writer = LayerWriter(
            chunk_size=self.options.chunk_size, level=self.options.level, media_type=target_type
        )

        def work(data: bytes, final: bool) -> bytes:
            out = [writer.write(piece) for piece in decoder.feed(data)]
            if final:
                out.extend(writer.write(piece) for piece in decoder.feed(b""))
                out.append(writer.close())
            return b"".join(out)

        async def encoded() -> AsyncIterator[bytes]:
            pending = bytearray()
            async with self.client.stream_blob(self.source, layer.digest) as stream:
                async for chunk in stream:
                    pending += chunk
                    if len(pending) >= _THREAD_BATCH:
                        out = await asyncio.to_thread(work, bytes(pending), False)
                        pending.clear()
                        report(stream.received, "converting")
                        if out:
                            yield out
            # The stream verified the source digest when it ended.
            out = await asyncio.to_thread(work, bytes(pending), True)
            if out:
                yield out

        try:
            digest, size = await self.client.upload_blob_stream(self.destination, encoded())
        except StarlightError as exc:
            if isinstance(exc, CorruptLayer):
                raise CorruptLayer(
                    f"{self.source} layer {layer.digest}: {exc.message}", hint=exc.hint
                ) from exc
            raise
        result = writer.result
        if result.diff_id != diff_id:
            raise CorruptLayer(
                f"{self.source} layer {layer.digest}: its uncompressed digest {result.diff_id} "
                f"does not match the image config's diff_id {diff_id}"
            )
        if result.digest != digest or result.size != size:
            raise CorruptLayer(f"{self.source} layer {layer.digest}: upload does not match output")
        report(layer.size, "converted")
        annotations = layer.annotations if manifest_media_type == oci.OCI_MANIFEST else None
        target = oci.Descriptor(
            media_type=target_type, digest=digest, size=size, annotations=annotations
        )
        return ConvertedLayer(
            source=layer,
            target=target,
            reused=False,
            uncompressed_size=result.uncompressed_size,
            files=sum(1 for e in result.toc.entries if e.is_file),
        )


async def convert_image(
    client: RegistryClient,
    source: Reference,
    destination: Reference,
    options: ConvertOptions | None = None,
    progress: ProgressCallback | None = None,
) -> ConvertResult:
    """Convert ``source`` into Starlight format at ``destination`` (tag pushed last)."""
    if destination.tag is None:
        raise InvalidInput(f"destination {destination} needs a tag")
    converter = _Converter(client, source, destination, options or ConvertOptions(), progress)
    return await converter.run()
