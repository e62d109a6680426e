"""The on-disk contract with the FUSE server: a layer the store is still receiving is served
through FUSE (a read of a missing file waits for exactly that file), and once complete, plain
overlayfs over the store's directories shows the same tree as overlayfs over FUSE did."""

from __future__ import annotations

import threading
from pathlib import Path

import attrs
import pytest

from benchmarks.fstree import Node, diff_trees, snapshot_tree
from benchmarks.images.fidelity import fidelity_layers
from benchmarks.services import wait_for
from starlight_core.digest import Digest, sha256_digest
from starlight_worker.store import LayerHandle, Store
from tests.worker.fs.conftest import running_server
from tests.worker.store.support import overlay, place_bytes, tar_layer, untimed_names

pytestmark = pytest.mark.e2e

BIG = bytes(range(256)) * 20_000  # srv/data/big of the fidelity image


def test_fuse_serves_a_receiving_layer_then_the_store_takes_over(tmp_path: Path) -> None:
    layers = [tar_layer(tar, chunk_size=64 * 1024) for tar in fidelity_layers()]
    _, untimed = untimed_names(layers)
    withheld = {sha256_digest(BIG), sha256_digest(b"version 2\n"), sha256_digest(b"answer=42\n")}
    with running_server(tmp_path / "fused") as server, Store(tmp_path / "store") as store:
        handles: list[LayerHandle] = []
        for layer in layers:
            handle = store.begin_layer(layer.toc, lower=[h.key for h in reversed(handles)])
            handles.append(handle)
            for digest in handle.missing():
                if digest not in withheld:
                    place_bytes(store, handle, digest, layer.contents[digest])
        assert [h.complete for h in handles] == [True, False, False, False]
        paths = [server.client.attach(h.key, h.layer_dir) for h in handles]
        try:
            read: list[bytes] = []
            reader = threading.Thread(
                target=lambda: read.append((paths[1] / "srv/data/big").read_bytes())
            )
            reader.start()
            wait_for(lambda: server.client.ping().waiting == 1, timeout=60, what="a waiting reader")
            for layer, handle in zip(layers, handles, strict=True):
                for digest in list(handle.missing()):
                    names = place_bytes(store, handle, Digest(digest), layer.contents[digest])
                    server.client.arrived(handle.key, names)
            reader.join(timeout=120)
            assert read == [BIG]

            with overlay(list(reversed(paths)), tmp_path / "over-fuse") as merged:
                through_fuse = snapshot_tree(merged)
            for handle in handles:
                handle.finalize()
            with overlay([h.fs_dir for h in reversed(handles)], tmp_path / "over-disk") as merged:
                on_disk = snapshot_tree(merged)
        finally:
            for handle in handles:
                server.client.detach(handle.key)

    def timeless(tree: dict[str, Node]) -> dict[str, Node]:
        return {k: attrs.evolve(v, mtime_ns=None) if k in untimed else v for k, v in tree.items()}

    assert diff_trees(timeless(through_fuse), timeless(on_disk)) == []
    assert on_disk["srv/data/big"].size == len(BIG)
    assert on_disk["etc/replaced"].size == len(b"version 2\n")
    assert "opt/gone" not in on_disk
