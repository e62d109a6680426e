"""The proxy's metadata store: images, layer TOCs, rankings and traces.

``await open_store("/var/lib/starlight/proxy.db")`` gives the embedded SQLite store;
``await open_store("postgresql://user@host/db")`` the shared PostgreSQL one for replicas.
Both run the same SQL and the same migrations, applied when the store opens.
"""

from __future__ import annotations

import os
from typing import Any

from starlight_core.errors import InvalidInput
from starlight_proxy.store.api import DEFAULT_CLAIM_TIMEOUT, MetadataStore, StaleRanking
from starlight_proxy.store.driver import Driver
from starlight_proxy.store.records import (
    ImageMetadata,
    ImageRecord,
    ImageState,
    IndexClaim,
    LayerRecord,
    RankUpdate,
    TraceRecord,
)
from starlight_proxy.store.sql import SCHEMA_VERSION, SQLMetadataStore

__all__ = [
    "DEFAULT_CLAIM_TIMEOUT",
    "SCHEMA_VERSION",
    "ImageMetadata",
    "ImageRecord",
    "ImageState",
    "IndexClaim",
    "LayerRecord",
    "MetadataStore",
    "RankUpdate",
    "SQLMetadataStore",
    "StaleRanking",
    "TraceRecord",
    "open_store",
]

_POSTGRES_SCHEMES = ("postgresql://", "postgres://")
_SQLITE_SCHEME = "sqlite://"


async def open_store(location: str | os.PathLike[str], **options: Any) -> SQLMetadataStore:
    """Open (creating and migrating if needed) the store at ``location``.

    ``location`` is a ``postgresql://`` URL, or a SQLite file path (bare, or as
    ``sqlite:///absolute/path``). ``options`` go to the back end (SQLite: ``readers``,
    ``busy_timeout``; PostgreSQL: ``min_size``, ``max_size``, ``timeout``).
    """
    text = os.fspath(location)
    if not isinstance(text, str) or not text:
        raise InvalidInput("metadata store location is empty")
    if text.startswith(_POSTGRES_SCHEMES):
        # Imported here: a SQLite-only proxy need not load psycopg.
        from starlight_proxy.store.postgres import PostgresDriver

        driver: Driver = await PostgresDriver.open(text, **options)
    elif "://" in text and not text.startswith(_SQLITE_SCHEME):
        raise InvalidInput(
            f"unsupported metadata store {text.split('://', 1)[0]}://",
            hint="use a file path (SQLite) or a postgresql:// URL",
        )
    else:
        from starlight_proxy.store.sqlite import SQLiteDriver

        path = text.removeprefix(_SQLITE_SCHEME)
        driver = await SQLiteDriver.open(path, **options)
    store = SQLMetadataStore(driver)
    try:
        await store.migrate()
    except BaseException:
        await store.close()
        raise
    return store
