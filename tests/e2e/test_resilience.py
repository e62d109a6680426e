"""The worker in trouble, real parts: kill -9 of the daemon mid-pull, a corrupted stream, and
the steady state once everything has arrived.

The stack is the usual one (registry → proxy → fault-injecting link → daemon ← containerd)
with the daemon's metrics on, complete layers detached from FUSE 2 s after their last use and
background retries at most 2 s apart. Proof is read from the outside: what the link forwarded
(``Fault.capture``), what the store holds on disk, what containerd mounts and what containers
read.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import sqlite3
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from benchmarks.images.busybox import busybox_members
from benchmarks.services.daemon import DaemonProcess
from benchmarks.services.faulty import Fault
from benchmarks.services.registry import Registry
from benchmarks.stack import Stack, snapshotter_reachable, start_stack, stop_stack
from starlight_core.bundle import NEED_DATA, BundleReader, End, Extent, Header
from starlight_core.digest import Digest
from starlight_core.oci import chain_ids
from starlight_core.reference import Reference
from starlight_core.testing import TarMember, build_tar
from starlight_worker.fs import FsClient
from tests.e2e.conftest import Publish

pytestmark = pytest.mark.e2e

__all__ = [
    "BundleSeen",
    "data_files",
    "file_digests",
    "images",
    "is_delta",
    "placed_on_disk",
    "publish_image",
    "read_bundle",
    "sha256_hex",
    "start_observed_stack",
    "wait_until",
]

WAIT = 180.0
"""Upper bound for background work to finish (not an assertion about speed)."""


def start_observed_stack(
    workdir: Path,
    registry: Registry,
    *,
    content_timeout: float = 60.0,
    extra: dict[str, str] | None = None,
    before_daemon: Callable[[DaemonProcess], None] | None = None,
) -> Stack:
    """``tests.e2e.conftest.start_stack`` with the daemon's metrics on, a short FUSE detach
    delay and short retry delays (``extra`` overrides daemon config keys); ``before_daemon``
    runs once the daemon's directories are known, before it starts (e.g. to mount its root)."""
    return start_stack(
        workdir,
        registry,
        content_timeout=content_timeout,
        metrics=True,
        extra={"detach_after": "2", "retry_backoff_max": "2", **(extra or {})},
        before_daemon=before_daemon,
    )


