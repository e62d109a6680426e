"""The worker's local store: layer trees on disk, and what it holds in a small database.

Layout under ``root`` (the FUSE server and the snapshotter rely on the layer part)::

    store.db                      SQLite: layers, contents, images, pulls (``database``)
    store.lock                    held (flock) by the one process that uses the store
    staging/                      files being received, and copies about to be renamed in
    trash/                        removed layers on their way out
    layers/<key>/toc.json         the layer's TOC (``starlight_core.wire``)
    layers/<key>/fs/              the layer's tree, being filled (``layer``)
    layers/<key>/complete         every content present, directory times final

``key`` is ``<algorithm>-<hex>`` of the layer's diff_id (no ``:``: it becomes a path component
and an overlay ``lowerdir`` item). Staging and layers share a filesystem so that placing a file
is a rename; leftovers in ``staging/`` and ``trash/`` are removed when the store opens.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import re
import shutil
import threading
import time
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Final

from starlight_core import wire
from starlight_core.digest import Digest
from starlight_core.errors import (
    FailedPrecondition,
    ImageNotFound,
    InvalidInput,
    NotFound,
    StarlightError,
    UnsafePath,
)
from starlight_core.layer.toc import TOC
from starlight_core.platform import Platform
from starlight_worker.store import beneath
from starlight_worker.store.beneath import disk_error
from starlight_worker.store.database import Database
from starlight_worker.store.layer import COMPLETE_MARKER, FS_DIR, TOC_FILE, LayerHandle
from starlight_worker.store.lifecycle import LayerEvent, LayerState, transition
from starlight_worker.store.model import ImageRecord, LayerRecord, PullRecord, PullState
from starlight_worker.store.plan import plan_layer

__all__ = ["Store", "layer_diff_id", "layer_key", "toc_fingerprint"]

_KEY_RE: Final = re.compile(r"^[a-z0-9]+-[0-9a-f]{32,128}$")


def layer_key(diff_id: Digest | str) -> str:
    """The store's name for the layer with this diff_id: ``sha256-<hex>``."""
    digest = Digest(diff_id)
    return f"{digest.algorithm}-{digest.hex}"


def layer_diff_id(key: str) -> Digest:
    """The diff_id of the layer the store names ``key`` (``layer_key``'s inverse)."""
    algorithm, hex_digits = _check_key(key).split("-", 1)
    return Digest(f"{algorithm}:{hex_digits}")


def _check_key(key: str) -> str:
    if not isinstance(key, str) or not _KEY_RE.match(key):
        raise InvalidInput(
            f"invalid layer key {key!r}", hint="a layer key is <algorithm>-<hex> of a diff_id"
        )
    return key


def toc_fingerprint(toc: TOC) -> str:
    """What the layer's tree is made of: its entries without where their bytes sit in the
    blob (two conversions of one layer with other chunk sizes build the same tree)."""
    hasher = hashlib.sha256()
    for e in toc.entries:
        item = (e.name, e.type.value, e.mode, e.uid, e.gid, e.mtime_ns, e.size, e.linkname,
                e.devmajor, e.devminor, sorted(e.xattrs.items()), e.digest)  # fmt: skip
        hasher.update(repr(item).encode("utf-8", "surrogateescape"))
        hasher.update(b"\n")
    return "sha256:" + hasher.hexdigest()


