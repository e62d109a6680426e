"""Conformance suite of the metadata store: every test runs on SQLite and on PostgreSQL.

Like stargz's ``metadata/testutil``: one behaviour, asserted the same way on each back end.
"""

from __future__ import annotations

import json
import math
import os
import sqlite3
import subprocess
import sys
import textwrap
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

import anyio
import pytest

from benchmarks.services import free_port
from starlight_core.digest import EMPTY_SHA256, Digest, sha256_digest
from starlight_core.errors import (
    FailedPrecondition,
    ImageNotFound,
    InvalidInput,
    NotFound,
    StarlightError,
)
from starlight_core.layer.toc import TOC, Chunk, Entry, EntryType, LayerInfo
from starlight_core.platform import Platform
from starlight_proxy.store import (
    SCHEMA_VERSION,
    ImageRecord,
    ImageState,
    MetadataStore,
    SQLMetadataStore,
    open_store,
)

pytestmark = pytest.mark.anyio

NAME = "127.0.0.1:5000/app"
OTHER = "127.0.0.1:5000/other"
AMD64 = Platform.parse("linux/amd64")
ARM64 = Platform.parse("linux/arm64")
LAYER_MEDIA_TYPE = "application/vnd.oci.image.layer.v1.tar+gzip"
MANIFEST_MEDIA_TYPE = "application/vnd.oci.image.manifest.v1+json"
MiB = 1024 * 1024


# --- building test images ------------------------------------------------------------------


def digest_of(text: str) -> Digest:
    return sha256_digest(text.encode())


def file_entry(name: str, content: str, *, offset: int = 0) -> Entry:
    data = content.encode()
    digest = sha256_digest(data)
    chunks = (Chunk(0, len(data), offset + 10, len(data) + 20, digest),) if data else ()
    return Entry(name, EntryType.FILE, size=len(data), digest=digest, offset=offset, chunks=chunks)


def make_toc(label: str, entries: Sequence[Entry], *, chunk_size: int = 4 * MiB) -> TOC:
    info = LayerInfo(
        digest=digest_of(f"layer:{label}"),
        size=1000 + len(label),
        diff_id=digest_of(f"diff:{label}"),
        media_type=LAYER_MEDIA_TYPE,
    )
    return TOC(layer=info, entries=tuple(entries), chunk_size=chunk_size)


def manifest_for(tocs: Sequence[TOC], platform: Platform, label: str) -> bytes:
    return json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": MANIFEST_MEDIA_TYPE,
            "config": {"digest": str(digest_of(f"config:{label}:{platform}"))},
            "layers": [str(t.layer.digest) for t in tocs],
        },
        sort_keys=True,
    ).encode()


async def index_image(
    store: MetadataStore,
    tocs: Sequence[TOC],
    *,
    name: str = NAME,
    tag: str | None = "latest",
    platform: Platform = AMD64,
    label: str = "",
    index_digest: Digest | None = None,
) -> ImageRecord:
    """Index an image the way the proxy's notify handler does."""
    manifest = manifest_for(tocs, platform, label)
    config = json.dumps({"label": label, "platform": str(platform)}).encode()
    claim = await store.begin_indexing(name, sha256_digest(manifest), platform)
    assert claim is not None
    known = await store.known_layers(t.layer.digest for t in tocs)
    for toc in tocs:
        if toc.layer.digest not in known:
            await store.put_layer(toc)
    return await store.finish_indexing(
        claim,
        manifest=manifest,
        manifest_media_type=MANIFEST_MEDIA_TYPE,
        config=config,
        config_digest=sha256_digest(config),
        layers=[t.layer.digest for t in tocs],
        index_digest=index_digest,
        tag=tag,
    )


