"""The optimizer: start-up traces of the containers run from starlight snapshots.

``ctr-starlight optimizer on [--group NAME]`` turns it on: from then on every container whose
root filesystem the snapshotter mounts gets its layers through FUSE, even complete ones, each
under a key of its own (an *alias* ``<layer key>@<trace id prefix>``, a second view of the same
layer directory). The FUSE server records the first access to each file of each key, so the
accesses of one container are told from another's even when they share layers, and the kernel's
caches (per path) do not hide a file from a container because another read it first.

``Tracer.sync`` (every second, and before a report) drains the FUSE server's records, turns
each into the trace format (``starlight_core.trace``: offset since the container's snapshot was
first mounted, layer index in the image, path, kind) and appends it to the container's partial
trace on disk. A trace is finished — sorted, deduplicated, written as a versioned JSON Lines
file, ``traces/<trace-id>.jsonl`` — when its container's snapshot is removed (the container
was deleted) or when the optimizer is turned off. ``ctr-starlight report`` uploads the
finished traces (``Tracer.report``) and moves each to ``traces/sent/``; the proxy answers an
upload it had already ``stored: false``, so a report can be repeated safely. A trace the proxy
refuses for good (malformed, or not fitting the image) goes to ``traces/rejected/`` with the
reason beside it; one of an image the proxy does not know (yet) stays pending.

Everything is on disk under ``<root>/traces/``: ``state.json`` (the optimizer's switch and
group, and each traced container: its trace id, image, start time and aliases),
``<trace-id>.partial`` (accesses so far, one JSON object a line, in arrival order), the
finished and sent traces. A restarted daemon picks up where it was: the FUSE server kept
recording meanwhile (it outlives the daemon), and turning tracing on again keeps its records.

Aliases stay attached while their snapshot exists, even after the trace is finished: running
containers read through them. They are detached once the snapshot is removed.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import socket
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Final

import anyio
import anyio.to_thread
import attrs

from starlight_core import wire
from starlight_core.errors import (
    FailedPrecondition,
    InvalidInput,
    NotFound,
    StarlightError,
)
from starlight_core.platform import Platform
from starlight_core.proxy_client import ProxyClient, TraceTooLarge
from starlight_core.trace import (
    DEFAULT_MAX_TRACE_SIZE,
    AccessKind,
    FileAccess,
    Trace,
    TracedImage,
    TraceHeader,
    encode,
    encode_access,
    encode_header,
)
from starlight_worker.containerd import ContainerdClient
from starlight_worker.fs import AsyncFsClient
from starlight_worker.fs.protocol import ALIAS_SEPARATOR
from starlight_worker.snapshotter import Kind, Mounting, Snapshotter
from starlight_worker.snapshotter.model import LABEL_SNAPSHOT_REF
from starlight_worker.store import ImageRecord, Store

__all__ = [
    "ALIAS_SEPARATOR",
    "OptimizerState",
    "ReportOutcome",
    "Tracer",
    "is_alias",
    "snapshot_exists",
]

log = logging.getLogger(__name__)

SYNC_INTERVAL: Final = 1.0
"""Seconds between drains of the FUSE server's records."""
_LABEL_LAYER: Final = "containerd.io/snapshot/starlight.layer"
_LABEL_IMAGE: Final = "containerd.io/snapshot/starlight.image"
_STATE_VERSION: Final = 1
_KEEP_SENT: Final = 1000
"""Sent traces kept (newest first) for inspection; older ones are deleted."""
_GROUP_RE: Final = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
"""What a trace header's group may be (``starlight_core.trace.TraceHeader``)."""


def is_alias(key: str) -> bool:
    """Whether a FUSE layer key is one of the tracer's per-container views."""
    return ALIAS_SEPARATOR in key


@attrs.frozen
class OptimizerState:
    enabled: bool = False
    group: str | None = None


@attrs.frozen
class ReportOutcome:
    sent: int = 0
    """Traces the proxy stored."""
    already_sent: int = 0
    """Traces the proxy had stored before (an upload repeated)."""
    images: tuple[str, ...] = ()
    """The images (``name@digest``) whose rankings the uploads changed."""
    rejected: tuple[str, ...] = ()
    """Why each trace not accepted was refused (kept pending or moved to ``rejected/``)."""
    pending: int = 0
    """Finished traces still waiting for an upload."""


