"""The main job on one machine, on the embedded defaults: ``python -m benchmarks.demo``.

Starts a local registry, the proxy (SQLite), containerd with the starlight plugin and the
starlight daemon; builds a sample application from Debian packages in two versions (a real
Debian security update of its runtime); converts both to the Starlight format and notifies the
proxy; proves the converted images run unchanged on stock containerd; then deploys v1 and
updates to v2 both ways — stock ``ctr images pull`` + overlayfs, and ``ctr-starlight pull`` +
the starlight snapshotter — and prints time and bytes for each.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import sys
import tempfile
import time
import uuid
from pathlib import Path

import attrs

from benchmarks.images.build import push_image
from benchmarks.images.sample import SAMPLE_COMMAND, VERSIONS, sample_layers
from benchmarks.services.registry import Registry
from benchmarks.stack import Stack, start_stack, stop_stack
from starlight_core import oci, wire
from starlight_core.reference import Reference
from starlight_core.registry import RegistryClient


@attrs.frozen
class Step:
    method: str
    action: str
    seconds: float
    bytes: int
    output: str


def _say(text: str) -> None:
    print(f"==> {text}", flush=True)


async def _layers(ref: Reference) -> list[oci.Descriptor]:
    async with RegistryClient(plain_http=True) as client:
        response = await client.get_manifest(ref)
        return list(wire.loads(response.data, oci.Manifest).layers)


def _run(stack: Stack, ref: Reference, snapshotter: str) -> str:
    name = f"demo-{uuid.uuid4().hex[:8]}"
    return stack.containerd.ctr("run", "--rm", "--snapshotter", snapshotter, str(ref), name).stdout


def run(workdir: Path) -> int:
    registry = Registry(workdir / "registry")
    registry.start()
    stack = start_stack(workdir / "stack", registry, direct=True)
    try:
        return _demo(stack)
    finally:
        stop_stack(stack)
        registry.stop()


def _demo(stack: Stack) -> int:
    host = stack.registry.host
    _say(
        f"registry {stack.registry.url}, proxy {stack.proxy.url}, containerd "
        f"{stack.containerd.address}, daemon {stack.daemon.control_socket}"
    )
    refs: dict[str, tuple[Reference, Reference]] = {}
    for version in VERSIONS:
        source = Reference.parse(f"{host}/demo/sample:{version.tag}")
        _say(f"building {source} from Debian packages (python3.11-minimal {version.python})")
        layers = sample_layers(version)

        async def push(ref: Reference = source, layers: list[bytes] = layers) -> None:
            async with RegistryClient(plain_http=True) as client:
                await push_image(client, ref, layers, docker=True, cmd=SAMPLE_COMMAND)

        asyncio.run(push())
        converted = source.with_tag(f"{version.tag}-starlight")
        code, out, err = stack.cli(
            "convert", "-q", "--plain-http", "--notify", str(source), str(converted)
        )
        if code != 0:
            print(err, file=sys.stderr)
            return 1
        _say(f"converted and notified: {out.strip()}")
        refs[version.tag] = (source, converted)

    steps: list[Step] = []
    held: set[str] = set()
    for tag, (source, _) in refs.items():
        descriptors = asyncio.run(_layers(source))
        transferred = sum(d.size for d in descriptors if d.digest not in held)
        held.update(d.digest for d in descriptors)
        started = time.monotonic()
        stack.containerd.ctr("images", "pull", "--plain-http", str(source))
        output = _run(stack, source, "overlayfs")
        steps.append(
            Step(
                "stock containerd",
                f"{'deploy' if tag == 'v1' else 'update'} {tag}",
                time.monotonic() - started,
                transferred,
                output,
            )
        )
    for tag, (_, converted) in refs.items():
        started = time.monotonic()
        out = stack.pull(converted)
        output = _run(stack, converted, "starlight")
        elapsed = time.monotonic() - started
        del out  # at READY: only the header had arrived; count the whole pull
        done = stack.pull(converted, "--wait")
        received = int(done.split("(")[1].split()[0])
        steps.append(
            Step(
                "starlight",
                f"{'deploy' if tag == 'v1' else 'update'} {tag}",
                elapsed,
                received,
                output,
            )
        )

    # Invariant 1: the converted image is a standard image — stock containerd runs it as is.
    _, converted_v1 = refs["v1"]
    stack.containerd.ctr("images", "pull", "--plain-http", str(converted_v1))
    stock_runs_converted = _run(stack, converted_v1, "overlayfs") == steps[0].output
    _say(
        "stock containerd runs the converted image unchanged"
        if stock_runs_converted
        else "STOCK CONTAINERD RAN THE CONVERTED IMAGE DIFFERENTLY"
    )
    print()
    print(f"{'method':<18} {'step':<10} {'pull+run (s)':>12} {'bytes over the wire':>20}")
    for step in steps:
        print(f"{step.method:<18} {step.action:<10} {step.seconds:>12.2f} {step.bytes:>20,}")
    stock = {s.action: s for s in steps if s.method == "stock containerd"}
    ours = {s.action: s for s in steps if s.method == "starlight"}
    same = all(stock[a].output == ours[a].output for a in stock)
    print()
    for action, step in stock.items():
        share = ours[action].bytes / max(step.bytes, 1)
        print(f"{action}: starlight moved {share:.0%} of the bytes of a stock pull, in one request")
    _say("containers printed the same output both ways" if same else "OUTPUTS DIFFER")
    for step in steps:
        print(f"   [{step.method} {step.action}] {step.output.strip().splitlines()[0]}")
    _say("(loopback here: for times over a WAN, run python -m benchmarks.wan)")
    return 0 if same and stock_runs_converted else 1


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
