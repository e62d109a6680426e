"""Trace reports against the metadata store, on SQLite and PostgreSQL: a trace and the rankings
it changes are stored in one transaction, checked against the traces stored; ``TraceReports``
validates, merges incrementally and rebuilds from the store when it must."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime

import pytest

from starlight_core.digest import Digest
from starlight_core.errors import ImageNotFound, InvalidInput
from starlight_core.platform import Platform
from starlight_core.proxy_client import TraceTooLarge
from starlight_core.trace import (
    AccessKind,
    FileAccess,
    Trace,
    TracedImage,
    TraceHeader,
    encode,
    merge,
    merge_group,
)
from starlight_proxy.reports import TraceReports
from starlight_proxy.store import ImageRecord, RankUpdate, SQLMetadataStore, StaleRanking
from tests.proxy.test_store import AMD64, NAME, OTHER, file_entry, index_image, make_toc

pytestmark = pytest.mark.anyio

APP_LAYERS = (
    make_toc("app-0", [file_entry(f"a/{i}", f"app a{i}") for i in range(1, 4)]),
    make_toc("app-1", [file_entry(f"b/{i}", f"app b{i}") for i in range(1, 4)]),
)
DB_LAYERS = (make_toc("db-0", [file_entry(f"d/{i}", f"db d{i}") for i in range(1, 4)]),)


def make_trace(
    image: ImageRecord,
    accesses: Sequence[tuple[int, int, str]],
    *,
    group: str | None = None,
    trace_id: str | None = None,
    reference: str | None = None,
) -> Trace:
    """A trace of ``image``: (offset_ns, layer index, path) each, read in that order."""
    header = TraceHeader(
        trace_id=trace_id or str(uuid.uuid4()),
        image=TracedImage(
            reference=reference or f"{image.name}:latest",
            manifest_digest=image.digest,
            platform=image.platform,
        ),
        container_id="c-" + uuid.uuid4().hex[:8],
        started_at=datetime(2024, 5, 1, 12, tzinfo=UTC),
        group=group,
    )
    return Trace(
        header, [FileAccess(t, layer, path, AccessKind.OPEN) for t, layer, path in accesses]
    )


async def chunks(*parts: bytes) -> AsyncIterator[bytes]:
    for part in parts:
        yield part


async def report(reports: TraceReports, trace: Trace) -> bool:
    data = encode(trace)
    # Split in two: the body arrives in pieces.
    result = await reports.receive(chunks(data[:7], data[7:]), declared=len(data))
    assert result.trace_id == trace.trace_id
    assert result.accesses == len(trace.accesses)
    return result.stored


@pytest.fixture
async def app_image(store: SQLMetadataStore) -> ImageRecord:
    return await index_image(store, APP_LAYERS, label="app")


@pytest.fixture
async def db_image(store: SQLMetadataStore) -> ImageRecord:
    return await index_image(store, DB_LAYERS, name=OTHER, label="db")


# --- the store ------------------------------------------------------------------------------


async def test_a_trace_and_its_rankings_are_stored_together(
    store: SQLMetadataStore, app_image: ImageRecord, db_image: ImageRecord
) -> None:
    one = RankUpdate(app_image.id, {"a/1": 0, "b/2": 1}, traces=1)
    joint = [
        RankUpdate(app_image.id, {"a/1": 0}, "shop", traces=1),
        RankUpdate(db_image.id, {"d/1": 1}, "shop", traces=1),
    ]
    assert await store.add_trace("t1", app_image.id, b"one", group="shop", rankings=[one, *joint])
    assert await store.get_ranks([app_image.id, db_image.id]) == {
        app_image.id: {"a/1": 0, "b/2": 1},
        db_image.id: {},
    }
    assert await store.get_ranks([app_image.id, db_image.id], group="shop") == {
        app_image.id: {"a/1": 0},
        db_image.id: {"d/1": 1},
    }
    assert await store.ranked_groups([app_image.id, db_image.id]) == {
        "shop": frozenset({app_image.id, db_image.id})
    }
    assert await store.ranked_groups([db_image.id]) == {"shop": frozenset({db_image.id})}
    assert await store.ranked_groups([]) == {}

    # A repeated id changes nothing, rankings included.
    again = RankUpdate(app_image.id, {"x": 0}, traces=None)
    assert not await store.add_trace("t1", app_image.id, b"other", rankings=[again])
    assert (await store.get_ranks([app_image.id]))[app_image.id] == {"a/1": 0, "b/2": 1}
    assert [t.payload for t in await store.list_traces(app_image.id)] == [b"one"]


async def test_a_stale_ranking_stores_nothing(
    store: SQLMetadataStore, app_image: ImageRecord, db_image: ImageRecord
) -> None:
    await store.add_trace("t1", app_image.id, b"1", rankings=[RankUpdate(app_image.id, {"a": 0})])
    # Computed from no earlier trace, but one is stored: refused, the new trace too.
    with pytest.raises(StaleRanking, match="merges 1 traces, but 2 are stored"):
        await store.add_trace(
            "t2", app_image.id, b"2", rankings=[RankUpdate(app_image.id, {"b": 0}, traces=1)]
        )
    assert [t.trace_id for t in await store.list_traces(app_image.id)] == ["t1"]
    assert (await store.get_ranks([app_image.id]))[app_image.id] == {"a": 0}
    # Group counts run across the group's images.
    await store.add_trace("g1", db_image.id, b"g", group="shop")
    with pytest.raises(StaleRanking):
        await store.add_trace(
            "g2",
            app_image.id,
            b"g",
            group="shop",
            rankings=[
                RankUpdate(app_image.id, {"a": 0}, traces=2),
                RankUpdate(app_image.id, {"a": 0}, "shop", traces=1),
            ],
        )
    assert [t.trace_id for t in await store.list_traces(None, group="shop")] == ["g1"]
    assert await store.get_ranks([app_image.id], group="shop") == {app_image.id: {}}
    # Bad ranks, or an unknown image in a ranking, store nothing either.
    with pytest.raises(InvalidInput):
        await store.add_trace(
            "t3", app_image.id, b"3", rankings=[RankUpdate(app_image.id, {"a": float("nan")})]
        )
    with pytest.raises(ImageNotFound):
        await store.add_trace("t3", app_image.id, b"3", rankings=[RankUpdate(424242, {"a": 0})])
    assert [t.trace_id for t in await store.list_traces(app_image.id)] == ["t1"]


async def test_traces_of_a_group_across_images(
    store: SQLMetadataStore, app_image: ImageRecord, db_image: ImageRecord
) -> None:
    await store.add_trace("1", app_image.id, b"a", group="shop")
    await store.add_trace("2", db_image.id, b"d", group="shop")
    await store.add_trace("3", db_image.id, b"d")
    await store.add_trace("4", db_image.id, b"d", group="other")
    listed = await store.list_traces(None, group="shop")
    assert sorted((t.trace_id, t.image_id) for t in listed) == [
        ("1", app_image.id),
        ("2", db_image.id),
    ]
    assert [t.trace_id for t in await store.list_traces(db_image.id)] == ["2", "3", "4"]
    with pytest.raises(InvalidInput):
        await store.list_traces(None)


# --- TraceReports -----------------------------------------------------------------------------


async def test_reports_merge_incrementally_and_equal_a_full_merge(
    store: SQLMetadataStore, app_image: ImageRecord
) -> None:
    reports = TraceReports(store)
    t1 = make_trace(app_image, [(100, 1, "b/2"), (200, 0, "a/3"), (300, 0, "a/1")])
    t2 = make_trace(app_image, [(50, 0, "a/1"), (150, 0, "a/3")])
    assert await report(reports, t1)
    assert (await store.get_ranks([app_image.id]))[app_image.id] == {"b/2": 0, "a/3": 1, "a/1": 2}
    assert not await report(reports, t1)  # repeated: nothing changes
    assert await report(reports, t2)
    expected = merge([t1, t2]).ranks()
    assert (await store.get_ranks([app_image.id]))[app_image.id] == expected
    # A directory the layer implies counts as a path of it.
    t3 = make_trace(app_image, [(10, 1, "b")])
    assert await report(reports, t3)
    stored = await store.list_traces(app_image.id)
    assert [t.trace_id for t in stored] == [t1.trace_id, t2.trace_id, t3.trace_id]
    assert stored[0].payload == encode(t1)
    assert (await store.get_ranks([app_image.id]))[app_image.id] == merge([t1, t2, t3]).ranks()


async def test_reports_through_another_proxy_are_not_lost(
    store: SQLMetadataStore, app_image: ImageRecord
) -> None:
    """Two proxies share a database: each one's cached ranking misses the other's traces until
    the transaction notices, and then it merges again from what is stored."""
    first, second = TraceReports(store), TraceReports(store)
    traces = [
        make_trace(app_image, [(10, 0, "a/1"), (20, 0, "a/2")]),
        make_trace(app_image, [(10, 0, "a/2"), (20, 1, "b/1")]),
        make_trace(app_image, [(10, 1, "b/3"), (20, 0, "a/2")]),
    ]
    assert await report(first, traces[0])
    assert await report(second, traces[1])
    assert await report(first, traces[2])  # first's cache knew only traces[0]
    assert (await store.get_ranks([app_image.id]))[app_image.id] == merge(traces).ranks()
    # A third proxy, fresh, knows the first trace is stored.
    assert not await report(TraceReports(store), traces[0])


async def test_group_reports_rank_images_jointly(
    store: SQLMetadataStore, app_image: ImageRecord, db_image: ImageRecord
) -> None:
    reports = TraceReports(store)
    app = make_trace(app_image, [(5, 1, "b/1"), (20, 0, "a/2"), (60, 0, "a/3")], group="shop")
    db = make_trace(db_image, [(10, 0, "d/3"), (40, 0, "d/1")], group="shop")
    alone = make_trace(db_image, [(1, 0, "d/2")])
    for trace in (app, db, alone):
        assert await report(reports, trace)
    joint = await store.get_ranks([app_image.id, db_image.id], group="shop")
    assert joint == {
        app_image.id: {"b/1": 0, "a/2": 2, "a/3": 4},
        db_image.id: {"d/3": 1, "d/1": 3},
    }
    expected = merge_group([app, db]).rank_maps()
    assert joint == {
        app_image.id: expected[app_image.digest],
        db_image.id: expected[db_image.digest],
    }
    # The images' own rankings count every trace of the image, grouped or not.
    assert (await store.get_ranks([db_image.id]))[db_image.id] == merge([db, alone]).ranks()


async def test_bad_reports_are_refused_and_store_nothing(
    store: SQLMetadataStore, app_image: ImageRecord
) -> None:
    reports = TraceReports(store, max_size=4096)
    good = encode(make_trace(app_image, [(1, 0, "a/1")]))

    async def refused(body: bytes, *, declared: int | None = None) -> str:
        with pytest.raises((InvalidInput, ImageNotFound, TraceTooLarge)) as raised:
            await reports.receive(chunks(body), declared=declared)
        return str(raised.value)

    assert "empty" in await refused(b"")
    assert "trace line 3: not JSON" in await refused(good + b"{nope\n")
    assert "trace line 1: unsupported trace version 7" in await refused(b'{"version": 7}\n')
    unknown_file = make_trace(app_image, [(1, 0, "a/1"), (2, 1, "a/2"), (3, 0, "zz")])
    message = await refused(encode(unknown_file))
    assert "line 3: 'a/2' (not in layer 1)" in message
    assert "line 4: 'zz' (not in layer 0)" in message
    assert "layers, not 3" in await refused(encode(make_trace(app_image, [(1, 2, "a/1")])))
    stranger = ImageRecord(
        id=0,
        name=NAME,
        digest=Digest("sha256:" + "e" * 64),
        platform=AMD64,
        state=app_image.state,
    )
    assert "is not known to this proxy" in await refused(encode(make_trace(stranger, [])))
    arm = make_trace(app_image, [(1, 0, "a/1")])
    arm_header = arm.header.image
    other_platform = Trace(
        TraceHeader(
            trace_id=str(uuid.uuid4()),
            image=TracedImage(
                reference=arm_header.reference,
                manifest_digest=arm_header.manifest_digest,
                platform=Platform.parse("linux/arm64"),
            ),
            container_id="c",
            started_at=arm.header.started_at,
        ),
        arm.accesses,
    )
    assert "is not known to this proxy" in await refused(encode(other_platform))
    # Too large: said by the Content-Length, or found while the body arrives.
    assert "larger than 4096 bytes" in await refused(good, declared=4097)
    assert "larger than 4096 bytes" in await refused(good + b" " * 4096)
    with pytest.raises(TraceTooLarge) as raised:
        await reports.receive(chunks(good, b"x" * 4096), declared=None)
    assert raised.value.http_status == 413

    assert await store.list_traces(app_image.id) == []
    assert await store.get_ranks([app_image.id]) == {app_image.id: {}}
    assert await store.ranked_groups([app_image.id]) == {}
    # And a good one still goes in.
    assert (await reports.receive(chunks(good), declared=None)).stored


async def test_a_failed_store_leaves_the_cache_consistent(
    store: SQLMetadataStore, app_image: ImageRecord, monkeypatch: pytest.MonkeyPatch
) -> None:
    reports = TraceReports(store)
    t1 = make_trace(app_image, [(1, 0, "a/1")])
    t2 = make_trace(app_image, [(1, 0, "a/2")])
    assert await report(reports, t1)

    async def broken(*args: object, **kwargs: object) -> bool:
        raise OSError("the database went away")

    with monkeypatch.context() as patch:
        patch.setattr(store, "add_trace", broken)
        with pytest.raises(OSError):
            await report(reports, t2)
    # t2 was merged in memory but never stored: it must not count.
    t3 = make_trace(app_image, [(1, 1, "b/1")])
    assert await report(reports, t3)
    assert (await store.get_ranks([app_image.id]))[app_image.id] == merge([t1, t3]).ranks()
