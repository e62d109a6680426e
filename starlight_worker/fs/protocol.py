"""The control protocol of the layer filesystem server: JSON lines over a unix socket.

Imports no FUSE, so the daemon (and anything else) can speak it without libfuse.

Each request is one line, a JSON object with ``op`` and the op's arguments; each response is
one line::

    {"ok": true, "result": ...}
    {"ok": false, "error": "<StarlightError code>", "message": "..."}

A connection may carry any number of requests, answered in order. Ops:

``ping``
    → ``ServerInfo`` (pid, mountpoint, version, layers, waiting): the server is up and mounted.
``attach {layer_key, layer_dir}``
    → ``{"path": "<mountpoint>/<layer_key>"}``. Idempotent for the same directory; another
    directory under an attached key is ``already_exists``.
``detach {layer_key}``
    → ``{"detached": bool}`` (false if it was not attached). Readers still waiting on the
    layer's files get EIO.
``arrived {layer_key, names}``
    → ``{"woken": n}``: these files' contents are in place; wake their readers, in the layer
    and in its aliases (keys ``<layer_key>@<suffix>``: other views of the same directory, one
    per traced container). A hint only: readers re-check on their own every poll interval.
``list``
    → ``[AttachedLayerInfo, ...]``.
``trace_on`` / ``trace_off``
    → ``{}``. ``trace_on`` starts a fresh trace (first accesses are counted from then on); while
    tracing is on already it changes nothing (a restarted daemon loses no undrained record).
``trace_drain``
    → ``[Access, ...]``: the first accesses recorded since the last drain, then forgotten.
``shutdown``
    → ``{}``, then the server unmounts and exits; ``failed_precondition`` while any layer is
    attached or any file open (detach layers once their overlays are unmounted).
"""

from __future__ import annotations

import json
from typing import Any, Final

import attrs

from starlight_core import errors, wire

__all__ = [
    "ALIAS_SEPARATOR",
    "EXIT_ALREADY_RUNNING",
    "MAX_LINE",
    "OPS",
    "Access",
    "AttachedLayerInfo",
    "Request",
    "ServerInfo",
    "decode_request",
    "decode_response",
    "encode_error",
    "encode_request",
    "encode_result",
    "error_class",
]

ALIAS_SEPARATOR: Final = "@"
"""A key ``<layer key>@<suffix>`` is an alias: another view of that layer's directory."""

EXIT_ALREADY_RUNNING: Final = 3
"""The server's exit status when another server already owns its socket."""

MAX_LINE: Final = 64 * 1024 * 1024
"""Longest line either side accepts (an ``arrived`` for a whole layer can be long)."""

OPS: Final = frozenset(
    {"ping", "attach", "detach", "arrived", "list", "trace_on", "trace_off", "trace_drain",
     "shutdown"}
)  # fmt: skip


@attrs.frozen
class Request:
    op: str
    layer_key: str | None = None
    layer_dir: str | None = None
    names: tuple[str, ...] = ()


@attrs.frozen
class ServerInfo:
    pid: int
    mountpoint: str
    version: str
    layers: int
    waiting: int
    """Files that readers are waiting for right now."""


@attrs.frozen
class AttachedLayerInfo:
    layer_key: str
    layer_dir: str
    path: str
    entries: int
    complete: bool
    """``<layer_dir>/complete`` exists: the daemon may stop using FUSE for this layer."""
    attached_ns: int = 0
    """``time.monotonic_ns()`` when it was attached: the origin of its accesses' ``t_ns``
    (the monotonic clock is the machine's, so other processes can compare; 0 from a server
    that predates this field)."""


@attrs.frozen
class Access:
    """The first access to one file of one layer while tracing was on."""

    t_ns: int
    """Monotonic nanoseconds since the layer was attached."""
    layer_key: str
    name: str
    """The entry's name as in the TOC."""
    kind: str
    """``getattr``, ``readlink``, ``open`` or ``read``."""


wire.register(Request, forbid_extra_keys=True)
for _cls in (ServerInfo, AttachedLayerInfo, Access):
    wire.register(_cls, omit_if_default=False)


def _codes() -> dict[str, type[errors.StarlightError]]:
    found: dict[str, type[errors.StarlightError]] = {}
    pending: list[type[errors.StarlightError]] = [errors.StarlightError]
    while pending:
        cls = pending.pop()
        found.setdefault(cls.code, cls)
        pending.extend(cls.__subclasses__())
    return found


def error_class(code: str) -> type[errors.StarlightError]:
    """The error class a server-side ``code`` stands for (``StarlightError`` if unknown)."""
    return _codes().get(code, errors.StarlightError)


def _line(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=True).encode() + b"\n"


def encode_request(request: Request) -> bytes:
    return _line(wire.unstructure(request))


def decode_request(line: bytes) -> Request:
    request = wire.loads(line, Request, "request")
    if request.op not in OPS:
        raise errors.InvalidInput(f"unknown op {request.op!r}; expected one of {sorted(OPS)}")
    return request


def encode_result(result: Any) -> bytes:
    return _line({"ok": True, "result": wire.unstructure(result)})


def encode_error(exc: BaseException) -> bytes:
    if isinstance(exc, errors.StarlightError):
        return _line({"ok": False, "error": exc.code, "message": str(exc)})
    return _line({"ok": False, "error": "internal", "message": f"{type(exc).__name__}: {exc}"})


def decode_response(line: bytes) -> Any:
    """The result of a response line (JSON-shaped); a server error raises its class."""
    try:
        response = json.loads(line)
    except ValueError as exc:
        raise errors.DaemonUnavailable(f"garbled answer from the layer filesystem: {exc}") from exc
    if not isinstance(response, dict) or "ok" not in response:
        raise errors.DaemonUnavailable("garbled answer from the layer filesystem")
    if response["ok"]:
        return response.get("result")
    raise error_class(str(response.get("error")))(str(response.get("message", "")))
