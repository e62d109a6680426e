"""The entry ↔ row codec of the metadata store, without a database: any entry round-trips."""

from __future__ import annotations

import gc

import pytest
from hypothesis import given
from hypothesis import strategies as st

from starlight_core.digest import Digest, sha256_digest
from starlight_core.errors import InvalidInput
from starlight_core.layer.toc import Chunk, Entry, EntryType
from starlight_proxy.store.codec import (
    FILE_COLUMNS,
    decode_entries,
    decode_text,
    encode_entries,
    encode_text,
)

# Tar names are bytes; the layer reader maps the non-UTF-8 ones to U+DC80..U+DCFF.
_escaped_bytes = st.sampled_from([chr(c) for c in range(0xDC80, 0xDD00)])
tar_text = st.text(
    alphabet=st.one_of(st.characters(exclude_categories=["Cs"]), _escaped_bytes), max_size=40
)
digests = st.binary(max_size=8).map(sha256_digest)
sizes = st.integers(min_value=0, max_value=2**40)
chunks = st.builds(Chunk, sizes, sizes, sizes, sizes, digests)


@st.composite
def entries(draw: st.DrawFn) -> Entry:
    size = draw(sizes)
    digest = draw(st.none() | digests)
    chunk_tuple = draw(
        st.one_of(
            st.just(()),
            # The common case the codec stores compactly: one chunk covering the whole file.
            st.builds(
                lambda co, cs: (Chunk(0, size, co, cs, digest),) if digest else (),
                sizes,
                sizes,
            ),
            st.lists(chunks, min_size=1, max_size=4).map(tuple),
        )
    )
    return Entry(
        name=draw(tar_text.filter(bool)),
        type=draw(st.sampled_from(EntryType)),
        mode=draw(st.integers(0, 0o7777)),
        uid=draw(st.integers(0, 2**32 - 1)),
        gid=draw(st.integers(0, 2**32 - 1)),
        uname=draw(tar_text),
        gname=draw(tar_text),
        mtime_ns=draw(st.integers(-(2**62), 2**62)),
        size=size,
        linkname=draw(tar_text),
        devmajor=draw(st.integers(0, 2**20)),
        devminor=draw(st.integers(0, 2**20)),
        xattrs=draw(st.dictionaries(tar_text.filter(bool), st.binary(max_size=64), max_size=3)),
        digest=digest,
        offset=draw(sizes),
        chunks=chunk_tuple,
    )


@given(st.lists(entries(), max_size=20))
def test_any_entries_round_trip(original: list[Entry]) -> None:
    rows = list(encode_entries(7, original))
    assert all(len(row) == len(FILE_COLUMNS) for row in rows)
    assert [(row[0], row[1]) for row in rows] == [(7, i) for i in range(len(original))]
    decoded = decode_entries([row[2:] for row in rows])
    assert decoded == tuple(original)
    for entry in decoded:
        assert type(entry.digest) in (Digest, type(None))
        assert all(type(c.digest) is Digest for c in entry.chunks)


def test_whole_file_chunk_is_stored_in_columns_and_others_as_json() -> None:
    digest = sha256_digest(b"abc")
    whole = Entry("a", EntryType.FILE, size=3, digest=digest, chunks=(Chunk(0, 3, 50, 23, digest),))
    other_digest = Entry(
        "b",
        EntryType.FILE,
        size=3,
        digest=digest,
        chunks=(Chunk(0, 3, 50, 23, sha256_digest(b"x")),),
    )
    index = FILE_COLUMNS.index
    [row_whole, row_other] = encode_entries(1, [whole, other_digest])
    assert (row_whole[index("chunk_offset")], row_whole[index("chunk_size")]) == (50, 23)
    assert row_whole[index("chunks")] is None
    assert row_other[index("chunk_offset")] is None
    assert row_other[index("chunks")] is not None


def test_text_keeps_non_utf8_bytes() -> None:
    assert encode_text("caf\udce9") == b"caf\xe9"
    assert decode_text(b"caf\xe9") == "caf\udce9"
    with pytest.raises(InvalidInput):
        encode_text("lone \ud800 surrogate")


def test_decoding_restores_the_garbage_collector() -> None:
    assert gc.isenabled()
    decode_entries([])
    assert gc.isenabled()
    gc.disable()
    try:
        decode_entries([])
        assert not gc.isenabled()
    finally:
        gc.enable()
