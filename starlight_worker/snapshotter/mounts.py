"""The mounts of a snapshot, computed as containerd's overlay snapshotter does.

- no parent: a bind mount of the snapshot's own ``fs`` directory (``rw``; ``ro`` for a view),
  since overlayfs needs at least one lower directory;
- a view of exactly one committed parent: a read-only bind mount of that parent's directory;
- otherwise one overlay mount whose ``lowerdir`` lists the parents TOP LAYER FIRST (overlayfs
  gives the first lower directory the highest priority), plus ``upperdir`` and ``workdir`` for
  an active snapshot; a view gets only lower directories, which makes overlayfs read-only.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from starlight_worker.snapshotter.model import Kind, Mount

__all__ = ["default_overlay_options", "snapshot_mounts"]


def snapshot_mounts(
    kind: Kind,
    upper: str,
    work: str,
    lowers: Sequence[str],
    overlay_options: Sequence[str] = (),
) -> list[Mount]:
    """Mounts for an active or view snapshot; ``lowers`` are its parents' directories,
    nearest parent first."""
    if kind is Kind.COMMITTED:
        raise ValueError("committed snapshots have no mounts")
    if not lowers:
        return [Mount("bind", upper, ("ro" if kind is Kind.VIEW else "rw", "rbind"))]
    if kind is Kind.VIEW and len(lowers) == 1:
        return [Mount("bind", lowers[0], ("ro", "rbind"))]
    options = list(overlay_options)
    if kind is Kind.ACTIVE:
        options += [f"workdir={work}", f"upperdir={upper}"]
    options.append("lowerdir=" + ":".join(lowers))
    return [Mount("overlay", "overlay", tuple(options))]


def default_overlay_options() -> tuple[str, ...]:
    """``index=off`` where the kernel knows the option, as containerd: with the index on,
    overlayfs refuses to mount an upper directory again over different lower directories."""
    if os.path.exists("/sys/module/overlay/parameters/index"):
        return ("index=off",)
    return ()
