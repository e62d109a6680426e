"""The proxy's metadata store, as the rest of the proxy sees it.

One protocol, several back ends (``sqlite.py``, ``postgres.py``), one conformance suite
(``tests/proxy/test_store.py``). Indexing an image goes:

1. ``begin_indexing(name, digest, platform)`` → an ``IndexClaim``, or ``None`` when another
   task or proxy is indexing it or it is already ready (then just ``tag_image`` it);
2. per layer: ``known_layers`` tells which TOCs are stored already; ``put_layer(toc)`` the rest;
3. ``finish_indexing(claim, ...)`` (or ``fail_indexing``) makes the image ready, atomically.

Planning a bundle reads ``find_image`` → ``load_image(B)`` (manifest, config, TOCs) and
``shared_contents(B, [A1..An])`` (the content digests the worker already holds), then
``get_ranks``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Final, Protocol

from starlight_core.digest import Digest
from starlight_core.errors import FailedPrecondition
from starlight_core.layer.toc import TOC
from starlight_core.platform import Platform
from starlight_proxy.store.records import (
    ImageMetadata,
    ImageRecord,
    IndexClaim,
    LayerRecord,
    RankUpdate,
    TraceRecord,
)

__all__ = ["DEFAULT_CLAIM_TIMEOUT", "MetadataStore", "StaleRanking"]

DEFAULT_CLAIM_TIMEOUT: Final = 600.0
"""Seconds after which an ``indexing`` claim nobody refreshed may be taken over: its proxy
probably died. Long enough for a slow registry; refresh_claim keeps a live one fresh."""


class StaleRanking(FailedPrecondition):
    """A ranking given to ``add_trace`` was computed from fewer (or other) traces than are
    stored: another writer stored one meanwhile. Nothing was stored; merge again and retry."""

    code = "stale_ranking"


class MetadataStore(Protocol):
    """Images, their layers' TOCs, startup rankings and traces. Every method is atomic.

    Errors: ``ImageNotFound`` for an unknown image, ``InvalidInput`` for malformed
    arguments, ``FailedPrecondition`` when the state forbids the call (a lost claim, an image
    that is not ready), ``StarlightError`` when the database itself fails.
    """

    # --- indexing -------------------------------------------------------------------------

    async def begin_indexing(
        self,
        name: str,
        digest: Digest,
        platform: Platform,
        *,
        stale_after: float = DEFAULT_CLAIM_TIMEOUT,
    ) -> IndexClaim | None:
        """Claim the indexing of an image, or return ``None`` if someone else should not be
        disturbed: it is ready, or claimed less than ``stale_after`` seconds ago.

        A failed image, or a claim older than ``stale_after``, is (re)claimed. Works across
        tasks and across processes sharing the database.
        """
        ...

    async def refresh_claim(self, claim: IndexClaim) -> bool:
        """Push back a claim's staleness deadline; ``False`` if it was taken over."""
        ...

    async def known_layers(self, digests: Iterable[Digest]) -> frozenset[Digest]:
        """The layer digests among ``digests`` whose TOC is stored (no need to scan them)."""
        ...

    async def put_layer(self, toc: TOC) -> LayerRecord:
        """Store a layer's TOC once per blob digest; storing it again changes nothing."""
        ...

    async def finish_indexing(
        self,
        claim: IndexClaim,
        *,
        manifest: bytes,
        manifest_media_type: str,
        config: bytes,
        config_digest: Digest,
        layers: Sequence[Digest],
        index_digest: Digest | None = None,
        tag: str | None = None,
    ) -> ImageRecord:
        """Mark the claimed image ready with its manifest, config and layers (in manifest
        order, each stored by ``put_layer`` before), and point ``tag`` at it.

        ``FailedPrecondition`` if the claim was taken over; ``InvalidInput`` if a layer's
        TOC is not stored.
        """
        ...

    async def fail_indexing(self, claim: IndexClaim, error: str) -> bool:
        """Record why indexing failed; ``False`` (and no change) if the claim was lost."""
        ...

    async def tag_image(self, image_id: int, tag: str) -> ImageRecord:
        """Point ``tag`` of the image's repository and platform at this image (moving it)."""
        ...

    # --- lookups --------------------------------------------------------------------------

    async def get_image(self, image_id: int) -> ImageRecord: ...

    async def find_image(
        self,
        name: str,
        *,
        platform: Platform | None = None,
        tag: str | None = None,
        digest: Digest | None = None,
    ) -> ImageRecord:
        """The image ``name:tag`` for ``platform``, or ``name@digest``.

        ``digest`` may name the manifest itself (``platform`` then only has to agree) or the
        index it came from (``platform`` picks the manifest; required if several match).
        """
        ...

    async def list_images(self, *, name: str | None = None) -> list[ImageRecord]:
        """Every image (of repository ``name``), ordered by name then age."""
        ...

    async def delete_image(self, image_id: int) -> None:
        """Forget an image with its tags, ranks and traces; its layers stay (shared)."""
        ...

    async def prune_layers(self, *, older_than: float) -> int:
        """Delete layers no image lists that were stored more than ``older_than`` seconds
        ago (younger ones may belong to an indexing in progress); returns how many."""
        ...

    # --- the two hot queries --------------------------------------------------------------

    async def load_image(self, image_id: int) -> ImageMetadata:
        """Manifest, config and every layer's TOC of a ready image."""
        ...

    async def get_toc(self, layer: Digest) -> TOC:
        """One stored layer's TOC (``NotFound`` if absent)."""
        ...

    async def shared_contents(self, image_id: int, holders: Sequence[int]) -> frozenset[Digest]:
        """The content digests of ``image_id``'s files that occur in any layer of any image
        in ``holders`` (unknown holder ids are ignored)."""
        ...

    # --- startup order --------------------------------------------------------------------

    async def replace_ranks(
        self, image_id: int, ranks: Mapping[str, float], *, group: str = ""
    ) -> None:
        """Replace the image's ranking (``group`` '' is its own; others are joint rankings
        of a group of images) by ``ranks`` (file path → rank, lower starts earlier)."""
        ...

    async def get_ranks(
        self, image_ids: Sequence[int], *, group: str = ""
    ) -> dict[int, dict[str, float]]:
        """Each requested image's ranking (empty when it has none)."""
        ...

    async def ranked_groups(self, image_ids: Sequence[int]) -> dict[str, frozenset[int]]:
        """The groups with a joint ranking of any of these images, each with the images of
        ``image_ids`` it ranks."""
        ...

    async def add_trace(
        self,
        trace_id: str,
        image_id: int,
        payload: bytes,
        *,
        group: str = "",
        rankings: Sequence[RankUpdate] = (),
    ) -> bool:
        """Store an uploaded trace and, in the same transaction, replace the ``rankings``
        (each checked against the traces stored, see ``RankUpdate.traces``). ``False``, and
        nothing changed, if a trace with that id was stored already; ``StaleRanking``, and
        nothing changed, if a ranking's trace count is not what is stored."""
        ...

    async def list_traces(
        self, image_id: int | None, *, group: str | None = None
    ) -> list[TraceRecord]:
        """The image's traces (of one group, or all), oldest first; with ``image_id`` None,
        every trace of ``group`` (required then), whatever its image."""
        ...

    async def close(self) -> None: ...
