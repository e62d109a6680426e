"""Reads of files whose content has not arrived wait for that file only, and fail with EIO
after the timeout instead of hanging."""

from __future__ import annotations

import errno
import os
import threading
from pathlib import Path

import pytest

from benchmarks.services import wait_for
from starlight_core.layer.toc import Entry, EntryType
from tests.worker.fs.conftest import Server, running_server
from tests.worker.fs.layers import Layer, place, write_layer_dir

pytestmark = pytest.mark.e2e

# Joins and condition waits are bounded so a broken server fails the test instead of hanging
# it; none of these bounds is what a test asserts.
BOUND = 30.0


class Reader(threading.Thread):
    """Reads one whole file through the mount on a thread of its own."""

    def __init__(self, path: Path) -> None:
        super().__init__(daemon=True)
        self.path = path
        self.data: bytes | None = None
        self.error: OSError | None = None
        self.done = threading.Event()

    def run(self) -> None:
        try:
            with open(self.path, "rb") as f:
                self.data = f.read()
        except OSError as exc:
            self.error = exc
        finally:
            self.done.set()


def _layer(n_missing: int) -> Layer:
    items: list[Entry | tuple[Entry, bytes]] = [
        Entry("d", EntryType.DIR, mode=0o755),
        (Entry("d/present", EntryType.FILE), b"here from the start"),
        (Entry("d/other", EntryType.FILE), b"also here" * 5000),
    ]
    for i in range(n_missing):
        items.append((Entry(f"d/missing{i}", EntryType.FILE), f"late content {i}".encode() * 99))
    items.append(Entry("d/alias", EntryType.HARDLINK, linkname="d/missing0"))
    return Layer.of(*items)


def _waiting(server: Server, n: int) -> None:
    wait_for(lambda: server.client.ping().waiting == n, timeout=BOUND, what=f"{n} waiting reads")


def test_read_of_missing_file_waits_for_it_while_other_files_are_served(
    server: Server, tmp_path: Path
) -> None:
    layer = _layer(1)
    missing = [f"d/missing{i}" for i in range(1)]
    layer_dir = write_layer_dir(layer, tmp_path / "layer", withhold=missing)
    root = server.client.attach("wait-one", layer_dir)

    reader = Reader(root / "d/missing0")
    reader.start()
    _waiting(server, 1)
    # While it waits, other files of the same layer are read in full, and stat works.
    assert (root / "d/present").read_bytes() == b"here from the start"
    assert (root / "d/other").read_bytes() == b"also here" * 5000
    assert os.stat(root / "d/missing0").st_size == len(layer.contents["d/missing0"])
    assert not reader.done.is_set()

    place(layer_dir, "d/missing0", layer.contents["d/missing0"], links=["d/alias"])
    assert server.client.arrived("wait-one", ["d/missing0"]) == 1
    assert reader.done.wait(BOUND)
    assert reader.error is None
    assert reader.data == layer.contents["d/missing0"]
    assert (root / "d/alias").read_bytes() == layer.contents["d/missing0"]


def test_many_waiting_reads_do_not_starve_other_files(server: Server, tmp_path: Path) -> None:
    # More waiters than libfuse keeps idle threads (10) and than the kernel's background
    # request slots (12): neither may become a shared bottleneck.
    n = 16
    layer = _layer(n)
    missing = [f"d/missing{i}" for i in range(n)]
    layer_dir = write_layer_dir(layer, tmp_path / "layer", withhold=missing)
    root = server.client.attach("wait-many", layer_dir)

    readers = [Reader(root / name) for name in missing]
    for reader in readers:
        reader.start()
    _waiting(server, n)
    present = Reader(root / "d/other")
    present.start()
    assert present.done.wait(BOUND), "a present file waited behind missing ones"
    assert present.data == b"also here" * 5000
    assert not any(r.done.is_set() for r in readers)

    # Arrivals in reverse order: each reader wakes for its own file.
    for name in reversed(missing):
        place(layer_dir, name, layer.contents[name])
        server.client.arrived("wait-many", [name])
    for reader, name in zip(readers, missing, strict=True):
        assert reader.done.wait(BOUND)
        assert reader.error is None
        assert reader.data == layer.contents[name]


def test_unannounced_arrival_is_found_by_the_periodic_recheck(
    server: Server, tmp_path: Path
) -> None:
    layer = _layer(1)
    layer_dir = write_layer_dir(layer, tmp_path / "layer", withhold=["d/missing0"])
    root = server.client.attach("wait-quiet", layer_dir)
    reader = Reader(root / "d/missing0")
    reader.start()
    _waiting(server, 1)
    # The daemon placed the file and died before it could say so.
    place(layer_dir, "d/missing0", layer.contents["d/missing0"])
    assert reader.done.wait(BOUND)
    assert reader.data == layer.contents["d/missing0"]


def test_detach_fails_waiting_reads(server: Server, tmp_path: Path) -> None:
    layer = _layer(1)
    layer_dir = write_layer_dir(layer, tmp_path / "layer", withhold=["d/missing0"])
    root = server.client.attach("wait-detach", layer_dir)
    reader = Reader(root / "d/missing0")
    reader.start()
    _waiting(server, 1)
    assert server.client.detach("wait-detach") is True
    assert reader.done.wait(BOUND)
    assert reader.error is not None
    assert reader.error.errno == errno.EIO
    assert "wait-detach" not in os.listdir(server.mountpoint)
    assert server.client.detach("wait-detach") is False


def test_missing_file_that_never_arrives_fails_with_eio(tmp_path: Path) -> None:
    with running_server(tmp_path / "srv", timeout=0.5, poll=0.1) as server:
        layer = _layer(1)
        layer_dir = write_layer_dir(layer, tmp_path / "layer", withhold=["d/missing0"])
        root = server.client.attach("never", layer_dir)
        with pytest.raises(OSError) as excinfo:
            (root / "d/missing0").read_bytes()
        assert excinfo.value.errno == errno.EIO
        assert "'d/missing0'" in server.log
        assert "did not arrive" in server.log
        # The failure is not sticky: once the content is there, it reads.
        place(layer_dir, "d/missing0", layer.contents["d/missing0"])
        wait_for(
            lambda: (root / "d/missing0").read_bytes() == layer.contents["d/missing0"],
            timeout=BOUND,
            what="read after arrival",
        )
