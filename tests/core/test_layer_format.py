"""The Starlight layer format: conversion is lossless and every file is addressable."""

from __future__ import annotations

import gzip
import hashlib
import io
import random
import tarfile
import zlib
from decimal import Decimal

import attrs
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from starlight_core import wire
from starlight_core.errors import CorruptLayer, NotStarlightFormat, UnsafePath, UnsupportedLayer
from starlight_core.layer.members import parse_marker
from starlight_core.layer.scan import LayerDecoder, LayerScanner, is_starlight_prefix
from starlight_core.layer.tar import NEED_DATA, EntryEnd, TarReader, normalize_name
from starlight_core.layer.toc import TOC, Entry, EntryType
from starlight_core.testing import TarMember, build_tar, convert_bytes, gzip_bytes

_segment = st.text(alphabet="abcdefghij-_.", min_size=1, max_size=12).filter(
    lambda s: s not in (".", "..") and not s.startswith(".wh.")
)
_long_segment = st.text(alphabet="klmnop", min_size=90, max_size=120)


@st.composite
def tar_members(draw: st.DrawFn) -> list[TarMember]:
    """A plausible layer: dirs, files of awkward sizes, links, devices, whiteouts, xattrs."""
    chunk = draw(st.sampled_from([1, 7, 512, 4096]))
    count = draw(st.integers(min_value=0, max_value=14))
    members: list[TarMember] = []
    names: set[str] = set()
    files: list[str] = []
    for _ in range(count):
        depth = draw(st.integers(min_value=1, max_value=3))
        parts = [draw(st.one_of(_segment, _long_segment)) for _ in range(depth)]
        name = "/".join(parts)
        if name in names:
            continue
        names.add(name)
        kind = draw(
            st.sampled_from(
                [
                    "file",
                    "file",
                    "file",
                    "dir",
                    "symlink",
                    "hardlink",
                    "char",
                    "block",
                    "fifo",
                    "whiteout",
                    "opaque",
                ]
            )
        )
        if kind == "hardlink" and not files:
            kind = "file"
        size = draw(
            st.sampled_from([0, 1, chunk - 1, chunk, chunk + 1, 2 * chunk, 3 * chunk + 5, 700])
        )
        data = (
            draw(st.binary(min_size=max(size, 0), max_size=max(size, 0))) if kind == "file" else b""
        )
        xattrs = draw(
            st.dictionaries(
                st.sampled_from(["user.a", "user.bb", "security.capability"]),
                st.text(alphabet="xyz01", min_size=0, max_size=5),
                max_size=2,
            )
        )
        members.append(
            TarMember(
                name=name,
                kind=kind,
                data=data,
                mode=draw(st.sampled_from([0o644, 0o755, 0o4755, 0o2711, 0o1777, 0o600])),
                uid=draw(st.sampled_from([0, 1000, 65534, 3_000_000])),
                gid=draw(st.sampled_from([0, 100])),
                mtime=draw(st.sampled_from([0, 1_700_000_000, 1_700_000_000.25])),
                linkname=draw(st.sampled_from(files))
                if kind == "hardlink"
                else ("../" + name if kind == "symlink" else ""),
                devmajor=1 if kind in ("char", "block") else 0,
                devminor=3 if kind in ("char", "block") else 0,
                xattrs=xattrs if kind in ("file", "dir") else {},
            )
        )
        if kind == "file":
            files.append(name)
    return members


def _expected_type(info: tarfile.TarInfo) -> EntryType:
    base = info.name.rstrip("/").rsplit("/", 1)[-1]
    if info.isreg() and base == ".wh..wh..opq":
        return EntryType.OPAQUE
    if info.isreg() and base.startswith(".wh."):
        return EntryType.WHITEOUT
    return {
        tarfile.REGTYPE: EntryType.FILE,
        tarfile.AREGTYPE: EntryType.FILE,
        tarfile.DIRTYPE: EntryType.DIR,
        tarfile.SYMTYPE: EntryType.SYMLINK,
        tarfile.LNKTYPE: EntryType.HARDLINK,
        tarfile.CHRTYPE: EntryType.CHAR,
        tarfile.BLKTYPE: EntryType.BLOCK,
        tarfile.FIFOTYPE: EntryType.FIFO,
    }[info.type]


def _read_file(blob: bytes, entry: Entry) -> bytes:
    """A file's content from its chunks' byte ranges alone, each member decompressed alone."""
    pieces = []
    for chunk in entry.chunks:
        member = blob[chunk.compressed_offset : chunk.compressed_offset + chunk.compressed_size]
        data = zlib.decompress(member, 31)
        assert len(data) == chunk.size
        assert "sha256:" + hashlib.sha256(data).hexdigest() == chunk.digest
        pieces.append(data)
    return b"".join(pieces)


