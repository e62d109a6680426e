"""Value objects of containerd's snapshot model: kinds, infos, usage and mounts.

They mirror ``snapshots.Info``, ``snapshots.Usage`` and ``mount.Mount`` of containerd 1.6 so the
gRPC adapter is a field-for-field copy. Times are integer nanoseconds since the epoch (what
containerd stores and what ``google.protobuf.Timestamp`` carries) so nothing is rounded.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping

import attrs

from starlight_core.errors import InvalidInput

__all__ = [
    "LABEL_SNAPSHOT_REF",
    "MAX_LABEL_SIZE",
    "Kind",
    "Mount",
    "SnapshotInfo",
    "Usage",
    "clean_labels",
]

# Set by containerd's unpacker on Prepare: the name (chain ID) the layer will be committed
# under. A remote snapshotter that already has that layer creates it and answers ALREADY_EXISTS.
LABEL_SNAPSHOT_REF = "containerd.io/snapshot.ref"

# containerd refuses a label whose key and value together exceed this (labels.Validate).
MAX_LABEL_SIZE = 4096


class Kind(enum.IntEnum):
    """Values are the wire numbers of ``containerd.services.snapshots.v1.Kind``."""

    VIEW = 1
    ACTIVE = 2
    COMMITTED = 3

    @property
    def filter_name(self) -> str:
        """The spelling containerd's filters use (``kind==active``)."""
        return self.name.lower()


def _copied_labels(labels: Mapping[str, str]) -> Mapping[str, str]:
    return dict(labels)


@attrs.frozen
class SnapshotInfo:
    """What Stat and Walk report: ``name`` is the key of an active/view snapshot or the name of
    a committed one; ``parent`` is the committed parent's name or ``""``."""

    name: str
    kind: Kind
    parent: str = ""
    labels: Mapping[str, str] = attrs.field(factory=dict, converter=_copied_labels)
    created_ns: int = 0
    updated_ns: int = 0


@attrs.frozen
class Usage:
    """Disk used by a snapshot's own directory (parents excluded)."""

    size: int = 0
    inodes: int = 0


@attrs.frozen
class Mount:
    """One mount(2) call, as containerd's ``mount.Mount``."""

    type: str
    source: str
    options: tuple[str, ...] = ()
    target: str = ""


def clean_labels(labels: Mapping[str, str] | None) -> dict[str, str]:
    """Labels as containerd stores them: empty values mean "unset", sizes are bounded."""
    cleaned: dict[str, str] = {}
    for key, value in (labels or {}).items():
        if not key:
            raise InvalidInput("label key must not be empty")
        if len(key.encode()) + len(value.encode()) > MAX_LABEL_SIZE:
            raise InvalidInput(
                f"label {key[:64]!r} is too long: key and value must fit in {MAX_LABEL_SIZE} bytes"
            )
        if value:
            cleaned[key] = value
    return cleaned
