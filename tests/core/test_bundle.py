"""The bundle codec, driven like h11's test_io: whole input, byte by byte, hypothesis split
points, trailing bytes, truncation at every offset, corrupt extents, every protocol violation,
and resumption from every offset (both the proxy's side and the worker's)."""

from __future__ import annotations

import gzip
import io
import itertools
import json
import tarfile
import tracemalloc
import zlib
from collections.abc import Sequence
from typing import Any

import attrs
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from starlight_core import errors, wire
from starlight_core.bundle import (
    MAGIC,
    NEED_DATA,
    BundleHeader,
    BundleLayout,
    BundleReader,
    End,
    Event,
    Extent,
    ExtentDescriptor,
    Header,
    ImageInfo,
    NeedData,
    RecordType,
    ResumeInfo,
    build_header,
    decompress_extent,
    encode_end,
    encode_error,
    encode_extent,
    encode_header,
    error_for,
    fill_omitted,
    start_bundle,
)
from starlight_core.delta import DeltaPlan, Target, plan
from starlight_core.digest import Digest, sha256_digest
from starlight_core.errors import BundleProtocolError, DigestMismatch, StarlightError
from starlight_core.layer.toc import TOC, LayerInfo
from tests.core.test_delta import CONTENTS, apply_plan, build_layer

# -- a sample bundle -----------------------------------------------------------------------


@attrs.frozen
class Sample:
    plan: DeltaPlan
    header: BundleHeader
    header_bytes: bytes
    stream: bytes
    blobs: dict[Digest, bytes]

    def extent_data(self, index: int) -> bytes:
        extent = self.plan.extents[index]
        chunk = extent.chunk
        blob = self.blobs[extent.blob]
        return blob[chunk.compressed_offset : chunk.compressed_offset + chunk.compressed_size]

    @property
    def layout(self) -> BundleLayout:
        return BundleLayout.of(self.header, len(self.header_bytes))

    def events(self) -> list[Event]:
        result: list[Event] = [Header(self.header, len(self.header_bytes))]
        result += [Extent(i, d, self.extent_data(i)) for i, d in enumerate(self.header.extents)]
        result.append(End(len(self.header.extents), self.layout.end_start))
        return result


def image_for(indexes: tuple[int, ...], n: int = 0) -> ImageInfo:
    manifest = json.dumps({"schemaVersion": 2, "n": n, "é": "ü"}, ensure_ascii=False)
    return ImageInfo(
        reference=f"registry.example/app:{n}",
        manifest_digest=sha256_digest(manifest.encode()),
        manifest_media_type="application/vnd.oci.image.manifest.v1+json",
        manifest=manifest,
        config_digest=sha256_digest(b"{}"),
        config="{}",
        platform="linux/amd64",
        layers=indexes,
    )


def make_sample(
    layer_specs: Sequence[Sequence[tuple[Any, ...]]] | None = None,
    have: set[Digest] | None = None,
) -> Sample:
    if layer_specs is None:
        layer_specs = [
            [("file", "bin/sh", b"#!/bin/busybox sh\n"), ("file", "etc/motd", b"hello")],
            [("file", "app/main", b"print('hi')\n" * 3), ("file", "app/held", b"cached")],
        ]
    layers = [build_layer(specs, chunk_size=8) for specs in layer_specs]
    blobs = {layer.toc.layer.digest: layer.blob for layer in layers}
    delta = plan(
        [Target(layers=tuple(layer.toc for layer in layers), ranks={"app/main": 0})],
        {sha256_digest(b"cached")} if have is None else have,
    )
    header = build_header(delta, [image_for(delta.targets[0])])
    header_bytes = encode_header(header)
    stream = bytearray(header_bytes)
    for index, extent in enumerate(delta.extents):
        chunk = extent.chunk
        data = blobs[extent.blob][
            chunk.compressed_offset : chunk.compressed_offset + chunk.compressed_size
        ]
        stream += encode_extent(index, data)
    stream += encode_end(len(delta.extents), len(stream))
    return Sample(delta, header, header_bytes, bytes(stream), blobs)


