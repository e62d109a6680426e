"""Streaming bundles: resuming cut streams, a failing registry, and a corrupt blob.

The registry is real (docker-registry); faults are injected by ``FaultyProxy`` between the
proxy and it, or by corrupting a blob in the registry's storage.
"""

from __future__ import annotations

import random
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest
from starlette.applications import Starlette

from benchmarks.services.faulty import Fault, FaultyProxy
from benchmarks.services.registry import Registry
from starlight_core.bundle import BundleReader, Extent, Header, NeedData, ResumeInfo
from starlight_core.digest import Digest
from starlight_core.errors import DigestMismatch, RegistryUnavailable
from starlight_core.layer.toc import TOC
from starlight_core.proxy_client import DeltaRequest, ProxyClient
from starlight_core.registry import RegistryClient
from starlight_core.testing import TarMember
from starlight_proxy.app import create_app
from starlight_proxy.config import ProxyConfig, UpstreamRegistry
from starlight_proxy.store import SQLMetadataStore
from starlight_proxy.testing import decode_bundle, materialize
from tests.proxy.scenario import (
    Scenario,
    Version,
    base_layer,
    make_scenario,
    noise,
    push_converted,
)
from tests.proxy.test_api import fetch_bundle, scan_tocs

pytestmark = [pytest.mark.anyio, pytest.mark.e2e]

PROXY_URL = "http://proxy.test"


@pytest.fixture(scope="module")
def scenario(registry: Registry) -> Scenario:
    return make_scenario(registry.host)


@pytest.fixture(scope="module")
def faulty(registry: Registry) -> Iterator[FaultyProxy]:
    with FaultyProxy(registry.url) as proxy:
        yield proxy


@pytest.fixture
def app(store: SQLMetadataStore, registry: Registry, faulty: FaultyProxy) -> Iterator[Starlette]:
    """The proxy, reaching the registry through the fault injector."""
    config = ProxyConfig(registries=(UpstreamRegistry(host=registry.host, url=faulty.url),))
    client = RegistryClient(plain_http=[faulty.host], retries=2, backoff=0.01)
    faulty.clear()
    yield create_app(config, store=store, registry=client)
    faulty.clear()


@pytest.fixture
async def proxy(app: Starlette) -> AsyncIterator[ProxyClient]:
    async with ProxyClient(PROXY_URL, transport=httpx.ASGITransport(app=app)) as client:
        yield client


async def metric(proxy: ProxyClient, name: str) -> float:
    async with httpx.AsyncClient(transport=proxy._http._transport, base_url=PROXY_URL) as http:
        text = (await http.get("/metrics")).text
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split(" ")[1])
    return 0.0


async def raw_bundle(proxy: ProxyClient, request: DeltaRequest) -> tuple[str, bytes]:
    async with proxy.delta(request) as stream:
        return stream.bundle_id, await stream.read()


def blob_range_reads(faulty: FaultyProxy) -> int:
    return sum(1 for method, path in faulty.requests if method == "GET" and "/blobs/" in path)


# --- resume ---------------------------------------------------------------------------------


async def test_resume_by_offset_gives_the_same_bytes_without_refetching(
    proxy: ProxyClient, scenario: Scenario
) -> None:
    v1, v2 = scenario.v1, scenario.v2
    await proxy.notify(v1.reference)
    await proxy.notify(v2.reference)
    request = DeltaRequest(to=(str(v2.reference),))
    before = await metric(proxy, 'starlight_proxy_registry_bytes_total{purpose="bundle"}')
    bundle_id, whole = await raw_bundle(proxy, request)
    full_fetch = (
        await metric(proxy, 'starlight_proxy_registry_bytes_total{purpose="bundle"}') - before
    )
    decoded = decode_bundle(whole)
    header_size = decoded.header_size
    layout_sizes = [e.compressed_size for e in decoded.header.extents]

    rng = random.Random(3)
    cuts = {0, 1, header_size - 1, header_size, header_size + 9, len(whole) - 1, len(whole)}
    cuts |= {rng.randrange(header_size, len(whole)) for _ in range(6)}
    for cut in sorted(cuts):
        start = await metric(proxy, 'starlight_proxy_registry_bytes_total{purpose="bundle"}')
        resumed_id, rest = await raw_bundle(
            proxy, DeltaRequest(to=request.to, offset=cut, bundle_id=bundle_id)
        )
        fetched = (
            await metric(proxy, 'starlight_proxy_registry_bytes_total{purpose="bundle"}') - start
        )
        assert resumed_id == bundle_id
        assert whole[:cut] + rest == whole, cut
        # Extents that ended before the cut were not read from the registry again.
        done = 0
        position = header_size
        for size in layout_sizes:
            position += 9 + size
            if position > cut:
                break
            done += size
        assert fetched + done <= full_fetch, cut

        # The worker's side: a reader resumed on the partial record continues to the end.
        if cut < header_size:
            continue  # no header yet: the worker simply starts over
        first = BundleReader()
        first.receive_data(whole[:cut])
        header, received = drain(first)
        assert header is not None
        second = BundleReader.resume(
            header.header, header_size=header.size, offset=cut, partial=first.pending
        )
        second.receive_data(rest)
        second.receive_data(b"")
        _, later = drain(second)
        assert second.done
        assert received + later == list(range(len(layout_sizes))), cut


def drain(
    reader: BundleReader, indexes: list[int] | None = None
) -> tuple[Header | None, list[int]]:
    """Every event the reader can give now: the header, and the extents (verified; their
    indexes appended to ``indexes`` as they come, so they are known if an error follows)."""
    header = None
    indexes = [] if indexes is None else indexes
    while not isinstance(event := reader.next_event(), NeedData):
        if isinstance(event, Header):
            header = event
        elif isinstance(event, Extent):
            event.verified_data()
            indexes.append(event.index)
    return header, indexes


