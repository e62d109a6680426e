"""The workloads' lock file: every package set and wheel a build used, pinned exactly.

``sets`` maps a set's name (``base/release``, ``redis/v2-update/1``…) to the ``name=version``
pins apt resolved for it; ``debs`` describes each pinned Debian package's file (to fetch it
again and check it), ``wheels`` each pinned PyPI distribution's file. Resolved once, committed
with the workloads, reused by every later build: reruns install exactly the same files.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import attrs

from starlight_core import wire

__all__ = ["Deb", "Lock", "Wheel"]


@attrs.frozen
class Deb:
    """One ``.deb`` as the archive lists it."""

    architecture: str
    filename: str
    """Path in its archive's pool (``pool/main/r/redis/redis-server_…_amd64.deb``)."""
    sha256: str
    size: int
    priority: str = "optional"
    """The archive's priority (its override file can differ from the package's own control
    field: apt is ``important`` in its control file, ``required`` in bookworm)."""


@attrs.frozen
class Wheel:
    filename: str
    sha256: str


@attrs.define
class Lock:
    sets: dict[str, tuple[str, ...]] = attrs.field(factory=dict)
    debs: dict[str, Deb] = attrs.field(factory=dict)
    wheels: dict[str, Wheel] = attrs.field(factory=dict)

    @classmethod
    def load(cls, path: Path) -> Lock:
        if not path.exists():
            return cls()
        return wire.converter.structure(json.loads(path.read_text()), cls)

    def save(self, path: Path) -> None:
        data = wire.converter.unstructure(self)
        data["sets"] = {key: list(value) for key, value in data["sets"].items()}
        # Sorted, one pin per line: a relock reads as a plain diff.
        text = json.dumps(data, indent=1, sort_keys=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(text + "\n")
        tmp.replace(path)

    def add(self, key: str, debs: Mapping[str, Deb]) -> None:
        self.sets[key] = tuple(sorted(debs))
        self.debs.update(debs)

    def forget(self, keys: Sequence[str]) -> None:
        """Drop package sets (they are resolved again at the next build); unused file
        records go with them."""
        for key in keys:
            self.sets.pop(key, None)
        used = {pin for pins in self.sets.values() for pin in pins}
        self.debs = {pin: deb for pin, deb in self.debs.items() if pin in used}
