"""Worker benchmarks on loopback (issue 4): deploy time vs stock, daemon memory during a big
pull, and read throughput through FUSE vs the plain on-disk tree.

    .venv/bin/python -m benchmarks.deploy_bench [--size 1GiB] [--layers 4] [--json FILE]

1. Time from the pull command to the container's first output, for the sample application
   (Debian-built, benchmarks/images/sample.py): stock ``ctr images pull`` + ``ctr run`` on
   overlayfs vs ``ctr-starlight pull`` + ``ctr run --snapshotter starlight``.
2. A synthetic image of ``--size`` bytes of files (benchmarks/proxy_bench.py) pulled to
   completion: the daemon's and the FUSE server's peak RSS (VmHWM), and the pull's rate.
3. Reading every file of that image's first layer, caches dropped before each pass: through the
   FUSE server vs from the layer's on-disk directory (what overlayfs reads in the steady state).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from benchmarks.images.build import push_image
from benchmarks.images.sample import SAMPLE_COMMAND, VERSIONS, sample_layers
from benchmarks.proxy_bench import push_synthetic
from benchmarks.services.registry import Registry
from benchmarks.stack import Stack, start_stack, stop_stack
from starlight_core.reference import Reference
from starlight_core.registry import RegistryClient
from starlight_worker.fs import FsClient


def _drop_caches() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def _peak_rss(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    match = re.search(r"^VmHWM:\s+(\d+) kB", status, re.MULTILINE)
    return int(match.group(1)) * 1024 if match else 0


def _first_output(argv: list[str]) -> float:
    """Seconds until the command prints its first line (it then runs to completion)."""
    started = time.monotonic()
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    assert process.stdout is not None
    process.stdout.readline()
    first = time.monotonic() - started
    process.communicate()
    return first


def deploy_times(stack: Stack) -> dict[str, float]:
    version = VERSIONS[0]
    source = Reference.parse(f"{stack.registry.host}/bench/sample:{version.tag}")

    async def push() -> None:
        async with RegistryClient(plain_http=True) as client:
            await push_image(
                client, source, sample_layers(version), docker=True, cmd=SAMPLE_COMMAND
            )

    asyncio.run(push())
    converted = source.with_tag("starlight")
    code, _, err = stack.cli(
        "convert", "-q", "--plain-http", "--notify", str(source), str(converted)
    )
    assert code == 0, err
    ctr = stack.containerd.ctr_argv()
    cli = str(Path(sys.executable).with_name("ctr-starlight"))
    env_cli = [
        cli,
        "pull",
        "-q",
        "--socket",
        stack.daemon.control_socket,
        "-n",
        stack.containerd.namespace,
        str(converted),
    ]
    _drop_caches()
    started = time.monotonic()
    subprocess.run(
        [*ctr, "images", "pull", "--plain-http", str(source)], check=True, capture_output=True
    )
    stock = (
        time.monotonic()
        - started
        + _first_output(
            [
                *ctr,
                "run",
                "--rm",
                "--snapshotter",
                "overlayfs",
                str(source),
                f"s-{uuid.uuid4().hex[:6]}",
            ]
        )
    )
    _drop_caches()
    started = time.monotonic()
    subprocess.run(env_cli, check=True, capture_output=True)
    ours = (
        time.monotonic()
        - started
        + _first_output(
            [
                *ctr,
                "run",
                "--rm",
                "--snapshotter",
                "starlight",
                str(converted),
                f"l-{uuid.uuid4().hex[:6]}",
            ]
        )
    )
    return {
        "stock_seconds": round(stock, 3),
        "starlight_seconds": round(ours, 3),
        "speedup": round(stock / ours, 2),
    }


def big_pull(stack: Stack, size: int, layers: int) -> dict[str, Any]:
    ref = Reference.parse(f"{stack.registry.host}/bench/big:v1")

    async def push() -> tuple[int, int, int]:
        async with RegistryClient(plain_http=True) as client:
            return await push_synthetic(client, ref, size, layers)

    files, content, compressed = asyncio.run(push())
    code, _, err = stack.cli("notify", str(ref))
    assert code == 0, err
    fused_pid = FsClient(stack.daemon.fused_socket).ping().pid
    peak = {"daemon": 0, "fused": 0}
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            peak["daemon"] = max(peak["daemon"], _peak_rss(stack.daemon.pid))
            peak["fused"] = max(peak["fused"], _peak_rss(fused_pid))
            time.sleep(0.2)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    started = time.monotonic()
    stack.pull(ref, "--wait")
    elapsed = time.monotonic() - started
    done.set()
    watcher.join()
    return {
        "files": files,
        "content_bytes": content,
        "compressed_bytes": compressed,
        "pull_seconds": round(elapsed, 2),
        "pull_mb_per_s": round(compressed / elapsed / 1e6, 1),
        "daemon_peak_rss_mb": round(peak["daemon"] / 1e6, 1),
        "fused_peak_rss_mb": round(peak["fused"] / 1e6, 1),
        "reference": str(ref),
    }


def _read_tree(root: Path) -> tuple[int, float]:
    total = 0
    started = time.monotonic()
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            path = os.path.join(dirpath, name)
            if os.path.islink(path):
                continue
            with open(path, "rb") as handle:
                while chunk := handle.read(1 << 20):
                    total += len(chunk)
    return total, time.monotonic() - started


def fuse_vs_disk(stack: Stack) -> dict[str, Any]:
    layer_root = stack.daemon.root / "layers"
    key = sorted(p.name for p in layer_root.iterdir() if (p / "complete").exists())[0]
    layer_dir = layer_root / key
    client = FsClient(stack.daemon.fused_socket)
    fuse_path = client.attach(key, layer_dir)
    results: dict[str, Any] = {"layer": key}
    try:
        for label, root in (("disk", layer_dir / "fs"), ("fuse", fuse_path)):
            _drop_caches()
            size, cold = _read_tree(root)
            _, warm = _read_tree(root)
            results[label] = {
                "bytes": size,
                "cold_mb_per_s": round(size / cold / 1e6, 1),
                "warm_mb_per_s": round(size / warm / 1e6, 1),
            }
    finally:
        client.detach(key)
    results["fuse_vs_disk_cold"] = round(
        results["fuse"]["cold_mb_per_s"] / results["disk"]["cold_mb_per_s"], 2
    )
    results["fuse_vs_disk_warm"] = round(
        results["fuse"]["warm_mb_per_s"] / results["disk"]["warm_mb_per_s"], 2
    )
    return results


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
    parser.add_argument("--size", type=_size, default=1 << 30)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="starlight-deploy-bench-"))
    registry = Registry(workdir / "registry")
    registry.start()
    stack = start_stack(workdir / "stack", registry, direct=True)
    try:
        results = {
            "deploy": deploy_times(stack),
            "big_pull": big_pull(stack, args.size, args.layers),
        }
        results["reads"] = fuse_vs_disk(stack)
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
