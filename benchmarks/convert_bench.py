"""Conversion throughput and size overhead on real layers built from Debian packages.

``python -m benchmarks.convert_bench`` prints, per layer: uncompressed size, the original
gzip -6 layer size, the Starlight layer size (overhead %), conversion throughput (MB/s of
uncompressed input, for the writer alone and for the whole gunzip+convert path), and
``gzip -6`` throughput on the same input on the same machine, with the ratios the targets use
(size overhead <= 5 %, throughput >= 60 % of gzip -6). Best of ``--repeat`` runs.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from benchmarks.images.debian import packages_layer
from starlight_core.layer.scan import LayerDecoder
from starlight_core.layer.writer import LayerWriter
from starlight_core.testing import gzip_bytes

LAYERS = {
    "python3.11": ["python3.11-minimal", "libpython3.11-minimal", "libpython3.11-stdlib"],
    "perl": ["perl-modules-5.36", "libperl5.36", "perl-base"],
    "libc+coreutils+openssl": ["libc6", "coreutils", "bash", "libssl3", "openssl"],
    "openjdk-17-jre-headless": ["openjdk-17-jre-headless"],
    "nginx+redis": ["nginx-core", "redis-server", "redis-tools", "libjemalloc2"],
}
STEP = 1 << 20


def _best(repeat: int, func: Callable[[], object]) -> float:
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        func()
        times.append(time.perf_counter() - started)
    return min(times)


def _write(tar: bytes) -> bytes:
    writer = LayerWriter()
    out = [writer.write(tar[i : i + STEP]) for i in range(0, len(tar), STEP)]
    out.append(writer.close())
    return b"".join(out)


def _gunzip_convert(blob: bytes) -> int:
    decoder = LayerDecoder()
    writer = LayerWriter()
    size = 0
    for i in range(0, len(blob), STEP):
        for piece in decoder.feed(blob[i : i + STEP]):
            size += len(writer.write(piece))
    for piece in decoder.feed(b""):
        size += len(writer.write(piece))
    return size + len(writer.close())


def measure(name: str, packages: list[str], repeat: int) -> dict[str, float | str | int]:
    tar = packages_layer(packages)
    original = gzip_bytes(tar, 6)
    converted = _write(tar)
    with tempfile.NamedTemporaryFile() as handle:
        handle.write(tar)
        handle.flush()
        gzip_time = _best(
            repeat,
            lambda: subprocess.run(
                ["gzip", "-6", "-n", "-c", handle.name], check=True, stdout=subprocess.DEVNULL
            ),
        )
    writer_time = _best(repeat, lambda: _write(tar))
    full_time = _best(repeat, lambda: _gunzip_convert(original))
    mb = len(tar) / 1e6
    return {
        "layer": name,
        "uncompressed_bytes": len(tar),
        "gzip6_bytes": len(original),
        "starlight_bytes": len(converted),
        "size_overhead_pct": round(100 * (len(converted) - len(original)) / len(original), 2),
        "gzip6_mb_s": round(mb / gzip_time, 1),
        "writer_mb_s": round(mb / writer_time, 1),
        "convert_mb_s": round(mb / full_time, 1),
        "writer_vs_gzip6": round(gzip_time / writer_time, 2),
        "convert_vs_gzip6": round(gzip_time / full_time, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    rows = [measure(name, packages, args.repeat) for name, packages in LAYERS.items()]
    header = list(rows[0])
    print(" | ".join(header))
    for row in rows:
        print(" | ".join(str(row[h]) for h in header))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
