"""Contents that cannot arrive: the proxy killed mid-stream, and a full disk.

A read of a content that cannot arrive fails with EIO after ``content_timeout`` (3 s here) —
it never hangs — and the cause is in the logs; the daemon keeps retrying the pull in the
background, so once the proxy is back (or space is freed) the pull completes and later reads
succeed. The daemon's store root is a small tmpfs, so the disk can be filled on cue.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from benchmarks.services.daemon import DaemonProcess
from benchmarks.services.faulty import Fault
from benchmarks.services.registry import Registry
from benchmarks.stack import Stack, stop_stack
from starlight_core.digest import Digest
from tests.e2e.conftest import Publish
from tests.e2e.test_resilience import (
    data_files,
    file_digests,
    images,
    is_delta,
    placed_on_disk,
    publish_image,
    sha256_hex,
    start_observed_stack,
    wait_until,
)

pytestmark = pytest.mark.e2e

CONTENT_TIMEOUT = 3.0
ROOT_SIZE = "96m"


@pytest.fixture(scope="module")
def stack(registry: Registry, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    workdir = tmp_path_factory.mktemp("faults")
    mounted: list[Path] = []

    def small_root(daemon: DaemonProcess) -> None:
        daemon.root.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            [
                "mount",
                "-t",
                "tmpfs",
                "-o",
                f"size={ROOT_SIZE},mode=0700",
                "tmpfs",
                str(daemon.root),
            ],
            check=True,
            capture_output=True,
        )
        mounted.append(daemon.root)

    stack = start_observed_stack(
        workdir, registry, content_timeout=CONTENT_TIMEOUT, before_daemon=small_root
    )
    try:
        yield stack
    finally:
        stop_stack(stack)
        for root in mounted:
            subprocess.run(["umount", "-l", str(root)], check=False, capture_output=True)


@pytest.fixture(scope="module")
def warm(stack: Stack, publish: Publish) -> None:
    """busybox held locally: containers can start whatever happens to the proxy."""
    _, ref, _ = publish_image(publish, "warm", {})
    stack.pull(ref, "--wait")


def _fused_log(stack: Stack) -> str:
    try:
        return Path(f"{stack.daemon.fused_socket}.log").read_text(errors="replace")
    except FileNotFoundError:
        return ""


def _cat(stack: Stack, ref: object, path: str) -> subprocess.CompletedProcess[str]:
    return stack.containerd.ctr(
        "run", "--rm", "--snapshotter", "starlight", str(ref), f"cat-{uuid.uuid4().hex[:8]}",
        "/bin/sh", "-c", f"sha256sum {path}",
        check=False,
    )  # fmt: skip


def test_proxy_killed_mid_stream_reads_fail_with_eio_then_the_pull_completes(
    stack: Stack, publish: Publish, warm: None
) -> None:
    # 30 MB: more than the loopback socket buffers between proxy and link hold, so killing
    # the proxy really cuts the stream (what was sent before still drains to the daemon).
    files = data_files(120, 256 * 1024, "proxy-killed")
    by_digest = {Digest("sha256:" + sha256_hex(data)): path for path, data in files.items()}
    _, converted, _ = publish_image(publish, "proxykill", files)
    stack.link.add(Fault(match=is_delta, times=1, rate=1_000_000))
    try:
        stack.pull(converted)
        wait_until(
            lambda: len(placed_on_disk(stack.daemon.root) & set(by_digest)) >= 5,
            "the first files to arrive",
        )
        os.kill(stack.proxy.pid, signal.SIGKILL)  # the proxy dies mid-stream
        stack.proxy.stop()
    finally:
        stack.link.clear()
    missing = sorted(by_digest[d] for d in set(by_digest) - placed_on_disk(stack.daemon.root))
    present = sorted(by_digest[d] for d in placed_on_disk(stack.daemon.root) & set(by_digest))
    assert missing, "everything arrived before the proxy died"

    # A file on disk reads fine; a missing one fails with EIO after the timeout, not forever.
    ok = _cat(stack, converted, f"/{present[0]}")
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.split()[0] == sha256_hex(files[present[0]])
    failed = _cat(stack, converted, f"/{missing[-1]}")
    assert failed.returncode != 0
    assert "Input/output error" in failed.stderr + failed.stdout  # EIO
    name = missing[-1].rsplit("/", 1)[1]
    assert any(
        "failed with EIO" in line and name in line and "did not arrive within 3s" in line
        for line in _fused_log(stack).splitlines()
    ), _fused_log(stack)[-2000:]
    # The cause is in the daemon's log: the pull stopped because the proxy is unreachable.
    wait_until(
        lambda: "its image is in use: retrying" in stack.daemon.log(),
        "the daemon to give the pull to its background retries",
    )
    stopped = [line for line in stack.daemon.log().splitlines() if "retrying in" in line]
    assert any(str(converted) in line and "proxy" in line.lower() for line in stopped), stopped

    stack.proxy.start()  # back on the same port: the next retry resumes the pull
    wait_until(
        lambda: images(stack)[str(converted)].get("complete") is True,
        "the pull to complete once the proxy is back",
    )
    again = _cat(stack, converted, f"/{missing[-1]}")
    assert again.returncode == 0, again.stderr
    assert again.stdout.split()[0] == sha256_hex(files[missing[-1]])


def _fill(root: Path, leave: int) -> Path:
    """A ballast file taking all but ``leave`` bytes of the filesystem at ``root``."""
    st = os.statvfs(root)
    free = st.f_bavail * st.f_frsize
    ballast = root / f"ballast-{uuid.uuid4().hex[:6]}"
    with open(ballast, "wb") as out:
        remaining = max(0, free - leave)
        block = b"\0" * (1 << 20)
        while remaining > 0:
            out.write(block[: min(len(block), remaining)])
            remaining -= min(len(block), remaining)
    return ballast


def _database_ok(root: Path) -> bool:
    db = sqlite3.connect(f"file:{root / 'store.db'}?mode=ro", uri=True)
    try:
        result: str = db.execute("PRAGMA integrity_check").fetchone()[0]
        return result == "ok"
    finally:
        db.close()


def test_disk_full_during_a_pull_is_a_clear_error_and_completes_after_freeing_space(
    stack: Stack, publish: Publish, warm: None
) -> None:
    files = data_files(40, 64 * 1024, "disk-full")
    _, converted, _ = publish_image(publish, "diskfull", files)
    root = stack.daemon.root
    ballast = _fill(root, leave=1 << 20)
    try:
        code, _, err = stack.cli(
            "pull", "-q", "--wait", "-n", stack.containerd.namespace, str(converted)
        )
        assert code != 0
        lines = [line for line in err.splitlines() if line.strip()]
        assert len(lines) == 1, err
        assert "No space left on device" in lines[0] or "disk is full" in lines[0], lines[0]
        assert "free disk space" in lines[0]
        # The store is consistent: every file at its final name is whole and verified.
        assert _database_ok(root)
        wrong = [(p, want, got) for p, want, got in file_digests(root) if want != got]
        assert wrong == []
        assert images(stack)[str(converted)].get("complete") is not True
    finally:
        ballast.unlink()
    # Space freed: the daemon's background retries finish the pull.
    wait_until(
        lambda: images(stack)[str(converted)].get("complete") is True,
        "the pull to complete after space was freed",
    )
    assert _database_ok(root)
    wrong = [(p, want, got) for p, want, got in file_digests(root) if want != got]
    assert wrong == []
    assert list((root / "staging").iterdir()) == []
    listing = stack.run(converted, "/bin/sh", "-c", "cd /data && sha256sum *")
    expected = sorted(f"{sha256_hex(data)}  {path[5:]}" for path, data in files.items())
    assert sorted(listing.splitlines()) == expected
