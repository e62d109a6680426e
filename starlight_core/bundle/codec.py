"""The bundle codec, version 1: encoder functions and an incremental, sans-I/O decoder.

A bundle is the proxy's one HTTP response body to a worker: the metadata of the images it
asked for, then the file contents it lacks.

Wire format
-----------
::

    stream  = MAGIC record*            MAGIC = 89 53 4C 42 4E 44 4C 0A  (b"\\x89SLBNDL\\n")
    record  = type:u8 length:u32be payload[length]

    0x01 HEADER   gzip(canonical JSON of BundleHeader)      exactly one, first
    0x02 EXTENT   index:u32be member[compressed_size]       zero or more, in header order
    0x03 END      JSON {"extents": count, "bytes": offset}  last: the stream is complete
    0x04 ERROR    JSON {"error": code, "message": text}     last: the proxy failed mid-stream

* HEADER: the canonical JSON (``starlight_core.wire``, unknown keys refused) of a
  ``BundleHeader``: ``version`` (1), ``bundle_id``, ``images`` (reference, manifest and config
  digests with their exact text, media type, platform, layer indexes), ``layers`` (full TOCs),
  ``extents`` (in the order the EXTENT records follow, each ``[layer, entry, chunk]``: the
  chunk of the file ``layers[layer].entries[entry]``, or where no sent TOC lists it exactly
  ``[content, chunk_index, offset, size, compressed_size, chunk_digest]``), ``local``
  (contents the worker copies from what it holds: ``[layer, entry]`` or a digest),
  ``resume`` and ``omitted`` (layers sent as an entry-less TOC because the worker named
  their diff_ids in the request's ``tocs``: it fills them in from its own store). Naming
  contents by TOC position keeps random hex digests, which do not compress, out of the
  header twice: 806 KB became 504 KB for a 6,300-file image.
  Compressed as one gzip member with mtime 0, so that equal headers are equal bytes.
* EXTENT: the index of its descriptor in ``header.extents``, then the gzip member exactly as it
  lies in the layer blob (``compressed_size`` bytes). Record ``i`` is always extent ``i``.
* END: the number of extents and the stream offset of the END record itself.
* ERROR: the ``StarlightError.code`` of the failure and its message; the reader raises the
  matching ``StarlightError`` subclass (``StarlightError`` itself for unknown codes), even
  before the HEADER (the proxy failed before it could plan).
* Unknown record types are a protocol error: a new record type needs a new version.

Determinism and resumption
--------------------------
``bundle_id`` is the sha256 of the header's canonical JSON with ``bundle_id`` set to 64 zeros:
the same request against the same proxy state gives the same header, the same id and a
byte-identical stream (the header record for a given id never changes; extent record ``i`` is
``9 + compressed_size`` bytes). A worker that lost the connection after ``N`` bytes asks for
bundle ``bundle_id`` from offset ``N``; the proxy checks that the id still matches its plan and
answers with bytes ``[N:]`` of that stream, computed with ``BundleLayout.locate(N)``: it emits
the rest of the record ``N`` falls in (``encoded[skip:]``) and every record after it, without
fetching the skipped extents. On the worker, ``BundleReader.resume(header, header_size=...,
offset=N, partial=...)`` continues from there; ``reader.offset`` and ``reader.pending`` give the
two numbers to save when a connection breaks.

Trust
-----
The reader checks framing only; contents are checked by ``decompress_extent`` (one gzip member,
no trailing bytes, at most the declared size however well it compresses, sha256 equal to the
chunk digest) before a byte is used.
"""

from __future__ import annotations

import bisect
import enum
import gzip
import hashlib
import json
import zlib
from collections import deque
from collections.abc import Callable, Collection, Iterable, Sequence
from typing import Final, Literal, TypeVar

import attrs

from starlight_core import wire
from starlight_core.bundle.header import (
    BUNDLE_VERSION,
    BundleHeader,
    EndRecord,
    ErrorRecord,
    ExtentDescriptor,
    ImageInfo,
    ResumeInfo,
)
from starlight_core.delta import DeltaPlan, PlannedExtent
from starlight_core.digest import Digest, DigestVerifier
from starlight_core.errors import BundleProtocolError, DigestMismatch, InvalidInput, StarlightError
from starlight_core.layer.toc import TOC, LayerInfo

