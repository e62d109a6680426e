"""Which operation each kind of snapshot admits, in one table.

containerd's lifecycle: Prepare creates an *active* snapshot and View a *view* (both by key,
both on a committed parent or on nothing); Commit turns an active snapshot into a *committed*
one under a new name; only committed snapshots can be parents; only active and view snapshots
have mounts. Everything may be stated, updated, measured and removed (removal also needs the
snapshot to have no children, which the metadata store checks).

The error kinds are the ones containerd's own stores return (``snapshots/storage/bolt.go``), so
that containerd maps our gRPC status back to the same ``errdefs`` error.
"""

from __future__ import annotations

import enum
from typing import Final

from starlight_core.errors import FailedPrecondition, InvalidInput, StarlightError
from starlight_worker.snapshotter.model import Kind

__all__ = ["Operation", "check"]


class Operation(enum.Enum):
    STAT = "stat"
    UPDATE = "update"
    USAGE = "usage"
    REMOVE = "remove"
    MOUNTS = "mounts"
    COMMIT = "commit"
    USE_AS_PARENT = "use as parent"


_REFUSED: Final[dict[tuple[Kind, Operation], tuple[type[StarlightError], str]]] = {
    (Kind.COMMITTED, Operation.MOUNTS): (
        FailedPrecondition,
        "snapshot {key!r} is committed; only active and view snapshots have mounts",
    ),
    (Kind.VIEW, Operation.COMMIT): (
        FailedPrecondition,
        "snapshot {key!r} is a view; only active snapshots can be committed",
    ),
    (Kind.COMMITTED, Operation.COMMIT): (
        FailedPrecondition,
        "snapshot {key!r} is already committed; only active snapshots can be committed",
    ),
    (Kind.ACTIVE, Operation.USE_AS_PARENT): (
        InvalidInput,
        "parent {key!r} is an active snapshot; a parent must be committed",
    ),
    (Kind.VIEW, Operation.USE_AS_PARENT): (
        InvalidInput,
        "parent {key!r} is a view; a parent must be committed",
    ),
}


def check(kind: Kind, operation: Operation, key: str) -> None:
    """Raise the error containerd would for ``operation`` on a snapshot of ``kind``."""
    refused = _REFUSED.get((kind, operation))
    if refused is not None:
        error, message = refused
        raise error(message.format(key=key))
