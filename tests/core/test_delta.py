"""Delta planning: every needed content is sent or copied, nothing held is sent, nothing twice,
in startup order; and the coalescing of extents into Range reads."""

from __future__ import annotations

import gzip
import zlib
from collections.abc import Mapping, Sequence
from typing import Any

import attrs
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from starlight_core.delta import (
    DeltaPlan,
    PlannedExtent,
    PlanOptions,
    RangeRead,
    Target,
    coalesce,
    plan,
)
from starlight_core.digest import Digest, sha256_digest
from starlight_core.errors import CorruptLayer
from starlight_core.fsview import merge
from starlight_core.layer.toc import TOC, Chunk, Entry, EntryType, LayerInfo
from starlight_core.oci import OCI_LAYER_GZIP

# -- building layers: TOC + blob, each chunk one gzip member -------------------------------

Spec = tuple[Any, ...]
"""("file", name, data) | ("dir", name) | ("wh", name) | ("link", name, target)."""


@attrs.frozen
class Layer:
    toc: TOC
    blob: bytes


CONTENTS: dict[Digest, bytes] = {}


def build_layer(specs: Sequence[Spec], *, chunk_size: int = 4) -> Layer:
    """A fake Starlight blob: a "header" member before every entry (so extents have gaps), then
    the file's chunks, each its own gzip member."""
    blob = bytearray()
    entries = []
    for spec in specs:
        kind, name = spec[0], spec[1]
        blob += gzip.compress(b"header " + name.encode(), mtime=0)
        if kind == "file":
            data: bytes = spec[2]
            CONTENTS[sha256_digest(data)] = data
            chunks = []
            for offset in range(0, len(data), chunk_size):
                piece = data[offset : offset + chunk_size]
                member = gzip.compress(piece, mtime=0)
                chunks.append(
                    Chunk(offset, len(piece), len(blob), len(member), sha256_digest(piece))
                )
                blob += member
            entries.append(
                Entry(
                    name=name,
                    type=EntryType.FILE,
                    size=len(data),
                    digest=sha256_digest(data),
                    chunks=tuple(chunks),
                )
            )
        elif kind == "dir":
            entries.append(Entry(name=name, type=EntryType.DIR, mode=0o755))
        elif kind == "wh":
            parent, _, base = name.rpartition("/")
            marker = f"{parent}/.wh.{base}" if parent else f".wh.{base}"
            entries.append(Entry(name=marker, type=EntryType.WHITEOUT))
        elif kind == "link":
            entries.append(Entry(name=name, type=EntryType.HARDLINK, linkname=spec[2]))
        else:
            raise AssertionError(kind)
    digest = sha256_digest(bytes(blob))
    info = LayerInfo(digest=digest, size=len(blob), diff_id=digest, media_type=OCI_LAYER_GZIP)
    return Layer(TOC(layer=info, entries=tuple(entries), chunk_size=chunk_size), bytes(blob))


def read_extent(blobs: Mapping[Digest, bytes], extent: PlannedExtent) -> bytes:
    chunk = extent.chunk
    return blobs[extent.blob][
        chunk.compressed_offset : chunk.compressed_offset + chunk.compressed_size
    ]


def apply_plan(
    delta: DeltaPlan, blobs: Mapping[Digest, bytes], held: Mapping[Digest, bytes]
) -> dict[Digest, bytes]:
    """What the worker ends up with: contents rebuilt from the extents, plus local copies."""
    got: dict[Digest, bytearray] = {}
    for extent in delta.extents:
        data = zlib.decompress(read_extent(blobs, extent), wbits=31)
        assert sha256_digest(data) == extent.chunk.digest
        buffer = got.setdefault(extent.content, bytearray())
        assert extent.chunk.offset == len(buffer)
        buffer += data
    result = {content: bytes(data) for content, data in got.items()}
    for content in delta.local:
        assert content not in result
        result[content] = held[content]
    return result


def needed(targets: Sequence[Target]) -> set[Digest]:
    return {
        e.digest
        for t in targets
        for toc in t.layers
        for e in toc.entries
        if e.has_content and e.digest
    }