SAMPLE = make_sample()


def drain(reader: BundleReader) -> list[Event]:
    events: list[Event] = []
    while True:
        event = reader.next_event()
        if isinstance(event, NeedData):
            assert event is NEED_DATA
            return events
        events.append(event)


def feed(chunks: Sequence[bytes], reader: BundleReader | None = None) -> list[Event]:
    reader = reader or BundleReader()
    events: list[Event] = []
    for chunk in chunks:
        reader.receive_data(chunk)
        events += drain(reader)
    reader.receive_data(b"")
    events += drain(reader)
    assert reader.done
    return events


def split(data: bytes, points: Sequence[int]) -> list[bytes]:
    cuts = sorted({0, len(data), *(p % (len(data) + 1) for p in points)})
    return [data[a:b] for a, b in itertools.pairwise(cuts)]


def _records(stream: bytes, sample: Sample = SAMPLE) -> list[bytes]:
    layout = sample.layout
    starts = [len(MAGIC), layout.header_size, *layout.extent_starts[1:], layout.end_start]
    if not layout.extent_starts:
        starts = [len(MAGIC), layout.header_size]
    ends = [*starts[1:], layout.total]
    return [stream[a:b] for a, b in zip(starts, ends, strict=True)]


def record(kind: int, payload: bytes) -> bytes:
    return bytes([kind]) + len(payload).to_bytes(4, "big") + payload


def header_record(data: Any) -> bytes:
    return record(RecordType.HEADER, gzip.compress(json.dumps(data).encode(), mtime=0))


# -- whole, byte by byte, split anywhere ---------------------------------------------------


def test_sample_shape() -> None:
    assert len(SAMPLE.plan.extents) >= 5  # several contents, several chunks each
    assert SAMPLE.header.local == (sha256_digest(b"cached"),)
    assert _records(SAMPLE.stream)[0] == SAMPLE.header_bytes[len(MAGIC) :]
    assert len(_records(SAMPLE.stream)) == len(SAMPLE.plan.extents) + 2
    assert SAMPLE.layout.total == len(SAMPLE.stream)


def test_whole_input() -> None:
    reader = BundleReader()
    reader.receive_data(SAMPLE.stream)
    events = drain(reader)
    assert events == SAMPLE.events()
    assert reader.done
    assert reader.header == SAMPLE.header
    assert reader.offset == len(SAMPLE.stream)
    assert reader.pending == b""
    reader.receive_data(b"")
    assert reader.next_event() is NEED_DATA


def test_byte_by_byte() -> None:
    stream = SAMPLE.stream
    assert feed([stream[i : i + 1] for i in range(len(stream))]) == SAMPLE.events()


@settings(max_examples=200)
@given(st.lists(st.integers(min_value=0), max_size=12))
def test_any_split_points(points: list[int]) -> None:
    assert feed(split(SAMPLE.stream, points)) == SAMPLE.events()


def test_contents_verify_and_rebuild_every_file() -> None:
    chunks: dict[Digest, bytearray] = {}
    for event in feed([SAMPLE.stream]):
        if isinstance(event, Extent):
            data = event.verified_data()
            buffer = chunks.setdefault(event.descriptor.content, bytearray())
            assert event.descriptor.offset == len(buffer)
            buffer += data
    for content, rebuilt in chunks.items():
        assert bytes(rebuilt) == CONTENTS[content]
    held = {content: CONTENTS[content] for content in SAMPLE.header.local}
    assert {**{c: bytes(d) for c, d in chunks.items()}, **held} == apply_plan(
        SAMPLE.plan, SAMPLE.blobs, held
    )


def test_empty_bundle() -> None:
    sample = make_sample([[("file", "a", b"held")]], have={sha256_digest(b"held")})
    assert sample.header.extents == ()
    assert feed([sample.stream]) == sample.events()


