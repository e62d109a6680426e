"""Startup traces: the record format, its JSON Lines codec, and merging traces into rankings.

``record`` holds the model (``Trace``: a ``TraceHeader`` and its ``FileAccess`` records),
``codec`` the versioned JSON Lines form with an incremental decoder, ``check`` the check of a
trace against its image's layers, and ``merge`` the ranking of one image (``merge``,
``Ranking``) and of a group of images started together (``merge_group``, ``GroupRanking``).
See ``docs/traces.md``.
"""

from starlight_core.trace.check import check_trace
from starlight_core.trace.codec import (
    DEFAULT_MAX_LINE,
    DEFAULT_MAX_TRACE_SIZE,
    TraceDecoder,
    TraceEnd,
    TraceEvent,
    decode,
    decode_chunks,
    encode,
    encode_access,
    encode_header,
)
from starlight_core.trace.merge import (
    DEFAULT_PENALTY,
    SCALE,
    FileStats,
    GroupRanking,
    Ranking,
    first_accesses,
    merge,
    merge_group,
)
from starlight_core.trace.record import (
    TRACE_VERSION,
    AccessKind,
    FileAccess,
    LayerRef,
    Trace,
    TracedImage,
    TraceHeader,
    check_accesses,
)

__all__ = [
    "DEFAULT_MAX_LINE",
    "DEFAULT_MAX_TRACE_SIZE",
    "DEFAULT_PENALTY",
    "SCALE",
    "TRACE_VERSION",
    "AccessKind",
    "FileAccess",
    "FileStats",
    "GroupRanking",
    "LayerRef",
    "Ranking",
    "Trace",
    "TraceDecoder",
    "TraceEnd",
    "TraceEvent",
    "TraceHeader",
    "TracedImage",
    "check_accesses",
    "check_trace",
    "decode",
    "decode_chunks",
    "encode",
    "encode_access",
    "encode_header",
    "first_accesses",
    "merge",
    "merge_group",
]