class Store:
    """The local store at ``root``. Thread-safe; ``close()`` (or ``with``) when done.

    ``sync_contents`` fsyncs every file before it is renamed into place, so that even a power
    loss (not only a crash) never leaves a short file at a final name; it costs throughput.
    """

    def __init__(self, root: Path | str, *, sync_contents: bool = False) -> None:
        self.root = Path(root).absolute()
        self.sync_contents = sync_contents
        self._lock = threading.Lock()
        self._key_locks: dict[str, threading.Lock] = {}
        self._handles: dict[str, LayerHandle] = {}
        self._closed = False
        try:
            self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
            self._lock_fd = self._take_lock()
        except OSError as exc:
            raise disk_error(exc, f"opening the store at {self.root}") from exc
        try:
            for directory in (self.layers_root, self.staging_dir, self.trash_dir):
                directory.mkdir(mode=0o700, exist_ok=True)
            for directory in (self.staging_dir, self.trash_dir):
                self._empty(directory)
            self._staging_fd = beneath.open_dir(self.staging_dir)
        except OSError as exc:
            os.close(self._lock_fd)
            raise disk_error(exc, f"opening the store at {self.root}") from exc
        try:
            self._db = Database(str(self.root / "store.db"))
        except BaseException:
            os.close(self._staging_fd)
            os.close(self._lock_fd)
            raise

    def _take_lock(self) -> int:
        fd = os.open(self.root / "store.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise FailedPrecondition(
                f"the store at {self.root} is in use by another process",
                hint="stop the other starlight daemon, or give this one another root",
            ) from None
        return fd

    @staticmethod
    def _empty(directory: Path) -> None:
        for child in directory.iterdir():
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child)
            else:
                child.unlink()

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Close the database and release the store; handles become unusable. Idempotent.
        Call it once no other thread uses the store any more."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._db.close()
        os.close(self._staging_fd)
        os.close(self._lock_fd)

    def __enter__(self) -> Store:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- layout ----------------------------------------------------------------------------

    @property
    def layers_root(self) -> Path:
        return self.root / "layers"

    @property
    def staging_dir(self) -> Path:
        return self.root / "staging"

    @property
    def trash_dir(self) -> Path:
        return self.root / "trash"

    @staticmethod
    def layer_key(diff_id: Digest | str) -> str:
        return layer_key(diff_id)

    def layer_dir(self, key: str) -> Path:
        return self.layers_root / _check_key(key)

    def staging_file(self) -> Path:
        """A fresh path in the staging directory (not created): write a content there, then
        ``place`` it."""
        return self.staging_dir / f"{uuid.uuid4().hex}.part"

    # -- layers ----------------------------------------------------------------------------

    def state(self, key: str) -> LayerState:
        _check_key(key)
        handle = self._handles.get(key)
        if handle is not None:
            return handle.state
        state = self._db.layer_state(key)
        if state is LayerState.RECEIVING and (self.layer_dir(key) / COMPLETE_MARKER).exists():
            # Finalized on disk, stopped before the database heard of it.
            self._db.complete_layer(key)
            return LayerState.COMPLETE
        return state

    def layer(self, key: str) -> LayerRecord | None:
        return self._db.layer(_check_key(key))

    def layers(self) -> list[LayerRecord]:
        return self._db.layers()

    def layer_counts(self) -> tuple[int, int]:
        """(layers, complete layers)."""
        return self._db.layer_counts()

    @contextlib.contextmanager
    def _key_lock(self, key: str) -> Iterator[None]:
        with self._lock:
            if self._closed:
                raise FailedPrecondition("the store is closed")
            lock = self._key_locks.setdefault(key, threading.Lock())
        with lock:
            yield

    def begin_layer(self, toc: TOC, *, lower: Sequence[str] = ()) -> LayerHandle:
        """Start (or resume) receiving the layer ``toc`` describes; returns its handle.

        Idempotent: a layer being received gets the same handle (after a restart: rebuilt
        from what is on disk), a complete one a handle with nothing missing. ``lower`` names the
        layers below it, nearest first (the image's layers it is stacked on): its implied
        directories take their metadata from them as containerd's applier does. Begin the
        layers of an image base first. A hostile TOC raises ``UnsafePath``/``CorruptLayer``
        before anything is written; a full disk ``ResourceExhausted`` (begin again later).
        """
        key = layer_key(toc.layer.diff_id)
        lower = tuple(_check_key(k) for k in lower)
        with self._key_lock(key):
            handle = self._handles.get(key)
            if handle is not None and handle.state is not LayerState.ABSENT:
                if handle.state is LayerState.RECEIVING:
                    self._check_same(key, toc)
                return handle
            state = self.state(key)
            if state is LayerState.COMPLETE:
                handle = LayerHandle(self, key, toc, None, LayerState.COMPLETE)
                with self._lock:
                    self._handles[key] = handle
                return handle
            transition(state, LayerEvent.BEGIN, key)
            plan = plan_layer(toc)
            fingerprint = toc_fingerprint(toc)
            record = self._db.layer(key)
            layer_dir = self.layer_dir(key)
            if record is not None:
                self._check_same(key, toc, fingerprint)
                lower = lower or record.lower
            elif os.path.lexists(layer_dir):
                # Left by a begin that stopped before the database knew of it: no content can
                # have been placed yet, and it may hold another TOC's tree. Start afresh.
                self._discard(key, layer_dir)
            try:
                layer_dir.mkdir(mode=0o700, exist_ok=True)
                tmp = layer_dir / f"{TOC_FILE}.tmp"
                tmp.write_bytes(wire.dumps(toc))
                os.rename(tmp, layer_dir / TOC_FILE)
            except OSError as exc:
                raise disk_error(exc, f"layer {key}: writing its TOC") from exc
            self._db.begin_layer(
                key,
                toc.layer.diff_id,
                fingerprint,
                lower,
                (
                    (node.index, str(node.digest), node.size, os.fsencode(node.names[0]))
                    for node in plan.content_nodes()
                ),
            )
            handle = LayerHandle(self, key, toc, plan, LayerState.RECEIVING, lower)
            handle._build()
            with self._lock:
                self._handles[key] = handle
            return handle

    def open_layer(self, key: str) -> LayerHandle:
        """The handle of a layer the store holds, from its stored TOC (after a restart);
        ``NotFound`` if it is absent."""
        handle = self._handles.get(_check_key(key))
        if handle is not None and handle.state is not LayerState.ABSENT:
            return handle
        if self.state(key) is LayerState.ABSENT:
            raise NotFound(f"layer {key} is not in the store")
        try:
            data = (self.layer_dir(key) / TOC_FILE).read_bytes()
        except OSError as exc:
            raise NotFound(f"layer {key}: cannot read its TOC: {exc}") from exc
        return self.begin_layer(wire.loads(data, TOC, "TOC"))

    def _check_same(self, key: str, toc: TOC, fingerprint: str | None = None) -> None:
        stored = self._db.fingerprint(key)
        if stored is None:
            return
        if (fingerprint or toc_fingerprint(toc)) != stored:
            raise FailedPrecondition(
                f"layer {key} is being received from another TOC with different entries",
                hint="remove the layer (ctr-starlight reset) and pull again",
            )

    def place(
        self, digest: Digest | str, staged: Path | str, *, keep: bool = False
    ) -> dict[str, list[str]]:
        """``LayerHandle.place`` into every layer begun here that needs ``digest``: layer key
        → names now present."""
        digest = Digest(digest)
        with self._lock:
            handles = [h for h in self._handles.values() if h.needs(digest)]
        placed: dict[str, list[str]] = {}
        for i, handle in enumerate(handles):
            last = i == len(handles) - 1
            names = handle.place(digest, staged, keep=keep or not last)
            if names:
                placed[handle.key] = names
        if not handles and not keep:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(staged)
        return placed

    def remove_layer(self, key: str, *, force: bool = False) -> bool:
        """Delete a layer (database rows and tree). Refused while an image uses it unless
        ``force`` (those images are then no longer complete). The caller makes sure nothing
        mounts it any more. Returns whether there was anything to remove."""
        _check_key(key)
        users = self._db.layer_users().get(key, [])
        if users and not force:
            raise FailedPrecondition(
                f"layer {key} is used by {', '.join(sorted(users))}",
                hint="remove those images first",
            )
        with self._key_lock(key):
            with self._lock:
                handle = self._handles.pop(key, None)
            if handle is not None:
                handle._mark_removed()
            removed = self._db.remove_layer(key)
            layer_dir = self.layer_dir(key)
            if os.path.lexists(layer_dir):
                self._discard(key, layer_dir)
                removed = True
        return removed

    def _discard(self, key: str, layer_dir: Path) -> None:
        # Renamed away first: nobody sees a half-deleted layer at its name.
        trash = self.trash_dir / f"{key}.{uuid.uuid4().hex}"
        try:
            os.rename(layer_dir, trash)
            shutil.rmtree(trash)
        except OSError as exc:
            raise disk_error(exc, f"removing layer {key}") from exc

    def unused_layers(self) -> list[str]:
        """Layers no recorded image uses (what garbage collection may remove)."""
        users = self._db.layer_users()
        return [record.key for record in self._db.layers() if record.key not in users]

    # -- contents --------------------------------------------------------------------------

    def find_content(self, digest: Digest | str) -> Path | None:
        """A present, verified file with this content in any layer (for local copies)."""
        digest = Digest(digest)
        for key, name in self._db.holders(digest):
            try:
                fd = self._open_in_layer(key, name)
            except (OSError, StarlightError):
                continue
            os.close(fd)
            return self.layer_dir(key) / FS_DIR / os.fsdecode(name)
        return None

    def contents_present(self, digests: Iterable[Digest | str]) -> set[Digest]:
        """Which of ``digests`` some layer of the store holds (what not to fetch again)."""
        wanted = list(dict.fromkeys(Digest(d) for d in digests))
        return {Digest(d) for d in self._db.present_digests(wanted)}

    def _open_in_layer(self, key: str, name: bytes) -> int:
        fs_fd = beneath.open_dir(self.layer_dir(key) / FS_DIR)
        try:
            return beneath.open_file_beneath(fs_fd, name)
        finally:
            os.close(fs_fd)

    def _open_content(self, digest: Digest, size: int) -> int:
        """A read-only descriptor of a present file holding ``digest``; ``NotFound`` if none."""
        for key, name in self._db.holders(digest):
            try:
                fd = self._open_in_layer(key, name)
            except (OSError, UnsafePath):
                continue
            if os.fstat(fd).st_size == size:
                return fd
            os.close(fd)
        raise NotFound(f"no local file holds {digest}", hint="fetch it from the proxy")

    # -- images ----------------------------------------------------------------------------

    def record_image(
        self,
        *,
        reference: str,
        manifest_digest: Digest | str,
        config_digest: Digest | str,
        platform: Platform | str,
        namespace: str,
        layers: Sequence[str],
        manifest: bytes,
        config: bytes,
    ) -> ImageRecord:
        """Record (or replace) an image being pulled: not complete until
        ``mark_image_complete``. ``layers``: layer keys, base first."""
        for key in layers:
            _check_key(key)
        self._db.record_image(
            reference=str(reference),
            namespace=namespace,
            manifest_digest=str(Digest(manifest_digest)),
            config_digest=str(Digest(config_digest)),
            platform=str(platform),
            layers=list(layers),
            manifest=bytes(manifest),
            config=bytes(config),
        )
        record = self.image(str(reference), namespace=namespace)
        assert record is not None
        return record

    def images(self) -> list[ImageRecord]:
        """Every image, newest pull first, with how much of each is local."""
        return self._db.images()

    def image(self, reference: str, *, namespace: str | None = None) -> ImageRecord | None:
        """The image recorded under ``reference`` (in ``namespace``, or the newest of any)."""
        found = self._db.images(reference=str(reference), namespace=namespace)
        return found[0] if found else None

    def mark_image_complete(self, reference: str, *, namespace: str | None = None) -> None:
        if not self._db.mark_image_complete(str(reference), namespace):
            raise ImageNotFound(f"image {reference} is not recorded in the store")

    def remove_image(self, reference: str, *, namespace: str | None = None) -> bool:
        """Forget an image (its layers stay until ``remove_layer``)."""
        return self._db.remove_image(str(reference), namespace) > 0

    # -- pulls -----------------------------------------------------------------------------

    def start_pull(
        self, reference: str, *, namespace: str, bundle_id: str = "", header: bytes = b""
    ) -> PullRecord:
        pull_id = self._db.start_pull(str(reference), namespace, bundle_id, bytes(header))
        return self.pull(pull_id)

    def update_pull(
        self,
        pull_id: int,
        *,
        bundle_id: str | None = None,
        header: bytes | None = None,
        header_size: int | None = None,
        offset: int | None = None,
        bytes_received: int | None = None,
    ) -> None:
        """Record progress: the bundle (id, header bytes and size) and how far it got."""
        fields: dict[str, Any] = {}
        if bundle_id is not None:
            fields["bundle_id"] = bundle_id
        if header is not None:
            fields["header"] = bytes(header)
        if header_size is not None:
            fields["header_size"] = header_size
        if offset is not None:
            fields["resume_offset"] = offset
        if bytes_received is not None:
            fields["bytes"] = bytes_received
        if not self._db.update_pull(pull_id, fields):
            raise NotFound(f"pull {pull_id} is not recorded")

    def finish_pull(self, pull_id: int, *, error: str | None = None) -> PullRecord:
        """Mark a pull done (or failed with ``error``)."""
        state = PullState.FAILED if error else PullState.DONE
        fields = {"state": state.value, "finished_ns": time.time_ns(), "error": error or ""}
        if not self._db.update_pull(pull_id, fields):
            raise NotFound(f"pull {pull_id} is not recorded")
        return self.pull(pull_id)

    def pull(self, pull_id: int) -> PullRecord:
        record = self._db.pull(pull_id)
        if record is None:
            raise NotFound(f"pull {pull_id} is not recorded")
        return record

    def pulls(self, state: PullState | None = None) -> list[PullRecord]:
        """Pulls, newest first; ``PullState.RUNNING`` after a restart lists the interrupted."""
        return self._db.pulls(state)

    def forget_pulls(self, *, older_than: float) -> int:
        """Drop finished pulls that ended more than ``older_than`` seconds ago."""
        return self._db.forget_pulls(time.time_ns() - int(older_than * 1e9))

    # -- for tests and tools ---------------------------------------------------------------

    def handles(self) -> Mapping[str, LayerHandle]:
        with self._lock:
            return dict(self._handles)
