"""The trace record format: the model's checks, the JSON Lines codec (whole, split anywhere,
byte by byte), precise errors with line numbers, the size limits, and the check of a trace
against its image's layers."""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta, timezone

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from starlight_core import wire
from starlight_core.digest import Digest, sha256_digest
from starlight_core.errors import InvalidInput, ResourceExhausted
from starlight_core.layer.toc import TOC, Entry, EntryType, LayerInfo
from starlight_core.oci import OCI_LAYER_GZIP
from starlight_core.platform import Platform
from starlight_core.trace import (
    TRACE_VERSION,
    AccessKind,
    FileAccess,
    Trace,
    TraceDecoder,
    TracedImage,
    TraceEnd,
    TraceEvent,
    TraceHeader,
    check_trace,
    decode,
    decode_chunks,
    encode,
)

IMAGE = TracedImage(
    reference="docker.io/library/redis:7",
    manifest_digest=sha256_digest(b"manifest"),
    platform=Platform.parse("linux/amd64"),
)
DIFF_ID = sha256_digest(b"layer 1")
STARTED = datetime(2024, 5, 1, 12, 0, 0, 500000, tzinfo=UTC)


def header(**changes: object) -> TraceHeader:
    fields: dict[str, object] = {
        "trace_id": "1b4e28ba-2fa1-4d3b-a3f5-ef19b5a7633b",
        "image": IMAGE,
        "container_id": "c0ffee",
        "started_at": STARTED,
    }
    fields.update(changes)
    return TraceHeader(**fields)  # type: ignore[arg-type]


def sample() -> Trace:
    return Trace(
        header(group="shop", worker="node-7"),
        [
            FileAccess(1_250_000, 0, "usr/local/bin/redis-server", AccessKind.EXEC),
            FileAccess(1_250_000, 0, "lib/libc.so.6", AccessKind.OPEN),
            FileAccess(1_900_000, DIFF_ID, "etc/redis.conf", AccessKind.READ),
            FileAccess(2_000_000, DIFF_ID, "lib/libc.so.6", AccessKind.GETATTR),
            FileAccess(2_500_000, 0, "usr/bin/sh", AccessKind.READLINK),
        ],
    )


def lines(trace: Trace) -> list[bytes]:
    return encode(trace).splitlines(keepends=True)


def events(decoder: TraceDecoder) -> list[TraceEvent]:
    found: list[TraceEvent] = []
    while (event := decoder.next_event()) is not None:
        found.append(event)
    return found


def decode_error(data: bytes, **limits: int) -> str:
    with pytest.raises(InvalidInput) as info:
        decode(data, **limits)
    return info.value.message


# --- the documented form --------------------------------------------------------------------


def test_encoding_is_the_documented_json_lines() -> None:
    text = encode(sample()).decode("ascii")
    assert text.endswith("\n")
    first, *rest = text.splitlines()
    assert json.loads(first) == {
        "version": TRACE_VERSION,
        "trace_id": "1b4e28ba-2fa1-4d3b-a3f5-ef19b5a7633b",
        "image": {
            "reference": "docker.io/library/redis:7",
            "manifest_digest": str(IMAGE.manifest_digest),
            "platform": {"architecture": "amd64", "os": "linux"},
        },
        "container_id": "c0ffee",
        "started_at": "2024-05-01T12:00:00.500000Z",
        "group": "shop",
        "worker": "node-7",
    }
    assert [json.loads(line) for line in rest[1:3]] == [
        {"offset_ns": 1_250_000, "layer": 0, "path": "lib/libc.so.6", "kind": "open"},
        {"offset_ns": 1_900_000, "layer": str(DIFF_ID), "path": "etc/redis.conf", "kind": "read"},
    ]
    assert len(rest) == 5


def test_optional_header_fields_are_omitted_and_version_always_written() -> None:
    record = json.loads(encode(Trace(header())).splitlines()[0])
    assert record["version"] == 1
    assert "group" not in record
    assert "worker" not in record


def test_round_trip_and_canonical_bytes() -> None:
    trace = sample()
    data = encode(trace)
    assert decode(data) == trace
    assert encode(decode(data)) == data


