"""The proxy's whole planning step for an image of 100,000 files, on SQLite.

    .venv/bin/pytest benchmarks/micro/test_proxy_prepare_bench.py --benchmark-only

``BundlePlanner.prepare`` is what a delta request costs before its first byte: look both images
up, load v2's 100,000 entries, ask which contents v1 holds, plan (``delta.plan``), build and
encode the header. The plan alone is ``test_delta_bench``; this adds the store and the header.
"""

from __future__ import annotations

from collections.abc import Iterator

import anyio.from_thread
import pytest
from pytest_benchmark.fixture import BenchmarkFixture

from benchmarks.micro.test_store_bench import FILES, NAME, index, make_toc
from starlight_core.proxy_client import DeltaRequest
from starlight_proxy.bundles import BundlePlanner, PreparedBundle
from starlight_proxy.config import ProxyConfig, UpstreamRegistry
from starlight_proxy.metrics import Metrics
from starlight_proxy.notify import Indexer
from starlight_proxy.store import SQLMetadataStore, open_store
from starlight_proxy.upstream import Upstreams


@pytest.fixture(scope="module")
def planner(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[anyio.from_thread.BlockingPortal, BundlePlanner]]:
    """v1 = [base 50k, app 50k]; v2 = [base, app' 50k with a tenth of app's contents]."""
    half = FILES // 2
    base, app = make_toc("base", half), make_toc("app", half, start=half)
    app2 = make_toc("app2", half, start=half + half * 9 // 10)
    path = tmp_path_factory.mktemp("store") / "store.db"
    config = ProxyConfig(registries=(UpstreamRegistry(host=NAME.split("/")[0], plain_http=True),))
    with anyio.from_thread.start_blocking_portal() as portal:
        store: SQLMetadataStore = portal.call(open_store, path)
        portal.call(index, store, [base, app], "v1")
        portal.call(index, store, [base, app2], "v2")
        upstreams = Upstreams(config)
        metrics = Metrics()
        try:
            yield (
                portal,
                BundlePlanner(store, upstreams, Indexer(store, upstreams, metrics), metrics),
            )
        finally:
            portal.call(upstreams.aclose)
            portal.call(store.close)


def test_prepare_update_bundle_100k_files(
    benchmark: BenchmarkFixture,
    planner: tuple[anyio.from_thread.BlockingPortal, BundlePlanner],
) -> None:
    portal, bundles = planner
    request = DeltaRequest(to=(f"{NAME}:v2",), from_=(f"{NAME}:v1",), platform="linux/amd64")
    prepared: PreparedBundle = benchmark(portal.call, bundles.prepare, request)
    # Only app2's new nine tenths travel; the rest is copied from v1.
    assert len(prepared.extents) == FILES // 2 * 9 // 10
    assert prepared.local == FILES // 2 + FILES // 2 // 10


def test_prepare_full_bundle_100k_files(
    benchmark: BenchmarkFixture,
    planner: tuple[anyio.from_thread.BlockingPortal, BundlePlanner],
) -> None:
    portal, bundles = planner
    request = DeltaRequest(to=(f"{NAME}:v2",), platform="linux/amd64")
    prepared: PreparedBundle = benchmark(portal.call, bundles.prepare, request)
    assert len(prepared.extents) == FILES
    assert len(prepared.header_bytes) < 16 * 1024 * 1024
