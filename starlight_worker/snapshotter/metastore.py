"""The snapshotter's metadata store: snapshots, parents, labels and usage in SQLite.

Like containerd's ``snapshots/storage`` it knows nothing about directories: every snapshot has
a numeric id (never reused, so a directory named after a removed snapshot can never be mistaken
for a new one), a key (or, once committed, a name), a kind, a parent, labels, times and, for
committed snapshots, the usage measured at commit. Operations run inside a transaction
(``with store.transaction() as tx``) and raise ``starlight_core.errors`` with the kinds
containerd's bolt store returns (NotFound / AlreadyExists / FailedPrecondition / InvalidInput).

One connection, guarded by a lock: the snapshotter calls in from worker threads, and SQLite
serialises writers anyway.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Final

import attrs

from starlight_core.errors import AlreadyExists, FailedPrecondition, InvalidInput, NotFound
from starlight_worker.snapshotter import lifecycle
from starlight_worker.snapshotter.filters import Filter
from starlight_worker.snapshotter.lifecycle import Operation
from starlight_worker.snapshotter.model import Kind, SnapshotInfo, Usage, clean_labels

__all__ = ["MetaStore", "Snapshot", "StoredSnapshot", "Transaction"]

SCHEMA_VERSION: Final = 1

_SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS snapshots (
    -- AUTOINCREMENT: ids are never reused, directories are named after them.
    id         INTEGER PRIMARY KEY AUTOINCREMENT,
    key        TEXT    NOT NULL UNIQUE,
    kind       INTEGER NOT NULL CHECK (kind IN (1, 2, 3)),
    parent_id  INTEGER REFERENCES snapshots (id),
    created_ns INTEGER NOT NULL,
    updated_ns INTEGER NOT NULL,
    size       INTEGER NOT NULL DEFAULT 0,
    inodes     INTEGER NOT NULL DEFAULT 0,
    -- 1: a committed snapshot whose contents live outside its directory (see LayerSource).
    external   INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS snapshots_parent ON snapshots (parent_id);
CREATE TABLE IF NOT EXISTS labels (
    snapshot_id INTEGER NOT NULL REFERENCES snapshots (id) ON DELETE CASCADE,
    key         TEXT    NOT NULL,
    value       TEXT    NOT NULL,
    PRIMARY KEY (snapshot_id, key)
);
"""


@attrs.frozen
class Snapshot:
    """What mounting needs: the snapshot's id and kind, and its ancestry, nearest first.

    ``parents`` holds one ``StoredSnapshot`` per ancestor: ``parents[0]`` is the direct parent
    (the top layer under this snapshot), the last one is the base layer.
    """

    id: int
    kind: Kind
    parents: tuple[StoredSnapshot, ...] = ()
    info: SnapshotInfo | None = None
    """The snapshot's own info (a layer source may want to know whose mounts it serves)."""


@attrs.frozen
class StoredSnapshot:
    """A stored snapshot with the fields the store keeps beside its ``SnapshotInfo``."""

    id: int
    info: SnapshotInfo
    usage: Usage = attrs.field(factory=Usage)
    external: bool = False


def _now_ns() -> int:
    return time.time_ns()


