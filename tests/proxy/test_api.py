"""The proxy's API end to end: a real docker-registry, converted images, both store back ends,
the app under ``httpx.ASGITransport`` and our ``ProxyClient``."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import uuid
from collections.abc import AsyncIterator, Sequence
from typing import cast

import attrs
import httpx
import pytest
from starlette.applications import Starlette

from benchmarks.images.build import push_image
from benchmarks.services import free_port
from benchmarks.services.registry import Registry
from starlight_core import oci, wire
from starlight_core.bundle import EXTENT_OVERHEAD, encode_end
from starlight_core.digest import Digest
from starlight_core.errors import (
    AuthenticationRequired,
    BundleChanged,
    CorruptLayer,
    ImageNotFound,
    InvalidInput,
    InvalidPlatform,
    InvalidReference,
    NotStarlightFormat,
    RegistryNotServed,
    RegistryUnavailable,
)
from starlight_core.layer.scan import LayerScanner
from starlight_core.layer.toc import TOC
from starlight_core.proxy_client import DeltaRequest, ProxyClient
from starlight_core.reference import Reference
from starlight_core.registry import RegistryClient
from starlight_core.testing import TarMember, build_tar
from starlight_proxy.app import create_app
from starlight_proxy.config import AuthConfig, BasicUser, ProxyConfig, UpstreamRegistry
from starlight_proxy.store import SQLMetadataStore
from starlight_proxy.testing import DecodedBundle, decode_bundle, materialize
from tests.proxy.scenario import (
    Scenario,
    base_layer,
    expected_files,
    make_scenario,
    push_converted_index,
)

pytestmark = [pytest.mark.anyio, pytest.mark.e2e]

PROXY_URL = "http://proxy.test"


@pytest.fixture(scope="module")
def scenario(registry: Registry) -> Scenario:
    return make_scenario(registry.host)


def config_for(registry: Registry, **settings: object) -> ProxyConfig:
    return ProxyConfig(
        registries=(UpstreamRegistry(host=registry.host, plain_http=True),),
        **settings,  # type: ignore[arg-type]
    )


@pytest.fixture
async def registry_client() -> AsyncIterator[RegistryClient]:
    async with RegistryClient(plain_http=True, retries=1, backoff=0.01) as client:
        yield client


def client_for(app: Starlette, *, user: str | None = None, token: str | None = None) -> ProxyClient:
    return ProxyClient(PROXY_URL, transport=httpx.ASGITransport(app=app), user=user, token=token)


@pytest.fixture
def app(store: SQLMetadataStore, registry: Registry, registry_client: RegistryClient) -> Starlette:
    return create_app(config_for(registry), store=store, registry=registry_client)


@pytest.fixture
async def proxy(app: Starlette) -> AsyncIterator[ProxyClient]:
    async with client_for(app) as client:
        yield client


@pytest.fixture
async def http(app: Starlette) -> AsyncIterator[httpx.AsyncClient]:
    """Raw HTTP to the same app."""
    async with raw_client(app) as client:
        yield client


def raw_client(app: Starlette) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=PROXY_URL)


async def fetch_bundle(proxy: ProxyClient, request: DeltaRequest) -> DecodedBundle:
    async with proxy.delta(request) as stream:
        data = await stream.read()
        assert stream.bundle_id
        assert stream.size == len(data) + stream.offset
    return decode_bundle(data)


async def scan_tocs(registry: Registry, reference: Reference) -> list[TOC]:
    """The TOCs of an image's layers, scanned here from the registry's blobs."""
    async with RegistryClient(plain_http=True) as client:
        manifest = wire.loads((await client.get_manifest(reference)).data, oci.Manifest)
        tocs = []
        for layer in manifest.layers:
            scanner = LayerScanner(media_type=layer.media_type)
            scanner.receive_data(await client.get_blob(reference, layer.digest))
            scanner.receive_data(b"")
            tocs.append(scanner.toc)
        return tocs


def non_empty(contents: dict[Digest, bytes]) -> set[Digest]:
    return {digest for digest, data in contents.items() if data}


def expected_size(bundle: DecodedBundle, tocs: Sequence[TOC], sent: set[Digest]) -> int:
    """Header + one EXTENT record per chunk of each sent content (sizes from our own scan)
    + END."""
    chunks: dict[Digest, int] = {}
    for toc in tocs:
        for entry in toc.files():
            assert entry.digest is not None
            if entry.digest in sent:
                chunks[entry.digest] = sum(
                    EXTENT_OVERHEAD + c.compressed_size for c in entry.chunks
                )
    assert set(chunks) == sent
    body = bundle.header_size + sum(chunks.values())
    return body + len(encode_end(len(bundle.extents), body))


# --- notify ---------------------------------------------------------------------------------


async def test_notify_indexes_each_layer_once_and_is_idempotent(
    proxy: ProxyClient, scenario: Scenario
) -> None:
    first = await proxy.notify(scenario.v1.reference)
    assert [i.state for i in first.images] == ["ready"]
    image = first.images[0]
    assert image.digest == scenario.v1.digest
    assert image.tags == ("v1",)
    assert image.name == scenario.v1.reference.name
    assert image.platform == "linux/amd64"
    assert (first.layers_scanned, first.layers_known) == (2, 0)

    again = await proxy.notify(scenario.v1.reference)
    assert again.images == first.images
    assert again.layers_scanned == 0

    # v2 shares v1's base layer: only its app layer is read.
    second = await proxy.notify(scenario.v2.reference)
    assert (second.layers_scanned, second.layers_known) == (1, 1)
    listed = await proxy.images(name=scenario.v1.reference.name)
    assert {(i.digest, i.tags) for i in listed} == {
        (first.images[0].digest, ("v1",)),
        (second.images[0].digest, ("v2",)),
    }


async def test_concurrent_notifies_share_one_indexing(
    proxy: ProxyClient, http: httpx.AsyncClient, scenario: Scenario
) -> None:
    results = await asyncio.gather(*(proxy.notify(scenario.v3.reference) for _ in range(4)))
    assert len({r.images[0].digest for r in results}) == 1
    assert all(r.images[0].state == "ready" for r in results)
    metrics = (await http.get("/metrics")).text
    assert "starlight_proxy_layers_scanned_total 2.0" in metrics


# --- bundles --------------------------------------------------------------------------------


async def test_bundle_from_nothing_rebuilds_the_image(
    proxy: ProxyClient, scenario: Scenario, registry: Registry
) -> None:
    v1 = scenario.v1
    notified = await proxy.notify(v1.reference)
    bundle = await fetch_bundle(proxy, DeltaRequest(to=(str(v1.reference),)))

    assert bundle.complete
    header = bundle.header
    assert bundle.extents == tuple(range(len(header.extents)))
    (image,) = header.images
    assert image.manifest_digest == notified.images[0].digest == v1.digest
    assert hashlib.sha256(image.manifest.encode()).hexdigest() == image.manifest_digest.hex
    assert hashlib.sha256(image.config.encode()).hexdigest() == image.config_digest.hex
    # The header carries the TOCs exactly as the layers scan here.
    assert [header.layers[i] for i in image.layers] == await scan_tocs(registry, v1.reference)
    assert header.local == ()
    # Every content once (the duplicated /etc/hostname too), and nothing else.
    assert set(bundle.contents) == non_empty(v1.contents)
    assert len(header.extents) == len({(e.content, e.chunk_index) for e in header.extents})
    assert materialize(header, 0, bundle.contents) == v1.files


async def test_update_bundle_carries_only_changed_contents(
    proxy: ProxyClient, scenario: Scenario, registry: Registry
) -> None:
    v1, v2 = scenario.v1, scenario.v2
    await proxy.notify(v1.reference)
    await proxy.notify(v2.reference)
    bundle = await fetch_bundle(
        proxy, DeltaRequest(to=(str(v2.reference),), from_=(str(v1.reference),))
    )

    changed = non_empty(v2.contents) - set(v1.contents)
    assert len(changed) == 4  # three changed files and a new one
    assert set(bundle.contents) == changed
    assert set(bundle.header.local) == non_empty(v2.contents) & set(v1.contents)
    assert bundle.size == expected_size(bundle, await scan_tocs(registry, v2.reference), changed)
    held = {**v1.contents, **bundle.contents}
    assert materialize(bundle.header, 0, held) == v2.files


async def test_rebuilt_image_sends_only_new_files(
    proxy: ProxyClient, scenario: Scenario, registry: Registry
) -> None:
    v1, v3 = scenario.v1, scenario.v3
    for version in (v1, v3):
        await proxy.notify(version.reference)
    v1_layers = {t.layer.digest for t in await scan_tocs(registry, v1.reference)}
    v3_layers = {t.layer.digest for t in await scan_tocs(registry, v3.reference)}
    assert not v1_layers & v3_layers  # every layer changed

    bundle = await fetch_bundle(
        proxy, DeltaRequest(to=(str(v3.reference),), from_=(str(v1.reference),))
    )
    assert set(bundle.contents) == {Digest("sha256:" + hashlib.sha256(b"rebuild 2\n").hexdigest())}
    assert materialize(bundle.header, 0, {**v1.contents, **bundle.contents}) == v3.files


async def test_joint_bundle_for_two_images(proxy: ProxyClient, scenario: Scenario) -> None:
    v1, v2 = scenario.v1, scenario.v2
    await proxy.notify(v1.reference)
    await proxy.notify(v2.reference)
    bundle = await fetch_bundle(proxy, DeltaRequest(to=(str(v1.reference), str(v2.reference))))
    assert set(bundle.contents) == non_empty(v1.contents) | non_empty(v2.contents)
    assert len(bundle.header.layers) == 3  # the shared base once
    assert materialize(bundle.header, 0, bundle.contents) == v1.files
    assert materialize(bundle.header, 1, bundle.contents) == v2.files


async def test_have_and_unknown_from_images(proxy: ProxyClient, scenario: Scenario) -> None:
    v1 = scenario.v1
    await proxy.notify(v1.reference)
    plain = await fetch_bundle(proxy, DeltaRequest(to=(str(v1.reference),)))
    # Images the proxy never saw are ignored: the worker may hold anything.
    unknown = f"{v1.reference.domain}/never-seen-{uuid.uuid4().hex[:8]}:x"
    ignored = await fetch_bundle(
        proxy, DeltaRequest(to=(str(v1.reference),), from_=(unknown, "docker.io/library/x:1"))
    )
    assert ignored.header == plain.header
    # Contents named in ``have`` are not sent, but copied locally.
    have = sorted(plain.contents)[:3]
    fewer = await fetch_bundle(proxy, DeltaRequest(to=(str(v1.reference),), have=tuple(have)))
    assert set(fewer.contents) == set(plain.contents) - set(have)
    assert set(fewer.header.local) == set(have)


async def test_get_with_query_equals_post(
    proxy: ProxyClient, http: httpx.AsyncClient, scenario: Scenario
) -> None:
    v1, v2 = scenario.v1, scenario.v2
    await proxy.notify(v1.reference)
    await proxy.notify(v2.reference)
    posted = await fetch_bundle(
        proxy,
        DeltaRequest(to=(str(v2.reference),), from_=(str(v1.reference),), platform="linux/amd64"),
    )
    response = await http.get(
        "/starlight/delta",
        params={"to": str(v2.reference), "from": str(v1.reference), "platform": "linux/amd64"},
    )
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/vnd.starlight.bundle.v1"
    assert response.headers["starlight-bundle-id"] == posted.header.bundle_id
    assert decode_bundle(response.content).contents == posted.contents
    # Layer order instead of start-up order: another plan, the same contents.
    unordered = await http.get(
        "/starlight/delta", params={"to": str(v2.reference), "ordering": "false"}
    )
    assert unordered.status_code == 200


async def test_auto_notify(
    store: SQLMetadataStore, registry: Registry, registry_client: RegistryClient, scenario: Scenario
) -> None:
    request = DeltaRequest(to=(str(scenario.v1.reference),))
    strict = create_app(config_for(registry), store=store, registry=registry_client)
    async with client_for(strict) as proxy:
        with pytest.raises(ImageNotFound, match="notify"):
            await fetch_bundle(proxy, request)
    eager = create_app(
        config_for(registry, auto_notify=True), store=store, registry=registry_client
    )
    async with client_for(eager) as proxy:
        bundle = await fetch_bundle(proxy, request)
    assert materialize(bundle.header, 0, bundle.contents) == scenario.v1.files


# --- bad input ------------------------------------------------------------------------------


async def test_unknown_image_is_404_with_advice(
    proxy: ProxyClient, http: httpx.AsyncClient, scenario: Scenario
) -> None:
    with pytest.raises(ImageNotFound) as raised:
        await fetch_bundle(proxy, DeltaRequest(to=(str(scenario.v1.reference),)))
    assert "ctr-starlight notify" in str(raised.value)
    response = await http.get("/starlight/delta", params={"to": str(scenario.v1.reference)})
    assert response.status_code == 404
    assert response.json()["error"] == "image_not_found"
    # Notifying an image the registry does not have is a 404 as well.
    missing = scenario.v1.reference.with_tag("no-such-tag")
    with pytest.raises(ImageNotFound):
        await proxy.notify(missing)


async def test_image_not_converted_is_409_with_advice(
    proxy: ProxyClient, http: httpx.AsyncClient, registry: Registry, registry_client: RegistryClient
) -> None:
    reference = Reference.parse(f"{registry.host}/plain-{uuid.uuid4().hex[:8]}:v1")
    await push_image(
        registry_client, reference, [build_tar([TarMember("a.txt", data=b"plain layer\n" * 50)])]
    )
    with pytest.raises(NotStarlightFormat) as raised:
        await proxy.notify(reference)
    assert "ctr-starlight convert" in str(raised.value)
    response = await http.post("/starlight/notify", json={"ref": str(reference)})
    assert response.status_code == 409
    assert response.json()["error"] == "not_starlight_format"
    (image,) = await proxy.images(name=reference.name)
    assert image.state == "failed"
    assert "Starlight" in (image.error or "")


@pytest.mark.parametrize(
    ("method", "path", "body", "status", "code"),
    [
        ("POST", "/starlight/notify", {"ref": "UPPER/Case"}, 400, "invalid_reference"),
        ("POST", "/starlight/notify", {"ref": "a/b", "platform": "linux"}, 400, "invalid_platform"),
        ("POST", "/starlight/notify", {"ref": "a/b", "bogus": 1}, 400, "invalid_input"),
        ("POST", "/starlight/notify", None, 400, "invalid_input"),
        ("POST", "/starlight/notify", {"ref": "other.example/a:1"}, 400, "registry_not_served"),
        ("POST", "/starlight/delta", {"to": "bad ref"}, 400, "invalid_reference"),
        ("POST", "/starlight/delta", {"to": []}, 400, "invalid_input"),
        (
            "POST",
            "/starlight/delta",
            {"to": "x.example/a", "have": ["md5:1"]},
            400,
            "invalid_input",
        ),
        ("GET", "/starlight/delta?to=a/b&platform=linux/amd64/v1/x", None, 400, "invalid_platform"),
        ("GET", "/starlight/delta?to=a/b&offset=-1", None, 400, "invalid_input"),
        ("GET", "/starlight/delta?to=a/b&offset=5", None, 400, "invalid_input"),
        ("GET", "/starlight/delta?to=a/b&colour=blue", None, 400, "invalid_input"),
        ("GET", "/starlight/delta?to=a/b&from=Bad!", None, 400, "invalid_reference"),
        ("GET", "/starlight/images?name=Bad!", None, 400, "invalid_reference"),
        ("GET", "/nowhere", None, 404, "not_found"),
        ("DELETE", "/starlight/images", None, 405, "method_not_allowed"),
    ],
)
async def test_bad_requests_get_json_errors(
    http: httpx.AsyncClient, method: str, path: str, body: object, status: int, code: str
) -> None:
    response = await http.request(method, path, json=body)
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    answer = response.json()
    assert answer["error"] == code
    assert answer["message"]


async def test_bad_input_raises_typed_errors_in_the_client(proxy: ProxyClient) -> None:
    with pytest.raises(InvalidReference):
        await proxy.notify("Not/A Reference")
    with pytest.raises(InvalidPlatform):
        await proxy.notify("127.0.0.1:1/a:b", platform="windows")
    with pytest.raises(RegistryNotServed, match="does not serve"):
        await proxy.notify("elsewhere.example/app:1")
    short = cast(Digest, "sha256:" + "0" * 63)  # the client does not check: the proxy does
    with pytest.raises(InvalidInput):
        await fetch_bundle(proxy, DeltaRequest(to=("x.example/a",), have=(short,)))


async def test_notify_with_another_platform_than_the_image(
    proxy: ProxyClient, scenario: Scenario
) -> None:
    with pytest.raises(ImageNotFound, match="is for linux/amd64, not linux/arm64"):
        await proxy.notify(scenario.v1.reference, platform="linux/arm64")
    assert await proxy.images() == []
    (image,) = (await proxy.notify(scenario.v1.reference, platform="linux/x86_64")).images
    assert image.platform == "linux/amd64"


async def test_resume_of_a_changed_bundle_is_412(
    proxy: ProxyClient, http: httpx.AsyncClient, scenario: Scenario
) -> None:
    await proxy.notify(scenario.v1.reference)
    stale = DeltaRequest(to=(str(scenario.v1.reference),), offset=100, bundle_id="f" * 64)
    with pytest.raises(BundleChanged):
        await fetch_bundle(proxy, stale)
    response = await http.post("/starlight/delta", content=wire.dumps(stale))
    assert response.status_code == 412
    assert response.json()["error"] == "bundle_changed"


async def test_registry_down_is_502(
    store: SQLMetadataStore, registry: Registry, scenario: Scenario
) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    config = ProxyConfig(
        registries=(UpstreamRegistry(host=registry.host, url=dead),),
        registry_retries=0,
        registry_timeout=5.0,
    )
    app = create_app(config, store=store)
    async with client_for(app) as proxy, raw_client(app) as http:
        with pytest.raises(RegistryUnavailable):
            await proxy.notify(scenario.v1.reference)
        response = await http.post("/starlight/notify", json={"ref": str(scenario.v1.reference)})
        assert response.status_code == 502
        assert response.json()["error"] == "registry_unavailable"


async def test_upstream_url_and_credentials(
    store: SQLMetadataStore, auth_registry: Registry, scenario: Scenario
) -> None:
    """A registry reached at another address, with the proxy's own credentials."""
    from tests.conftest import REGISTRY_USER

    user, password = REGISTRY_USER
    alias = f"registry.test:{auth_registry.port}"
    # Push a converted image to the authenticated registry through its real address.
    async with RegistryClient(
        plain_http=True, credentials={auth_registry.host: f"{user}:{password}"}
    ) as client:
        from tests.proxy.scenario import push_converted

        version = await push_converted(
            client, auth_registry.host, f"auth-{uuid.uuid4().hex[:8]}", "v1", scenario.v1.layers
        )
    aliased = Reference.parse(str(version.reference).replace(auth_registry.host, alias, 1))
    good = ProxyConfig(
        registries=(
            UpstreamRegistry(host=alias, url=auth_registry.url, username=user, password=password),
        )
    )
    app = create_app(good, store=store)
    async with client_for(app) as proxy:
        notified = await proxy.notify(aliased)
        assert notified.images[0].name == aliased.name  # stored under the client's name
        bundle = await fetch_bundle(proxy, DeltaRequest(to=(str(aliased),)))
    assert materialize(bundle.header, 0, bundle.contents) == scenario.v1.files
    assert bundle.header.images[0].reference == str(aliased)

    wrong = ProxyConfig(
        registries=(
            UpstreamRegistry(host=alias, url=auth_registry.url, username=user, password="nope"),
        )
    )
    async with raw_client(create_app(wrong, store=store)) as http:
        response = await http.post("/starlight/notify", json={"ref": str(aliased.with_tag("v1"))})
    # The registry refused the proxy, not the client: a bad gateway, not a 401.
    assert response.status_code == 502
    assert response.json()["error"] == "unauthorized"


