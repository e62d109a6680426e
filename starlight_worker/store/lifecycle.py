"""A layer's lifecycle in the store, in one table.

A layer is ABSENT (the store knows nothing of it), RECEIVING (its tree exists, some contents are
still missing: FUSE serves it) or COMPLETE (every content present, directory times final: plain
overlayfs serves it). The events that move it:

- BEGIN: the TOC arrived. Idempotent: on a RECEIVING layer it resumes (rebuilds what a crash
  left undone), on a COMPLETE one it changes nothing.
- PLACE: a content arrived (or was copied locally). A COMPLETE layer needs nothing and accepts it
  as a no-op; an ABSENT one cannot take it.
- FINALIZE: the last content is there; set directory times, mark the layer complete.
- REMOVE: reset or garbage collection; removing what is absent is a no-op.

Guards that depend on more than the state (FINALIZE needs nothing missing) are checked by the
caller; this table only says which moves exist. Like h11's ``_state.py``, a pair missing from
the table is a caller error, reported as ``FailedPrecondition``.
"""

from __future__ import annotations

import enum
from typing import Final

from starlight_core.errors import FailedPrecondition

__all__ = ["LayerEvent", "LayerState", "transition"]


class LayerState(enum.Enum):
    ABSENT = "absent"
    RECEIVING = "receiving"
    COMPLETE = "complete"


class LayerEvent(enum.Enum):
    BEGIN = "begin"
    PLACE = "place"
    FINALIZE = "finalize"
    REMOVE = "remove"


_TRANSITIONS: Final[dict[LayerState, dict[LayerEvent, LayerState]]] = {
    LayerState.ABSENT: {
        LayerEvent.BEGIN: LayerState.RECEIVING,
        LayerEvent.REMOVE: LayerState.ABSENT,
    },
    LayerState.RECEIVING: {
        LayerEvent.BEGIN: LayerState.RECEIVING,
        LayerEvent.PLACE: LayerState.RECEIVING,
        LayerEvent.FINALIZE: LayerState.COMPLETE,
        LayerEvent.REMOVE: LayerState.ABSENT,
    },
    LayerState.COMPLETE: {
        LayerEvent.BEGIN: LayerState.COMPLETE,
        LayerEvent.PLACE: LayerState.COMPLETE,
        LayerEvent.FINALIZE: LayerState.COMPLETE,
        LayerEvent.REMOVE: LayerState.ABSENT,
    },
}

_REFUSALS: Final[dict[tuple[LayerState, LayerEvent], str]] = {
    (LayerState.ABSENT, LayerEvent.PLACE): "layer {key} is not in the store: begin it first",
    (LayerState.ABSENT, LayerEvent.FINALIZE): "layer {key} is not in the store: begin it first",
}


def transition(state: LayerState, event: LayerEvent, key: str = "") -> LayerState:
    """The state after ``event`` in ``state``; ``FailedPrecondition`` if the move does not exist."""
    new = _TRANSITIONS[state].get(event)
    if new is None:
        message = _REFUSALS.get((state, event), "layer {key}: cannot {event} when {state}")
        raise FailedPrecondition(
            message.format(key=key or "?", event=event.value, state=state.value)
        )
    return new
