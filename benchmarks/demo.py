"""The main job on one machine, on the embedded defaults: ``python -m benchmarks.demo``.

1. start a private registry and a private containerd (under ``--workdir``);
2. build a sample image (busybox base + application layers with every corner case) and push it;
3. convert it with ``ctr-starlight convert``;
4. pull both with a *stock* containerd (overlayfs snapshotter), run both with runc, and prove
   the converted image behaves exactly like the original: same output, same root filesystem.
"""

from __future__ import annotations

import argparse
import asyncio
import difflib
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from benchmarks.fstree import diff_trees, snapshot_tree
from benchmarks.images.build import BuiltImage, push_image
from benchmarks.images.fidelity import LISTING_COMMAND, fidelity_layers
from benchmarks.services.containerd import Containerd
from benchmarks.services.registry import Registry
from starlight_core import oci, wire
from starlight_core.reference import Reference
from starlight_core.registry import RegistryClient


def _say(text: str) -> None:
    print(f"==> {text}", flush=True)


async def _push(registry: Registry) -> BuiltImage:
    ref = Reference.parse(f"{registry.host}/demo/app:v1")
    async with RegistryClient(plain_http=True) as client:
        return await push_image(client, ref, fidelity_layers(), docker=True, cmd=LISTING_COMMAND)


async def _layer_sizes(ref: Reference) -> int:
    async with RegistryClient(plain_http=True) as client:
        manifest = wire.loads((await client.get_manifest(ref)).data, oci.Manifest)
        return sum(layer.size for layer in manifest.layers)


def _tree(containerd: Containerd, ref: Reference, where: Path) -> dict[str, object]:
    where.mkdir(parents=True)
    containerd.ctr("images", "mount", str(ref), str(where))
    try:
        return dict(snapshot_tree(where))
    finally:
        containerd.ctr("images", "unmount", str(where))


def run(workdir: Path) -> int:
    with Registry(workdir / "registry") as registry, Containerd(workdir / "containerd") as ctrd:
        _say(f"registry at {registry.url}, containerd at {ctrd.address}")
        built = asyncio.run(_push(registry))
        source = built.reference
        target = source.with_tag("v1-starlight")
        _say(f"pushed {source} ({len(built.layer_digests)} layers, {built.compressed_size} bytes)")

        started = time.monotonic()
        subprocess.run(
            [
                sys.executable,
                "-m",
                "starlight_cli",
                "convert",
                "--plain-http",
                str(source),
                str(target),
            ],
            check=True,
        )
        elapsed = time.monotonic() - started
        converted_size = asyncio.run(_layer_sizes(target))
        overhead = 100.0 * (converted_size - built.compressed_size) / built.compressed_size
        _say(f"converted in {elapsed:.2f}s: {converted_size} bytes ({overhead:+.2f}% vs original)")

        outputs = []
        for ref in (source, target):
            ctrd.ctr("images", "pull", "--plain-http", str(ref))
            result = ctrd.ctr("run", "--rm", str(ref), f"demo-{uuid.uuid4().hex[:8]}")
            outputs.append(result.stdout)
        same_output = outputs[0] == outputs[1]
        _say(
            f"stock containerd ran both: {len(outputs[0].splitlines())} lines of output, "
            f"{'identical' if same_output else 'DIFFERENT'}"
        )
        trees = [_tree(ctrd, ref, workdir / "mnt" / uuid.uuid4().hex) for ref in (source, target)]
        problems = diff_trees(trees[0], trees[1])  # type: ignore[arg-type]
        _say(
            f"root filesystems: {len(trees[0])} entries each, "
            f"{'identical' if not problems else f'{len(problems)} differences'}"
        )
        if not same_output:
            diff = difflib.unified_diff(outputs[0].splitlines(), outputs[1].splitlines())
            for line in list(diff)[:20]:
                print("   ", line)
        for problem in problems[:20]:
            print("   ", problem)
        if same_output and not problems:
            _say("OK: the Starlight image is a standard image; stock containerd runs it unchanged")
            return 0
        return 1


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--workdir", type=Path, help="where to keep the services' state")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="starlight-demo-"))
    try:
        code = run(workdir)
    finally:
        if not args.keep and args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    sys.exit(code)


if __name__ == "__main__":
    main()
