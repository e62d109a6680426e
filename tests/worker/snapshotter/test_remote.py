"""The seam for starlight: remote-snapshot Prepare and external lower directories, driven the
way containerd's metadata layer (``metadata/snapshot.go``) drives a proxy snapshotter."""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from pathlib import Path

import pytest
from grpclib.const import Status
from grpclib.testing import ChannelFor

from starlight_core.errors import ProxyUnavailable
from starlight_worker.api import snapshots_grpc
from starlight_worker.api import snapshots_pb2 as pb
from starlight_worker.snapshotter import (
    LABEL_SNAPSHOT_REF,
    NoRemoteLayers,
    SnapshotInfo,
    SnapshotsService,
    Snapshotter,
)
from tests.worker.snapshotter.support import Client, raises_status

pytestmark = pytest.mark.anyio

LAYER1 = "sha256:" + "11" * 32
LAYER2 = "sha256:" + "22" * 32


class FakeStarlight:
    """Provides the layers it is told about; says where each one is mounted from."""

    def __init__(self, provides: set[str], *, fail: bool = False) -> None:
        self.provides = provides
        self.fail = fail
        self.asked: list[tuple[str, str, dict[str, str]]] = []
        self.resolved: list[str] = []
        self.complete: set[str] = set()

    async def prepare_remote(self, key: str, parent: str, labels: Mapping[str, str]) -> bool:
        self.asked.append((key, parent, dict(labels)))
        if self.fail:
            raise ProxyUnavailable("proxy down")
        return labels[LABEL_SNAPSHOT_REF] in self.provides

    async def lower_dir(self, snapshot: SnapshotInfo) -> str:
        ref = snapshot.labels[LABEL_SNAPSHOT_REF]
        self.resolved.append(ref)
        where = "layers" if ref in self.complete else "fuse"
        return f"/starlight/{where}/{ref}"


@pytest.fixture
def starlight() -> FakeStarlight:
    return FakeStarlight({LAYER1, LAYER2})


@pytest.fixture
async def remote_client(tmp_path: Path, starlight: FakeStarlight) -> AsyncIterator[Client]:
    snapshotter = Snapshotter(
        str(tmp_path / "root"), layer_source=starlight, remote=starlight, overlay_options=()
    )
    try:
        async with ChannelFor([SnapshotsService(snapshotter)]) as channel:
            yield Client(snapshots_grpc.SnapshotsStub(channel))
    finally:
        snapshotter.close()


async def unpack_like_containerd(client: Client, key: str, target: str, parent: str) -> pb.Info:
    """containerd's createSnapshot with a target: Prepare; on ALREADY_EXISTS, Walk with its
    exact filter and take the committed match."""
    labels = {LABEL_SNAPSHOT_REF: target, "containerd.io/snapshot/extra": "x"}
    with raises_status(Status.ALREADY_EXISTS):
        await client.prepare(key, parent, labels)
    found = await client.walk(f'labels."{LABEL_SNAPSHOT_REF}"=={target},parent=="{parent}"')
    committed = [i for i in found if i.kind == pb.COMMITTED]
    assert len(committed) == 1
    return committed[0]


async def test_remote_prepare_creates_committed_target(
    remote_client: Client, starlight: FakeStarlight
) -> None:
    info = await unpack_like_containerd(remote_client, "default/1/extract-1", LAYER1, "")
    assert (info.name, info.parent, info.kind) == (LAYER1, "", pb.COMMITTED)
    assert dict(info.labels) == {LABEL_SNAPSHOT_REF: LAYER1, "containerd.io/snapshot/extra": "x"}
    assert starlight.asked == [("default/1/extract-1", "", dict(info.labels))]
    # The key itself was never created.
    with raises_status(Status.NOT_FOUND):
        await remote_client.stat("default/1/extract-1")

    upper = await unpack_like_containerd(remote_client, "default/2/extract-2", LAYER2, LAYER1)
    assert (upper.name, upper.parent) == (LAYER2, LAYER1)


async def test_container_on_external_layers_mounts_layer_source(
    remote_client: Client, starlight: FakeStarlight
) -> None:
    await unpack_like_containerd(remote_client, "k1", LAYER1, "")
    await unpack_like_containerd(remote_client, "k2", LAYER2, LAYER1)
    [m] = await remote_client.prepare("container", LAYER2)
    options = list(m.options)
    assert options[-1] == f"lowerdir=/starlight/fuse/{LAYER2}:/starlight/fuse/{LAYER1}"
    assert options[0].startswith("workdir=")
    assert options[1].startswith("upperdir=")

    # Asked again at every mount computation: once complete, the on-disk directory.
    starlight.complete.add(LAYER1)
    [m] = await remote_client.mounts("container")
    assert list(m.options)[-1] == f"lowerdir=/starlight/fuse/{LAYER2}:/starlight/layers/{LAYER1}"

    # A view of one external layer is a read-only bind of its directory.
    [v] = await remote_client.view("view", LAYER1)
    assert (v.type, v.source, list(v.options)) == (
        "bind",
        f"/starlight/layers/{LAYER1}",
        ["ro", "rbind"],
    )