def check_plan(targets: Sequence[Target], blobs: Mapping[Digest, bytes], have: set[Digest]) -> None:
    """The properties every plan must have, whatever the ordering."""
    delta = plan(targets, have)
    held = {d: CONTENTS[d] for d in have if d in CONTENTS}
    got = apply_plan(delta, blobs, held)
    # Everything needed is there and correct; everything there is needed.
    for target in targets:
        for toc in target.layers:
            for entry in toc.files():
                assert entry.digest is not None
                assert got[entry.digest] == CONTENTS[entry.digest]
    assert set(got) == needed(targets)
    # Nothing held is sent; local copies are exactly what is held and needed.
    sent = delta.sent
    assert not set(sent) & have
    assert set(delta.local) == needed(targets) & have
    # No content twice, and each content's chunks are one consecutive run 0..n-1.
    assert len(sent) == len(set(sent))
    runs: list[list[PlannedExtent]] = []
    for extent in delta.extents:
        if runs and runs[-1][0].content == extent.content:
            runs[-1].append(extent)
        else:
            runs.append([extent])
    assert len(runs) == len(sent)
    for run in runs:
        assert [e.chunk_index for e in run] == list(range(len(run)))
        assert len({e.blob for e in run}) == 1
    # Deterministic.
    assert plan(targets, have) == delta


def order_keys(
    targets: Sequence[Target], delta: DeltaPlan
) -> dict[Digest, tuple[int, float, int, int]]:
    """Each content's place, computed independently from the merged views."""
    where = {toc.layer.digest: i for i, toc in enumerate(delta.layers)}
    keys: dict[Digest, tuple[int, float, int, int]] = {}

    def offer(content: Digest, key: tuple[int, float, int, int]) -> None:
        keys[content] = min(keys.get(content, key), key)

    for target in targets:
        view = merge(target.layers)
        for name, node in view.files():
            assert node.entry.digest is not None
            layer = where[target.layers[node.layer].layer.digest]
            rank = target.ranks.get(name)
            group = 1 if rank is None else 0
            offer(node.entry.digest, (group, rank or 0, layer, node.index))
    for layer, toc in enumerate(delta.layers):
        for index, entry in enumerate(toc.entries):
            if entry.has_content and entry.digest:
                offer(entry.digest, (2, 0, layer, index))
    return keys


# -- generated cases -----------------------------------------------------------------------

_POOL = [b"alpha", b"bravo-bravo-bravo", b"c", b"delta delta", b"e" * 9, b""]
_NAMES = ["bin/a", "bin/b", "lib/c", "lib/d", "e"]


@st.composite
def layer_specs(draw: st.DrawFn) -> list[Spec]:
    specs: list[Spec] = []
    for _ in range(draw(st.integers(0, 6))):
        kind = draw(st.sampled_from(["file", "file", "file", "wh", "link", "dir"]))
        name = draw(st.sampled_from(_NAMES))
        if kind == "file":
            specs.append(("file", name, draw(st.sampled_from(_POOL))))
        elif kind == "wh":
            specs.append(("wh", draw(st.sampled_from([*_NAMES, "bin", "lib"]))))
        elif kind == "dir":
            specs.append(("dir", draw(st.sampled_from(["bin", "lib"]))))
        else:
            earlier = [s[1] for s in specs if s[0] == "file" and s[1] != name]
            if earlier:
                specs.append(("link", name, draw(st.sampled_from(earlier))))
    return specs


@st.composite
def scenarios(draw: st.DrawFn) -> tuple[list[Target], dict[Digest, bytes], set[Digest]]:
    blobs: dict[Digest, bytes] = {}
    shared: list[Layer] = []
    targets = []
    for _ in range(draw(st.integers(1, 3))):
        layers: list[Layer] = []
        reuse = draw(st.booleans())
        if shared and reuse:
            layers.append(shared[0])  # a base layer several targets share
        for _ in range(draw(st.integers(1, 3))):
            layers.append(
                build_layer(draw(layer_specs()), chunk_size=draw(st.sampled_from([3, 4, 64])))
            )
        shared.extend(layers)
        for layer in layers:
            blobs[layer.toc.layer.digest] = layer.blob
        ranks = draw(st.dictionaries(st.sampled_from(_NAMES), st.integers(0, 4), max_size=4))
        targets.append(Target(layers=tuple(layer.toc for layer in layers), ranks=ranks))
    pool = [sha256_digest(c) for c in _POOL]
    have = set(draw(st.lists(st.sampled_from(pool), unique=True)))
    if draw(st.booleans()):
        have.add(sha256_digest(b"something else the worker holds"))
    return targets, blobs, have


@settings(max_examples=300, deadline=None)
@given(scenarios())
def test_plan_reconstructs_every_file_and_sends_nothing_twice(
    scenario: tuple[list[Target], dict[Digest, bytes], set[Digest]],
) -> None:
    check_plan(*scenario)


