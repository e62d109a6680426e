"""Micro-benchmarks of the metadata store on SQLite, at 100,000 files per image.

    .venv/bin/pytest benchmarks/micro/test_store_bench.py --benchmark-only

Targets (DESIGN: indexing in a few seconds, the bundle's metadata well under a second):
indexing a 100k-entry layer, reading an image's TOCs back (``load_image``), and finding which
of its contents a worker holding an older version already has (``shared_contents``).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path

import anyio
import anyio.from_thread
import pytest
from pytest_benchmark.fixture import BenchmarkFixture

from starlight_core.digest import sha256_digest
from starlight_core.layer.toc import TOC, Chunk, Entry, EntryType, LayerInfo
from starlight_core.platform import Platform
from starlight_proxy.store import ImageRecord, SQLMetadataStore, open_store

FILES = 100_000
NAME = "127.0.0.1:5000/bench"
PLATFORM = Platform.parse("linux/amd64")


def make_toc(label: str, count: int, *, start: int = 0) -> TOC:
    """A layer of ``count`` files in a tree of directories, like a big Python install."""
    entries: list[Entry] = []
    offset = 0
    for i in range(start, start + count):
        if i % 50 == 0:
            entries.append(Entry(f"usr/lib/python3/dist-packages/pkg{i // 50}", EntryType.DIR))
        digest = sha256_digest(f"content {i}".encode())
        size = 1000 + i % 5000
        entries.append(
            Entry(
                f"usr/lib/python3/dist-packages/pkg{i // 50}/module{i}.py",
                EntryType.FILE,
                mode=0o644,
                mtime_ns=1_700_000_000_000_000_000 + i,
                size=size,
                digest=digest,
                offset=offset + 512,
                chunks=(Chunk(0, size, offset, size // 3, digest),),
            )
        )
        offset += size + 512
    info = LayerInfo(
        digest=sha256_digest(f"layer {label}".encode()),
        size=offset,
        diff_id=sha256_digest(f"diff {label}".encode()),
        media_type="application/vnd.oci.image.layer.v1.tar+gzip",
    )
    return TOC(layer=info, entries=tuple(entries))


async def index(store: SQLMetadataStore, tocs: list[TOC], label: str) -> ImageRecord:
    manifest = f"manifest {label}".encode()
    claim = await store.begin_indexing(NAME, sha256_digest(manifest), PLATFORM)
    assert claim is not None
    for toc in tocs:
        await store.put_layer(toc)
    return await store.finish_indexing(
        claim,
        manifest=manifest,
        manifest_media_type="application/vnd.oci.image.manifest.v1+json",
        config=b"{}",
        config_digest=sha256_digest(b"{}"),
        layers=[t.layer.digest for t in tocs],
        tag=label,
    )


@pytest.fixture(scope="module")
def big_layer() -> TOC:
    return make_toc("big", FILES)


def test_index_100k_files(benchmark: BenchmarkFixture, tmp_path: Path, big_layer: TOC) -> None:
    paths = (tmp_path / f"store-{n}.db" for n in itertools.count())

    def setup() -> tuple[tuple[Path], dict[str, object]]:
        return (next(paths),), {}

    def run(path: Path) -> None:
        async def main() -> None:
            async with await open_store(path) as store:
                image = await index(store, [big_layer], "v1")
                assert image.ready

        anyio.run(main)

    benchmark.pedantic(run, setup=setup, rounds=3, iterations=1)  # type: ignore[no-untyped-call]


@pytest.fixture(scope="module")
def updated_images(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[anyio.from_thread.BlockingPortal, SQLMetadataStore, ImageRecord, ImageRecord]]:
    """v1 = [base 50k, app 50k]; v2 = [base, app' 50k with a tenth of app's contents]."""
    half = FILES // 2
    base, app = make_toc("base", half), make_toc("app", half, start=half)
    app2 = make_toc("app2", half, start=half + half * 9 // 10)
    path = tmp_path_factory.mktemp("store") / "store.db"
    with anyio.from_thread.start_blocking_portal() as portal:
        store = portal.call(open_store, path)
        v1 = portal.call(index, store, [base, app], "v1")
        v2 = portal.call(index, store, [base, app2], "v2")
        try:
            yield portal, store, v1, v2
        finally:
            portal.call(store.close)


def test_load_image_100k_files(
    benchmark: BenchmarkFixture,
    updated_images: tuple[
        anyio.from_thread.BlockingPortal, SQLMetadataStore, ImageRecord, ImageRecord
    ],
) -> None:
    portal, store, _, v2 = updated_images
    metadata = benchmark(portal.call, store.load_image, v2.id)
    assert sum(len(t.entries) for t in metadata.tocs) >= FILES


def test_shared_contents_100k_files(
    benchmark: BenchmarkFixture,
    updated_images: tuple[
        anyio.from_thread.BlockingPortal, SQLMetadataStore, ImageRecord, ImageRecord
    ],
) -> None:
    portal, store, v1, v2 = updated_images
    shared = benchmark(portal.call, store.shared_contents, v2.id, [v1.id])
    # The whole base layer plus the tenth of app2 that app already had.
    assert len(shared) == FILES // 2 + FILES // 2 // 10
