"""Part (i) of the floor: what a container read before it was ready, from its start-up trace.

After a training deploy the worker's store holds each image's layer TOCs
(``layers/<key>/toc.json``) and the traces the optimizer recorded (``traces/**/*.jsonl``:
one per container, accesses with their offset from the container's first mount). For each
scenario the floor counts the files of the target image read up to the moment the
container's probe succeeded, by their compressed size in the layer blobs (the sum of their
chunks' gzip members), each content once, leaving out contents the old image already had
(an update need not carry them).

``read_before_ready`` is the pure part, tested on its own; ``floors_from_store`` reads the
files.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from benchmarks.wan.results import Floor
from starlight_core import wire
from starlight_core.digest import Digest
from starlight_core.layer.toc import TOC, Entry
from starlight_core.trace import Trace, decode

if TYPE_CHECKING:
    from benchmarks.images.workloads import PublishedImage

__all__ = ["floors_from_store", "read_before_ready"]

ImageKey = tuple[str, str]


def _compressed(entry: Entry) -> int:
    return sum(chunk.compressed_size for chunk in entry.chunks)


def read_before_ready(
    trace: Trace,
    tocs: Sequence[TOC],
    *,
    cutoff_ns: int,
    held: Iterable[Digest] = (),
) -> tuple[int, int]:
    """(files, compressed bytes) of the contents ``trace`` read up to ``cutoff_ns`` in the
    image whose layers are ``tocs`` (base first), each content once, those in ``held`` not
    at all."""
    by_diff_id = {toc.layer.diff_id: index for index, toc in enumerate(tocs)}
    names = [toc.by_name() for toc in tocs]
    skip = set(held)
    seen: set[Digest] = set()
    files = 0
    size = 0
    for access in trace.accesses:
        if access.offset_ns > cutoff_ns:
            break
        layer = access.layer if isinstance(access.layer, int) else by_diff_id.get(access.layer)
        if layer is None or not 0 <= layer < len(tocs):
            continue
        entry = names[layer].get(access.path)
        if entry is None or not entry.has_content or entry.digest is None:
            continue
        if entry.digest in seen or entry.digest in skip:
            continue
        seen.add(entry.digest)
        files += 1
        size += _compressed(entry)
    return files, size


def _load_traces(root: Path) -> dict[str, list[Trace]]:
    """Traces under ``root/traces`` by the manifest digest of their image."""
    found: dict[str, list[Trace]] = {}
    for path in sorted((root / "traces").rglob("*.jsonl")):
        try:
            trace = decode(path.read_bytes())
        except Exception:  # a partial or foreign file: not ours to judge
            continue
        found.setdefault(str(trace.header.image.manifest_digest), []).append(trace)
    return found


def _tocs(root: Path, diff_ids: Sequence[Digest]) -> list[TOC]:
    from starlight_worker.store.store import layer_key

    return [
        wire.loads((root / "layers" / layer_key(d) / "toc.json").read_bytes(), TOC, "toc")
        for d in diff_ids
    ]


def floors_from_store(
    root: Path,
    workload: str,
    images: Mapping[ImageKey, PublishedImage],
    scenarios: Mapping[str, tuple[ImageKey, ImageKey | None]],
    ready_at: Mapping[str, float],
) -> tuple[list[Floor], list[str]]:
    """One ``Floor`` per scenario from the store of a training worker at ``root``.

    ``images`` maps (version, kind) to a ``PublishedImage``; ``ready_at`` maps a starlight
    reference to the wall-clock time its training container was ready.
    """
    traces = _load_traces(root)
    floors: list[Floor] = []
    notes: list[str] = []
    for scenario, (target_key, old_key) in scenarios.items():
        target = images[target_key]
        reference = str(target.starlight)
        digest = reference.rpartition("@")[2]
        candidates = traces.get(digest, [])
        if not candidates or reference not in ready_at:
            notes.append(f"{workload} {scenario}: no start-up trace of {reference}")
            continue
        trace = candidates[-1]
        started = trace.header.started_at
        cutoff_ns = int((ready_at[reference] - started.timestamp()) * 1e9)
        tocs = _tocs(root, [layer.diff_id for layer in target.layers])
        held: set[Digest] = set()
        if old_key is not None:
            old = images[old_key]
            for toc in _tocs(root, [layer.diff_id for layer in old.layers]):
                held.update(e.digest for e in toc.files() if e.digest is not None)
        files, size = read_before_ready(trace, tocs, cutoff_ns=cutoff_ns, held=held)
        floors.append(
            Floor(workload=workload, scenario=scenario, read_files=files, read_bytes=size)
        )
    return floors, notes