# --- authentication, health, metrics, index --------------------------------------------------


async def test_client_authentication(
    store: SQLMetadataStore, registry: Registry, registry_client: RegistryClient, scenario: Scenario
) -> None:
    auth = AuthConfig(
        users=(
            BasicUser(name="worker", password="pa:ss"),
            BasicUser(name="ci", password_sha256=hashlib.sha256(b"hashed").hexdigest()),
        ),
        tokens=("tok-123",),
    )
    app = create_app(config_for(registry, auth=auth), store=store, registry=registry_client)
    async with raw_client(app) as http:
        for path in ("/", "/health-check"):
            assert (await http.get(path)).status_code == 200
        refused = await http.get("/starlight/images")
        assert refused.status_code == 401
        assert refused.json()["error"] == "authentication_required"
        challenges = refused.headers.get_list("www-authenticate")
        assert any(c.startswith("Basic ") for c in challenges)
        assert any(c.startswith("Bearer ") for c in challenges)
        for header in (
            "Basic " + base64.b64encode(b"worker:wrong").decode(),
            "Basic " + base64.b64encode(b"nobody:pa:ss").decode(),
            "Basic not-base64!",
            "Bearer tok-1234",
            "Digest whatever",
        ):
            response = await http.get("/metrics", headers={"Authorization": header})
            assert response.status_code == 401, header
        response = await http.post(
            "/starlight/notify",
            json={"ref": str(scenario.v1.reference)},
            headers={"Authorization": "Bearer wrong"},
        )
        assert response.status_code == 401

    for credentials in ({"user": "worker:pa:ss"}, {"user": "ci:hashed"}, {"token": "tok-123"}):
        async with client_for(app, **credentials) as proxy:
            assert await proxy.images() == []
    async with client_for(app, user="worker:bad") as proxy:
        with pytest.raises(AuthenticationRequired, match="proxy-user"):
            await proxy.notify(scenario.v1.reference)


