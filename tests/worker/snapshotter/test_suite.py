"""containerd's snapshotter testsuite (``snapshots/testsuite/testsuite.go``), the parts that
need no mounts, run against our service through gRPC; plus the error codes containerd maps
back (NOT_FOUND, ALREADY_EXISTS, FAILED_PRECONDITION, INVALID_ARGUMENT).

The parts that mount (file contents across layers, read-only views) are in
``test_mounted.py``.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from grpclib.const import Status
from grpclib.exceptions import GRPCError

from starlight_worker.api import snapshots_pb2 as pb
from starlight_worker.snapshotter import Snapshotter
from tests.worker.snapshotter.support import GC_ROOT, Client, raises_status

pytestmark = pytest.mark.anyio


def ns(info: pb.Info, field: str) -> int:
    stamp = getattr(info, field)
    return int(stamp.seconds * 1_000_000_000 + stamp.nanos)


async def test_basic_lifecycle(client: Client) -> None:
    """Prepare → Commit → Prepare on it → Commit → View; keys vanish on commit; Walk sees the
    committed ones with the same info as Stat; removal must go child first."""
    await client.prepare("preparing")
    await client.commit("committed", "preparing")
    committed = await client.stat("committed")
    assert committed.parent == ""
    assert committed.kind == pb.COMMITTED
    with raises_status(Status.NOT_FOUND):
        await client.stat("preparing")

    await client.prepare("next", "committed")
    nxt = await client.stat("next")
    assert (nxt.parent, nxt.kind) == ("committed", pb.ACTIVE)
    await client.commit("committed-next", "next")
    committed_next = await client.stat("committed-next")
    assert (committed_next.parent, committed_next.kind) == ("committed", pb.COMMITTED)
    with raises_status(Status.NOT_FOUND):
        await client.stat("next")

    walked = {info.name: info for info in await client.walk()}
    assert walked == {"committed": committed, "committed-next": committed_next}

    await client.view("nextnext", "committed-next")
    await client.remove("nextnext")
    with raises_status(Status.FAILED_PRECONDITION, match="remove"):
        await client.remove("committed")
    await client.remove("committed-next")
    await client.remove("committed")
    assert await client.walk() == []


async def test_stat_active_and_committed(client: Client) -> None:
    await client.prepare("preparing")
    active = await client.stat("preparing")
    assert (active.name, active.kind, active.parent) == ("preparing", pb.ACTIVE, "")
    await client.commit("committed", "preparing")
    committed = await client.stat("committed")
    assert (committed.name, committed.kind, committed.parent) == ("committed", pb.COMMITTED, "")


async def test_transitivity(client: Client) -> None:
    await client.prepare("preparing")
    await client.commit("snapA", "preparing")
    await client.prepare("next", "snapA")
    await client.commit("snapB", "next")
    b = await client.stat("snapB")
    assert b.parent == "snapA"
    assert (await client.stat(b.parent)).parent == ""


async def test_same_key_twice_fails(client: Client) -> None:
    await client.prepare("preparing")
    await client.commit("snapA", "preparing")
    await client.prepare("newlayer", "snapA")
    with raises_status(Status.ALREADY_EXISTS):
        await client.view("newlayer", "snapA")
    await client.prepare("prepLayer", "snapA")
    with raises_status(Status.ALREADY_EXISTS):
        await client.prepare("prepLayer", "snapA")
    await client.view("viewLayer", "snapA")
    with raises_status(Status.ALREADY_EXISTS):
        await client.view("viewLayer", "snapA")
    # Keys and names share one space.
    with raises_status(Status.ALREADY_EXISTS):
        await client.prepare("snapA")


async def base_snapshots(client: Client) -> None:
    """containerd's baseTestSnapshots: c1 <- c2 committed, a1/a2 active, v1/v2 views."""
    await client.prepare("c1-a")
    await client.commit("c1", "c1-a")
    await client.prepare("c2-a", "c1")
    await client.commit("c2", "c2-a")
    await client.prepare("a1", "c2")
    await client.prepare("a2")
    await client.view("v1", "c2")
    await client.view("v2")


