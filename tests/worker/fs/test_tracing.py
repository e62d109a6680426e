"""Access tracing records the first access per (layer, file), once, with its kind."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from starlight_core.layer.toc import Entry, EntryType
from tests.worker.fs.conftest import Server
from tests.worker.fs.layers import Layer, write_layer_dir

pytestmark = pytest.mark.e2e

LAYER = Layer.of(
    Entry("dir", EntryType.DIR, mode=0o755),
    (Entry("dir/a", EntryType.FILE), b"aaa"),
    (Entry("dir/b", EntryType.FILE), b"bbb"),
    Entry("dir/c", EntryType.SYMLINK, linkname="a"),
    (Entry("dir/d", EntryType.FILE), b"ddd"),
    (Entry("dir/e", EntryType.FILE), b"eee"),
    (Entry("dir/untouched", EntryType.FILE), b"never read"),
)


def test_first_accesses_are_recorded_once_each(server: Server, tmp_path: Path) -> None:
    one = server.client.attach("trace-one", write_layer_dir(LAYER, tmp_path / "one"))
    two = server.client.attach("trace-two", write_layer_dir(LAYER, tmp_path / "two"))
    # Looked up before tracing: the kernel has their entries, so their first traced access is
    # the content or the link itself, not a lookup.
    os.stat(one / "dir/d")
    os.lstat(one / "dir/c")

    server.client.trace_on()
    os.stat(one / "dir/a")
    (one / "dir/a").read_bytes()
    (one / "dir/b").read_bytes()
    (one / "dir/d").read_bytes()
    assert os.readlink(one / "dir/c") == "a"
    os.readlink(one / "dir/c")
    (two / "dir/a").read_bytes()
    os.listdir(one / "dir")
    records = server.client.trace_drain()

    assert [(r.layer_key, r.name) for r in records] == [
        ("trace-one", "dir/a"),
        ("trace-one", "dir/b"),
        ("trace-one", "dir/d"),
        ("trace-one", "dir/c"),
        ("trace-two", "dir/a"),
    ]
    kinds = {(r.layer_key, r.name): r.kind for r in records}
    assert kinds[("trace-one", "dir/a")] == "getattr"
    assert kinds[("trace-one", "dir/d")] == "open"
    assert kinds[("trace-one", "dir/c")] == "readlink"
    times = [r.t_ns for r in records if r.layer_key == "trace-one"]
    assert times == sorted(times)
    assert times[0] >= 0

    # Drained means gone; files already seen stay seen; off means off.
    assert server.client.trace_drain() == []
    (one / "dir/b").read_bytes()
    assert server.client.trace_drain() == []
    server.client.trace_off()
    (one / "dir/e").read_bytes()
    assert server.client.trace_drain() == []
    server.client.trace_on()  # a new trace starts from scratch
    os.stat(two / "dir/b")
    assert [(r.layer_key, r.name) for r in server.client.trace_drain()] == [("trace-two", "dir/b")]
    server.client.trace_off()
