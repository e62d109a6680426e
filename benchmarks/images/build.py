"""Assemble an image from uncompressed layer tars and push it to a registry."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from typing import Any

import attrs

from starlight_core import oci, wire
from starlight_core.digest import Digest, sha256_digest
from starlight_core.reference import Reference
from starlight_core.registry import RegistryClient
from starlight_core.testing import gzip_bytes

__all__ = ["BuiltImage", "image_config", "push_image"]

CREATED = "2024-01-01T00:00:00Z"


@attrs.frozen
class BuiltImage:
    reference: Reference
    manifest_digest: Digest
    config_digest: Digest
    layer_digests: tuple[Digest, ...]
    diff_ids: tuple[Digest, ...]
    layer_sizes: tuple[int, ...]

    @property
    def pinned(self) -> Reference:
        return self.reference.with_digest(self.manifest_digest)

    @property
    def compressed_size(self) -> int:
        return sum(self.layer_sizes)


def image_config(
    diff_ids: Sequence[Digest],
    *,
    cmd: Sequence[str] | None = None,
    entrypoint: Sequence[str] | None = None,
    env: Sequence[str] = ("PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",),
    working_dir: str | None = None,
    labels: Mapping[str, str] | None = None,
    architecture: str = "amd64",
) -> bytes:
    config: dict[str, Any] = {"Env": list(env)}
    if cmd is not None:
        config["Cmd"] = list(cmd)
    if entrypoint is not None:
        config["Entrypoint"] = list(entrypoint)
    if working_dir:
        config["WorkingDir"] = working_dir
    if labels:
        config["Labels"] = dict(labels)
    document = {
        "architecture": architecture,
        "os": "linux",
        "created": CREATED,
        "config": config,
        "rootfs": {"type": "layers", "diff_ids": [str(d) for d in diff_ids]},
        "history": [
            {"created": CREATED, "created_by": f"starlight layer {i}"} for i in range(len(diff_ids))
        ],
    }
    return json.dumps(document, indent=2, sort_keys=True).encode()


async def push_image(
    client: RegistryClient,
    reference: Reference,
    layers: Sequence[bytes],
    *,
    docker: bool = False,
    cmd: Sequence[str] | None = None,
    entrypoint: Sequence[str] | None = None,
    env: Sequence[str] | None = None,
    working_dir: str | None = None,
    gzip_level: int = 6,
) -> BuiltImage:
    """Push an image made of ``layers`` (uncompressed tars, base first), each gzip-compressed
    as ``docker push`` would, with a minimal config. Docker schema 2 or OCI media types."""
    blobs = [gzip_bytes(tar, gzip_level) for tar in layers]
    diff_ids = [Digest("sha256:" + hashlib.sha256(tar).hexdigest()) for tar in layers]
    config_kwargs: dict[str, Any] = {
        "cmd": cmd,
        "entrypoint": entrypoint,
        "working_dir": working_dir,
    }
    if env is not None:
        config_kwargs["env"] = env
    config = image_config(diff_ids, **config_kwargs)
    config_digest = sha256_digest(config)
    layer_type = oci.DOCKER_LAYER_GZIP if docker else oci.OCI_LAYER_GZIP
    for blob in blobs:
        digest = sha256_digest(blob)
        if await client.head_blob(reference, digest) is None:
            await client.upload_blob(reference, blob, digest)
    if await client.head_blob(reference, config_digest) is None:
        await client.upload_blob(reference, config, config_digest)
    manifest = oci.Manifest(
        schema_version=2,
        media_type=oci.DOCKER_MANIFEST if docker else oci.OCI_MANIFEST,
        config=oci.Descriptor(
            media_type=oci.DOCKER_CONFIG if docker else oci.OCI_CONFIG,
            digest=config_digest,
            size=len(config),
        ),
        layers=tuple(
            oci.Descriptor(media_type=layer_type, digest=sha256_digest(b), size=len(b))
            for b in blobs
        ),
    )
    data = wire.dumps(manifest)
    digest = await client.put_manifest(reference, data, manifest.effective_media_type)
    return BuiltImage(
        reference=reference,
        manifest_digest=digest,
        config_digest=config_digest,
        layer_digests=tuple(sha256_digest(b) for b in blobs),
        diff_ids=tuple(diff_ids),
        layer_sizes=tuple(len(b) for b in blobs),
    )
