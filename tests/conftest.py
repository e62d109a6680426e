"""Shared fixtures. Fixtures that start a real service live with the service's area
(``tests/<area>/conftest.py``) or here when several areas need them."""

from __future__ import annotations

import os

import pytest


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.geteuid() == 0:
        return
    skip = pytest.mark.skip(reason="needs root (real containerd, FUSE, namespaces)")
    for item in items:
        if "e2e" in item.keywords:
            item.add_marker(skip)