async def test_health_metrics_and_index(
    proxy: ProxyClient, http: httpx.AsyncClient, scenario: Scenario
) -> None:
    health = await proxy.health()
    assert health.status == "ok"
    assert health.database in ("sqlite", "postgresql")
    assert await proxy.ping() > 0
    index = await http.get("/")
    assert index.status_code == 200
    assert "starlight-proxy 0.1.0" in index.text
    assert "/starlight/delta" in index.text

    await proxy.notify(scenario.v1.reference)
    bundle = await fetch_bundle(proxy, DeltaRequest(to=(str(scenario.v1.reference),)))
    text = (await http.get("/metrics")).text
    values = {
        line.split(" ")[0]: float(line.split(" ")[1])
        for line in text.splitlines()
        if line and not line.startswith("#")
    }
    assert values["starlight_proxy_bundle_bytes_total"] == bundle.size
    assert values["starlight_proxy_bundle_extents_total"] == len(bundle.extents)
    assert values['starlight_proxy_bundles_total{outcome="complete"}'] == 1
    assert values['starlight_proxy_registry_bytes_total{purpose="bundle"}'] >= sum(
        e.compressed_size for e in bundle.header.extents
    )
    assert (
        values[
            'starlight_proxy_requests_total{method="POST",route="/starlight/delta",status="200"}'
        ]
        == 1
    )
    assert values['starlight_proxy_request_duration_seconds_count{route="/starlight/notify"}'] == 1
    assert values['starlight_proxy_notify_duration_seconds_count{outcome="ok"}'] == 1
    assert values["starlight_proxy_digest_mismatches_total"] == 0