@pytest.mark.parametrize(
    ("name", "kind", "parent"),
    [
        ("c1", pb.COMMITTED, ""),
        ("c2", pb.COMMITTED, "c1"),
        ("a1", pb.ACTIVE, "c2"),
        ("a2", pb.ACTIVE, ""),
        ("v1", pb.VIEW, "c2"),
        ("v2", pb.VIEW, ""),
    ],
)
async def test_update(client: Client, name: str, kind: int, parent: str) -> None:
    before = time.time_ns()
    await base_snapshots(client)
    after = time.time_ns()
    st = await client.stat(name)
    assert before <= ns(st, "created_at") <= after
    assert st.created_at == st.updated_at
    assert (st.kind, st.parent, st.name) == (kind, parent, name)
    created = st.created_at

    # No field paths: all labels replaced; parent is not mutable and silently kept.
    root = {"containerd.io/gc.root": "now"}
    expected = {"l1": "v1", "l2": "v2", "l3": "v3", **root}
    st.parent = "doesnotexist"
    st.labels.clear()
    st.labels.update(expected)
    u1 = time.time_ns()
    st = await client.update(st)
    u2 = time.time_ns()
    assert st.created_at == created
    assert u1 <= ns(st, "updated_at") <= u2
    assert (st.kind, st.parent, st.name) == (kind, parent, name)
    assert dict(st.labels) == expected

    # labels.<key>: set one, and a key absent from the request is removed.
    st.labels.clear()
    st.labels.update({"l1": "updated", "l4": "v4"})
    st = await client.update(st, "labels.l1", "labels.l2")
    assert dict(st.labels) == {"l1": "updated", "l3": "v3", **root}

    # labels: replace them all.
    st.labels.clear()
    st.labels.update({"l4": "v4", **root})
    st = await client.update(st, "labels")
    assert dict(st.labels) == {"l4": "v4", **root}
    assert dict((await client.stat(name)).labels) == {"l4": "v4", **root}

    st.parent = "doesnotexist"
    with raises_status(Status.INVALID_ARGUMENT):
        await client.update(st, "parent")


async def test_update_errors(client: Client) -> None:
    with raises_status(Status.NOT_FOUND):
        await client.update(pb.Info(name="missing"))
    with raises_status(Status.INVALID_ARGUMENT):
        await client.update(pb.Info(name=""))
    await client.prepare("a")
    with raises_status(Status.INVALID_ARGUMENT):
        await client.update(pb.Info(name="a", labels={"k": "v" * 5000}))


async def test_remove_and_reuse_keys(client: Client) -> None:
    await client.prepare("committed-a")
    await client.commit("committed-1", "committed-a")
    await client.prepare("reuse-1", "committed-1")
    await client.remove("reuse-1")
    await client.view("reuse-1", "committed-1")
    await client.remove("reuse-1")
    await client.prepare("reuse-1")
    await client.remove("committed-1")
    await client.commit("committed-1", "reuse-1")
    assert (await client.stat("committed-1")).kind == pb.COMMITTED


async def test_remove_intermediate_snapshot(client: Client) -> None:
    await client.prepare("base")
    await client.commit("committed-base", "base")
    await client.prepare("intermediate", "committed-base")
    await client.commit("committed-inter", "intermediate")
    await client.prepare("toplayer", "committed-inter")
    with raises_status(Status.FAILED_PRECONDITION):
        await client.remove("committed-inter")
    with raises_status(Status.FAILED_PRECONDITION):
        await client.remove("committed-base")
    await client.remove("toplayer")
    await client.remove("committed-inter")
    await client.remove("committed-base")
    with raises_status(Status.NOT_FOUND):
        await client.remove("committed-base")