__all__ = [
    "DEFAULT_MAX_HEADER_JSON_SIZE",
    "DEFAULT_MAX_HEADER_SIZE",
    "EXTENT_OVERHEAD",
    "MAGIC",
    "NEED_DATA",
    "BundleLayout",
    "BundleReader",
    "End",
    "Event",
    "Extent",
    "Header",
    "NeedData",
    "RecordType",
    "StreamPosition",
    "build_header",
    "decompress_extent",
    "descriptors",
    "encode_end",
    "encode_error",
    "encode_extent",
    "encode_header",
    "error_for",
    "extent_record_size",
    "fill_omitted",
    "start_bundle",
]

MAGIC: Final = b"\x89SLBNDL\n"
_RECORD_HEAD: Final = 5  # type + length
_INDEX: Final = 4
EXTENT_OVERHEAD: Final = _RECORD_HEAD + _INDEX
_MAX_LENGTH: Final = (1 << 32) - 1
DEFAULT_MAX_HEADER_SIZE: Final = 256 * 1024 * 1024
"""Largest compressed HEADER payload a reader accepts."""
DEFAULT_MAX_HEADER_JSON_SIZE: Final = 2 * 1024 * 1024 * 1024
"""Largest HEADER JSON a reader inflates (a gzip bomb stops here)."""
MAX_TRAILER_SIZE: Final = 64 * 1024
"""Largest END or ERROR payload."""
_ZERO_ID: Final = "0" * 64
_T = TypeVar("_T")


class RecordType(enum.IntEnum):
    HEADER = 0x01
    EXTENT = 0x02
    END = 0x03
    ERROR = 0x04


# -- encoding ------------------------------------------------------------------------------


def descriptors(extents: Iterable[PlannedExtent]) -> tuple[ExtentDescriptor, ...]:
    """The header's view of planned extents: what each fills, not where it is read from."""
    return tuple(
        ExtentDescriptor(
            e.content, e.chunk_index, e.chunk.offset, e.chunk.size, e.chunk.compressed_size,
            e.chunk.digest,
        )
        for e in extents
    )  # fmt: skip


def _draft(
    plan: DeltaPlan,
    images: Sequence[ImageInfo],
    resume: ResumeInfo | None,
    omit: Collection[Digest],
) -> BundleHeader:
    if [image.layers for image in images] != list(plan.targets):
        raise ValueError("images must match plan.targets one to one, with the same layers")
    omitted = tuple(i for i, toc in enumerate(plan.layers) if toc.layer.diff_id in omit)
    layers = list(plan.layers)
    local = plan.local
    if omitted:
        for i in omitted:
            layers[i] = attrs.evolve(layers[i], entries=())
        # The worker holds the omitted layers whole: their contents need no local copy.
        needed = {e.digest for toc in layers for e in toc.entries if e.has_content}
        local = tuple(digest for digest in local if digest in needed)
    return BundleHeader(
        bundle_id=_ZERO_ID,
        images=tuple(images),
        layers=tuple(layers),
        extents=descriptors(plan.extents),
        local=local,
        resume=resume,
        omitted=omitted,
    )


def build_header(
    plan: DeltaPlan,
    images: Sequence[ImageInfo],
    *,
    resume: ResumeInfo | None = None,
    omit: Collection[Digest] = (),
) -> BundleHeader:
    """The header of the bundle that carries ``plan``; ``images[i]`` is ``plan.targets[i]``.
    Layers whose diff_id is in ``omit`` go without their entries (``BundleHeader.omitted``)."""
    draft = _draft(plan, images, resume, frozenset(omit))
    return attrs.evolve(draft, bundle_id=hashlib.sha256(wire.dumps(draft)).hexdigest())


def start_bundle(
    plan: DeltaPlan,
    images: Sequence[ImageInfo],
    *,
    resume: ResumeInfo | None = None,
    omit: Collection[Digest] = (),
) -> tuple[BundleHeader, bytes]:
    """``build_header`` and ``encode_header`` with one serialisation instead of two.

    The JSON of a large header takes seconds to produce; the id is spliced into the draft's.
    """
    draft = _draft(plan, images, resume, frozenset(omit))
    text = wire.dumps(draft)
    bundle_id = hashlib.sha256(text).hexdigest()
    prefix = b'{"version":%d,"bundle_id":"%s"' % (BUNDLE_VERSION, _ZERO_ID.encode())
    if not text.startswith(prefix):  # the field order is part of the format
        raise AssertionError("the bundle header JSON must start with version and bundle_id")
    text = prefix.replace(_ZERO_ID.encode(), bundle_id.encode()) + text[len(prefix) :]
    return attrs.evolve(draft, bundle_id=bundle_id), _frame_header(text)