@settings(max_examples=300, deadline=None)
@given(scenarios())
def test_plan_order_ranks_then_visible_then_hidden(
    scenario: tuple[list[Target], dict[Digest, bytes], set[Digest]],
) -> None:
    targets, _, have = scenario
    delta = plan(targets, have)
    keys = order_keys(targets, delta)
    for sequence in (delta.sent, delta.local):
        placed = [keys[content] for content in sequence]
        assert placed == sorted(placed)
        groups = [key[0] for key in placed]
        ranks = [key[1] for key in placed if key[0] == 0]
        assert groups == sorted(groups)
        assert ranks == sorted(ranks)
    # The first chunk of each sent content comes from the entry that earned its place.
    for extent in delta.extents:
        if extent.chunk_index == 0:
            _, _, layer, index = keys[extent.content]
            assert extent.layer == layer
            assert delta.layers[layer].entries[index].chunks[0] == extent.chunk


@settings(max_examples=200, deadline=None)
@given(scenarios())
def test_plan_without_ordering_is_layer_order(
    scenario: tuple[list[Target], dict[Digest, bytes], set[Digest]],
) -> None:
    targets, blobs, have = scenario
    delta = plan(targets, have, PlanOptions(ordering=False))
    first: dict[Digest, tuple[int, int]] = {}
    for layer, toc in enumerate(delta.layers):
        for index, entry in enumerate(toc.entries):
            if entry.has_content and entry.digest:
                first.setdefault(entry.digest, (layer, index))
    assert [first[c] for c in delta.sent] == sorted(first[c] for c in delta.sent)
    assert [first[c] for c in delta.local] == sorted(first[c] for c in delta.local)
    held = {d: CONTENTS[d] for d in have if d in CONTENTS}
    assert set(apply_plan(delta, blobs, held)) == needed(targets)


# -- hand-written cases --------------------------------------------------------------------


def test_shared_content_is_sent_once_from_its_first_place() -> None:
    base = build_layer([("file", "bin/sh", b"shell!"), ("file", "etc/a", b"same")])
    app = build_layer([("file", "app/x", b"same"), ("file", "app/y", b"new stuff")])
    other = build_layer([("file", "srv/z", b"same")])
    targets = [Target(layers=(base.toc, app.toc)), Target(layers=(base.toc, other.toc))]
    delta = plan(targets)
    assert delta.targets == ((0, 1), (0, 2))
    assert len(delta.layers) == 3
    assert delta.sent == tuple(sha256_digest(c) for c in (b"shell!", b"same", b"new stuff"))
    same = [e for e in delta.extents if e.content == sha256_digest(b"same")]
    assert {e.blob for e in same} == {base.toc.layer.digest}


def test_held_contents_are_copied_not_sent_and_empty_files_need_nothing() -> None:
    layer = build_layer([("file", "a", b"held"), ("file", "b", b"missing"), ("file", "c", b"")])
    delta = plan([Target(layers=(layer.toc,))], {sha256_digest(b"held")})
    assert delta.local == (sha256_digest(b"held"),)
    assert delta.sent == (sha256_digest(b"missing"),)
    assert delta.compressed_size == sum(e.chunk.compressed_size for e in delta.extents)


def test_ranked_first_then_visible_then_overridden_and_deleted_contents_last() -> None:
    base = build_layer(
        [("file", "old", b"overridden"), ("file", "gone", b"deleted"), ("file", "z", b"zzz")]
    )
    upper = build_layer([("file", "old", b"replacement"), ("wh", "gone"), ("file", "y", b"yy")])
    target = Target(layers=(base.toc, upper.toc), ranks={"y": 0, "old": 1, "gone": 0})
    delta = plan([target])
    assert list(delta.sent) == [
        sha256_digest(b"yy"),  # rank 0 ("gone" is ranked too, but invisible)
        sha256_digest(b"replacement"),  # rank 1
        sha256_digest(b"zzz"),  # visible, unranked
        sha256_digest(b"overridden"),  # invisible: base layer order
        sha256_digest(b"deleted"),
    ]
    plain = plan([target], options=PlanOptions(ordering=False))
    assert plain.sent == tuple(
        sha256_digest(c) for c in (b"overridden", b"deleted", b"zzz", b"replacement", b"yy")
    )