def every_kind_of_entry() -> tuple[Entry, ...]:
    """One of each entry type, and every field away from its default somewhere."""
    big = digest_of("big file")
    return (
        Entry("etc", EntryType.DIR, mode=0o755, mtime_ns=1_700_000_000_123_456_789),
        Entry(
            "etc/passwd",
            EntryType.FILE,
            mode=0o644,
            uname="root",
            gname="root",
            mtime_ns=1_700_000_001_000_000_001,
            size=5,
            digest=digest_of("root\n"),
            offset=1536,
            chunks=(Chunk(0, 5, 100, 25, digest_of("root\n")),),
        ),
        # Several chunks: only these pay for the JSON column.
        Entry(
            "usr/bin/big",
            EntryType.FILE,
            mode=0o4755,
            size=10 * MiB,
            digest=big,
            offset=4096,
            chunks=(
                Chunk(0, 4 * MiB, 2000, 3000, digest_of("c1")),
                Chunk(4 * MiB, 4 * MiB, 5000, 3000, digest_of("c2")),
                Chunk(8 * MiB, 2 * MiB, 8000, 1500, digest_of("c3")),
            ),
        ),
        # One chunk that is not the whole file: must not be mistaken for the compact case.
        Entry(
            "usr/lib/partial",
            EntryType.FILE,
            size=8,
            digest=digest_of("partial"),
            chunks=(Chunk(0, 4, 9000, 30, digest_of("half")),),
        ),
        Entry("empty", EntryType.FILE, size=0, digest=EMPTY_SHA256),
        Entry("no-digest-yet", EntryType.FILE, size=0),
        Entry("usr/bin/sh", EntryType.SYMLINK, mode=0o777, linkname="busybox"),
        Entry("usr/bin/big-link", EntryType.HARDLINK, linkname="usr/bin/big", digest=big),
        Entry("dev/null", EntryType.CHAR, mode=0o666, devmajor=1, devminor=3),
        Entry("dev/sda", EntryType.BLOCK, mode=0o660, gid=6, devmajor=8, devminor=0),
        Entry("run/fifo", EntryType.FIFO, mode=0o600),
        Entry("var/.wh.gone", EntryType.WHITEOUT),
        Entry("opt/.wh..wh..opq", EntryType.OPAQUE),
        Entry(
            "opt",
            EntryType.DIR,
            mode=0o1777,
            xattrs={"trusted.overlay.opaque": b"y"},
        ),
        # Bytes that are not UTF-8 stay surrogate-escaped, in names and owners alike.
        Entry(
            "caf\udce9/\udcff-latin1",
            EntryType.FILE,
            uname="us\udce9r",
            gname="gr\udcf6up",
            size=3,
            digest=digest_of("abc"),
            chunks=(Chunk(0, 3, 9100, 23, digest_of("abc")),),
        ),
        Entry("caf\udce9/link", EntryType.SYMLINK, linkname="../\udcff-target"),
        Entry(
            "bin/ping",
            EntryType.FILE,
            mode=0o755,
            size=4,
            digest=digest_of("ping"),
            chunks=(Chunk(0, 4, 9200, 24, digest_of("ping")),),
            xattrs={
                "security.capability": b"\x01\x00\x00\x02\x00\x20\x00\x00" + bytes(12),
                "user.empty": b"",
                "user.binary": bytes(range(256)),
                "user.n\udce4me": b"\xff\xfe\x00",
            },
        ),
        Entry("ids", EntryType.DIR, uid=2**32 - 2, gid=2**31, mtime_ns=-1_000_000_000),
        # Characters COPY's text format must escape.
        Entry(
            "odd/tab\there\nnewline\\backslash,comma",
            EntryType.SYMLINK,
            linkname="tab\t\\n",
        ),
    )


# --- schema and migrations -----------------------------------------------------------------


def raw_execute(location: str, statement: str) -> None:
    """Run SQL on the store's database behind its back (sqlite3 or psycopg)."""
    if location.startswith("postgresql://"):
        import psycopg

        with psycopg.connect(location, autocommit=True) as conn:
            conn.execute(statement)
    else:
        with sqlite3.connect(location) as conn:
            conn.execute(statement)


async def test_fresh_store_is_migrated(store: SQLMetadataStore) -> None:
    assert await store.schema_versions() == list(range(1, SCHEMA_VERSION + 1))
    assert await store.list_images() == []


async def test_reopening_keeps_data_and_migrates_nothing(store_location: str) -> None:
    async with await open_store(store_location) as first:
        image = await index_image(first, [make_toc("a", [file_entry("a", "a")])])
    async with await open_store(store_location) as second:
        assert await second.schema_versions() == list(range(1, SCHEMA_VERSION + 1))
        assert await second.get_image(image.id) == image
        assert (await second.migrate()) == SCHEMA_VERSION


async def test_concurrent_opens_migrate_once(store_location: str) -> None:
    stores: list[SQLMetadataStore] = []

    async def open_one() -> None:
        stores.append(await open_store(store_location))

    async with anyio.create_task_group() as tg:
        for _ in range(4):
            tg.start_soon(open_one)
    try:
        for opened in stores:
            assert await opened.schema_versions() == list(range(1, SCHEMA_VERSION + 1))
    finally:
        for opened in stores:
            await opened.close()


