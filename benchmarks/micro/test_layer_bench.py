"""Layer format speed: conversion (MB/s of uncompressed tar) and TOC parsing (rebuilding a TOC
from a converted blob, and loading a stored TOC's JSON), on a synthetic layer shaped like a
distribution's: 2,000 files of mixed sizes (most small, a few large and chunked), text-like
content that compresses about as well as binaries and libraries do.

Run: ``.venv/bin/pytest benchmarks/micro/test_layer_bench.py`` (pytest-benchmark prints the
timings and, in ``extra_info``, MB/s; ``--benchmark-disable`` runs each once as a plain test).
"""

from __future__ import annotations

import random

import pytest
from pytest_benchmark.fixture import BenchmarkFixture

from starlight_core import wire
from starlight_core.layer.scan import LayerScanner
from starlight_core.layer.toc import TOC
from starlight_core.testing import TarMember, build_tar, convert_bytes

FILES = 2_000
STEP = 1 << 20


def _content(rng: random.Random, size: int) -> bytes:
    words = [rng.randbytes(rng.randint(2, 9)).hex() for _ in range(64)]
    text = " ".join(rng.choice(words) for _ in range(size // 8 + 1)).encode()
    return text[:size]


@pytest.fixture(scope="module")
def layer_tar() -> bytes:
    rng = random.Random(7)
    members = [TarMember(f"usr/lib/d{i}", kind="dir") for i in range(40)]
    for i in range(FILES):
        size = rng.choice((200, 1_500, 6_000, 20_000, 60_000))
        if i % 400 == 0:
            size = 6_000_000  # two 4 MiB chunks
        members.append(TarMember(f"usr/lib/d{i % 40}/f{i}.so", data=_content(rng, size)))
    return build_tar(members)


@pytest.fixture(scope="module")
def converted(layer_tar: bytes) -> tuple[bytes, TOC]:
    return convert_bytes(layer_tar, step=STEP)


def test_convert_mb_per_s(benchmark: BenchmarkFixture, layer_tar: bytes) -> None:
    blob, toc = benchmark.pedantic(  # type: ignore[no-untyped-call]
        convert_bytes, args=(layer_tar,), kwargs={"step": STEP}, rounds=3, iterations=1
    )
    assert len([e for e in toc.entries if e.has_content]) == FILES
    assert len(blob) < len(layer_tar)
    seconds = benchmark.stats.stats.min if benchmark.stats else 0
    if seconds:
        benchmark.extra_info["mb_per_s"] = round(len(layer_tar) / seconds / 1e6, 1)


def _scan(blob: bytes) -> TOC:
    scanner = LayerScanner()
    for i in range(0, len(blob), STEP):
        scanner.receive_data(blob[i : i + STEP])
    scanner.receive_data(b"")
    return scanner.toc


def test_toc_from_converted_blob(benchmark: BenchmarkFixture, converted: tuple[bytes, TOC]) -> None:
    blob, toc = converted
    rebuilt = benchmark.pedantic(_scan, args=(blob,), rounds=3, iterations=1)  # type: ignore[no-untyped-call]
    assert rebuilt.entries == toc.entries
    seconds = benchmark.stats.stats.min if benchmark.stats else 0
    if seconds:
        benchmark.extra_info["mb_per_s_compressed"] = round(len(blob) / seconds / 1e6, 1)


def test_toc_json_load(benchmark: BenchmarkFixture, converted: tuple[bytes, TOC]) -> None:
    _, toc = converted
    data = wire.dumps(toc)
    loaded = benchmark(wire.loads, data, TOC, "toc")
    assert loaded == toc
