"""The layer lifecycle table, every state × event (like h2's test_state_machines)."""

from __future__ import annotations

import itertools

import pytest

from starlight_core.errors import FailedPrecondition
from starlight_worker.store import LayerEvent, LayerState, transition

A, R, C = LayerState.ABSENT, LayerState.RECEIVING, LayerState.COMPLETE
B, P, F, X = LayerEvent.BEGIN, LayerEvent.PLACE, LayerEvent.FINALIZE, LayerEvent.REMOVE

EXPECTED: dict[tuple[LayerState, LayerEvent], LayerState | None] = {
    (A, B): R,
    (A, P): None,
    (A, F): None,
    (A, X): A,
    (R, B): R,
    (R, P): R,
    (R, F): C,
    (R, X): A,
    (C, B): C,
    (C, P): C,
    (C, F): C,
    (C, X): A,
}


def test_the_table_covers_every_pair() -> None:
    assert set(EXPECTED) == set(itertools.product(LayerState, LayerEvent))


@pytest.mark.parametrize(("state", "event"), list(EXPECTED), ids=lambda v: v.value)
def test_transition(state: LayerState, event: LayerEvent) -> None:
    expected = EXPECTED[state, event]
    if expected is None:
        with pytest.raises(FailedPrecondition) as excinfo:
            transition(state, event, "sha256-abc")
        assert "sha256-abc" in str(excinfo.value)
        assert "begin it first" in str(excinfo.value)
    else:
        assert transition(state, event, "sha256-abc") is expected
