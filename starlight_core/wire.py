"""The one cattrs converter: every JSON form starlight reads or writes goes through here.

Models stay plain attrs classes; their field names on the wire (``mediaType``,
``schemaVersion``…), which keys are forbidden, and how bytes are encoded are declared here.
Formats that we own (TOC, bundle header, traces) forbid unknown keys; formats owned by others
(OCI manifests and configs) tolerate them, as every registry client must.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any, Final, TypeVar

import attrs
import cattrs
from cattrs.gen import make_dict_structure_fn, make_dict_unstructure_fn, override

from starlight_core import oci
from starlight_core.digest import Digest
from starlight_core.errors import InvalidInput, StarlightError
from starlight_core.layer import toc
from starlight_core.platform import Platform

__all__ = ["converter", "dumps", "loads", "register", "structure", "unstructure"]

T = TypeVar("T")

converter: Final = cattrs.Converter(forbid_extra_keys=False)

converter.register_structure_hook(Digest, lambda value, _: Digest(value))
converter.register_unstructure_hook(Digest, str)
converter.register_structure_hook(
    bytes, lambda value, _: base64.b64decode(value.encode("ascii"), validate=True)
)
converter.register_unstructure_hook(bytes, lambda value: base64.b64encode(value).decode("ascii"))


def register(
    cls: type[Any],
    *,
    renames: Mapping[str, str] | None = None,
    forbid_extra_keys: bool = False,
    omit_if_default: bool = True,
    always: tuple[str, ...] = (),
) -> None:
    """Declare the wire form of an attrs class: renamed fields, strictness, default omission.

    Fields named in ``always`` are written even when they hold their default (``version``).
    """
    overrides: dict[str, Any] = {
        name: override(rename=wire) for name, wire in (renames or {}).items()
    }
    for name in always:
        overrides[name] = override(rename=(renames or {}).get(name), omit_if_default=False)
    converter.register_structure_hook(
        cls,
        make_dict_structure_fn(
            cls, converter, _cattrs_forbid_extra_keys=forbid_extra_keys, **overrides
        ),
    )
    converter.register_unstructure_hook(
        cls,
        make_dict_unstructure_fn(
            cls, converter, _cattrs_omit_if_default=omit_if_default, **overrides
        ),
    )


def _structure_platform(value: Any, _: Any) -> Platform:
    if not isinstance(value, Mapping):
        raise InvalidInput("platform must be an object")
    return Platform(
        os=str(value["os"]),
        architecture=str(value["architecture"]),
        variant=value.get("variant") or None,
    )


converter.register_structure_hook(Platform, _structure_platform)
converter.register_unstructure_hook(
    Platform,
    lambda p: (
        {"architecture": p.architecture, "os": p.os} | ({"variant": p.variant} if p.variant else {})
    ),
)

_OCI_RENAMES: Final = {
    "media_type": "mediaType",
    "schema_version": "schemaVersion",
    "artifact_type": "artifactType",
}
for _cls in (oci.Descriptor, oci.Manifest, oci.Index):
    register(_cls, renames=_OCI_RENAMES)
register(oci.RootFS)
register(oci.History)
register(
    oci.RuntimeConfig,
    renames={
        "entrypoint": "Entrypoint",
        "cmd": "Cmd",
        "env": "Env",
        "working_dir": "WorkingDir",
        "user": "User",
        "labels": "Labels",
    },
)
register(oci.ImageConfig)

# --- Starlight's own formats: strict --------------------------------------------------------

converter.register_structure_hook(toc.EntryType, lambda value, _: toc.EntryType(value))
converter.register_unstructure_hook(toc.EntryType, lambda value: value.value)


def _structure_chunk(value: Any, _: Any) -> toc.Chunk:
    # A chunk travels as a compact array: 100,000-file TOCs stay small.
    if not isinstance(value, list | tuple) or len(value) != 5:
        raise InvalidInput("a chunk is [offset, size, compressed_offset, compressed_size, digest]")
    offset, size, compressed_offset, compressed_size, digest = value
    numbers = (offset, size, compressed_offset, compressed_size)
    if not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in numbers):
        raise InvalidInput("chunk offsets and sizes must be non-negative integers")
    return toc.Chunk(offset, size, compressed_offset, compressed_size, Digest(digest))


converter.register_structure_hook(toc.Chunk, _structure_chunk)
converter.register_unstructure_hook(
    toc.Chunk,
    lambda c: [c.offset, c.size, c.compressed_offset, c.compressed_size, str(c.digest)],
)
# TOC entries are the bulk of every header (100,000 per image is normal): they get hand-written
# hooks, several times faster than generated ones, and a compact form — fields at their
# default are left out, and a single-chunk file's chunk omits its digest (it is the file's).
_ENTRY_FIELDS: Final = frozenset(f.name for f in attrs.fields(toc.Entry))
_ENTRY_INTS: Final = ("uid", "gid", "mtime_ns", "size", "devmajor", "devminor", "offset")


def _natural(value: Any, name: str) -> int:
    if type(value) is not int or value < 0:
        raise InvalidInput(f"{name} must be a non-negative integer, not {value!r}")
    return value


def _entry_chunk(value: Any, digest: Digest | None) -> toc.Chunk:
    if type(value) is list and len(value) == 4 and digest is not None:
        offset, size, compressed_offset, compressed_size = value
        if (
            type(offset) is int
            and type(size) is int
            and type(compressed_offset) is int
            and type(compressed_size) is int
            and min(offset, size, compressed_offset, compressed_size) >= 0
        ):
            return toc.Chunk(offset, size, compressed_offset, compressed_size, digest)
        value = [*value, digest]
    return _structure_chunk(value, None)


def _structure_entry(value: Any, _: Any) -> toc.Entry:
    if not isinstance(value, dict):
        raise InvalidInput("a TOC entry must be an object")
    if not value.keys() <= _ENTRY_FIELDS:
        extra = ", ".join(sorted(value.keys() - _ENTRY_FIELDS))
        raise InvalidInput(f"unknown TOC entry keys: {extra}")
    name = value.get("name")
    if not isinstance(name, str):
        raise InvalidInput("a TOC entry needs a name")
    digest = value.get("digest")
    digest = Digest(digest) if digest is not None else None
    ints = {key: _natural(value[key], key) for key in _ENTRY_INTS if key in value}
    if "mtime_ns" in value and type(value["mtime_ns"]) is int:
        ints["mtime_ns"] = value["mtime_ns"]  # times before 1970 are negative
    xattrs = value.get("xattrs")
    chunks = value.get("chunks")
    return toc.Entry(
        name=name,
        type=toc.EntryType(value.get("type")),
        mode=_natural(value.get("mode", 0o644), "mode"),
        uname=str(value.get("uname", "")),
        gname=str(value.get("gname", "")),
        linkname=str(value.get("linkname", "")),
        xattrs=(
            {str(k): base64.b64decode(v.encode("ascii"), validate=True) for k, v in xattrs.items()}
            if xattrs
            else {}
        ),
        digest=digest,
        chunks=tuple(_entry_chunk(c, digest) for c in chunks) if chunks else (),
        **ints,
    )


def _unstructure_entry(entry: toc.Entry) -> dict[str, Any]:
    out: dict[str, Any] = {"name": entry.name, "type": entry.type.value}
    if entry.mode != 0o644:
        out["mode"] = entry.mode
    for key in ("uid", "gid", "uname", "gname", "mtime_ns", "size", "linkname"):
        field = getattr(entry, key)
        if field:
            out[key] = field
    if entry.devmajor or entry.devminor:
        out["devmajor"], out["devminor"] = entry.devmajor, entry.devminor
    if entry.xattrs:
        out["xattrs"] = {k: base64.b64encode(v).decode("ascii") for k, v in entry.xattrs.items()}
    if entry.digest is not None:
        out["digest"] = str(entry.digest)
    if entry.offset:
        out["offset"] = entry.offset
    if entry.chunks:
        out["chunks"] = [
            [c.offset, c.size, c.compressed_offset, c.compressed_size]
            if c.digest == entry.digest
            else [c.offset, c.size, c.compressed_offset, c.compressed_size, str(c.digest)]
            for c in entry.chunks
        ]
    return out


converter.register_structure_hook(toc.Entry, _structure_entry)
converter.register_unstructure_hook(toc.Entry, _unstructure_entry)
register(
    toc.LayerInfo,
    renames={"media_type": "mediaType", "diff_id": "diffID"},
    forbid_extra_keys=True,
)
_TOC_FIELDS: Final = frozenset(f.name for f in attrs.fields(toc.TOC))


def _structure_toc(value: Any, _: Any) -> toc.TOC:
    if not isinstance(value, dict):
        raise InvalidInput("a TOC must be an object")
    if not value.keys() <= _TOC_FIELDS:
        raise InvalidInput(f"unknown TOC keys: {', '.join(sorted(value.keys() - _TOC_FIELDS))}")
    version = value.get("version")
    if version != toc.TOC_VERSION:
        raise InvalidInput(f"unsupported TOC version {version!r} (this is version 1)")
    raw_entries = value.get("entries")
    if not isinstance(raw_entries, list):
        raise InvalidInput("a TOC needs a list of entries")
    entries = []
    for index, raw in enumerate(raw_entries):
        try:
            entries.append(_structure_entry(raw, None))
        except (StarlightError, ValueError, TypeError, KeyError) as exc:
            message = exc.message if isinstance(exc, StarlightError) else str(exc)
            raise InvalidInput(f"entries[{index}]: {message}") from exc
    return toc.TOC(
        layer=converter.structure(value.get("layer"), toc.LayerInfo),
        entries=tuple(entries),
        chunk_size=_natural(value.get("chunk_size"), "chunk_size"),
        version=version,
    )


def _unstructure_toc(value: toc.TOC) -> dict[str, Any]:
    return {
        "layer": converter.unstructure(value.layer),
        "entries": [_unstructure_entry(entry) for entry in value.entries],
        "chunk_size": value.chunk_size,
        "version": value.version,
    }


converter.register_structure_hook(toc.TOC, _structure_toc)
converter.register_unstructure_hook(toc.TOC, _unstructure_toc)


def _describe(exc: BaseException, type_: Any) -> str:
    if isinstance(exc, StarlightError):
        return exc.message
    if isinstance(exc, KeyError):
        return "required field missing"
    if type_ is not None:
        return f"invalid value for type {getattr(type_, '__name__', type_)} ({exc})"
    return str(exc)


def structure(data: Any, cls: type[T], what: str | None = None) -> T:
    """Build ``cls`` from JSON-shaped data; malformed input raises ``InvalidInput`` with paths."""
    try:
        return converter.structure(data, cls)
    except cattrs.BaseValidationError as exc:
        details = "; ".join(cattrs.transform_error(exc, path="$", format_exception=_describe))
        raise InvalidInput(f"invalid {what or cls.__name__}: {details}") from exc
    except (KeyError, TypeError, ValueError) as exc:
        raise InvalidInput(f"invalid {what or cls.__name__}: {exc}") from exc


def unstructure(obj: Any) -> Any:
    return converter.unstructure(obj)


def loads(data: bytes | str, cls: type[T], what: str | None = None) -> T:
    try:
        parsed = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidInput(f"invalid {what or cls.__name__}: not JSON ({exc})") from exc
    return structure(parsed, cls, what)


def dumps(obj: Any, *, indent: int | None = None) -> bytes:
    """Canonical JSON: no spaces (unless indented), keys in field order, ASCII.

    ASCII escapes keep names that are not valid UTF-8 (surrogate-escaped tar names) intact.
    """
    separators = (",", ":") if indent is None else (",", ": ")
    return json.dumps(
        unstructure(obj), separators=separators, indent=indent, ensure_ascii=True
    ).encode()


# --- bundle ---------------------------------------------------------------------------------
# Imported here, not at the top: ``starlight_core.bundle`` itself uses this module.
from starlight_core.bundle import header as _bundle  # noqa: E402


def _structure_extent(value: Any, _: Any) -> _bundle.ExtentDescriptor:
    # One compact array per extent: a 100,000-file bundle header stays small.
    if not isinstance(value, list | tuple) or len(value) != 6:
        raise InvalidInput(
            "an extent is [content, chunk_index, offset, size, compressed_size, digest]"
        )
    content, chunk_index, offset, size, compressed_size, digest = value
    numbers = (chunk_index, offset, size, compressed_size)
    if not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in numbers):
        raise InvalidInput("extent indexes, offsets and sizes must be non-negative integers")
    return _bundle.ExtentDescriptor(
        Digest(content), chunk_index, offset, size, compressed_size, Digest(digest)
    )


converter.register_structure_hook(_bundle.ExtentDescriptor, _structure_extent)
converter.register_unstructure_hook(
    _bundle.ExtentDescriptor,
    lambda e: [str(e.content), e.chunk_index, e.offset, e.size, e.compressed_size, str(e.digest)],
)
register(_bundle.ImageInfo, forbid_extra_keys=True)
register(_bundle.ResumeInfo, forbid_extra_keys=True)

# The header names a content sent or copied by where its TOC lists it, when it can: an
# extent as [layer, entry, chunk], a local copy as [layer, entry] (indexes into ``layers``,
# never an omitted one). Digests repeated from the TOCs would be most of the header's
# compressed size (random hex does not compress); the full forms stay valid.
register(_bundle.BundleHeader, forbid_extra_keys=True, always=("version", "local"))
_structure_header_fields = converter.get_structure_hook(_bundle.BundleHeader)
_unstructure_header_fields = converter.get_unstructure_hook(_bundle.BundleHeader)


def _extent_of(entry: toc.Entry, chunk_index: int) -> _bundle.ExtentDescriptor:
    chunk = entry.chunks[chunk_index]
    assert entry.digest is not None
    return _bundle.ExtentDescriptor(
        entry.digest, chunk_index, chunk.offset, chunk.size, chunk.compressed_size, chunk.digest
    )


def _unstructure_header(header: _bundle.BundleHeader) -> dict[str, Any]:
    # The other fields as declared; extents and local (keeping their place) are written here.
    data: dict[str, Any] = _unstructure_header_fields(attrs.evolve(header, extents=(), local=()))
    omitted = set(header.omitted)
    where: dict[Digest, list[int]] = {}
    for layer, layer_toc in enumerate(header.layers):
        if layer not in omitted:
            for index, entry in enumerate(layer_toc.entries):
                if entry.digest is not None and entry.has_content:
                    where.setdefault(entry.digest, [layer, index])
    extents: list[Any] = []
    for extent in header.extents:
        ref = where.get(extent.content)
        if ref is not None:
            entry = header.layers[ref[0]].entries[ref[1]]
            if extent.chunk_index < len(entry.chunks) and (
                _extent_of(entry, extent.chunk_index) == extent
            ):
                extents.append([*ref, extent.chunk_index])
                continue
        extents.append(converter.unstructure(extent, _bundle.ExtentDescriptor))
    data["extents"] = extents
    data["local"] = [where.get(digest, str(digest)) for digest in header.local]
    return data


def _referenced_entry(header: _bundle.BundleHeader, layer: Any, index: Any) -> toc.Entry:
    if type(layer) is not int or type(index) is not int:
        raise InvalidInput("a content reference is [layer, entry] of non-negative integers")
    if not 0 <= layer < len(header.layers) or layer in header.omitted:
        raise InvalidInput(f"a content reference names layer {layer}, which is not sent")
    entries = header.layers[layer].entries
    if not 0 <= index < len(entries) or not entries[index].has_content:
        raise InvalidInput(f"a content reference names entry {index} of layer {layer}: no file")
    return entries[index]


def _structure_header(value: Any, _: Any) -> _bundle.BundleHeader:
    if not isinstance(value, Mapping):
        raise InvalidInput("a bundle header is an object")
    extents, local = value.get("extents", []), value.get("local", [])
    if not isinstance(extents, list) or not isinstance(local, list):
        raise InvalidInput("a bundle header's extents and local are arrays")
    header: _bundle.BundleHeader = _structure_header_fields(
        {**value, "extents": [], "local": []}, _bundle.BundleHeader
    )
    try:
        return _resolve_contents(header, extents, local)
    except InvalidInput as exc:
        raise InvalidInput(f"invalid bundle header: {exc.message}") from None


def _resolve_contents(
    header: _bundle.BundleHeader, extents: list[Any], local: list[Any]
) -> _bundle.BundleHeader:
    descriptors: list[_bundle.ExtentDescriptor] = []
    for item in extents:
        if type(item) is list and len(item) == 3:
            entry = _referenced_entry(header, item[0], item[1])
            chunk_index = item[2]
            if type(chunk_index) is not int or not 0 <= chunk_index < len(entry.chunks):
                raise InvalidInput(f"an extent names chunk {chunk_index!r} of a file without it")
            descriptors.append(_extent_of(entry, chunk_index))
        else:
            descriptors.append(_structure_extent(item, None))
    contents: list[Digest] = []
    for item in local:
        if type(item) is list and len(item) == 2:
            digest = _referenced_entry(header, item[0], item[1]).digest
            assert digest is not None
            contents.append(digest)
        elif isinstance(item, str):
            contents.append(Digest(item))
        else:
            raise InvalidInput("a local content is a digest or [layer, entry]")
    return attrs.evolve(header, extents=tuple(descriptors), local=tuple(contents))


converter.register_structure_hook(_bundle.BundleHeader, _structure_header)
converter.register_unstructure_hook(_bundle.BundleHeader, _unstructure_header)
register(_bundle.EndRecord, forbid_extra_keys=True)
register(_bundle.ErrorRecord, forbid_extra_keys=True)

# --- traces ---------------------------------------------------------------------------------
# Imported here, not at the top: ``starlight_core.trace.codec`` itself uses this module.
from starlight_core.trace import record as _trace  # noqa: E402


def _structure_time(value: Any, _: Any) -> datetime:
    # RFC 3339 with an offset: a time without one means nothing to a proxy in another zone.
    if not isinstance(value, str):
        raise InvalidInput("a time is an RFC 3339 string such as 2024-05-01T12:00:00Z")
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError as exc:
        raise InvalidInput(f"{value!r} is not an RFC 3339 time") from exc
    if parsed.tzinfo is None:
        raise InvalidInput(f"{value!r} has no UTC offset (RFC 3339 needs one, e.g. Z)")
    return parsed


def _unstructure_time(value: datetime) -> str:
    return value.astimezone(UTC).isoformat().replace("+00:00", "Z")


converter.register_structure_hook(datetime, _structure_time)
converter.register_unstructure_hook(datetime, _unstructure_time)


def _structure_layer_ref(value: Any, _: Any) -> _trace.LayerRef:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str):
        return Digest(value)
    raise InvalidInput("a layer is an index (a non-negative integer) or a diff_id (a digest)")


converter.register_structure_hook_func(lambda type_: type_ == _trace.LayerRef, _structure_layer_ref)


def _exact_str(value: Any, _: Any) -> str:
    # cattrs' own str hook would turn 5 into "5": traces come from outside, so types are exact.
    if not isinstance(value, str):
        raise InvalidInput(f"expected a string, not {type(value).__name__}")
    return value


def _exact_optional_str(value: Any, type_: Any) -> str | None:
    return None if value is None else _exact_str(value, type_)


def _exact_int(value: Any, _: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise InvalidInput(f"expected an integer, not {type(value).__name__}")
    return value


def _register_exact(cls: type[Any], **hooks: Any) -> None:
    """A strict format's structure hook with exact types for the fields named."""
    overrides: dict[str, Any] = {name: override(struct_hook=hook) for name, hook in hooks.items()}
    converter.register_structure_hook(
        cls, make_dict_structure_fn(cls, converter, _cattrs_forbid_extra_keys=True, **overrides)
    )


register(_trace.TracedImage, forbid_extra_keys=True)
register(_trace.TraceHeader, forbid_extra_keys=True, always=("version",))
register(_trace.FileAccess, forbid_extra_keys=True, omit_if_default=False)
_register_exact(_trace.TracedImage, reference=_exact_str)
_register_exact(
    _trace.TraceHeader,
    version=_exact_int,
    trace_id=_exact_str,
    container_id=_exact_str,
    group=_exact_optional_str,
    worker=_exact_optional_str,
)
_register_exact(_trace.FileAccess, offset_ns=_exact_int, path=_exact_str)