@attrs.define
class _Alias:
    key: str
    layer: str
    """The store's layer key."""
    index: int
    """The layer's position in the image (base layer 0)."""
    attached_ns: int
    """When the FUSE server attached it (monotonic): the origin of its accesses' times."""


@attrs.define
class _Container:
    """One container's snapshot served through aliases, and its trace."""

    snapshot: str
    """The snapshotter's key of the container's active snapshot."""
    trace_id: str
    container_id: str
    image: TracedImage
    start_ns: int
    """``time.monotonic_ns()`` when its mounts were first computed."""
    started_at: datetime
    group: str | None = None
    tracing: bool = True
    """The trace is open (accesses are appended to its partial file)."""
    aliases: list[_Alias] = attrs.Factory(list)


@attrs.define
class _State:
    version: int = _STATE_VERSION
    optimizer: OptimizerState = attrs.Factory(OptimizerState)
    containers: list[_Container] = attrs.Factory(list)


for _cls in (OptimizerState, _Alias, _Container, _State):
    wire.register(_cls, omit_if_default=False)


def _hostname() -> str | None:
    name = socket.gethostname()
    return name if name and name.isprintable() and len(name) <= 255 else None


def _container_id(snapshot_key: str) -> str:
    # containerd's metadata layer names backend snapshots "<namespace>/<n>/<key>"; the key of
    # a container's snapshot is (for ctr, nerdctl and the CRI plugin) the container's id.
    name = snapshot_key.rsplit("/", 1)[-1] or snapshot_key
    name = "".join(c if c.isprintable() else "?" for c in name)
    return name[:255] or "unknown"


def _namespace(snapshot_key: str) -> str | None:
    parts = snapshot_key.split("/", 2)
    return parts[0] if len(parts) == 3 else None


def _check_group(group: str | None) -> str | None:
    if not group:
        return None
    if not _GROUP_RE.match(group):
        raise InvalidInput(
            f"invalid optimizer group {group!r}: 1 to 128 letters, digits, '_', '.' or '-', "
            "starting with a letter or digit"
        )
    return group


