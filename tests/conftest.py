"""Shared fixtures. Fixtures that start a real service live with the service's area
(``tests/<area>/conftest.py``) or here when several areas need them."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from benchmarks.services.registry import Registry


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.geteuid() == 0:
        return
    skip = pytest.mark.skip(reason="needs root (real containerd, FUSE, namespaces)")
    for item in items:
        if "e2e" in item.keywords:
            item.add_marker(skip)


# --- the real registry (docker-registry), one per session ----------------------------------
# Tests share it: each uses its own repository names (e.g. with a uuid) so they never collide.

REGISTRY_USER = ("starlight", "s3cret-pass")


@pytest.fixture(scope="session")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    """An anonymous docker-registry on a free loopback port (``.host``, ``.url``)."""
    with Registry(tmp_path_factory.mktemp("registry")) as instance:
        yield instance


@pytest.fixture(scope="session")
def auth_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    """A docker-registry requiring Basic auth as ``REGISTRY_USER`` (``.htpasswd``)."""
    with Registry(tmp_path_factory.mktemp("auth-registry"), htpasswd=REGISTRY_USER) as instance:
        yield instance