@settings(max_examples=50, deadline=None)
@given(
    st.lists(st.binary(max_size=40), min_size=1, max_size=6),
    st.lists(st.integers(min_value=0), max_size=6),
)
def test_generated_bundles(contents: list[bytes], points: list[int]) -> None:
    sample = make_sample([[("file", f"f{i}", data) for i, data in enumerate(contents)]], set())
    events = feed(split(sample.stream, points))
    assert events == sample.events()
    for event in events:
        if isinstance(event, Extent):
            assert (
                event.verified_data()
                == CONTENTS[event.descriptor.content][
                    event.descriptor.offset : event.descriptor.offset + event.descriptor.size
                ]
            )


# -- truncation, trailing bytes, corruption ------------------------------------------------


def test_truncation_at_every_offset() -> None:
    stream = SAMPLE.stream
    for cut in range(len(stream)):
        reader = BundleReader()
        reader.receive_data(stream[:cut])
        reader.receive_data(b"")
        with pytest.raises(BundleProtocolError, match="truncated"):
            drain(reader)
        with pytest.raises(BundleProtocolError, match="truncated"):  # and it stays broken
            reader.next_event()


def test_trailing_bytes_after_end() -> None:
    reader = BundleReader()
    reader.receive_data(SAMPLE.stream + b"\x00")
    with pytest.raises(BundleProtocolError, match="1 bytes after the END record"):
        drain(reader)
    reader = BundleReader()
    reader.receive_data(SAMPLE.stream)
    assert drain(reader) == SAMPLE.events()
    reader.receive_data(record(RecordType.END, b"{}"))
    with pytest.raises(BundleProtocolError, match="after the END record"):
        reader.next_event()


def test_corrupt_bytes_in_an_extent_are_a_digest_mismatch() -> None:
    index = 0
    data = SAMPLE.extent_data(index)
    descriptor = SAMPLE.header.extents[index]
    assert decompress_extent(descriptor, data) == CONTENTS[descriptor.content][:8]
    # Bytes 4..9 of a gzip member (mtime, extra flags, OS) do not affect its content.
    for position in [*range(4), *range(10, len(data))]:
        bad = bytearray(data)
        bad[position] ^= 0xFF
        with pytest.raises(DigestMismatch):
            decompress_extent(descriptor, bytes(bad))
        # The framing is intact: the reader hands the extent over, verification refuses it.
        stream = bytearray(SAMPLE.stream)
        stream[SAMPLE.layout.extent_starts[index] + 9 + position] ^= 0xFF
        events = feed([bytes(stream)])
        extent = events[1 + index]
        assert isinstance(extent, Extent)
        with pytest.raises(DigestMismatch):
            extent.verified_data()


def _descriptor(data: bytes, compressed: bytes, **changes: Any) -> ExtentDescriptor:
    descriptor = ExtentDescriptor(
        sha256_digest(data), 0, 0, len(data), len(compressed), sha256_digest(data)
    )
    return attrs.evolve(descriptor, **changes)


def test_decompress_extent_refuses_everything_but_one_exact_member() -> None:
    data = b"some file content" * 10
    member = gzip.compress(data, mtime=0)
    assert decompress_extent(_descriptor(data, member), member) == data
    cases = {
        "another gzip member": member + gzip.compress(b"more", mtime=0),
        "bytes after the gzip member": member + b"garbage",
        "truncated": member[:-9],
        "not a valid gzip member": zlib.compress(data),
    }
    for message, bad in cases.items():
        with pytest.raises(DigestMismatch, match=message):
            decompress_extent(_descriptor(data, bad), bad)
    with pytest.raises(DigestMismatch, match="more than the declared 10 bytes"):
        decompress_extent(_descriptor(data, member, size=10), member)
    with pytest.raises(DigestMismatch, match="inflates to 170 bytes, expected 171"):
        decompress_extent(_descriptor(data, member, size=171), member)
    with pytest.raises(DigestMismatch, match="expected sha256:"):
        decompress_extent(_descriptor(data, member, digest=sha256_digest(b"x")), member)
    with pytest.raises(DigestMismatch, match="compressed bytes"):
        decompress_extent(_descriptor(data, member), member[:-1])


