"""The metadata store written once, in SQL both back ends run (see ``driver.py``)."""

from __future__ import annotations

import math
import re
import secrets
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from types import TracebackType
from typing import Any, Final, Self

import anyio.to_thread

from starlight_core.digest import Digest
from starlight_core.errors import (
    FailedPrecondition,
    ImageNotFound,
    InvalidInput,
    InvalidReference,
    NotFound,
)
from starlight_core.layer.toc import TOC, LayerInfo
from starlight_core.platform import Platform
from starlight_core.reference import Reference
from starlight_proxy.store.api import DEFAULT_CLAIM_TIMEOUT, StaleRanking
from starlight_proxy.store.codec import (
    FILE_COLUMNS,
    FILE_SELECT,
    decode_entries,
    decode_text,
    encode_entries,
    encode_text,
    trusted_digest,
)
from starlight_proxy.store.driver import Driver, Row, Transaction
from starlight_proxy.store.records import (
    ImageMetadata,
    ImageRecord,
    ImageState,
    IndexClaim,
    LayerRecord,
    RankUpdate,
    TraceRecord,
)
from starlight_proxy.store.schema import MIGRATIONS

__all__ = ["SCHEMA_VERSION", "SQLMetadataStore"]

SCHEMA_VERSION: Final = max(m.version for m in MIGRATIONS)

_TAG_RE: Final = re.compile(r"^[\w][\w.-]{0,127}$")
_MAX_LABEL: Final = 255
_MAX_ERROR: Final = 4000

_IMAGE_COLUMNS: Final = (
    "id, name, digest, platform, state, index_digest, manifest_media_type, config_digest, "
    "error, created_at, updated_at"
)
_LAYER_COLUMNS: Final = (
    "id, digest, size, diff_id, media_type, chunk_size, toc_version, entry_count, created_at"
)

# Claim (or reclaim) in one statement: the conflict clause re-checks the row's state after
# any concurrent claimer committed, so exactly one caller gets a row back.
_CLAIM_SQL: Final = """
INSERT INTO images (name, digest, platform, state, claim_token, claimed_at, created_at,
                    updated_at)
VALUES (?, ?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (name, digest, platform) DO UPDATE SET
    state = excluded.state, error = NULL, claim_token = excluded.claim_token,
    claimed_at = excluded.claimed_at, updated_at = excluded.updated_at
WHERE images.state = ? OR (images.state = ? AND images.claimed_at <= ?)
RETURNING id
"""

# Contents of B's layers (those no holder has) that some holder layer also has. EXISTS, not a
# join, so a digest repeated in many files does not multiply rows; no DISTINCT either: the
# temporary B-tree it needs costs more than deduplicating in Python.
_SHARED_SQL: Final = """
SELECT fb.digest FROM files fb
WHERE fb.layer_id IN ({targets}) AND fb.digest IS NOT NULL AND EXISTS (
    SELECT 1 FROM files fa WHERE fa.digest = fb.digest AND fa.layer_id IN ({holders})
)
"""


def _marks(count: int) -> str:
    return ", ".join("?" * count)


def _check_name(name: str) -> str:
    if not isinstance(name, str):
        raise InvalidInput("repository name must be a string")
    try:
        ref = Reference.parse(name, default_tag=None)
    except InvalidReference as exc:
        raise InvalidInput(f"invalid repository name {name!r}: {exc.message}") from exc
    if ref.tag is not None or ref.digest is not None or ref.name != name:
        raise InvalidInput(
            f"invalid repository name {name!r}: expected the normalised form {ref.name!r}"
            " without tag or digest"
        )
    return name


def _check_tag(tag: str) -> str:
    if not isinstance(tag, str) or not _TAG_RE.match(tag):
        raise InvalidInput(f"invalid tag {tag!r}")
    return tag


def _check_platform(platform: Platform) -> str:
    if not isinstance(platform, Platform):
        raise InvalidInput(f"platform must be a Platform, not {type(platform).__name__}")
    # Normalise, so that arm64/v8 and aarch64 name one row.
    return str(Platform.create(platform.os, platform.architecture, platform.variant))


