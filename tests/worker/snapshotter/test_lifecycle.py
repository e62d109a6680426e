"""Every snapshot kind × every operation, on the table and on a real snapshotter."""

from __future__ import annotations

import pytest

from starlight_core.errors import FailedPrecondition, InvalidInput, StarlightError
from starlight_worker.snapshotter import Kind, Snapshotter
from starlight_worker.snapshotter.lifecycle import Operation, check

# (kind, operation) -> the error containerd's stores raise; absent: allowed.
EXPECTED: dict[tuple[Kind, Operation], type[StarlightError]] = {
    (Kind.COMMITTED, Operation.MOUNTS): FailedPrecondition,
    (Kind.VIEW, Operation.COMMIT): FailedPrecondition,
    (Kind.COMMITTED, Operation.COMMIT): FailedPrecondition,
    (Kind.ACTIVE, Operation.USE_AS_PARENT): InvalidInput,
    (Kind.VIEW, Operation.USE_AS_PARENT): InvalidInput,
}

CASES = [(kind, op) for kind in Kind for op in Operation]


@pytest.mark.parametrize(("kind", "operation"), CASES)
def test_table(kind: Kind, operation: Operation) -> None:
    error = EXPECTED.get((kind, operation))
    if error is None:
        check(kind, operation, "k")
    else:
        with pytest.raises(error) as caught:
            check(kind, operation, "k")
        assert type(caught.value) is error
        assert "'k'" in str(caught.value)


async def make(snapshotter: Snapshotter, kind: Kind) -> str:
    """A snapshot of ``kind`` named "s" (on a committed base "base")."""
    await snapshotter.prepare("base-a")
    await snapshotter.commit("base", "base-a")
    if kind is Kind.ACTIVE:
        await snapshotter.prepare("s", "base")
    elif kind is Kind.VIEW:
        await snapshotter.view("s", "base")
    else:
        await snapshotter.prepare("s-a", "base")
        await snapshotter.commit("s", "s-a")
    return "s"


async def perform(snapshotter: Snapshotter, operation: Operation, key: str) -> None:
    if operation is Operation.STAT:
        await snapshotter.stat(key)
    elif operation is Operation.UPDATE:
        info = await snapshotter.stat(key)
        await snapshotter.update(info, ["labels.x"])
    elif operation is Operation.USAGE:
        await snapshotter.usage(key)
    elif operation is Operation.REMOVE:
        await snapshotter.remove(key)
    elif operation is Operation.MOUNTS:
        await snapshotter.mounts(key)
    elif operation is Operation.COMMIT:
        await snapshotter.commit("new-name", key)
    else:
        await snapshotter.prepare("child", key)


@pytest.mark.anyio
@pytest.mark.parametrize(("kind", "operation"), CASES)
async def test_snapshotter_follows_table(
    snapshotter: Snapshotter, kind: Kind, operation: Operation
) -> None:
    key = await make(snapshotter, kind)
    error = EXPECTED.get((kind, operation))
    if error is None:
        await perform(snapshotter, operation, key)
    else:
        with pytest.raises(error):
            await perform(snapshotter, operation, key)
        # A refused operation changes nothing.
        assert (await snapshotter.stat(key)).kind is kind