def test_gzip_bomb_allocates_no_more_than_the_declared_size() -> None:
    bomb = gzip.compress(bytes(64 * 1024 * 1024), compresslevel=9, mtime=0)
    descriptor = _descriptor(b"tiny", bomb, size=4)
    tracemalloc.start()
    try:
        with pytest.raises(DigestMismatch, match="more than the declared 4 bytes"):
            decompress_extent(descriptor, bomb)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1024 * 1024


# -- protocol violations -------------------------------------------------------------------

_HEADER_JSON = json.loads(wire.dumps(SAMPLE.header))


def _violations() -> dict[str, tuple[bytes, str]]:
    records = _records(SAMPLE.stream)
    head, *extents, end = records
    first = extents[0]
    size = len(extents[0]) - 9
    return {
        "bad magic": (b"\x89SLBNDX\n" + b"".join(records), "not a Starlight bundle"),
        "gzip instead": (gzip.compress(SAMPLE.stream), "not a Starlight bundle"),
        "extent first": (MAGIC + first + head, "before the HEADER"),
        "end first": (MAGIC + end, "before the HEADER"),
        "second header": (MAGIC + head + head, "a second HEADER"),
        "unknown type": (MAGIC + head + record(0x05, b""), "unknown record type 0x05"),
        "index out of range": (
            MAGIC + head + record(RecordType.EXTENT, (999).to_bytes(4, "big") + b"x" * size),
            "for extent 999, but the header lists",
        ),
        "out of order": (MAGIC + head + extents[1], "expected extent 0"),
        "repeated": (MAGIC + head + first + first, "expected extent 1"),
        "length mismatch": (
            MAGIC + head + record(RecordType.EXTENT, first[5:] + b"!"),
            f"carries {size + 1} bytes; its descriptor says {size}",
        ),
        "short extent": (MAGIC + head + record(RecordType.EXTENT, b"ab"), "EXTENT record of 2"),
        "end too early": (MAGIC + head + first + end, "after 1 extents"),
        "end wrong count": (
            MAGIC + head + b"".join(extents) + record(RecordType.END, b'{"extents":1,"bytes":0}'),
            "it says 1",
        ),
        "end wrong bytes": (
            MAGIC
            + head
            + b"".join(extents)
            + encode_end(len(extents), SAMPLE.layout.end_start + 1),
            "says the stream before it was",
        ),
        "end not json": (MAGIC + head + b"".join(extents) + record(3, b"{"), "not JSON"),
        "end extra key": (
            MAGIC
            + head
            + b"".join(extents)
            + record(
                3, b'{"extents":%d,"bytes":%d,"x":1}' % (len(extents), SAMPLE.layout.end_start)
            ),
            "invalid END record",
        ),
        "huge end": (MAGIC + head + record(3, b" " * 70000), "END record of 70000"),
        "header not gzip": (MAGIC + record(1, b"{}"), "not valid gzip"),
        "header two members": (
            MAGIC + record(1, head[5:] + gzip.compress(b"{}")),
            "bytes after its gzip stream",
        ),
        "header not json": (MAGIC + record(1, gzip.compress(b"{")), "not JSON"),
        "header not object": (MAGIC + header_record([1]), "not a JSON object"),
        "header version": (MAGIC + header_record({**_HEADER_JSON, "version": 2}), "version 2"),
        "header extra key": (
            MAGIC + header_record({**_HEADER_JSON, "surprise": 1}),
            "invalid bundle header",
        ),
        "header bad id": (
            MAGIC + header_record({**_HEADER_JSON, "bundle_id": "xyz"}),
            "invalid bundle header",
        ),
        "header bad extent": (
            MAGIC + header_record({**_HEADER_JSON, "extents": [[1, 2]]}),
            "invalid bundle header",
        ),
        "header bad layer index": (
            MAGIC
            + header_record(
                {**_HEADER_JSON, "images": [{**_HEADER_JSON["images"][0], "layers": [0, 7]}]}
            ),
            "names a layer the header does not hold",
        ),
    }


