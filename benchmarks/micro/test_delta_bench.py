"""Delta planning speed: a plan for an image of 100,000 files (goal: well under a second).

Run: ``.venv/bin/pytest benchmarks/micro/test_delta_bench.py`` (pytest-benchmark prints the
timings; ``--benchmark-disable`` runs each once as a plain test).

The image is shaped like a large distribution image: 5 layers, files spread over nested
directories, 1 in 10 files in an upper layer overriding a lower one, some whiteouts and hard
links, 1,000 traced (ranked) paths, and a worker that already holds a third of the contents.
"""

from __future__ import annotations

import hashlib

from pytest_benchmark.fixture import BenchmarkFixture

from starlight_core.delta import DeltaPlan, Target, plan
from starlight_core.digest import Digest
from starlight_core.layer.toc import TOC, Chunk, Entry, EntryType, LayerInfo
from starlight_core.oci import OCI_LAYER_GZIP

FILES = 100_000
LAYERS = 5


def _digest(text: str) -> Digest:
    return Digest("sha256:" + hashlib.sha256(text.encode()).hexdigest())


def _image() -> tuple[Target, set[Digest]]:
    per_layer = FILES // LAYERS
    layers = []
    have: set[Digest] = set()
    for n in range(LAYERS):
        entries: list[Entry] = []
        offset = 0
        for i in range(per_layer):
            if i % 100 == 0:
                entries.append(Entry(name=f"usr/d{n}/{i // 100}", type=EntryType.DIR))
            # Upper layers rewrite 1 in 10 of the base layer's files.
            name = f"usr/d0/{i // 100}/f{i}" if n and i % 10 == 0 else f"usr/d{n}/{i // 100}/f{i}"
            content = _digest(f"{n}/{i}")
            if i % 3 == 0:
                have.add(content)
            size = 1000 + i % 5000
            chunk = Chunk(0, size, offset, size // 2, _digest(f"chunk {n}/{i}"))
            offset += size // 2 + 512
            entries.append(
                Entry(name=name, type=EntryType.FILE, size=size, digest=content, chunks=(chunk,))
            )
            if i % 1000 == 1:
                entries.append(Entry(name=f"{name}.link", type=EntryType.HARDLINK, linkname=name))
            if n and i % 1000 == 2:
                entries.append(
                    Entry(name=f"usr/d{n - 1}/{i // 100}/.wh.f{i}", type=EntryType.WHITEOUT)
                )
        digest = _digest(f"layer {n}")
        info = LayerInfo(digest=digest, size=offset, diff_id=digest, media_type=OCI_LAYER_GZIP)
        layers.append(TOC(layer=info, entries=tuple(entries)))
    ranks = {
        f"usr/d{n}/{i // 100}/f{i}": i % 50 for n in range(LAYERS) for i in range(1, 10_000, 50)
    }
    return Target(layers=tuple(layers), ranks=ranks), have


def test_plan_100k_files(benchmark: BenchmarkFixture) -> None:
    target, have = _image()
    result: DeltaPlan = benchmark(plan, [target], have)
    files = sum(1 for toc in target.layers for e in toc.entries if e.has_content)
    assert files == FILES
    assert len(result.extents) + len(result.local) == FILES
    assert len(result.local) == len(have)
