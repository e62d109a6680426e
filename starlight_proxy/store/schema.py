"""The one schema of the metadata store, as numbered migrations.

Every statement is plain SQL that SQLite 3.35+ and PostgreSQL 15 both accept. The only words
that differ are written as placeholders and filled in by the back end's ``Dialect``:
``{id}`` (an auto-numbered primary key) and ``{blob}`` (a byte string column).

Migrations are append-only: a released migration is never edited, a change is a new one.
"""

from __future__ import annotations

from typing import Final

import attrs

__all__ = ["MIGRATIONS", "Migration"]


@attrs.frozen
class Migration:
    version: int
    description: str
    statements: tuple[str, ...]


_V1: Final = (
    # An image is one manifest for one platform in one repository. The claim columns implement
    # "concurrent notifies index once": see MetadataStore.begin_indexing.
    """CREATE TABLE images (
        id {id},
        name TEXT NOT NULL,
        digest TEXT NOT NULL,
        platform TEXT NOT NULL,
        index_digest TEXT,
        manifest_media_type TEXT,
        manifest {blob},
        config_digest TEXT,
        config {blob},
        state TEXT NOT NULL,
        error TEXT,
        claim_token TEXT,
        claimed_at DOUBLE PRECISION,
        created_at DOUBLE PRECISION NOT NULL,
        updated_at DOUBLE PRECISION NOT NULL,
        CONSTRAINT images_identity UNIQUE (name, digest, platform)
    )""",
    """CREATE INDEX images_by_index_digest ON images (name, index_digest, platform)
        WHERE index_digest IS NOT NULL""",
    # Tags live apart from images: several tags may name one image, and a tag moves.
    """CREATE TABLE tags (
        name TEXT NOT NULL,
        tag TEXT NOT NULL,
        platform TEXT NOT NULL,
        image_id BIGINT NOT NULL REFERENCES images (id) ON DELETE CASCADE,
        updated_at DOUBLE PRECISION NOT NULL,
        PRIMARY KEY (name, tag, platform)
    )""",
    "CREATE INDEX tags_by_image ON tags (image_id)",
    # A layer blob (and its TOC) is stored once, whichever images list it.
    """CREATE TABLE layers (
        id {id},
        digest TEXT NOT NULL UNIQUE,
        size BIGINT NOT NULL,
        diff_id TEXT NOT NULL,
        media_type TEXT NOT NULL,
        chunk_size BIGINT NOT NULL,
        toc_version INTEGER NOT NULL,
        entry_count BIGINT NOT NULL,
        created_at DOUBLE PRECISION NOT NULL
    )""",
    """CREATE TABLE image_layers (
        image_id BIGINT NOT NULL REFERENCES images (id) ON DELETE CASCADE,
        position INTEGER NOT NULL,
        layer_id BIGINT NOT NULL REFERENCES layers (id),
        PRIMARY KEY (image_id, position)
    )""",
    "CREATE INDEX image_layers_by_layer ON image_layers (layer_id)",
    # One row per TOC entry; (layer_id, idx) keeps the TOC's order for reassembly. Paths and
    # owner names are bytes: tar names need not be UTF-8 (we keep them surrogate-escaped).
    # A file made of one whole chunk (the common case) keeps that chunk in two integer
    # columns; only multi-chunk files pay for the ``chunks`` JSON.
    """CREATE TABLE files (
        layer_id BIGINT NOT NULL REFERENCES layers (id) ON DELETE CASCADE,
        idx BIGINT NOT NULL,
        name {blob} NOT NULL,
        type TEXT NOT NULL,
        mode BIGINT NOT NULL,
        uid BIGINT NOT NULL,
        gid BIGINT NOT NULL,
        uname {blob} NOT NULL,
        gname {blob} NOT NULL,
        mtime_ns BIGINT NOT NULL,
        size BIGINT NOT NULL,
        linkname {blob} NOT NULL,
        devmajor BIGINT NOT NULL,
        devminor BIGINT NOT NULL,
        xattrs TEXT,
        digest TEXT,
        content_offset BIGINT NOT NULL,
        chunk_offset BIGINT,
        chunk_size BIGINT,
        chunks TEXT,
        PRIMARY KEY (layer_id, idx)
    )""",
    # "Which contents of B does the worker hold": probe by digest, restricted to layer ids.
    "CREATE INDEX files_by_digest ON files (digest, layer_id) WHERE digest IS NOT NULL",
    # Startup order per image; ``grp`` '' is the image's own ranking, other values name a
    # group of images started together whose traces were merged jointly.
    """CREATE TABLE ranks (
        image_id BIGINT NOT NULL REFERENCES images (id) ON DELETE CASCADE,
        grp TEXT NOT NULL,
        name {blob} NOT NULL,
        rank DOUBLE PRECISION NOT NULL,
        PRIMARY KEY (image_id, grp, name)
    )""",
    # Raw traces, unique by id so that a retried upload is stored once.
    """CREATE TABLE traces (
        trace_id TEXT PRIMARY KEY,
        image_id BIGINT NOT NULL REFERENCES images (id) ON DELETE CASCADE,
        grp TEXT NOT NULL,
        payload {blob} NOT NULL,
        received_at DOUBLE PRECISION NOT NULL
    )""",
    "CREATE INDEX traces_by_image ON traces (image_id, grp, received_at)",
)

MIGRATIONS: Final[tuple[Migration, ...]] = (Migration(1, "initial schema", _V1),)
