"""A containerd snapshotter, served as a ``proxy_plugins`` snapshot plugin over grpclib.

It behaves as containerd's overlayfs snapshotter (same directories, same mounts, same errors)
and adds one seam for starlight: committed snapshots whose contents come from elsewhere
(``RemoteLayers`` decides at Prepare time, ``LayerSource`` says where they are at mount time).

Layout: ``model`` (values), ``lifecycle`` (what each kind admits), ``filters`` (containerd's
filter language), ``metastore`` (SQLite), ``filesystem`` (directories, usage), ``mounts``,
``snapshotter`` (the semantics), ``service`` (gRPC adapter), ``server`` (unix socket).
"""

from starlight_worker.snapshotter.model import (
    LABEL_SNAPSHOT_REF,
    Kind,
    Mount,
    SnapshotInfo,
    Usage,
)
from starlight_worker.snapshotter.server import (
    listening,
    run,
    serve_snapshots,
    serve_unix,
    snapshots_server,
)
from starlight_worker.snapshotter.service import SnapshotsService
from starlight_worker.snapshotter.snapshotter import (
    LayerSource,
    Mounting,
    NoRemoteLayers,
    RemoteLayers,
    Snapshotter,
)

__all__ = [
    "LABEL_SNAPSHOT_REF",
    "Kind",
    "LayerSource",
    "Mount",
    "Mounting",
    "NoRemoteLayers",
    "RemoteLayers",
    "SnapshotInfo",
    "SnapshotsService",
    "Snapshotter",
    "Usage",
    "listening",
    "run",
    "serve_snapshots",
    "serve_unix",
    "snapshots_server",
]