@pytest.mark.parametrize("name", sorted(_violations()))
def test_protocol_violations(name: str) -> None:
    stream, message = _violations()[name]
    reader = BundleReader()
    reader.receive_data(stream)
    reader.receive_data(b"")
    with pytest.raises(BundleProtocolError, match=message) as caught:
        drain(reader)
    with pytest.raises(BundleProtocolError) as again:
        reader.next_event()
    assert again.value is caught.value


def test_violations_are_seen_without_waiting_for_the_payload() -> None:
    """Framing errors are raised from the record's first bytes: nothing oversized is buffered."""
    head = _records(SAMPLE.stream)[0]
    reader = BundleReader(max_header_size=9_999)
    reader.receive_data(MAGIC + bytes([RecordType.HEADER]) + (10_000).to_bytes(4, "big"))
    with pytest.raises(BundleProtocolError, match="exceeds the 9999-byte limit"):
        reader.next_event()
    reader = BundleReader()
    reader.receive_data(MAGIC + head + bytes([RecordType.EXTENT]) + (5 << 20).to_bytes(4, "big"))
    assert drain(reader) == [Header(SAMPLE.header, len(SAMPLE.header_bytes))]
    reader.receive_data(bytes(4))  # the extent index: now the length can be checked
    with pytest.raises(BundleProtocolError, match="descriptor says"):
        drain(reader)
    reader = BundleReader()
    reader.receive_data(b"\x89SLX")
    with pytest.raises(BundleProtocolError, match="not a Starlight bundle"):
        reader.next_event()


def test_header_gzip_bomb_is_bounded() -> None:
    bomb = gzip.compress(b"[" + b" " * (8 << 20) + b"]", mtime=0)
    reader = BundleReader(max_header_json_size=1 << 20)
    reader.receive_data(MAGIC + record(RecordType.HEADER, bomb))
    with pytest.raises(BundleProtocolError, match="inflates to more than 1048576 bytes"):
        reader.next_event()


@pytest.mark.parametrize(
    "error",
    [
        errors.RegistryUnavailable("registry.example: connection refused"),
        errors.DigestMismatch("blob sha256:… does not match"),
        errors.ImageNotFound("no such image"),
        errors.NotFound("gone"),
        errors.StarlightError("plain"),
    ],
)
def test_error_record_raises_the_error_it_names(error: StarlightError) -> None:
    head, first, *_ = _records(SAMPLE.stream)
    reader = BundleReader()
    reader.receive_data(MAGIC + head + first + encode_error(error))
    events: list[Event] = []
    with pytest.raises(type(error)) as caught:
        events += drain(reader)
    assert type(caught.value) is type(error)
    assert caught.value.message == error.message
    with pytest.raises(type(error)):
        reader.next_event()
    # Even before the header (the proxy failed at once).
    reader = BundleReader()
    reader.receive_data(MAGIC + encode_error(error))
    with pytest.raises(type(error)):
        reader.next_event()


def test_unknown_error_codes() -> None:
    error = error_for("from_the_future", "something new")
    assert type(error) is StarlightError
    assert "something new" in error.message
    assert "from_the_future" in error.message
    for cls in (errors.UnsafePath, errors.TooManyRequests, errors.ProxyUnavailable):
        assert type(error_for(cls.code, "m")) is cls


def test_local_misuse() -> None:
    reader = BundleReader()
    reader.receive_data(b"")
    with pytest.raises(RuntimeError):
        reader.receive_data(b"more")