async def test_newer_schema_is_refused(store: SQLMetadataStore, store_location: str) -> None:
    future = SCHEMA_VERSION + 1
    raw_execute(
        store_location,
        f"INSERT INTO schema_migrations (version, description, applied_at)"
        f" VALUES ({future}, 'from the future', 0)",
    )
    with pytest.raises(FailedPrecondition, match="newer"):
        await open_store(store_location)


# Runs in child processes: wait for the signal, open the store (migrating a fresh database)
# and race for one claim. Prints "claimed" or "busy".
_RACER = textwrap.dedent(
    """
    import os, sys, time
    import anyio
    from starlight_core.digest import sha256_digest
    from starlight_core.platform import Platform
    from starlight_proxy.store import open_store

    location, go = sys.argv[1], sys.argv[2]
    print("ready", flush=True)
    while not os.path.exists(go):
        time.sleep(0.005)

    async def main():
        async with await open_store(location) as store:
            claim = await store.begin_indexing(
                "127.0.0.1:5000/app", sha256_digest(b"manifest"), Platform.parse("linux/amd64")
            )
            print("claimed" if claim else "busy", flush=True)

    anyio.run(main)
    """
)


def race_processes(location: str, workdir: Path, count: int) -> list[str]:
    go = workdir / "go"
    children = [
        subprocess.Popen(
            [sys.executable, "-c", _RACER, location, str(go)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(count)
    ]
    try:
        for child in children:
            assert child.stdout is not None
            assert child.stdout.readline().strip() == "ready"
        go.touch()
        results = []
        for child in children:
            out, err = child.communicate(timeout=120)
            assert child.returncode == 0, err
            results.append(out.strip())
        return results
    finally:
        for child in children:
            if child.poll() is None:
                child.kill()
                child.wait()


async def test_processes_starting_together_migrate_once_and_claim_once(
    store_location: str, tmp_path: Path
) -> None:
    results = await anyio.to_thread.run_sync(race_processes, store_location, tmp_path, 3)
    assert sorted(results) == ["busy", "busy", "claimed"]
    async with await open_store(store_location) as store:
        assert await store.schema_versions() == list(range(1, SCHEMA_VERSION + 1))
        [image] = await store.list_images()
        assert image.state is ImageState.INDEXING


# --- TOC round trips -----------------------------------------------------------------------


async def test_toc_round_trip_of_every_entry_kind(store: SQLMetadataStore) -> None:
    toc = make_toc("every", every_kind_of_entry(), chunk_size=1 * MiB)
    layer = await store.put_layer(toc)
    assert layer.digest == toc.layer.digest
    assert layer.diff_id == toc.layer.diff_id
    assert layer.size == toc.layer.size
    assert layer.media_type == LAYER_MEDIA_TYPE
    assert layer.chunk_size == 1 * MiB
    assert layer.entry_count == len(toc.entries)
    assert await store.get_toc(toc.layer.digest) == toc

    image = await index_image(store, [toc])
    metadata = await store.load_image(image.id)
    assert metadata.tocs == (toc,)
    # Entry by entry too, so that a failure names the field that came back wrong.
    for stored, original in zip(metadata.tocs[0].entries, toc.entries, strict=True):
        assert stored == original
        assert dict(stored.xattrs) == dict(original.xattrs)


async def test_load_image_gives_manifest_config_and_tocs_in_layer_order(
    store: SQLMetadataStore,
) -> None:
    base = make_toc("base", [file_entry("bin/sh", "shell"), Entry("etc", EntryType.DIR)])
    app = make_toc("app", [file_entry("app/main", "main"), Entry("etc/.wh.x", EntryType.WHITEOUT)])
    # The same blob twice in one manifest is legal (an empty layer repeated).
    image = await index_image(store, [base, app, base], label="ordered")
    metadata = await store.load_image(image.id)
    assert metadata.image == image
    assert metadata.tocs == (base, app, base)
    assert metadata.manifest == manifest_for([base, app, base], AMD64, "ordered")
    assert json.loads(metadata.config) == {"label": "ordered", "platform": "linux/amd64"}
    assert image.config_digest == sha256_digest(metadata.config)
    assert image.manifest_media_type == MANIFEST_MEDIA_TYPE


async def test_large_layer_round_trip(store: SQLMetadataStore) -> None:
    # Big enough to cross COPY's batching and the decoder's GC pause; the 100k case is a
    # benchmark (benchmarks/micro/test_store_bench.py).
    entries = [
        file_entry(f"usr/share/doc/pkg{i // 100}/file{i}", f"content {i}") for i in range(20_000)
    ]
    toc = make_toc("large", entries)
    image = await index_image(store, [toc])
    assert (await store.load_image(image.id)).tocs == (toc,)


async def test_put_layer_is_idempotent_and_layers_are_shared(store: SQLMetadataStore) -> None:
    shared = make_toc("shared", [file_entry("lib/libc.so", "libc")])
    first = await store.put_layer(shared)
    again = await store.put_layer(shared)
    assert again == first
    assert await store.get_toc(shared.layer.digest) == shared

    one = await index_image(store, [shared, make_toc("one", [file_entry("one", "1")])], label="1")
    two = await index_image(
        store, [shared, make_toc("two", [file_entry("two", "2")])], name=OTHER, label="2"
    )
    assert (await store.load_image(one.id)).tocs[0] == shared
    assert (await store.load_image(two.id)).tocs[0] == shared
    assert await store.known_layers([shared.layer.digest, digest_of("unknown")]) == {
        shared.layer.digest
    }
    assert await store.known_layers([]) == frozenset()


async def test_get_toc_of_unknown_layer(store: SQLMetadataStore) -> None:
    with pytest.raises(NotFound):
        await store.get_toc(digest_of("nothing"))


async def test_put_layer_rejects_unstorable_names_and_stores_nothing(
    store: SQLMetadataStore,
) -> None:
    # A lone high surrogate cannot come from a tar header's bytes.
    toc = make_toc("bad", [file_entry("fine", "x"), Entry("bad\ud800", EntryType.DIR)])
    with pytest.raises(InvalidInput):
        await store.put_layer(toc)
    assert await store.known_layers([toc.layer.digest]) == frozenset()


# --- which contents the worker holds -------------------------------------------------------


async def test_shared_contents_across_layers_and_images(store: SQLMetadataStore) -> None:
    # A1 = [base, a1-app]; A2 = [a2-only]; B = [base, b-app, b-more].
    base = make_toc("base", [file_entry("bin/sh", "sh"), file_entry("bin/ls", "ls")])
    a1_app = make_toc("a1", [file_entry("app/old", "old"), file_entry("app/lib", "lib")])
    a2 = make_toc("a2", [file_entry("srv/data", "data"), Entry("srv", EntryType.DIR)])
    b_app = make_toc(
        "b",
        [
            file_entry("app/new", "new"),
            file_entry("app/lib-renamed", "lib"),  # same content as A1's app/lib
            file_entry("app/lib-copy", "lib"),  # twice in B: reported once
            file_entry("app/empty", ""),
            Entry("app", EntryType.DIR),
            Entry("app/link", EntryType.SYMLINK, linkname="new"),
        ],
    )
    b_more = make_toc("b-more", [file_entry("var/data", "data"), file_entry("var/new", "new2")])
    a1 = await index_image(store, [base, a1_app], tag="v1", label="a1")
    a2_image = await index_image(store, [a2], name=OTHER, label="a2")
    b = await index_image(store, [base, b_app, b_more], tag="v2", label="b")

    everything_of_b = {e.digest for t in (base, b_app, b_more) for e in t.entries if e.digest}
    expected = {digest_of("sh"), digest_of("ls"), digest_of("lib"), digest_of("data")}
    assert await store.shared_contents(b.id, [a1.id, a2_image.id]) == expected
    assert await store.shared_contents(b.id, [a1.id]) == {
        digest_of("sh"),
        digest_of("ls"),
        digest_of("lib"),
    }
    assert await store.shared_contents(b.id, [a2_image.id]) == {digest_of("data")}
    assert await store.shared_contents(b.id, []) == frozenset()
    # Unknown holders are ignored; an image holds all of itself.
    assert await store.shared_contents(b.id, [a2_image.id, 99_999]) == {digest_of("data")}
    assert await store.shared_contents(b.id, [b.id]) == everything_of_b
    with pytest.raises(ImageNotFound):
        await store.shared_contents(99_999, [a1.id])


# --- tags, digests and platforms -----------------------------------------------------------


async def test_tag_moves_to_the_newly_notified_digest(store: SQLMetadataStore) -> None:
    first = await index_image(store, [make_toc("v1", [file_entry("a", "1")])], label="1")
    assert first.tags == ("latest",)
    assert first.state is ImageState.READY
    second = await index_image(store, [make_toc("v2", [file_entry("a", "2")])], label="2")
    assert second.digest != first.digest
    assert (await store.find_image(NAME, tag="latest", platform=AMD64)).id == second.id
    assert (await store.get_image(first.id)).tags == ()
    assert (await store.get_image(second.id)).tags == ("latest",)
    # Both stay addressable by digest; a ready image is tagged without re-indexing.
    assert (await store.find_image(NAME, digest=first.digest)).id == first.id
    assert await store.begin_indexing(NAME, first.digest, AMD64) is None
    retagged = await store.tag_image(first.id, "latest")
    assert retagged.tags == ("latest",)
    stable = await store.tag_image(first.id, "stable")
    assert stable.tags == ("latest", "stable")
    assert (await store.get_image(second.id)).tags == ()


async def test_platforms_of_one_index(store: SQLMetadataStore) -> None:
    index = digest_of("index")
    layer = make_toc("multi", [file_entry("bin/tool", "tool")])
    amd = await index_image(store, [layer], platform=AMD64, index_digest=index)
    arm = await index_image(store, [layer], platform=ARM64, index_digest=index)
    assert amd.digest != arm.digest
    assert amd.index_digest == index
    assert arm.platform == ARM64
    assert (await store.find_image(NAME, tag="latest", platform=AMD64)).id == amd.id
    assert (await store.find_image(NAME, tag="latest", platform=ARM64)).id == arm.id
    # aarch64 is arm64: platforms are matched normalised.
    aarch64 = Platform.create("linux", "aarch64")
    assert (await store.find_image(NAME, tag="latest", platform=aarch64)).id == arm.id
    # By index digest, the platform picks the manifest.
    assert (await store.find_image(NAME, digest=index, platform=ARM64)).id == arm.id
    with pytest.raises(InvalidInput, match="several platforms"):
        await store.find_image(NAME, digest=index)
    # By manifest digest, the platform is implied, and must agree when given.
    assert (await store.find_image(NAME, digest=amd.digest)).id == amd.id
    assert (await store.find_image(NAME, digest=amd.digest, platform=AMD64)).id == amd.id
    with pytest.raises(ImageNotFound):
        await store.find_image(NAME, digest=amd.digest, platform=ARM64)
    with pytest.raises(ImageNotFound):
        await store.find_image(NAME, tag="latest", platform=Platform.parse("linux/s390x"))
    with pytest.raises(ImageNotFound):
        await store.find_image(OTHER, digest=amd.digest)


async def test_lookups_reject_bad_arguments(store: SQLMetadataStore) -> None:
    digest = digest_of("x")
    with pytest.raises(InvalidInput, match="platform"):
        await store.find_image(NAME, tag="latest")
    with pytest.raises(InvalidInput, match="exactly one"):
        await store.find_image(NAME, tag="latest", digest=digest, platform=AMD64)
    with pytest.raises(InvalidInput, match="exactly one"):
        await store.find_image(NAME, platform=AMD64)
    for bad_name in ("app", "docker.io/library/app:latest", "127.0.0.1:5000/App", ""):
        with pytest.raises(InvalidInput):
            await store.find_image(bad_name, digest=digest)
        with pytest.raises(InvalidInput):
            await store.begin_indexing(bad_name, digest, AMD64)
    with pytest.raises(InvalidInput):
        await store.find_image(NAME, tag="bad tag", platform=AMD64)
    with pytest.raises(InvalidInput):
        await store.begin_indexing(NAME, "sha256:nope", AMD64)  # type: ignore[arg-type]
    with pytest.raises(InvalidInput):
        await store.begin_indexing(NAME, digest, "linux/amd64")  # type: ignore[arg-type]
    with pytest.raises(InvalidInput):
        await store.begin_indexing(NAME, digest, AMD64, stale_after=-1)


async def test_unknown_images(store: SQLMetadataStore) -> None:
    calls: list[Callable[[], Awaitable[object]]] = [
        lambda: store.get_image(12345),
        lambda: store.load_image(12345),
        lambda: store.delete_image(12345),
        lambda: store.tag_image(12345, "latest"),
        lambda: store.replace_ranks(12345, {"a": 1.0}),
        lambda: store.add_trace("t", 12345, b"{}"),
        lambda: store.find_image(NAME, tag="latest", platform=AMD64),
        lambda: store.find_image(NAME, digest=digest_of("absent")),
    ]
    for call in calls:
        with pytest.raises(ImageNotFound) as caught:
            await call()
        assert caught.value.http_status == 404


async def test_list_and_delete_images(store: SQLMetadataStore) -> None:
    layer = make_toc("l", [file_entry("f", "f")])
    own = make_toc("own", [file_entry("g", "g")])
    first = await index_image(store, [layer], name=OTHER, label="1")
    second = await index_image(store, [layer, own], name=NAME, label="2")
    third = await index_image(store, [layer], name=NAME, tag="old", label="3")
    assert [i.id for i in await store.list_images()] == [second.id, third.id, first.id]
    assert [i.id for i in await store.list_images(name=OTHER)] == [first.id]
    assert await store.list_images(name="127.0.0.1:5000/none") == []
    await store.replace_ranks(second.id, {"f": 1})
    await store.add_trace("trace-1", second.id, b"{}")

    await store.delete_image(second.id)
    with pytest.raises(ImageNotFound):
        await store.get_image(second.id)
    with pytest.raises(ImageNotFound):
        await store.delete_image(second.id)
    assert [i.id for i in await store.list_images()] == [third.id, first.id]
    assert (await store.find_image(NAME, tag="old", platform=AMD64)).id == third.id
    with pytest.raises(ImageNotFound):
        await store.find_image(NAME, tag="latest", platform=AMD64)
    # Its trace id is free again; its layers stay until pruned, and only unused ones go.
    assert await store.add_trace("trace-1", third.id, b"{}")
    assert await store.known_layers([layer.layer.digest, own.layer.digest]) == {
        layer.layer.digest,
        own.layer.digest,
    }
    assert await store.prune_layers(older_than=3600) == 0
    assert await store.prune_layers(older_than=0) == 1
    assert await store.known_layers([layer.layer.digest, own.layer.digest]) == {layer.layer.digest}
    assert (await store.load_image(third.id)).tocs == (layer,)


# --- claims --------------------------------------------------------------------------------


async def test_claim_lifecycle(store: SQLMetadataStore) -> None:
    digest = digest_of("manifest")
    claim = await store.begin_indexing(NAME, digest, AMD64)
    assert claim is not None
    assert (claim.name, claim.digest, claim.platform) == (NAME, digest, AMD64)
    # Claimed: nobody else starts, the image is visible as indexing but cannot be loaded.
    assert await store.begin_indexing(NAME, digest, AMD64) is None
    indexing = await store.find_image(NAME, digest=digest)
    assert indexing.state is ImageState.INDEXING
    assert not indexing.ready
    with pytest.raises(FailedPrecondition):
        await store.load_image(claim.image_id)
    with pytest.raises(FailedPrecondition):
        await store.tag_image(claim.image_id, "latest")
    assert await store.refresh_claim(claim)

    # A missing layer leaves the claim in place, so the caller can still fail or finish.
    with pytest.raises(InvalidInput, match="no TOC"):
        await store.finish_indexing(
            claim,
            manifest=b"{}",
            manifest_media_type=MANIFEST_MEDIA_TYPE,
            config=b"{}",
            config_digest=sha256_digest(b"{}"),
            layers=[digest_of("never stored")],
        )
    assert (await store.get_image(claim.image_id)).state is ImageState.INDEXING

    assert await store.fail_indexing(claim, "registry said 500\x00 (boom)")
    failed = await store.get_image(claim.image_id)
    assert failed.state is ImageState.FAILED
    assert failed.error is not None
    assert "registry said 500" in failed.error
    assert "boom" in failed.error
    assert await store.fail_indexing(claim, "again") is False

    # A failed image is claimed again by the next notify, and finishes.
    retry = await store.begin_indexing(NAME, digest, AMD64)
    assert retry is not None
    assert retry.image_id == claim.image_id
    assert retry.token != claim.token
    toc = make_toc("retry", [file_entry("a", "a")])
    await store.put_layer(toc)
    ready = await store.finish_indexing(
        retry,
        manifest=b"{}",
        manifest_media_type=MANIFEST_MEDIA_TYPE,
        config=b"{}",
        config_digest=sha256_digest(b"{}"),
        layers=[toc.layer.digest],
        tag="latest",
    )
    assert ready.state is ImageState.READY
    assert ready.error is None
    assert ready.tags == ("latest",)
    # Ready: nobody claims it again.
    assert await store.begin_indexing(NAME, digest, AMD64) is None
    assert await store.begin_indexing(NAME, digest, AMD64, stale_after=0) is None


async def test_stale_claim_is_taken_over(store: SQLMetadataStore) -> None:
    digest = digest_of("manifest")
    dead = await store.begin_indexing(NAME, digest, AMD64)
    assert dead is not None
    assert await store.begin_indexing(NAME, digest, AMD64, stale_after=3600) is None
    # stale_after=0: every existing claim counts as stale (its proxy is presumed dead).
    alive = await store.begin_indexing(NAME, digest, AMD64, stale_after=0)
    assert alive is not None
    assert alive.image_id == dead.image_id
    toc = make_toc("t", [file_entry("a", "a")])
    await store.put_layer(toc)
    arguments = {
        "manifest": b"{}",
        "manifest_media_type": MANIFEST_MEDIA_TYPE,
        "config": b"{}",
        "config_digest": sha256_digest(b"{}"),
        "layers": [toc.layer.digest],
    }
    # The old owner wakes up: it can neither finish, fail, nor refresh.
    with pytest.raises(FailedPrecondition, match="lost the claim"):
        await store.finish_indexing(dead, **arguments, tag="dead")  # type: ignore[arg-type]
    assert await store.fail_indexing(dead, "late failure") is False
    assert await store.refresh_claim(dead) is False
    image = await store.get_image(alive.image_id)
    assert image.state is ImageState.INDEXING
    assert image.tags == ()
    finished = await store.finish_indexing(alive, **arguments)  # type: ignore[arg-type]
    assert finished.state is ImageState.READY


async def test_concurrent_claims_in_one_and_several_stores(
    store: SQLMetadataStore, store_location: str
) -> None:
    async with await open_store(store_location) as other:
        stores = [store, other]
        claims = []

        async def claim(index: int, digest: Digest) -> None:
            claims.append(await stores[index % 2].begin_indexing(NAME, digest, AMD64))

        for label in ("one", "two"):
            claims.clear()
            async with anyio.create_task_group() as tg:
                for index in range(8):
                    tg.start_soon(claim, index, digest_of(label))
            winners = [c for c in claims if c is not None]
            assert len(claims) == 8
            assert len(winners) == 1
    assert len(await store.list_images()) == 2


async def test_concurrent_indexing_of_images_sharing_new_layers(store_location: str) -> None:
    # Two proxies index two images that share a layer neither has stored yet.
    shared = make_toc("shared", [file_entry(f"lib/{i}", f"lib {i}") for i in range(200)])
    async with await open_store(store_location) as one, await open_store(store_location) as two:
        results: dict[str, ImageRecord] = {}

        async def run(store: SQLMetadataStore, label: str) -> None:
            own = make_toc(label, [file_entry(label, label)])
            results[label] = await index_image(store, [shared, own], label=label, tag=label)

        async with anyio.create_task_group() as tg:
            tg.start_soon(run, one, "x")
            tg.start_soon(run, two, "y")
        for label, image in results.items():
            tocs = (await one.load_image(image.id)).tocs
            assert tocs[0] == shared
            assert tocs[1].entries[0].name == label


# --- ranks and traces ----------------------------------------------------------------------


async def test_ranks_are_replaced_whole(store: SQLMetadataStore) -> None:
    layer = make_toc("r", [file_entry("a", "a")])
    one = await index_image(store, [layer], label="1")
    two = await index_image(store, [layer], name=OTHER, label="2")
    await store.replace_ranks(one.id, {"bin/sh": 0, "etc/passwd": 1.5, "caf\udce9": 2})
    assert await store.get_ranks([one.id, two.id]) == {
        one.id: {"bin/sh": 0.0, "etc/passwd": 1.5, "caf\udce9": 2.0},
        two.id: {},
    }
    await store.replace_ranks(one.id, {"usr/bin/app": 0.25})
    assert await store.get_ranks([one.id]) == {one.id: {"usr/bin/app": 0.25}}
    # Group rankings are kept apart from the image's own.
    await store.replace_ranks(one.id, {"joint": 3.0}, group="web-stack")
    await store.replace_ranks(two.id, {"other": 1.0}, group="web-stack")
    assert await store.get_ranks([one.id, two.id], group="web-stack") == {
        one.id: {"joint": 3.0},
        two.id: {"other": 1.0},
    }
    assert await store.get_ranks([one.id]) == {one.id: {"usr/bin/app": 0.25}}
    await store.replace_ranks(one.id, {})
    assert await store.get_ranks([one.id]) == {one.id: {}}
    assert await store.get_ranks([]) == {}


async def test_bad_ranks_change_nothing(store: SQLMetadataStore) -> None:
    image = await index_image(store, [make_toc("r", [file_entry("a", "a")])])
    await store.replace_ranks(image.id, {"kept": 1.0})
    for bad in (math.nan, math.inf, "1", True):
        with pytest.raises(InvalidInput):
            await store.replace_ranks(image.id, {"new": 0.0, "bad": bad})  # type: ignore[dict-item]
    with pytest.raises(InvalidInput):
        await store.replace_ranks(image.id, {"a": 1.0}, group="bad\ngroup")
    assert await store.get_ranks([image.id]) == {image.id: {"kept": 1.0}}


async def test_concurrent_rank_replacements_do_not_mix(store: SQLMetadataStore) -> None:
    image = await index_image(store, [make_toc("r", [file_entry("a", "a")])])
    rankings = [{f"{label}/{i}": float(i) for i in range(500)} for label in ("x", "y", "z")]
    async with anyio.create_task_group() as tg:
        for ranking in rankings:
            tg.start_soon(store.replace_ranks, image.id, ranking)
    assert (await store.get_ranks([image.id]))[image.id] in rankings


async def test_traces_are_stored_once_per_id(store: SQLMetadataStore) -> None:
    layer = make_toc("t", [file_entry("a", "a")])
    image = await index_image(store, [layer])
    other = await index_image(store, [layer], name=OTHER)
    payload = json.dumps({"files": ["bin/sh", "etc/passwd"]}).encode()
    assert await store.add_trace("0001", image.id, payload) is True
    assert await store.add_trace("0001", image.id, b'{"retried": true}') is False
    assert await store.add_trace("0001", other.id, b"{}") is False
    assert await store.add_trace("0002", image.id, b"\x00binary\xff", group="web") is True
    traces = await store.list_traces(image.id)
    assert [(t.trace_id, t.group, t.payload) for t in traces] == [
        ("0001", "", payload),
        ("0002", "web", b"\x00binary\xff"),
    ]
    assert all(t.image_id == image.id and t.received_at > 0 for t in traces)
    assert [t.trace_id for t in await store.list_traces(image.id, group="web")] == ["0002"]
    assert await store.list_traces(other.id) == []
    for bad_id in ("", "x" * 300, "new\nline"):
        with pytest.raises(InvalidInput):
            await store.add_trace(bad_id, image.id, b"{}")


async def test_concurrent_uploads_of_one_trace(store: SQLMetadataStore) -> None:
    image = await index_image(store, [make_toc("t", [file_entry("a", "a")])])
    stored: list[bool] = []

    async def upload() -> None:
        stored.append(await store.add_trace("same", image.id, b"{}"))

    async with anyio.create_task_group() as tg:
        for _ in range(6):
            tg.start_soon(upload)
    assert sorted(stored) == [False] * 5 + [True]
    assert len(await store.list_traces(image.id)) == 1


# --- opening -------------------------------------------------------------------------------


async def test_open_store_rejects_bad_locations(tmp_path: Path) -> None:
    with pytest.raises(InvalidInput, match="unsupported"):
        await open_store("mysql://localhost/db")
    with pytest.raises(InvalidInput):
        await open_store(":memory:")
    with pytest.raises(InvalidInput):
        await open_store("")
    with pytest.raises(InvalidInput, match="does not exist"):
        await open_store(tmp_path / "missing" / "store.db")


async def test_open_store_accepts_sqlite_urls_and_paths(tmp_path: Path) -> None:
    async with await open_store(f"sqlite://{tmp_path}/a.db") as by_url:
        assert by_url.backend == "sqlite"
        await index_image(by_url, [make_toc("a", [file_entry("a", "a")])])
    async with await open_store(tmp_path / "a.db") as by_path:
        assert len(await by_path.list_images()) == 1
    assert (tmp_path / "a.db").exists()


async def test_unreachable_postgres_is_a_clear_error() -> None:
    url = f"postgresql://postgres@127.0.0.1:{free_port()}/starlight"
    with pytest.raises(StarlightError, match="metadata store") as caught:
        await open_store(url, timeout=1.0)
    assert "127.0.0.1" in str(caught.value)
    assert caught.value.hint is not None


@pytest.mark.e2e
def test_postgres_fixture_uses_private_cluster(postgres: object) -> None:
    from benchmarks.services.postgres import Postgres

    assert isinstance(postgres, Postgres)
    assert postgres.running
    assert postgres.port != 5432
    assert postgres.url.startswith("postgresql://postgres@127.0.0.1:")
    assert postgres.workdir is not None
    assert os.stat(postgres.workdir).st_mode & 0o077 == 0
