"""What the store records beside the trees: images (with their local share), pulls to resume,
the schema version. No root needed: no layer is built here except where marked."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import pytest

from starlight_core.digest import sha256_digest
from starlight_core.errors import FailedPrecondition, ImageNotFound, InvalidInput, NotFound
from starlight_core.platform import Platform
from starlight_worker.store import PullState, Store, layer_key
from starlight_worker.store.store import layer_diff_id
from tests.worker.store.support import entries_layer, file_entry, fill, place_bytes

KEY_A = layer_key(sha256_digest(b"layer a"))
KEY_B = layer_key(sha256_digest(b"layer b"))


def test_a_layer_key_gives_back_its_diff_id() -> None:
    assert layer_diff_id(KEY_A) == sha256_digest(b"layer a")
    with pytest.raises(InvalidInput, match="invalid layer key"):
        layer_diff_id("sha256:" + "0" * 64)


def record(store: Store, reference: str, layers: list[str], namespace: str = "default") -> None:
    store.record_image(
        reference=reference,
        manifest_digest=sha256_digest(reference.encode()),
        config_digest=sha256_digest(b"config " + reference.encode()),
        platform=Platform.parse("linux/arm64/v8"),
        namespace=namespace,
        layers=layers,
        manifest=b'{"manifest": true}',
        config=b'{"config": true}',
    )


def test_layer_keys() -> None:
    digest = sha256_digest(b"x")
    assert layer_key(digest) == f"sha256-{digest.hex}"
    with pytest.raises(InvalidInput):
        layer_key("sha256:nothex")


def test_images_newest_first_and_completion(store: Store) -> None:
    record(store, "example.com/a:1", [KEY_A])
    time.sleep(0.002)
    record(store, "example.com/b:1", [KEY_A, KEY_B], namespace="k8s.io")
    images = store.images()
    assert [i.reference for i in images] == ["example.com/b:1", "example.com/a:1"]
    b = images[0]
    assert b.namespace == "k8s.io"
    assert b.layers == (KEY_A, KEY_B)
    assert b.platform == str(Platform.parse("linux/arm64/v8")) == "linux/arm64"
    assert b.manifest == b'{"manifest": true}'
    assert b.config == b'{"config": true}'
    assert not b.complete
    assert b.completed_at is None
    assert abs(b.pulled_at - time.time()) < 60
    store.mark_image_complete("example.com/b:1")
    image = store.image("example.com/b:1")
    assert image is not None
    assert image.complete
    assert image.completed_at is not None
    assert store.image("example.com/b:1", namespace="default") is None
    with pytest.raises(ImageNotFound):
        store.mark_image_complete("example.com/nope:1")
    # Recording again (a new pull of the same reference) starts it over.
    record(store, "example.com/b:1", [KEY_B], namespace="k8s.io")
    image = store.image("example.com/b:1")
    assert image is not None
    assert not image.complete
    assert image.layers == (KEY_B,)
    assert store.unused_layers() == []  # no layer in the store at all
    assert store.remove_image("example.com/a:1")
    assert not store.remove_image("example.com/a:1")
    assert [i.reference for i in store.images()] == ["example.com/b:1"]
    with pytest.raises(InvalidInput):
        record(store, "example.com/c:1", ["../../etc"])


@pytest.mark.e2e
def test_images_count_what_is_local(store: Store) -> None:
    one = entries_layer(file_entry("a", b"aaaa"), file_entry("b", b"bb"), salt="one")
    two = entries_layer(file_entry("c", b"c" * 10), salt="two")
    fill(store, one)
    handle = store.begin_layer(two.toc)
    record(store, "example.com/app:1", [one.key, two.key])
    image = store.image("example.com/app:1")
    assert image is not None
    assert (image.files_total, image.files_local) == (3, 2)
    assert (image.bytes_total, image.bytes_local) == (16, 6)
    place_bytes(store, handle, sha256_digest(b"c" * 10), b"c" * 10)
    image = store.image("example.com/app:1")
    assert image is not None
    assert (image.files_local, image.bytes_local) == (3, 16)
    assert store.layer_counts() == (2, 1)
    handle.finalize()
    assert store.layer_counts() == (2, 2)
    record(store, "example.com/other:1", [two.key])
    store.remove_image("example.com/app:1")
    assert store.unused_layers() == [one.key]


def test_pulls_survive_a_restart(store_root: Path) -> None:
    with Store(store_root) as store:
        pull = store.start_pull("example.com/a:1", namespace="default")
        assert pull.state is PullState.RUNNING
        assert pull.bundle_id == ""
        store.update_pull(pull.id, bundle_id="b-123", header=b"HEADER", header_size=6)
        store.update_pull(pull.id, offset=4096, bytes_received=5000)
        done = store.start_pull("example.com/b:1", namespace="k8s.io", bundle_id="b-9")
        store.finish_pull(done.id)
        failed = store.start_pull("example.com/c:1", namespace="default")
        store.finish_pull(failed.id, error="proxy unavailable")
        with pytest.raises(NotFound):
            store.update_pull(999, offset=1)
    with Store(store_root) as store:
        (interrupted,) = store.pulls(PullState.RUNNING)
        assert interrupted.id == pull.id
        assert (interrupted.bundle_id, interrupted.header, interrupted.header_size) == (
            "b-123", b"HEADER", 6,
        )  # fmt: skip
        assert (interrupted.offset, interrupted.bytes_received) == (4096, 5000)
        assert interrupted.finished_at is None
        assert [p.reference for p in store.pulls()] == [
            "example.com/c:1", "example.com/b:1", "example.com/a:1",
        ]  # fmt: skip
        (bad,) = store.pulls(PullState.FAILED)
        assert bad.error == "proxy unavailable"
        assert bad.finished_at is not None
        assert store.pull(done.id).state is PullState.DONE
        assert store.forget_pulls(older_than=3600) == 0
        assert store.forget_pulls(older_than=-1) == 2
        assert [p.id for p in store.pulls()] == [pull.id]


def test_a_newer_schema_is_refused(store_root: Path) -> None:
    Store(store_root).close()
    db = sqlite3.connect(store_root / "store.db")
    db.execute("PRAGMA user_version = 99")
    db.commit()
    db.close()
    with pytest.raises(FailedPrecondition, match="schema version 99"):
        Store(store_root)
    # And the failed open released the store.
    db = sqlite3.connect(store_root / "store.db")
    db.execute("PRAGMA user_version = 1")
    db.commit()
    db.close()
    Store(store_root).close()