async def test_resume_by_have_sends_only_the_rest(proxy: ProxyClient, scenario: Scenario) -> None:
    v1 = scenario.v1
    await proxy.notify(v1.reference)
    request = DeltaRequest(to=(str(v1.reference),))
    bundle_id, whole = await raw_bundle(proxy, request)
    full = decode_bundle(whole)
    rng = random.Random(7)
    for cut in sorted(rng.randrange(full.header_size, len(whole)) for _ in range(4)):
        # What a worker got before the cut: whole contents only (a half content is redone).
        reader = BundleReader()
        reader.receive_data(whole[:cut])
        chunks: dict[Digest, list[bytes]] = {}
        while isinstance(event := reader.next_event(), Header | Extent):
            if isinstance(event, Extent):
                chunks.setdefault(event.descriptor.content, []).append(event.verified_data())
        counts: dict[Digest, int] = {}
        for descriptor in full.header.extents:
            counts[descriptor.content] = counts.get(descriptor.content, 0) + 1
        got = {d: b"".join(parts) for d, parts in chunks.items() if len(parts) == counts[d]}

        again = DeltaRequest(
            to=request.to,
            have=tuple(sorted(got)),
            resumes=ResumeInfo(bundle_id=bundle_id, offset=cut),
        )
        rest = await fetch_bundle(proxy, again)
        assert rest.header.resume == ResumeInfo(bundle_id=bundle_id, offset=cut)
        assert not set(rest.contents) & set(got), "a completed content was sent again"
        assert set(rest.contents) | set(got) == set(full.contents)
        assert set(rest.header.local) == set(got)
        assert materialize(rest.header, 0, {**got, **rest.contents}) == v1.files


# --- a failing registry ---------------------------------------------------------------------


def _blob_gets(method: str, path: str) -> bool:
    return method == "GET" and "/blobs/sha256:" in path


async def test_registry_hiccups_are_retried(
    proxy: ProxyClient, faulty: FaultyProxy, scenario: Scenario
) -> None:
    await proxy.notify(scenario.v1.reference)
    request = DeltaRequest(to=(str(scenario.v1.reference),))
    clean = await fetch_bundle(proxy, request)
    faulty.add(Fault(match=_blob_gets, status=503, times=1))
    faulty.add(Fault(match=_blob_gets, cut_after=1000, times=1))
    retried = await fetch_bundle(proxy, request)
    assert retried.complete
    assert retried.contents == clean.contents
    assert all(fault.hits == fault.times for fault in faulty.faults)


async def test_registry_down_mid_stream_ends_with_an_error_record(
    proxy: ProxyClient, faulty: FaultyProxy, scenario: Scenario
) -> None:
    await proxy.notify(scenario.v1.reference)
    faulty.add(Fault(match=_blob_gets, status=503, times=1000))
    async with proxy.delta(DeltaRequest(to=(str(scenario.v1.reference),))) as stream:
        assert stream.bundle_id  # the header went out before the registry was asked
        data = await stream.read()
    reader = BundleReader()
    reader.receive_data(data)
    reader.receive_data(b"")
    assert isinstance(reader.next_event(), Header)
    with pytest.raises(RegistryUnavailable, match="503"):
        drain(reader)
    assert await metric(proxy, 'starlight_proxy_bundles_total{outcome="error"}') == 1


# --- a corrupt blob -------------------------------------------------------------------------


def _blob_path(registry: Registry, digest: Digest) -> Path:
    return (
        registry.storage / "docker/registry/v2/blobs/sha256" / digest.hex[:2] / digest.hex / "data"
    )


async def test_corrupt_registry_bytes_are_never_sent(
    proxy: ProxyClient, registry: Registry
) -> None:
    tag = uuid.uuid4().hex[:10]
    layers = [
        base_layer(tag),
        [TarMember("srv", kind="dir"), TarMember("srv/payload.bin", data=noise(tag, 100_000))],
    ]
    async with RegistryClient(plain_http=True) as client:
        version: Version = await push_converted(
            client, registry.host, f"tamper-{tag}", "v1", layers
        )
    await proxy.notify(version.reference)
    tocs: list[TOC] = await scan_tocs(registry, version.reference)
    (payload,) = [e for e in tocs[1].entries if e.name == "srv/payload.bin"]
    chunk = payload.chunks[0]
    # Flip one byte in the middle of that file's gzip member, in the registry's storage.
    path = _blob_path(registry, tocs[1].layer.digest)
    data = bytearray(path.read_bytes())
    data[chunk.compressed_offset + chunk.compressed_size // 2] ^= 0xFF
    path.write_bytes(bytes(data))

    _, stream = await raw_bundle(proxy, DeltaRequest(to=(str(version.reference),)))
    reader = BundleReader()
    reader.receive_data(stream)
    reader.receive_data(b"")
    header = reader.next_event()
    assert isinstance(header, Header)
    bad = [i for i, e in enumerate(header.header.extents) if e.content == payload.digest]
    sent: list[int] = []  # everything sent before the error is verified intact
    with pytest.raises(DigestMismatch, match="registry's bytes do not match the TOC"):
        drain(reader, sent)
    assert not set(sent) & set(bad)
    assert sent == list(range(len(sent)))
    assert await metric(proxy, "starlight_proxy_digest_mismatches_total") == 1
    assert (
        bytes(data[chunk.compressed_offset : chunk.compressed_offset + chunk.compressed_size])
        not in stream
    )
