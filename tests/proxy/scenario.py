"""Test images for the proxy's tests: a base layer with every entry kind, an app layer, and
their next versions (a small update, and a full rebuild), pushed and converted for real.

The expected file tree of each version is computed here from the tar members alone, with a
plain overlay model, so that what the proxy's bundle rebuilds is checked against an
independent answer.
"""

from __future__ import annotations

import asyncio
import hashlib
import random
import uuid
from collections.abc import Mapping, Sequence

import attrs

from benchmarks.images.build import image_config, push_image
from starlight_core import oci, wire
from starlight_core.convert import ConvertOptions, convert_image
from starlight_core.digest import Digest
from starlight_core.layer.toc import EntryType
from starlight_core.platform import Platform
from starlight_core.reference import Reference
from starlight_core.registry import RegistryClient
from starlight_core.testing import TarMember, build_tar, gzip_bytes
from starlight_proxy.testing import FileState

CHUNK = 256 * 1024
"""Chunk size of the converted test images: big files span several extents."""
MTIME = 1_700_000_000

_KINDS = {
    "file": EntryType.FILE,
    "dir": EntryType.DIR,
    "symlink": EntryType.SYMLINK,
    "char": EntryType.CHAR,
    "block": EntryType.BLOCK,
    "fifo": EntryType.FIFO,
}
_MODES = {"dir": 0o755, "symlink": 0o777}


def noise(seed: str, size: int) -> bytes:
    """Incompressible, reproducible bytes."""
    return random.Random(seed).randbytes(size)


def text(seed: str, size: int) -> bytes:
    """Compressible, reproducible text."""
    rng = random.Random(seed)
    words = [b"alpha", b"beta", b"gamma", b"delta", b"starlight", b"proxy", b"\n"]
    out = bytearray()
    while len(out) < size:
        out += rng.choice(words) + b" "
    return bytes(out[:size])


def base_layer(tag: str, *, extra: Sequence[TarMember] = ()) -> list[TarMember]:
    tool = noise(f"{tag}-tool", 200_000)
    return [
        TarMember("etc", kind="dir"),
        TarMember("etc/os-release", data=b"NAME=starlight-test\nID=" + tag.encode() + b"\n"),
        TarMember("etc/hostname", data=b"box\n"),
        TarMember("etc/hostname.copy", data=b"box\n"),  # same content: sent once
        TarMember("etc/empty", data=b""),
        TarMember("usr", kind="dir"),
        TarMember("usr/bin", kind="dir"),
        TarMember("usr/bin/tool", data=tool, mode=0o755, xattrs={"user.origin": "test"}),
        TarMember("usr/bin/tool2", kind="hardlink", linkname="usr/bin/tool"),
        TarMember("usr/bin/su", data=text(f"{tag}-su", 3000), mode=0o4755, uid=0, gid=0),
        TarMember("usr/lib", kind="dir"),
        TarMember("usr/lib/big.bin", data=noise(f"{tag}-big", 5 * CHUNK + 12345)),
        TarMember("usr/lib/libz.so", data=text(f"{tag}-libz", 90_000)),
        TarMember("usr/lib/libz.so.1", kind="symlink", linkname="libz.so"),
        TarMember("dev", kind="dir"),
        TarMember("dev/null", kind="char", devmajor=1, devminor=3, mode=0o666),
        TarMember("var", kind="dir"),
        TarMember("var/run.fifo", kind="fifo"),
        TarMember("var/empty", kind="dir", mode=0o700),
        TarMember("var/empty/old", data=b"hidden by an opaque directory later\n"),
        TarMember("home", kind="dir", uid=1000, gid=1000, mode=0o750),
        TarMember("home/user.txt", data=text(f"{tag}-home", 7000), uid=1000, gid=1000),
        *extra,
    ]


def app_layer(
    tag: str,
    *,
    changed: Sequence[int] = (),
    removed: Sequence[int] = (),
    added: bool = False,
    dir_mtime: int = MTIME,
) -> list[TarMember]:
    members = [
        TarMember("etc/hostname", kind="whiteout"),
        TarMember("var/empty", kind="opaque"),
        TarMember("var/empty/new", data=b"the only file left here\n"),
        TarMember("app", kind="dir", mtime=dir_mtime),
    ]
    for i in range(10):
        if i in removed:
            continue
        version = "v2" if i in changed else "v1"
        members.append(
            TarMember(f"app/{i}.txt", data=text(f"{tag}-app{i}-{version}", 4000 + i * 999))
        )
    data_version = "v2" if 10 in changed else "v1"
    members.append(TarMember("app/data.bin", data=noise(f"{tag}-data-{data_version}", 300_000)))
    if added:
        members.append(TarMember("app/new.txt", data=text(f"{tag}-new", 5000)))
    return members


@attrs.frozen
class Version:
    """One converted test image: its Starlight reference, members and expected files."""

    reference: Reference
    """By tag."""
    digest: Digest
    """Of the converted manifest."""
    layers: tuple[tuple[TarMember, ...], ...]

    @property
    def files(self) -> dict[str, FileState]:
        return expected_files(self.layers)

    @property
    def contents(self) -> dict[Digest, bytes]:
        """Every content of every layer (what a worker holding this image can copy)."""
        return {_digest(m.data): m.data for layer in self.layers for m in layer if m.kind == "file"}


@attrs.frozen
class Scenario:
    v1: Version
    v2: Version
    """v1 with three app files changed, one added, one removed; same base layer."""
    v3: Version
    """v1 rebuilt: every layer digest differs, nearly every file is the same."""


