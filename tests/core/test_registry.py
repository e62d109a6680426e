"""The registry client against an in-memory registry (``tests/core/registry_fake.py``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from typing import Any

import anyio
import httpx
import pytest

import starlight_core.registry as registry_module
from starlight_core import oci
from starlight_core.auth import Credentials
from starlight_core.digest import sha256_digest
from starlight_core.errors import (
    DigestMismatch,
    Forbidden,
    ImageNotFound,
    InvalidInput,
    NotFound,
    RegistryError,
    RegistryUnavailable,
    ResourceExhausted,
    TooManyRequests,
    Unauthorized,
)
from starlight_core.reference import Reference
from starlight_core.registry import Challenge, RegistryClient, parse_challenges
from tests.core.registry_fake import FakeRegistry

pytestmark = pytest.mark.anyio

REPO = "registry.test/team/app"
BLOB = bytes(range(256)) * 40  # 10240 bytes, every offset distinguishable


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def fake() -> FakeRegistry:
    return FakeRegistry()


def client_for(fake: FakeRegistry, **kwargs: Any) -> RegistryClient:
    kwargs.setdefault("backoff", 0.0)
    return RegistryClient(transport=fake.transport, **kwargs)


def manifest_bytes(media_type: str = oci.OCI_MANIFEST) -> bytes:
    config = oci.DOCKER_CONFIG if media_type == oci.DOCKER_MANIFEST else oci.OCI_CONFIG
    return json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": media_type,
            "config": {"mediaType": config, "digest": str(sha256_digest(b"{}")), "size": 2},
            "layers": [],
        }
    ).encode()


async def drain(client: RegistryClient, digest: str, into: bytearray) -> None:
    async with client.stream_blob(REPO, digest) as stream:
        assert stream.size is not None
        async for chunk in stream:
            into += chunk


# --- WWW-Authenticate parsing -------------------------------------------------------------


def test_parse_bearer_challenge() -> None:
    [challenge] = parse_challenges(
        [
            'Bearer realm="https://auth.docker.io/token",service="registry.docker.io",'
            'scope="repository:library/redis:pull,push"'
        ]
    )
    assert challenge == Challenge(
        "bearer",
        {
            "realm": "https://auth.docker.io/token",
            "service": "registry.docker.io",
            "scope": "repository:library/redis:pull,push",
        },
    )


def test_parse_several_challenges_and_escapes() -> None:
    challenges = parse_challenges(
        [
            'Basic realm="a \\"quoted\\" realm", Bearer realm=https://x/t, error=invalid_token',
            "Negotiate",
        ]
    )
    assert [c.scheme for c in challenges] == ["basic", "bearer", "negotiate"]
    assert challenges[0].params == {"realm": 'a "quoted" realm'}
    assert challenges[1].params == {"realm": "https://x/t", "error": "invalid_token"}
    assert parse_challenges([""]) == []


# --- manifests ----------------------------------------------------------------------------


async def test_get_manifest_returns_exact_bytes_type_and_digest(fake: FakeRegistry) -> None:
    data = manifest_bytes()
    digest = fake.add_manifest("team/app", "v1", data, oci.OCI_MANIFEST)
    async with client_for(fake) as client:
        got = await client.get_manifest(f"{REPO}:v1")
        by_digest = await client.get_manifest(f"{REPO}@{digest}")
    assert got.data == data
    assert got.media_type == oci.OCI_MANIFEST
    assert got.digest == digest
    assert got.descriptor() == oci.Descriptor(oci.OCI_MANIFEST, digest, len(data))
    assert by_digest == got
    accept = fake.requests[0].headers["Accept"]
    for media_type in (
        oci.OCI_MANIFEST,
        oci.OCI_INDEX,
        oci.DOCKER_MANIFEST,
        oci.DOCKER_MANIFEST_LIST,
    ):
        assert media_type in accept
    assert fake.requests[0].url == httpx.URL("https://registry.test/v2/team/app/manifests/v1")


async def test_manifest_with_wrong_digest_header_is_rejected(fake: FakeRegistry) -> None:
    fake.add_manifest("team/app", "v1", manifest_bytes(), oci.OCI_MANIFEST)
    fake.wrong_digest_header = True
    async with client_for(fake) as client:
        with pytest.raises(DigestMismatch):
            await client.get_manifest(f"{REPO}:v1")


async def test_manifest_by_digest_with_other_content_is_rejected(fake: FakeRegistry) -> None:
    wanted = sha256_digest(b"the manifest we asked for")
    fake.manifests["team/app"] = {wanted: (manifest_bytes(), oci.OCI_MANIFEST)}
    async with client_for(fake) as client:
        with pytest.raises(DigestMismatch, match=str(wanted)):
            await client.get_manifest(f"{REPO}@{wanted}")


@pytest.mark.parametrize(
    ("document", "expected"),
    [
        (manifest_bytes(oci.DOCKER_MANIFEST), oci.DOCKER_MANIFEST),
        (json.dumps({"schemaVersion": 2, "manifests": []}).encode(), oci.OCI_INDEX),
        (
            json.dumps(
                {"schemaVersion": 2, "config": {"mediaType": oci.DOCKER_CONFIG}, "layers": []}
            ).encode(),
            oci.DOCKER_MANIFEST,
        ),
        (json.dumps({"schemaVersion": 2, "config": {}, "layers": []}).encode(), oci.OCI_MANIFEST),
    ],
)
async def test_generic_content_type_is_resolved_from_the_document(
    fake: FakeRegistry, document: bytes, expected: str
) -> None:
    fake.add_manifest("team/app", "v1", document, "application/json")
    fake.manifest_content_type = "application/json; charset=utf-8"
    async with client_for(fake) as client:
        got = await client.get_manifest(f"{REPO}:v1")
    assert got.media_type == expected


async def test_head_manifest(fake: FakeRegistry) -> None:
    data = manifest_bytes(oci.DOCKER_MANIFEST)
    digest = fake.add_manifest("team/app", "v1", data, oci.DOCKER_MANIFEST)
    async with client_for(fake) as client:
        assert await client.head_manifest(f"{REPO}:v1") == oci.Descriptor(
            oci.DOCKER_MANIFEST, digest, len(data)
        )
        assert await client.head_manifest(f"{REPO}:v2") is None
    assert [r.method for r in fake.requests] == ["HEAD", "HEAD"]


async def test_put_manifest_by_tag_and_by_digest(fake: FakeRegistry) -> None:
    data = manifest_bytes()
    async with client_for(fake) as client:
        digest = await client.put_manifest(f"{REPO}:v1", data, oci.OCI_MANIFEST)
        assert digest == sha256_digest(data)
        assert (
            await client.put_manifest(
                Reference.parse(REPO).with_digest(digest), data, oci.OCI_MANIFEST
            )
            == digest
        )
        with pytest.raises(DigestMismatch):
            await client.put_manifest(f"{REPO}@{sha256_digest(b'x')}", data, oci.OCI_MANIFEST)
    assert fake.manifests["team/app"]["v1"] == (data, oci.OCI_MANIFEST)
    assert fake.requests[0].headers["Content-Type"] == oci.OCI_MANIFEST
    assert fake.requests[1].url.path == f"/v2/team/app/manifests/{digest}"


async def test_missing_manifest_is_image_not_found_naming_the_reference(fake: FakeRegistry) -> None:
    async with client_for(fake) as client:
        with pytest.raises(ImageNotFound) as caught:
            await client.get_manifest(f"{REPO}:nope")
    message = str(caught.value)
    assert f"{REPO}:nope" in message
    assert "MANIFEST_UNKNOWN" in message
    assert "\n" not in message


async def test_missing_blob_is_not_found_but_not_image_not_found(fake: FakeRegistry) -> None:
    digest = sha256_digest(b"absent")
    async with client_for(fake) as client:
        assert await client.head_blob(REPO, digest) is None
        with pytest.raises(NotFound) as caught:
            await client.get_blob(REPO, digest)
    assert not isinstance(caught.value, ImageNotFound)
    message = str(caught.value)
    assert "registry.test" in message
    assert "team/app" in message
    assert digest in message
    assert "BLOB_UNKNOWN" in message


async def test_registry_error_message_is_one_line_with_the_registry_words(
    fake: FakeRegistry,
) -> None:
    fake.fail(400, method="GET")
    fake.failures[0].headers = {}
    async with client_for(fake) as client:
        with pytest.raises(RegistryError) as caught:
            await client.get_manifest(f"{REPO}:v1")
    assert type(caught.value) is RegistryError
    message = str(caught.value)
    assert message.startswith("registry registry.test: fetching manifest v1 in team/app")
    assert "HTTP 400 INJECTED injected 400" in message


async def test_forbidden(fake: FakeRegistry) -> None:
    fake.fail(403)
    async with client_for(fake) as client:
        with pytest.raises(Forbidden):
            await client.head_blob(REPO, sha256_digest(b""))


async def test_list_tags_follows_pagination(fake: FakeRegistry) -> None:
    for tag in ["a", "b", "c", "d", "e"]:
        fake.add_manifest("team/app", tag, manifest_bytes() + tag.encode(), oci.OCI_MANIFEST)
    fake.tags_page_size = 2
    async with client_for(fake) as client:
        assert await client.list_tags(REPO) == ["a", "b", "c", "d", "e"]
        with pytest.raises(ImageNotFound):
            await client.list_tags("registry.test/other")
    assert len(fake.registry_requests("GET")) == 4


# --- blobs and ranges ---------------------------------------------------------------------


async def test_get_blob_and_head_blob(fake: FakeRegistry) -> None:
    digest = fake.add_blob("team/app", BLOB)
    async with client_for(fake) as client:
        assert await client.head_blob(REPO, digest) == len(BLOB)
        assert await client.get_blob(REPO, digest) == BLOB
        with pytest.raises(ResourceExhausted):
            await client.get_blob(REPO, digest, max_size=len(BLOB) - 1)


async def test_corrupt_blob_is_never_returned(fake: FakeRegistry) -> None:
    digest = fake.add_blob("team/app", BLOB)
    fake.blobs[digest] = BLOB[:-1] + b"\x00"
    async with client_for(fake) as client:
        with pytest.raises(DigestMismatch):
            await client.get_blob(REPO, digest)
        received = bytearray()
        with pytest.raises(DigestMismatch):
            await drain(client, digest, received)
        # The bytes flowed, but the stream refused to end cleanly.
        assert len(received) == len(BLOB)


@pytest.mark.parametrize(
    ("start", "length"), [(0, 1), (0, len(BLOB)), (100, 900), (len(BLOB) - 1, 1)]
)
async def test_read_range_returns_exactly_the_bytes(
    fake: FakeRegistry, start: int, length: int
) -> None:
    digest = fake.add_blob("team/app", BLOB)
    async with client_for(fake) as client:
        assert await client.read_range(REPO, digest, start, length) == BLOB[start : start + length]
    assert fake.requests[-1].headers["Range"] == f"bytes={start}-{start + length - 1}"
    assert fake.requests[-1].headers["Accept-Encoding"] == "identity"


async def test_stream_blob_open_ended_range(fake: FakeRegistry) -> None:
    digest = fake.add_blob("team/app", BLOB)
    async with client_for(fake) as client, client.stream_blob(REPO, digest, start=10000) as stream:
        assert stream.size == len(BLOB) - 10000
        assert stream.total == len(BLOB)
        assert b"".join([c async for c in stream]) == BLOB[10000:]
    assert fake.requests[-1].headers["Range"] == "bytes=10000-"


async def test_zero_length_range_needs_no_request(fake: FakeRegistry) -> None:
    digest = fake.add_blob("team/app", BLOB)
    async with client_for(fake) as client:
        assert await client.read_range(REPO, digest, 5, 0) == b""
        with pytest.raises(InvalidInput):
            await client.read_range(REPO, digest, -1, 3)
        with pytest.raises(InvalidInput):
            async with client.stream_blob(REPO, digest, start=5, end=5):
                pass
    assert fake.requests == []


async def test_registry_ignoring_range_is_an_error(fake: FakeRegistry) -> None:
    digest = fake.add_blob("team/app", BLOB)
    fake.ignore_range = True
    async with client_for(fake) as client:
        with pytest.raises(RegistryError, match="ignored the Range"):
            await client.read_range(REPO, digest, 10, 10)


async def test_wrong_content_range_is_an_error(fake: FakeRegistry) -> None:
    digest = fake.add_blob("team/app", BLOB)
    fake.wrong_content_range = True
    async with client_for(fake) as client:
        with pytest.raises(RegistryError, match="answered range 11-19"):
            await client.read_range(REPO, digest, 10, 10)


async def test_range_past_the_end_is_the_callers_fault(fake: FakeRegistry) -> None:
    digest = fake.add_blob("team/app", BLOB)
    async with client_for(fake) as client:
        with pytest.raises(InvalidInput, match="10240 bytes"):
            await client.read_range(REPO, digest, len(BLOB), 1)
        with pytest.raises(InvalidInput, match="past the blob"):
            await client.read_range(REPO, digest, len(BLOB) - 5, 10)


async def test_blob_redirect_to_storage_drops_credentials(fake: FakeRegistry) -> None:
    fake.auth = "basic"
    digest = fake.add_blob("team/app", BLOB)
    fake.redirect_blobs = True
    async with client_for(fake, credentials={"registry.test": "alice:s3cret"}) as client:
        assert await client.get_blob(REPO, digest) == BLOB
        assert await client.read_range(REPO, digest, 7, 3) == BLOB[7:10]
    assert len(fake.storage_requests) == 2
    assert all("Authorization" not in r.headers for r in fake.storage_requests)
    assert fake.storage_requests[1].headers["Range"] == "bytes=7-9"


# --- retries ------------------------------------------------------------------------------


async def test_server_errors_are_retried_until_recovery(fake: FakeRegistry) -> None:
    digest = fake.add_blob("team/app", BLOB)
    fake.fail(500, times=2)
    fake.fail(None, times=1, broken="connect")
    async with client_for(fake, retries=4) as client:
        assert await client.get_blob(REPO, digest) == BLOB
    assert len(fake.requests) == 4


async def test_persistent_server_error_is_registry_unavailable(fake: FakeRegistry) -> None:
    fake.add_manifest("team/app", "v1", manifest_bytes(), oci.OCI_MANIFEST)
    fake.fail(503, times=100)
    async with client_for(fake, retries=3) as client:
        with pytest.raises(RegistryUnavailable) as caught:
            await client.get_manifest(f"{REPO}:v1")
    assert len(fake.requests) == 4
    assert "HTTP 503" in str(caught.value)
    assert "team/app" in str(caught.value)


async def test_persistent_connection_failure_is_registry_unavailable(fake: FakeRegistry) -> None:
    fake.fail(None, times=100, broken="connect")
    async with client_for(fake, retries=2) as client:
        with pytest.raises(RegistryUnavailable, match="ConnectError"):
            await client.head_blob(REPO, sha256_digest(b""))
    assert len(fake.requests) == 3


async def test_body_lost_midway_is_restarted_for_whole_reads(fake: FakeRegistry) -> None:
    digest = fake.add_blob("team/app", BLOB)
    fake.fail(None, times=1, broken="body", method="GET")
    async with client_for(fake) as client:
        assert await client.get_blob(REPO, digest) == BLOB
    assert len(fake.requests) == 2


async def test_body_lost_midway_in_a_stream_is_reported(fake: FakeRegistry) -> None:
    digest = fake.add_blob("team/app", BLOB)
    fake.fail(None, times=1, broken="body", method="GET")
    async with client_for(fake) as client:
        with pytest.raises(RegistryUnavailable, match="connection lost after 500 bytes"):
            await drain(client, digest, bytearray())
    assert len(fake.requests) == 1


async def test_too_many_requests_is_retried_then_reported(fake: FakeRegistry) -> None:
    digest = fake.add_blob("team/app", BLOB)
    fake.fail(429, times=1)
    async with client_for(fake, retries=2) as client:
        assert await client.head_blob(REPO, digest) == len(BLOB)
        fake.fail(429, times=100)
        with pytest.raises(TooManyRequests):
            await client.head_blob(REPO, digest)
    assert len(fake.requests) == 2 + 3


async def test_long_retry_after_is_reported_at_once(fake: FakeRegistry) -> None:
    fake.fail(429, times=100, headers={"Retry-After": "3600"})
    async with client_for(fake, retries=4) as client:
        with pytest.raises(TooManyRequests) as caught:
            await client.head_blob(REPO, sha256_digest(b""))
    assert len(fake.requests) == 1
    assert "3600s" in str(caught.value)


async def test_client_errors_are_not_retried(fake: FakeRegistry) -> None:
    fake.fail(400, times=100)
    async with client_for(fake, retries=4) as client:
        with pytest.raises(RegistryError):
            await client.head_blob(REPO, sha256_digest(b""))
    assert len(fake.requests) == 1


# --- token authentication -----------------------------------------------------------------


async def test_token_flow_with_credentials_and_scope_cache() -> None:
    fake = FakeRegistry(auth="token")
    digest = fake.add_blob("team/app", BLOB)
    fake.add_blob("team/other", BLOB)
    async with client_for(fake, credentials={"registry.test": "alice:s3cret"}) as client:
        assert await client.get_blob(REPO, digest) == BLOB
        assert await client.head_blob(REPO, digest) == len(BLOB)
        assert await client.read_range(REPO, digest, 0, 4) == BLOB[:4]
        assert client.token_requests == 1
        # Another repository: another scope, and no 401 round trip now the realm is known.
        assert await client.head_blob("registry.test/team/other", digest) == len(BLOB)
        assert client.token_requests == 2
    [first, second] = fake.token_requests
    assert first.url.params.get("service") == "fake-registry"
    assert first.url.params.get_list("scope") == ["repository:team/app:pull"]
    assert first.url.params.get("account") == "alice"
    assert first.headers["Authorization"].startswith("Basic ")
    assert second.url.params.get_list("scope") == ["repository:team/other:pull"]
    statuses_401 = [r for r in fake.requests if "Authorization" not in r.headers]
    assert len(statuses_401) == 1  # only the very first request went unauthenticated


async def test_push_scope_gets_its_own_token() -> None:
    fake = FakeRegistry(auth="token")
    async with client_for(fake, credentials={"registry.test": "alice:s3cret"}) as client:
        await client.upload_blob(REPO, b"data", sha256_digest(b"data"))
        await client.upload_blob(REPO, b"more", sha256_digest(b"more"))
        assert await client.get_blob(REPO, sha256_digest(b"data")) == b"data"
    assert [r.url.params.get_list("scope") for r in fake.token_requests] == [
        ["repository:team/app:pull,push"],
        ["repository:team/app:pull"],
    ]


async def test_expired_or_revoked_token_is_refreshed_on_401() -> None:
    fake = FakeRegistry(auth="token")
    digest = fake.add_blob("team/app", BLOB)
    async with client_for(fake, credentials={"registry.test": "alice:s3cret"}) as client:
        assert await client.head_blob(REPO, digest) == len(BLOB)
        fake.revoke_tokens()
        assert await client.head_blob(REPO, digest) == len(BLOB)
        assert client.token_requests == 2


async def test_anonymous_token_for_public_pull() -> None:
    fake = FakeRegistry(auth="token", anonymous_pull=True)
    digest = fake.add_blob("team/app", BLOB)
    async with client_for(fake) as client:
        assert await client.get_blob(REPO, digest) == BLOB
        with pytest.raises(Unauthorized):
            await client.upload_blob(REPO, b"x", sha256_digest(b"x"))
    assert "Authorization" not in fake.token_requests[0].headers


async def test_wrong_credentials_at_the_token_server_are_unauthorized() -> None:
    fake = FakeRegistry(auth="token")
    async with client_for(fake, credentials={"registry.test": "alice:wrong"}) as client:
        with pytest.raises(Unauthorized, match=r"auth\.test"):
            await client.head_blob(REPO, sha256_digest(b""))


async def test_identity_token_is_exchanged_with_a_post() -> None:
    fake = FakeRegistry(auth="token", refresh_token="refresh-me")
    digest = fake.add_blob("team/app", BLOB)
    creds = Credentials(identity_token="refresh-me")
    async with client_for(fake, credentials={"registry.test": creds}) as client:
        assert await client.head_blob(REPO, digest) == len(BLOB)
    [request] = fake.token_requests
    assert request.method == "POST"
    form = dict(httpx.QueryParams(request.content.decode()))
    assert form["grant_type"] == "refresh_token"
    assert form["scope"] == "repository:team/app:pull"


async def test_mount_asks_for_both_repositories_in_one_token() -> None:
    fake = FakeRegistry(auth="token")
    digest = fake.add_blob("team/base", BLOB)
    async with client_for(fake, credentials={"registry.test": "alice:s3cret"}) as client:
        assert await client.mount_blob(REPO, digest, "team/base")
    scopes = fake.token_requests[-1].url.params.get_list("scope")
    assert set(scopes) == {"repository:team/app:pull,push", "repository:team/base:pull"}


# --- Basic authentication -----------------------------------------------------------------


async def test_basic_auth_after_challenge_then_proactively() -> None:
    fake = FakeRegistry(auth="basic")
    digest = fake.add_blob("team/app", BLOB)
    async with client_for(fake, credentials={"registry.test": "alice:s3cret"}) as client:
        assert await client.get_blob(REPO, digest) == BLOB
        assert await client.head_blob(REPO, digest) == len(BLOB)
        await client.ping("registry.test")
    assert ["Authorization" in r.headers for r in fake.requests] == [False, True, True, True]
    assert fake.token_requests == []


@pytest.mark.parametrize("credentials", [None, {"registry.test": "alice:wrong"}])
async def test_basic_auth_refused(credentials: dict[str, str] | None) -> None:
    fake = FakeRegistry(auth="basic")
    async with client_for(fake, credentials=credentials) as client:
        with pytest.raises(Unauthorized) as caught:
            await client.head_blob(REPO, sha256_digest(b""))
    assert "registry.test" in str(caught.value)
    assert "HTTP 401" in str(caught.value)
    assert "--user" in str(caught.value)  # the hint says what to do


async def test_credentials_are_per_registry() -> None:
    fake = FakeRegistry(auth="basic")
    async with client_for(fake, credentials={"elsewhere.test": "alice:s3cret"}) as client:
        with pytest.raises(Unauthorized):
            await client.head_blob(REPO, sha256_digest(b""))
    assert all("Authorization" not in r.headers for r in fake.requests)


# --- uploads ------------------------------------------------------------------------------


async def test_monolithic_upload_keeps_the_upload_state(fake: FakeRegistry) -> None:
    digest = sha256_digest(BLOB)
    async with client_for(fake) as client:
        await client.upload_blob(REPO, BLOB, digest)
    assert fake.blobs[digest] == BLOB
    post, put = fake.requests
    assert post.method == "POST"
    assert post.url.path == "/v2/team/app/blobs/uploads/"
    assert put.method == "PUT"
    assert put.url.params.get("digest") == digest
    assert put.url.params.get("_state")


async def test_monolithic_upload_checks_the_digest_first(fake: FakeRegistry) -> None:
    async with client_for(fake) as client:
        with pytest.raises(DigestMismatch):
            await client.upload_blob(REPO, BLOB, sha256_digest(b"other"))
    assert fake.requests == []


async def test_monolithic_upload_is_retried_as_a_whole(fake: FakeRegistry) -> None:
    fake.fail(500, times=1, method="PUT")
    async with client_for(fake) as client:
        await client.upload_blob(REPO, BLOB, sha256_digest(BLOB))
    assert [r.method for r in fake.requests] == ["POST", "PUT", "POST", "PUT"]
    assert fake.blobs[sha256_digest(BLOB)] == BLOB


async def chunks_of(data: bytes, size: int) -> AsyncIterator[bytes]:
    for offset in range(0, len(data), size):
        yield data[offset : offset + size]


async def test_streamed_upload_coalesces_chunks_and_computes_the_digest(fake: FakeRegistry) -> None:
    async with client_for(fake) as client:
        digest, size = await client.upload_blob_stream(REPO, chunks_of(BLOB, 100), chunk_size=4096)
    assert (digest, size) == (sha256_digest(BLOB), len(BLOB))
    assert fake.blobs[digest] == BLOB
    patches = fake.registry_requests("PATCH")
    assert [p.headers["Content-Range"] for p in patches] == ["0-4099", "4100-8199", "8200-10239"]
    assert fake.max_patch <= 4096 + 100  # bounded by the chunk size, not the blob size
    [put] = fake.registry_requests("PUT")
    assert put.url.params.get("digest") == digest
    assert put.content == b""


async def test_streamed_upload_of_nothing(fake: FakeRegistry) -> None:
    async with client_for(fake) as client:
        digest, size = await client.upload_blob_stream(REPO, chunks_of(b"", 1))
    assert (digest, size) == (sha256_digest(b""), 0)
    assert fake.blobs[digest] == b""
    assert fake.registry_requests("PATCH") == []


async def test_streamed_upload_with_wrong_expected_digest_is_cancelled(fake: FakeRegistry) -> None:
    async with client_for(fake) as client:
        with pytest.raises(DigestMismatch):
            await client.upload_blob_stream(
                REPO, chunks_of(BLOB, 1000), digest=sha256_digest(b"no")
            )
    assert fake.blobs == {}
    assert len(fake.cancelled) == 1
    assert fake.uploads == {}
    assert fake.registry_requests("PUT") == []


async def test_streamed_upload_is_not_retried_midway(fake: FakeRegistry) -> None:
    fake.fail(500, times=1, method="PATCH")
    async with client_for(fake, retries=4) as client:
        with pytest.raises(RegistryUnavailable):
            await client.upload_blob_stream(REPO, chunks_of(BLOB, 1000), chunk_size=1000)
    assert len(fake.registry_requests("PATCH")) == 1
    assert len(fake.cancelled) == 1


async def test_streamed_upload_survives_a_failing_source(fake: FakeRegistry) -> None:
    async def source() -> AsyncIterator[bytes]:
        yield b"some bytes"
        raise OSError("disk read failed")

    async with client_for(fake) as client:
        with pytest.raises(OSError, match="disk read failed"):
            await client.upload_blob_stream(REPO, source(), chunk_size=4)
    assert len(fake.cancelled) == 1
    assert fake.blobs == {}


async def test_mount_blob(fake: FakeRegistry) -> None:
    digest = fake.add_blob("team/base", BLOB)
    async with client_for(fake) as client:
        assert await client.mount_blob(REPO, digest, "team/base") is True
        assert await client.head_blob(REPO, digest) == len(BLOB)
        # A full name on the same registry is accepted too.
        assert await client.mount_blob("registry.test/team/third", digest, "registry.test/team/app")
        absent = sha256_digest(b"absent")
        assert await client.mount_blob(REPO, absent, "team/base") is False
    assert len(fake.cancelled) == 1
    assert fake.uploads == {}
    mount = fake.registry_requests("POST")[0]
    assert mount.url.params.get("mount") == digest
    assert mount.url.params.get("from") == "team/base"


# --- configuration ------------------------------------------------------------------------


async def test_plain_http_per_host() -> None:
    seen: list[httpx.URL] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.url)
        return httpx.Response(200, json={})

    transport = httpx.MockTransport(handler)
    async with RegistryClient(
        transport=transport, plain_http=["localhost", "10.0.0.1:5000"]
    ) as client:
        await client.ping("localhost:5000")
        await client.ping("10.0.0.1:5000")
        await client.ping("10.0.0.1:5001")
        await client.ping("docker.io")
    async with RegistryClient(transport=transport, plain_http=True) as client:
        await client.ping("quay.io")
    assert [str(u) for u in seen] == [
        "http://localhost:5000/v2/",
        "http://10.0.0.1:5000/v2/",
        "https://10.0.0.1:5001/v2/",
        "https://registry-1.docker.io/v2/",
        "http://quay.io/v2/",
    ]


def test_public_names_exist() -> None:
    for name in registry_module.__all__:
        assert hasattr(registry_module, name), name


def test_importing_the_core_does_not_import_httpx() -> None:
    code = (
        "import sys, starlight_core, starlight_core.auth, starlight_core.reference; "
        "bad = {'httpx', 'anyio'} & set(sys.modules); assert not bad, bad"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={**os.environ},
        check=False,
    )
    assert result.returncode == 0, result.stderr


async def test_concurrent_requests_share_one_token() -> None:
    fake = FakeRegistry(auth="token")
    digest = fake.add_blob("team/app", BLOB)
    results: list[int | None] = []

    async def head(client: RegistryClient) -> None:
        results.append(await client.head_blob(REPO, digest))

    async with client_for(fake, credentials={"registry.test": "alice:s3cret"}) as client:
        async with anyio.create_task_group() as group:
            for _ in range(10):
                group.start_soon(head, client)
        assert results == [len(BLOB)] * 10
        assert client.token_requests == 1
