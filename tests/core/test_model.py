"""References, platforms, digests and the OCI model."""

from __future__ import annotations

import hashlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from starlight_core import oci, wire
from starlight_core.digest import EMPTY_SHA256, Digest, DigestVerifier, sha256_digest
from starlight_core.errors import (
    DigestMismatch,
    ImageNotFound,
    InvalidDigest,
    InvalidInput,
    InvalidPlatform,
    InvalidReference,
)
from starlight_core.platform import Platform
from starlight_core.reference import Reference

HEX = "a" * 64


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("redis", "docker.io/library/redis:latest"),
        ("redis:6.2", "docker.io/library/redis:6.2"),
        ("library/redis", "docker.io/library/redis:latest"),
        ("bitnami/redis", "docker.io/bitnami/redis:latest"),
        ("docker.io/redis", "docker.io/library/redis:latest"),
        ("index.docker.io/library/redis:7", "docker.io/library/redis:7"),
        ("localhost/app", "localhost/app:latest"),
        ("localhost:5000/app:v1", "localhost:5000/app:v1"),
        ("127.0.0.1:5000/team/app:v1", "127.0.0.1:5000/team/app:v1"),
        ("quay.io/org/app", "quay.io/org/app:latest"),
        ("Registry.Example.com/app", "Registry.Example.com/app:latest"),
        (f"redis@sha256:{HEX}", f"docker.io/library/redis@sha256:{HEX}"),
        (f"redis:7@sha256:{HEX}", f"docker.io/library/redis:7@sha256:{HEX}"),
        ("[::1]:5000/app:v1", "[::1]:5000/app:v1"),
        ("a/b-c/d__e/f.g:T_1.2-x", "docker.io/a/b-c/d__e/f.g:T_1.2-x"),
    ],
)
def test_reference_normalisation(text: str, expected: str) -> None:
    assert str(Reference.parse(text)) == expected


@pytest.mark.parametrize(
    "text",
    [
        "",
        "Redis",
        "redis:",
        "redis:bad tag",
        " redis",
        "redis@sha256:short",
        "redis@md5:" + "a" * 32,
        "host:5000/",
        "-app",
        "app-",
        "a" * 300,
        "localhost:5000/APP",
        "redis:" + "t" * 129,
    ],
)
def test_invalid_references_are_refused(text: str) -> None:
    with pytest.raises(InvalidReference):
        Reference.parse(text)


def test_reference_parts() -> None:
    ref = Reference.parse("127.0.0.1:5000/team/app:v1")
    assert (ref.domain, ref.path, ref.tag, ref.digest) == ("127.0.0.1:5000", "team/app", "v1", None)
    assert ref.registry_host == "127.0.0.1:5000"
    assert ref.object == "v1"
    assert Reference.parse("redis").registry_host == "registry-1.docker.io"
    assert Reference.parse("redis").familiar() == "redis:latest"
    assert Reference.parse("bitnami/redis:1").familiar() == "bitnami/redis:1"
    pinned = ref.with_digest(Digest(f"sha256:{HEX}"))
    assert pinned.object == f"sha256:{HEX}"
    assert ref.with_tag("v2").tag == "v2"
    with pytest.raises(InvalidReference):
        ref.with_tag("bad tag")


_component = st.from_regex(r"[a-z0-9]{1,8}([._-][a-z0-9]{1,8}){0,2}", fullmatch=True)


@given(
    domain=st.sampled_from(["docker.io", "localhost:5000", "example.com", "10.0.0.1:443"]),
    path=st.lists(_component, min_size=1, max_size=3).map("/".join),
    tag=st.from_regex(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,20}", fullmatch=True),
)
def test_reference_round_trip(domain: str, path: str, tag: str) -> None:
    ref = Reference.parse(f"{domain}/{path}:{tag}")
    assert Reference.parse(str(ref)) == ref
    assert Reference.parse(ref.familiar()) == ref


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("linux/amd64", "linux/amd64"),
        ("linux/x86_64", "linux/amd64"),
        ("linux/arm64/v8", "linux/arm64"),
        ("linux/aarch64", "linux/arm64"),
        ("linux/arm", "linux/arm/v7"),
        ("linux/armhf", "linux/arm/v7"),
        ("linux/arm/6", "linux/arm/v6"),
        ("Linux/AMD64", "linux/amd64"),
        ("windows/amd64", "windows/amd64"),
    ],
)
def test_platform_normalisation(text: str, expected: str) -> None:
    assert str(Platform.parse(text)) == expected


@pytest.mark.parametrize(
    "text", ["", "linux", "linux/", "/amd64", "linux/amd64/v1/x", "li nux/amd64"]
)
def test_invalid_platforms_are_refused(text: str) -> None:
    with pytest.raises(InvalidPlatform):
        Platform.parse(text)


def test_platform_matching() -> None:
    arm64 = Platform.parse("linux/arm64")
    assert arm64.matches(Platform.parse("linux/arm64/v8"))
    assert not arm64.matches(Platform.parse("linux/amd64"))
    assert arm64.runs(Platform.parse("linux/arm/v7"))
    assert Platform.parse("linux/arm/v7").runs(Platform.parse("linux/arm/v6"))
    assert not Platform.parse("linux/arm/v6").runs(Platform.parse("linux/arm/v7"))
    assert Platform.parse("linux/amd64").runs(Platform.parse("linux/386"))
    assert not Platform.parse("linux/amd64").runs(Platform.parse("windows/amd64"))