async def test_existing_target_is_reported_without_asking(
    remote_client: Client, starlight: FakeStarlight
) -> None:
    await unpack_like_containerd(remote_client, "k1", LAYER1, "")
    assert len(starlight.asked) == 1
    # e.g. the same image pulled into a second containerd namespace
    await unpack_like_containerd(remote_client, "other-ns/7/extract", LAYER1, "")
    assert len(starlight.asked) == 1


async def test_declined_layer_is_prepared_normally(
    remote_client: Client, starlight: FakeStarlight
) -> None:
    other = "sha256:" + "33" * 32
    [m] = await remote_client.prepare("extract", "", {LABEL_SNAPSHOT_REF: other})
    assert (m.type, list(m.options)) == ("bind", ["rw", "rbind"])
    assert (await remote_client.stat("extract")).kind == pb.ACTIVE
    assert len(starlight.asked) == 1


async def test_no_ref_label_does_not_ask(remote_client: Client, starlight: FakeStarlight) -> None:
    await remote_client.prepare("container")
    assert starlight.asked == []


async def test_failing_hook_falls_back_to_unpacking(tmp_path: Path) -> None:
    broken = FakeStarlight({LAYER1}, fail=True)
    snapshotter = Snapshotter(str(tmp_path / "root"), remote=broken, layer_source=broken)
    try:
        mounts = await snapshotter.prepare("extract", "", {LABEL_SNAPSHOT_REF: LAYER1})
        assert [m.type for m in mounts] == ["bind"]
        assert (await snapshotter.stat("extract")).kind.name == "ACTIVE"
    finally:
        snapshotter.close()


async def test_bad_parent_is_reported_as_usual(
    remote_client: Client, starlight: FakeStarlight
) -> None:
    with raises_status(Status.NOT_FOUND):
        await remote_client.prepare("k", "missing", {LABEL_SNAPSHOT_REF: LAYER1})
    await remote_client.prepare("active")
    with raises_status(Status.INVALID_ARGUMENT):
        await remote_client.prepare("k", "active", {LABEL_SNAPSHOT_REF: LAYER1})
    assert starlight.asked == []


async def test_target_taken_by_other_parent_unpacks_normally(
    remote_client: Client, starlight: FakeStarlight
) -> None:
    await unpack_like_containerd(remote_client, "k1", LAYER1, "")
    await unpack_like_containerd(remote_client, "k2", LAYER2, LAYER1)
    # LAYER2's name exists but on another parent: containerd would not find it by Walk.
    [m] = await remote_client.prepare("k3", "", {LABEL_SNAPSHOT_REF: LAYER2})
    assert m.type == "bind"
    assert len(starlight.asked) == 2


async def test_default_hook_declines(tmp_path: Path) -> None:
    assert await NoRemoteLayers().prepare_remote("k", "", {LABEL_SNAPSHOT_REF: LAYER1}) is False
    snapshotter = Snapshotter(str(tmp_path / "root"))
    try:
        await snapshotter.prepare("extract", "", {LABEL_SNAPSHOT_REF: LAYER1})
        assert (await snapshotter.stat("extract")).kind.name == "ACTIVE"
    finally:
        snapshotter.close()


async def test_external_parent_without_layer_source(tmp_path: Path) -> None:
    starlight = FakeStarlight({LAYER1})
    snapshotter = Snapshotter(str(tmp_path / "root"), remote=starlight)
    try:
        async with ChannelFor([SnapshotsService(snapshotter)]) as channel:
            client = Client(snapshots_grpc.SnapshotsStub(channel))
            await unpack_like_containerd(client, "k1", LAYER1, "")
            with raises_status(Status.FAILED_PRECONDITION, match="layer source"):
                await client.prepare("container", LAYER1)
    finally:
        snapshotter.close()


async def test_external_snapshot_removal(remote_client: Client) -> None:
    await unpack_like_containerd(remote_client, "k1", LAYER1, "")
    await remote_client.prepare("container", LAYER1)
    with raises_status(Status.FAILED_PRECONDITION):
        await remote_client.remove(LAYER1)
    await remote_client.remove("container")
    await remote_client.remove(LAYER1)
    assert await remote_client.walk() == []