def _check_label(value: str, what: str, *, allow_empty: bool) -> str:
    if (
        not isinstance(value, str)
        or (not value and not allow_empty)
        or len(value) > _MAX_LABEL
        or not value.isprintable()
    ):
        raise InvalidInput(f"invalid {what} {value!r}")
    return value


def _check_id(image_id: int) -> int:
    if not isinstance(image_id, int) or isinstance(image_id, bool):
        raise InvalidInput(f"image id must be an integer, not {image_id!r}")
    return image_id


def _check_timeout(seconds: float, what: str) -> float:
    if not isinstance(seconds, int | float) or not math.isfinite(seconds) or seconds < 0:
        raise InvalidInput(f"{what} must be a non-negative number of seconds, not {seconds!r}")
    return float(seconds)


def _optional_digest(value: str | None) -> Digest | None:
    return None if value is None else trusted_digest(value)


class SQLMetadataStore:
    """``MetadataStore`` over a ``Driver``. Use ``open_store`` to get one."""

    def __init__(self, driver: Driver, *, clock: Callable[[], float] = time.time) -> None:
        self._driver = driver
        self._clock = clock
        self._platforms: dict[str, Platform] = {}

    @property
    def backend(self) -> str:
        return self._driver.dialect.name

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        await self._driver.close()

    # --- schema -------------------------------------------------------------------------------

    async def migrate(self) -> int:
        """Apply the migrations this database lacks; returns the schema version."""
        dialect = self._driver.dialect
        async with self._driver.migration_transaction() as tx:
            await tx.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations ("
                " version INTEGER PRIMARY KEY, description TEXT NOT NULL,"
                " applied_at DOUBLE PRECISION NOT NULL)"
            )
            applied = {row[0] for row in await tx.fetchall("SELECT version FROM schema_migrations")}
            unknown = sorted(v for v in applied if v > SCHEMA_VERSION)
            if unknown:
                raise FailedPrecondition(
                    f"the metadata store has schema version {unknown[-1]}, newer than this"
                    f" proxy's {SCHEMA_VERSION}",
                    hint="upgrade starlight-proxy, or point it at another database",
                )
            for migration in MIGRATIONS:
                if migration.version in applied:
                    continue
                for statement in migration.statements:
                    await tx.execute(dialect.ddl(statement))
                await tx.execute(
                    "INSERT INTO schema_migrations (version, description, applied_at)"
                    " VALUES (?, ?, ?)",
                    (migration.version, migration.description, self._clock()),
                )
        return SCHEMA_VERSION

    async def schema_versions(self) -> list[int]:
        async with self._driver.transaction(write=False) as tx:
            rows = await tx.fetchall("SELECT version FROM schema_migrations ORDER BY version")
        return [row[0] for row in rows]

    # --- records ------------------------------------------------------------------------------

    def _platform(self, text: str) -> Platform:
        platform = self._platforms.get(text)
        if platform is None:
            platform = self._platforms[text] = Platform.parse(text)
        return platform

    def _image(self, row: Row, tags: Sequence[str]) -> ImageRecord:
        (
            image_id,
            name,
            digest,
            platform,
            state,
            index_digest,
            media_type,
            config_digest,
            error,
            created_at,
            updated_at,
        ) = row
        return ImageRecord(
            id=image_id,
            name=name,
            digest=trusted_digest(digest),
            platform=self._platform(platform),
            state=ImageState(state),
            tags=tuple(tags),
            index_digest=_optional_digest(index_digest),
            manifest_media_type=media_type,
            config_digest=_optional_digest(config_digest),
            error=error,
            created_at=created_at,
            updated_at=updated_at,
        )

    async def _images(self, tx: Transaction, rows: Sequence[Row]) -> list[ImageRecord]:
        if not rows:
            return []
        ids = [row[0] for row in rows]
        tags: dict[int, list[str]] = {image_id: [] for image_id in ids}
        # Tags are few; one query for the batch keeps list_images at two round trips.
        for image_id, tag in await tx.fetchall(
            f"SELECT image_id, tag FROM tags WHERE image_id IN ({_marks(len(ids))}) ORDER BY tag",
            ids,
        ):
            tags[image_id].append(tag)
        return [self._image(row, tags[row[0]]) for row in rows]

    @staticmethod
    async def _lock_image(tx: Transaction, image_id: int) -> None:
        """Check that the image exists and hold its row until the transaction ends.

        Writers of what hangs off an image (ranks, traces, tags) then run one at a time per
        image, and a concurrent delete waits: on PostgreSQL a delete-then-insert under READ
        COMMITTED would otherwise interleave with another and mix two rankings. (A no-op
        UPDATE, because SQLite has no SELECT ... FOR UPDATE; there all writers are serial.)
        """
        row = await tx.fetchone(
            "UPDATE images SET state = state WHERE id = ? RETURNING id", (image_id,)
        )
        if row is None:
            raise ImageNotFound(f"no image with id {image_id} in the metadata store")

    async def _image_by_id(self, tx: Transaction, image_id: int) -> ImageRecord:
        row = await tx.fetchone(f"SELECT {_IMAGE_COLUMNS} FROM images WHERE id = ?", (image_id,))
        if row is None:
            raise ImageNotFound(f"no image with id {image_id} in the metadata store")
        return (await self._images(tx, [row]))[0]

    @staticmethod
    def _layer(row: Row) -> LayerRecord:
        layer_id, digest, size, diff_id, media_type, chunk_size, version, count, created = row
        return LayerRecord(
            id=layer_id,
            digest=trusted_digest(digest),
            size=size,
            diff_id=trusted_digest(diff_id),
            media_type=media_type,
            chunk_size=chunk_size,
            toc_version=version,
            entry_count=count,
            created_at=created,
        )

    # --- indexing -----------------------------------------------------------------------------

    async def begin_indexing(
        self,
        name: str,
        digest: Digest,
        platform: Platform,
        *,
        stale_after: float = DEFAULT_CLAIM_TIMEOUT,
    ) -> IndexClaim | None:
        name = _check_name(name)
        digest = Digest(digest)
        platform_text = _check_platform(platform)
        stale_after = _check_timeout(stale_after, "stale_after")
        token = secrets.token_hex(16)
        now = self._clock()
        indexing, failed = ImageState.INDEXING.value, ImageState.FAILED.value
        async with self._driver.transaction(write=True) as tx:
            values = (name, str(digest), platform_text, indexing, token, now, now, now)
            conditions = (failed, indexing, now - stale_after)
            row = await tx.fetchone(_CLAIM_SQL, (*values, *conditions))
        if row is None:
            return None
        return IndexClaim(
            image_id=row[0],
            token=token,
            name=name,
            digest=digest,
            platform=self._platform(platform_text),
        )

    async def refresh_claim(self, claim: IndexClaim) -> bool:
        async with self._driver.transaction(write=True) as tx:
            row = await tx.fetchone(
                "UPDATE images SET claimed_at = ? WHERE id = ? AND state = ? AND claim_token = ?"
                " RETURNING id",
                (self._clock(), claim.image_id, ImageState.INDEXING.value, claim.token),
            )
        return row is not None

    async def known_layers(self, digests: Iterable[Digest]) -> frozenset[Digest]:
        wanted = sorted({str(Digest(d)) for d in digests})
        if not wanted:
            return frozenset()
        async with self._driver.transaction(write=False) as tx:
            rows = await tx.fetchall(
                f"SELECT digest FROM layers WHERE digest IN ({_marks(len(wanted))})", wanted
            )
        return frozenset(trusted_digest(row[0]) for row in rows)

    async def put_layer(self, toc: TOC) -> LayerRecord:
        if not isinstance(toc, TOC):
            raise InvalidInput(f"expected a TOC, not {type(toc).__name__}")
        info = toc.layer
        digest, diff_id = Digest(info.digest), Digest(info.diff_id)
        async with self._driver.transaction(write=True) as tx:
            row = await tx.fetchone(
                "INSERT INTO layers (digest, size, diff_id, media_type, chunk_size, toc_version,"
                " entry_count, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
                " ON CONFLICT (digest) DO NOTHING RETURNING id",
                (
                    str(digest),
                    info.size,
                    str(diff_id),
                    info.media_type,
                    toc.chunk_size,
                    toc.version,
                    len(toc.entries),
                    self._clock(),
                ),
            )
            if row is not None:
                await tx.insert_many("files", FILE_COLUMNS, encode_entries(row[0], toc.entries))
            # Someone else's copy of the same blob wins: a blob digest fixes its TOC.
            layer = await tx.fetchone(
                f"SELECT {_LAYER_COLUMNS} FROM layers WHERE digest = ?", (str(digest),)
            )
        assert layer is not None
        return self._layer(layer)

    async def finish_indexing(
        self,
        claim: IndexClaim,
        *,
        manifest: bytes,
        manifest_media_type: str,
        config: bytes,
        config_digest: Digest,
        layers: Sequence[Digest],
        index_digest: Digest | None = None,
        tag: str | None = None,
    ) -> ImageRecord:
        if tag is not None:
            _check_tag(tag)
        config_digest = Digest(config_digest)
        index_digest = None if index_digest is None else Digest(index_digest)
        layer_digests = [str(Digest(d)) for d in layers]
        if not isinstance(manifest, bytes) or not isinstance(config, bytes):
            raise InvalidInput("manifest and config must be bytes")
        _check_label(manifest_media_type, "manifest media type", allow_empty=False)
        now = self._clock()
        async with self._driver.transaction(write=True) as tx:
            ids: dict[str, int] = {}
            if layer_digests:
                unique = sorted(set(layer_digests))
                for layer_id, digest in await tx.fetchall(
                    f"SELECT id, digest FROM layers WHERE digest IN ({_marks(len(unique))})",
                    unique,
                ):
                    ids[digest] = layer_id
            missing = [d for d in layer_digests if d not in ids]
            if missing:
                raise InvalidInput(
                    f"cannot finish indexing {claim.name}@{claim.digest}: no TOC stored for"
                    f" layer {missing[0]}",
                    hint="put_layer every layer before finish_indexing",
                )
            row = await tx.fetchone(
                "UPDATE images SET state = ?, manifest = ?, manifest_media_type = ?, config = ?,"
                " config_digest = ?, index_digest = COALESCE(?, index_digest), error = NULL,"
                " claim_token = NULL, claimed_at = NULL, updated_at = ?"
                " WHERE id = ? AND state = ? AND claim_token = ? RETURNING id",
                (
                    ImageState.READY.value,
                    manifest,
                    manifest_media_type,
                    config,
                    str(config_digest),
                    None if index_digest is None else str(index_digest),
                    now,
                    claim.image_id,
                    ImageState.INDEXING.value,
                    claim.token,
                ),
            )
            if row is None:
                raise FailedPrecondition(
                    f"lost the claim on {claim.name}@{claim.digest} ({claim.platform}):"
                    " another proxy took it over or the image was deleted",
                    hint="the other proxy finishes the indexing; notify again if it fails",
                )
            await tx.execute("DELETE FROM image_layers WHERE image_id = ?", (claim.image_id,))
            await tx.insert_many(
                "image_layers",
                ("image_id", "position", "layer_id"),
                [(claim.image_id, pos, ids[d]) for pos, d in enumerate(layer_digests)],
            )
            if tag is not None:
                await self._set_tag(tx, claim.name, tag, str(claim.platform), claim.image_id)
            return await self._image_by_id(tx, claim.image_id)

    async def fail_indexing(self, claim: IndexClaim, error: str) -> bool:
        # PostgreSQL text cannot hold NUL; the message is for people, so trim it.
        message = str(error).replace("\x00", "\\0")[:_MAX_ERROR]
        async with self._driver.transaction(write=True) as tx:
            row = await tx.fetchone(
                "UPDATE images SET state = ?, error = ?, claim_token = NULL, claimed_at = NULL,"
                " updated_at = ? WHERE id = ? AND state = ? AND claim_token = ? RETURNING id",
                (
                    ImageState.FAILED.value,
                    message,
                    self._clock(),
                    claim.image_id,
                    ImageState.INDEXING.value,
                    claim.token,
                ),
            )
        return row is not None

    async def _set_tag(
        self, tx: Transaction, name: str, tag: str, platform: str, image_id: int
    ) -> None:
        await tx.execute(
            "INSERT INTO tags (name, tag, platform, image_id, updated_at) VALUES (?, ?, ?, ?, ?)"
            " ON CONFLICT (name, tag, platform) DO UPDATE SET image_id = excluded.image_id,"
            " updated_at = excluded.updated_at",
            (name, tag, platform, image_id, self._clock()),
        )

    async def tag_image(self, image_id: int, tag: str) -> ImageRecord:
        _check_id(image_id)
        _check_tag(tag)
        async with self._driver.transaction(write=True) as tx:
            await self._lock_image(tx, image_id)
            image = await self._image_by_id(tx, image_id)
            if not image.ready:
                raise FailedPrecondition(
                    f"cannot tag {image.name}@{image.digest}: it is {image.state.value}",
                    hint="tag it once indexing has finished",
                )
            await self._set_tag(tx, image.name, tag, str(image.platform), image_id)
            return await self._image_by_id(tx, image_id)

    # --- lookups ------------------------------------------------------------------------------

    async def get_image(self, image_id: int) -> ImageRecord:
        _check_id(image_id)
        async with self._driver.transaction(write=False) as tx:
            return await self._image_by_id(tx, image_id)

    async def find_image(
        self,
        name: str,
        *,
        platform: Platform | None = None,
        tag: str | None = None,
        digest: Digest | None = None,
    ) -> ImageRecord:
        _check_name(name)
        if (tag is None) == (digest is None):
            raise InvalidInput("find_image needs exactly one of tag and digest")
        platform_text = None if platform is None else _check_platform(platform)
        async with self._driver.transaction(write=False) as tx:
            if tag is not None:
                _check_tag(tag)
                if platform_text is None:
                    raise InvalidInput(f"looking up {name}:{tag} needs a platform")
                rows = await tx.fetchall(
                    f"SELECT {_IMAGE_COLUMNS} FROM images WHERE id = (SELECT image_id FROM tags"
                    " WHERE name = ? AND tag = ? AND platform = ?)",
                    (name, tag, platform_text),
                )
                what = f"{name}:{tag} ({platform_text})"
            else:
                digest_text = str(Digest(digest))  # type: ignore[arg-type]
                rows = await tx.fetchall(
                    f"SELECT {_IMAGE_COLUMNS} FROM images"
                    " WHERE name = ? AND (digest = ? OR index_digest = ?) ORDER BY platform",
                    (name, digest_text, digest_text),
                )
                # The manifest itself beats the indexes that list it.
                direct = [row for row in rows if row[2] == digest_text]
                rows = direct or rows
                if platform_text is not None:
                    rows = [row for row in rows if row[3] == platform_text]
                what = f"{name}@{digest_text}" + (f" ({platform_text})" if platform_text else "")
                if len(rows) > 1:
                    platforms = ", ".join(row[3] for row in rows)
                    raise InvalidInput(
                        f"{what} is an index of several platforms ({platforms}): name one"
                    )
            if not rows:
                raise ImageNotFound(
                    f"image {what} is not known to the proxy",
                    hint="notify the proxy first: ctr-starlight notify IMAGE",
                )
            return (await self._images(tx, rows))[0]

    async def list_images(self, *, name: str | None = None) -> list[ImageRecord]:
        async with self._driver.transaction(write=False) as tx:
            if name is None:
                rows = await tx.fetchall(
                    f"SELECT {_IMAGE_COLUMNS} FROM images ORDER BY name, created_at, id"
                )
            else:
                rows = await tx.fetchall(
                    f"SELECT {_IMAGE_COLUMNS} FROM images WHERE name = ? ORDER BY created_at, id",
                    (_check_name(name),),
                )
            if not rows:
                return []
            tags: dict[int, list[str]] = {row[0]: [] for row in rows}
            tag_rows = await tx.fetchall("SELECT image_id, tag FROM tags ORDER BY tag")
        for image_id, tag in tag_rows:
            if image_id in tags:
                tags[image_id].append(tag)
        return [self._image(row, tags[row[0]]) for row in rows]

    async def delete_image(self, image_id: int) -> None:
        _check_id(image_id)
        async with self._driver.transaction(write=True) as tx:
            row = await tx.fetchone("DELETE FROM images WHERE id = ? RETURNING id", (image_id,))
        if row is None:
            raise ImageNotFound(f"no image with id {image_id} in the metadata store")

    async def prune_layers(self, *, older_than: float) -> int:
        cutoff = self._clock() - _check_timeout(older_than, "older_than")
        async with self._driver.transaction(write=True) as tx:
            rows = await tx.fetchall(
                "DELETE FROM layers WHERE created_at <= ? AND NOT EXISTS"
                " (SELECT 1 FROM image_layers il WHERE il.layer_id = layers.id) RETURNING id",
                (cutoff,),
            )
        return len(rows)

    # --- the hot queries ----------------------------------------------------------------------

    async def load_image(self, image_id: int) -> ImageMetadata:
        _check_id(image_id)
        async with self._driver.transaction(write=False) as tx:
            image = await self._image_by_id(tx, image_id)
            if not image.ready:
                raise FailedPrecondition(
                    f"image {image.name}@{image.digest} ({image.platform}) is"
                    f" {image.state.value}" + (f": {image.error}" if image.error else ""),
                    hint="notify the proxy again" if image.error else "retry in a moment",
                )
            blobs = await tx.fetchone(
                "SELECT manifest, config FROM images WHERE id = ?", (image_id,)
            )
            assert blobs is not None
            layers = await tx.fetchall(
                f"SELECT {', '.join('l.' + c for c in _LAYER_COLUMNS.split(', '))}"
                " FROM image_layers il JOIN layers l ON l.id = il.layer_id"
                " WHERE il.image_id = ? ORDER BY il.position",
                (image_id,),
            )
            files: dict[int, list[Row]] = {}
            for layer in layers:
                if layer[0] not in files:
                    files[layer[0]] = await self._file_rows(tx, layer[0])
        # Decoding 100k entries takes a while: keep it off the event loop.
        tocs = await anyio.to_thread.run_sync(_build_tocs, [self._layer(r) for r in layers], files)
        return ImageMetadata(
            image=image, manifest=bytes(blobs[0]), config=bytes(blobs[1]), tocs=tocs
        )

    @staticmethod
    async def _file_rows(tx: Transaction, layer_id: int) -> list[Row]:
        return await tx.fetchall(
            f"SELECT {FILE_SELECT} FROM files WHERE layer_id = ? ORDER BY idx", (layer_id,)
        )

    async def get_toc(self, layer: Digest) -> TOC:
        digest = str(Digest(layer))
        async with self._driver.transaction(write=False) as tx:
            row = await tx.fetchone(
                f"SELECT {_LAYER_COLUMNS} FROM layers WHERE digest = ?", (digest,)
            )
            if row is None:
                raise NotFound(f"no TOC stored for layer {digest}")
            rows = await self._file_rows(tx, row[0])
        record = self._layer(row)
        tocs = await anyio.to_thread.run_sync(_build_tocs, [record], {record.id: rows})
        return tocs[0]

    async def shared_contents(self, image_id: int, holders: Sequence[int]) -> frozenset[Digest]:
        _check_id(image_id)
        holder_ids = sorted({_check_id(h) for h in holders})
        async with self._driver.transaction(write=False) as tx:
            if await tx.fetchone("SELECT id FROM images WHERE id = ?", (image_id,)) is None:
                raise ImageNotFound(f"no image with id {image_id} in the metadata store")
            if not holder_ids:
                return frozenset()
            target_layers = {
                row[0]
                for row in await tx.fetchall(
                    "SELECT layer_id FROM image_layers WHERE image_id = ?", (image_id,)
                )
            }
            holder_layers = {
                row[0]
                for row in await tx.fetchall(
                    "SELECT layer_id FROM image_layers"
                    f" WHERE image_id IN ({_marks(len(holder_ids))})",
                    holder_ids,
                )
            }
            # A layer the worker holds whole (the usual case after an update: the base
            # layers) needs no probing: all of its contents are there.
            common = sorted(target_layers & holder_layers)
            rest = sorted(target_layers - holder_layers)
            rows: list[Row] = []
            if common:
                rows += await tx.fetchall(
                    f"SELECT digest FROM files WHERE layer_id IN ({_marks(len(common))})"
                    " AND digest IS NOT NULL",
                    common,
                )
            if rest and holder_layers:
                probe = _SHARED_SQL.format(
                    targets=_marks(len(rest)), holders=_marks(len(holder_layers))
                )
                rows += await tx.fetchall(probe, [*rest, *sorted(holder_layers)])
        return frozenset(trusted_digest(digest) for digest in {row[0] for row in rows})

    # --- startup order ------------------------------------------------------------------------

    async def replace_ranks(
        self, image_id: int, ranks: Mapping[str, float], *, group: str = ""
    ) -> None:
        _check_id(image_id)
        rows = _rank_rows(image_id, ranks, group)
        async with self._driver.transaction(write=True) as tx:
            await self._lock_image(tx, image_id)
            await self._replace_ranks(tx, image_id, group, rows)

    @staticmethod
    async def _replace_ranks(
        tx: Transaction, image_id: int, group: str, rows: list[tuple[Any, ...]]
    ) -> None:
        await tx.execute("DELETE FROM ranks WHERE image_id = ? AND grp = ?", (image_id, group))
        await tx.insert_many("ranks", ("image_id", "grp", "name", "rank"), rows)

    async def get_ranks(
        self, image_ids: Sequence[int], *, group: str = ""
    ) -> dict[int, dict[str, float]]:
        ids = sorted({_check_id(i) for i in image_ids})
        _check_label(group, "group", allow_empty=True)
        result: dict[int, dict[str, float]] = {i: {} for i in ids}
        if not ids:
            return result
        async with self._driver.transaction(write=False) as tx:
            rows = await tx.fetchall(
                f"SELECT image_id, name, rank FROM ranks WHERE grp = ?"
                f" AND image_id IN ({_marks(len(ids))})",
                [group, *ids],
            )
        for image_id, name, rank in rows:
            result[image_id][decode_text(name)] = rank
        return result

    async def ranked_groups(self, image_ids: Sequence[int]) -> dict[str, frozenset[int]]:
        ids = sorted({_check_id(i) for i in image_ids})
        if not ids:
            return {}
        async with self._driver.transaction(write=False) as tx:
            rows = await tx.fetchall(
                f"SELECT DISTINCT grp, image_id FROM ranks WHERE image_id IN ({_marks(len(ids))})"
                " AND grp <> ''",
                ids,
            )
        groups: dict[str, set[int]] = {}
        for group, image_id in rows:
            groups.setdefault(group, set()).add(image_id)
        return {group: frozenset(members) for group, members in sorted(groups.items())}

    async def add_trace(
        self,
        trace_id: str,
        image_id: int,
        payload: bytes,
        *,
        group: str = "",
        rankings: Sequence[RankUpdate] = (),
    ) -> bool:
        _check_label(trace_id, "trace id", allow_empty=False)
        _check_id(image_id)
        _check_label(group, "group", allow_empty=True)
        if not isinstance(payload, bytes | bytearray | memoryview):
            raise InvalidInput("a trace payload must be bytes")
        updates: list[tuple[RankUpdate, list[tuple[Any, ...]]]] = []
        for update in rankings:
            if not isinstance(update, RankUpdate):
                raise InvalidInput(f"expected a RankUpdate, not {type(update).__name__}")
            _check_id(update.image_id)
            updates.append((update, _rank_rows(update.image_id, update.ranks, update.group)))
        async with self._driver.transaction(write=True) as tx:
            # Always in id order: two writers locking the same images cannot deadlock.
            for locked in sorted({image_id, *(u.image_id for u in rankings)}):
                await self._lock_image(tx, locked)
            row = await tx.fetchone(
                "INSERT INTO traces (trace_id, image_id, grp, payload, received_at)"
                " VALUES (?, ?, ?, ?, ?) ON CONFLICT (trace_id) DO NOTHING RETURNING trace_id",
                (trace_id, image_id, group, bytes(payload), self._clock()),
            )
            if row is None:
                return False
            counts: dict[tuple[str, int], int] = {}
            for update, rows in updates:
                if update.traces is not None:
                    key = (update.group, update.image_id if not update.group else 0)
                    if key not in counts:
                        counts[key] = await self._count_traces(tx, update)
                    if counts[key] != update.traces:
                        # Raising rolls the whole transaction back, the trace included.
                        raise StaleRanking(
                            f"the ranking of image {update.image_id}"
                            + (f" in group {update.group!r}" if update.group else "")
                            + f" merges {update.traces} traces, but {counts[key]} are stored",
                            hint="merge the stored traces again and retry",
                        )
                await self._replace_ranks(tx, update.image_id, update.group, rows)
        return True

    @staticmethod
    async def _count_traces(tx: Transaction, update: RankUpdate) -> int:
        if update.group:
            row = await tx.fetchone("SELECT COUNT(*) FROM traces WHERE grp = ?", (update.group,))
        else:
            row = await tx.fetchone(
                "SELECT COUNT(*) FROM traces WHERE image_id = ?", (update.image_id,)
            )
        assert row is not None
        return int(row[0])

    async def list_traces(
        self, image_id: int | None, *, group: str | None = None
    ) -> list[TraceRecord]:
        sql = "SELECT trace_id, image_id, grp, payload, received_at FROM traces WHERE "
        params: list[Any] = []
        if image_id is None:
            if not group:
                raise InvalidInput("listing traces of every image needs a group")
        else:
            sql += "image_id = ? AND "
            params.append(_check_id(image_id))
        if group is not None:
            sql += "grp = ? AND "
            params.append(_check_label(group, "group", allow_empty=True))
        async with self._driver.transaction(write=False) as tx:
            rows = await tx.fetchall(sql + "1 = 1 ORDER BY received_at, trace_id", params)
        return [
            TraceRecord(trace_id=t, image_id=i, group=g, payload=bytes(p), received_at=r)
            for t, i, g, p, r in rows
        ]


def _rank_rows(image_id: int, ranks: Mapping[str, float], group: str) -> list[tuple[Any, ...]]:
    _check_label(group, "group", allow_empty=True)
    rows: list[tuple[Any, ...]] = []
    for path, rank in ranks.items():
        if not isinstance(rank, int | float) or isinstance(rank, bool) or not math.isfinite(rank):
            raise InvalidInput(f"rank of {path!r} must be a finite number, not {rank!r}")
        rows.append((image_id, group, encode_text(path), float(rank)))
    return rows


def _build_tocs(layers: Sequence[LayerRecord], files: Mapping[int, list[Row]]) -> tuple[TOC, ...]:
    decoded: dict[int, TOC] = {}
    tocs = []
    for layer in layers:
        toc = decoded.get(layer.id)
        if toc is None:
            toc = decoded[layer.id] = TOC(
                layer=LayerInfo(
                    digest=layer.digest,
                    size=layer.size,
                    diff_id=layer.diff_id,
                    media_type=layer.media_type,
                ),
                entries=decode_entries(files[layer.id]),
                chunk_size=layer.chunk_size,
                version=layer.toc_version,
            )
        tocs.append(toc)
    return tuple(tocs)