def test_digests() -> None:
    assert "sha256:" + hashlib.sha256(b"").hexdigest() == EMPTY_SHA256
    digest = sha256_digest(b"abc")
    assert digest.algorithm == "sha256"
    assert len(digest.hex) == 64
    assert Digest(str(digest)) == digest
    for bad in ("sha256:" + "A" * 64, "sha256:abc", "md5:" + "a" * 32, "nocolon", 7):
        with pytest.raises(InvalidDigest):
            Digest(bad)  # type: ignore[arg-type]
    verifier = DigestVerifier(digest, "test blob")
    verifier.update(b"ab")
    verifier.update(b"c")
    verifier.verify()
    wrong = DigestVerifier(digest, "test blob")
    wrong.update(b"abd")
    with pytest.raises(DigestMismatch, match="test blob"):
        wrong.verify()


def _descriptor(platform: str | None) -> dict[str, object]:
    document: dict[str, object] = {
        "mediaType": oci.OCI_MANIFEST,
        "digest": str(sha256_digest((platform or "").encode())),
        "size": 100,
    }
    if platform:
        os_, arch, *variant = platform.split("/")
        document["platform"] = {"os": os_, "architecture": arch}
        if variant:
            document["platform"]["variant"] = variant[0]  # type: ignore[index]
    return document


def test_index_platform_selection() -> None:
    index = wire.structure(
        {
            "schemaVersion": 2,
            "mediaType": oci.OCI_INDEX,
            "manifests": [
                _descriptor("linux/amd64"),
                _descriptor("linux/arm64/v8"),
                _descriptor("linux/arm/v7"),
                {
                    "mediaType": "application/vnd.in-toto+json",
                    "digest": str(sha256_digest(b"x")),
                    "size": 1,
                    "platform": {"os": "unknown", "architecture": "unknown"},
                },
            ],
        },
        oci.Index,
    )
    pick = oci.select_manifests
    assert [d.platform for d in pick(index, [Platform.parse("linux/arm64")])] == [
        index.manifests[1].platform
    ]
    both = pick(index, [Platform.parse("linux/arm/v7"), Platform.parse("linux/amd64")])
    assert [d.digest for d in both] == [index.manifests[0].digest, index.manifests[2].digest]
    assert len(pick(index, None, all_platforms=True)) == 3  # the attestation is not an image
    with pytest.raises(ImageNotFound, match="linux/s390x"):
        pick(index, [Platform.parse("linux/s390x")])


def test_manifest_round_trip_keeps_the_fields() -> None:
    document = {
        "schemaVersion": 2,
        "mediaType": oci.DOCKER_MANIFEST,
        "config": {"mediaType": oci.DOCKER_CONFIG, "digest": f"sha256:{HEX}", "size": 7},
        "layers": [
            {
                "mediaType": oci.DOCKER_LAYER_GZIP,
                "digest": f"sha256:{'b' * 64}",
                "size": 9,
                "annotations": {"a": "b"},
            },
        ],
    }
    manifest = wire.structure(document, oci.Manifest)
    assert wire.unstructure(manifest) == document
    assert manifest.effective_media_type == oci.DOCKER_MANIFEST


@pytest.mark.parametrize(
    ("document", "needle"),
    [
        (
            {
                "schemaVersion": 1,
                "config": {"mediaType": "x", "digest": f"sha256:{HEX}", "size": 1},
                "layers": [],
            },
            "schemaVersion",
        ),
        ({"schemaVersion": 2, "layers": []}, "config"),
        (
            {
                "schemaVersion": 2,
                "config": {"mediaType": "x", "digest": "sha256:no", "size": 1},
                "layers": [],
            },
            "digest",
        ),
        ("not an object", "Manifest"),
    ],
)
def test_malformed_manifests_are_refused_with_a_path(document: object, needle: str) -> None:
    with pytest.raises(InvalidInput, match=needle):
        wire.structure(document, oci.Manifest)


def test_image_config_and_chain_ids() -> None:
    diff_ids = [sha256_digest(b"1"), sha256_digest(b"2"), sha256_digest(b"3")]
    config = wire.loads(
        b'{"architecture":"arm64","os":"linux","variant":"v8","created":"2024-01-01T00:00:00Z",'
        b'"config":{"Cmd":["sh"],"Env":["A=b"],"WorkingDir":"/w"},"rootfs":{"type":"layers",'
        b'"diff_ids":["' + b'","'.join(d.encode() for d in diff_ids) + b'"]},"extra":{"x":1}}',
        oci.ImageConfig,
    )
    assert str(config.platform) == "linux/arm64"
    assert config.config is not None
    assert config.config.cmd == ("sh",)
    chain = oci.chain_ids(config.rootfs.diff_ids)
    assert chain[0] == diff_ids[0]
    second = "sha256:" + hashlib.sha256(f"{diff_ids[0]} {diff_ids[1]}".encode()).hexdigest()
    assert chain[1] == second
    third = "sha256:" + hashlib.sha256(f"{second} {diff_ids[2]}".encode()).hexdigest()
    assert chain[2] == third