class Transaction:
    """Operations on the store inside one SQLite transaction (see ``MetaStore.transaction``)."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    # -- reads ---------------------------------------------------------------------------

    def get(self, key: str) -> StoredSnapshot:
        """The snapshot named or keyed ``key``; ``NotFound`` otherwise."""
        row = self._db.execute(_SELECT + " WHERE s.key = ?", (key,)).fetchone()
        if row is None:
            raise NotFound(f"snapshot {key!r} does not exist")
        return self._stored(row)

    def find(self, key: str) -> StoredSnapshot | None:
        row = self._db.execute(_SELECT + " WHERE s.key = ?", (key,)).fetchone()
        return None if row is None else self._stored(row)

    def snapshot(self, key: str) -> Snapshot:
        """Ancestry of an active or view snapshot, for its mounts."""
        stored = self.get(key)
        lifecycle.check(stored.info.kind, Operation.MOUNTS, key)
        return Snapshot(stored.id, stored.info.kind, self._ancestry(stored), stored.info)

    def walk(self, match: Filter) -> list[SnapshotInfo]:
        """Every snapshot matching ``match``, in id order."""
        rows = self._db.execute(_SELECT + " ORDER BY s.id").fetchall()
        infos = [self._stored(row).info for row in rows]
        return [info for info in infos if match.match(_InfoFields(info))]

    def ids(self) -> set[int]:
        return {row[0] for row in self._db.execute("SELECT id FROM snapshots")}

    # -- writes --------------------------------------------------------------------------

    def create(
        self,
        kind: Kind,
        key: str,
        parent: str,
        labels: Mapping[str, str] | None,
        *,
        external: bool = False,
    ) -> Snapshot:
        """Insert an active or view snapshot (or, with ``external``, a committed one).

        The parent must exist (``NotFound``) and be committed (``InvalidInput``); the key must
        be new (``AlreadyExists``).
        """
        if not key:
            raise InvalidInput("a snapshot key must not be empty")
        if external != (kind is Kind.COMMITTED):
            raise InvalidInput("only external snapshots are created committed")
        cleaned = clean_labels(labels)
        parent_row: StoredSnapshot | None = None
        if parent:
            parent_row = self.find(parent)
            if parent_row is None:
                raise NotFound(f"parent snapshot {parent!r} does not exist")
            lifecycle.check(parent_row.info.kind, Operation.USE_AS_PARENT, parent)
        if self.find(key) is not None:
            raise AlreadyExists(f"snapshot {key!r} already exists")
        now = _now_ns()
        cursor = self._db.execute(
            "INSERT INTO snapshots (key, kind, parent_id, created_ns, updated_ns, external)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            (key, int(kind), parent_row.id if parent_row else None, now, now, int(external)),
        )
        snapshot_id = cursor.lastrowid
        assert snapshot_id is not None
        self._write_labels(snapshot_id, cleaned)
        ancestry = (parent_row, *self._ancestry(parent_row)) if parent_row else ()
        info = SnapshotInfo(key, kind, parent, cleaned, created_ns=now, updated_ns=now)
        return Snapshot(snapshot_id, kind, ancestry, info)

    def commit(self, key: str, name: str, usage: Usage, labels: Mapping[str, str] | None) -> int:
        """Turn active ``key`` into committed ``name`` (same id); labels are replaced."""
        stored = self.get(key)
        if not name:
            raise InvalidInput("a committed snapshot needs a name")
        cleaned = clean_labels(labels)
        if self.find(name) is not None:
            raise AlreadyExists(f"snapshot {name!r} already exists")
        lifecycle.check(stored.info.kind, Operation.COMMIT, key)
        now = _now_ns()
        self._db.execute(
            "UPDATE snapshots SET key = ?, kind = ?, created_ns = ?, updated_ns = ?,"
            " size = ?, inodes = ? WHERE id = ?",
            (name, int(Kind.COMMITTED), now, now, usage.size, usage.inodes, stored.id),
        )
        self._write_labels(stored.id, cleaned)
        return stored.id

    def update(self, info: SnapshotInfo, fieldpaths: Sequence[str]) -> SnapshotInfo:
        """Change labels as containerd's ``UpdateInfo``: no paths replaces all labels,
        ``labels`` replaces them, ``labels.<k>`` sets (or, with no value, unsets) one label;
        any other path is immutable (``InvalidInput``)."""
        stored = self.get(info.name)
        labels = dict(stored.info.labels)
        if not fieldpaths:
            labels = dict(info.labels)
        for path in fieldpaths:
            if path.startswith("labels."):
                label = path.removeprefix("labels.")
                labels[label] = info.labels.get(label, "")
            elif path == "labels":
                labels = dict(info.labels)
            else:
                raise InvalidInput(f"cannot update {path!r} of snapshot {info.name!r}")
        cleaned = clean_labels(labels)
        now = _now_ns()
        self._db.execute("UPDATE snapshots SET updated_ns = ? WHERE id = ?", (now, stored.id))
        self._write_labels(stored.id, cleaned)
        return attrs.evolve(stored.info, labels=cleaned, updated_ns=now)

    def remove(self, key: str) -> StoredSnapshot:
        """Forget ``key``; ``FailedPrecondition`` while any snapshot has it as parent."""
        stored = self.get(key)
        child = self._db.execute(
            "SELECT key FROM snapshots WHERE parent_id = ? LIMIT 1", (stored.id,)
        ).fetchone()
        if child is not None:
            raise FailedPrecondition(
                f"cannot remove snapshot {key!r}: it is the parent of {child[0]!r};"
                " remove its children first"
            )
        self._db.execute("DELETE FROM snapshots WHERE id = ?", (stored.id,))
        return stored

    # -- helpers -------------------------------------------------------------------------

    def _ancestry(self, stored: StoredSnapshot) -> tuple[StoredSnapshot, ...]:
        rows = self._db.execute(
            "WITH RECURSIVE chain(id, depth) AS ("
            "  SELECT parent_id, 1 FROM snapshots WHERE id = ? AND parent_id IS NOT NULL"
            "  UNION ALL"
            "  SELECT s.parent_id, c.depth + 1 FROM snapshots s JOIN chain c ON s.id = c.id"
            "  WHERE s.parent_id IS NOT NULL"
            ") " + _SELECT + " JOIN chain ON chain.id = s.id ORDER BY chain.depth",
            (stored.id,),
        ).fetchall()
        return tuple(self._stored(row) for row in rows)

    def _stored(self, row: sqlite3.Row) -> StoredSnapshot:
        labels = dict(
            self._db.execute(
                "SELECT key, value FROM labels WHERE snapshot_id = ?", (row["id"],)
            ).fetchall()
        )
        info = SnapshotInfo(
            name=row["key"],
            kind=Kind(row["kind"]),
            parent=row["parent_key"] or "",
            labels=labels,
            created_ns=row["created_ns"],
            updated_ns=row["updated_ns"],
        )
        return StoredSnapshot(
            id=row["id"],
            info=info,
            usage=Usage(size=row["size"], inodes=row["inodes"]),
            external=bool(row["external"]),
        )

    def _write_labels(self, snapshot_id: int, labels: Mapping[str, str]) -> None:
        self._db.execute("DELETE FROM labels WHERE snapshot_id = ?", (snapshot_id,))
        self._db.executemany(
            "INSERT INTO labels (snapshot_id, key, value) VALUES (?, ?, ?)",
            [(snapshot_id, k, v) for k, v in sorted(labels.items())],
        )


_SELECT: Final = (
    "SELECT s.id, s.key, s.kind, s.created_ns, s.updated_ns, s.size, s.inodes, s.external,"
    " p.key AS parent_key FROM snapshots s LEFT JOIN snapshots p ON p.id = s.parent_id"
)


class _InfoFields:
    """The field paths a snapshot filter can name (containerd's ``adaptSnapshot``)."""

    def __init__(self, info: SnapshotInfo) -> None:
        self.info = info

    def __call__(self, fieldpath: Sequence[str]) -> tuple[str, bool]:
        if not fieldpath:
            return "", False
        head = fieldpath[0]
        if head == "kind":
            return self.info.kind.filter_name, True
        if head == "name":
            return self.info.name, True
        if head == "parent":
            return self.info.parent, True
        if head == "labels":
            if not self.info.labels:
                return "", False
            label = ".".join(fieldpath[1:])
            if label in self.info.labels:
                return self.info.labels[label], True
            return "", False
        return "", False


class MetaStore:
    """The SQLite database at ``path`` (created on first use)."""

    def __init__(self, path: str) -> None:
        self._lock = threading.Lock()
        self._db: sqlite3.Connection | None = sqlite3.connect(
            path, isolation_level=None, check_same_thread=False
        )
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode = WAL")
        self._db.execute("PRAGMA foreign_keys = ON")
        self._db.execute("PRAGMA synchronous = NORMAL")
        with self.transaction():
            version = self._db.execute("PRAGMA user_version").fetchone()[0]
            if version not in (0, SCHEMA_VERSION):
                raise FailedPrecondition(
                    f"snapshotter metadata at {path} has schema version {version};"
                    f" this starlight understands {SCHEMA_VERSION}"
                )
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    self._db.execute(statement)
            self._db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    @contextmanager
    def transaction(self) -> Iterator[Transaction]:
        """One transaction: committed when the block ends, rolled back if it raises."""
        with self._lock:
            if self._db is None:
                raise FailedPrecondition("the snapshotter metadata store is closed")
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield Transaction(self._db)
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def close(self) -> None:
        """Close the database; closing twice is fine."""
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None
