"""The startup trace: which files a container read first, and when.

A worker with the optimizer on records, for every container started from Starlight snapshots,
the first access to each file; it uploads one ``Trace`` per container. The proxy merges the
traces of an image (``starlight_core.trace.merge``) into the order its bundles send contents in.

A trace is a header (``TraceHeader``: which container of which image, started when) and the
first accesses (``FileAccess``), in order of their offset into the container's life. The JSON
Lines form is in ``starlight_core.trace.codec``; the JSON form of each record is declared in
``starlight_core.wire`` (strict: unknown keys are refused).

These classes have no dependency on the wire module (which imports this one).
"""

from __future__ import annotations

import enum
import re
import uuid
from collections.abc import Iterable
from datetime import datetime
from typing import Any, Final

import attrs

from starlight_core.digest import Digest
from starlight_core.errors import InvalidInput, StarlightError
from starlight_core.layer.tar import normalize_name
from starlight_core.platform import Platform
from starlight_core.reference import Reference

__all__ = [
    "TRACE_VERSION",
    "AccessKind",
    "FileAccess",
    "LayerRef",
    "Trace",
    "TraceHeader",
    "TracedImage",
    "check_accesses",
]

TRACE_VERSION: Final = 1

LayerRef = int | Digest
"""A layer of the traced image: its index (base layer 0) or its ``diff_id``."""

_MAX_LABEL: Final = 255
_GROUP_RE: Final = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


class AccessKind(enum.Enum):
    """How a file was first touched. Any kind counts the same for ranking: the file was needed."""

    GETATTR = "getattr"
    OPEN = "open"
    READ = "read"
    READLINK = "readlink"
    EXEC = "exec"


def _reference(_: object, attribute: attrs.Attribute[str], value: str) -> None:
    # Raises ``InvalidReference`` (an ``InvalidInput``) with the reason.
    Reference.parse(value)


def _label(_: object, attribute: attrs.Attribute[Any], value: str | None) -> None:
    if value is None:
        return
    if not value or len(value) > _MAX_LABEL or not value.isprintable():
        raise InvalidInput(f"{attribute.name} must be 1 to {_MAX_LABEL} printable characters")


def _group(_: object, attribute: attrs.Attribute[str | None], value: str | None) -> None:
    if value is not None and not _GROUP_RE.match(value):
        raise InvalidInput(
            f"group {value!r} must be 1 to 128 letters, digits, '_', '.' or '-', "
            "starting with a letter or digit"
        )


def _trace_id(_: object, attribute: attrs.Attribute[str], value: str) -> None:
    # Uploads are idempotent by this id, so one UUID must have exactly one spelling.
    try:
        canonical: str | None = str(uuid.UUID(value))
    except (ValueError, TypeError, AttributeError):
        canonical = None
    if canonical != value:
        raise InvalidInput(f"trace id {value!r} must be a UUID in lowercase hyphenated form")


def _version(_: object, attribute: attrs.Attribute[int], value: int) -> None:
    if value != TRACE_VERSION:
        raise InvalidInput(
            f"unsupported trace version {value!r} (this starlight reads version {TRACE_VERSION})"
        )


def _aware(_: object, attribute: attrs.Attribute[datetime], value: datetime) -> None:
    if value.tzinfo is None or value.utcoffset() is None:
        raise InvalidInput(f"{attribute.name} must carry a UTC offset")


def _offset(_: object, attribute: attrs.Attribute[int], value: int) -> None:
    if isinstance(value, bool) or value < 0:
        raise InvalidInput(f"{attribute.name} must be a non-negative integer")


def _layer(_: object, attribute: attrs.Attribute[LayerRef], value: LayerRef) -> None:
    if isinstance(value, Digest):
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InvalidInput("layer must be an index (a non-negative integer) or a diff_id")