# -- determinism and the header ------------------------------------------------------------


def test_bundle_id_names_the_plan() -> None:
    again = make_sample()
    assert again.header.bundle_id == SAMPLE.header.bundle_id
    assert again.stream == SAMPLE.stream
    other = make_sample(have=set())
    assert other.header.bundle_id != SAMPLE.header.bundle_id
    resumed = build_header(
        SAMPLE.plan,
        SAMPLE.header.images,
        resume=ResumeInfo(bundle_id=SAMPLE.header.bundle_id, offset=10),
    )
    assert resumed.bundle_id not in (SAMPLE.header.bundle_id, other.header.bundle_id)
    reader = BundleReader()
    reader.receive_data(encode_header(resumed))
    event = reader.next_event()
    assert isinstance(event, Header)
    assert event.header == resumed
    with pytest.raises(ValueError, match=r"match plan\.targets"):
        build_header(SAMPLE.plan, [])
    # One serialisation instead of two, the same result.
    assert start_bundle(SAMPLE.plan, SAMPLE.header.images) == (SAMPLE.header, SAMPLE.header_bytes)
    assert start_bundle(SAMPLE.plan, SAMPLE.header.images, resume=resumed.resume) == (
        resumed,
        encode_header(resumed),
    )


def test_header_json_form() -> None:
    data = json.loads(wire.dumps(SAMPLE.header))
    assert list(data)[:2] == ["version", "bundle_id"]
    assert data["version"] == 1
    # Contents are named by where a TOC lists them: [layer, entry, chunk] for an extent,
    # [layer, entry] for a local copy.
    extent = SAMPLE.header.extents[0]
    layer, index, chunk_index = data["extents"][0]
    entry = SAMPLE.header.layers[layer].entries[index]
    assert entry.digest == extent.content
    assert chunk_index == extent.chunk_index
    assert entry.chunks[chunk_index].compressed_size == extent.compressed_size
    assert all(len(item) == 3 for item in data["extents"])
    (held,) = data["local"]
    assert SAMPLE.header.layers[held[0]].entries[held[1]].digest == SAMPLE.header.local[0]
    assert data["images"][0]["manifest"] == SAMPLE.header.images[0].manifest
    assert wire.structure(data, BundleHeader) == SAMPLE.header
    assert data["layers"][0]["entries"][0]["name"] == SAMPLE.header.layers[0].entries[0].name
    # The full forms mean the same.
    data["extents"] = [
        [str(e.content), e.chunk_index, e.offset, e.size, e.compressed_size, str(e.digest)]
        for e in SAMPLE.header.extents
    ]
    data["local"] = [str(d) for d in SAMPLE.header.local]
    assert wire.structure(data, BundleHeader) == SAMPLE.header


def test_an_extent_that_differs_from_its_toc_keeps_the_full_form() -> None:
    first = SAMPLE.header.extents[0]
    odd = attrs.evolve(first, compressed_size=first.compressed_size + 1)
    header = attrs.evolve(SAMPLE.header, extents=(odd, *SAMPLE.header.extents[1:]))
    data = json.loads(wire.dumps(header))
    assert data["extents"][0] == [
        odd.content, odd.chunk_index, odd.offset, odd.size, odd.compressed_size, odd.digest
    ]  # fmt: skip
    assert wire.structure(data, BundleHeader) == header


@pytest.mark.parametrize(
    ("field", "item", "message"),
    [
        ("extents", [9, 0, 0], "names layer 9"),
        ("extents", [0, 99, 0], "names entry 99"),
        ("extents", [0, 0, 7], "chunk 7"),
        ("extents", [0, "0", 0], r"\[layer, entry\]"),
        ("local", [0, 99], "names entry 99"),
        ("local", 5, "a digest or"),
    ],
)
def test_bad_content_references_are_refused(field: str, item: Any, message: str) -> None:
    data = json.loads(wire.dumps(SAMPLE.header))
    data[field][0] = item
    with pytest.raises(errors.InvalidInput, match=message):
        wire.structure(data, BundleHeader)


