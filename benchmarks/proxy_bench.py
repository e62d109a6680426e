"""Proxy benchmarks on loopback: notify time per GB, bundle throughput with the proxy's CPU time
and peak RSS, for a synthetic image of about ``--size`` bytes of files.

    .venv/bin/python -m benchmarks.proxy_bench [--size 1GiB] [--layers 4] [--runs 2]
                                               [--workdir DIR] [--json FILE]

A private docker-registry and a ``starlight-proxy`` process (SQLite) run on loopback; the image
is written in Starlight format directly (no conversion step) from files of mixed sizes, half
incompressible, half text-like. The proxy is restarted before the bundle runs so that its peak
RSS (``VmHWM``) covers bundles only. The client drains the stream without decoding it: the
figure is what one proxy process can serve. Targets (issue 3): >= 1 Gbit/s, peak RSS < 250 MB.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import attrs

from benchmarks.images.build import image_config
from benchmarks.services.proxy import ProxyProcess
from benchmarks.services.registry import Registry
from starlight_core import oci, wire
from starlight_core.digest import Digest, sha256_digest
from starlight_core.layer.writer import LayerWriter
from starlight_core.proxy_client import DeltaRequest, ProxyClient
from starlight_core.reference import Reference
from starlight_core.registry import RegistryClient
from starlight_core.testing import TarMember, build_tar

_SIZES = (64 << 10, 256 << 10, 1 << 20, 3 << 20, 6 << 20, 20 << 10)
_WORDS = b"alpha beta gamma delta epsilon starlight proxy container layer image zeta eta\n"


@attrs.frozen
class ProcessSample:
    cpu: float
    """User + system seconds."""
    peak_rss: int
    """Bytes (VmHWM)."""


def sample(pid: int) -> ProcessSample:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    cpu = (int(fields[11]) + int(fields[12])) / ticks
    status = Path(f"/proc/{pid}/status").read_text()
    match = re.search(r"^VmHWM:\s+(\d+) kB", status, re.MULTILINE)
    assert match is not None
    return ProcessSample(cpu, int(match.group(1)) * 1024)


def _files(layer: int, size: int, rng: random.Random) -> Iterator[TarMember]:
    text = _WORDS * ((8 << 20) // len(_WORDS))
    total = 0
    index = 0
    while total < size:
        length = _SIZES[index % len(_SIZES)]
        head = f"layer {layer} file {index}\n".encode()
        if index % 2:
            start = rng.randrange(0, len(text) - length)
            data = head + text[start : start + length]
        else:
            data = head + rng.randbytes(length)
        yield TarMember(f"data/l{layer}/d{index // 100}/f{index}", data=data)
        total += len(data)
        index += 1


async def push_synthetic(
    client: RegistryClient, reference: Reference, size: int, layers: int
) -> tuple[int, int, int]:
    """Push a Starlight-format image; returns (files, uncompressed bytes, compressed bytes)."""
    rng = random.Random(42)
    descriptors = []
    diff_ids: list[Digest] = []
    files = content = compressed = 0
    for layer in range(layers):
        members = [TarMember("data", kind="dir"), TarMember(f"data/l{layer}", kind="dir")]
        dirs: set[str] = set()
        for member in _files(layer, size // layers, rng):
            parent = member.name.rsplit("/", 1)[0]
            if parent not in dirs:
                dirs.add(parent)
                members.append(TarMember(parent, kind="dir"))
            members.append(member)
            files += 1
            content += len(member.data)
        tar = build_tar(members)
        del members
        writer = LayerWriter()
        pieces = [
            writer.write(memoryview(tar)[i : i + (8 << 20)]) for i in range(0, len(tar), 8 << 20)
        ]
        pieces.append(writer.close())
        blob = b"".join(pieces)
        del pieces, tar
        digest = sha256_digest(blob)
        await client.upload_blob(reference, blob, digest)
        descriptors.append(
            oci.Descriptor(media_type=oci.OCI_LAYER_GZIP, digest=digest, size=len(blob))
        )
        diff_ids.append(writer.result.diff_id)
        compressed += len(blob)
        del blob
    config = image_config(diff_ids)
    config_digest = sha256_digest(config)
    await client.upload_blob(reference, config, config_digest)
    manifest = oci.Manifest(
        schema_version=2,
        media_type=oci.OCI_MANIFEST,
        config=oci.Descriptor(media_type=oci.OCI_CONFIG, digest=config_digest, size=len(config)),
        layers=tuple(descriptors),
    )
    await client.put_manifest(reference, wire.dumps(manifest), oci.OCI_MANIFEST)
    return files, content, compressed


async def drain(url: str, request: DeltaRequest) -> tuple[int, float]:
    start = time.perf_counter()
    size = 0
    async with ProxyClient(url, timeout=300.0) as client, client.delta(request) as stream:
        async for chunk in stream:
            size += len(chunk)
    return size, time.perf_counter() - start


def run(size: int, layers: int, runs: int, workdir: Path) -> dict[str, object]:
    results: dict[str, object] = {"cores": os.cpu_count()}
    with Registry(workdir / "registry") as registry:
        reference = Reference.parse(f"{registry.host}/bench/synthetic:v1")

        async def build() -> tuple[int, int, int]:
            async with RegistryClient(plain_http=True) as client:
                return await push_synthetic(client, reference, size, layers)

        start = time.perf_counter()
        files, content, compressed = asyncio.run(build())
        results["image"] = {
            "files": files,
            "layers": layers,
            "content_bytes": content,
            "compressed_bytes": compressed,
            "build_seconds": round(time.perf_counter() - start, 1),
        }
        print(f"image: {files} files, {content / 1e9:.2f} GB, {compressed / 1e9:.2f} GB compressed")

        proxy = ProxyProcess(
            workdir / "proxy", registries=[{"host": registry.host, "plain_http": True}]
        )
        with proxy:
            before = sample(proxy.pid)

            async def notify() -> float:
                async with ProxyClient(proxy.url) as client:
                    began = time.perf_counter()
                    await client.notify(reference, timeout=3600)
                    return time.perf_counter() - began

            seconds = asyncio.run(notify())
            after = sample(proxy.pid)
            results["notify"] = {
                "seconds": round(seconds, 2),
                "seconds_per_gb_compressed": round(seconds / (compressed / 1e9), 2),
                "mb_per_s": round(compressed / seconds / 1e6, 1),
                "proxy_cpu_seconds": round(after.cpu - before.cpu, 2),
                "proxy_peak_rss_mb": round(after.peak_rss / 1e6, 1),
            }
            print(f"notify: {results['notify']}")

        bundles = []
        with proxy:  # restarted: its peak RSS now covers bundles only
            start_sample = sample(proxy.pid)
            request = DeltaRequest(to=(str(reference),))
            for _ in range(runs):
                before = sample(proxy.pid)
                sent, seconds = asyncio.run(drain(proxy.url, request))
                after = sample(proxy.pid)
                bundles.append(
                    {
                        "bytes": sent,
                        "seconds": round(seconds, 2),
                        "mb_per_s": round(sent / seconds / 1e6, 1),
                        "gbit_per_s": round(sent * 8 / seconds / 1e9, 2),
                        "proxy_cpu_seconds": round(after.cpu - before.cpu, 2),
                        "proxy_cpu_share": round((after.cpu - before.cpu) / seconds, 2),
                    }
                )
                print(f"bundle: {bundles[-1]}")
            final = sample(proxy.pid)
            results["bundle"] = {
                "runs": bundles,
                "proxy_peak_rss_mb": round(final.peak_rss / 1e6, 1),
                "proxy_rss_at_start_mb": round(start_sample.peak_rss / 1e6, 1),
            }
            print(f"bundle peak RSS: {results['bundle']}")
    return results


def _size(text: str) -> int:
    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([kmg]?)i?b?", text.strip().lower())
    if match is None:
        raise argparse.ArgumentTypeError(f"invalid size {text!r}")
    return int(
        float(match.group(1)) * {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}[match.group(2)]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=_size, default=1 << 30)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--workdir", type=Path)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if args.workdir is None:
        with tempfile.TemporaryDirectory(prefix="proxy-bench-") as directory:
            results = run(args.size, args.layers, args.runs, Path(directory))
    else:
        results = run(args.size, args.layers, args.runs, args.workdir)
    text = json.dumps(results, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
