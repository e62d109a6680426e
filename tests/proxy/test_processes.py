"""Two real ``starlight-proxy`` processes sharing one PostgreSQL: notify through either, bundles
from both at once, and a stream cut on one replica resumed on the other."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from benchmarks.services import wait_for
from benchmarks.services.faulty import Fault, FaultyProxy
from benchmarks.services.postgres import Postgres
from benchmarks.services.proxy import ProxyProcess
from benchmarks.services.registry import Registry
from starlight_core.errors import ProxyUnavailable
from starlight_core.proxy_client import BundleStream, DeltaRequest, NotifyResult, ProxyClient
from starlight_proxy.testing import decode_bundle, materialize
from tests.proxy.scenario import Scenario, make_scenario

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def scenario(registry: Registry) -> Scenario:
    return make_scenario(registry.host)


@pytest.fixture(scope="module")
def upstream(registry: Registry) -> Iterator[FaultyProxy]:
    """The registry, behind a recorder (to count what the proxies read)."""
    with FaultyProxy(registry.url) as faulty:
        yield faulty


@pytest.fixture(scope="module")
def replicas(
    postgres: Postgres,
    registry: Registry,
    upstream: FaultyProxy,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[ProxyProcess, ProxyProcess]]:
    database = postgres.create_schema(f"replicas_{uuid.uuid4().hex[:12]}")
    registries = [{"host": registry.host, "url": upstream.url}]
    with (
        ProxyProcess(tmp_path_factory.mktemp("a"), database=database, registries=registries) as a,
        ProxyProcess(tmp_path_factory.mktemp("b"), database=database, registries=registries) as b,
    ):
        yield a, b


async def notify(proxy: ProxyProcess, reference: object) -> NotifyResult:
    async with ProxyClient(proxy.url) as client:
        return await client.notify(str(reference))


async def bundle(url: str, request: DeltaRequest) -> tuple[str, bytes]:
    async with ProxyClient(url) as client, client.delta(request) as stream:
        return stream.bundle_id, await stream.read()


def test_concurrent_notifies_on_two_replicas_index_once(
    replicas: tuple[ProxyProcess, ProxyProcess], scenario: Scenario, upstream: FaultyProxy
) -> None:
    a, b = replicas
    upstream.requests.clear()

    async def both() -> list[NotifyResult]:
        return list(
            await asyncio.gather(notify(a, scenario.v1.reference), notify(b, scenario.v1.reference))
        )

    results = asyncio.run(both())
    assert {r.images[0].digest for r in results} == {scenario.v1.digest}
    assert all(r.images[0].state == "ready" for r in results)
    # The store's claim let one replica scan; the other waited for it (or found it ready).
    assert sorted(r.layers_scanned for r in results) == [0, 2]
    layer_reads = [
        path for method, path in upstream.requests if method == "GET" and "/blobs/" in path
    ]
    config = [p for p in layer_reads if p.endswith(str(_config_digest(a, scenario)))]
    assert len(layer_reads) - len(config) <= 2 * 2  # per layer: a 128-byte peek, one read


def _config_digest(proxy: ProxyProcess, scenario: Scenario) -> str:
    async def find() -> str:
        async with ProxyClient(proxy.url) as client:
            (image,) = [i for i in await client.images() if i.digest == scenario.v1.digest]
            return str(image.config_digest)

    return asyncio.run(find())


def test_bundles_from_both_replicas_at_once(
    replicas: tuple[ProxyProcess, ProxyProcess], scenario: Scenario
) -> None:
    a, b = replicas
    asyncio.run(notify(a, scenario.v1.reference))
    asyncio.run(notify(a, scenario.v2.reference))  # only through a: b reads it from the database
    request = DeltaRequest(to=(str(scenario.v2.reference),), from_=(str(scenario.v1.reference),))

    async def both() -> list[tuple[str, bytes]]:
        return list(await asyncio.gather(*(bundle(p.url, request) for p in (a, b, a, b))))

    answers = asyncio.run(both())
    assert len(set(answers)) == 1  # the same id and the same bytes from either replica
    decoded = decode_bundle(answers[0][1])
    assert decoded.complete
    assert materialize(decoded.header, 0, {**scenario.v1.contents, **decoded.contents}) == (
        scenario.v2.files
    )


def test_stream_cut_on_one_replica_resumes_on_the_other(
    replicas: tuple[ProxyProcess, ProxyProcess], scenario: Scenario, tmp_path: Path
) -> None:
    a, b = replicas
    asyncio.run(notify(b, scenario.v3.reference))
    request = DeltaRequest(to=(str(scenario.v3.reference),))
    bundle_id, whole = asyncio.run(bundle(b.url, request))

    with FaultyProxy(a.url) as cutter:
        cutter.add(Fault(match=lambda m, p: p == "/starlight/delta", cut_after=len(whole) // 2))

        async def interrupted() -> tuple[str, bytes]:
            got = bytearray()

            async def receive(stream: BundleStream) -> None:
                async for chunk in stream:
                    got.extend(chunk)

            async with ProxyClient(cutter.url) as client, client.delta(request) as stream:
                with pytest.raises(ProxyUnavailable, match="cut after"):
                    await receive(stream)
                return stream.bundle_id, bytes(got)

        first_id, first = asyncio.run(interrupted())
    assert first_id == bundle_id
    assert 0 < len(first) < len(whole)
    resumed_id, rest = asyncio.run(
        bundle(b.url, DeltaRequest(to=request.to, offset=len(first), bundle_id=bundle_id))
    )
    assert resumed_id == bundle_id
    assert first + rest == whole
    assert materialize(decode_bundle(first + rest).header, 0, decode_bundle(whole).contents) == (
        scenario.v3.files
    )


def test_a_worker_that_goes_away_stops_the_registry_reads(
    registry: Registry, scenario: Scenario, tmp_path: Path
) -> None:
    """The proxy stops fetching for a bundle whose client disconnected."""
    with (
        FaultyProxy(registry.url) as slow,
        ProxyProcess(
            tmp_path / "proxy",
            registries=[{"host": registry.host, "url": slow.url}],
            # One Range read per extent, four in flight: many reads in all, few at any time.
            settings={"max_range": 1, "max_gap": 0, "ranges_in_flight": 4},
        ) as proxy,
    ):
        asyncio.run(notify(proxy, scenario.v1.reference))

        def blob_gets() -> int:
            return sum(1 for m, path in slow.requests if m == "GET" and "/blobs/" in path)

        before = blob_gets()
        slow.add(Fault(match=lambda m, p: "/blobs/" in p, rate=100_000, times=10_000))

        async def header_only() -> int:
            request = DeltaRequest(to=(str(scenario.v1.reference),))
            async with ProxyClient(proxy.url) as client, client.delta(request) as stream:
                async for _ in stream:
                    break  # the first bytes (the header): then hang up
                return stream.extents

        extents = asyncio.run(header_only())
        assert extents > 20

        async def cancelled() -> float:
            async with ProxyClient(proxy.url) as client:
                text = (await client._http.get("/metrics")).text
            for line in text.splitlines():
                if line.startswith('starlight_proxy_bundles_total{outcome="cancelled"}'):
                    return float(line.split()[1])
            return 0.0

        wait_for(lambda: asyncio.run(cancelled()) == 1.0, timeout=30, what="cancellation")
        stopped = blob_gets()
        time.sleep(1.0)
        assert blob_gets() == stopped  # nothing more was asked of the registry
        # About the reads in flight when the worker left, not one per extent.
        assert stopped - before <= 2 * 4