def fill_omitted(header: BundleHeader, held: Callable[[LayerInfo], TOC]) -> BundleHeader:
    """``header`` with its ``omitted`` layers complete again: ``held(layer)`` gives the TOC
    the worker keeps for that layer (its diff_id). A TOC of another layer, or ``held``
    failing with a ``StarlightError``, is a ``BundleProtocolError``: ask again without
    naming ``tocs``."""
    if not header.omitted:
        return header
    layers = list(header.layers)
    for i in header.omitted:
        stub = layers[i].layer
        try:
            toc = held(stub)
        except StarlightError as exc:
            raise BundleProtocolError(
                f"layer {stub.digest} was sent without its TOC, but the worker cannot "
                f"provide it: {exc.message}"
            ) from exc
        if toc.layer.digest != stub.digest or toc.layer.diff_id != stub.diff_id:
            raise BundleProtocolError(
                f"layer {stub.digest} was sent without its TOC; the worker holds the TOC of "
                f"{toc.layer.digest} for diff_id {stub.diff_id}"
            )
        layers[i] = toc
    return attrs.evolve(header, layers=tuple(layers), omitted=())


def _record(kind: RecordType, *parts: bytes) -> bytes:
    length = sum(len(part) for part in parts)
    if length > _MAX_LENGTH:
        raise ValueError(f"a {kind.name} record cannot hold {length} bytes")
    return b"".join((bytes([kind]), length.to_bytes(4, "big"), *parts))


def _frame_header(text: bytes) -> bytes:
    payload = gzip.compress(text, compresslevel=6, mtime=0)
    return MAGIC + _record(RecordType.HEADER, payload)


def encode_header(header: BundleHeader) -> bytes:
    """The start of the stream: the magic and the HEADER record (the same bytes every time)."""
    return _frame_header(wire.dumps(header))


def encode_extent(index: int, data: bytes) -> bytes:
    """An EXTENT record: extent ``index`` of the header, its gzip member as read from the blob."""
    return _record(RecordType.EXTENT, index.to_bytes(_INDEX, "big"), data)


def encode_end(extents: int, stream_bytes: int) -> bytes:
    """The END record; ``stream_bytes`` is the offset at which it starts."""
    return _record(RecordType.END, wire.dumps(EndRecord(extents, stream_bytes)))


def encode_error(exc: StarlightError) -> bytes:
    """An ERROR record telling the worker which error to raise."""
    return _record(RecordType.ERROR, wire.dumps(ErrorRecord(exc.code, exc.message)))


def extent_record_size(descriptor: ExtentDescriptor) -> int:
    return EXTENT_OVERHEAD + descriptor.compressed_size


@attrs.frozen
class StreamPosition:
    """Where a stream offset falls: in which record, and how many of its bytes come before."""

    record: Literal["header", "extent", "end", "done"]
    """``header`` includes the magic; ``done`` is the offset just past the END record."""
    index: int
    """The extent index for ``extent`` (``len(extents)`` for ``end`` and ``done``)."""
    skip: int


@attrs.frozen
class BundleLayout:
    """Record offsets of a bundle stream, known from its header alone."""

    header_size: int
    """Bytes of the magic plus the HEADER record."""
    extent_starts: tuple[int, ...]
    end_start: int
    end_size: int

    @classmethod
    def create(cls, header_size: int, compressed_sizes: Iterable[int]) -> BundleLayout:
        starts = []
        offset = header_size
        for size in compressed_sizes:
            starts.append(offset)
            offset += EXTENT_OVERHEAD + size
        end_size = len(encode_end(len(starts), offset))
        return cls(header_size, tuple(starts), offset, end_size)

    @classmethod
    def of(cls, header: BundleHeader, header_size: int) -> BundleLayout:
        """The layout of ``header``'s stream, whose header took ``header_size`` bytes."""
        return cls.create(header_size, (e.compressed_size for e in header.extents))

    @property
    def total(self) -> int:
        return self.end_start + self.end_size

    def locate(self, offset: int) -> StreamPosition:
        """Which record holds stream byte ``offset`` (``total``: ``done``)."""
        count = len(self.extent_starts)
        if offset < 0 or offset > self.total:
            raise ValueError(f"offset {offset} is outside the stream (0..{self.total})")
        if offset < self.header_size:
            return StreamPosition("header", 0, offset)
        if offset >= self.end_start:
            if offset == self.total:
                return StreamPosition("done", count, 0)
            return StreamPosition("end", count, offset - self.end_start)
        index = bisect.bisect_right(self.extent_starts, offset) - 1
        return StreamPosition("extent", index, offset - self.extent_starts[index])


