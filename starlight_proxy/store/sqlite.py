"""SQLite back end: the embedded default, one database file next to the proxy.

sqlite3 blocks, so every call runs on a worker thread and the event loop stays free. WAL lets
readers (a small pool of connections) proceed while one writer works. Writers are serialised
twice: an ``anyio.Lock`` inside this process, and ``BEGIN IMMEDIATE`` (which takes SQLite's
write lock, waiting up to ``busy_timeout``) against other processes on the same file.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import Any, Final, TypeVar

import anyio
import anyio.to_thread

from starlight_core.errors import InvalidInput, ResourceExhausted, StarlightError
from starlight_proxy.store.driver import Dialect, Row, Transaction

__all__ = ["SQLITE_DIALECT", "SQLiteDriver"]

SQLITE_DIALECT: Final = Dialect(name="sqlite", id_type="INTEGER PRIMARY KEY", blob_type="BLOB")

T = TypeVar("T")


def _translate(exc: sqlite3.Error, path: Path) -> StarlightError:
    text = str(exc)
    if "full" in text:
        return ResourceExhausted(f"metadata store {path}: {text}", hint="free disk space")
    return StarlightError(
        f"metadata store {path}: {text}",
        hint="check that the database file is writable and not held by another process",
    )


class _SQLiteTransaction:
    def __init__(self, conn: sqlite3.Connection, path: Path) -> None:
        self._conn = conn
        self._path = path

    async def _run(self, fn: Callable[[], T]) -> T:
        def call() -> T:
            try:
                return fn()
            except sqlite3.OperationalError as exc:
                raise _translate(exc, self._path) from exc

        return await anyio.to_thread.run_sync(call)

    async def execute(self, sql: str, params: Sequence[Any] = ()) -> None:
        await self._run(lambda: self._conn.execute(sql, params))

    async def fetchone(self, sql: str, params: Sequence[Any] = ()) -> Row | None:
        row: Row | None = await self._run(lambda: self._conn.execute(sql, params).fetchone())
        return row

    async def fetchall(self, sql: str, params: Sequence[Any] = ()) -> list[Row]:
        rows: list[Row] = await self._run(lambda: self._conn.execute(sql, params).fetchall())
        return rows

    async def insert_many(
        self, table: str, columns: Sequence[str], rows: Iterable[Sequence[Any]]
    ) -> None:
        sql = f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))})"
        # The rows are produced lazily on the worker thread: encoding 100k entries stays off
        # the event loop and no second copy of them is built.
        await self._run(lambda: self._conn.executemany(sql, rows))


class SQLiteDriver:
    """Connections to one SQLite file; see the module docstring for the locking scheme."""

    dialect = SQLITE_DIALECT

    def __init__(self, path: Path, *, readers: int = 4, busy_timeout: float = 30.0) -> None:
        self.path = path
        self._busy_timeout = busy_timeout
        self._writer: sqlite3.Connection | None = None
        self._write_lock = anyio.Lock()
        self._reader_slots = anyio.Semaphore(readers)
        self._idle_readers: list[sqlite3.Connection] = []
        self._all: list[sqlite3.Connection] = []
        self._closed = False

    @classmethod
    async def open(cls, path: str | Path, **kwargs: Any) -> SQLiteDriver:
        path = Path(path)
        if str(path) in ("", ":memory:"):
            # Each connection would get its own empty database: readers would see nothing.
            raise InvalidInput("the SQLite metadata store needs a file path, not :memory:")
        if not path.parent.is_dir():
            raise InvalidInput(f"metadata store {path}: directory {path.parent} does not exist")
        driver = cls(path, **kwargs)
        driver._writer = await anyio.to_thread.run_sync(driver._connect_writer)
        return driver

    def _connect(self) -> sqlite3.Connection:
        try:
            # isolation_level=None: we issue BEGIN/COMMIT ourselves, so a read is one snapshot
            # and a write holds the lock from its first statement (BEGIN IMMEDIATE).
            conn = sqlite3.connect(
                self.path,
                timeout=self._busy_timeout,
                isolation_level=None,
                check_same_thread=False,
            )
            conn.execute("PRAGMA foreign_keys = ON")
            # NORMAL is crash-safe with WAL; only the last commits may be lost on power loss,
            # and the proxy re-indexes what it lost on the next notify.
            conn.execute("PRAGMA synchronous = NORMAL")
            # 32 MiB of page cache (the default is 2 MiB): the digest index of a 100k-file
            # layer is inserted in random order and thrashes a small cache. Grown on demand.
            conn.execute("PRAGMA cache_size = -32768")
        except sqlite3.Error as exc:
            raise _translate(exc, self.path) from exc
        self._all.append(conn)
        return conn

    def _connect_writer(self) -> sqlite3.Connection:
        conn = self._connect()
        # Switching a fresh database to WAL needs an exclusive lock, and SQLite can answer
        # "database is locked" at once (without its busy handler) while other connections open
        # the same file: retry within the busy timeout.
        deadline = time.monotonic() + self._busy_timeout
        while True:
            try:
                mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()
                break
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or time.monotonic() > deadline:
                    raise _translate(exc, self.path) from exc
                time.sleep(0.05)
            except sqlite3.Error as exc:
                raise _translate(exc, self.path) from exc
        if mode is None or str(mode[0]).lower() != "wal":
            raise StarlightError(
                f"metadata store {self.path}: cannot enable WAL (journal mode {mode!r})",
                hint="put the database on a local filesystem",
            )
        return conn

    def _check_open(self) -> None:
        if self._closed:
            raise StarlightError("metadata store is closed")

    @asynccontextmanager
    async def transaction(self, *, write: bool) -> AsyncIterator[Transaction]:
        self._check_open()
        if write:
            async with self._write_lock:
                assert self._writer is not None
                async with self._begin(self._writer, "BEGIN IMMEDIATE") as tx:
                    yield tx
            return
        async with self._reader_slots:
            if self._idle_readers:
                conn = self._idle_readers.pop()
            else:
                conn = await anyio.to_thread.run_sync(self._connect)
            try:
                async with self._begin(conn, "BEGIN") as tx:
                    yield tx
            finally:
                self._idle_readers.append(conn)

    def migration_transaction(self) -> AbstractAsyncContextManager[Transaction]:
        # BEGIN IMMEDIATE already excludes every other writer, in any process.
        return self.transaction(write=True)

    @asynccontextmanager
    async def _begin(self, conn: sqlite3.Connection, begin: str) -> AsyncIterator[Transaction]:
        tx = _SQLiteTransaction(conn, self.path)
        await tx.execute(begin)
        try:
            yield tx
        except BaseException:
            # Shielded: a cancelled caller must still leave the connection outside any
            # transaction, or the next user would inherit its half-done writes.
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(conn.rollback)
            raise
        with anyio.CancelScope(shield=True):
            try:
                await tx.execute("COMMIT")
            except BaseException:
                # A failed COMMIT (disk full) leaves SQLite inside the transaction.
                await anyio.to_thread.run_sync(conn.rollback)
                raise

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        # Wait for the writer to finish, so that no statement runs on a closed connection.
        async with self._write_lock:
            for conn in self._all:
                await anyio.to_thread.run_sync(conn.close)
            self._all.clear()
            self._idle_readers.clear()
