"""End-to-end fixtures: ``stack`` (module scope) starts the whole deployment
(benchmarks/stack.py: registry, proxy on SQLite, a fault-injecting link, daemon, containerd
with the starlight plugin); ``publish`` builds an image, converts it and notifies the proxy,
returning (original, converted) references.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator, Sequence

import pytest

from benchmarks.images.build import push_image
from benchmarks.services.registry import Registry
from benchmarks.stack import Stack, start_stack, stop_stack
from starlight_core.reference import Reference
from starlight_core.registry import RegistryClient


@pytest.fixture(scope="module")
def stack(registry: Registry, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    stack = start_stack(tmp_path_factory.mktemp("stack"), registry)
    try:
        yield stack
    finally:
        stop_stack(stack)


Publish = Callable[..., tuple[Reference, Reference]]


@pytest.fixture(scope="module")
def publish(stack: Stack) -> Publish:
    def publish(
        layers: Sequence[bytes],
        *,
        name: str = "app",
        tag: str = "v1",
        cmd: Sequence[str] | None = None,
        chunk_size: str = "4MiB",
    ) -> tuple[Reference, Reference]:
        source = Reference.parse(f"{stack.registry.host}/{name}:{tag}")

        async def push() -> None:
            async with RegistryClient(plain_http=True) as client:
                await push_image(client, source, layers, docker=True, cmd=cmd)

        asyncio.run(push())
        converted = source.with_tag(f"{tag}-starlight")
        code, _, err = stack.cli(
            "convert",
            "-q",
            "--plain-http",
            "--chunk-size",
            chunk_size,
            "--notify",
            str(source),
            str(converted),
        )
        assert code == 0, err
        return source, converted

    return publish