def test_times_in_other_zones_are_kept_as_the_same_instant() -> None:
    eastern = STARTED.astimezone(timezone(timedelta(hours=-5)))
    data = encode(Trace(header(started_at=eastern)))
    assert b'"started_at":"2024-05-01T12:00:00.500000Z"' in data
    assert decode(data).header.started_at == STARTED
    offset_form = data.replace(b"12:00:00.500000Z", b"07:00:00.5-05:00")
    assert decode(offset_form).header.started_at == STARTED


def test_names_that_are_not_utf8_survive() -> None:
    # Tar names that are not valid UTF-8 reach us surrogate-escaped, as in the TOC.
    name = b"opt/caf\xe9".decode("utf-8", "surrogateescape")
    trace = Trace(header(), [FileAccess(0, 0, name, AccessKind.OPEN)])
    data = encode(trace)
    assert data.isascii()
    assert decode(data).accesses[0].path == name


def test_crlf_and_a_missing_final_newline_are_accepted() -> None:
    trace = sample()
    data = encode(trace)
    assert decode(data.rstrip(b"\n")) == trace
    assert decode(data.replace(b"\n", b"\r\n")) == trace


def test_a_trace_may_hold_no_access() -> None:
    trace = Trace(header())
    assert decode(encode(trace)) == trace
    decoder = TraceDecoder()
    decoder.receive_data(encode(trace))
    decoder.receive_data(b"")
    assert events(decoder) == [trace.header, TraceEnd(accesses=0, size=len(encode(trace)))]


# --- incremental decoding --------------------------------------------------------------------


def test_events_in_order_then_end_and_nothing_after() -> None:
    trace = sample()
    data = encode(trace)
    decoder = TraceDecoder()
    assert decoder.next_event() is None
    decoder.receive_data(data)
    got = events(decoder)
    assert got == [trace.header, *trace.accesses]  # no end before EOF is said
    assert decoder.header == trace.header
    decoder.receive_data(b"")
    assert events(decoder) == [TraceEnd(accesses=5, size=len(data))]
    assert decoder.next_event() is None
    decoder.receive_data(b"")  # saying EOF twice is harmless
    with pytest.raises(RuntimeError):
        decoder.receive_data(b"{}")


def test_byte_by_byte() -> None:
    trace = sample()
    decoder = TraceDecoder()
    got: list[TraceEvent] = []
    for byte in encode(trace):
        decoder.receive_data(bytes([byte]))
        got.extend(events(decoder))
    decoder.receive_data(b"")
    got.extend(events(decoder))
    assert got[:-1] == [trace.header, *trace.accesses]
    assert isinstance(got[-1], TraceEnd)


@given(cuts=st.lists(st.integers(0, 2000), max_size=12))
def test_any_split_gives_the_same_trace(cuts: list[int]) -> None:
    trace = sample()
    data = encode(trace)
    points = sorted({min(cut, len(data)) for cut in cuts})
    chunks = [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True)]
    assert decode_chunks(chunks) == trace


_SEGMENT = st.text(
    alphabet=st.characters(exclude_characters="/\x00", codec="utf-8"), min_size=1, max_size=8
).filter(lambda s: s not in (".", ".."))
_PATHS = st.lists(_SEGMENT, min_size=1, max_size=3).map("/".join)


def printable(text: str) -> bool:
    return text.isprintable()


@st.composite
def traces(draw: st.DrawFn) -> Trace:
    paths = draw(st.lists(_PATHS, unique=True, max_size=20))
    accesses = []
    offset = 0
    for path in paths:
        offset += draw(st.integers(0, 10**12))
        layer = draw(st.one_of(st.integers(0, 200), st.just(DIFF_ID)))
        accesses.append(FileAccess(offset, layer, path, draw(st.sampled_from(AccessKind))))
    fields = {
        "trace_id": str(draw(st.uuids())),
        "group": draw(st.one_of(st.none(), st.from_regex(r"\A[a-z0-9][a-z0-9_.-]{0,20}\Z"))),
        "worker": draw(st.one_of(st.none(), st.text(min_size=1, max_size=20).filter(printable))),
        "started_at": draw(st.datetimes(timezones=st.just(UTC))),
    }
    return Trace(header(**fields), accesses)


@settings(max_examples=200)
@given(trace=traces(), data=st.data())
def test_round_trip_any_trace_any_split(trace: Trace, data: st.DataObject) -> None:
    encoded = encode(trace)
    assert decode(encoded) == trace
    cut = data.draw(st.integers(0, len(encoded)))
    assert decode_chunks([encoded[:cut], encoded[cut:]]) == trace