async def test_proxy_unreachable_is_proxy_unavailable() -> None:
    from starlight_core.errors import ProxyUnavailable

    async with ProxyClient(f"http://127.0.0.1:{free_port()}") as proxy:
        with pytest.raises(ProxyUnavailable, match="ConnectError"):
            await proxy.ping()


async def test_multi_platform_index(
    proxy: ProxyClient, http: httpx.AsyncClient, registry: Registry, registry_client: RegistryClient
) -> None:
    tag = uuid.uuid4().hex[:8]
    layers = {
        "linux/amd64": [base_layer(f"{tag}-amd64")],
        "linux/arm64": [base_layer(f"{tag}-arm64")],
    }
    reference = await push_converted_index(
        registry_client, registry.host, f"multi-{tag}", "v1", layers
    )
    # The proxy's own platform by default; one named platform; or all of them.
    default = await proxy.notify(reference)
    assert [i.platform for i in default.images] == ["linux/amd64"]
    arm = await proxy.notify(reference, platform="linux/aarch64")
    assert [i.platform for i in arm.images] == ["linux/arm64"]
    everything = await proxy.notify(reference, all_platforms=True)
    assert sorted(i.platform for i in everything.images) == ["linux/amd64", "linux/arm64"]
    assert len({i.index_digest for i in everything.images}) == 1
    with pytest.raises(ImageNotFound, match="no manifest for platform"):
        await proxy.notify(reference, platform="linux/s390x")

    # The bundle for each platform is that platform's image.
    for platform, version_layers in layers.items():
        bundle = await fetch_bundle(proxy, DeltaRequest(to=(str(reference),), platform=platform))
        assert bundle.header.images[0].platform == platform
        assert materialize(bundle.header, 0, bundle.contents) == expected_files(version_layers)
    # By the index digest, the platform picks the manifest; without one it is ambiguous.
    index_digest = everything.images[0].index_digest
    assert index_digest is not None
    pinned = reference.with_digest(index_digest)
    bundle = await fetch_bundle(proxy, DeltaRequest(to=(str(pinned),), platform="linux/arm64"))
    assert bundle.header.images[0].platform == "linux/arm64"
    response = await http.get("/starlight/delta", params={"to": str(pinned)})
    assert response.status_code == 400
    assert "several platforms" in response.json()["message"]