async def walk_fixture(client: Client) -> None:
    opt = {"containerd.io/gc.root": "check-walk"}
    await client.prepare("a-np", "", opt)
    await client.prepare("p-tmp", "", opt)
    await client.commit("p", "p-tmp", opt)
    await client.prepare("a", "p", opt)
    await client.view("v", "p", opt)
    await client.prepare("p-wl-tmp", "", opt)
    await client.commit("p-wl", "p-wl-tmp", {"l": "1", **opt})
    await client.prepare("a-wl", "p-wl", {"l": "2", **opt})
    await client.view("v-wl", "p-wl", {"l": "3", **opt})
    await client.prepare("a-np-wl", "", {"l": "2", **opt})


@pytest.mark.parametrize(
    ("filters", "matches"),
    [
        (
            ['labels."containerd.io/gc.root"==check-walk'],
            {"a-np", "p", "a", "v", "p-wl", "a-wl", "v-wl", "a-np-wl"},
        ),
        (
            ['kind==active,labels."containerd.io/gc.root"==check-walk'],
            {"a-np", "a", "a-wl", "a-np-wl"},
        ),
        (['kind==view,labels."containerd.io/gc.root"==check-walk'], {"v", "v-wl"}),
        (['kind==committed,labels."containerd.io/gc.root"==check-walk'], {"p", "p-wl"}),
        (["name==p", "name==a-np-wl"], {"p", "a-np-wl"}),
        (["name==a-wl,labels.l"], {"a-wl"}),
        (["parent==p"], {"a", "v"}),
        (
            ['parent!="",labels."containerd.io/gc.root"==check-walk'],
            {"a", "v", "a-wl", "v-wl"},
        ),
        (["labels.l"], {"p-wl", "a-wl", "v-wl", "a-np-wl"}),
        (["labels.l==2"], {"a-wl", "a-np-wl"}),
        ([], {"a-np", "p", "a", "v", "p-wl", "a-wl", "v-wl", "a-np-wl"}),
    ],
)
async def test_walk_filters(client: Client, filters: list[str], matches: set[str]) -> None:
    await walk_fixture(client)
    names = [info.name for info in await client.walk(*filters)]
    assert len(names) == len(set(names))
    assert set(names) == matches


async def test_walk_bad_filter_is_invalid_argument(client: Client) -> None:
    with raises_status(Status.INVALID_ARGUMENT):
        await client.walk("labels.ns/key==value")


async def test_walk_streams_in_batches(client: Client) -> None:
    for i in range(230):
        await client.view(f"v{i}")
    responses = await client.stub.List(pb.ListSnapshotsRequest())
    assert [len(r.info) for r in responses] == [100, 100, 30]
    assert {i.name for r in responses for i in r.info} == {f"v{i}" for i in range(230)}


async def test_stat_in_walk(client: Client) -> None:
    await base_snapshots(client)
    for info in await client.walk():
        assert await client.stat(info.name) == info


async def test_labels_from_prepare_view_and_commit(client: Client) -> None:
    await client.prepare("a", "", {"x": "1", "empty": ""})
    assert dict((await client.stat("a")).labels) == {"x": "1"}
    # Commit replaces labels, it does not inherit them.
    await client.commit("c", "a", {"y": "2"})
    assert dict((await client.stat("c")).labels) == {"y": "2"}
    await client.view("v", "c", {"z": "3"})
    assert dict((await client.stat("v")).labels) == {"z": "3"}


# --- error codes ----------------------------------------------------------------------------


async def test_missing_snapshots_are_not_found(client: Client) -> None:
    for call in (
        client.stat("nope"),
        client.mounts("nope"),
        client.remove("nope"),
        client.usage("nope"),
        client.commit("name", "nope"),
        client.prepare("k", "missing-parent"),
        client.view("k2", "missing-parent"),
    ):
        with raises_status(Status.NOT_FOUND):
            await call


async def test_commit_errors(client: Client) -> None:
    await client.prepare("a")
    await client.commit("c", "a")
    await client.prepare("b", "c")
    with raises_status(Status.ALREADY_EXISTS):
        await client.commit("c", "b")
    with raises_status(Status.ALREADY_EXISTS):
        await client.commit("b", "b")
    await client.view("v", "c")
    with raises_status(Status.FAILED_PRECONDITION):
        await client.commit("from-view", "v")
    with raises_status(Status.FAILED_PRECONDITION):
        await client.commit("from-committed", "c")
    # A failed commit changes nothing.
    assert (await client.stat("b")).kind == pb.ACTIVE
    assert (await client.stat("v")).kind == pb.VIEW