# -- decoding ------------------------------------------------------------------------------


class NeedData:
    """The reader needs more bytes (or ``receive_data(b"")`` for end of input)."""

    _instance: NeedData | None = None

    def __new__(cls) -> NeedData:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA: Final = NeedData()


@attrs.frozen
class Header:
    header: BundleHeader
    size: int
    """Stream bytes up to the end of the HEADER record: what ``BundleReader.resume`` needs."""


@attrs.frozen
class Extent:
    index: int
    descriptor: ExtentDescriptor
    compressed: bytes = attrs.field(repr=lambda data: f"<{len(data)} bytes>")

    def verified_data(self) -> bytes:
        """The chunk's bytes, decompressed and checked against its digest."""
        return decompress_extent(self.descriptor, self.compressed)


@attrs.frozen
class End:
    extents: int
    bytes: int


Event = Header | Extent | End

_MAGIC_STATE: Final = 0
_HEADER_STATE: Final = 1
_BODY_STATE: Final = 2
_DONE_STATE: Final = 3


def error_for(code: str, message: str) -> StarlightError:
    """The ``StarlightError`` an ERROR record names (``StarlightError`` for unknown codes)."""
    queue: deque[type[StarlightError]] = deque([StarlightError])
    while queue:
        cls = queue.popleft()
        if cls.code == code:
            try:
                return cls(message)
            except TypeError:  # a subclass with its own constructor
                break
        queue.extend(cls.__subclasses__())
    return StarlightError(f"{message} (the proxy failed with {code!r})")