# --- the model refuses what a worker must not write ---------------------------------------


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"trace_id": "not-a-uuid"}, "must be a UUID"),
        ({"trace_id": "1B4E28BA-2FA1-4D3B-A3F5-EF19B5A7633B"}, "lowercase"),
        ({"trace_id": "1b4e28ba2fa14d3ba3f5ef19b5a7633b"}, "hyphenated"),
        ({"version": 2}, "unsupported trace version 2"),
        ({"container_id": ""}, "container_id must be 1 to 255"),
        ({"container_id": "a\nb"}, "printable"),
        ({"group": ""}, "group '' must be"),
        ({"group": "two words"}, "group 'two words' must be"),
        ({"worker": "x" * 256}, "worker must be"),
        ({"started_at": datetime(2024, 5, 1)}, "UTC offset"),
    ],
)
def test_header_checks(changes: dict[str, object], message: str) -> None:
    with pytest.raises(InvalidInput, match=message):
        header(**changes)


def test_image_reference_is_checked() -> None:
    with pytest.raises(InvalidInput, match="invalid image reference"):
        TracedImage(
            reference="Not A Reference",
            manifest_digest=IMAGE.manifest_digest,
            platform=IMAGE.platform,
        )


@pytest.mark.parametrize(
    "path", ["", "/etc/passwd", "./etc/passwd", "etc/", "etc//passwd", "a/../b", "..", "a\x00b"]
)
def test_paths_must_be_normalised(path: str) -> None:
    with pytest.raises(InvalidInput):
        FileAccess(0, 0, path, AccessKind.OPEN)


@pytest.mark.parametrize(("offset", "layer"), [(-1, 0), (0, -1), (True, 0), (0, False)])
def test_offsets_and_layers_are_non_negative_integers(offset: int, layer: int) -> None:
    with pytest.raises(InvalidInput):
        FileAccess(offset, layer, "etc/passwd", AccessKind.OPEN)


def test_a_trace_is_in_offset_order_with_one_access_per_layer_and_path() -> None:
    late = FileAccess(20, 0, "b", AccessKind.OPEN)
    early = FileAccess(10, 0, "a", AccessKind.OPEN)
    with pytest.raises(InvalidInput, match="must be in order of offset"):
        Trace(header(), [late, early])
    with pytest.raises(InvalidInput, match="first access per file only"):
        Trace(header(), [early, FileAccess(30, 0, "a", AccessKind.READ)])
    # The same path through another layer is another record (merging collapses it by path).
    assert len(Trace(header(), [early, FileAccess(30, 1, "a", AccessKind.READ)]).accesses) == 2


def test_build_sorts_stably_and_keeps_first_accesses() -> None:
    recorded = [
        FileAccess(30, 0, "c", AccessKind.OPEN),
        FileAccess(10, 0, "a", AccessKind.GETATTR),
        FileAccess(30, 0, "b", AccessKind.OPEN),
        FileAccess(5, 1, "c", AccessKind.OPEN),
        FileAccess(40, 0, "a", AccessKind.READ),
        FileAccess(50, 0, "c", AccessKind.READ),
    ]
    trace = Trace.build(header(), recorded)
    assert [(a.offset_ns, a.layer, a.path, a.kind) for a in trace.accesses] == [
        (5, 1, "c", AccessKind.OPEN),
        (10, 0, "a", AccessKind.GETATTR),
        (30, 0, "c", AccessKind.OPEN),
        (30, 0, "b", AccessKind.OPEN),
    ]


# --- malformed input: precise errors with line numbers ------------------------------------


def _replace_line(number: int, text: bytes) -> bytes:
    all_lines = lines(sample())
    all_lines[number - 1] = text + b"\n"
    return b"".join(all_lines)


def _access_line(**changes: object) -> bytes:
    record: dict[str, object] = {"offset_ns": 1_900_000, "layer": 0, "path": "x", "kind": "open"}
    record.update(changes)
    return json.dumps({k: v for k, v in record.items() if v is not None}).encode()


