"""The JSON Lines form of a trace (version 1), and its encoder and incremental decoder.

A trace is UTF-8 text, one JSON object per line, each line ending in ``\\n`` (the last one may
omit it; ``\\r\\n`` is accepted). Line 1 is the header, every further line one access::

    {"version":1,"trace_id":"1b4e28ba-2fa1-4d3b-a3f5-ef19b5a7633b","image":{"reference":
     "docker.io/library/redis:7","manifest_digest":"sha256:…","platform":{"architecture":
     "amd64","os":"linux"}},"container_id":"c0ffee…","started_at":"2024-05-01T12:00:00.5Z",
     "group":"shop","worker":"node-7"}
    {"offset_ns":1250000,"layer":0,"path":"usr/local/bin/redis-server","kind":"exec"}
    {"offset_ns":1900000,"layer":"sha256:…","path":"etc/redis.conf","kind":"open"}

Header keys: ``version`` (always 1 here), ``trace_id`` (lowercase UUID), ``image`` (the
reference, the platform-specific manifest digest and the platform), ``container_id``,
``started_at`` (RFC 3339, with an offset), and optionally ``group`` and ``worker``.
Access keys, all required: ``offset_ns`` (non-negative integer, monotonic ns since the
container's snapshot was first mounted), ``layer`` (index, base layer 0, or the layer's diff_id),
``path`` (normalised as in the TOC), ``kind`` (``getattr``, ``open``, ``read``, ``readlink`` or
``exec``). Unknown keys, a version other than 1, accesses out of offset order and a second access
to the same (layer, path) are refused.

Decoding is sans-I/O, like the bundle reader: ``receive_data(chunk)`` (``b""`` ends the input)
then ``next_event()`` until it returns ``None`` (it needs more input). Malformed input raises
``InvalidInput`` naming the line; more than ``max_size`` bytes raises ``ResourceExhausted`` (a
request too large). After an error every call raises it again. The decoder holds at most one
incomplete line and the set of (layer, path) seen so far.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Final, TypeVar

import attrs

from starlight_core import wire
from starlight_core.errors import InvalidInput, ResourceExhausted, StarlightError
from starlight_core.trace.record import (
    TRACE_VERSION,
    FileAccess,
    LayerRef,
    Trace,
    TraceHeader,
)

__all__ = [
    "DEFAULT_MAX_LINE",
    "DEFAULT_MAX_TRACE_SIZE",
    "TraceDecoder",
    "TraceEnd",
    "TraceEvent",
    "decode",
    "decode_chunks",
    "encode",
    "encode_access",
    "encode_header",
]

T = TypeVar("T")

DEFAULT_MAX_TRACE_SIZE: Final = 16 * 1024 * 1024
"""About 150,000 accesses: far more files than any container reads while starting."""
DEFAULT_MAX_LINE: Final = 64 * 1024
"""A 4,096-byte path escaped to ASCII fits many times over."""


@attrs.frozen
class TraceEnd:
    """The input ended after a complete trace."""

    accesses: int
    size: int
    """Bytes of the trace."""


TraceEvent = TraceHeader | FileAccess | TraceEnd


def encode_header(header: TraceHeader) -> bytes:
    return wire.dumps(header) + b"\n"


def encode_access(access: FileAccess) -> bytes:
    return wire.dumps(access) + b"\n"


def encode(trace: Trace) -> bytes:
    """The JSON Lines form of ``trace``: canonical, so equal traces give equal bytes."""
    return b"".join([encode_header(trace.header), *map(encode_access, trace.accesses)])


class TraceDecoder:
    """Incremental decoder: events ``TraceHeader``, then one ``FileAccess`` per line, then
    ``TraceEnd`` once ``receive_data(b"")`` has said the input is over."""

    def __init__(
        self, *, max_size: int = DEFAULT_MAX_TRACE_SIZE, max_line: int = DEFAULT_MAX_LINE
    ) -> None:
        self._max_size = max_size
        self._max_line = max_line
        self._buffer = bytearray()
        self._scanned = 0
        """Bytes at the start of the buffer known to hold no newline."""
        self._size = 0
        self._eof = False
        self._line = 1
        """Number of the next line to decode."""
        self._header: TraceHeader | None = None
        self._seen: set[tuple[LayerRef, str]] = set()
        self._previous = 0
        self._accesses = 0
        self._done = False
        self._error: StarlightError | None = None

    @property
    def header(self) -> TraceHeader | None:
        """The header, once decoded."""
        return self._header

    def receive_data(self, data: bytes) -> None:
        """Append input; ``b""`` means the input ended."""
        if self._error is not None:
            raise self._error
        if self._eof:
            if data:
                raise RuntimeError("receive_data() called with data after the end of input")
            return
        if not data:
            self._eof = True
            return
        self._size += len(data)
        if self._size > self._max_size:
            self._error = ResourceExhausted(
                f"trace larger than {self._max_size} bytes (refused at line {self._line})",
                hint="a trace holds the first access per file only; split or shorten it",
            )
            self._buffer.clear()
            raise self._error
        self._buffer += data

    def next_event(self) -> TraceEvent | None:
        if self._error is not None:
            raise self._error
        try:
            return self._next_event()
        except StarlightError as exc:
            self._error = exc
            self._buffer.clear()
            raise

    def _next_event(self) -> TraceEvent | None:
        if self._done:
            return None
        newline = self._buffer.find(b"\n", self._scanned)
        if newline < 0:
            self._scanned = len(self._buffer)
            if len(self._buffer) > self._max_line:
                raise InvalidInput(f"trace line {self._line}: longer than {self._max_line} bytes")
            if not self._eof:
                return None
            if not self._buffer:
                return self._end()
            line = bytes(self._buffer)
            self._buffer.clear()
        else:
            if newline > self._max_line:
                raise InvalidInput(f"trace line {self._line}: longer than {self._max_line} bytes")
            line = bytes(self._buffer[:newline])
            del self._buffer[: newline + 1]
        self._scanned = 0
        number = self._line
        self._line += 1
        return self._decode_line(line, number)

    def _end(self) -> TraceEnd:
        if self._header is None:
            raise InvalidInput("empty trace: line 1 must be the trace header")
        self._done = True
        return TraceEnd(accesses=self._accesses, size=self._size)

    def _decode_line(self, line: bytes, number: int) -> TraceEvent:
        if not line.strip():
            raise InvalidInput(f"trace line {number}: empty line")
        try:
            data = json.loads(line)
        except (ValueError, UnicodeDecodeError) as exc:
            raise InvalidInput(f"trace line {number}: not JSON ({exc})") from exc
        if self._header is None:
            return self._decode_header(data, number)
        return self._decode_access(data, number)

    def _decode_header(self, data: object, number: int) -> TraceHeader:
        if not isinstance(data, dict):
            raise InvalidInput(f"trace line {number}: the header must be a JSON object")
        version = data.get("version")
        if version != TRACE_VERSION:
            # Said first and plainly: a newer worker's trace may differ in every other field.
            raise InvalidInput(
                f"trace line {number}: unsupported trace version {version!r} "
                f"(this starlight reads version {TRACE_VERSION})"
            )
        self._header = _structure(data, TraceHeader, "trace header", number)
        return self._header

    def _decode_access(self, data: object, number: int) -> FileAccess:
        if not isinstance(data, dict):
            raise InvalidInput(f"trace line {number}: an access must be a JSON object")
        access = _structure(data, FileAccess, "access", number)
        if access.offset_ns < self._previous:
            raise InvalidInput(
                f"trace line {number}: access to {access.path!r} at {access.offset_ns} ns comes "
                f"after one at {self._previous} ns: accesses must be in order of offset"
            )
        key = (access.layer, access.path)
        if key in self._seen:
            raise InvalidInput(
                f"trace line {number}: second access to {access.path!r} in layer "
                f"{access.layer}: a trace holds the first access per file only"
            )
        self._seen.add(key)
        self._previous = access.offset_ns
        self._accesses += 1
        return access


def _structure(data: object, cls: type[T], what: str, number: int) -> T:
    try:
        return wire.structure(data, cls, what)
    except StarlightError as exc:
        # The converter's errors already say "invalid <what>: $.field: …"; a validator's
        # (raised while building the object) say only what is wrong.
        message = exc.message
        if not message.startswith("invalid "):
            message = f"invalid {what}: {message}"
        raise InvalidInput(f"trace line {number}: {message}") from exc


def decode_chunks(
    chunks: Iterable[bytes],
    *,
    max_size: int = DEFAULT_MAX_TRACE_SIZE,
    max_line: int = DEFAULT_MAX_LINE,
) -> Trace:
    """Decode a trace arriving in pieces (e.g. an upload's body)."""
    decoder = TraceDecoder(max_size=max_size, max_line=max_line)
    header: TraceHeader | None = None
    accesses: list[FileAccess] = []

    def drain() -> TraceEnd | None:
        nonlocal header
        while True:
            event = decoder.next_event()
            if event is None:
                return None
            if isinstance(event, TraceHeader):
                header = event
            elif isinstance(event, FileAccess):
                accesses.append(event)
            else:
                return event

    for chunk in chunks:
        if chunk:
            decoder.receive_data(chunk)
            drain()
    decoder.receive_data(b"")
    end = drain()
    # The decoder raises rather than end without a header.
    assert end is not None
    assert header is not None
    # Already checked line by line; the model checks again, cheaply, so a Trace is always valid.
    return Trace(header, accesses)


def decode(
    data: bytes, *, max_size: int = DEFAULT_MAX_TRACE_SIZE, max_line: int = DEFAULT_MAX_LINE
) -> Trace:
    """Decode a whole trace."""
    return decode_chunks((data,), max_size=max_size, max_line=max_line)
