"""A store in a private directory per test."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from starlight_worker.store import Store


@pytest.fixture
def store_root(tmp_path: Path) -> Path:
    return tmp_path / "store"


@pytest.fixture
def store(store_root: Path) -> Iterator[Store]:
    instance = Store(store_root)
    yield instance
    instance.close()