@pytest.fixture(scope="module")
def stack(registry: Registry, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    stack = start_observed_stack(tmp_path_factory.mktemp("resilience"), registry)
    try:
        yield stack
    finally:
        stop_stack(stack)


# --- helpers (also used by the other resilience modules and the benchmark) ------------------


def wait_until(predicate: Callable[[], bool], what: str, timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.1)


def images(stack: Stack) -> dict[str, dict[str, Any]]:
    code, out, err = stack.cli("images", "--json")
    assert code == 0, err
    return {row["reference"]: row for row in json.loads(out)}


def is_delta(method: str, path: str) -> bool:
    return path == "/starlight/delta"


def placed_on_disk(root: Path) -> set[Digest]:
    """Contents at their final names in the store (placed by rename: whole and verified),
    read from the disk (the database may lag behind it after a crash)."""
    placed: set[Digest] = set()
    db = sqlite3.connect(f"file:{root / 'store.db'}?mode=ro", uri=True)
    try:
        rows = db.execute("SELECT layer_key, digest, size, name FROM contents").fetchall()
    finally:
        db.close()
    for key, digest, size, name in rows:
        path = root / "layers" / key / "fs" / os.fsdecode(bytes(name))
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            continue
        if st.st_size == size and path.is_file():
            placed.add(Digest(digest))
    return placed


def file_digests(root: Path) -> list[tuple[Path, Digest, Digest]]:
    """(path, digest it should have, digest it has) of every content present in the store."""
    found = []
    db = sqlite3.connect(f"file:{root / 'store.db'}?mode=ro", uri=True)
    try:
        rows = db.execute("SELECT layer_key, digest, name FROM contents").fetchall()
    finally:
        db.close()
    for key, digest, name in rows:
        path = root / "layers" / key / "fs" / os.fsdecode(bytes(name))
        if path.is_file() and not path.is_symlink():
            actual = "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()
            found.append((path, Digest(digest), Digest(actual)))
    return found


class BundleSeen:
    """What one captured bundle body carried: its header and every whole extent."""

    def __init__(self, body: bytes) -> None:
        self.header = None
        self.extents: list[tuple[Digest, int]] = []  # (content digest, compressed size)
        self.complete = False
        reader = BundleReader()
        reader.receive_data(bytes(body))
        while True:
            try:
                event = reader.next_event()
            except Exception:  # a corrupted or cut body: what came before counts
                break
            if event is NEED_DATA:
                break
            if isinstance(event, Header):
                self.header = event.header
            elif isinstance(event, Extent):
                descriptor = event.descriptor
                self.extents.append((descriptor.content, descriptor.compressed_size))
            elif isinstance(event, End):
                self.complete = True
                break

    @property
    def contents(self) -> set[Digest]:
        return {digest for digest, _ in self.extents}


def read_bundle(body: bytes) -> BundleSeen:
    return BundleSeen(body)


def data_files(count: int, size: int, seed: str) -> dict[str, bytes]:
    rng = random.Random(seed)
    return {f"data/f{i:03d}.bin": rng.randbytes(size) for i in range(count)}


def publish_image(
    publish: Publish, name: str, files: dict[str, bytes], *, cmd: list[str] | None = None
) -> tuple[Reference, Reference, list[bytes]]:
    marker = f"{name} {uuid.uuid4().hex}\n".encode()
    layers = [
        build_tar([*busybox_members(), TarMember("etc/marker", data=marker)]),
        build_tar(
            [TarMember("data", kind="dir")]
            + [TarMember(path, data=data) for path, data in sorted(files.items())]
        ),
    ]
    source, converted = publish(layers, name=name, cmd=cmd, chunk_size="1MiB")
    return source, converted, layers


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _run_detached(stack: Stack, ref: Reference, out: Path, script: str) -> str:
    name = f"reader-{uuid.uuid4().hex[:8]}"
    out.mkdir(parents=True, exist_ok=True)
    stack.containerd.ctr(
        "run", "-d", "--snapshotter", "starlight",
        "--mount", f"type=bind,src={out},dst=/out,options=rbind:rw",
        str(ref), name, "/bin/sh", "-c", script,
    )  # fmt: skip
    return name


def _stop_container(stack: Stack, name: str) -> None:
    stack.containerd.ctr("tasks", "kill", "-s", "SIGKILL", name, check=False)
    wait_until(
        lambda: (
            name not in stack.containerd.ctr("tasks", "ls", "-q", check=False).stdout
            or "STOPPED" in stack.containerd.ctr("tasks", "ls", check=False).stdout
        ),
        "the container to stop",
        timeout=30,
    )
    stack.containerd.ctr("tasks", "delete", name, check=False)
    stack.containerd.ctr("containers", "delete", name, check=False)


def _task_status(stack: Stack, name: str) -> str:
    for line in stack.containerd.ctr("tasks", "ls").stdout.splitlines()[1:]:
        fields = line.split()
        if fields and fields[0] == name:
            return fields[-1]
    return "absent"


READER = """
n=0
while true; do
  for f in /etc/marker /data/*; do
    if cat "$f" > /dev/null 2>> /out/err; then echo "ok $f" >> /out/log
    else echo "FAIL $f" >> /out/log; fi
  done
  n=$((n+1))
  echo "pass $n" >> /out/log
  sleep 0.1
done
"""


def _log_lines(out: Path) -> list[str]:
    try:
        return (out / "log").read_text().splitlines()
    except FileNotFoundError:
        return []


# --- kill -9 of the daemon mid-pull -----------------------------------------------------------


def test_kill_9_mid_pull_resumes_without_refetching_and_containers_keep_reading(
    stack: Stack, publish: Publish, tmp_path: Path
) -> None:
    # busybox first, whole: the throttled stream below then carries only the data files.
    _, warm, _ = publish_image(publish, "warm", {})
    stack.pull(warm, "--wait")
    files = data_files(120, 32 * 1024, "kill9")
    data_digests = {Digest("sha256:" + sha256_hex(d)) for d in files.values()}
    _, converted, _ = publish_image(publish, "kill9", files)
    first = stack.link.add(Fault(match=is_delta, times=1, rate=250_000, capture=True))
    try:
        stack.pull(converted)  # READY: the image is mounted, contents stream in slowly
        out = tmp_path / "out"
        name = _run_detached(stack, converted, out, READER)
        wait_until(
            lambda: sum(line.startswith("ok /data") for line in _log_lines(out)) >= 3,
            "the container to read its first files",
        )
        wait_until(
            lambda: len(placed_on_disk(stack.daemon.root) & data_digests) >= 30,
            "a quarter of the data files to arrive",
        )
        stack.daemon.kill()  # kill -9, mid-stream
    finally:
        stack.link.clear()
    placed = placed_on_disk(stack.daemon.root)
    sent_before = read_bundle(bytes(first.bodies[0]))
    assert placed, "nothing had arrived before the kill"
    assert not sent_before.complete, "the bundle had ended before the kill: no mid-pull kill"

    # While the daemon is down, the container keeps reading what is on disk.
    lines_down = len(_log_lines(out))
    second = stack.link.add(Fault(match=is_delta, times=10, capture=True))
    try:
        stack.daemon.start()  # the restart: resumes the pull recorded as RUNNING
        wait_until(
            lambda: images(stack)[str(converted)].get("complete") is True,
            "the resumed pull to complete",
        )
    finally:
        stack.link.clear()
    assert "resuming the pull of " + str(converted) in stack.daemon.log()
    assert second.hits == 1, "the restart should resume with one request"
    resumed = read_bundle(bytes(second.bodies[0]))
    assert resumed.complete
    # Nothing placed before the kill travelled again.
    assert not resumed.contents & placed
    assert resumed.header is not None
    assert data_digests - placed <= resumed.contents  # the rest came, once
    assert not data_digests & placed & set(resumed.header.local) - placed

    # The container started before the kill kept reading throughout, and still does.
    wait_until(
        lambda: sum(line.startswith("pass") for line in _log_lines(out)[lines_down:]) >= 2,
        "two more complete reading passes",
    )
    assert _task_status(stack, name) == "RUNNING"
    failures = [line for line in _log_lines(out) if line.startswith("FAIL")]
    assert failures == [], (failures[:5], (out / "err").read_text()[-2000:])
    listing = stack.containerd.ctr(
        "tasks", "exec", "--exec-id", "check", name, "/bin/sh", "-c", "cd /data && sha256sum *"
    ).stdout
    expected = sorted(f"{sha256_hex(data)}  {path[5:]}" for path, data in files.items())
    assert sorted(listing.splitlines()) == expected

    # Its layer is complete but its overlay still reads through FUSE: the reaper keeps it...
    layer_keys = _image_layers(stack, converted)
    fused = FsClient(stack.daemon.fused_socket, timeout=10)
    time.sleep(3)  # longer than detach_after: the reaper had its chance to get it wrong
    assert set(layer_keys) & {layer.layer_key for layer in fused.list()}
    assert _task_status(stack, name) == "RUNNING"
    stack.containerd.ctr("tasks", "exec", "--exec-id", "again", name, "cat", "/etc/marker")
    # ...and detaches it once the container is gone.
    _stop_container(stack, name)
    wait_until(
        lambda: not set(layer_keys) & {layer.layer_key for layer in fused.list()},
        "the reaper to detach the complete, unused layers",
    )
    assert stack.daemon.metric("starlight_worker_fuse_detached_total") >= 1


def _image_layers(stack: Stack, ref: Reference) -> list[str]:
    """The store's layer keys of ``ref`` (via the store's database)."""
    db = sqlite3.connect(f"file:{stack.daemon.root / 'store.db'}?mode=ro", uri=True)
    try:
        row = db.execute(
            "SELECT layers FROM images WHERE reference = ? AND namespace = ?",
            (str(ref), stack.containerd.namespace),
        ).fetchone()
    finally:
        db.close()
    assert row is not None
    return list(json.loads(row[0]))


# --- a corrupted byte in the stream -------------------------------------------------------------


def test_a_corrupted_byte_is_detected_and_refetched_never_served(
    stack: Stack, publish: Publish
) -> None:
    files = data_files(40, 40 * 1024, "corrupt")
    _, converted, _ = publish_image(publish, "corrupt", files)
    resumes_before = sum(
        stack.daemon.metric("starlight_worker_pull_resumes_total", reason=reason)
        for reason in ("digest_mismatch", "bundle_protocol_error")
    )
    bad = stack.link.add(Fault(match=is_delta, times=1, corrupt_at=900_000, capture=True))
    try:
        stack.pull(converted, "--wait")
    finally:
        stack.link.clear()
    assert bad.hits == 1
    assert bad.sent > 900_000
    resumes = sum(
        stack.daemon.metric("starlight_worker_pull_resumes_total", reason=reason)
        for reason in ("digest_mismatch", "bundle_protocol_error")
    )
    assert resumes - resumes_before >= 1
    assert images(stack)[str(converted)]["complete"] is True
    # Every content in the store is what its digest says; the container reads the originals.
    wrong = [(p, want, got) for p, want, got in file_digests(stack.daemon.root) if want != got]
    assert wrong == []
    listing = stack.run(converted, "/bin/sh", "-c", "cd /data && sha256sum *")
    expected = sorted(f"{sha256_hex(data)}  {path[5:]}" for path, data in files.items())
    assert sorted(listing.splitlines()) == expected


# --- steady state ---------------------------------------------------------------------------------


def test_after_completion_new_containers_mount_plain_overlayfs(
    stack: Stack, publish: Publish, tmp_path: Path
) -> None:
    files = data_files(30, 20 * 1024, "steady")
    source, converted, layers = publish_image(publish, "steady", files)
    stack.pull(converted, "--wait")
    assert images(stack)[str(converted)]["complete"] is True

    diff_ids = [Digest("sha256:" + sha256_hex(layer)) for layer in layers]
    top = str(chain_ids(diff_ids)[-1])
    key = f"steady-{uuid.uuid4().hex[:8]}"
    ctr_sn = ("snapshots", "--snapshotter", "starlight")
    stack.containerd.ctr(*ctr_sn, "prepare", key, top)
    try:
        mounts = stack.containerd.ctr(*ctr_sn, "mounts", str(tmp_path / "target"), key).stdout
    finally:
        stack.containerd.ctr(*ctr_sn, "rm", key)
    lowerdir = next(
        option[len("lowerdir=") :]
        for option in mounts.split()[-1].split(",")
        if option.startswith("lowerdir=")
    )
    fuse = str(stack.daemon.fuse_mountpoint)
    assert fuse not in mounts, mounts
    layers_root = str(stack.daemon.root / "layers")
    assert [d.startswith(layers_root) for d in lowerdir.split(":")] == [True, True], mounts

    # What a new container reads equals containerd's own overlayfs snapshotter.
    stack.containerd.ctr("images", "pull", "--plain-http", str(source))
    listing = "cd / && find etc data bin -xdev | sort | xargs -r sha256sum 2>/dev/null; true"
    through = stack.run(converted, "/bin/sh", "-c", listing)
    stock = stack.run(source, "/bin/sh", "-c", listing, snapshotter="overlayfs")
    assert through == stock
    assert len(through.splitlines()) > len(files)


def test_ctr_starlight_images_shows_how_much_is_local(stack: Stack, publish: Publish) -> None:
    files = data_files(20, 64 * 1024, "local-share")
    _, converted, _ = publish_image(publish, "localshare", files)

    def table_row() -> str:
        digest = images(stack)[str(converted)]["manifest_digest"][7:19]
        code, out, err = stack.cli("images")
        assert code == 0, err
        return next(line for line in out.splitlines() if digest in line)

    stack.link.add(Fault(match=is_delta, times=1, rate=200_000))
    try:
        stack.pull(converted)
        row = images(stack)[str(converted)]
        assert int(row.get("bytes_local", 0)) < int(row["bytes_total"])
        assert "(pulling)" in table_row()
    finally:
        stack.link.clear()
    stack.pull(converted, "--wait")  # joins the pull under way
    line = table_row()
    assert "100%" in line
    assert "(pulling)" not in line


def test_a_clean_restart_changes_nothing(stack: Stack, publish: Publish) -> None:
    """Stop and start with nothing to resume: the same images, no pull resumed, and new
    containers start once containerd has reconnected."""
    _, converted, _ = publish_image(publish, "clean-restart", data_files(3, 1000, "clean"))
    stack.pull(converted, "--wait")
    before = images(stack)
    stack.daemon.stop()
    stack.daemon.start()
    assert images(stack) == before
    assert stack.daemon.metric("starlight_worker_pulls_total", outcome="resumed") == 0
    wait_until(lambda: snapshotter_reachable(stack.containerd), "containerd to reconnect")
    data = data_files(3, 1000, "clean")["data/f002.bin"]
    out = stack.run(converted, "sha256sum", "/data/f002.bin")
    assert out.split()[0] == sha256_hex(data)
