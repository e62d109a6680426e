"""Trace merging speed: 100 traces of 2,000 files each, merged in full and updated one trace at
a time; decoding one such trace; a joint ranking of two images.

Run: ``.venv/bin/pytest benchmarks/micro/test_trace_bench.py`` (pytest-benchmark prints the
timings; ``--benchmark-disable`` runs each once as a plain test).

The traces are shaped like real start-ups of one image of 3,000 files: each container reads
2,000 of them, mostly the same ones in mostly the same order (a common order, each file's
position jittered, and one file in ten swapped for a file outside the common set).
"""

from __future__ import annotations

import random
import uuid
from datetime import UTC, datetime

from pytest_benchmark.fixture import BenchmarkFixture

from starlight_core.digest import Digest, sha256_digest
from starlight_core.platform import Platform
from starlight_core.trace import (
    AccessKind,
    FileAccess,
    GroupRanking,
    Ranking,
    Trace,
    TracedImage,
    TraceHeader,
    decode,
    encode,
    merge,
    merge_group,
)

TRACES = 100
FILES_PER_TRACE = 2_000
IMAGE_FILES = 3_000
IMAGE = sha256_digest(b"bench image")
DB = sha256_digest(b"bench database")


def _traces(
    image: Digest, count: int, *, seed: int = 6, group: str | None = None, prefix: str = "usr"
) -> list[Trace]:
    rng = random.Random(seed)
    paths = [f"{prefix}/lib/d{n % 40}/file{n}.so" for n in range(IMAGE_FILES)]
    common, spare = paths[:FILES_PER_TRACE], paths[FILES_PER_TRACE:]
    traces = []
    for _ in range(count):
        files = [rng.choice(spare) if rng.random() < 0.1 else path for path in common]
        keyed = sorted(
            {path: n + rng.gauss(0, 50) for n, path in enumerate(files)}.items(),
            key=lambda item: item[1],
        )
        accesses = [
            FileAccess(n * 20_000 + rng.randrange(20_000), 0, path, AccessKind.OPEN)
            for n, (path, _) in enumerate(keyed)
        ]
        header = TraceHeader(
            trace_id=str(uuid.UUID(int=rng.getrandbits(128), version=4)),
            image=TracedImage(
                reference="registry.example/app:1",
                manifest_digest=image,
                platform=Platform.parse("linux/amd64"),
            ),
            container_id="c",
            started_at=datetime(2024, 5, 1, tzinfo=UTC),
            group=group,
        )
        traces.append(Trace.build(header, accesses))
    return traces


def test_merge_100_traces_of_2000_files(benchmark: BenchmarkFixture) -> None:
    traces = _traces(IMAGE, TRACES)

    def full() -> dict[str, int]:
        return merge(traces).ranks()

    ranks = benchmark(full)
    assert IMAGE_FILES * 0.9 < len(ranks) <= IMAGE_FILES
    # The files every trace reads come before the ones only some read.
    common = [f"usr/lib/d{n % 40}/file{n}.so" for n in range(FILES_PER_TRACE)]
    assert max(ranks[p] for p in common[:100]) < min(r for p, r in ranks.items() if p not in common)


def test_absorb_one_trace_into_100(benchmark: BenchmarkFixture) -> None:
    *old, new = _traces(IMAGE, TRACES + 1)
    ranking = merge(old)
    ranking.order()

    def setup() -> tuple[tuple[Ranking, Trace], dict[str, object]]:
        return (ranking.copy(), new), {}

    def absorb(current: Ranking, trace: Trace) -> dict[str, int]:
        current.absorb(trace)
        return current.ranks()

    ranks = benchmark.pedantic(absorb, setup=setup, rounds=20)  # type: ignore[no-untyped-call]
    assert ranks == merge([*old, new]).ranks()


def test_decode_a_trace_of_2000_files(benchmark: BenchmarkFixture) -> None:
    (trace,) = _traces(IMAGE, 1)
    data = encode(trace)
    assert benchmark(decode, data) == trace


def test_joint_ranking_of_two_images(benchmark: BenchmarkFixture) -> None:
    traces = _traces(IMAGE, TRACES // 2, group="shop") + _traces(
        DB, TRACES // 2, seed=7, group="shop", prefix="var"
    )

    def joint() -> GroupRanking:
        ranking = merge_group(traces)
        ranking.rank_maps()
        return ranking

    ranking = benchmark(joint)
    maps = ranking.rank_maps()
    assert set(maps) == {IMAGE, DB}
    # Interleaved: each image has files in both halves of the joint order.
    half = len(ranking) // 2
    for image in (IMAGE, DB):
        assert min(maps[image].values()) < half < max(maps[image].values())