class Tracer:
    """The daemon's optimizer (see the module docstring). Async; one per daemon."""

    def __init__(
        self,
        *,
        root: Path,
        store: Store,
        fused: AsyncFsClient,
        fuse_mountpoint: Path,
        snapshot_exists: Callable[[str], Awaitable[bool]],
        worker: str | None = None,
    ) -> None:
        self.directory = Path(root) / "traces"
        self.store = store
        self.fused = fused
        self.fuse_mountpoint = Path(fuse_mountpoint)
        self._snapshot_exists = snapshot_exists
        self.worker = worker if worker is not None else _hostname()
        self._state = _State()
        self._lock = anyio.Lock()

    # --- paths ----------------------------------------------------------------------------

    @property
    def _state_file(self) -> Path:
        return self.directory / "state.json"

    def _partial(self, trace_id: str) -> Path:
        return self.directory / f"{trace_id}.partial"

    def _finished(self, trace_id: str) -> Path:
        return self.directory / f"{trace_id}.jsonl"

    @property
    def sent_dir(self) -> Path:
        return self.directory / "sent"

    @property
    def rejected_dir(self) -> Path:
        return self.directory / "rejected"

    # --- state ----------------------------------------------------------------------------

    @property
    def state(self) -> OptimizerState:
        return self._state.optimizer

    def pending(self) -> list[Path]:
        """Finished traces not uploaded yet, oldest first."""
        try:
            paths = list(self.directory.glob("*.jsonl"))
        except OSError:
            return []
        return sorted(paths, key=lambda p: (_mtime(p), p.name))

    def aliases(self) -> list[str]:
        return sorted(a.key for c in self._state.containers for a in c.aliases)

    def serves(self, layer: str) -> bool:
        """Whether some container reads ``layer`` through an alias."""
        return any(a.layer == layer for c in self._state.containers for a in c.aliases)

    def _save(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        temporary = self._state_file.with_suffix(".tmp")
        temporary.write_bytes(wire.dumps(self._state))
        os.replace(temporary, self._state_file)

    def _load_state(self) -> _State:
        try:
            data = self._state_file.read_bytes()
        except FileNotFoundError:
            return _State()
        try:
            state: _State = wire.loads(data, _State, "tracer state")
        except StarlightError as exc:
            log.warning("ignoring unreadable %s: %s", self._state_file, exc)
            return _State()
        return state

    async def load(self) -> None:
        """Read the state on disk (after a start); resume tracing if the optimizer was on.

        Containers whose aliases the FUSE server no longer serves (it restarted: their mounts
        are gone) are finished and forgotten."""
        async with self._lock:
            self._state = await anyio.to_thread.run_sync(self._load_state)
            if not self._state.containers and not self._state.optimizer.enabled:
                return  # never used, or nothing left: nothing to resume, nothing to write
            try:
                served = {info.layer_key for info in await self.fused.list()}
            except StarlightError as exc:
                log.warning("cannot resume the optimizer: %s", exc)
                return
            for container in list(self._state.containers):
                if any(a.key not in served for a in container.aliases):
                    log.info("container %s lost its FUSE views: trace finished", container.snapshot)
                    await self._finish(container)
                    await self._detach(container)
                    self._state.containers.remove(container)
            if self._state.optimizer.enabled:
                await self.fused.trace_on()
            else:
                for container in self._state.containers:
                    await self._finish(container)
            await anyio.to_thread.run_sync(self._save)

    # --- the switch -------------------------------------------------------------------------

    async def enable(self, group: str | None = None) -> OptimizerState:
        group = _check_group(group)
        async with self._lock:
            await self.fused.trace_on()
            self._state.optimizer = OptimizerState(enabled=True, group=group)
            await anyio.to_thread.run_sync(self._save)
        log.info("optimizer on" + (f" (group {group})" if group else ""))
        return self._state.optimizer

    async def disable(self) -> OptimizerState:
        """Stop recording and finish every open trace (their containers keep running on their
        views until they are removed)."""
        async with self._lock:
            await self.fused.trace_off()
            await self._drain()
            for container in self._state.containers:
                await self._finish(container)
            self._state.optimizer = OptimizerState(enabled=False, group=None)
            await anyio.to_thread.run_sync(self._save)
        log.info("optimizer off")
        return self._state.optimizer

    # --- mounts -----------------------------------------------------------------------------

    async def lower_dir(self, layer: str, mounting: Mounting) -> Path | None:
        """The directory to mount ``layer`` from for ``mounting``: a per-container view while
        the optimizer is on (or the container has one already), else ``None`` (no tracing:
        the caller decides as usual)."""
        snapshot = mounting.snapshot
        async with self._lock:
            container = self._container(snapshot.name)
            if container is None:
                if not self._state.optimizer.enabled or not _traceable(mounting):
                    return None
                container = await self._begin(mounting)
                if container is None:
                    return None
            alias = next((a for a in container.aliases if a.layer == layer), None)
            if alias is None:
                alias = await self._attach(container, layer, mounting.index)
            return self.fuse_mountpoint / alias.key

    def _container(self, snapshot: str) -> _Container | None:
        return next((c for c in self._state.containers if c.snapshot == snapshot), None)

    async def _begin(self, mounting: Mounting) -> _Container | None:
        layers = tuple(info.labels[_LABEL_LAYER] for info in mounting.chain)
        image = await anyio.to_thread.run_sync(self._image_of, mounting, layers)
        if image is None:
            log.info(
                "container snapshot %s: no starlight image has its layers; not traced",
                mounting.snapshot.name,
            )
            return None
        trace_id = str(uuid.uuid4())
        container = _Container(
            snapshot=mounting.snapshot.name,
            trace_id=trace_id,
            container_id=_container_id(mounting.snapshot.name),
            image=TracedImage(
                reference=image.reference,
                manifest_digest=image.manifest_digest,
                platform=Platform.parse(image.platform),
            ),
            start_ns=time.monotonic_ns(),
            started_at=datetime.now(UTC),
            group=self._state.optimizer.group,
        )
        self._state.containers.append(container)
        await anyio.to_thread.run_sync(self._save)
        log.info(
            "tracing container %s (image %s, trace %s)",
            container.container_id,
            image.reference,
            trace_id,
        )
        return container

    def _image_of(self, mounting: Mounting, layers: tuple[str, ...]) -> ImageRecord | None:
        """The image whose layers the chain is: the one it was pulled as, else any."""
        candidates = [image for image in self.store.images() if image.layers == layers]
        if not candidates:
            return None
        namespace = _namespace(mounting.snapshot.name)
        pulled_as = mounting.chain[-1].labels.get(_LABEL_IMAGE) if mounting.chain else None

        def preference(image: ImageRecord) -> tuple[bool, bool]:
            return (image.reference != pulled_as, image.namespace != namespace)

        return min(candidates, key=preference)

    async def _attach(self, container: _Container, layer: str, index: int) -> _Alias:
        key = f"{layer}{ALIAS_SEPARATOR}{container.trace_id.replace('-', '')[:12]}"
        await self.fused.attach(key, self.store.layer_dir(layer))
        attached_ns = next(
            (info.attached_ns for info in await self.fused.list() if info.layer_key == key), 0
        )
        if attached_ns <= 0:  # an older FUSE server: about now
            attached_ns = time.monotonic_ns()
        alias = _Alias(key, layer, index, attached_ns)
        container.aliases.append(alias)
        await anyio.to_thread.run_sync(self._save)
        return alias

    # --- collecting -------------------------------------------------------------------------

    async def sync(self) -> list[str]:
        """Drain the FUSE server's records into the open traces; finish the traces of removed
        snapshots and detach their views. Returns the alias keys detached."""
        async with self._lock:
            removed = [
                c for c in self._state.containers if not await self._snapshot_exists(c.snapshot)
            ]
            await self._drain()
            detached: list[str] = []
            for container in removed:
                await self._finish(container)
                detached += await self._detach(container)
                self._state.containers.remove(container)
            if removed:
                await anyio.to_thread.run_sync(self._save)
            return detached

    async def release(self, *, dry_run: bool = False) -> list[str]:
        """For ``reset`` (after the containers and snapshots went): what ``sync`` does."""
        if dry_run:
            return self.aliases()
        return await self.sync()

    async def run(self, interval: float = SYNC_INTERVAL) -> None:
        """Sync every ``interval`` seconds, forever."""
        while True:
            await anyio.sleep(interval)
            if not self._state.containers and not self._state.optimizer.enabled:
                continue  # nothing to collect (while on, records of other keys are dropped)
            try:
                await self.sync()
            except Exception:
                log.exception("collecting start-up traces failed")

    async def _drain(self) -> None:
        records = await self.fused.trace_drain()
        if not records:
            return
        by_key = {
            alias.key: (container, alias)
            for container in self._state.containers
            for alias in container.aliases
        }
        lines: dict[str, list[bytes]] = {}
        for record in records:
            found = by_key.get(record.layer_key)
            if found is None:
                continue  # a layer no traced container uses (or one forgotten)
            container, alias = found
            if not container.tracing:
                continue
            offset = max(0, alias.attached_ns + record.t_ns - container.start_ns)
            try:
                access = FileAccess(offset, alias.index, record.name, AccessKind(record.kind))
            except (InvalidInput, ValueError) as exc:
                log.debug("trace %s: skipping %r: %s", container.trace_id, record.name, exc)
                continue
            lines.setdefault(container.trace_id, []).append(encode_access(access))
        await anyio.to_thread.run_sync(self._append, lines)

    def _append(self, lines: dict[str, list[bytes]]) -> None:
        for trace_id, chunk in lines.items():
            with open(self._partial(trace_id), "ab") as file:
                file.write(b"".join(chunk))

    async def _finish(self, container: _Container) -> None:
        if not container.tracing:
            return
        container.tracing = False
        header = TraceHeader(
            trace_id=container.trace_id,
            image=container.image,
            container_id=container.container_id,
            started_at=container.started_at,
            group=container.group,
            worker=self.worker,
        )
        written = await anyio.to_thread.run_sync(self._write_trace, header)
        if written:
            log.info("trace %s of container %s finished", header.trace_id, header.container_id)

    def _write_trace(self, header: TraceHeader) -> bool:
        partial = self._partial(header.trace_id)
        accesses = _read_accesses(partial)
        if accesses:
            trace = _fit(Trace.build(header, accesses))
            temporary = self._finished(header.trace_id).with_suffix(".tmp")
            temporary.write_bytes(encode(trace))
            os.replace(temporary, self._finished(header.trace_id))
        with contextlib.suppress(FileNotFoundError):
            partial.unlink()
        return bool(accesses)

    async def _detach(self, container: _Container) -> list[str]:
        detached = []
        for alias in container.aliases:
            try:
                await self.fused.detach(alias.key)
            except StarlightError as exc:
                log.warning("detaching FUSE view %s failed: %s", alias.key, exc)
                continue
            detached.append(alias.key)
        return detached

    # --- reporting --------------------------------------------------------------------------

    async def report(self, proxy: ProxyClient) -> ReportOutcome:
        """Upload every finished trace, one request each; see the module docstring."""
        await self.sync()
        sent = already = 0
        images: set[str] = set()
        rejected: list[str] = []
        for path in self.pending():
            try:
                data = await anyio.to_thread.run_sync(path.read_bytes)
            except FileNotFoundError:
                continue  # another report took it
            trace_id = path.stem
            try:
                result = await proxy.report(data)
            except (TraceTooLarge, InvalidInput) as exc:
                # The trace itself is wrong for this image: it would never be accepted.
                rejected.append(f"trace {trace_id} rejected: {exc}")
                await anyio.to_thread.run_sync(self._move, path, self.rejected_dir, str(exc))
                continue
            except (NotFound, FailedPrecondition) as exc:
                # The proxy does not know the image (yet), or is busy with it: try again later.
                rejected.append(f"trace {trace_id} kept for later: {exc}")
                continue
            if result.stored:
                sent += 1
                images.add(result.image)
            else:
                already += 1
            await anyio.to_thread.run_sync(self._move, path, self.sent_dir, None)
        await anyio.to_thread.run_sync(self._prune_sent)
        return ReportOutcome(
            sent=sent,
            already_sent=already,
            images=tuple(sorted(images)),
            rejected=tuple(rejected),
            pending=len(self.pending()),
        )

    @staticmethod
    def _move(path: Path, directory: Path, reason: str | None) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        os.replace(path, directory / path.name)
        if reason is not None:
            (directory / f"{path.stem}.reason").write_text(reason + "\n")

    def _prune_sent(self) -> None:
        try:
            sent = sorted(self.sent_dir.glob("*.jsonl"), key=_mtime, reverse=True)
        except OSError:
            return
        for old in sent[_KEEP_SENT:]:
            with contextlib.suppress(OSError):
                old.unlink()


def snapshot_exists(
    snapshotter: Snapshotter, containerd: Callable[[str], ContainerdClient] | None = None
) -> Callable[[str], Awaitable[bool]]:
    """``Tracer``'s ``snapshot_exists``: the snapshot is in the snapshotter and, asked through
    ``containerd`` (namespace → client), in containerd's metadata. containerd forgets a deleted
    container's snapshot at once but removes it from the snapshotter only at its next garbage
    collection, which may be much later."""

    async def exists(key: str) -> bool:
        try:
            await snapshotter.stat(key)
        except NotFound:
            return False
        parts = key.split("/", 2)  # containerd's "<namespace>/<n>/<key>"
        if containerd is None or len(parts) != 3 or not parts[2]:
            return True
        try:
            async with containerd(parts[0]) as client:
                return await client.snapshot_exists(parts[2])
        except StarlightError as exc:
            log.debug("cannot ask containerd about snapshot %s: %s", key, exc)
            return True  # cannot tell: it stays

    return exists


def _traceable(mounting: Mounting) -> bool:
    """A container's root filesystem on starlight layers only (not containerd unpacking a
    layer, not a read-only view)."""
    snapshot = mounting.snapshot
    return (
        snapshot.kind is Kind.ACTIVE
        and LABEL_SNAPSHOT_REF not in snapshot.labels
        and bool(mounting.chain)
        and all(info.labels.get(_LABEL_LAYER) for info in mounting.chain)
    )


def _read_accesses(path: Path) -> list[FileAccess]:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return []
    accesses = []
    for line in data.splitlines():
        try:
            accesses.append(wire.loads(line, FileAccess, "access"))
        except StarlightError:
            continue  # a line torn by a crash
    return accesses


def _fit(trace: Trace, limit: int = DEFAULT_MAX_TRACE_SIZE) -> Trace:
    """The trace, cut to its first accesses if its encoding would pass the proxy's limit."""
    size = len(encode_header(trace.header))
    kept: list[FileAccess] = []
    for access in trace.accesses:
        size += len(encode_access(access))
        if size > limit:
            log.warning(
                "trace %s: %d accesses kept of %d (size limit)",
                trace.trace_id,
                len(kept),
                len(trace.accesses),
            )
            return Trace(trace.header, kept)
        kept.append(access)
    return trace


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0
