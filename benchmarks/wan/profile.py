"""Where the worker's time goes during one starlight deploy across the link: py-spy samples
the daemon and its FUSE server while ``ctr-starlight pull`` + ``ctr run`` deploy a workload.

    python -m benchmarks.wan.profile --workload redis --scenario rebuild --out /tmp/prof

Writes ``daemon.txt`` and ``fused.txt`` (py-spy's collapsed stacks: open them with
speedscope or flamegraph.pl) and prints, for each process, the functions with the most
samples of their own and the repository functions with the most samples in total. The deploy
is measured as by the harness (no training: the proxy's default order unless traces were
reported before on the same ``--workdir``).
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import shutil
import signal
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path
from typing import Final

from benchmarks.images.workloads import WORKLOADS, publish
from benchmarks.stack import start_wan_cloud, start_wan_edge, stop_wan_cloud, stop_wan_edge
from benchmarks.wan.harness import _SCENARIO_IMAGES, parse_link
from benchmarks.wan.link import WanLink
from benchmarks.wan.measure import EdgeProber, measure_starlight

__all__ = ["main", "top_functions"]

_PY_SPY: Final = Path(sys.executable).with_name("py-spy")


def top_functions(collapsed: str, *, limit: int = 15) -> tuple[list[tuple[str, int]], int]:
    """(frames by samples of their own, total samples) from py-spy's collapsed stacks."""
    own: Counter[str] = Counter()
    total = 0
    for line in collapsed.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        samples = int(count)
        total += samples
        own[stack.split(";")[-1]] += samples
    return own.most_common(limit), total


def inclusive(
    collapsed: str, *, limit: int = 15, within: str = "starlight"
) -> list[tuple[str, int]]:
    """Frames of the repository by samples in which they appear anywhere on the stack."""
    seen: Counter[str] = Counter()
    for line in collapsed.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        for frame in set(stack.split(";")):
            if within in frame:
                seen[frame] += int(count)
    return seen.most_common(limit)


def _record(pid: int, path: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [str(_PY_SPY), "record", "--pid", str(pid), "--format", "raw", "--nonblocking",
         "--rate", "200", "--output", str(path)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.wan.profile")
    parser.add_argument("--workload", default="redis", choices=sorted(WORKLOADS))
    parser.add_argument("--scenario", default="deploy", choices=sorted(_SCENARIO_IMAGES))
    parser.add_argument("--link", type=parse_link, default=parse_link("150/100"))
    parser.add_argument("--no-ordering", action="store_true")
    parser.add_argument("--out", type=Path, default=Path("/var/tmp/starlight-wan/profile"))
    parser.add_argument("--workdir", type=Path)
    args = parser.parse_args(argv)
    workload = WORKLOADS[args.workload]
    target_key, old_key = _SCENARIO_IMAGES[args.scenario]
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="slprof-", dir="/var/tmp"))
    args.out.mkdir(parents=True, exist_ok=True)
    with WanLink.for_config(args.link) as link:
        cloud = start_wan_cloud(workdir / "cloud", link)
        prober = EdgeProber(link.edge)
        try:
            images = {}
            for key in filter(None, (target_key, old_key)):
                image = cloud.call(
                    functools.partial(
                        asyncio.run, publish(workload, key[0], cloud.registry.host, kind=key[1])
                    )
                )
                from starlight_core.proxy_client import ProxyClient

                async def notify(reference: str = str(image.starlight)) -> None:
                    async with ProxyClient(cloud.proxy.url) as proxy:
                        await proxy.notify(reference)

                cloud.call(lambda: asyncio.run(notify()))
                images[key] = image
            edge = start_wan_edge(workdir / "edge", cloud)
            try:
                from starlight_worker.fs import FsClient

                fused = FsClient(edge.daemon.fused_socket).ping().pid
                old = images[old_key] if old_key else None
                if old is not None:
                    from benchmarks.wan.measure import pull_starlight

                    pull_starlight(edge, str(old.starlight), wait=True)
                spies = {
                    "daemon": _record(edge.daemon.pid, args.out / "daemon.txt"),
                    "fused": _record(fused, args.out / "fused.txt"),
                }
                sample = measure_starlight(
                    edge,
                    prober,
                    workload,
                    str(images[target_key].starlight),
                    old=str(old.starlight) if old is not None else None,
                    old_present=True,  # pulled above: only the update is sampled
                    ordering=not args.no_ordering,
                    logs=args.out,
                    timeout=600,
                )
                for spy in spies.values():
                    spy.send_signal(signal.SIGINT)
                    spy.wait(timeout=60)
            finally:
                stop_wan_edge(edge)
        finally:
            prober.close()
            stop_wan_cloud(cloud)
            if args.workdir is None:
                shutil.rmtree(workdir, ignore_errors=True)
    print(
        f"{args.workload} {args.scenario} over {args.link.label}: ready {sample.ready_s:.2f}s, "
        f"local {sample.local_s or 0:.2f}s, {sample.wire_bytes / 1e6:.1f} MB, "
        f"worker CPU {sample.cpu_s:.2f}s"
    )
    for name in ("daemon", "fused"):
        path = args.out / f"{name}.txt"
        if not path.exists():
            print(f"{name}: no samples")
            continue
        text = path.read_text()
        top, total = top_functions(text)
        print(f"\n{name}: {total} samples (200 Hz, on CPU) — own time")
        for frame, count in top:
            print(f"  {100 * count / max(total, 1):5.1f}%  {frame}")
        print(f"{name}: repository functions, inclusive")
        for frame, count in inclusive(text):
            print(f"  {100 * count / max(total, 1):5.1f}%  {frame}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
