"""Merging traces: the documented rule on worked examples, its properties checked with
hypothesis, incremental updates equal to full merges, and joint rankings of a group whose
ranks interleave two images through ``delta.plan``."""

from __future__ import annotations

import itertools
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from starlight_core.delta import Target, plan
from starlight_core.digest import Digest, sha256_digest
from starlight_core.errors import InvalidInput
from starlight_core.layer.toc import TOC, Chunk, Entry, EntryType, LayerInfo
from starlight_core.oci import OCI_LAYER_GZIP
from starlight_core.platform import Platform
from starlight_core.trace import (
    SCALE,
    AccessKind,
    FileAccess,
    FileStats,
    GroupRanking,
    Ranking,
    Trace,
    TracedImage,
    TraceHeader,
    first_accesses,
    merge,
    merge_group,
)

APP = sha256_digest(b"app manifest")
DB = sha256_digest(b"db manifest")
OTHER = sha256_digest(b"another image")
PATHS = [f"d{n % 3}/f{n}" for n in range(10)]
_ids = itertools.count(1)


def make_trace(
    image: Digest,
    files: Sequence[str | tuple[str, int]],
    *,
    group: str | None = None,
    trace_id: str | None = None,
    layer: int = 0,
) -> Trace:
    """A trace reading ``files`` in order: (path, offset ns) or a path (offsets 1 ms apart)."""
    accesses = []
    for n, file in enumerate(files):
        path, offset = file if isinstance(file, tuple) else (file, (n + 1) * 1_000_000)
        accesses.append(FileAccess(offset, layer, path, AccessKind.OPEN))
    header = TraceHeader(
        trace_id=trace_id or str(uuid.UUID(int=next(_ids))),
        image=TracedImage(
            reference="registry.example/app:1",
            manifest_digest=image,
            platform=Platform.parse("linux/amd64"),
        ),
        container_id="c",
        started_at=datetime(2024, 5, 1, tzinfo=UTC),
        group=group,
    )
    return Trace(header, accesses)


def order_of(trace: Trace) -> list[str]:
    return [path for path, _ in first_accesses(trace)]


# --- hypothesis: traces of one image over a small set of paths -----------------------------


@st.composite
def traces(draw: st.DrawFn, image: Digest = APP, group: str | None = None) -> Trace:
    paths = draw(st.lists(st.sampled_from(PATHS), unique=True, max_size=len(PATHS)))
    accesses = []
    offset = 0
    for path in paths:
        offset += draw(st.integers(0, 3))  # 0: ties in offset, kept in recorded order
        layer = draw(st.integers(0, 1))
        accesses.append(FileAccess(offset, layer, path, AccessKind.OPEN))
        if draw(st.integers(0, 4)) == 0:  # the same path again, through the other layer
            offset += draw(st.integers(0, 3))
            accesses.append(FileAccess(offset, 1 - layer, path, AccessKind.READ))
    trace = make_trace(image, [], group=group, trace_id=str(draw(st.uuids())))
    return Trace(trace.header, accesses)


def trace_lists(
    image: Digest = APP, group: str | None = None, min_size: int = 0, max_size: int = 6
) -> st.SearchStrategy[list[Trace]]:
    return st.lists(
        traces(image, group),
        min_size=min_size,
        max_size=max_size,
        unique_by=lambda trace: trace.trace_id,
    )


# --- the rule, worked by hand --------------------------------------------------------------


