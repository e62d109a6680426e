"""What the store reports: layers, images and pulls, as frozen values."""

from __future__ import annotations

import enum

import attrs

from starlight_core.digest import Digest
from starlight_worker.store.lifecycle import LayerState

__all__ = ["ImageRecord", "LayerRecord", "PullRecord", "PullState"]


@attrs.frozen
class LayerRecord:
    key: str
    diff_id: Digest
    state: LayerState
    files_total: int
    """Regular files with content (each inode once; hard links share one)."""
    files_local: int
    bytes_total: int
    bytes_local: int
    lower: tuple[str, ...] = ()
    """The layers it was begun on, nearest first (where implied directories took metadata)."""
    created_at: float = 0.0
    completed_at: float | None = None


@attrs.frozen
class ImageRecord:
    """An image the worker holds (or is pulling), with how much of it is local."""

    reference: str
    namespace: str
    manifest_digest: Digest
    config_digest: Digest
    platform: str
    layers: tuple[str, ...]
    """Layer keys, base first."""
    manifest: bytes
    config: bytes
    complete: bool
    pulled_at: float
    """When the pull that recorded it started (seconds since the epoch)."""
    completed_at: float | None = None
    files_total: int = 0
    files_local: int = 0
    bytes_total: int = 0
    bytes_local: int = 0


class PullState(enum.Enum):
    RUNNING = "running"
    """Started and not finished: after a restart, an interrupted pull to resume."""
    DONE = "done"
    FAILED = "failed"


@attrs.frozen
class PullRecord:
    id: int
    reference: str
    namespace: str
    bundle_id: str
    state: PullState
    started_at: float
    finished_at: float | None = None
    bytes_received: int = 0
    """Bundle bytes received so far."""
    offset: int = 0
    """Bundle offset up to which everything received is applied (where to resume)."""
    header: bytes = b""
    """The bundle header as received, to resume with the same bundle."""
    header_size: int = 0
    error: str = ""
