"""Start-up trace reports (``POST /starlight/report``): checked, stored, merged into rankings.

A worker uploads one trace per request, in its JSON Lines form (``starlight_core.trace``).
``TraceReports.receive`` then:

1. reads the body, refusing more than ``max_size`` bytes as soon as they are announced or
   arrive (``TraceTooLarge``, HTTP 413);
2. decodes it (malformed: ``InvalidInput``, 400, naming the line);
3. finds the traced image, which must be indexed and ready (``ImageNotFound``, 404), and checks
   every access against the image's layer TOCs (``check_trace``: unknown layers or files are
   400);
4. merges it into the image's ranking and, for a trace of a group, the group's joint ranking,
   and stores the trace with every ranking it changed in one transaction: nothing is stored
   half-way. A trace id stored before is answered ``stored: false`` and changes nothing.

Rankings are kept in memory (``Ranking``/``GroupRanking``, their sufficient statistics), so a
report costs time in proportion to its own length, not to the traces before it; they are
rebuilt from the stored traces when missing (a fresh process, evicted from the cache, or a
merge that failed). The transaction checks that each ranking merges exactly the traces stored
(``RankUpdate.traces``); another proxy sharing the database may have stored one meanwhile, and
then the rankings are rebuilt and the report tried again.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import AsyncIterable, Sequence
from typing import Final, Generic, TypeVar

import anyio
import anyio.to_thread
import attrs

from starlight_core.digest import Digest
from starlight_core.errors import (
    ImageNotFound,
    InvalidInput,
    ResourceExhausted,
    StarlightError,
)
from starlight_core.proxy_client import ReportResult, TraceTooLarge
from starlight_core.reference import Reference
from starlight_core.trace import (
    DEFAULT_MAX_TRACE_SIZE,
    DEFAULT_PENALTY,
    GroupRanking,
    Ranking,
    Trace,
    check_trace,
    decode,
    encode,
)
from starlight_proxy.store import (
    ImageRecord,
    MetadataStore,
    RankUpdate,
    StaleRanking,
    TraceRecord,
)

__all__ = ["MAX_REPORT_SIZE", "TraceReports", "read_limited"]

log = logging.getLogger(__name__)

MAX_REPORT_SIZE: Final = DEFAULT_MAX_TRACE_SIZE
"""The largest trace accepted (16 MiB, about 150,000 accesses)."""
_ATTEMPTS: Final = 3
"""Merges tried when other writers keep storing traces of the same image or group."""
_CACHED_IMAGES: Final = 64
_CACHED_GROUPS: Final = 16

K = TypeVar("K")
V = TypeVar("V")


class _Cache(Generic[K, V]):
    """A small LRU map: rankings are rebuilt from the store when evicted."""

    def __init__(self, capacity: int) -> None:
        self._capacity = capacity
        self._items: OrderedDict[K, V] = OrderedDict()

    def get(self, key: K) -> V | None:
        value = self._items.get(key)
        if value is not None:
            self._items.move_to_end(key)
        return value

    def put(self, key: K, value: V) -> None:
        self._items[key] = value
        self._items.move_to_end(key)
        while len(self._items) > self._capacity:
            self._items.popitem(last=False)

    def pop(self, key: K) -> None:
        self._items.pop(key, None)


@attrs.define
class _ImageRanking:
    ranking: Ranking
    accounted: set[str] = attrs.Factory(set)
    """Ids of the stored traces it accounts for (merged, or unreadable and skipped)."""


@attrs.define
class _GroupRanking:
    ranking: GroupRanking
    accounted: set[str] = attrs.Factory(set)
    image_ids: dict[Digest, int] = attrs.Factory(dict)
    """The store's image id of each manifest digest ranked."""


async def read_limited(
    chunks: AsyncIterable[bytes], *, declared: int | None, max_size: int
) -> bytes:
    """A request body, refused with ``TraceTooLarge`` as soon as it is known to be larger than
    ``max_size`` (from its Content-Length, or while it arrives)."""
    if declared is not None and declared > max_size:
        raise _too_large(max_size)
    body = bytearray()
    async for chunk in chunks:
        body += chunk
        if len(body) > max_size:
            raise _too_large(max_size)
    return bytes(body)


def _too_large(max_size: int) -> TraceTooLarge:
    return TraceTooLarge(
        f"trace report larger than {max_size} bytes",
        hint="a trace holds the first access per file only; the worker should shorten it",
    )


def _decode(body: bytes, max_size: int) -> tuple[Trace, bytes]:
    if not body:
        raise InvalidInput("a report carries one trace (JSON Lines) in its body; it was empty")
    try:
        trace = decode(body, max_size=max_size)
    except ResourceExhausted as exc:
        raise _too_large(max_size) from exc
    # Stored canonical: equal traces, equal bytes, whatever the worker's spelling.
    return trace, encode(trace)


def _readable(record: TraceRecord) -> Trace | None:
    try:
        # Stored traces passed the limit of their day: do not refuse them for a lower one.
        return decode(record.payload, max_size=max(len(record.payload), DEFAULT_MAX_TRACE_SIZE))
    except StarlightError as exc:
        log.warning("stored trace %s cannot be read (%s); it is left out", record.trace_id, exc)
        return None


def _image_ranking(
    image: ImageRecord, records: Sequence[TraceRecord], penalty: float
) -> _ImageRanking:
    merged = _ImageRanking(Ranking(image.digest, penalty=penalty))
    for record in records:
        trace = _readable(record)
        if trace is not None:
            merged.ranking.absorb(trace)
        merged.accounted.add(record.trace_id)
    return merged