async def test_parent_must_be_committed(client: Client) -> None:
    await client.prepare("active")
    await client.view("view")
    for parent in ("active", "view"):
        with raises_status(Status.INVALID_ARGUMENT):
            await client.prepare(f"child-of-{parent}", parent)
        with raises_status(Status.INVALID_ARGUMENT):
            await client.view(f"view-of-{parent}", parent)


async def test_mounts_of_committed_is_failed_precondition(client: Client) -> None:
    await client.prepare("a")
    await client.commit("c", "a")
    with raises_status(Status.FAILED_PRECONDITION):
        await client.mounts("c")


async def test_empty_key_is_invalid(client: Client) -> None:
    with raises_status(Status.INVALID_ARGUMENT):
        await client.prepare("")


async def test_failed_prepare_leaves_no_directory(client: Client, root: Path) -> None:
    with raises_status(Status.NOT_FOUND):
        await client.prepare("k", "missing-parent")
    await client.prepare("a")
    with raises_status(Status.ALREADY_EXISTS):
        await client.prepare("a")
    assert sorted(os.listdir(root / "snapshots")) == ["1"]


# --- mounts ------------------------------------------------------------------------------


def fs(root: Path, snapshot_id: int) -> str:
    return str(root / "snapshots" / str(snapshot_id) / "fs")


async def test_mount_shapes(client: Client, root: Path, snapshotter: Snapshotter) -> None:
    """containerd's overlay snapshotter: bind for no parent, ro bind for a one-parent view,
    overlay with lowerdir TOP FIRST otherwise."""
    opts = list(snapshotter.overlay_options)
    [m] = await client.prepare("base")  # id 1
    assert (m.type, m.source, list(m.options)) == ("bind", fs(root, 1), ["rw", "rbind"])
    [m] = await client.view("empty-view")  # id 2
    assert (m.type, m.source, list(m.options)) == ("bind", fs(root, 2), ["ro", "rbind"])
    await client.commit("l1", "base")
    await client.prepare("x", "l1")  # id 3
    await client.commit("l2", "x")
    await client.prepare("y", "l2")  # id 4
    await client.commit("l3", "y")

    [m] = await client.view("one-parent", "l1")
    assert (m.type, m.source, list(m.options)) == ("bind", fs(root, 1), ["ro", "rbind"])

    [m] = await client.prepare("container", "l3")  # id 6
    work = str(root / "snapshots" / "6" / "work")
    assert (m.type, m.source) == ("overlay", "overlay")
    assert list(m.options) == [
        *opts,
        f"workdir={work}",
        f"upperdir={fs(root, 6)}",
        f"lowerdir={fs(root, 4)}:{fs(root, 3)}:{fs(root, 1)}",
    ]
    assert await client.mounts("container") == [m]

    [m] = await client.view("three-parents", "l3")
    assert (m.type, list(m.options)) == (
        "overlay",
        [*opts, f"lowerdir={fs(root, 4)}:{fs(root, 3)}:{fs(root, 1)}"],
    )
    assert os.path.isdir(work)
    assert not os.path.exists(root / "snapshots" / "7" / "work")  # views have no work dir


async def test_root_directory_mode(client: Client) -> None:
    [m] = await client.prepare("a")
    assert os.stat(m.source).st_mode & 0o777 == 0o755


# --- usage and cleanup -----------------------------------------------------------------------


async def test_usage_active_then_committed(client: Client) -> None:
    [m] = await client.prepare("a")
    empty = await client.usage("a")
    assert empty.inodes == 1  # the root directory itself
    upper = Path(m.source)
    (upper / "big").write_bytes(b"x" * 100_000)
    (upper / "dir").mkdir()
    (upper / "dir" / "small").write_bytes(b"y")
    os.link(upper / "big", upper / "hardlink")  # counted once
    grown = await client.usage("a")
    assert grown.inodes == 4
    blocks = sum(os.lstat(p).st_blocks for p in (upper, upper / "big", upper / "dir"))
    blocks += os.lstat(upper / "dir" / "small").st_blocks
    assert grown.size == blocks * 512
    assert grown.size >= 100_000
    await client.commit("c", "a")
    assert await client.usage("c") == grown
    # Committed usage is what was measured at commit time.
    (upper / "later").write_bytes(b"z" * 50_000)
    assert await client.usage("c") == grown


