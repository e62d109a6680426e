"""``Pull`` against the real proxy app (under ``httpx.ASGITransport``, images converted into a
real docker-registry) and a real store, with the network between them tampered with: the
pull's record in the store, a corrupted byte, a cut stream and a resume that asks only for
what is missing. No containerd (``register=False``) and no FUSE (a fake FUSE client)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, cast

import anyio
import httpx
import pytest

from benchmarks.services.registry import Registry
from starlight_core.digest import Digest
from starlight_core.errors import ImageNotFound
from starlight_core.platform import Platform
from starlight_core.proxy_client import ProxyClient
from starlight_core.reference import Reference
from starlight_core.registry import RegistryClient
from starlight_proxy.app import create_app
from starlight_proxy.config import ProxyConfig, UpstreamRegistry
from starlight_proxy.store import SQLMetadataStore, open_store
from starlight_worker.containerd import ContainerdClient
from starlight_worker.fs import AsyncFsClient
from starlight_worker.layers import StarlightLayers
from starlight_worker.metrics import Metrics
from starlight_worker.puller import Pull, PullOptions
from starlight_worker.store import PullState, Store
from tests.e2e.test_resilience import read_bundle
from tests.proxy.scenario import Scenario, make_scenario
from tests.worker.test_puller import FakeFused

pytestmark = [pytest.mark.anyio, pytest.mark.e2e]  # a real docker-registry

PROXY_URL = "http://proxy.test"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="module")
def scenario(registry: Registry) -> Scenario:
    return make_scenario(registry.host)


@pytest.fixture
async def proxy_app(registry: Registry, tmp_path: Path) -> AsyncIterator[Any]:
    store: SQLMetadataStore = await open_store(tmp_path / "proxy.db")
    async with RegistryClient(plain_http=True, retries=1, backoff=0.01) as client:
        app = create_app(
            ProxyConfig(registries=(UpstreamRegistry(host=registry.host, plain_http=True),)),
            store=store,
            registry=client,
        )
        yield app
    await store.close()


class _Cut(httpx.AsyncByteStream):
    def __init__(self, data: bytes) -> None:
        self.data = data

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for start in range(0, len(self.data), 16384):
            yield self.data[start : start + 16384]
        raise httpx.ReadError("injected cut")


class Tamper(httpx.AsyncBaseTransport):
    """The proxy app, with the first ``times`` bundle responses cut after ``cut_after`` bytes
    or with the byte at ``flip_at`` flipped. Keeps every bundle request and response body."""

    def __init__(
        self,
        app: Any,
        *,
        times: int = 1,
        cut_after: int | None = None,
        flip_at: int | None = None,
    ) -> None:
        self.inner = httpx.ASGITransport(app=app)
        self.times = times
        self.cut_after = cut_after
        self.flip_at = flip_at
        self.requests: list[dict[str, Any]] = []
        self.bodies: list[bytes] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        response = await self.inner.handle_async_request(request)
        if request.url.path != "/starlight/delta":
            return response
        self.requests.append(json.loads(request.content))
        body = await response.aread()
        headers = [(k, v) for k, v in response.headers.items() if k.lower() != "content-length"]
        if self.times > 0 and response.status_code == 200:
            self.times -= 1
            if self.flip_at is not None:
                body = (
                    body[: self.flip_at]
                    + bytes([body[self.flip_at] ^ 0xFF])
                    + body[self.flip_at + 1 :]
                )
            if self.cut_after is not None:
                self.bodies.append(body[: self.cut_after])
                return httpx.Response(
                    response.status_code, headers=headers, stream=_Cut(body[: self.cut_after])
                )
        self.bodies.append(body)
        return httpx.Response(response.status_code, headers=headers, stream=httpx.ByteStream(body))


def _no_containerd(namespace: str) -> ContainerdClient:
    raise AssertionError("register=False: containerd is not asked")


def _pull(
    store: Store,
    transport: httpx.AsyncBaseTransport,
    reference: Reference,
    *,
    retries: int = 5,
    record_id: int | None = None,
    metrics: Metrics | None = None,
) -> Pull:
    layers = StarlightLayers(store, cast(AsyncFsClient, FakeFused()), store.root / "fuse")
    proxy: Callable[[], ProxyClient] = lambda: ProxyClient(PROXY_URL, transport=transport)  # noqa: E731
    return Pull(
        PullOptions(
            reference, Platform.parse("linux/amd64"), "default", register=False, record_id=record_id
        ),
        store=store,
        layers=layers,
        proxy=proxy,
        containerd=_no_containerd,
        retries=retries,
        metrics=metrics,
    )


async def _notify(app: Any, reference: Reference) -> None:
    async with ProxyClient(PROXY_URL, transport=httpx.ASGITransport(app=app)) as proxy:
        await proxy.notify(reference)


def _verified(store: Store, contents: dict[Digest, bytes]) -> dict[Digest, bool]:
    """For each non-empty content: does the store hold a file with exactly these bytes?"""
    found = {}
    for digest, data in contents.items():
        if not data:
            continue
        path = store.find_content(digest)
        found[digest] = path is not None and path.read_bytes() == data
    return found


async def test_a_pull_is_recorded_running_then_done(
    proxy_app: Any, scenario: Scenario, tmp_path: Path
) -> None:
    v1 = scenario.v1
    await _notify(proxy_app, v1.reference)
    metrics = Metrics()
    with Store(tmp_path / "store") as store:
        pull = _pull(store, Tamper(proxy_app, times=0), v1.reference, metrics=metrics)
        await pull.run()
        assert pull.error is None
        assert pull.record_id is not None
        record = store.pull(pull.record_id)
        assert record.state is PullState.DONE
        assert pull.header is not None
        assert record.bundle_id == pull.header.bundle_id
        image = store.image(str(v1.reference), namespace="default")
        assert image is not None
        assert image.complete
        assert all(_verified(store, v1.contents).values())
        # FUSE got the layers when the header came in (no snapshot asked for them here).
        fused = cast(FakeFused, pull.layers.fused)
        assert [key for call, key in fused.calls if call == "attach"] == list(image.layers)
    assert metrics.value("starlight_worker_bundle_bytes_total") > 0
    assert metrics.value("starlight_worker_pulls_total", outcome="complete") == 1


async def test_a_pull_of_an_unknown_image_is_recorded_failed(
    proxy_app: Any, scenario: Scenario, tmp_path: Path
) -> None:
    unknown = scenario.v1.reference.with_tag("never-notified")
    with Store(tmp_path / "store") as store:
        pull = _pull(store, Tamper(proxy_app, times=0), unknown)
        await pull.run()
        assert isinstance(pull.error, ImageNotFound)
        assert not pull.usable
        assert pull.record_id is not None
        record = store.pull(pull.record_id)
        assert record.state is PullState.FAILED
        assert "never-notified" in record.error
        assert store.pulls(PullState.RUNNING) == []


async def test_a_corrupted_byte_is_refetched_and_never_placed(
    proxy_app: Any, scenario: Scenario, tmp_path: Path
) -> None:
    v1 = scenario.v1
    await _notify(proxy_app, v1.reference)
    # Late in the content section: some contents are placed by then, one is under way.
    transport = Tamper(proxy_app, flip_at=1_500_000)
    metrics = Metrics()
    with Store(tmp_path / "store") as store:
        pull = _pull(store, transport, v1.reference, metrics=metrics)
        await pull.run()
        assert pull.error is None
        assert all(_verified(store, v1.contents).values())
        assert list(store.staging_dir.iterdir()) == []  # partial contents were dropped
    resumes = sum(
        metrics.value("starlight_worker_pull_resumes_total", reason=reason)
        for reason in ("digest_mismatch", "bundle_protocol_error")
    )
    assert resumes == 1
    assert len(transport.requests) == 2
    assert len(transport.bodies[0]) > 1_500_000
    # The second bundle does not carry again what was placed before the bad byte.
    have = {Digest(d) for d in transport.requests[1]["have"]}
    assert have
    assert not have & read_bundle(transport.bodies[1]).contents


async def test_a_resumed_pull_asks_only_for_what_is_missing(
    proxy_app: Any, scenario: Scenario, tmp_path: Path
) -> None:
    v1 = scenario.v1
    await _notify(proxy_app, v1.reference)
    with Store(tmp_path / "store") as store:
        # The stream is cut mid-way and the pull gives up (no reconnection allowed): its image
        # was READY, so the store keeps the pull RUNNING, to be resumed.
        cut = Tamper(proxy_app, cut_after=600_000)
        first = _pull(store, cut, v1.reference, retries=0)
        await first.run()
        assert first.error is not None
        assert first.usable
        assert first.record_id is not None
        (running,) = store.pulls(PullState.RUNNING)
        assert running.id == first.record_id
        assert running.bundle_id
        held = store.contents_present(v1.contents)
        assert held, "nothing placed before the cut"
        assert held != {d for d, data in v1.contents.items() if data}

    # A restart: the store is opened again, and the pull continued from its record.
    with Store(tmp_path / "store") as store:
        again = Tamper(proxy_app, times=0)
        resumed = _pull(store, again, v1.reference, record_id=running.id)
        with anyio.fail_after(60):
            await resumed.run()
        assert resumed.error is None
        assert store.pull(running.id).state is PullState.DONE
        assert all(_verified(store, v1.contents).values())
    (request,) = again.requests
    assert set(map(Digest, request["have"])) == held
    sent = read_bundle(again.bodies[0])
    assert sent.complete
    assert not sent.contents & held  # nothing travelled twice
    assert sent.contents | held >= {d for d, data in v1.contents.items() if data}


async def test_an_update_header_leaves_out_the_file_lists_the_worker_holds(
    proxy_app: Any, scenario: Scenario, tmp_path: Path
) -> None:
    v1, v2 = scenario.v1, scenario.v2
    await _notify(proxy_app, v1.reference)
    await _notify(proxy_app, v2.reference)
    with Store(tmp_path / "store") as store:
        first = Tamper(proxy_app, times=0)
        await _pull(store, first, v1.reference).run()
        update = Tamper(proxy_app, times=0)
        pull = _pull(store, update, v2.reference)
        await pull.run()
        assert pull.error is None
        assert all(_verified(store, v2.contents).values())
        assert pull.header is not None
        assert pull.header.omitted == ()  # filled back from the store
        assert all(toc.entries for toc in pull.header.layers)
        held = store.image(str(v1.reference), namespace="default")
        assert held is not None
        base_key = held.layers[0]
    (request,) = update.requests
    assert request["from"] == [str(v1.reference)]
    assert f"sha256:{base_key.split('-', 1)[1]}" in request["tocs"]
    sent = read_bundle(update.bodies[0]).header
    assert sent is not None
    assert sent.omitted == (0,)  # v2's base layer is v1's: it travelled as an empty TOC
    assert sent.layers[0].entries == ()
    assert pull.header.layers[0].layer == sent.layers[0].layer
    assert len(update.bodies[0]) < len(first.bodies[0])


async def test_a_held_toc_gone_from_the_store_is_asked_for_again(
    proxy_app: Any, scenario: Scenario, tmp_path: Path
) -> None:
    v1, v2 = scenario.v1, scenario.v2
    await _notify(proxy_app, v1.reference)
    await _notify(proxy_app, v2.reference)
    with Store(tmp_path / "store") as store:
        await _pull(store, Tamper(proxy_app, times=0), v1.reference).run()
        image = store.image(str(v1.reference), namespace="default")
        assert image is not None
        base_dir = store.layer_dir(image.layers[0])
    (base_dir / "toc.json").unlink()  # the store cannot give the TOC the header leaves out
    with Store(tmp_path / "store") as store:
        transport = Tamper(proxy_app, times=0)
        pull = _pull(store, transport, v2.reference)
        with anyio.fail_after(60):
            await pull.run()
        assert pull.error is None
        assert all(_verified(store, v2.contents).values())
    first, second = transport.requests
    assert first["tocs"]
    assert "tocs" not in second  # the second bundle carries every file list
    resent = read_bundle(transport.bodies[1]).header
    assert resent is not None
    assert resent.omitted == ()
