"""The registry client against the real distribution registry (``docker-registry``)."""

from __future__ import annotations

import base64
import json
import os
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from benchmarks.services.registry import Registry
from starlight_core import oci
from starlight_core.auth import CredentialStore
from starlight_core.digest import Digest, sha256_digest
from starlight_core.errors import (
    DigestMismatch,
    ImageNotFound,
    InvalidInput,
    NotFound,
    RegistryUnavailable,
    Unauthorized,
)
from starlight_core.registry import RegistryClient
from tests.conftest import REGISTRY_USER

pytestmark = [pytest.mark.e2e, pytest.mark.anyio]

# Not a multiple of any chunk size, and every 251-byte window differs.
DATA = bytes(i % 251 for i in range(300_001))


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def repo(registry: Registry, name: str = "app") -> str:
    return f"{registry.host}/test-{uuid.uuid4().hex[:12]}/{name}"


def client(registry: Registry, **kwargs: object) -> RegistryClient:
    return RegistryClient(plain_http=[registry.host], backoff=0.0, **kwargs)  # type: ignore[arg-type]


async def chunks_of(data: bytes, size: int) -> AsyncIterator[bytes]:
    for offset in range(0, len(data), size):
        yield data[offset : offset + size]


async def push_image(c: RegistryClient, ref: str, media_type: str) -> tuple[bytes, Digest]:
    """Push a config and a layer, then a manifest of ``media_type`` referring to them."""
    docker = media_type == oci.DOCKER_MANIFEST
    config = json.dumps({"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers"}})
    config_bytes = config.encode()
    layer = DATA[:1000]
    await c.upload_blob(ref, config_bytes, sha256_digest(config_bytes))
    await c.upload_blob(ref, layer, sha256_digest(layer))
    manifest = {
        "schemaVersion": 2,
        "mediaType": media_type,
        "config": {
            "mediaType": oci.DOCKER_CONFIG if docker else oci.OCI_CONFIG,
            "digest": sha256_digest(config_bytes),
            "size": len(config_bytes),
        },
        "layers": [
            {
                "mediaType": oci.DOCKER_LAYER_GZIP if docker else oci.OCI_LAYER_GZIP,
                "digest": sha256_digest(layer),
                "size": len(layer),
            }
        ],
    }
    data = json.dumps(manifest, indent=3).encode()  # odd formatting: bytes must survive as is
    return data, await c.put_manifest(ref, data, media_type)


async def test_monolithic_upload_then_head_and_get(registry: Registry) -> None:
    ref = repo(registry)
    digest = sha256_digest(DATA)
    async with client(registry) as c:
        assert await c.head_blob(ref, digest) is None
        await c.upload_blob(ref, DATA, digest)
        assert await c.head_blob(ref, digest) == len(DATA)
        assert await c.get_blob(ref, digest) == DATA


async def test_streamed_upload_in_many_patches(registry: Registry) -> None:
    ref = repo(registry)
    async with client(registry) as c:
        digest, size = await c.upload_blob_stream(
            ref, chunks_of(DATA, 10_000), chunk_size=64 * 1024
        )
        assert (digest, size) == (sha256_digest(DATA), len(DATA))
        assert await c.get_blob(ref, digest) == DATA
        empty = await c.upload_blob_stream(ref, chunks_of(b"", 1))
        assert empty == (sha256_digest(b""), 0)
        assert await c.head_blob(ref, empty[0]) == 0


async def test_streamed_upload_with_wrong_digest_stores_nothing(registry: Registry) -> None:
    ref = repo(registry)
    async with client(registry) as c:
        with pytest.raises(DigestMismatch):
            await c.upload_blob_stream(ref, chunks_of(DATA, 50_000), digest=sha256_digest(b"x"))
        assert await c.head_blob(ref, sha256_digest(DATA)) is None


async def test_registry_rejects_a_lying_digest(registry: Registry) -> None:
    """The registry checks too: a PUT naming another digest is refused (what the fake does)."""
    path = repo(registry).split("/", 1)[1]
    async with client(registry) as c:
        started = await c.http.post(f"{registry.url}/v2/{path}/blobs/uploads/")
        assert started.status_code == 202
        location = started.url.join(started.headers["Location"])
        response = await c.http.put(
            location.copy_merge_params({"digest": str(sha256_digest(b"other"))}), content=DATA
        )
    assert response.status_code == 400
    assert "DIGEST_INVALID" in response.text


async def test_mount_across_repositories(registry: Registry) -> None:
    source, target = repo(registry, "base"), repo(registry, "derived")
    digest = sha256_digest(DATA)
    source_path = source.split("/", 1)[1]
    async with client(registry) as c:
        await c.upload_blob(source, DATA, digest)
        assert await c.mount_blob(target, digest, source_path) is True
        assert await c.head_blob(target, digest) == len(DATA)
        absent = sha256_digest(b"never pushed")
        assert await c.mount_blob(target, absent, source_path) is False
        assert await c.head_blob(target, absent) is None