def scenario_layers(tag: str) -> dict[str, list[list[TarMember]]]:
    return {
        "v1": [base_layer(tag), app_layer(tag)],
        "v2": [base_layer(tag), app_layer(tag, changed=(1, 2, 10), removed=(9,), added=True)],
        "v3": [
            base_layer(tag, extra=[TarMember("etc/build-id", data=b"rebuild 2\n")]),
            app_layer(tag, dir_mtime=MTIME + 3600),
        ],
    }


async def push_converted(
    client: RegistryClient,
    registry_host: str,
    repository: str,
    tag: str,
    layers: Sequence[Sequence[TarMember]],
) -> Version:
    """Push an image of ``layers`` as ``repository:tag-src``, convert it to ``:tag``."""
    source = Reference.parse(f"{registry_host}/{repository}:{tag}-src")
    destination = source.with_tag(tag)
    await push_image(client, source, [build_tar(layer) for layer in layers])
    result = await convert_image(client, source, destination, ConvertOptions(chunk_size=CHUNK))
    assert result.reference.digest is not None
    return Version(
        result.reference.with_tag(tag),
        result.reference.digest,
        tuple(tuple(layer) for layer in layers),
    )


def make_scenario(registry_host: str) -> Scenario:
    """Build the scenario in a registry (for module-scoped fixtures, outside any loop)."""

    async def build() -> Scenario:
        async with RegistryClient(plain_http=True) as client:
            return await build_scenario(client, registry_host)

    return asyncio.run(build())


async def build_scenario(client: RegistryClient, registry_host: str) -> Scenario:
    tag = uuid.uuid4().hex[:10]
    repository = f"scenario-{tag}"
    versions = {
        name: await push_converted(client, registry_host, repository, name, layers)
        for name, layers in scenario_layers(tag).items()
    }
    return Scenario(**versions)


def _digest(data: bytes) -> Digest:
    return Digest("sha256:" + hashlib.sha256(data).hexdigest())


def _under(path: str, directory: str) -> bool:
    return path.startswith(directory + "/")


def expected_files(layers: Sequence[Sequence[TarMember]]) -> dict[str, FileState]:
    """The merged tree of ``layers`` by a plain overlay model (explicit dirs assumed)."""
    tree: dict[str, FileState] = {}
    for layer in layers:
        by_name: Mapping[str, TarMember] = {m.name: m for m in layer}
        for member in layer:  # whiteouts and opaque markers hide lower layers only
            if member.kind == "whiteout":
                for path in [p for p in tree if p == member.name or _under(p, member.name)]:
                    del tree[path]
            elif member.kind == "opaque":
                for path in [p for p in tree if _under(p, member.name)]:
                    del tree[path]
        for member in layer:
            if member.kind in ("whiteout", "opaque"):
                continue
            shown = by_name[member.linkname] if member.kind == "hardlink" else member
            state = FileState(
                type=_KINDS[shown.kind],
                mode=shown.mode if shown.mode is not None else _MODES.get(shown.kind, 0o644),
                uid=shown.uid,
                gid=shown.gid,
                mtime_ns=int(shown.mtime) * 1_000_000_000,
                linkname=shown.linkname if shown.kind == "symlink" else "",
                devmajor=shown.devmajor,
                devminor=shown.devminor,
                xattrs={k: v.encode() for k, v in shown.xattrs.items()},
                data=shown.data if shown.kind == "file" else None,
            )
            previous = tree.get(member.name)
            if previous is not None and not (
                previous.type is EntryType.DIR and state.type is EntryType.DIR
            ):
                for path in [p for p in tree if _under(p, member.name)]:
                    del tree[path]
            tree[member.name] = state
    return tree


async def push_converted_index(
    client: RegistryClient,
    registry_host: str,
    repository: str,
    tag: str,
    platforms: Mapping[str, Sequence[Sequence[TarMember]]],
) -> Reference:
    """An OCI index of one image per platform (``"linux/arm64"`` -> layers), converted."""
    source = Reference.parse(f"{registry_host}/{repository}:{tag}-src")
    descriptors = []
    for text, layers in platforms.items():
        platform = Platform.parse(text)
        tars = [build_tar(layer) for layer in layers]
        blobs = [gzip_bytes(tar) for tar in tars]
        config = image_config([_digest(tar) for tar in tars], architecture=platform.architecture)
        for blob in [*blobs, config]:
            await client.upload_blob(source, blob, _digest(blob))
        manifest = oci.Manifest(
            schema_version=2,
            media_type=oci.OCI_MANIFEST,
            config=oci.Descriptor(oci.OCI_CONFIG, _digest(config), len(config)),
            layers=tuple(oci.Descriptor(oci.OCI_LAYER_GZIP, _digest(b), len(b)) for b in blobs),
        )
        data = wire.dumps(manifest)
        digest = await client.put_manifest(
            source.with_digest(_digest(data)), data, oci.OCI_MANIFEST
        )
        descriptors.append(oci.Descriptor(oci.OCI_MANIFEST, digest, len(data), platform=platform))
    index = oci.Index(schema_version=2, media_type=oci.OCI_INDEX, manifests=tuple(descriptors))
    await client.put_manifest(source, wire.dumps(index), oci.OCI_INDEX)
    destination = source.with_tag(tag)
    options = ConvertOptions(chunk_size=CHUNK, all_platforms=True)
    await convert_image(client, source, destination, options)
    return destination
