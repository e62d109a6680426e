"""The FUSE server's part in the optimizer: views (aliases) of a layer still arriving, each
recording its own first accesses, all woken by the arrival announced for the layer's key."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks.services import wait_for
from starlight_core.layer.toc import Entry, EntryType
from tests.worker.fs.conftest import running_server
from tests.worker.fs.layers import Layer, place, write_layer_dir
from tests.worker.fs.test_waiting import BOUND, Reader

pytestmark = pytest.mark.e2e

LATE = b"arrives while containers wait\n" * 100
LAYER = Layer.of(
    Entry("d", EntryType.DIR, mode=0o755),
    (Entry("d/early", EntryType.FILE), b"here from the start\n"),
    (Entry("d/late", EntryType.FILE), LATE),
)


def test_an_arrival_wakes_the_readers_of_every_view(tmp_path: Path) -> None:
    # A long re-check interval: only the announced arrival can wake the readers in time.
    with running_server(tmp_path / "fused", poll=600.0) as server:
        client = server.client
        layer_dir = write_layer_dir(LAYER, tmp_path / "layer", withhold=["d/late"])
        base = client.attach("sha256-" + "a" * 64, layer_dir)
        one = client.attach("sha256-" + "a" * 64 + "@one", layer_dir)
        two = client.attach("sha256-" + "a" * 64 + "@two", layer_dir)
        other = client.attach("sha256-" + "b" * 64 + "@one", layer_dir)  # not an alias of it
        client.trace_on()
        try:
            assert (one / "d/early").read_bytes() == b"here from the start\n"
            readers = [Reader(view / "d/late") for view in (one, two, other)]
            for reader in readers:
                reader.start()
            wait_for(lambda: client.ping().waiting == 3, timeout=BOUND, what="3 waiting reads")
            place(layer_dir, "d/late", LATE)
            # The layer's own key and its two aliases; not the other layer's view.
            assert client.arrived("sha256-" + "a" * 64, ["d/late"]) == 2
            for reader in readers[:2]:
                assert reader.done.wait(BOUND)
                assert reader.data == LATE
            assert not readers[2].done.is_set()
            assert client.arrived("sha256-" + "b" * 64, ["d/late"]) == 1
            assert readers[2].done.wait(BOUND)
            records = client.trace_drain()
        finally:
            client.trace_off()
        seen = sorted((r.layer_key.rpartition("@")[2], r.name) for r in records)
        assert seen == [("one", "d/early"), ("one", "d/late"), ("one", "d/late"), ("two", "d/late")]
        assert base.exists()
        # Detaching a view forgets what it recorded; the others are unaffected.
        assert client.detach("sha256-" + "a" * 64 + "@one")
        assert (two / "d/late").read_bytes() == LATE
