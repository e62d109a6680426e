"""What the metadata store hands back: small frozen attrs records, never database rows."""

from __future__ import annotations

import enum
from collections.abc import Mapping

import attrs

from starlight_core.digest import Digest
from starlight_core.layer.toc import TOC
from starlight_core.platform import Platform

__all__ = [
    "ImageMetadata",
    "ImageRecord",
    "ImageState",
    "IndexClaim",
    "LayerRecord",
    "RankUpdate",
    "TraceRecord",
]


class ImageState(enum.Enum):
    INDEXING = "indexing"
    """A proxy holds the claim and is scanning the layers."""
    READY = "ready"
    """Every layer's TOC is stored; bundles can be planned."""
    FAILED = "failed"
    """The last attempt failed (``ImageRecord.error`` says why); a new notify retries."""


@attrs.frozen
class ImageRecord:
    """One image manifest for one platform, as known to the proxy.

    An image is identified by ``(name, digest, platform)``; ``tags`` are the tags of ``name``
    that currently point at it (a tag moves when re-notified with another digest).
    """

    id: int
    name: str
    """Repository with its registry, e.g. ``127.0.0.1:5000/app``."""
    digest: Digest
    """Digest of the platform's manifest (not of the index)."""
    platform: Platform
    state: ImageState
    tags: tuple[str, ...] = ()
    index_digest: Digest | None = None
    """The manifest list / OCI index the manifest was selected from, if any."""
    manifest_media_type: str | None = None
    config_digest: Digest | None = None
    error: str | None = None
    created_at: float = 0.0
    updated_at: float = 0.0

    @property
    def ready(self) -> bool:
        return self.state is ImageState.READY


@attrs.frozen
class IndexClaim:
    """Proof that this caller, and nobody else, is indexing an image right now.

    The token makes a claim that was taken over (because it went stale) unable to finish or
    fail the image under the new owner's feet.
    """

    image_id: int
    token: str
    name: str
    digest: Digest
    platform: Platform


@attrs.frozen
class LayerRecord:
    """A layer blob whose TOC is stored; shared by every image that lists it."""

    id: int
    digest: Digest
    size: int
    diff_id: Digest
    media_type: str
    chunk_size: int
    toc_version: int
    entry_count: int
    created_at: float = 0.0


@attrs.frozen
class ImageMetadata:
    """Everything the bundle's metadata section needs about one ready image."""

    image: ImageRecord
    manifest: bytes
    config: bytes
    tocs: tuple[TOC, ...]
    """One TOC per layer, base layer first (the manifest's order)."""


@attrs.frozen
class TraceRecord:
    """One uploaded startup trace, kept verbatim so rankings can be recomputed."""

    trace_id: str
    image_id: int
    group: str
    payload: bytes
    received_at: float


@attrs.frozen
class RankUpdate:
    """A ranking ``add_trace`` replaces in the transaction that stores the trace."""

    image_id: int
    ranks: Mapping[str, float]
    """File path → rank (lower starts earlier), as ``replace_ranks`` takes."""
    group: str = ""
    """'' for the image's own ranking; a group's name for its joint ranking."""
    traces: int | None = None
    """How many stored traces the ranking merges, the new one included: the image's (group
    '') or the group's, across its images. Checked inside the transaction: another writer's
    trace stored meanwhile makes it ``StaleRanking``. ``None``: not checked."""
