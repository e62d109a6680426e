"""containerd's own client pulling into the starlight snapshotter (remote-snapshot protocol).

``ctr-remote image rpull --snapshotter starlight`` pulls through containerd's unpacker with
stargz's remote-snapshot labels on each layer. For a converted image the proxy knows, the
daemon pulls it through the proxy and answers ALREADY_EXISTS for every layer: containerd never
downloads a layer blob, and ``ctr run`` starts the container on starlight's layers. For an
image the proxy does not know, the daemon declines, says so (log line, metric), and containerd
pulls and unpacks it as usual.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Iterator

import pytest

from benchmarks.images.build import push_image
from benchmarks.images.busybox import busybox_members
from benchmarks.services.registry import Registry
from benchmarks.stack import Stack, stop_stack
from starlight_core.reference import Reference
from starlight_core.registry import RegistryClient
from starlight_core.testing import TarMember, build_tar
from tests.e2e.conftest import Publish
from tests.e2e.test_resilience import start_observed_stack

pytestmark = pytest.mark.e2e

CTR_REMOTE = "/usr/bin/ctr-remote"


@pytest.fixture(scope="module")
def stack(registry: Registry, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    stack = start_observed_stack(tmp_path_factory.mktemp("remote"), registry)
    try:
        yield stack
    finally:
        stop_stack(stack)


def _rpull(stack: Stack, ref: Reference) -> str:
    result = stack.containerd.ctr(
        "images", "rpull", "--plain-http", "--snapshotter", "starlight", str(ref),
        binary=CTR_REMOTE, check=False,
    )  # fmt: skip
    assert result.returncode == 0, f"{result.stderr}\n--- daemon ---\n{_tail(stack)}"
    return result.stdout


def _tail(stack: Stack) -> str:
    lines = [line for line in stack.daemon.log().splitlines() if " DEBUG " not in line]
    return "\n".join(lines[-40:])


def _content(stack: Stack) -> set[str]:
    listing = stack.containerd.ctr("content", "ls", "-q").stdout
    return {line.strip() for line in listing.splitlines() if line.strip()}


def _layers_of(stack: Stack, ref: Reference) -> list[str]:
    """The layer digests of the manifest containerd resolved for ``ref``."""
    manifest_digest = next(
        line.split()[2]
        for line in stack.containerd.ctr("images", "ls").stdout.splitlines()[1:]
        if line.split()[0] == str(ref)
    )
    manifest = json.loads(stack.containerd.ctr("content", "get", manifest_digest).stdout)
    return [layer["digest"] for layer in manifest["layers"]]


def test_rpull_of_a_starlight_image_is_lazy_and_runs(stack: Stack, publish: Publish) -> None:
    layers = [
        build_tar([*busybox_members(), TarMember("etc/motd", data=b"lazy via rpull\n")]),
        build_tar([TarMember("srv", kind="dir"), TarMember("srv/a.txt", data=b"a" * 50_000)]),
    ]
    _, converted = publish(layers, name="rpull", cmd=["/bin/sh", "-c", "cat /etc/motd"])
    lazy_before = stack.daemon.metric("starlight_worker_remote_layers_total")

    _rpull(stack, converted)

    # Every layer came through starlight: containerd downloaded none of the layer blobs.
    assert stack.daemon.metric("starlight_worker_remote_layers_total") - lazy_before == 2
    held = _content(stack)
    assert not held & set(_layers_of(stack, converted)), "containerd fetched a layer blob"
    assert stack.run(converted) == "lazy via rpull\n"
    out = stack.run(converted, "/bin/sh", "-c", "wc -c < /srv/a.txt")
    assert out.strip() == "50000"
    # The daemon pulled it (in the background) and shows it like any other image.
    code, out, err = stack.cli("images", "--json")
    assert code == 0, err
    assert str(converted) in {row["reference"] for row in json.loads(out)}


def test_rpull_of_an_unknown_image_falls_back_and_says_so(stack: Stack) -> None:
    name = f"not-starlight-{uuid.uuid4().hex[:8]}"
    ref = Reference.parse(f"{stack.registry.host}/{name}:v1")
    layers = [build_tar([*busybox_members(), TarMember("etc/motd", data=b"stock unpack\n")])]

    async def push() -> None:
        async with RegistryClient(plain_http=True) as client:
            await push_image(client, ref, layers, docker=True, cmd=["cat", "/etc/motd"])

    asyncio.run(push())
    declined_before = stack.daemon.metric(
        "starlight_worker_remote_fallbacks_total", reason="image_not_found"
    )

    _rpull(stack, ref)

    declined = stack.daemon.metric(
        "starlight_worker_remote_fallbacks_total", reason="image_not_found"
    )
    assert declined - declined_before == 1
    said = [
        line
        for line in stack.daemon.log().splitlines()
        if "falling back to a full download" in line and name in line
    ]
    assert said, "no log line about the fallback"
    assert " INFO " in said[0], said
    # containerd downloaded and unpacked the layer itself, into our snapshotter.
    assert set(_layers_of(stack, ref)) <= _content(stack)
    assert stack.run(ref) == "stock unpack\n"