def test_scores_follow_the_documented_rule() -> None:
    # T1 reads a b c, T2 reads b a, T3 reads c. Normalised ranks (absent: 1 + penalty 1 = 2):
    #   a: 0/3, 1/2, 2     -> 5/2 / 3 = 5/6
    #   b: 1/3, 0/2, 2     -> 7/3 / 3 = 7/9
    #   c: 2/3, 2,   0/1   -> 8/3 / 3 = 8/9
    given_traces = [
        make_trace(APP, ["a", "b", "c"]),
        make_trace(APP, ["b", "a"]),
        make_trace(APP, ["c"]),
    ]
    ranking = merge(given_traces)
    # Sums are taken on an integer scale: 1/3 is floor(SCALE / 3) / SCALE.
    third = Fraction(SCALE // 3, SCALE)
    assert ranking.score("a") == (0 + Fraction(1, 2) + 2) / 3
    assert ranking.score("b") == (third + 0 + 2) / 3
    assert ranking.score("c") == (Fraction(2 * SCALE // 3, SCALE) + 2 + 0) / 3
    assert ranking.order() == ("b", "a", "c")
    assert ranking.ranks() == {"b": 0, "a": 1, "c": 2}
    # Without penalty an absence counts as rank 1: c (read first by T3) moves up.
    #   a: 0 + 1/2 + 1 = 3/2, b: 1/3 + 0 + 1 = 4/3, c: 2/3 + 1 + 0 = 5/3
    assert merge(given_traces, penalty=0).order() == ("b", "a", "c")


def test_absence_penalty_places_files_read_by_some_traces() -> None:
    # x is read first but only by one trace in three; y is read second by all three.
    given_traces = [
        make_trace(APP, ["x", "y"]),
        make_trace(APP, ["w", "y"]),
        make_trace(APP, ["w", "y"]),
    ]
    # x: (0 + 2 + 2)/3 = 4/3 ; y: 1/2 ; w: (2 + 0 + 0)/3 = 2/3
    assert merge(given_traces).order() == ("y", "w", "x")
    # x: (0 + 1 + 1)/3 = 2/3 ; y: 1/2 ; w: 1/3
    assert merge(given_traces, penalty=0).order() == ("w", "y", "x")


def test_ties_by_earliest_offset_then_path() -> None:
    # Mirror images: every file gets the same score.
    first = make_trace(APP, [("b", 5), ("a", 50)])
    second = make_trace(APP, [("a", 10), ("b", 20)])
    ranking = merge([first, second])
    assert ranking.score("a") == ranking.score("b")
    assert ranking.order() == ("b", "a")  # b was read at 5 ns, a not before 10 ns
    same_time = [make_trace(APP, [("b", 5), ("a", 9)]), make_trace(APP, [("a", 5), ("b", 7)])]
    assert merge(same_time).order() == ("a", "b")  # equal scores, equal earliest: by path


def test_files_never_read_are_not_ranked_and_paths_merge_across_layers() -> None:
    trace = Trace(
        make_trace(APP, []).header,
        [
            FileAccess(1, 1, "etc/hosts", AccessKind.GETATTR),
            FileAccess(2, 0, "bin/sh", AccessKind.EXEC),
            FileAccess(3, 0, "etc/hosts", AccessKind.OPEN),  # the same path via a lower layer
        ],
    )
    ranking = merge([trace])
    assert ranking.order() == ("etc/hosts", "bin/sh")
    assert len(ranking) == 2
    assert "usr/lib/unread" not in ranking
    assert ranking.stats("etc/hosts") == FileStats(rank_sum=0, count=1, earliest_ns=1, offset_sum=1)
    assert ranking.stats("bin/sh") == FileStats(SCALE // 2, 1, 2, 2)


def test_a_trace_that_read_nothing_counts_but_moves_nothing() -> None:
    base = [make_trace(APP, ["a", "b"]), make_trace(APP, ["b", "c"])]
    with_empty = merge([*base, make_trace(APP, [])])
    assert with_empty.order() == merge(base).order()
    assert with_empty.traces == 3


def test_empty_merge() -> None:
    ranking = merge([])
    assert ranking.image is None
    assert ranking.order() == ()
    assert ranking.ranks() == {}
    assert ranking.traces == 0


# --- properties --------------------------------------------------------------------------


@given(trace=traces())
def test_a_single_trace_ranks_files_in_its_own_order(trace: Trace) -> None:
    assert list(merge([trace]).order()) == order_of(trace)


@settings(max_examples=200)
@given(given_traces=trace_lists(min_size=1), data=st.data())
def test_if_every_trace_reads_x_before_y_x_ranks_first(
    given_traces: list[Trace], data: st.DataObject
) -> None:
    penalty = data.draw(st.sampled_from([0, 0.25, 1.0, 3.0]))
    ranking = merge(given_traces, penalty=penalty)
    ranks = ranking.ranks()
    orders = [order_of(trace) for trace in given_traces]
    for x, y in itertools.permutations(ranks, 2):
        # "Reads x before y": reads x, and y later or never. A trace that reads neither
        # does not count against it.
        if all(
            (x in order and (y not in order or order.index(x) < order.index(y)))
            or (x not in order and y not in order)
            for order in orders
        ):
            assert ranks[x] < ranks[y], (x, y, orders)


@settings(max_examples=200)
@given(given_traces=trace_lists(min_size=1), data=st.data())
def test_a_trace_agreeing_with_the_ranking_changes_nothing(
    given_traces: list[Trace], data: st.DataObject
) -> None:
    penalty = data.draw(st.sampled_from([0, 1.0, 2.5]))
    ranking = merge(given_traces, penalty=penalty)
    before = ranking.order()
    # Agreeing: reads the first k files of the ranking, in its order (k = all, or fewer).
    k = data.draw(st.integers(0, len(before)))
    offsets = sorted(data.draw(st.lists(st.integers(0, 100), min_size=k, max_size=k)))
    agreeing = make_trace(APP, list(zip(before[:k], offsets, strict=True)))
    assert ranking.absorb(agreeing)
    assert ranking.order() == before
    assert merge([*given_traces, agreeing], penalty=penalty).order() == before


@given(given_traces=trace_lists(), data=st.data())
def test_the_order_of_traces_does_not_matter(
    given_traces: list[Trace], data: st.DataObject
) -> None:
    shuffled = data.draw(st.permutations(given_traces))
    first, second = merge(given_traces, APP), merge(shuffled, APP)
    assert first == second
    assert first.order() == second.order()


@given(
    given_traces=trace_lists(),
    unrelated=st.lists(traces(OTHER), max_size=3, unique_by=lambda t: t.trace_id),
    data=st.data(),
)
def test_traces_of_other_images_are_left_out(
    given_traces: list[Trace], unrelated: list[Trace], data: st.DataObject
) -> None:
    mixed = data.draw(st.permutations(given_traces + unrelated))
    alone = merge(given_traces, APP)
    together = merge(mixed, APP)
    assert together == alone
    assert together.order() == alone.order()
    assert together.traces == len(given_traces)
    # And incrementally: a trace of another image is refused, leaving the ranking as it was.
    for trace in unrelated:
        assert not alone.absorb(trace)
    assert alone == together


@settings(max_examples=200)
@given(given_traces=trace_lists(max_size=8), split=st.integers(0, 8))
def test_incremental_is_the_full_merge(given_traces: list[Trace], split: int) -> None:
    full = merge(given_traces, APP)
    step = merge(given_traces[:split], APP)
    kept = step.copy()
    for trace in given_traces[split:]:
        step.order()  # a cached order must not survive the next absorb
        assert step.absorb(trace)
    assert step == full
    assert step.order() == full.order()
    assert step.ranks() == full.ranks()
    assert all(step.score(path) == full.score(path) for path in full)
    # The copy taken before did not move.
    assert kept == merge(given_traces[:split], APP)


def test_absorbing_the_same_trace_again_changes_nothing() -> None:
    trace = make_trace(APP, ["a", "b"])
    ranking = merge([trace, make_trace(APP, ["b"])])
    before = ranking.copy()
    assert not ranking.absorb(trace)
    assert ranking == before
    assert ranking.traces == 2
    assert merge([trace, trace]) == merge([trace])


def test_two_different_traces_under_one_id_are_refused() -> None:
    one = make_trace(APP, ["a"], trace_id="7f0b9a3c-5a4e-4c1d-9a55-0f1e2d3c4b5a")
    two = make_trace(APP, ["b"], trace_id="7f0b9a3c-5a4e-4c1d-9a55-0f1e2d3c4b5a")
    with pytest.raises(InvalidInput, match="share the id"):
        merge([one, two])


def test_traces_of_several_images_need_the_image_named() -> None:
    app, other = make_trace(APP, ["a"]), make_trace(OTHER, ["b"])
    with pytest.raises(InvalidInput, match="2 different images"):
        merge([app, other])
    assert merge([app, other], OTHER).order() == ("b",)
    assert merge([app, other], OTHER).image == OTHER
    ranking = Ranking()
    assert ranking.absorb(other)
    assert ranking.image == OTHER
    assert not ranking.absorb(app)


@pytest.mark.parametrize("penalty", [-0.5, float("inf"), float("nan")])
def test_penalty_must_be_finite_and_not_negative(penalty: float) -> None:
    with pytest.raises(InvalidInput, match="penalty"):
        merge([], penalty=penalty)
    with pytest.raises(InvalidInput, match="penalty"):
        GroupRanking("g", penalty=penalty)


# --- joint rankings of a group -----------------------------------------------------------


def test_group_interleaves_images_by_time_since_each_start() -> None:
    app = make_trace(APP, [("a1", 0), ("a2", 30), ("a3", 50)], group="shop")
    db = make_trace(DB, [("d1", 10), ("d2", 40)], group="shop")
    joint = merge_group([db, app])
    assert joint.group == "shop"
    assert joint.images == tuple(sorted([APP, DB]))
    assert joint.order() == ((APP, "a1"), (DB, "d1"), (APP, "a2"), (DB, "d2"), (APP, "a3"))
    assert joint.ranks(APP) == {"a1": 0, "a2": 2, "a3": 4}
    assert joint.ranks(DB) == {"d1": 1, "d2": 3}
    assert joint.ranks(OTHER) == {}
    assert joint.rank_maps() == {APP: joint.ranks(APP), DB: joint.ranks(DB)}


def test_group_time_estimates_are_means_kept_in_ranking_order() -> None:
    # Over two deploys: a2 is read at 30 and 70 ns (mean 50); a3 by one deploy only, at 40,
    # so it ranks after a2 and its estimate is raised to a2's (50); d1 at 45 comes before both.
    deploys = [
        [make_trace(APP, [("a1", 0), ("a2", 30), ("a3", 40)], group="g")],
        [make_trace(APP, [("a1", 0), ("a2", 70)], group="g")],
        [make_trace(DB, [("d1", 45)], group="g"), make_trace(DB, [("d1", 45)], group="g")],
    ]
    joint = merge_group(itertools.chain.from_iterable(deploys))
    assert joint.ranking(APP).order() == ("a1", "a2", "a3")
    assert joint.order() == ((APP, "a1"), (DB, "d1"), (APP, "a2"), (APP, "a3"))


def test_group_filters_and_refuses_what_is_not_one_group() -> None:
    ours = [make_trace(APP, ["a"], group="g"), make_trace(DB, ["d"], group="g")]
    others = [make_trace(APP, ["z"], group="h"), make_trace(DB, ["y"])]
    joint = merge_group(ours + others, "g")
    assert set(joint.order()) == {(APP, "a"), (DB, "d")}
    assert joint.traces == 2
    with pytest.raises(InvalidInput, match="2 groups"):
        merge_group([ours[0], others[0]])
    with pytest.raises(InvalidInput, match="without a group"):
        merge_group([ours[0], others[1]])
    with pytest.raises(InvalidInput, match="no traces"):
        merge_group([])
    empty = merge_group([], "g")
    assert empty.order() == ()
    assert not joint.absorb(others[0])
    assert not joint.absorb(ours[0])  # already merged


@st.composite
def group_traces(draw: st.DrawFn) -> list[Trace]:
    app = draw(trace_lists(APP, "g", max_size=4))
    db = draw(trace_lists(DB, "g", max_size=4))
    other = draw(trace_lists(OTHER, "h", max_size=2))
    mixed = draw(st.permutations(app + db + other))
    ids = [trace.trace_id for trace in mixed]
    if len(set(ids)) != len(ids):  # uuids from separate lists may (rarely) meet
        return [trace for n, trace in enumerate(mixed) if trace.trace_id not in ids[:n]]
    return mixed


@settings(max_examples=200)
@given(given_traces=group_traces(), data=st.data())
def test_group_keeps_each_images_own_order(given_traces: list[Trace], data: st.DataObject) -> None:
    joint = merge_group(given_traces, "g")
    for image in (APP, DB):
        alone = merge([t for t in given_traces if t.image == image and t.group == "g"], image)
        mine = joint.ranks(image)
        assert sorted(mine, key=mine.__getitem__) == list(alone.order())
    # One scale: the ranks of all images together are 0..n-1, each once.
    all_ranks = sorted(r for image in joint.images for r in joint.ranks(image).values())
    assert all_ranks == list(range(len(joint)))
    # Deterministic whatever the order, and incremental = full.
    shuffled = data.draw(st.permutations(given_traces))
    assert merge_group(shuffled, "g").order() == joint.order()
    step = GroupRanking("g")
    for trace in given_traces:
        step.absorb(trace)
        step.order()  # a cached order must not survive the next absorb
    assert step.order() == joint.order()


@given(given_traces=trace_lists(APP, "g", min_size=1))
def test_a_group_of_one_image_ranks_as_the_image(given_traces: list[Trace]) -> None:
    assert merge_group(given_traces).ranks(APP) == merge(given_traces).ranks()


# --- through delta.plan --------------------------------------------------------------------


def _image(name: str, files: Sequence[str]) -> tuple[TOC, dict[str, Digest]]:
    entries = []
    contents = {}
    offset = 0
    for path in files:
        content = sha256_digest(f"{name}:{path}".encode())
        contents[path] = content
        chunk = Chunk(0, 100, offset, 60, content)
        offset += 60
        entries.append(
            Entry(name=path, type=EntryType.FILE, size=100, digest=content, chunks=(chunk,))
        )
    blob = sha256_digest(name.encode())
    info = LayerInfo(digest=blob, size=offset, diff_id=blob, media_type=OCI_LAYER_GZIP)
    return TOC(layer=info, entries=tuple(entries)), contents


def test_joint_ranks_interleave_a_joint_bundle() -> None:
    # Layer (tar) order is alphabetical; start-up order is not.
    app_toc, app = _image("app", ["bin/app", "etc/app.conf", "lib/libssl.so", "share/unused"])
    db_toc, db = _image("db", ["bin/db", "etc/db.conf", "share/db-unused"])
    given_traces = [
        make_trace(APP, [("etc/app.conf", 5), ("bin/app", 20), ("lib/libssl.so", 60)], group="g"),
        make_trace(DB, [("bin/db", 10), ("etc/db.conf", 40)], group="g"),
    ]
    joint = merge_group(given_traces)
    delta = plan([Target([app_toc], joint.ranks(APP)), Target([db_toc], joint.ranks(DB))])
    assert delta.sent == (
        app["etc/app.conf"],
        db["bin/db"],
        app["bin/app"],
        db["etc/db.conf"],
        app["lib/libssl.so"],
        # never read: last, in layer order
        app["share/unused"],
        db["share/db-unused"],
    )
    # Each image alone, ranked by its own traces, gets its trace order.
    alone = plan([Target([app_toc], merge(given_traces, APP).ranks())])
    assert alone.sent[:3] == (app["etc/app.conf"], app["bin/app"], app["lib/libssl.so"])
