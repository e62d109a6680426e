"""The bundle header: what a worker needs before the first content arrives.

Plain attrs classes with no dependency on the wire module (``starlight_core.wire`` declares
their JSON form and imports this module). ``codec`` builds, encodes and decodes them.
"""

from __future__ import annotations

import re
from typing import Final

import attrs

from starlight_core.digest import Digest
from starlight_core.layer.toc import TOC

__all__ = [
    "BUNDLE_VERSION",
    "BundleHeader",
    "EndRecord",
    "ErrorRecord",
    "ExtentDescriptor",
    "ImageInfo",
    "ResumeInfo",
]

BUNDLE_VERSION: Final = 1
_BUNDLE_ID: Final = re.compile(r"^[0-9a-f]{64}$")


def _bundle_id(_: object, attribute: attrs.Attribute[str], value: str) -> None:
    if not _BUNDLE_ID.match(value):
        raise ValueError(f"{attribute.name} must be 64 lowercase hex digits, not {value!r}")


def _non_negative(_: object, attribute: attrs.Attribute[int], value: int) -> None:
    if value < 0:
        raise ValueError(f"{attribute.name} must not be negative")


@attrs.frozen(kw_only=True)
class ImageInfo:
    """One target image, with the exact manifest and config bytes its digests name."""

    reference: str
    manifest_digest: Digest
    manifest_media_type: str
    manifest: str
    """The manifest exactly as the registry serves it (UTF-8 JSON), so its digest verifies."""
    config_digest: Digest
    config: str
    """The image config exactly as stored."""
    platform: str
    layers: tuple[int, ...]
    """Its layers, base first, as indexes into ``BundleHeader.layers``."""


@attrs.frozen
class ExtentDescriptor:
    """One EXTENT record to expect: a chunk of a content, compressed as one gzip member."""

    content: Digest
    """Digest of the whole file content this chunk belongs to."""
    chunk_index: int = attrs.field(validator=_non_negative)
    offset: int = attrs.field(validator=_non_negative)
    """Where the chunk starts in the file content."""
    size: int = attrs.field(validator=_non_negative)
    """Uncompressed size."""
    compressed_size: int = attrs.field(validator=_non_negative)
    digest: Digest
    """sha256 of the uncompressed chunk."""


@attrs.frozen(kw_only=True)
class ResumeInfo:
    """This bundle continues an interrupted one that could not be resumed byte for byte.

    The worker named the contents it got from bundle ``bundle_id`` (after ``offset`` bytes of
    it) in its request, so they are not sent again.
    """

    bundle_id: str = attrs.field(validator=_bundle_id)
    offset: int = attrs.field(validator=_non_negative)


@attrs.frozen(kw_only=True)
class BundleHeader:
    version: int = BUNDLE_VERSION
    bundle_id: str = attrs.field(validator=_bundle_id)
    """sha256 (hex) of this header's canonical JSON with ``bundle_id`` set to 64 zeros: it
    names the plan, so the same request against the same proxy state gives the same id and
    stream."""
    images: tuple[ImageInfo, ...]
    layers: tuple[TOC, ...]
    """Every layer of every image once, each a full TOC — except those in ``omitted``."""
    extents: tuple[ExtentDescriptor, ...]
    """The EXTENT records that follow, in order."""
    local: tuple[Digest, ...] = ()
    """Contents the worker copies from what it already holds."""
    resume: ResumeInfo | None = None
    omitted: tuple[int, ...] = ()
    """Indexes into ``layers`` sent without their entries (an empty TOC with the layer's
    identity): the worker said it holds their TOC (``DeltaRequest.tocs``) and fills them in
    from its store (``codec.fill_omitted``)."""


@attrs.frozen
class EndRecord:
    """The END payload: how many extents and stream bytes came before it."""

    extents: int
    bytes: int


@attrs.frozen
class ErrorRecord:
    """The ERROR payload: the ``StarlightError.code`` and message of the proxy's failure."""

    error: str
    message: str
