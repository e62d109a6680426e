"""The OCI / Docker schema 2 image model: descriptors, manifests, indexes and image configs.

Objects are frozen attrs classes; their JSON form is handled by ``starlight_core.wire``.
Manifests and configs are named by the digest of their exact bytes, so whoever needs that digest
keeps the bytes next to the parsed object (see ``ParsedBlob``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Final

import attrs

from starlight_core.digest import Digest
from starlight_core.errors import ImageNotFound, InvalidInput
from starlight_core.platform import Platform

__all__ = [
    "DOCKER_CONFIG",
    "DOCKER_LAYER_GZIP",
    "DOCKER_MANIFEST",
    "DOCKER_MANIFEST_LIST",
    "INDEX_MEDIA_TYPES",
    "LAYER_MEDIA_TYPES",
    "MANIFEST_MEDIA_TYPES",
    "OCI_CONFIG",
    "OCI_INDEX",
    "OCI_LAYER",
    "OCI_LAYER_GZIP",
    "OCI_MANIFEST",
    "Descriptor",
    "History",
    "ImageConfig",
    "Index",
    "Manifest",
    "RootFS",
    "RuntimeConfig",
    "chain_ids",
    "select_manifests",
]

OCI_MANIFEST: Final = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX: Final = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG: Final = "application/vnd.oci.image.config.v1+json"
OCI_LAYER: Final = "application/vnd.oci.image.layer.v1.tar"
OCI_LAYER_GZIP: Final = "application/vnd.oci.image.layer.v1.tar+gzip"
DOCKER_MANIFEST: Final = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_MANIFEST_LIST: Final = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_CONFIG: Final = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER_GZIP: Final = "application/vnd.docker.image.rootfs.diff.tar.gzip"
DOCKER_FOREIGN_LAYER_GZIP: Final = "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip"

MANIFEST_MEDIA_TYPES: Final = frozenset({OCI_MANIFEST, DOCKER_MANIFEST})
INDEX_MEDIA_TYPES: Final = frozenset({OCI_INDEX, DOCKER_MANIFEST_LIST})
LAYER_MEDIA_TYPES: Final = frozenset(
    {OCI_LAYER, OCI_LAYER_GZIP, DOCKER_LAYER_GZIP, DOCKER_FOREIGN_LAYER_GZIP}
)
GZIP_LAYER_MEDIA_TYPES: Final = frozenset({OCI_LAYER_GZIP, DOCKER_LAYER_GZIP})


@attrs.frozen
class Descriptor:
    media_type: str
    digest: Digest = attrs.field(converter=Digest)
    size: int
    urls: tuple[str, ...] | None = None
    annotations: Mapping[str, str] | None = None
    platform: Platform | None = None
    artifact_type: str | None = None


@attrs.frozen
class Manifest:
    """An image manifest (OCI or Docker schema 2: the same shape, different media types)."""

    schema_version: int
    media_type: str | None = attrs.field(default=None, kw_only=True)
    config: Descriptor
    layers: tuple[Descriptor, ...]
    artifact_type: str | None = None
    subject: Descriptor | None = None
    annotations: Mapping[str, str] | None = None

    def __attrs_post_init__(self) -> None:
        if self.schema_version != 2:
            raise InvalidInput(f"unsupported manifest schemaVersion {self.schema_version}")

    @property
    def effective_media_type(self) -> str:
        if self.media_type:
            return self.media_type
        return DOCKER_MANIFEST if self.config.media_type == DOCKER_CONFIG else OCI_MANIFEST


@attrs.frozen
class Index:
    """An OCI image index or a Docker manifest list."""

    schema_version: int
    media_type: str | None = attrs.field(default=None, kw_only=True)
    manifests: tuple[Descriptor, ...]
    artifact_type: str | None = None
    subject: Descriptor | None = None
    annotations: Mapping[str, str] | None = None

    def __attrs_post_init__(self) -> None:
        if self.schema_version != 2:
            raise InvalidInput(f"unsupported index schemaVersion {self.schema_version}")


def _digests(values: Sequence[str]) -> tuple[Digest, ...]:
    return tuple(Digest(v) for v in values)


@attrs.frozen
class RootFS:
    type: str
    diff_ids: tuple[Digest, ...] = attrs.field(converter=_digests)


@attrs.frozen
class RuntimeConfig:
    """The ``config`` part of an image config: how to run it (only what starlight reads)."""

    entrypoint: tuple[str, ...] | None = None
    cmd: tuple[str, ...] | None = None
    env: tuple[str, ...] | None = None
    working_dir: str | None = None
    user: str | None = None
    labels: Mapping[str, str] | None = None


@attrs.frozen
class History:
    created: str | None = None
    created_by: str | None = None
    comment: str | None = None
    empty_layer: bool | None = None


@attrs.frozen
class ImageConfig:
    """An image configuration. Unknown fields are ignored: keep the raw bytes to re-serve it."""

    architecture: str
    os: str
    rootfs: RootFS
    variant: str | None = None
    created: str | None = None
    config: RuntimeConfig | None = None
    history: tuple[History, ...] | None = None

    @property
    def platform(self) -> Platform:
        return Platform.create(self.os, self.architecture, self.variant)


def chain_ids(diff_ids: Sequence[Digest]) -> list[Digest]:
    """Chain IDs of a layer stack (OCI image spec): how containerd names committed snapshots."""
    import hashlib

    result: list[Digest] = []
    for diff_id in diff_ids:
        if not result:
            result.append(Digest(diff_id))
        else:
            text = f"{result[-1]} {diff_id}".encode()
            result.append(Digest("sha256:" + hashlib.sha256(text).hexdigest()))
    return result


def select_manifests(
    index: Index, platforms: Sequence[Platform] | None, *, all_platforms: bool = False
) -> list[Descriptor]:
    """The manifests of ``index`` for the wanted platforms, in index order.

    ``platforms`` None means the host's platform; a platform no manifest matches exactly falls
    back to the best compatible one (an arm64 host runs arm/v7), as containerd's matcher does.
    """
    candidates = [
        d for d in index.manifests if d.media_type in MANIFEST_MEDIA_TYPES or d.media_type is None
    ]
    if all_platforms:
        return list(candidates)
    wanted = list(platforms) if platforms else [Platform.host()]
    chosen: list[Descriptor] = []
    described = [(d, _normalized(d.platform)) for d in candidates if d.platform is not None]
    for platform in wanted:
        exact = [d for d, p in described if platform.matches(p)]
        compatible = [d for d, p in described if platform.runs(p)]
        match = (exact or compatible)[:1]
        if not match:
            available = ", ".join(str(d.platform) for d in candidates if d.platform) or "none"
            raise ImageNotFound(
                f"no manifest for platform {platform} in the index (available: {available})"
            )
        if match[0] not in chosen:
            chosen.append(match[0])
    return [d for d in candidates if d in chosen]


def _normalized(platform: Platform) -> Platform:
    return Platform.create(platform.os, platform.architecture, platform.variant)
