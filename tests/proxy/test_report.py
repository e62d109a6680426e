"""``POST /starlight/report`` end to end: a real registry, converted images, the app under
``httpx.ASGITransport``, both store back ends. A reported trace orders the bundles of its
image (decoded here), a second trace merges by the documented rule, a group's traces order a
joint bundle, ``ordering=false`` gives layer order, and bad reports get clear JSON errors."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime

import attrs
import pytest
from starlette.applications import Starlette

from benchmarks.services.registry import Registry
from starlight_core.digest import Digest
from starlight_core.errors import AuthenticationRequired, ImageNotFound, InvalidInput
from starlight_core.fsview import merge as merged_view
from starlight_core.platform import Platform
from starlight_core.proxy_client import (
    TRACE_MEDIA_TYPE,
    DeltaRequest,
    ProxyClient,
    TraceTooLarge,
)
from starlight_core.reference import Reference
from starlight_core.registry import RegistryClient
from starlight_core.testing import TarMember
from starlight_core.trace import (
    AccessKind,
    FileAccess,
    Trace,
    TracedImage,
    TraceHeader,
    encode,
    merge,
)
from starlight_proxy.app import create_app
from starlight_proxy.config import AuthConfig, BasicUser
from starlight_proxy.reports import MAX_REPORT_SIZE
from starlight_proxy.store import SQLMetadataStore
from starlight_proxy.testing import DecodedBundle
from tests.proxy.scenario import Version, push_converted, text
from tests.proxy.test_api import client_for, config_for, fetch_bundle, raw_client

pytestmark = [pytest.mark.anyio, pytest.mark.e2e]


@attrs.frozen
class Images:
    app: Version
    """Three layers: a/1..3, b/1..3, c/1..3 (one file each of distinct content)."""
    db: Version
    """Two layers: d/1..3, e/1..3."""


def _layer(directory: str, tag: str) -> list[TarMember]:
    return [
        TarMember(directory, kind="dir"),
        *(
            TarMember(f"{directory}/{i}", data=text(f"{tag}-{directory}{i}", 3000 + 100 * i))
            for i in range(1, 4)
        ),
    ]


@pytest.fixture(scope="module")
def images(registry: Registry) -> Images:
    async def build() -> Images:
        tag = uuid.uuid4().hex[:8]
        async with RegistryClient(plain_http=True) as client:
            app = await push_converted(
                client,
                registry.host,
                f"report-app-{tag}",
                "v1",
                [_layer("a", tag), _layer("b", tag), _layer("c", tag)],
            )
            db = await push_converted(
                client,
                registry.host,
                f"report-db-{tag}",
                "v1",
                [_layer("d", tag), _layer("e", tag)],
            )
        return Images(app, db)

    return asyncio.run(build())


@pytest.fixture
async def registry_client() -> AsyncIterator[RegistryClient]:
    async with RegistryClient(plain_http=True, retries=1, backoff=0.01) as client:
        yield client


@pytest.fixture
def app(store: SQLMetadataStore, registry: Registry, registry_client: RegistryClient) -> Starlette:
    return create_app(config_for(registry), store=store, registry=registry_client)


@pytest.fixture
async def proxy(app: Starlette, images: Images) -> AsyncIterator[ProxyClient]:
    async with client_for(app) as client:
        await client.notify(images.app.reference)
        await client.notify(images.db.reference)
        yield client


def trace_of(
    version: Version,
    accesses: Sequence[tuple[int, int, str]],
    *,
    group: str | None = None,
    digest: Digest | None = None,
) -> Trace:
    """A trace of ``version``: (offset_ns, layer index, path) each."""
    header = TraceHeader(
        trace_id=str(uuid.uuid4()),
        image=TracedImage(
            reference=str(version.reference),
            manifest_digest=digest or version.digest,
            platform=Platform.parse("linux/amd64"),
        ),
        container_id="ctr-" + uuid.uuid4().hex[:6],
        started_at=datetime.now(UTC),
        group=group,
        worker="node-1",
    )
    return Trace(
        header, [FileAccess(t, layer, path, AccessKind.OPEN) for t, layer, path in accesses]
    )


def sent_order(bundle: DecodedBundle, *images: int) -> list[str]:
    """The paths of ``images`` (default: the first; every file of this test has a content of
    its own) in the order the bundle sent their contents."""
    header = bundle.header
    paths: dict[Digest, str] = {}
    for image in images or (0,):
        layers = [header.layers[i] for i in header.images[image].layers]
        for name, _, _, entry in merged_view(layers).file_entries():
            if entry.digest is not None:
                paths.setdefault(entry.digest, name)
    order: list[str] = []
    for index in bundle.extents:
        path = paths.get(header.extents[index].content)
        if path is not None and path not in order:
            order.append(path)
    return order


async def bundle_order(
    proxy: ProxyClient, *refs: Reference, ordering: bool = True
) -> DecodedBundle:
    return await fetch_bundle(
        proxy, DeltaRequest(to=tuple(str(r) for r in refs), ordering=ordering)
    )


LAYER_ORDER = [f"{d}/{i}" for d in "abc" for i in range(1, 4)]


async def test_a_reported_trace_orders_the_bundle(proxy: ProxyClient, images: Images) -> None:
    app = images.app
    assert sent_order(await bundle_order(proxy, app.reference)) == LAYER_ORDER
    first = trace_of(app, [(100, 2, "c/2"), (200, 0, "a/3"), (300, 1, "b/1")])
    result = await proxy.report(encode(first))
    assert (result.stored, result.accesses, result.files_ranked) == (True, 3, 3)
    assert result.image == f"{app.reference.name}@{app.digest}"

    bundle = await bundle_order(proxy, app.reference)
    assert bundle.complete
    rest = [path for path in LAYER_ORDER if path not in ("c/2", "a/3", "b/1")]
    assert sent_order(bundle) == ["c/2", "a/3", "b/1", *rest]

    # Reporting it again is harmless and changes nothing.
    assert not (await proxy.report(encode(first))).stored
    assert sent_order(await bundle_order(proxy, app.reference)) == ["c/2", "a/3", "b/1", *rest]

    # A second trace in another order: the documented rule (mean normalised rank, absence
    # counting 1 + penalty; ties by earliest offset): a/3 and b/1 score 1/3 each, b/1 was read
    # earliest (50 ns); c/2 scores 1; a/1 4/3.
    second = trace_of(app, [(50, 1, "b/1"), (150, 0, "a/3"), (250, 0, "a/1")])
    assert (await proxy.report(encode(second))).files_ranked == 4
    expected = ["b/1", "a/3", "c/2", "a/1"]
    assert list(merge([first, second]).order()) == expected
    rest = [path for path in LAYER_ORDER if path not in expected]
    assert sent_order(await bundle_order(proxy, app.reference)) == [*expected, *rest]

    # ordering=false: layer order, whatever the traces say.
    assert sent_order(await bundle_order(proxy, app.reference, ordering=False)) == LAYER_ORDER


async def test_a_group_orders_its_joint_bundle(proxy: ProxyClient, images: Images) -> None:
    app, db = images.app, images.db
    traces = [
        trace_of(app, [(5_000, 2, "c/1"), (20_000, 0, "a/2"), (60_000, 1, "b/3")], group="shop"),
        trace_of(db, [(30_000, 1, "e/3"), (40_000, 0, "d/1")], group="shop"),
    ]
    for trace in traces:
        assert (await proxy.report(encode(trace))).group == "shop"
    joint = await bundle_order(proxy, app.reference, db.reference)
    first_app, first_db = sent_order(joint, 0), sent_order(joint, 1)
    # One stream for both images: interleaved by when each container needed each file (the
    # images' own rankings alone would alternate: c/1, e/3, a/2, d/1, b/3).
    merged = [p for p in sent_order(joint, 0, 1) if p in ("c/1", "a/2", "b/3", "e/3", "d/1")]
    assert merged == ["c/1", "a/2", "e/3", "d/1", "b/3"]
    assert first_app[:3] == ["c/1", "a/2", "b/3"]
    assert first_db[:2] == ["e/3", "d/1"]
    # Each image alone keeps its own order.
    assert sent_order(await bundle_order(proxy, db.reference))[:2] == ["e/3", "d/1"]
    assert sent_order(await bundle_order(proxy, app.reference))[:3] == ["c/1", "a/2", "b/3"]


async def test_bad_reports_get_clear_errors_and_store_nothing(
    proxy: ProxyClient, app: Starlette, images: Images, store: SQLMetadataStore
) -> None:
    app_image = images.app
    good = encode(trace_of(app_image, [(1, 0, "a/1")]))
    async with raw_client(app) as http:

        async def post(body: bytes | AsyncIterator[bytes], status: int, code: str) -> str:
            response = await http.post(
                "/starlight/report", content=body, headers={"Content-Type": TRACE_MEDIA_TYPE}
            )
            assert response.status_code == status, response.text
            assert response.headers["content-type"] == "application/json"
            answer = response.json()
            assert answer["error"] == code
            return str(answer["message"])

        assert "line 2: not JSON" in await post(
            good.splitlines()[0] + b"\n{]\n", 400, "invalid_input"
        )
        assert "empty" in await post(b"", 400, "invalid_input")
        unknown_files = trace_of(app_image, [(1, 0, "a/1"), (2, 0, "etc/shadow"), (3, 1, "a/2")])
        message = await post(encode(unknown_files), 400, "invalid_input")
        assert "'etc/shadow' (not in layer 0)" in message
        assert "'a/2' (not in layer 1)" in message
        unknown_image = trace_of(app_image, [], digest=Digest("sha256:" + "1" * 64))
        assert "not known to this proxy" in await post(
            encode(unknown_image), 404, "image_not_found"
        )
        huge = good + b" " * MAX_REPORT_SIZE
        assert "larger than" in await post(huge, 413, "trace_too_large")

        async def streamed() -> AsyncIterator[bytes]:  # no Content-Length: counted on arrival
            yield good
            for _ in range(MAX_REPORT_SIZE // (1 << 20) + 1):
                yield b" " * (1 << 20)

        assert "larger than" in await post(streamed(), 413, "trace_too_large")
        response = await http.get("/starlight/report")
        assert response.status_code == 405

    # The client raises the matching errors.
    with pytest.raises(InvalidInput, match="etc/shadow"):
        await proxy.report(encode(unknown_files))
    with pytest.raises(ImageNotFound, match="ctr-starlight notify"):
        await proxy.report(encode(unknown_image))
    with pytest.raises(TraceTooLarge):
        await proxy.report(huge)

    image = await store.find_image(app_image.reference.name, digest=app_image.digest)
    assert await store.list_traces(image.id) == []
    assert await store.get_ranks([image.id]) == {image.id: {}}
    assert (await proxy.report(good)).stored


async def test_reports_need_credentials_like_every_api(
    store: SQLMetadataStore, registry: Registry, registry_client: RegistryClient, images: Images
) -> None:
    auth = AuthConfig(users=(BasicUser(name="worker", password="s3cret"),))
    secured = create_app(config_for(registry, auth=auth), store=store, registry=registry_client)
    body = encode(trace_of(images.app, [(1, 0, "a/1")]))
    async with raw_client(secured) as http:
        refused = await http.post("/starlight/report", content=body)
        assert refused.status_code == 401
        assert refused.json()["error"] == "authentication_required"
    async with client_for(secured, user="worker:s3cret") as proxy:
        await proxy.notify(images.app.reference)
        assert (await proxy.report(body)).stored
    async with client_for(secured, user="worker:wrong") as proxy:
        with pytest.raises(AuthenticationRequired):
            await proxy.report(body)
