"""What a database back end must provide to run the shared store logic.

The store (``sql.py``) speaks one SQL with ``?`` placeholders; a driver runs it on one engine,
owns the connections, decides what a transaction means there (SQLite: one writer at a time;
PostgreSQL: a pooled connection), and supplies the one bulk path each engine is best at.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from contextlib import AbstractAsyncContextManager
from typing import Any, Protocol

import attrs

__all__ = ["Dialect", "Driver", "Row", "Transaction"]

Row = tuple[Any, ...]


@attrs.frozen
class Dialect:
    """The few words of DDL that differ between engines (see ``schema.py``)."""

    name: str
    id_type: str
    """An auto-numbered 64-bit primary key column type."""
    blob_type: str

    def ddl(self, statement: str) -> str:
        return statement.format(id=self.id_type, blob=self.blob_type)


class Transaction(Protocol):
    """Statements inside one database transaction; committed when the block exits cleanly."""

    async def execute(self, sql: str, params: Sequence[Any] = ()) -> None: ...

    async def fetchone(self, sql: str, params: Sequence[Any] = ()) -> Row | None: ...

    async def fetchall(self, sql: str, params: Sequence[Any] = ()) -> list[Row]: ...

    async def insert_many(
        self, table: str, columns: Sequence[str], rows: Iterable[Sequence[Any]]
    ) -> None:
        """Insert many rows fast (executemany / COPY); ``rows`` may be a lazy iterator."""
        ...


class Driver(Protocol):
    dialect: Dialect

    def transaction(self, *, write: bool) -> AbstractAsyncContextManager[Transaction]:
        """A transaction; read ones see one consistent snapshot, write ones are serialised
        where the engine needs it."""
        ...

    def migration_transaction(self) -> AbstractAsyncContextManager[Transaction]:
        """A write transaction that also excludes every other process migrating the same
        database, held until it ends."""
        ...

    async def close(self) -> None: ...
