"""Fixtures for the proxy's tests: the metadata store on every back end, and PostgreSQL.

``store`` runs each test once per back end: SQLite on a fresh file, and PostgreSQL in a fresh
schema of one session-wide private cluster (a schema costs milliseconds, a database much more).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Iterator

import pytest

from benchmarks.services.postgres import POSTGRES_BINDIR, Postgres
from starlight_proxy.store import SQLMetadataStore, open_store

BACKENDS = [
    pytest.param("sqlite", id="sqlite"),
    pytest.param("postgres", id="postgres", marks=pytest.mark.e2e),
]


@pytest.fixture(scope="module")
def anyio_backend() -> str:
    # The proxy runs on uvicorn's asyncio loop; psycopg's async API needs asyncio too.
    return "asyncio"


@pytest.fixture(scope="session")
def postgres() -> Iterator[Postgres]:
    """A private PostgreSQL 15 on a free loopback port, for the whole session."""
    if not os.access(POSTGRES_BINDIR / "initdb", os.X_OK):
        pytest.skip("PostgreSQL 15 is not installed (apt-get install postgresql-15)")
    with Postgres() as server:
        yield server


@pytest.fixture(params=BACKENDS)
def store_location(request: pytest.FixtureRequest, tmp_path: os.PathLike[str]) -> str:
    """Where a fresh, empty store lives: a SQLite path or a PostgreSQL URL."""
    if request.param == "sqlite":
        return os.path.join(tmp_path, "store.db")
    server: Postgres = request.getfixturevalue("postgres")
    return server.create_schema(f"test_{uuid.uuid4().hex[:16]}")


@pytest.fixture
async def store(store_location: str) -> AsyncIterator[SQLMetadataStore]:
    opened = await open_store(store_location)
    try:
        yield opened
    finally:
        await opened.close()
