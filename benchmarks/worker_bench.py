"""Worker resilience benchmarks (issue 5), real parts on loopback.

    .venv/bin/python -m benchmarks.worker_bench [--size 128MiB] [--json FILE]

1. ``steady_state``: read throughput once an image is complete. The same files read through
   ``ctr images mount`` of the converted image on the starlight snapshotter (plain overlayfs
   over the store's layer directories: the mount is checked to hold no FUSE path) and of the
   original image on containerd's overlayfs snapshotter. Cold (each file's pages dropped with
   ``posix_fadvise(DONTNEED)`` first; through overlayfs that reaches the lower file) and warm;
   the median of 5 passes, alternating. The ratio starlight/stock should be about 1.00.
2. ``restart``: a container runs on an image still being pulled (throttled); the daemon is
   killed with SIGKILL and started again. Through the container's own root filesystem (the
   shim's rootfs mount, read from the host) a reader reads already-present files in a loop,
   dropping their pages each time so that every read goes to the FUSE server: the longest gap
   between two reads is the time the container was blocked. A read of a file that had not
   arrived, issued right after the kill, waits until the restarted daemon resumed the pull.
   Also: when containerd (its own gRPC reconnection backoff) reaches the snapshotter again,
   i.e. when new containers can be created.
3. ``refetch``: in the same run, the bundles the link forwarded before and after the kill
   (captured): content bytes placed before the kill and sent again (should be 0), and bytes of
   contents that were under way at the kill (received in part, never placed) sent again.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import random
import re
import statistics
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks.images.build import push_image
from benchmarks.images.busybox import busybox_members
from benchmarks.services.faulty import Fault
from benchmarks.services.registry import Registry
from benchmarks.stack import Stack, start_stack, stop_stack
from starlight_core.bundle import NEED_DATA, BundleReader, End, Extent
from starlight_core.digest import Digest
from starlight_core.reference import Reference
from starlight_core.registry import RegistryClient
from starlight_core.testing import TarMember, build_tar

__all__ = ["main", "refetched", "restart", "steady_state"]


def _start(workdir: Path, registry: Registry) -> Stack:
    return start_stack(
        workdir,
        registry,
        content_timeout=120.0,
        metrics=True,
        extra={"detach_after": "2", "retry_backoff_max": "2", "log_level": "info"},
    )


def _wait(predicate: Callable[[], bool], what: str, timeout: float = 600.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"waiting for {what}")
        time.sleep(0.05)


def _publish(stack: Stack, name: str, files: dict[str, bytes]) -> tuple[Reference, Reference]:
    source = Reference.parse(f"{stack.registry.host}/bench/{name}:v1")
    layers = [
        build_tar([*busybox_members(), TarMember("etc/bench", data=name.encode())]),
        build_tar(
            [TarMember("data", kind="dir")]
            + [TarMember(path, data=data) for path, data in sorted(files.items())]
        ),
    ]

    async def push() -> None:
        async with RegistryClient(plain_http=True) as client:
            await push_image(client, source, layers, docker=True, cmd=["sleep", "100000"])

    asyncio.run(push())
    converted = source.with_tag("v1-starlight")
    code, _, err = stack.cli(
        "convert", "-q", "--plain-http", "--chunk-size", "1MiB", "--notify",
        str(source), str(converted),
    )  # fmt: skip
    if code != 0:
        raise RuntimeError(err)
    return source, converted


def _complete(stack: Stack, ref: Reference) -> bool:
    code, out, _ = stack.cli("images", "--json")
    rows = {row["reference"]: row for row in json.loads(out)} if code == 0 else {}
    return bool(rows.get(str(ref), {}).get("complete"))


def _files(count: int, size: int, seed: str) -> dict[str, bytes]:
    rng = random.Random(seed)
    return {f"data/f{i:04d}.bin": rng.randbytes(size) for i in range(count)}


def _drop(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def _read_all(paths: list[Path], *, cold: bool) -> float:
    """MB/s reading ``paths`` whole."""
    if cold:
        for path in paths:
            _drop(path)
    total = 0
    started = time.perf_counter()
    for path in paths:
        with open(path, "rb", buffering=0) as handle:
            while chunk := handle.read(1 << 20):
                total += len(chunk)
    return total / (time.perf_counter() - started) / 1e6


def _mount_options(target: Path) -> str:
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        if len(fields) > 4 and fields[4] == str(target):
            return line.split(" - ", 1)[1]
    raise RuntimeError(f"{target} is not mounted")


def steady_state(stack: Stack, size: int, workdir: Path) -> dict[str, Any]:
    count = max(1, size // (4 << 20))
    files = _files(count, 4 << 20, "steady")
    source, converted = _publish(stack, "steady", files)
    stack.containerd.ctr("images", "pull", "--plain-http", str(source))
    stack.pull(converted, "--wait")
    _wait(lambda: _complete(stack, converted), "the starlight pull to complete")
    results: dict[str, Any] = {"files": count, "bytes": count * (4 << 20)}
    mounts = {
        "stock": (source, "overlayfs", workdir / "mnt-stock"),
        "starlight": (converted, "starlight", workdir / "mnt-starlight"),
    }
    speeds: dict[str, dict[str, list[float]]] = {m: {"cold": [], "warm": []} for m in mounts}
    try:
        for ref, snapshotter, target in mounts.values():
            target.mkdir()
            stack.containerd.ctr(
                "images", "mount", "--snapshotter", snapshotter, str(ref), str(target)
            )
        options = _mount_options(mounts["starlight"][2])
        if str(stack.daemon.fuse_mountpoint) in options:
            raise RuntimeError(f"the steady-state mount still uses FUSE: {options}")
        # Alternating passes: a busy shared machine drifts; both sides see the same drift.
        for _ in range(5):
            for label, (_, _, target) in mounts.items():
                paths = sorted((target / "data").iterdir())
                speeds[label]["cold"].append(_read_all(paths, cold=True))
                speeds[label]["warm"].append(_read_all(paths, cold=False))
    finally:
        for _, _, target in mounts.values():
            stack.containerd.ctr("images", "unmount", str(target), check=False)
    for label in mounts:
        results[label] = {
            f"{kind}_mb_per_s": round(statistics.median(values), 1)
            for kind, values in speeds[label].items()
        }
    results["starlight_mount_has_fuse"] = False
    for kind in ("cold", "warm"):
        results[f"ratio_{kind}"] = round(
            results["starlight"][f"{kind}_mb_per_s"] / results["stock"][f"{kind}_mb_per_s"], 3
        )
    return results


def _placed(root: Path) -> set[Digest]:
    import sqlite3

    db = sqlite3.connect(f"file:{root / 'store.db'}?mode=ro", uri=True)
    try:
        rows = db.execute("SELECT layer_key, digest, size, name FROM contents").fetchall()
    finally:
        db.close()
    placed = set()
    for key, digest, size, name in rows:
        path = root / "layers" / key / "fs" / os.fsdecode(bytes(name))
        if path.is_file() and path.stat().st_size == size:
            placed.add(Digest(digest))
    return placed


def _extents(body: bytes) -> list[tuple[Digest, int]]:
    reader = BundleReader()
    reader.receive_data(bytes(body))
    found = []
    while True:
        try:
            event = reader.next_event()
        except Exception:
            break
        if event is NEED_DATA or isinstance(event, End):
            break
        if isinstance(event, Extent):
            found.append((event.descriptor.content, event.descriptor.compressed_size))
    return found


def refetched(first: bytes, second: bytes, placed: set[Digest]) -> dict[str, int]:
    """Bytes the second bundle sent again: of contents placed before the kill, and of contents
    the first bundle had begun (or finished) sending that were not placed yet."""
    begun = {digest for digest, _ in _extents(first)}
    again = _extents(second)
    return {
        "placed_content_bytes_sent_again": sum(n for d, n in again if d in placed),
        "in_flight_bytes_sent_again": sum(n for d, n in again if d in begun and d not in placed),
        "resumed_bundle_content_bytes": sum(n for _, n in again),
        "first_bundle_bytes_before_kill": len(first),
    }


def restart(stack: Stack) -> dict[str, Any]:
    files = _files(200, 64 << 10, "restart")
    digest_of = {Digest("sha256:" + hashlib.sha256(d).hexdigest()): p for p, d in files.items()}
    _, converted = _publish(stack, "restart", files)
    first = stack.link.add(Fault(match=_is_delta, times=1, rate=1_000_000, capture=True))
    stack.pull(converted)
    name = f"bench-{uuid.uuid4().hex[:8]}"
    stack.containerd.ctr("run", "-d", "--snapshotter", "starlight", str(converted), name)
    rootfs = (
        stack.containerd.state
        / "io.containerd.runtime.v2.task"
        / stack.containerd.namespace
        / name
        / "rootfs"
    )
    _wait((rootfs / "etc" / "bench").exists, "the container's rootfs")
    _wait(lambda: len(_placed(stack.daemon.root) & set(digest_of)) >= 40, "40 files to arrive")
    arrived = _placed(stack.daemon.root) & set(digest_of)
    present = sorted(rootfs / digest_of[d] for d in arrived)[:40]

    stop = threading.Event()
    gaps: list[float] = []
    errors: list[str] = []

    def reader() -> None:
        last = time.perf_counter()
        while not stop.is_set():
            for path in present:
                try:
                    _drop(path)
                    with open(path, "rb", buffering=0) as handle:
                        handle.read()
                except OSError as exc:
                    errors.append(f"{path.name}: {exc}")
                now = time.perf_counter()
                gaps.append(now - last)
                last = now

    thread = threading.Thread(target=reader, daemon=True)
    thread.start()
    time.sleep(1.0)
    baseline = max(gaps) if gaps else 0.0
    gaps.clear()

    killed_at = time.perf_counter()
    stack.daemon.kill()
    placed = _placed(stack.daemon.root)
    stack.link.clear()
    missing = sorted(rootfs / digest_of[d] for d in set(digest_of) - placed)
    wait_result: dict[str, float] = {}

    def read_missing() -> None:
        started = time.perf_counter()
        with open(missing[-1], "rb") as handle:
            handle.read()
        wait_result["seconds"] = time.perf_counter() - started

    missing_reader = threading.Thread(target=read_missing, daemon=True)
    missing_reader.start()
    second = stack.link.add(Fault(match=_is_delta, times=10, capture=True))
    time.sleep(0.5)  # the daemon stays dead for a moment, as after a crash
    stack.daemon.start()
    restarted = time.perf_counter() - killed_at
    _wait(
        lambda: (
            stack.containerd.ctr(
                "snapshots", "--snapshotter", "starlight", "ls", check=False
            ).returncode
            == 0
        ),
        "containerd to reach the restarted snapshotter",
    )
    reconnected = time.perf_counter() - killed_at
    _wait(lambda: _complete(stack, converted), "the resumed pull to complete")
    completed = time.perf_counter() - killed_at
    missing_reader.join(timeout=120)
    time.sleep(0.5)
    stop.set()
    thread.join()
    stack.link.clear()
    stack.containerd.ctr("tasks", "kill", "-s", "SIGKILL", name, check=False)
    return {
        "read_gap_max_ms_before_kill": round(baseline * 1000, 1),
        "read_gap_max_ms_across_restart": round(max(gaps) * 1000, 1),
        "reads_across_restart": len(gaps),
        "read_errors": errors[:5],
        "daemon_down_and_restart_s": round(restarted, 2),
        "containerd_reconnected_after_kill_s": round(reconnected, 2),
        "pull_complete_after_kill_s": round(completed, 2),
        "missing_file_read_wait_s": round(wait_result.get("seconds", float("nan")), 2),
        "refetch": refetched(bytes(first.bodies[0]), bytes(second.bodies[0]), placed),
        "resume_requests": second.hits,
    }


def _is_delta(method: str, path: str) -> bool:
    return path == "/starlight/delta"


def _size(text: str) -> int:
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
    match = re.fullmatch(r"(\d+)\s*([kmg])?i?b?", text.strip().lower())
    if match is None:
        raise argparse.ArgumentTypeError(f"bad size {text!r}")
    return int(match.group(1)) * units.get(match.group(2) or "", 1)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--size", type=_size, default=128 << 20, help="steady-state image size")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="starlight-worker-bench-"))
    registry = Registry(workdir / "registry")
    registry.start()
    stack = _start(workdir / "stack", registry)
    try:
        results = {
            "steady_state": steady_state(stack, args.size, workdir),
            "restart": restart(stack),
        }
    finally:
        stop_stack(stack)
        registry.stop()
        subprocess.run(["rm", "-rf", str(workdir)], check=False)
    text = json.dumps(results, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text)


if __name__ == "__main__":
    main()