@pytest.mark.parametrize(
    ("line", "text", "message"),
    [
        (3, b"{not json", "trace line 3: not JSON"),
        (3, b"   ", "trace line 3: empty line"),
        (3, b'[1, 0, "x", "open"]', "trace line 3: an access must be a JSON object"),
        (3, _access_line(extra=1), "trace line 3: invalid access: Extra fields"),
        (3, _access_line(kind="write"), "trace line 3: invalid access: .*kind"),
        (3, _access_line(kind=None), "trace line 3: invalid access: required field missing"),
        (3, _access_line(offset_ns="12"), "trace line 3: invalid access: .*offset_ns"),
        (3, _access_line(offset_ns=1.9e6), "trace line 3: .*expected an integer, not float"),
        (3, _access_line(path=5), "trace line 3: .*expected a string, not int"),
        (3, _access_line(offset_ns=-3), "trace line 3: .*non-negative"),
        (3, _access_line(layer=True), "trace line 3: .*layer"),
        (3, _access_line(layer=1.5), "trace line 3: .*layer"),
        (3, _access_line(layer="sha256:abc"), "trace line 3: .*digest"),
        (3, _access_line(path="/x"), "trace line 3: .*absolute"),
        (3, _access_line(path="x/./y"), "trace line 3: .*not normalised"),
        (4, _access_line(offset_ns=1), "trace line 4: access to 'x' at 1 ns comes after"),
        (
            6,
            _access_line(offset_ns=9_000_000, path="usr/local/bin/redis-server", kind="read"),
            "trace line 6: second access to 'usr/local/bin/redis-server' in layer 0",
        ),
        (1, b"[]", "trace line 1: the header must be a JSON object"),
        (1, b'{"trace_id": "x"}', "trace line 1: unsupported trace version None"),
        (1, b'{"version": 2, "whatever": true}', "trace line 1: unsupported trace version 2"),
        (1, b'{"version": "1"}', "trace line 1: unsupported trace version '1'"),
    ],
)
def test_malformed_lines(line: int, text: bytes, message: str) -> None:
    with pytest.raises(InvalidInput, match=message):
        decode(_replace_line(line, text))


def _header_record(**changes: object) -> bytes:
    record = wire.unstructure(sample().header)
    for key, value in changes.items():
        if value is None:
            record.pop(key)
        else:
            record[key] = value
    return json.dumps(record).encode()


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"extra": 1}, r"Extra fields.*extra"),
        ({"trace_id": None}, r"required field missing @ \$\.trace_id"),
        ({"trace_id": "ABC"}, "must be a UUID"),
        ({"container_id": None}, r"required field missing @ \$\.container_id"),
        ({"container_id": 7}, r"expected a string, not int @ \$\.container_id"),
        ({"version": True}, r"expected an integer, not bool @ \$\.version"),
        ({"group": ["shop"]}, r"expected a string, not list @ \$\.group"),
        ({"started_at": "yesterday"}, r"not an RFC 3339 time @ \$\.started_at"),
        ({"started_at": 1714564800}, r"RFC 3339 string such as .* @ \$\.started_at"),
        ({"started_at": "2024-05-01T12:00:00"}, "no UTC offset"),
        ({"group": "a b"}, "group 'a b' must be"),
        ({"image": {"reference": "redis"}}, r"required field missing @ \$\.image\.manifest_digest"),
        (
            {"image": {**wire.unstructure(IMAGE), "tag": "7"}},
            r"Extra fields.*tag @ \$\.image",
        ),
        (
            {"image": {**wire.unstructure(IMAGE), "manifest_digest": "md5:00"}},
            r"\$\.image\.manifest_digest",
        ),
    ],
)
def test_malformed_headers(changes: dict[str, object], message: str) -> None:
    data = _replace_line(1, _header_record(**changes))
    with pytest.raises(InvalidInput, match="trace line 1: invalid trace header: .*" + message):
        decode(data)


def test_empty_input_and_blank_lines() -> None:
    assert decode_error(b"") == "empty trace: line 1 must be the trace header"
    assert decode_error(b"\n") == "trace line 1: empty line"
    data = encode(sample())
    assert decode_error(data + b"\n") == "trace line 7: empty line"
    assert decode_error(b"\n" + data) == "trace line 1: empty line"


def test_not_utf8() -> None:
    assert decode_error(_replace_line(2, b'{"path": "\xff"}')).startswith("trace line 2: not JSON")