async def test_usage_of_view_is_zero(client: Client) -> None:
    await client.view("v")
    usage = await client.usage("v")
    assert (usage.size, usage.inodes) == (0, 0)


async def test_remove_deletes_directory(client: Client, root: Path) -> None:
    [m] = await client.prepare("a")
    assert os.path.isdir(m.source)
    await client.remove("a")
    assert not os.path.exists(root / "snapshots" / "1")


async def test_async_remove_waits_for_cleanup(tmp_path: Path) -> None:
    from grpclib.testing import ChannelFor

    from starlight_worker.api import snapshots_grpc
    from starlight_worker.snapshotter import SnapshotsService

    snapshotter = Snapshotter(str(tmp_path / "root"), async_remove=True)
    try:
        async with ChannelFor([SnapshotsService(snapshotter)]) as channel:
            client = Client(snapshots_grpc.SnapshotsStub(channel))
            [m] = await client.prepare("a")
            stray = tmp_path / "root" / "snapshots" / "new-interrupted"
            stray.mkdir()
            await client.remove("a")
            assert os.path.isdir(m.source)
            # The key is free again at once, with a fresh directory.
            [again] = await client.prepare("a")
            assert again.source != m.source
            await client.cleanup()
            assert not os.path.exists(m.source)
            assert not stray.exists()
            assert os.path.isdir(again.source)
    finally:
        snapshotter.close()


async def test_ids_are_never_reused(client: Client) -> None:
    [first] = await client.prepare("a")
    await client.remove("a")
    [second] = await client.prepare("a")
    assert first.source != second.source


async def test_state_survives_restart(root: Path) -> None:
    first = Snapshotter(str(root))
    await first.prepare("a", "", GC_ROOT)
    await first.commit("c", "a", {"k": "v"})
    await first.view("v", "c")
    first.close()
    first.close()  # closing twice is fine, as containerd's suite requires

    second = Snapshotter(str(root))
    try:
        info = await second.stat("c")
        assert (info.kind.name, dict(info.labels)) == ("COMMITTED", {"k": "v"})
        assert (await second.stat("v")).parent == "c"
        await second.prepare("b", "c")
        assert len(await second.walk()) == 3
    finally:
        second.close()


async def test_concurrent_operations(client: Client, root: Path) -> None:
    """Creations racing with removals (whose directory sweep must not take a half-made
    snapshot's directory) and with each other on one key."""
    import anyio

    await client.prepare("base-a")
    await client.commit("base", "base-a")
    outcomes: list[str] = []

    async def churn(i: int) -> None:
        await client.prepare(f"c{i}", "base")
        await client.remove(f"c{i}")
        await client.view(f"v{i}", "base")

    async def same_key() -> None:
        try:
            await client.prepare("contended", "base")
            outcomes.append("created")
        except GRPCError as exc:
            outcomes.append(exc.status.name)

    async with anyio.create_task_group() as tg:
        for i in range(12):
            tg.start_soon(churn, i)
            tg.start_soon(same_key)

    assert sorted(outcomes) == ["ALREADY_EXISTS"] * 11 + ["created"]
    infos = await client.walk()
    assert {i.name for i in infos} == {"base", "contended"} | {f"v{i}" for i in range(12)}
    # Every stored snapshot still has its directory, and nothing else is left.
    assert len(os.listdir(root / "snapshots")) == len(infos)
    for key in ["contended", *(f"v{i}" for i in range(12))]:
        for m in await client.mounts(key):
            source = m.source if m.type == "bind" else m.options[-2].removeprefix("upperdir=")
            assert os.path.isdir(source)