@pytest.mark.parametrize("media_type", [oci.OCI_MANIFEST, oci.DOCKER_MANIFEST])
async def test_put_and_get_manifest(registry: Registry, media_type: str) -> None:
    ref = repo(registry)
    async with client(registry) as c:
        data, digest = await push_image(c, f"{ref}:v1", media_type)
        assert digest == sha256_digest(data)
        by_tag = await c.get_manifest(f"{ref}:v1")
        by_digest = await c.get_manifest(f"{ref}@{digest}")
        head = await c.head_manifest(f"{ref}:v1")
        assert await c.head_manifest(f"{ref}:v2") is None
        assert await c.list_tags(ref) == ["v1"]
    for got in (by_tag, by_digest):
        assert got.data == data
        assert got.media_type == media_type
        assert got.digest == digest
    assert head == oci.Descriptor(media_type, digest, len(data))


async def test_missing_manifest_and_blob(registry: Registry) -> None:
    ref = repo(registry)
    async with client(registry) as c:
        with pytest.raises(ImageNotFound, match=r"MANIFEST_UNKNOWN|NAME_UNKNOWN"):
            await c.get_manifest(f"{ref}:nope")
        with pytest.raises(NotFound) as caught:
            await c.get_blob(ref, sha256_digest(b"nope"))
    assert not isinstance(caught.value, ImageNotFound)
    assert registry.host in str(caught.value)


@pytest.mark.parametrize(
    ("start", "length"), [(0, 1), (0, len(DATA)), (1, 250), (123_456, 65_537), (len(DATA) - 1, 1)]
)
async def test_range_reads_return_exactly_the_bytes(
    registry: Registry, start: int, length: int
) -> None:
    ref = repo(registry)
    digest = sha256_digest(DATA)
    async with client(registry) as c:
        await c.upload_blob(ref, DATA, digest)
        assert await c.read_range(ref, digest, start, length) == DATA[start : start + length]


async def test_open_ended_range_and_range_past_the_end(registry: Registry) -> None:
    ref = repo(registry)
    digest = sha256_digest(DATA)
    async with client(registry) as c:
        await c.upload_blob(ref, DATA, digest)
        async with c.stream_blob(ref, digest, start=299_000) as stream:
            assert stream.total == len(DATA)
            assert b"".join([chunk async for chunk in stream]) == DATA[299_000:]
        with pytest.raises(InvalidInput, match=f"the blob has {len(DATA)} bytes"):
            await c.read_range(ref, digest, len(DATA), 10)
        with pytest.raises(InvalidInput, match="past the blob"):
            await c.read_range(ref, digest, len(DATA) - 5, 10)


def blob_data_path(registry: Registry, digest: Digest) -> Path:
    return (
        registry.storage
        / "docker/registry/v2/blobs"
        / digest.algorithm
        / digest.hex[:2]
        / digest.hex
        / "data"
    )


async def test_corrupted_blob_in_storage_is_detected(tmp_path: Path) -> None:
    with Registry(tmp_path / "registry") as registry:
        ref = repo(registry)
        digest = sha256_digest(DATA)
        async with client(registry) as c:
            await c.upload_blob(ref, DATA, digest)
            path = blob_data_path(registry, digest)
            corrupted = bytearray(path.read_bytes())
            corrupted[len(corrupted) // 2] ^= 0xFF
            path.write_bytes(bytes(corrupted))
            with pytest.raises(DigestMismatch, match=str(digest)):
                await c.get_blob(ref, digest)


async def test_outage_then_restart(tmp_path: Path) -> None:
    registry = Registry(tmp_path / "registry")
    registry.start()
    try:
        ref = repo(registry)
        digest = sha256_digest(DATA)
        async with client(registry, retries=1) as c:
            await c.upload_blob(ref, DATA, digest)
            registry.stop()
            with pytest.raises(RegistryUnavailable, match=registry.host):
                await c.head_blob(ref, digest)
            registry.start()
            # Same port, same storage: the blob is still there.
            assert await c.get_blob(ref, digest) == DATA
    finally:
        registry.stop()


async def test_htpasswd_registry(auth_registry: Registry) -> None:
    ref = repo(auth_registry)
    user, password = REGISTRY_USER
    digest = sha256_digest(DATA)
    async with client(auth_registry, credentials={auth_registry.host: f"{user}:{password}"}) as c:
        await c.upload_blob(ref, DATA, digest)
        assert await c.read_range(ref, digest, 10, 10) == DATA[10:20]
        await c.ping(auth_registry.host)
    async with client(auth_registry, credentials={auth_registry.host: f"{user}:wrong"}) as c:
        with pytest.raises(Unauthorized, match=auth_registry.host):
            await c.head_blob(ref, digest)
    async with client(auth_registry) as c:
        with pytest.raises(Unauthorized):
            await c.get_manifest(f"{ref}:v1")


async def test_docker_config_credentials_for_the_real_registry(
    auth_registry: Registry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    user, password = REGISTRY_USER
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    (tmp_path / "config.json").write_text(
        json.dumps({"auths": {f"http://{auth_registry.host}": {"auth": token}}})
    )
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path))
    assert os.environ["DOCKER_CONFIG"] == str(tmp_path)
    async with client(auth_registry, credentials=CredentialStore.from_docker_config()) as c:
        await c.ping(auth_registry.host)
