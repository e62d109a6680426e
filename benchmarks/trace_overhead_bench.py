"""What recording start-up traces costs the filesystem: reads through the FUSE server with
first-access tracing off and on.

    .venv/bin/python -m benchmarks.trace_overhead_bench [--files 2000] [--rounds 7] [--json F]

A layer of ``--files`` small files (4 KiB) and 16 large ones (1 MiB) is attached to a private
FUSE server under a fresh key for every round (the kernel caches per path, so each round reads
through FUSE, as a container's first start does; the page cache of the layer's on-disk files is
warm after the first round, so what differs is the FUSE server's own work). Each round stats and
reads every file, alternating tracing off and on; with it on, the records are drained after the
walk (timed apart: the daemon drains once a second, off the containers' path). Also timed:
attaching one more view of the layer (what the optimizer does per container and layer).

Needs root and /dev/fuse.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from starlight_core import wire
from starlight_core.digest import Digest
from starlight_core.layer.toc import TOC, Entry, EntryType, LayerInfo
from starlight_worker.fs import ensure_running

__all__ = ["main", "measure"]

_MEDIA_TYPE = "application/vnd.oci.image.layer.v1.tar+gzip"


def _digest(data: bytes) -> Digest:
    return Digest("sha256:" + hashlib.sha256(data).hexdigest())


def make_layer(directory: Path, files: int, *, seed: int = 5) -> int:
    """A layer directory (``toc.json``, complete ``fs/``); returns its content bytes."""
    rng = random.Random(seed)
    entries = [Entry("usr", EntryType.DIR, mode=0o755), Entry("big", EntryType.DIR, mode=0o755)]
    contents: dict[str, bytes] = {}
    for n in range(files):
        folder = f"usr/d{n % 50}"
        if n < 50:
            entries.append(Entry(folder, EntryType.DIR, mode=0o755))
        contents[f"{folder}/f{n}"] = rng.randbytes(4096)
    for n in range(16):
        contents[f"big/b{n}"] = rng.randbytes(1 << 20)
    for name, data in contents.items():
        entries.append(
            Entry(name, EntryType.FILE, mode=0o644, size=len(data), digest=_digest(data))
        )
    blob = _digest(repr(entries).encode())
    toc = TOC(LayerInfo(blob, 1, blob, _MEDIA_TYPE), tuple(entries))
    (directory / "fs").mkdir(parents=True)
    (directory / "toc.json").write_bytes(wire.dumps(toc))
    for entry in entries:
        path = directory / "fs" / entry.name
        if entry.type is EntryType.DIR:
            path.mkdir(exist_ok=True)
        else:
            path.write_bytes(contents[entry.name])
    (directory / "complete").touch()
    return sum(len(d) for d in contents.values())


def _walk(root: Path) -> int:
    total = 0
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            path = os.path.join(dirpath, name)
            os.stat(path)
            with open(path, "rb") as handle:
                while chunk := handle.read(1 << 20):
                    total += len(chunk)
    return total


def measure(workdir: Path, *, files: int = 2000, rounds: int = 7) -> dict[str, Any]:
    layer_dir = workdir / "layer"
    size = make_layer(layer_dir, files)
    client = ensure_running(workdir / "fs.sock", workdir / "mnt")
    times: dict[str, list[float]] = {"off": [], "on": []}
    drains: list[float] = []
    records: list[int] = []
    attaches: list[float] = []
    try:
        for n in range(rounds * 2 + 1):
            mode = "on" if n % 2 else "off"
            key = f"bench-{n}"
            started = time.perf_counter()
            path = client.attach(key, layer_dir)
            attaches.append(time.perf_counter() - started)
            if mode == "on":
                client.trace_on()
            started = time.perf_counter()
            read = _walk(path)
            elapsed = time.perf_counter() - started
            assert read == size, (read, size)
            if mode == "on":
                started = time.perf_counter()
                drained = client.trace_drain()
                drains.append(time.perf_counter() - started)
                records.append(len(drained))
                client.trace_off()
            client.detach(key)
            if n:  # the first round warms the page cache of the on-disk files
                times[mode].append(elapsed)
    finally:
        for info in client.list():
            client.detach(info.layer_key)
        client.shutdown()
    off, on = statistics.median(times["off"]), statistics.median(times["on"])
    return {
        "files": files + 16,
        "bytes": size,
        "rounds": rounds,
        "walk_seconds_off": [round(t, 4) for t in times["off"]],
        "walk_seconds_on": [round(t, 4) for t in times["on"]],
        "median_off": round(off, 4),
        "median_on": round(on, 4),
        "ratio_on_over_off": round(on / off, 3),
        "records_per_walk": records[0] if records else 0,
        "drain_seconds_median": round(statistics.median(drains), 4),
        "attach_seconds_median": round(statistics.median(attaches), 4),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--files", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="starlight-trace-bench-") as workdir:
        results = measure(Path(workdir), files=args.files, rounds=args.rounds)
    text = json.dumps(results, indent=2)
    print(text)
    if args.json is not None:
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
