"""The worker's local layer store: per layer a real directory tree, filled as contents arrive.

``Store(root)`` opens it; ``begin_layer(toc)`` makes a layer's tree at once (everything but the
file contents, in the form containerd's overlayfs snapshotter unpacks layers: whiteouts as
character devices 0/0, opaque directories by xattr) and returns a ``LayerHandle``; ``place`` and
``copy_local`` fill contents (each verified by the caller, renamed in whole); ``finalize``
writes ``complete``, after which overlayfs uses the directory without FUSE. The store also keeps
the images the worker holds and the pulls it can resume (``database``).

Modules: ``plan`` (the final tree of a TOC, no I/O), ``lifecycle`` (a layer's states, one
table), ``beneath`` (file operations that never follow a symlink), ``clone`` (reflink/copy),
``layer`` (building and filling one layer), ``database`` (SQLite), ``model`` (records),
``store`` (the whole).
"""

from starlight_worker.store.layer import COMPLETE_MARKER, FS_DIR, TOC_FILE, LayerHandle
from starlight_worker.store.lifecycle import LayerEvent, LayerState, transition
from starlight_worker.store.model import ImageRecord, LayerRecord, PullRecord, PullState
from starlight_worker.store.plan import LayerPlan, NodeKind, PlanNode, plan_layer
from starlight_worker.store.store import Store, layer_key, toc_fingerprint

__all__ = [
    "COMPLETE_MARKER",
    "FS_DIR",
    "TOC_FILE",
    "ImageRecord",
    "LayerEvent",
    "LayerHandle",
    "LayerPlan",
    "LayerRecord",
    "LayerState",
    "NodeKind",
    "PlanNode",
    "PullRecord",
    "PullState",
    "Store",
    "layer_key",
    "plan_layer",
    "toc_fingerprint",
    "transition",
]