class BundleReader:
    """Feed it the bundle stream with ``receive_data`` (``b""`` at the end), then call
    ``next_event`` until it returns ``NEED_DATA``.

    Events: one ``Header``, then one ``Extent`` per EXTENT record, then ``End``. A malformed
    stream raises ``BundleProtocolError``; an ERROR record raises the error it names. After
    either, every call raises the same error again. The reader holds at most the bytes it was
    given that do not yet form a whole record.
    """

    def __init__(
        self,
        *,
        max_header_size: int = DEFAULT_MAX_HEADER_SIZE,
        max_header_json_size: int = DEFAULT_MAX_HEADER_JSON_SIZE,
    ) -> None:
        self._max_header_size = max_header_size
        self._max_header_json_size = max_header_json_size
        self._buffer = bytearray()
        self._offset = 0
        """Stream offset of ``_buffer[0]``; always a record boundary after the header."""
        self._eof = False
        self._state = _MAGIC_STATE
        self._header: BundleHeader | None = None
        self._next = 0
        self._error: StarlightError | None = None

    @classmethod
    def resume(
        cls,
        header: BundleHeader,
        *,
        header_size: int,
        offset: int,
        partial: bytes = b"",
        max_header_size: int = DEFAULT_MAX_HEADER_SIZE,
        max_header_json_size: int = DEFAULT_MAX_HEADER_JSON_SIZE,
    ) -> BundleReader:
        """A reader for the rest of a bundle, fed from stream offset ``offset`` on.

        ``header`` and ``header_size`` come from the ``Header`` event of the first attempt;
        ``partial`` holds the bytes of the interrupted record received before ``offset`` (what
        ``pending`` returned), so ``offset - len(partial)`` must be a record boundary after the
        header.
        """
        layout = BundleLayout.of(header, header_size)
        start = offset - len(partial)
        if start < header_size or offset > layout.total:
            raise ValueError(
                f"cannot resume at offset {offset} with {len(partial)} partial bytes: the "
                f"records after the header span {header_size}..{layout.total}"
            )
        position = layout.locate(start)
        if position.skip:
            raise ValueError(
                f"offset {offset} is inside a record that starts before {start}; pass all of "
                "its bytes received so far as partial (BundleReader.pending)"
            )
        reader = cls(max_header_size=max_header_size, max_header_json_size=max_header_json_size)
        reader._header = header
        reader._offset = start
        reader._buffer += partial
        reader._next = position.index
        reader._state = _DONE_STATE if position.record == "done" else _BODY_STATE
        return reader

    @property
    def header(self) -> BundleHeader | None:
        return self._header

    @property
    def offset(self) -> int:
        """Stream bytes received so far (including those not yet returned as events)."""
        return self._offset + len(self._buffer)

    @property
    def pending(self) -> bytes:
        """Bytes received after the last whole record returned: ``resume``'s ``partial``."""
        return bytes(self._buffer)

    @property
    def done(self) -> bool:
        """The END record has been returned."""
        return self._state == _DONE_STATE

    def receive_data(self, data: bytes) -> None:
        """Append stream bytes; ``b""`` means the stream ended."""
        if self._eof:
            if data:
                raise RuntimeError("receive_data() called with data after the end of input")
            return
        if data:
            self._buffer += data
        else:
            self._eof = True

    def next_event(self) -> Event | NeedData:
        if self._error is not None:
            raise self._error
        try:
            return self._next_event()
        except StarlightError as exc:
            self._error = exc
            raise

    # -- internals -----------------------------------------------------------------------------

    def _consume(self, count: int) -> None:
        del self._buffer[:count]
        self._offset += count

    def _need(self, what: str, total: int) -> NeedData:
        if not self._eof:
            return NEED_DATA
        if not self._buffer and self._state == _BODY_STATE:
            raise BundleProtocolError(
                f"bundle truncated: the stream ended at offset {self._offset} before the END record"
            )
        raise BundleProtocolError(
            f"bundle truncated: the stream ended inside {what} at offset {self._offset} "
            f"({len(self._buffer)} of {total} bytes received)"
        )

    def _next_event(self) -> Event | NeedData:
        buffer = self._buffer
        if self._state == _MAGIC_STATE:
            start = bytes(buffer[: len(MAGIC)])
            if not MAGIC.startswith(start):
                raise BundleProtocolError(
                    f"not a Starlight bundle: the stream starts with {start!r}, not {MAGIC!r}"
                )
            if len(start) < len(MAGIC):
                return self._need("the magic", len(MAGIC))
            self._consume(len(MAGIC))
            self._state = _HEADER_STATE
        if self._state == _DONE_STATE:
            if buffer:
                raise BundleProtocolError(
                    f"{len(buffer)} bytes after the END record at offset {self._offset}"
                )
            return NEED_DATA
        if len(buffer) < _RECORD_HEAD:
            return self._need("a record header", _RECORD_HEAD)
        kind = buffer[0]
        length = int.from_bytes(buffer[1:_RECORD_HEAD], "big")
        at = self._offset
        if kind == RecordType.HEADER:
            if self._state != _HEADER_STATE:
                raise BundleProtocolError(f"a second HEADER record at offset {at}")
            if length > self._max_header_size:
                raise BundleProtocolError(
                    f"the HEADER record ({length} bytes) exceeds the {self._max_header_size}-byte "
                    "limit"
                )
        elif kind == RecordType.EXTENT:
            if self._header is None:
                raise BundleProtocolError(f"an EXTENT record at offset {at} before the HEADER")
            if length < _INDEX:
                raise BundleProtocolError(f"an EXTENT record of {length} bytes at offset {at}")
            if len(buffer) < EXTENT_OVERHEAD:
                return self._need("an EXTENT record", EXTENT_OVERHEAD)
            index = int.from_bytes(buffer[_RECORD_HEAD:EXTENT_OVERHEAD], "big")
            extents = self._header.extents
            if index >= len(extents):
                raise BundleProtocolError(
                    f"EXTENT record at offset {at} for extent {index}, but the header lists "
                    f"{len(extents)}"
                )
            if index != self._next:
                raise BundleProtocolError(
                    f"extent {index} arrived at offset {at}; expected extent {self._next}"
                )
            expected = extents[index].compressed_size
            if length - _INDEX != expected:
                raise BundleProtocolError(
                    f"EXTENT record for extent {index} at offset {at} carries "
                    f"{length - _INDEX} bytes; its descriptor says {expected}"
                )
        elif kind in (RecordType.END, RecordType.ERROR):
            name = RecordType(kind).name
            if kind == RecordType.END and self._header is None:
                raise BundleProtocolError(f"an END record at offset {at} before the HEADER")
            if length > MAX_TRAILER_SIZE:
                raise BundleProtocolError(f"an {name} record of {length} bytes at offset {at}")
        else:
            raise BundleProtocolError(f"unknown record type 0x{kind:02x} at offset {at}")

        total = _RECORD_HEAD + length
        if len(buffer) < total:
            return self._need(f"the {RecordType(kind).name} record", total)
        with memoryview(buffer) as view:
            payload = bytes(view[_RECORD_HEAD:total])
        self._consume(total)

        if kind == RecordType.HEADER:
            self._header = self._parse_header(payload)
            self._state = _BODY_STATE
            return Header(self._header, self._offset)
        if kind == RecordType.EXTENT:
            assert self._header is not None
            self._next += 1
            return Extent(index, self._header.extents[index], payload[_INDEX:])
        if kind == RecordType.ERROR:
            error = self._parse_json(payload, ErrorRecord, "ERROR")
            raise error_for(error.error, error.message)
        assert self._header is not None
        end = self._parse_json(payload, EndRecord, "END")
        count = len(self._header.extents)
        if self._next != count or end.extents != count:
            raise BundleProtocolError(
                f"END record at offset {at} after {self._next} extents (it says "
                f"{end.extents}); the header lists {count}"
            )
        if end.bytes != at:
            raise BundleProtocolError(
                f"END record at offset {at} says the stream before it was {end.bytes} bytes"
            )
        self._state = _DONE_STATE
        return End(end.extents, end.bytes)

    @staticmethod
    def _parse_json(payload: bytes, cls: type[_T], name: str) -> _T:
        try:
            return wire.loads(payload, cls, f"{name} record")
        except InvalidInput as exc:
            raise BundleProtocolError(exc.message) from exc

    def _parse_header(self, payload: bytes) -> BundleHeader:
        limit = self._max_header_json_size
        inflater = zlib.decompressobj(wbits=31)
        try:
            text = inflater.decompress(payload, limit + 1)
        except zlib.error as exc:
            raise BundleProtocolError(f"the HEADER is not valid gzip ({exc})") from None
        if len(text) > limit:
            raise BundleProtocolError(f"the HEADER inflates to more than {limit} bytes")
        if not inflater.eof:
            raise BundleProtocolError("the HEADER's gzip stream is truncated")
        if inflater.unused_data:
            raise BundleProtocolError("the HEADER has bytes after its gzip stream")
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise BundleProtocolError(f"the HEADER is not JSON ({exc})") from None
        if not isinstance(data, dict):
            raise BundleProtocolError("the HEADER is not a JSON object")
        version = data.get("version")
        if version != BUNDLE_VERSION:
            raise BundleProtocolError(
                f"unsupported bundle version {version!r}: this reader knows version "
                f"{BUNDLE_VERSION}",
                hint="upgrade the worker, or the proxy must offer version 1",
            )
        try:
            header = wire.structure(data, BundleHeader, "bundle header")
        except InvalidInput as exc:
            raise BundleProtocolError(exc.message) from exc
        for image in header.images:
            if any(not 0 <= i < len(header.layers) for i in image.layers):
                raise BundleProtocolError(
                    f"image {image.reference} names a layer the header does not hold"
                )
        for i in header.omitted:
            if not 0 <= i < len(header.layers) or header.layers[i].entries:
                raise BundleProtocolError(
                    f"omitted layer {i} is not an entry-less layer of the header"
                )
        return header