def test_a_line_too_long_is_refused_before_it_ends() -> None:
    decoder = TraceDecoder(max_line=100)
    decoder.receive_data(lines(sample())[0][:50])
    assert decoder.next_event() is None
    decoder.receive_data(b"x" * 51)
    with pytest.raises(InvalidInput, match="trace line 1: longer than 100 bytes"):
        decoder.next_event()
    # Complete lines are measured too.
    long = Trace(header(), [FileAccess(0, 0, "a/" * 200 + "b", AccessKind.OPEN)])
    assert len(lines(long)[0]) < 400 < len(lines(long)[1])
    assert decode_error(encode(long), max_line=400) == "trace line 2: longer than 400 bytes"
    assert decode(encode(long), max_line=500) == long


def test_size_limit() -> None:
    data = encode(sample())
    assert decode(data, max_size=len(data)) == sample()
    decoder = TraceDecoder(max_size=len(data) - 1)
    decoder.receive_data(data[:100])
    events(decoder)
    with pytest.raises(ResourceExhausted, match=f"larger than {len(data) - 1} bytes") as info:
        decoder.receive_data(data[100:])
    assert info.value.http_status >= 400
    # The error sticks: nothing more is decoded.
    with pytest.raises(ResourceExhausted):
        decoder.next_event()
    with pytest.raises(ResourceExhausted):
        decoder.receive_data(b"")


def test_errors_stick() -> None:
    decoder = TraceDecoder()
    decoder.receive_data(b"{}\n" + lines(sample())[1])
    with pytest.raises(InvalidInput, match="line 1") as first:
        decoder.next_event()
    with pytest.raises(InvalidInput) as second:
        decoder.next_event()
    assert second.value is first.value
    with pytest.raises(InvalidInput):
        decoder.receive_data(b"more")


# --- a trace against its image -----------------------------------------------------------


def _toc(name: str, entries: Sequence[Entry]) -> TOC:
    digest = sha256_digest(name.encode())
    info = LayerInfo(digest=digest, size=1, diff_id=digest, media_type=OCI_LAYER_GZIP)
    return TOC(layer=info, entries=tuple(entries))


def _file(name: str) -> Entry:
    return Entry(name=name, type=EntryType.FILE)


LAYERS = (
    _toc("layer 0", [_file("usr/bin/sh"), _file("lib/libc.so.6")]),
    _toc("layer 1", [_file("etc/redis.conf"), _file("lib/libc.so.6")]),
)


OTHER_DIFF_ID = sha256_digest(b"another layer")


def _trace(*accesses: tuple[int | Digest, str]) -> Trace:
    return Trace(
        header(),
        [FileAccess(n, layer, path, AccessKind.OPEN) for n, (layer, path) in enumerate(accesses)],
    )


def test_check_accepts_what_the_layers_hold() -> None:
    diff_id = LAYERS[1].layer.diff_id
    check_trace(
        _trace((0, "usr/bin/sh"), (diff_id, "etc/redis.conf"), (1, "lib/libc.so.6"), (0, "usr")),
        LAYERS,
    )


def test_check_names_each_misfit_by_line() -> None:
    with pytest.raises(InvalidInput) as info:
        check_trace(
            _trace(
                (0, "usr/bin/sh"),
                (0, "etc/redis.conf"),
                (2, "usr/bin/sh"),
                (OTHER_DIFF_ID, "etc/redis.conf"),
            ),
            LAYERS,
        )
    message = info.value.message
    assert "line 3: 'etc/redis.conf' (not in layer 0)" in message
    assert "line 4: 'usr/bin/sh' (the image has 2 layers, not 3)" in message
    other = f"line 5: 'etc/redis.conf' (no layer of the image has diff_id {OTHER_DIFF_ID})"
    assert other in message
    assert "line 2" not in message


def test_check_lists_the_first_few() -> None:
    missing = [(0, f"missing/{n}") for n in range(8)]
    expected = r"line 6: 'missing/4' \(not in layer 0\) \(and 3 more\)"
    with pytest.raises(InvalidInput, match=expected):
        check_trace(_trace(*missing), LAYERS)


def test_trace_ids_are_uuids_chosen_by_the_worker() -> None:
    fresh = str(uuid.uuid4())
    assert header(trace_id=fresh).trace_id == fresh
