"""The store's SQLite database (``<root>/store.db``): layers, contents, images, pulls.

The disk is the truth for contents (a file at its final path is verified content by
construction); the database is what makes the store quick to ask: which layers exist and in
what state, which content digests are present where (for local copies and for telling the
proxy what we hold), what each image is made of, and how to resume an interrupted pull. After
a crash the layer code rebuilds a layer's rows from its tree.

One connection behind one lock: the daemon calls in from worker threads and SQLite serialises
writers anyway. WAL with ``synchronous = NORMAL``: a commit costs no fsync, and a power loss
can only lose the last few commits, which the next ``begin_layer`` re-derives from disk.
The schema is versioned with ``PRAGMA user_version``; ``_MIGRATIONS[n]`` brings version
``n - 1`` to ``n``.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Final

from starlight_core.digest import Digest
from starlight_core.errors import FailedPrecondition, ResourceExhausted, StarlightError
from starlight_worker.store.lifecycle import LayerState
from starlight_worker.store.model import ImageRecord, LayerRecord, PullRecord, PullState

__all__ = ["SCHEMA_VERSION", "ContentRow", "Database"]

SCHEMA_VERSION: Final = 1

_MIGRATIONS: Final[dict[int, str]] = {
    1: """
CREATE TABLE layers (
    key          TEXT    PRIMARY KEY,
    diff_id      TEXT    NOT NULL,
    state        TEXT    NOT NULL CHECK (state IN ('receiving', 'complete')),
    -- sha256 of the TOC's entries without chunk positions: what the tree is made of.
    fingerprint  TEXT    NOT NULL,
    lower        TEXT    NOT NULL DEFAULT '[]',
    files_total  INTEGER NOT NULL DEFAULT 0,
    bytes_total  INTEGER NOT NULL DEFAULT 0,
    files_local  INTEGER NOT NULL DEFAULT 0,
    bytes_local  INTEGER NOT NULL DEFAULT 0,
    created_ns   INTEGER NOT NULL,
    completed_ns INTEGER
);
-- One row per regular file with content (an inode: hard links share it).
CREATE TABLE contents (
    layer_key TEXT    NOT NULL REFERENCES layers (key) ON DELETE CASCADE,
    node      INTEGER NOT NULL,
    digest    TEXT    NOT NULL,
    size      INTEGER NOT NULL,
    -- The name's bytes: tar names need not be UTF-8.
    name      BLOB    NOT NULL,
    present   INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (layer_key, node)
) WITHOUT ROWID;
CREATE INDEX contents_by_digest ON contents (digest, present);
CREATE TABLE images (
    namespace       TEXT    NOT NULL,
    reference       TEXT    NOT NULL,
    manifest_digest TEXT    NOT NULL,
    config_digest   TEXT    NOT NULL,
    platform        TEXT    NOT NULL,
    layers          TEXT    NOT NULL,
    manifest        BLOB    NOT NULL,
    config          BLOB    NOT NULL,
    complete        INTEGER NOT NULL DEFAULT 0,
    pulled_ns       INTEGER NOT NULL,
    completed_ns    INTEGER,
    PRIMARY KEY (namespace, reference)
);
CREATE TABLE pulls (
    id            INTEGER PRIMARY KEY AUTOINCREMENT,
    reference     TEXT    NOT NULL,
    namespace     TEXT    NOT NULL,
    bundle_id     TEXT    NOT NULL DEFAULT '',
    state         TEXT    NOT NULL CHECK (state IN ('running', 'done', 'failed')),
    started_ns    INTEGER NOT NULL,
    finished_ns   INTEGER,
    bytes         INTEGER NOT NULL DEFAULT 0,
    resume_offset INTEGER NOT NULL DEFAULT 0,
    header        BLOB    NOT NULL DEFAULT x'',
    header_size   INTEGER NOT NULL DEFAULT 0,
    error         TEXT    NOT NULL DEFAULT ''
);
""",
}

_SQLITE_FULL: Final = 13
_BATCH: Final = 500
"""Parameters per ``IN (...)`` query (SQLite's limit is 32766, keep statements small)."""


def _seconds(ns: int | None) -> float | None:
    return None if ns is None else ns / 1e9


def _error(exc: sqlite3.Error, path: str) -> StarlightError:
    if getattr(exc, "sqlite_errorcode", None) == _SQLITE_FULL or "disk is full" in str(exc):
        return ResourceExhausted(
            f"store database {path}: the disk is full",
            hint="free disk space on the store's filesystem, then pull again",
        )
    return StarlightError(f"store database {path}: {exc}")


class ContentRow:
    """A row of ``contents``: a regular file of a layer, by its node index in the plan."""

    __slots__ = ("digest", "name", "node", "present", "size")

    def __init__(self, node: int, digest: str, size: int, name: bytes, present: bool) -> None:
        self.node = node
        self.digest = digest
        self.size = size
        self.name = name
        self.present = present


class Database:
    def __init__(self, path: str) -> None:
        self.path = path
        self._lock = threading.RLock()
        try:
            self._db: sqlite3.Connection | None = sqlite3.connect(
                path, isolation_level=None, check_same_thread=False
            )
            self._db.execute("PRAGMA journal_mode = WAL")
            self._db.execute("PRAGMA synchronous = NORMAL")
            self._db.execute("PRAGMA foreign_keys = ON")
            with self.transaction() as db:
                version = db.execute("PRAGMA user_version").fetchone()[0]
                if version > SCHEMA_VERSION:
                    raise FailedPrecondition(
                        f"store database {path} has schema version {version}; this starlight "
                        f"understands up to {SCHEMA_VERSION}",
                        hint="upgrade starlight, or reset the store",
                    )
                for target in range(version + 1, SCHEMA_VERSION + 1):
                    for statement in _MIGRATIONS[target].split(";"):
                        if statement.strip():
                            db.execute(statement)
                db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        except sqlite3.Error as exc:
            raise _error(exc, path) from exc

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """One transaction: committed when the block ends, rolled back if it raises."""
        with self._lock:
            db = self._db
            if db is None:
                raise FailedPrecondition("the store is closed")
            try:
                db.execute("BEGIN IMMEDIATE")
                try:
                    yield db
                except BaseException:
                    db.execute("ROLLBACK")
                    raise
                db.execute("COMMIT")
            except sqlite3.Error as exc:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise _error(exc, self.path) from exc

    def close(self) -> None:
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None

    # -- layers -----------------------------------------------------------------------------

    def layer(self, key: str) -> LayerRecord | None:
        with self.transaction() as db:
            row = db.execute(_LAYER_SELECT + " WHERE key = ?", (key,)).fetchone()
        return None if row is None else _layer(row)

    def layers(self) -> list[LayerRecord]:
        with self.transaction() as db:
            rows = db.execute(_LAYER_SELECT + " ORDER BY created_ns, key").fetchall()
        return [_layer(row) for row in rows]

    def fingerprint(self, key: str) -> str | None:
        with self.transaction() as db:
            row = db.execute("SELECT fingerprint FROM layers WHERE key = ?", (key,)).fetchone()
        return None if row is None else str(row[0])

    def layer_state(self, key: str) -> LayerState:
        with self.transaction() as db:
            row = db.execute("SELECT state FROM layers WHERE key = ?", (key,)).fetchone()
        return LayerState.ABSENT if row is None else LayerState(row[0])

    def begin_layer(
        self,
        key: str,
        diff_id: Digest,
        fingerprint: str,
        lower: Sequence[str],
        rows: Iterable[tuple[int, str, int, bytes]],
    ) -> None:
        """Insert (or refresh) a RECEIVING layer and its content rows (node, digest, size,
        name), all absent; ``sync_present`` then records what the disk already holds."""
        rows = list(rows)
        with self.transaction() as db:
            db.execute("DELETE FROM contents WHERE layer_key = ?", (key,))
            db.execute(
                "INSERT INTO layers (key, diff_id, state, fingerprint, lower, files_total,"
                " bytes_total, created_ns) VALUES (?, ?, 'receiving', ?, ?, ?, ?, ?)"
                " ON CONFLICT (key) DO UPDATE SET state = 'receiving',"
                " fingerprint = excluded.fingerprint, lower = excluded.lower,"
                " files_total = excluded.files_total, bytes_total = excluded.bytes_total,"
                " files_local = 0, bytes_local = 0, completed_ns = NULL",
                (
                    key,
                    str(diff_id),
                    fingerprint,
                    json.dumps(list(lower)),
                    len(rows),
                    sum(row[2] for row in rows),
                    time.time_ns(),
                ),
            )
            db.executemany(
                "INSERT INTO contents (layer_key, node, digest, size, name) VALUES (?, ?, ?, ?, ?)",
                [(key, *row) for row in rows],
            )

    def sync_present(self, key: str, nodes: Iterable[int]) -> None:
        """Record these content nodes of ``key`` as present (idempotent)."""
        nodes = list(nodes)
        if not nodes:
            return
        with self.transaction() as db:
            # Counters move by what changed: recounting the layer at each placement would make
            # filling a layer of n files cost n².
            files = size = 0
            for start in range(0, len(nodes), _BATCH):
                batch = nodes[start : start + _BATCH]
                where = f"layer_key = ? AND NOT present AND node IN ({','.join('?' * len(batch))})"
                count, total = db.execute(
                    f"SELECT COUNT(*), COALESCE(SUM(size), 0) FROM contents WHERE {where}",
                    (key, *batch),
                ).fetchone()
                db.execute(f"UPDATE contents SET present = 1 WHERE {where}", (key, *batch))
                files += count
                size += total
            if files:
                db.execute(
                    "UPDATE layers SET files_local = files_local + ?,"
                    " bytes_local = bytes_local + ? WHERE key = ?",
                    (files, size, key),
                )

    def complete_layer(self, key: str) -> None:
        with self.transaction() as db:
            db.execute("UPDATE contents SET present = 1 WHERE layer_key = ?", (key,))
            db.execute(
                "UPDATE layers SET state = 'complete', files_local = files_total,"
                " bytes_local = bytes_total, completed_ns = ? WHERE key = ?",
                (time.time_ns(), key),
            )

    def remove_layer(self, key: str) -> bool:
        with self.transaction() as db:
            db.execute("DELETE FROM contents WHERE layer_key = ?", (key,))
            removed = db.execute("DELETE FROM layers WHERE key = ?", (key,)).rowcount > 0
            # An image missing a layer is no longer complete.
            for namespace, reference, layers in db.execute(
                "SELECT namespace, reference, layers FROM images WHERE complete"
            ).fetchall():
                if key in json.loads(layers):
                    db.execute(
                        "UPDATE images SET complete = 0, completed_ns = NULL"
                        " WHERE namespace = ? AND reference = ?",
                        (namespace, reference),
                    )
        return removed

    def layer_counts(self) -> tuple[int, int]:
        with self.transaction() as db:
            total, complete = db.execute(
                "SELECT COUNT(*), COALESCE(SUM(state = 'complete'), 0) FROM layers"
            ).fetchone()
        return int(total), int(complete)

    # -- contents ---------------------------------------------------------------------------

    def content_rows(self, key: str) -> list[ContentRow]:
        with self.transaction() as db:
            rows = db.execute(
                "SELECT node, digest, size, name, present FROM contents WHERE layer_key = ?"
                " ORDER BY node",
                (key,),
            ).fetchall()
        return [ContentRow(r[0], r[1], r[2], r[3], bool(r[4])) for r in rows]

    def holders(self, digest: str) -> list[tuple[str, bytes]]:
        """(layer key, name) of every present file with content ``digest``, complete layers
        first (their files can never be removed by a failed pull)."""
        with self.transaction() as db:
            rows = db.execute(
                "SELECT c.layer_key, c.name FROM contents c JOIN layers l ON l.key = c.layer_key"
                " WHERE c.digest = ? AND c.present ORDER BY l.state = 'complete' DESC",
                (digest,),
            ).fetchall()
        return [(str(r[0]), bytes(r[1])) for r in rows]

    def present_digests(self, digests: Sequence[str]) -> set[str]:
        found: set[str] = set()
        with self.transaction() as db:
            for start in range(0, len(digests), _BATCH):
                batch = list(digests[start : start + _BATCH])
                marks = ",".join("?" * len(batch))
                found.update(
                    row[0]
                    for row in db.execute(
                        "SELECT DISTINCT digest FROM contents"
                        f" WHERE present AND digest IN ({marks})",
                        batch,
                    )
                )
        return found

    # -- images -----------------------------------------------------------------------------

    def record_image(
        self,
        *,
        reference: str,
        namespace: str,
        manifest_digest: str,
        config_digest: str,
        platform: str,
        layers: Sequence[str],
        manifest: bytes,
        config: bytes,
    ) -> None:
        with self.transaction() as db:
            db.execute(
                "INSERT INTO images (namespace, reference, manifest_digest, config_digest,"
                " platform, layers, manifest, config, complete, pulled_ns)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, 0, ?)"
                " ON CONFLICT (namespace, reference) DO UPDATE SET"
                " manifest_digest = excluded.manifest_digest,"
                " config_digest = excluded.config_digest, platform = excluded.platform,"
                " layers = excluded.layers, manifest = excluded.manifest,"
                " config = excluded.config, complete = 0, pulled_ns = excluded.pulled_ns,"
                " completed_ns = NULL",
                (
                    namespace,
                    reference,
                    manifest_digest,
                    config_digest,
                    platform,
                    json.dumps(list(layers)),
                    manifest,
                    config,
                    time.time_ns(),
                ),
            )

    def images(
        self, reference: str | None = None, namespace: str | None = None
    ) -> list[ImageRecord]:
        """Images, newest pull first, with their local share; filtered when asked."""
        query = _IMAGE_SELECT
        clauses: list[str] = []
        params: list[Any] = []
        if reference is not None:
            clauses.append("reference = ?")
            params.append(reference)
        if namespace is not None:
            clauses.append("namespace = ?")
            params.append(namespace)
        if clauses:
            query += " WHERE " + " AND ".join(clauses)
        query += " ORDER BY pulled_ns DESC, namespace, reference"
        with self.transaction() as db:
            rows = db.execute(query, params).fetchall()
            usage = {
                row[0]: row[1:]
                for row in db.execute(
                    "SELECT key, files_total, files_local, bytes_total, bytes_local FROM layers"
                )
            }
        return [_image(row, usage) for row in rows]

    def mark_image_complete(self, reference: str, namespace: str | None) -> int:
        query = "UPDATE images SET complete = 1, completed_ns = ? WHERE reference = ?"
        params: list[Any] = [time.time_ns(), reference]
        if namespace is not None:
            query += " AND namespace = ?"
            params.append(namespace)
        with self.transaction() as db:
            return int(db.execute(query, params).rowcount)

    def remove_image(self, reference: str, namespace: str | None) -> int:
        query = "DELETE FROM images WHERE reference = ?"
        params: list[Any] = [reference]
        if namespace is not None:
            query += " AND namespace = ?"
            params.append(namespace)
        with self.transaction() as db:
            return int(db.execute(query, params).rowcount)

    def layer_users(self) -> dict[str, list[str]]:
        """Layer key → the images (``namespace/reference``) that use it."""
        users: dict[str, list[str]] = {}
        with self.transaction() as db:
            for namespace, reference, layers in db.execute(
                "SELECT namespace, reference, layers FROM images"
            ):
                for key in json.loads(layers):
                    users.setdefault(key, []).append(f"{namespace}/{reference}")
        return users

    # -- pulls ------------------------------------------------------------------------------

    def start_pull(self, reference: str, namespace: str, bundle_id: str, header: bytes) -> int:
        with self.transaction() as db:
            cursor = db.execute(
                "INSERT INTO pulls (reference, namespace, bundle_id, state, started_ns, header)"
                " VALUES (?, ?, ?, 'running', ?, ?)",
                (reference, namespace, bundle_id, time.time_ns(), header),
            )
            return int(cursor.lastrowid or 0)

    def update_pull(self, pull_id: int, fields: dict[str, Any]) -> bool:
        if not fields:
            return self.pull(pull_id) is not None
        assignments = ", ".join(f"{column} = ?" for column in fields)
        with self.transaction() as db:
            cursor = db.execute(
                f"UPDATE pulls SET {assignments} WHERE id = ?", (*fields.values(), pull_id)
            )
            return cursor.rowcount > 0

    def pull(self, pull_id: int) -> PullRecord | None:
        with self.transaction() as db:
            row = db.execute(_PULL_SELECT + " WHERE id = ?", (pull_id,)).fetchone()
        return None if row is None else _pull(row)

    def pulls(self, state: PullState | None = None) -> list[PullRecord]:
        query = _PULL_SELECT
        params: tuple[str, ...] = ()
        if state is not None:
            query += " WHERE state = ?"
            params = (state.value,)
        with self.transaction() as db:
            rows = db.execute(query + " ORDER BY id DESC", params).fetchall()
        return [_pull(row) for row in rows]

    def forget_pulls(self, before_ns: int) -> int:
        with self.transaction() as db:
            return int(
                db.execute(
                    "DELETE FROM pulls WHERE state != 'running' AND finished_ns < ?",
                    (before_ns,),
                ).rowcount
            )


_LAYER_SELECT: Final = (
    "SELECT key, diff_id, state, lower, files_total, files_local, bytes_total, bytes_local,"
    " created_ns, completed_ns FROM layers"
)
_IMAGE_SELECT: Final = (
    "SELECT reference, namespace, manifest_digest, config_digest, platform, layers, manifest,"
    " config, complete, pulled_ns, completed_ns FROM images"
)
_PULL_SELECT: Final = (
    "SELECT id, reference, namespace, bundle_id, state, started_ns, finished_ns, bytes,"
    " resume_offset, header, header_size, error FROM pulls"
)


def _layer(row: Sequence[Any]) -> LayerRecord:
    return LayerRecord(
        key=row[0],
        diff_id=Digest(row[1]),
        state=LayerState(row[2]),
        lower=tuple(json.loads(row[3])),
        files_total=row[4],
        files_local=row[5],
        bytes_total=row[6],
        bytes_local=row[7],
        created_at=row[8] / 1e9,
        completed_at=_seconds(row[9]),
    )


def _image(row: Sequence[Any], usage: dict[str, Sequence[int]]) -> ImageRecord:
    layers = tuple(json.loads(row[5]))
    totals = [0, 0, 0, 0]
    for key in dict.fromkeys(layers):  # a layer listed twice is held once
        counts = usage.get(key)
        if counts is not None:
            for i in range(4):
                totals[i] += counts[i]
    return ImageRecord(
        reference=row[0],
        namespace=row[1],
        manifest_digest=Digest(row[2]),
        config_digest=Digest(row[3]),
        platform=row[4],
        layers=layers,
        manifest=bytes(row[6]),
        config=bytes(row[7]),
        complete=bool(row[8]),
        pulled_at=row[9] / 1e9,
        completed_at=_seconds(row[10]),
        files_total=totals[0],
        files_local=totals[1],
        bytes_total=totals[2],
        bytes_local=totals[3],
    )


def _pull(row: Sequence[Any]) -> PullRecord:
    return PullRecord(
        id=row[0],
        reference=row[1],
        namespace=row[2],
        bundle_id=row[3],
        state=PullState(row[4]),
        started_at=row[5] / 1e9,
        finished_at=_seconds(row[6]),
        bytes_received=row[7],
        offset=row[8],
        header=bytes(row[9]),
        header_size=row[10],
        error=row[11],
    )
