"""Delta planning: which file contents a bundle sends, in which order, and from which blobs.

``plan(targets, have)`` takes one or more target images (their layer TOCs, base first, and an
optional startup ranking of their paths) and the content digests the worker already holds, and
returns a ``DeltaPlan``:

* ``layers``: every layer of every target once (first appearance order), ``targets``: each
  target's layers as indexes into it;
* ``extents``: the chunks to send, each a gzip member of one layer blob;
* ``local``: the contents the worker materialises from what it holds (local copies).

Guarantees: every content of every layer of every target (regular files with at least one
byte; empty files need nothing) is either sent or local; nothing in ``have`` is sent; each
content digest is sent once however many files, layers and targets share it, and all chunks of
one content are consecutive, in chunk order, taken from one entry.

The order (deterministic: the same input gives the same plan). Each content is placed at the
first position any of its files earns, by these keys:

1. visible files that have a rank, by rank (lower first); ties by layer (plan order, base
   first) then tar order. Joint targets interleave by rank. A hard link carries the rank of its
   own name and the position of the entry it resolves to;
2. the other visible files, by layer then tar order;
3. contents only invisible entries need (overridden or whited-out files of lower layers), by
   layer then tar order, last: their layers still have to be complete on the worker.

With ``ordering`` off, ranks and visibility are ignored: every content by layer then tar order.
``local`` follows the same order, so copies of the files needed first can be made first.

``coalesce(extents)`` groups extents into registry Range reads; see ``RangeRead``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Final

import attrs

from starlight_core.digest import Digest
from starlight_core.errors import CorruptLayer
from starlight_core.fsview import merge
from starlight_core.layer.toc import TOC, Chunk, Entry, EntryType

__all__ = [
    "DEFAULT_MAX_GAP",
    "DEFAULT_MAX_RANGE",
    "DeltaPlan",
    "PlanOptions",
    "PlannedExtent",
    "RangeRead",
    "Target",
    "coalesce",
    "plan",
]

DEFAULT_MAX_GAP: Final = 64 * 1024
"""Gap (bytes) below which reading through is cheaper than a new request."""
DEFAULT_MAX_RANGE: Final = 16 * 1024 * 1024

# Groups of the sort key (see the module docstring).
_RANKED: Final = 0
_VISIBLE: Final = 1
_HIDDEN: Final = 2
_SHIFT: Final = 32
_GROUP: Final = 62
_INDEX_MASK: Final = (1 << _SHIFT) - 1
_LAYER_MASK: Final = (1 << (_GROUP - _SHIFT)) - 1
_LAST: Final = 1 << 64


def _tocs(layers: Iterable[TOC]) -> tuple[TOC, ...]:
    return tuple(layers)


@attrs.frozen
class Target:
    """One image to provision: its layer TOCs (base first) and its startup ranking."""

    layers: tuple[TOC, ...] = attrs.field(converter=_tocs)
    ranks: Mapping[str, float] = attrs.field(factory=dict)
    """Path in the merged view -> rank (lower is needed earlier). Unknown paths are ignored."""


@attrs.frozen
class PlanOptions:
    ordering: bool = True
    """Send in startup order; off: in layer order (the optimizer switched off)."""


@attrs.frozen
class PlannedExtent:
    """One chunk to send: a gzip member read from a layer blob."""

    content: Digest
    """Digest of the whole file content the chunk belongs to."""
    chunk_index: int
    chunk: Chunk
    layer: int
    """Index into ``DeltaPlan.layers`` of the blob it is read from."""
    blob: Digest
    """That blob's digest."""


@attrs.frozen
class DeltaPlan:
    layers: tuple[TOC, ...]
    targets: tuple[tuple[int, ...], ...]
    """Per target, its layers (base first) as indexes into ``layers``."""
    extents: tuple[PlannedExtent, ...]
    local: tuple[Digest, ...]

    @property
    def sent(self) -> tuple[Digest, ...]:
        """The contents sent, in order."""
        return tuple(e.content for e in self.extents if e.chunk_index == 0)

    @property
    def compressed_size(self) -> int:
        """Bytes of gzip members the bundle carries."""
        return sum(e.chunk.compressed_size for e in self.extents)


def _unique_layers(targets: Sequence[Target]) -> tuple[list[TOC], list[tuple[int, ...]]]:
    layers: list[TOC] = []
    where: dict[Digest, int] = {}
    per_target: list[tuple[int, ...]] = []
    for target in targets:
        indexes = []
        for toc in target.layers:
            index = where.get(toc.layer.digest)
            if index is None:
                index = where[toc.layer.digest] = len(layers)
                layers.append(toc)
            indexes.append(index)
        per_target.append(tuple(indexes))
    return layers, per_target


def _check_chunks(toc: TOC, entry: Entry) -> None:
    """A content is only sendable if its chunks cover it exactly, in order."""
    position = 0
    for chunk in entry.chunks:
        if chunk.offset != position or chunk.size <= 0:
            break
        position += chunk.size
    else:
        if position == entry.size:
            return
    raise CorruptLayer(
        f"layer {toc.layer.digest}: the chunks of {entry.name!r} do not cover its "
        f"{entry.size} bytes"
    )