def test_layers_the_worker_holds_go_without_entries_and_are_filled_back() -> None:
    base = SAMPLE.plan.layers[0]
    header, header_bytes = start_bundle(
        SAMPLE.plan, SAMPLE.header.images, omit={base.layer.diff_id}
    )
    assert header.omitted == (0,)
    assert header.layers[0].layer == base.layer
    assert header.layers[0].entries == ()
    assert header.layers[1] == SAMPLE.header.layers[1]
    assert header.extents == SAMPLE.header.extents  # what is sent does not change
    assert header.bundle_id != SAMPLE.header.bundle_id
    assert len(header_bytes) < len(SAMPLE.header_bytes)
    assert build_header(SAMPLE.plan, SAMPLE.header.images, omit={base.layer.diff_id}) == header
    assert header.local == SAMPLE.header.local == (sha256_digest(b"cached"),)
    # A content only an omitted layer holds is the worker's already: no local copy is due.
    app = SAMPLE.plan.layers[1]
    assert build_header(SAMPLE.plan, SAMPLE.header.images, omit={app.layer.diff_id}).local == ()
    reader = BundleReader()
    reader.receive_data(header_bytes)
    assert reader.next_event() == Header(header, len(header_bytes))

    asked: list[Digest] = []

    def held(layer: LayerInfo) -> TOC:
        asked.append(layer.diff_id)
        return base

    filled = fill_omitted(header, held)
    assert asked == [base.layer.diff_id]
    assert filled == attrs.evolve(SAMPLE.header, bundle_id=header.bundle_id)
    assert fill_omitted(SAMPLE.header, held) is SAMPLE.header  # nothing omitted: untouched

    # The worker holds another layer's TOC, or none: the header cannot be completed.
    with pytest.raises(BundleProtocolError, match="holds the TOC of"):
        fill_omitted(header, lambda layer: SAMPLE.plan.layers[1])

    def gone(layer: LayerInfo) -> TOC:
        raise errors.NotFound("layer is not in the store")

    with pytest.raises(BundleProtocolError, match="cannot provide it"):
        fill_omitted(header, gone)


def test_an_omitted_layer_must_be_an_entry_less_layer_of_the_header() -> None:
    data = json.loads(wire.dumps(SAMPLE.header))
    for omitted in ([5], [1]):  # out of range; a layer sent with its entries
        data["omitted"] = omitted
        reader = BundleReader()
        reader.receive_data(MAGIC + header_record(data))
        with pytest.raises(BundleProtocolError, match=r"omitted layer|which is not sent"):
            drain(reader)


# -- resumption ----------------------------------------------------------------------------


def proxy_answer(sample: Sample, offset: int, reads: list[int]) -> bytes:
    """What the proxy sends for ``offset=N``: built from the layout, reading only what it sends."""
    layout = BundleLayout.of(sample.header, len(sample.header_bytes))
    position = layout.locate(offset)
    count = len(sample.header.extents)
    out = []
    first, skip = position.index, position.skip
    if position.record == "header":
        out.append(sample.header_bytes[skip:])
        first, skip = 0, 0
    for index in range(first, count):
        reads.append(index)
        data = encode_extent(index, sample.extent_data(index))
        out.append(data[skip:] if index == first else data)
    if position.record != "done":
        end = encode_end(count, layout.end_start)
        out.append(end[skip:] if position.record == "end" else end)
    return b"".join(out)


def test_proxy_answers_any_offset_without_reading_skipped_extents() -> None:
    layout = SAMPLE.layout
    for offset in range(len(SAMPLE.stream) + 1):
        reads: list[int] = []
        assert proxy_answer(SAMPLE, offset, reads) == SAMPLE.stream[offset:]
        position = layout.locate(offset)
        if position.record == "extent":
            assert reads == list(range(position.index, len(SAMPLE.header.extents)))
    with pytest.raises(ValueError, match="outside the stream"):
        layout.locate(len(SAMPLE.stream) + 1)


