"""End to end through containerd's remote-snapshot protocol.

A pull through containerd's unpacker (``ctr-remote images rpull``; plain ``ctr images pull``
unpacks without the protocol) into our snapshotter, whose ``RemoteLayers`` hook provides the
image's base layer from a directory of its own (``LayerSource``): containerd neither fetches
nor unpacks that layer, and unpacks the top layer as usual, on top of the external one. The
container must see the same root filesystem as with containerd's overlayfs snapshotter."""

from __future__ import annotations

import os
import tarfile
import uuid
from collections.abc import Mapping
from io import BytesIO
from pathlib import Path

import anyio
import pytest

from benchmarks.services.containerd import Containerd
from benchmarks.services.registry import Registry
from starlight_worker.snapshotter import LABEL_SNAPSHOT_REF, SnapshotInfo, Snapshotter
from tests.worker.snapshotter.images import (
    IMAGE,
    LISTING,
    base_layer,
    build_oci_archive,
    chain_ids,
    compressed_layers,
    digest_of,
)
from tests.worker.snapshotter.support import served_in_thread

pytestmark = pytest.mark.e2e

CTR_REMOTE = "/usr/bin/ctr-remote"  # from the stargz-snapshotter package


class DirectoryLayers:
    """Provides the layers it holds as extracted directories (a stand-in for starlight)."""

    def __init__(self, layers: Mapping[str, Path]) -> None:
        self.layers = layers
        self.asked: list[tuple[str, str, str]] = []

    async def prepare_remote(self, key: str, parent: str, labels: Mapping[str, str]) -> bool:
        ref = labels[LABEL_SNAPSHOT_REF]
        self.asked.append((key, parent, ref))
        return ref in self.layers

    async def lower_dir(self, snapshot: SnapshotInfo) -> str:
        return str(self.layers[snapshot.labels[LABEL_SNAPSHOT_REF]])


def extract(layer: bytes, target: Path) -> None:
    target.mkdir(parents=True)
    with tarfile.open(fileobj=BytesIO(layer)) as tar:
        tar.extractall(target, numeric_owner=True, filter="fully_trusted")


def test_pull_with_a_remote_base_layer(tmp_path: Path, registry: Registry) -> None:
    if not os.access(CTR_REMOTE, os.X_OK):
        pytest.skip(f"{CTR_REMOTE} missing: apt-get install stargz-snapshotter")
    base_chain, top_chain = chain_ids()
    extracted = tmp_path / "layers" / "base"
    extract(base_layer(), extracted)
    layers = DirectoryLayers({base_chain: extracted})
    snapshotter = Snapshotter(str(tmp_path / "snapshotter"), remote=layers, layer_source=layers)
    socket_path = str(tmp_path / "snapshotter.sock")
    ref = f"{registry.host}/starlight/remote-e2e:{uuid.uuid4().hex[:12]}"
    try:
        with (
            served_in_thread(snapshotter, socket_path),
            Containerd(tmp_path / "containerd", snapshotter_socket=socket_path) as containerd,
        ):
            ctr = containerd.ctr
            archive = tmp_path / "image.tar"
            build_oci_archive(archive)
            ctr("images", "import", "--no-unpack", str(archive))
            ctr("images", "tag", IMAGE, ref)
            ctr("images", "push", "--plain-http", ref)
            ctr("images", "rm", "--sync", IMAGE, ref)

            ctr(
                "images",
                "rpull",
                "--plain-http",
                "--snapshotter",
                "starlight",
                ref,
                binary=CTR_REMOTE,
            )
            # Asked about both layers; provided only the base.
            assert [(parent, chain) for _, parent, chain in layers.asked] == [
                ("", base_chain),
                (base_chain, top_chain),
            ]
            listed = ctr("snapshots", "--snapshotter", "starlight", "ls").stdout
            assert base_chain in listed
            assert top_chain in listed
            # containerd never fetched the provided layer's blob, only the top one.
            base_blob, top_blob = (digest_of(blob) for blob in compressed_layers())
            content = ctr("content", "ls", "-q").stdout.split()
            assert base_blob not in content
            assert top_blob in content
            stored = {info.name: info for info in anyio.run(snapshotter.walk)}
            assert stored[base_chain].kind.name == "COMMITTED"
            assert stored[base_chain].parent == ""

            ours = ctr(
                "run",
                "--rm",
                "--snapshotter",
                "starlight",
                ref,
                "on-starlight",
                "/bin/sh",
                "-c",
                LISTING,
            ).stdout.split("===\n")
            # Fetches what the remote pull skipped and unpacks for overlayfs.
            ctr("images", "pull", "--plain-http", ref)
            stock = ctr(
                "run",
                "--rm",
                "--snapshotter",
                "overlayfs",
                ref,
                "on-overlayfs",
                "/bin/sh",
                "-c",
                LISTING,
            ).stdout.split("===\n")
            assert ours[:2] == stock[:2]
            assert "/opaque/new|" in ours[0]
            assert "/etc/to-delete|" not in ours[0]
    finally:
        snapshotter.close()