def plan(
    targets: Sequence[Target],
    have: Iterable[str] = (),
    options: PlanOptions | None = None,
) -> DeltaPlan:
    """Plan the bundle that provisions ``targets`` on a worker holding the contents ``have``."""
    options = options or PlanOptions()
    held = frozenset(have)
    layers, per_target = _unique_layers(targets)

    # A position is ``layer << _SHIFT | index in layer``: one int ordering by layer, then tar
    # order. Unranked contents get ``group << _GROUP | position``, ranked ones (rank, position);
    # plain ints keep a 100,000-file plan fast and out of the garbage collector's way.
    placed: dict[Digest, int] = {}
    ranked: dict[Digest, tuple[float, int]] = {}
    if options.ordering:
        visible_group = _VISIBLE << _GROUP
        for target, indexes in zip(targets, per_target, strict=True):
            ranks = target.ranks
            for name, layer, index, entry in merge(target.layers).file_entries():
                content = entry.digest
                if content is None:
                    continue  # reported below, with the layer that holds it
                position = indexes[layer] << _SHIFT | index
                rank = ranks.get(name)
                if rank is not None:
                    best_rank = ranked.get(content)
                    if best_rank is None or (rank, position) < best_rank:
                        ranked[content] = (rank, position)
                    continue
                key = visible_group | position
                if key < placed.get(content, _LAST):
                    placed[content] = key
    rest = (_HIDDEN if options.ordering else _VISIBLE) << _GROUP
    for layer, toc in enumerate(layers):
        base = rest | layer << _SHIFT
        for index, entry in enumerate(toc.entries):
            if entry.type is not EntryType.FILE or entry.size <= 0:  # ``has_content``, inlined
                continue
            content = entry.digest
            if content is None:
                raise CorruptLayer(f"layer {toc.layer.digest}: {entry.name!r} has no digest")
            if content not in placed:
                placed[content] = base | index

    by_key = {key: content for content, key in placed.items() if content not in ranked}
    order = sorted(ranked, key=ranked.__getitem__)
    order.extend(by_key[key] for key in sorted(by_key))

    extents: list[PlannedExtent] = []
    local: list[Digest] = []
    for content in order:
        if content in held:
            local.append(content)
            continue
        position = ranked[content][1] if content in ranked else placed[content]
        layer = (position >> _SHIFT) & _LAYER_MASK
        toc = layers[layer]
        entry = toc.entries[position & _INDEX_MASK]
        _check_chunks(toc, entry)
        blob = toc.layer.digest
        extents.extend(
            PlannedExtent(content, index, chunk, layer, blob)
            for index, chunk in enumerate(entry.chunks)
        )
    return DeltaPlan(
        layers=tuple(layers),
        targets=tuple(per_target),
        extents=tuple(extents),
        local=tuple(local),
    )


@attrs.frozen
class RangeRead:
    """One registry Range read covering consecutive extents (in send order) of one blob.

    What the proxy does with it: issue ``Range: bytes={offset}-{offset + length - 1}`` on the
    blob, read the body front to back, and for each of its extents in order discard the gap
    bytes before it (``chunk.compressed_offset - position``) and forward exactly
    ``chunk.compressed_size`` bytes as that extent's EXTENT record. Ranges are consumed in list
    order (the next few may be requested ahead, a bounded number in flight), so the bundle goes
    out in plan order and the proxy holds at most one read buffer per range in flight.
    """

    layer: int
    blob: Digest
    offset: int
    length: int
    first: int
    """Index (in the sequence given to ``coalesce``) of its first extent."""
    count: int

    @property
    def end(self) -> int:
        return self.offset + self.length


def coalesce(
    extents: Sequence[PlannedExtent],
    *,
    max_gap: int = DEFAULT_MAX_GAP,
    max_size: int = DEFAULT_MAX_RANGE,
) -> list[RangeRead]:
    """Merge consecutive extents of the same blob into Range reads.

    An extent joins the current range when it comes from the same blob, starts at or after the
    range's end (reads only move forward, so send order is kept), leaves a gap of at most
    ``max_gap`` bytes and keeps the range within ``max_size`` bytes. A single extent larger than
    ``max_size`` gets a range of its own.
    """
    ranges: list[RangeRead] = []
    layer = first = offset = end = -1
    blob: Digest | None = None
    for index, extent in enumerate(extents):
        start = extent.chunk.compressed_offset
        stop = start + extent.chunk.compressed_size
        if blob == extent.blob and end <= start <= end + max_gap and stop - offset <= max_size:
            end = stop
            continue
        if blob is not None:
            ranges.append(RangeRead(layer, blob, offset, end - offset, first, index - first))
        layer, blob, first, offset, end = extent.layer, extent.blob, index, start, stop
    if blob is not None:
        ranges.append(RangeRead(layer, blob, offset, end - offset, first, len(extents) - first))
    return ranges
