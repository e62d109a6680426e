"""The layer filesystem (``fused``): incomplete layers served read-only through FUSE.

A separate process (``python -m starlight_worker.fs``, see ``server``) mounts one FUSE
filesystem and presents every attached layer directory at ``<mountpoint>/<layer_key>`` the way
overlayfs expects a lower layer; reads of files whose content has not arrived wait for exactly
that file. The daemon talks to it with ``FsClient``/``AsyncFsClient`` and starts it with
``ensure_running``. Importing this package does not load libfuse.
"""

from starlight_worker.fs.client import AsyncFsClient, FsClient, ensure_running
from starlight_worker.fs.protocol import Access, AttachedLayerInfo, ServerInfo

__all__ = [
    "Access",
    "AsyncFsClient",
    "AttachedLayerInfo",
    "FsClient",
    "ServerInfo",
    "ensure_running",
]