def test_worker_resumes_from_every_offset() -> None:
    stream = SAMPLE.stream
    expected = SAMPLE.events()
    header_size = len(SAMPLE.header_bytes)
    for cut in range(header_size, len(stream) + 1):
        # The first attempt: everything up to ``cut``, then the connection breaks.
        first = BundleReader()
        first.receive_data(stream[:cut])
        got = drain(first)
        assert first.offset == cut
        # The second attempt continues where the first stopped, with its unfinished record.
        second = BundleReader.resume(
            SAMPLE.header, header_size=header_size, offset=first.offset, partial=first.pending
        )
        rest = feed([stream[cut:]], second) if cut < len(stream) else feed([], second)
        assert got + rest == expected


def test_resume_at_record_boundaries_without_partial_bytes() -> None:
    layout = SAMPLE.layout
    expected = SAMPLE.events()
    for i, start in enumerate([*layout.extent_starts, layout.end_start]):
        reader = BundleReader.resume(SAMPLE.header, header_size=layout.header_size, offset=start)
        assert reader.offset == start
        assert feed([SAMPLE.stream[start:]], reader) == expected[1 + i :]


def test_resume_misuse() -> None:
    header_size = len(SAMPLE.header_bytes)
    with pytest.raises(ValueError, match="inside a record"):
        BundleReader.resume(SAMPLE.header, header_size=header_size, offset=header_size + 3)
    with pytest.raises(ValueError, match="cannot resume"):
        BundleReader.resume(SAMPLE.header, header_size=header_size, offset=header_size - 1)
    with pytest.raises(ValueError, match="cannot resume"):
        BundleReader.resume(SAMPLE.header, header_size=header_size, offset=len(SAMPLE.stream) + 1)


def test_resumed_stream_still_checks_framing() -> None:
    layout = SAMPLE.layout
    reader = BundleReader.resume(
        SAMPLE.header, header_size=layout.header_size, offset=layout.extent_starts[1]
    )
    reader.receive_data(SAMPLE.stream[layout.extent_starts[0] :])  # one record too early
    with pytest.raises(BundleProtocolError, match="extent 0 arrived"):
        drain(reader)


# -- end to end with a real converted layer ------------------------------------------------


def _tar(files: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as archive:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def test_end_to_end_with_the_layer_writer() -> None:
    testing = pytest.importorskip("starlight_core.testing")
    files = {
        "etc/os-release": b"NAME=test\n",
        "usr/bin/big": bytes(range(256)) * 600,
        "usr/bin/copy": b"NAME=test\n",
        "empty": b"",
    }
    blob, toc = testing.convert_bytes(_tar(files), chunk_size=64 * 1024)
    delta = plan([Target(layers=(toc,), ranks={"usr/bin/big": 0})])
    header = build_header(delta, [image_for((0,))])
    stream = bytearray(encode_header(header))
    for index, extent in enumerate(delta.extents):
        chunk = extent.chunk
        stream += encode_extent(
            index, blob[chunk.compressed_offset : chunk.compressed_offset + chunk.compressed_size]
        )
    stream += encode_end(len(delta.extents), len(stream))
    contents: dict[Digest, bytearray] = {}
    for event in feed(split(bytes(stream), [100, 5000, 77777])):
        if isinstance(event, Extent):
            contents.setdefault(event.descriptor.content, bytearray()).extend(event.verified_data())
    for name, data in files.items():
        if data:
            assert contents[sha256_digest(data)] == data, name
    assert header.extents[0].content == sha256_digest(files["usr/bin/big"])
    assert len(contents) == 2  # the copy is sent once; the empty file needs nothing