def test_joint_targets_interleave_by_rank() -> None:
    one = build_layer([("file", "a1", b"A1"), ("file", "a2", b"A2")])
    two = build_layer([("file", "b1", b"B1"), ("file", "b2", b"B2")])
    delta = plan(
        [
            Target(layers=(one.toc,), ranks={"a1": 0, "a2": 2}),
            Target(layers=(two.toc,), ranks={"b1": 1, "b2": 2}),
        ]
    )
    assert delta.sent == tuple(sha256_digest(c) for c in (b"A1", b"B1", b"A2", b"B2"))


def test_hard_link_carries_its_own_rank() -> None:
    layer = build_layer(
        [
            ("file", "bin/busybox", b"the big binary"),
            ("file", "x", b"x"),
            ("link", "bin/sh", "bin/busybox"),
        ]
    )
    delta = plan([Target(layers=(layer.toc,), ranks={"bin/sh": 0})])
    assert delta.sent[0] == sha256_digest(b"the big binary")
    # A file of several chunks is sent as consecutive extents, chunk by chunk.
    first = [e for e in delta.extents if e.content == delta.sent[0]]
    assert [e.chunk_index for e in first] == [0, 1, 2, 3]
    assert delta.extents[:4] == tuple(first)


def test_corrupt_tocs_are_refused() -> None:
    layer = build_layer([("file", "a", b"abcdefgh")])
    entry = layer.toc.entries[0]
    broken = attrs.evolve(entry, chunks=entry.chunks[:1])
    toc = attrs.evolve(layer.toc, entries=(broken,))
    with pytest.raises(CorruptLayer, match="do not cover"):
        plan([Target(layers=(toc,))])
    nodigest = attrs.evolve(layer.toc, entries=(attrs.evolve(entry, digest=None),))
    with pytest.raises(CorruptLayer, match="no digest"):
        plan([Target(layers=(nodigest,))])
    # A held content is never read, so its chunks do not matter.
    assert plan([Target(layers=(toc,))], {entry.digest or ""}).local == (entry.digest,)


# -- coalescing ----------------------------------------------------------------------------


def _extent(blob: str, offset: int, size: int, layer: int = 0) -> PlannedExtent:
    digest = sha256_digest(f"{blob}{offset}".encode())
    chunk = Chunk(0, size, offset, size, digest)
    return PlannedExtent(digest, 0, chunk, layer, sha256_digest(blob.encode()))


def test_coalesce_merges_forward_runs_of_one_blob() -> None:
    a, b = sha256_digest(b"a"), sha256_digest(b"b")
    extents = [
        _extent("a", 0, 10),
        _extent("a", 15, 10),  # gap 5: merged
        _extent("a", 100, 10),  # gap 75: new range
        _extent("a", 50, 10),  # backwards: new range
        _extent("b", 60, 10, layer=1),  # another blob
        _extent("b", 70, 100, layer=1),  # would exceed max_size: new range
        _extent("b", 170, 500, layer=1),  # alone larger than max_size
    ]
    ranges = coalesce(extents, max_gap=16, max_size=100)
    assert ranges == [
        RangeRead(0, a, 0, 25, 0, 2),
        RangeRead(0, a, 100, 10, 2, 1),
        RangeRead(0, a, 50, 10, 3, 1),
        RangeRead(1, b, 60, 10, 4, 1),
        RangeRead(1, b, 70, 100, 5, 1),
        RangeRead(1, b, 170, 500, 6, 1),
    ]
    assert coalesce([]) == []


@settings(max_examples=100, deadline=None)
@given(scenarios(), st.integers(0, 64), st.integers(1, 256))
def test_coalesced_reads_deliver_the_same_bytes_in_send_order(
    scenario: tuple[list[Target], dict[Digest, bytes], set[Digest]], max_gap: int, max_size: int
) -> None:
    targets, blobs, have = scenario
    delta = plan(targets, have)
    ranges = coalesce(delta.extents, max_gap=max_gap, max_size=max_size)
    assert sum(r.count for r in ranges) == len(delta.extents)
    index = 0
    for r in ranges:
        assert r.first == index
        body = blobs[r.blob][r.offset : r.end]
        position = r.offset
        members = delta.extents[r.first : r.first + r.count]
        assert r.length <= max_size or r.count == 1
        for extent in members:
            assert extent.blob == r.blob
            assert extent.layer == r.layer
            gap = extent.chunk.compressed_offset - position
            assert 0 <= gap <= max_gap or extent is members[0]
            start = extent.chunk.compressed_offset - r.offset
            assert body[start : start + extent.chunk.compressed_size] == read_extent(blobs, extent)
            position = extent.chunk.compressed_offset + extent.chunk.compressed_size
        assert position == r.end
        index += r.count