def _scan(blob: bytes, step: int) -> TOC:
    scanner = LayerScanner()
    for i in range(0, len(blob), step):
        scanner.receive_data(blob[i : i + step])
    scanner.receive_data(b"")
    return scanner.toc


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    members=tar_members(),
    tar_format=st.sampled_from([tarfile.PAX_FORMAT, tarfile.GNU_FORMAT]),
    chunk_size=st.sampled_from([1, 7, 512, 4096, 1 << 22]),
    step=st.sampled_from([1, 100, 511, 512, 4097, 1 << 20]),
)
def test_conversion_is_lossless_and_addressable(
    members: list[TarMember], tar_format: int, chunk_size: int, step: int
) -> None:
    if tar_format == tarfile.GNU_FORMAT:  # GNU tars carry neither xattrs nor sub-seconds
        members = [attrs.evolve(m, xattrs={}, mtime=int(m.mtime)) for m in members]
    tar = build_tar(members, format=tar_format)
    blob, toc = convert_bytes(tar, chunk_size=chunk_size, step=step)

    # Byte-identical decompression: diff_id and image config stay valid.
    assert gzip.decompress(blob) == tar
    assert toc.layer.diff_id == "sha256:" + hashlib.sha256(tar).hexdigest()
    assert toc.layer.digest == "sha256:" + hashlib.sha256(blob).hexdigest()
    assert toc.layer.size == len(blob)
    assert parse_marker(blob[:128]) == chunk_size

    # The TOC describes every entry as tarfile sees it.
    with tarfile.open(fileobj=io.BytesIO(tar)) as archive:
        infos = archive.getmembers()
        assert len(infos) == len(toc.entries)
        for info, entry in zip(infos, toc.entries, strict=True):
            assert entry.name == normalize_name(info.name)
            assert entry.type is _expected_type(info)
            assert entry.mode == info.mode & 0o7777
            assert (entry.uid, entry.gid) == (info.uid, info.gid)
            assert (entry.uname, entry.gname) == (info.uname, info.gname)
            mtime = Decimal(str(info.pax_headers.get("mtime", info.mtime)))
            assert entry.mtime_ns == int(mtime * 1_000_000_000)
            if entry.type is EntryType.SYMLINK:
                assert entry.linkname == info.linkname
            if entry.type is EntryType.HARDLINK:
                assert entry.linkname == normalize_name(info.linkname)
            if entry.type in (EntryType.CHAR, EntryType.BLOCK):
                assert (entry.devmajor, entry.devminor) == (info.devmajor, info.devminor)
            expected_xattrs = {
                k[len("SCHILY.xattr.") :]: v.encode()
                for k, v in info.pax_headers.items()
                if k.startswith("SCHILY.xattr.")
            }
            assert dict(entry.xattrs) == expected_xattrs
            if entry.type is EntryType.FILE:
                content = archive.extractfile(info)
                assert content is not None
                data = content.read()
                assert entry.size == len(data)
                assert entry.digest == "sha256:" + hashlib.sha256(data).hexdigest()
                assert _read_file(blob, entry) == data
                assert all(c.size <= chunk_size for c in entry.chunks)
                assert sum(c.size for c in entry.chunks) == entry.size
                assert entry.offset == info.offset_data

    # Scanning the converted blob finds the same TOC; the JSON form round-trips.
    assert _scan(blob, step) == toc
    assert wire.loads(wire.dumps(toc), TOC) == toc


@settings(max_examples=40, deadline=None)
@given(members=tar_members(), step=st.sampled_from([1, 999, 1 << 16]))
def test_decoder_reads_gzip_and_plain_tar(members: list[TarMember], step: int) -> None:
    tar = build_tar(members)
    for blob in (tar, gzip_bytes(tar), convert_bytes(tar)[0]):
        decoder = LayerDecoder()
        out = b"".join(
            b"".join(decoder.feed(blob[i : i + step])) for i in range(0, len(blob), step)
        )
        out += b"".join(decoder.feed(b""))
        assert out == tar


def test_conversion_is_deterministic_and_idempotent_on_content() -> None:
    tar = build_tar([TarMember("a", data=b"x" * 10000), TarMember("d", kind="dir")])
    first, toc1 = convert_bytes(tar)
    second, toc2 = convert_bytes(tar, step=7)
    assert first == second
    assert toc1 == toc2


def test_plain_gzip_layer_is_not_starlight() -> None:
    tar = build_tar([TarMember("etc/hosts", data=b"127.0.0.1 localhost\n")])
    blob = gzip_bytes(tar)
    assert not is_starlight_prefix(blob[:128])
    with pytest.raises(NotStarlightFormat, match="etc/hosts"):
        _scan(blob, 1 << 16)


def test_layer_without_file_content_scans_either_way() -> None:
    # A layer of directories only has nothing to address: any gzip encoding is fine.
    tar = build_tar([TarMember("d", kind="dir"), TarMember("d/l", kind="symlink", linkname="x")])
    toc = _scan(gzip_bytes(tar), 100)
    assert [e.name for e in toc.entries] == ["d", "d/l"]


def test_starlight_marker_detected() -> None:
    blob, _ = convert_bytes(build_tar([TarMember("f", data=b"1")]), chunk_size=1234)
    assert is_starlight_prefix(blob[:128])
    assert parse_marker(blob[:128]) == 1234