def _group_ranking(group: str, records: Sequence[TraceRecord], penalty: float) -> _GroupRanking:
    merged = _GroupRanking(GroupRanking(group, penalty=penalty))
    for record in records:
        trace = _readable(record)
        if trace is not None:
            merged.ranking.absorb(trace)
            merged.image_ids[trace.image] = record.image_id
        merged.accounted.add(record.trace_id)
    return merged


class TraceReports:
    """Receives reports for one proxy process. Reports are merged one at a time (the lock):
    each is short, and the rankings they change are shared."""

    def __init__(
        self,
        store: MetadataStore,
        *,
        max_size: int = MAX_REPORT_SIZE,
        penalty: float = DEFAULT_PENALTY,
    ) -> None:
        self._store = store
        self.max_size = max_size
        self._penalty = penalty
        self._lock = anyio.Lock()
        self._images: _Cache[int, _ImageRanking] = _Cache(_CACHED_IMAGES)
        self._groups: _Cache[str, _GroupRanking] = _Cache(_CACHED_GROUPS)

    async def receive(self, chunks: AsyncIterable[bytes], *, declared: int | None) -> ReportResult:
        """Read, check, store and merge one uploaded trace (see the module docstring)."""
        body = await read_limited(chunks, declared=declared, max_size=self.max_size)
        trace, payload = await anyio.to_thread.run_sync(_decode, body, self.max_size)
        return await self.ingest(trace, payload)

    async def ingest(self, trace: Trace, payload: bytes) -> ReportResult:
        """Check a decoded trace against its image, store it and merge it."""
        image = await self._image(trace)
        metadata = await self._store.load_image(image.id)
        await anyio.to_thread.run_sync(check_trace, trace, metadata.tocs)
        async with self._lock:
            for _ in range(_ATTEMPTS):
                try:
                    return await self._merge(trace, payload, image)
                except StaleRanking as exc:
                    log.info("report %s: %s; merging again", trace.trace_id, exc.message)
                    self._forget(image.id, trace.group)
            raise StaleRanking(
                f"trace {trace.trace_id}: other reports of image {image.name}@{image.digest} "
                "keep arriving; it was not stored",
                hint="report again",
            )

    async def _image(self, trace: Trace) -> ImageRecord:
        traced = trace.header.image
        name = Reference.parse(traced.reference).name
        what = f"{name}@{traced.manifest_digest} ({traced.platform})"
        try:
            image = await self._store.find_image(
                name, digest=traced.manifest_digest, platform=traced.platform
            )
        except ImageNotFound as exc:
            raise ImageNotFound(
                f"trace {trace.trace_id}: image {what} is not known to this proxy",
                hint="notify the proxy of the image (ctr-starlight notify), then report again",
            ) from exc
        if image.digest != traced.manifest_digest:
            raise InvalidInput(
                f"trace {trace.trace_id}: {traced.manifest_digest} is an index, not the "
                f"manifest of {traced.platform}: a trace names the manifest the container ran"
            )
        return image

    async def _merge(self, trace: Trace, payload: bytes, image: ImageRecord) -> ReportResult:
        own = await self._own(image)
        group = trace.group
        joint = await self._joint(group) if group is not None else None
        if trace.trace_id in own.accounted:
            return self._result(trace, image, own, stored=False)

        def absorb() -> list[RankUpdate]:
            own.ranking.absorb(trace)
            own.accounted.add(trace.trace_id)
            updates = [RankUpdate(image.id, own.ranking.ranks(), traces=len(own.accounted))]
            if joint is not None and group is not None:
                joint.ranking.absorb(trace)
                joint.accounted.add(trace.trace_id)
                joint.image_ids[trace.image] = image.id
                for digest, ranks in joint.ranking.rank_maps().items():
                    updates.append(
                        RankUpdate(
                            joint.image_ids[digest], ranks, group, traces=len(joint.accounted)
                        )
                    )
            return updates

        try:
            updates = await anyio.to_thread.run_sync(absorb)
            stored = await self._store.add_trace(
                trace.trace_id, image.id, payload, group=group or "", rankings=updates
            )
        except BaseException:
            # The cached rankings hold a trace that is not stored: rebuild them next time.
            self._forget(image.id, group)
            raise
        if not stored:
            # Stored before, by another proxy (or under another image): ours did not know.
            self._forget(image.id, group)
        return self._result(trace, image, own, stored=stored)

    async def _own(self, image: ImageRecord) -> _ImageRanking:
        cached = self._images.get(image.id)
        if cached is None:
            records = await self._store.list_traces(image.id)
            cached = await anyio.to_thread.run_sync(_image_ranking, image, records, self._penalty)
            self._images.put(image.id, cached)
        return cached

    async def _joint(self, group: str) -> _GroupRanking:
        cached = self._groups.get(group)
        if cached is None:
            records = await self._store.list_traces(None, group=group)
            cached = await anyio.to_thread.run_sync(_group_ranking, group, records, self._penalty)
            self._groups.put(group, cached)
        return cached

    def _forget(self, image_id: int, group: str | None) -> None:
        self._images.pop(image_id)
        if group is not None:
            self._groups.pop(group)

    def _result(
        self, trace: Trace, image: ImageRecord, own: _ImageRanking, *, stored: bool
    ) -> ReportResult:
        return ReportResult(
            trace_id=trace.trace_id,
            image=f"{image.name}@{image.digest}",
            stored=stored,
            accesses=len(trace.accesses),
            files_ranked=len(own.ranking),
            group=trace.group,
        )
