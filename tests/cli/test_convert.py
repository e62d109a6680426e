"""``ctr-starlight convert`` against a real docker-registry: results, idempotency, bad input."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import uuid
from collections.abc import Sequence

import pytest
from click.testing import CliRunner

from benchmarks.images.build import BuiltImage, push_image
from benchmarks.services.faulty import Fault, FaultyProxy
from benchmarks.services.registry import Registry
from starlight_cli.main import cli
from starlight_core import oci, wire
from starlight_core.errors import ImageNotFound
from starlight_core.layer.scan import LayerScanner
from starlight_core.reference import Reference
from starlight_core.registry import RegistryClient
from starlight_core.testing import TarMember, build_tar, gzip_bytes
from tests.conftest import REGISTRY_USER

pytestmark = pytest.mark.e2e

LAYERS = [
    build_tar(
        [
            TarMember("etc", kind="dir"),
            TarMember("etc/os-release", data=b"NAME=test\n"),
            TarMember("usr/lib/big.bin", data=bytes(range(256)) * 40_000, mode=0o755),
            TarMember("usr/lib/empty", data=b""),
        ]
    ),
    build_tar(
        [
            TarMember("etc/os-release", kind="whiteout"),
            TarMember("srv", kind="dir"),
            TarMember("srv/a", data=b"a" * 3000, xattrs={"user.tag": "x"}),
            TarMember("srv/b", kind="hardlink", linkname="srv/a"),
            TarMember("srv/c", kind="symlink", linkname="a"),
        ]
    ),
]


def _repo(registry: Registry, name: str = "conv") -> Reference:
    return Reference.parse(f"{registry.host}/{name}-{uuid.uuid4().hex[:8]}:v1")


def _push(registry: Registry, ref: Reference, layers: Sequence[bytes], **kw: object) -> BuiltImage:
    async def run() -> BuiltImage:
        async with RegistryClient(plain_http=True) as client:
            return await push_image(client, ref, layers, **kw)  # type: ignore[arg-type]

    return asyncio.run(run())


def _manifest(ref: Reference, **client_kw: object) -> tuple[oci.Manifest, bytes]:
    async def run() -> tuple[oci.Manifest, bytes]:
        async with RegistryClient(plain_http=True, **client_kw) as client:  # type: ignore[arg-type]
            response = await client.get_manifest(ref)
            manifest = wire.loads(response.data, oci.Manifest)
            blobs = [await client.get_blob(ref, layer.digest) for layer in manifest.layers]
            return manifest, b"".join(blobs)

    return asyncio.run(run())


def _convert(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(cli, ["convert", "--quiet", *args])
    return result.exit_code, result.stdout, result.stderr


def test_convert_produces_starlight_layers_with_same_config(registry: Registry) -> None:
    source = _repo(registry)
    built = _push(registry, source, LAYERS, docker=True)
    destination = source.with_tag("v1-starlight")
    code, out, err = _convert("--plain-http", str(source), str(destination))
    assert code == 0, err
    assert out.strip().startswith(str(destination) + "@sha256:")

    async def check() -> None:
        async with RegistryClient(plain_http=True) as client:
            response = await client.get_manifest(destination)
            assert response.media_type == oci.DOCKER_MANIFEST
            manifest = wire.loads(response.data, oci.Manifest)
            # The config (and so every diff_id) is untouched.
            assert manifest.config.digest == built.config_digest
            for layer, diff_id in zip(manifest.layers, built.diff_ids, strict=True):
                assert layer.media_type == oci.DOCKER_LAYER_GZIP
                blob = await client.get_blob(destination, layer.digest)
                scanner = LayerScanner()
                scanner.receive_data(blob)
                scanner.receive_data(b"")
                assert scanner.toc.layer.diff_id == diff_id

    asyncio.run(check())


def test_convert_is_idempotent(registry: Registry) -> None:
    source = _repo(registry)
    _push(registry, source, LAYERS)
    destination = source.with_tag("sl")
    first = _convert("--plain-http", str(source), str(destination))
    second = _convert("--plain-http", str(source), str(destination))
    assert first[0] == second[0] == 0
    assert first[1] == second[1]  # same manifest digest
    assert "0 converted, 2 reused" in second[2]
    # Converting an already-converted image reuses every layer as it is.
    third = _convert("--plain-http", str(destination), str(source.with_tag("again")))
    assert third[0] == 0
    assert "0 converted, 2 reused" in third[2]
    assert third[1].split("@")[1] == first[1].split("@")[1]


def test_console_script_runs(registry: Registry) -> None:
    source = _repo(registry)
    _push(registry, source, LAYERS[:1])
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "starlight_cli",
            "convert",
            "-q",
            "--plain-http",
            str(source),
            str(source.with_tag("sl")),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "@sha256:" in result.stdout


# --- bad input: one line naming the problem, non-zero exit, nothing tagged -----------------


def _assert_untagged(ref: Reference) -> None:
    async def run() -> None:
        async with RegistryClient(plain_http=True) as client:
            with pytest.raises(ImageNotFound):
                await client.get_manifest(ref)

    asyncio.run(run())


def _one_line_error(err: str, *needles: str) -> None:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("ctr-starlight: error: ")
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_malformed_reference(registry: Registry) -> None:
    code, _, err = _convert("--plain-http", "Not A/Ref::", f"{registry.host}/x:y")
    assert code == 2  # a usage error
    assert "invalid image reference" in err


def test_unknown_repository(registry: Registry) -> None:
    missing = _repo(registry, "missing")
    destination = missing.with_tag("sl")
    code, _, err = _convert("--plain-http", str(missing), str(destination))
    assert code == 1
    _one_line_error(err, missing.path)
    _assert_untagged(destination)


def _raw_image(registry: Registry, blob: bytes, diff_id_of: bytes) -> Reference:
    """An image whose single layer blob is ``blob`` (possibly garbage)."""
    ref = _repo(registry, "bad")

    async def run() -> None:
        async with RegistryClient(plain_http=True) as client:
            from benchmarks.images.build import image_config
            from starlight_core.digest import sha256_digest

            config = image_config([sha256_digest(diff_id_of)])
            for data in (blob, config):
                await client.upload_blob(ref, data, sha256_digest(data))
            manifest = oci.Manifest(
                schema_version=2,
                media_type=oci.OCI_MANIFEST,
                config=oci.Descriptor(oci.OCI_CONFIG, sha256_digest(config), len(config)),
                layers=(oci.Descriptor(oci.OCI_LAYER_GZIP, sha256_digest(blob), len(blob)),),
            )
            await client.put_manifest(ref, wire.dumps(manifest), oci.OCI_MANIFEST)

    asyncio.run(run())
    return ref


@pytest.mark.parametrize(
    ("case", "needle"),
    [
        ("corrupt-gzip", "gzip"),
        ("truncated-tar", "truncated"),
        ("dotdot-path", "escapes the root"),
        ("absolute-path", "absolute"),
    ],
)
def test_bad_layers_are_refused(registry: Registry, case: str, needle: str) -> None:
    good = build_tar([TarMember("f", data=b"x" * 100_000)])
    if case == "corrupt-gzip":
        blob = bytearray(gzip_bytes(good))
        blob[len(blob) // 2] ^= 0x55
        tar, blob_bytes = good, bytes(blob)
    elif case == "truncated-tar":
        tar = good[:50_000]
        blob_bytes = gzip_bytes(tar)
    else:
        name = "../../etc/evil" if case == "dotdot-path" else "/etc/evil"
        import io
        import tarfile

        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as archive:
            info = tarfile.TarInfo(name)
            info.size = 4
            archive.addfile(info, io.BytesIO(b"evil"))
        tar = buffer.getvalue()
        blob_bytes = gzip_bytes(tar)
    source = _raw_image(registry, blob_bytes, tar)
    destination = source.with_tag("sl")
    code, _, err = _convert("--plain-http", str(source), str(destination))
    assert code == 1
    _one_line_error(err, needle)
    _assert_untagged(destination)


def test_registry_500_then_recovery(registry: Registry) -> None:
    source = _repo(registry)
    _push(registry, source, LAYERS)
    with FaultyProxy(registry.url) as faulty:
        # Two failures on blob reads: the client retries and the conversion succeeds.
        faulty.add(Fault(match=lambda m, p: m == "GET" and "/blobs/" in p, times=2, status=500))
        src = Reference.parse(f"{faulty.host}/{source.path}:v1")
        code, out, err = _convert("--plain-http", str(src), str(src.with_tag("sl")))
        assert code == 0, err
        assert "@sha256:" in out
        assert sum(1 for f in faulty.faults for _ in range(f.hits)) == 2


def test_registry_down_for_good(registry: Registry) -> None:
    source = _repo(registry)
    _push(registry, source, LAYERS)
    with FaultyProxy(registry.url) as faulty:
        faulty.add(
            Fault(match=lambda m, p: "/blobs/" in p and m == "GET", times=10_000, status=503)
        )
        src = Reference.parse(f"{faulty.host}/{source.path}:v1")
        code, _, err = _convert("--plain-http", str(src), str(src.with_tag("sl")))
        assert code == 3
        _one_line_error(err, "503")
        _assert_untagged(src.with_tag("sl"))


def test_wrong_credentials(auth_registry: Registry) -> None:
    good = ":".join(REGISTRY_USER)
    source = Reference.parse(f"{auth_registry.host}/cred-{uuid.uuid4().hex[:8]}:v1")

    async def push() -> None:
        async with RegistryClient(plain_http=True, credentials={auth_registry.host: good}) as c:
            await push_image(c, source, LAYERS[:1])

    asyncio.run(push())
    code, _, err = _convert(
        "--plain-http",
        "--src-user",
        good,
        "--dst-user",
        "starlight:wrong",
        str(source),
        str(source.with_tag("sl")),
    )
    assert code == 1
    _one_line_error(err, "401")
    code, _, err = _convert(
        "--plain-http",
        "--src-user",
        good,
        "--dst-user",
        good,
        str(source),
        str(source.with_tag("sl")),
    )
    assert code == 0, err


def test_notify_without_proxy_is_a_clear_error(
    registry: Registry, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("STARLIGHT_CLI_CONFIG", "/nonexistent/cli.toml")
    monkeypatch.delenv("STARLIGHT_PROXY", raising=False)
    source = _repo(registry)
    code, _, err = _convert("--plain-http", "--notify", str(source), str(source.with_tag("sl")))
    assert code == 1
    _one_line_error(err, "proxy not configured")