def test_whiteouts_and_opaque_markers() -> None:
    tar = build_tar(
        [
            TarMember("etc/gone", kind="whiteout"),
            TarMember("var/cache", kind="opaque"),
        ]
    )
    _, toc = convert_bytes(tar)
    whiteout, opaque = toc.entries
    assert whiteout.type is EntryType.WHITEOUT
    assert whiteout.name == "etc/.wh.gone"
    assert whiteout.whiteout_target == "etc/gone"
    assert opaque.type is EntryType.OPAQUE
    assert opaque.whiteout_target == "var/cache"


def test_long_names_gnu_and_pax() -> None:
    name = "x" * 150 + "/" + "y" * 120
    link = "z" * 200
    for fmt in (tarfile.GNU_FORMAT, tarfile.PAX_FORMAT):
        tar = build_tar(
            [TarMember(name, data=b"data"), TarMember("l", kind="symlink", linkname=link)],
            format=fmt,
        )
        _, toc = convert_bytes(tar)
        assert toc.entries[0].name == name
        assert toc.entries[1].linkname == link


def test_sub_second_mtime_from_pax() -> None:
    _, toc = convert_bytes(build_tar([TarMember("f", data=b"1", mtime=1_700_000_000.123456)]))
    assert toc.entries[0].mtime_ns == 1_700_000_000_123_456_000


# --- bad input ---------------------------------------------------------------------------


def _read_all(tar: bytes) -> list[Entry]:
    reader = TarReader()
    reader.receive_data(tar)
    reader.receive_data(b"")
    entries = []
    while True:
        event = reader.next_event()
        assert event is not NEED_DATA
        if isinstance(event, EntryEnd):
            entries.append(event.entry)
        if type(event).__name__ == "ArchiveEnd":
            return entries


@pytest.mark.parametrize("name", ["../evil", "a/../../evil", "/etc/passwd"])
def test_paths_escaping_the_root_are_refused(name: str) -> None:
    info = tarfile.TarInfo(name)
    info.size = 1
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as archive:
        archive.addfile(info, io.BytesIO(b"x"))
    with pytest.raises(UnsafePath, match=r"evil|absolute"):
        _read_all(buffer.getvalue())


def test_hardlink_escaping_the_root_is_refused() -> None:
    tar = build_tar([TarMember("a", data=b"1"), TarMember("b", kind="hardlink", linkname="../a")])
    with pytest.raises(UnsafePath):
        _read_all(tar)


def test_hardlink_to_missing_target_is_refused() -> None:
    tar = build_tar([TarMember("b", kind="hardlink", linkname="nowhere")])
    with pytest.raises(CorruptLayer, match="nowhere"):
        _read_all(tar)


def test_truncated_tar_is_refused() -> None:
    tar = build_tar([TarMember("f", data=b"x" * 5000)])
    with pytest.raises(CorruptLayer, match="truncated"):
        _read_all(tar[:3000])
    with pytest.raises(CorruptLayer, match="truncated"):
        convert_bytes(tar[:700])


def test_bad_checksum_is_refused() -> None:
    tar = bytearray(build_tar([TarMember("f", data=b"x")]))
    tar[0] ^= 0xFF
    with pytest.raises(CorruptLayer, match="checksum"):
        _read_all(bytes(tar))


def _decode_all(blob: bytes) -> bytes:
    decoder = LayerDecoder()
    return b"".join(decoder.feed(blob) + decoder.feed(b""))


def test_corrupt_gzip_is_refused() -> None:
    blob = bytearray(gzip_bytes(build_tar([TarMember("f", data=random.randbytes(50_000))])))
    blob[len(blob) // 2] ^= 0xFF
    with pytest.raises(CorruptLayer):
        _decode_all(bytes(blob))


def test_truncated_gzip_is_refused() -> None:
    blob = gzip_bytes(build_tar([TarMember("f", data=b"abc" * 1000)]))
    decoder = LayerDecoder()
    decoder.feed(blob[:-10])
    with pytest.raises(CorruptLayer, match="truncated"):
        decoder.feed(b"")


def test_sparse_files_are_refused() -> None:
    info = tarfile.TarInfo("sparse")
    info.size = 0
    info.pax_headers = {"GNU.sparse.major": "1", "GNU.sparse.minor": "0"}
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as archive:
        archive.addfile(info)
    with pytest.raises(UnsupportedLayer, match="sparse"):
        _read_all(buffer.getvalue())


def test_zstd_layers_are_refused_clearly() -> None:
    decoder = LayerDecoder()
    with pytest.raises(UnsupportedLayer, match="zstd"):
        decoder.feed(b"\x28\xb5\x2f\xfd" + b"\x00" * 2000)


def test_gzip_bomb_output_is_streamed_in_bounded_steps() -> None:
    # 64 MiB of zeros compress to ~64 KiB; the decoder hands it out in pieces of <= 1 MiB.
    bomb = gzip.compress(b"\x00" * (64 << 20), compresslevel=9)
    decoder = LayerDecoder()
    pieces = decoder.feed(bomb)
    assert max(len(p) for p in pieces) <= 1 << 20
    assert sum(len(p) for p in pieces) == 64 << 20
