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
from typing import Any, Final, TypeVar

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
register(toc.Entry, forbid_extra_keys=True)
register(
    toc.LayerInfo,
    renames={"media_type": "mediaType", "diff_id": "diffID"},
    forbid_extra_keys=True,
)
register(toc.TOC, forbid_extra_keys=True, always=("version", "chunk_size"))


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
register(_bundle.BundleHeader, forbid_extra_keys=True, always=("version", "local"))
register(_bundle.EndRecord, forbid_extra_keys=True)
register(_bundle.ErrorRecord, forbid_extra_keys=True)