def _path(_: object, attribute: attrs.Attribute[str], value: str) -> None:
    # Merging compares paths as strings: two spellings of one file would rank as two.
    try:
        normal = normalize_name(value)
    except StarlightError as exc:
        raise InvalidInput(exc.message) from exc
    if not normal or normal != value:
        raise InvalidInput(
            f"path {value!r} is not normalised (as in the TOC: relative, no '.', '..', "
            "empty components or trailing '/'; not the root)"
        )


@attrs.frozen(kw_only=True)
class TracedImage:
    """The image a traced container ran: what was asked for and exactly what was run."""

    reference: str = attrs.field(validator=_reference)
    manifest_digest: Digest
    """The platform-specific manifest (never an index): it identifies the image for merging."""
    platform: Platform


@attrs.frozen(kw_only=True)
class TraceHeader:
    """The first record of a trace: whose accesses follow."""

    version: int = attrs.field(default=TRACE_VERSION, validator=_version)
    trace_id: str = attrs.field(validator=_trace_id)
    """Chosen by the worker; uploading the same trace again is a no-op."""
    image: TracedImage
    container_id: str = attrs.field(validator=_label)
    started_at: datetime = attrs.field(validator=_aware)
    """Wall clock when the container's snapshot was first mounted (offsets count from there)."""
    group: str | None = attrs.field(default=None, validator=_group)
    """Containers started together (``optimizer on --group``) are ranked jointly."""
    worker: str | None = attrs.field(default=None, validator=_label)


@attrs.frozen
class FileAccess:
    """The first access to one file of the image in one container."""

    offset_ns: int = attrs.field(validator=_offset)
    """Monotonic nanoseconds since the container's snapshot was first mounted."""
    layer: LayerRef = attrs.field(validator=_layer)
    path: str = attrs.field(validator=_path)
    """The entry's name as in the layer's TOC (normalised)."""
    kind: AccessKind


def _accesses(value: Iterable[FileAccess]) -> tuple[FileAccess, ...]:
    return tuple(value)


def _in_order(
    _: object, attribute: attrs.Attribute[tuple[FileAccess, ...]], value: tuple[FileAccess, ...]
) -> None:
    check_accesses(value)


def check_accesses(accesses: Iterable[FileAccess], *, first_line: int | None = None) -> None:
    """Offsets never decrease and no (layer, path) comes twice: what a worker must write.

    ``first_line`` (the JSON Lines line of the first access) makes errors name lines.
    """
    seen: set[tuple[LayerRef, str]] = set()
    previous = 0
    for index, access in enumerate(accesses):
        where = f"line {first_line + index}: " if first_line is not None else ""
        if access.offset_ns < previous:
            raise InvalidInput(
                f"{where}access to {access.path!r} at {access.offset_ns} ns comes after one at "
                f"{previous} ns: accesses must be in order of offset"
            )
        key = (access.layer, access.path)
        if key in seen:
            raise InvalidInput(
                f"{where}second access to {access.path!r} in layer {access.layer}: "
                "a trace holds the first access per file only"
            )
        seen.add(key)
        previous = access.offset_ns


@attrs.frozen
class Trace:
    """A whole trace: the header, then first accesses in order of offset (ties: as recorded)."""

    header: TraceHeader
    accesses: tuple[FileAccess, ...] = attrs.field(
        default=(), converter=_accesses, validator=_in_order
    )

    @classmethod
    def build(cls, header: TraceHeader, accesses: Iterable[FileAccess]) -> Trace:
        """A trace from accesses as a recorder collects them: sorted by offset (stable), and
        only the first access of each (layer, path) kept."""
        ordered = sorted(accesses, key=lambda access: access.offset_ns)
        seen: set[tuple[LayerRef, str]] = set()
        kept: list[FileAccess] = []
        for access in ordered:
            key = (access.layer, access.path)
            if key not in seen:
                seen.add(key)
                kept.append(access)
        return cls(header, kept)

    @property
    def trace_id(self) -> str:
        return self.header.trace_id

    @property
    def image(self) -> Digest:
        """The manifest digest of the traced image."""
        return self.header.image.manifest_digest

    @property
    def group(self) -> str | None:
        return self.header.group