async def test_config_that_does_not_match_its_layers_is_refused(
    proxy: ProxyClient, scenario: Scenario, registry_client: RegistryClient
) -> None:
    """A manifest whose config names other diff_ids than its layers hold: corrupt, 422."""
    v1 = scenario.v1.reference
    manifest = wire.loads((await registry_client.get_manifest(v1)).data, oci.Manifest)
    config = json.loads(await registry_client.get_blob(v1, manifest.config.digest))
    config["rootfs"]["diff_ids"][0] = "sha256:" + "1" * 64
    forged = json.dumps(config).encode()
    forged_digest = Digest("sha256:" + hashlib.sha256(forged).hexdigest())
    await registry_client.upload_blob(v1, forged, forged_digest)
    lying = attrs.evolve(
        manifest, config=attrs.evolve(manifest.config, digest=forged_digest, size=len(forged))
    )
    reference = v1.with_tag(f"lying-{uuid.uuid4().hex[:6]}")
    await registry_client.put_manifest(reference, wire.dumps(lying), oci.OCI_MANIFEST)

    with pytest.raises(CorruptLayer, match="diff_id"):
        await proxy.notify(reference)
    (image,) = [i for i in await proxy.images(name=v1.name) if i.tags == () and i.state == "failed"]
    assert "diff_id" in (image.error or "")