def decompress_extent(descriptor: ExtentDescriptor, compressed: bytes) -> bytes:
    """Inflate one extent's gzip member and verify it against its descriptor.

    Raises ``DigestMismatch`` unless ``compressed`` is exactly one gzip member, of the declared
    compressed size, inflating to exactly the declared size with the declared sha256. Never
    allocates more than the declared size (plus one byte) however well the member compresses.
    """
    what = f"chunk {descriptor.chunk_index} of {descriptor.content}"
    if len(compressed) != descriptor.compressed_size:
        raise DigestMismatch(
            f"{what}: {len(compressed)} compressed bytes, expected {descriptor.compressed_size}"
        )
    inflater = zlib.decompressobj(wbits=31)
    try:
        data = inflater.decompress(compressed, descriptor.size + 1)
    except zlib.error as exc:
        raise DigestMismatch(f"{what}: not a valid gzip member ({exc})") from None
    if len(data) > descriptor.size:
        raise DigestMismatch(f"{what}: inflates to more than the declared {descriptor.size} bytes")
    if not inflater.eof:
        raise DigestMismatch(f"{what}: the gzip member is truncated")
    if inflater.unused_data:
        extra = "another gzip member" if inflater.unused_data[:2] == b"\x1f\x8b" else "bytes"
        raise DigestMismatch(f"{what}: {extra} after the gzip member")
    if len(data) != descriptor.size:
        raise DigestMismatch(f"{what}: inflates to {len(data)} bytes, expected {descriptor.size}")
    verifier = DigestVerifier(descriptor.digest, what)
    verifier.update(data)
    verifier.verify()
    return data
