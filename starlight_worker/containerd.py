"""A small containerd client (grpclib): what a pull needs from containerd.

The daemon writes the manifest and config into containerd's content store, creates the image
record, and creates the committed snapshot chain through containerd's *own* Snapshots API, so
that containerd's metadata knows every snapshot (namespaced, garbage-collected, under a lease).
Each layer is prepared with ``containerd.io/snapshot.ref`` set to its chain ID: our snapshotter
recognises the layer and answers ALREADY_EXISTS, exactly as containerd's remote-snapshot
protocol expects — containerd never downloads or unpacks it.
"""

from __future__ import annotations

import contextlib
import datetime
import secrets
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager, suppress
from types import TracebackType

import anyio
import attrs
from google.protobuf import field_mask_pb2
from grpclib import GRPCError, Status
from grpclib.client import Channel

from starlight_core.digest import Digest
from starlight_core.errors import (
    AlreadyExists,
    DaemonUnavailable,
    NotFound,
    StarlightError,
)
from starlight_worker.api import (
    containers_grpc,
    containers_pb2,
    content_grpc,
    content_pb2,
    descriptor_pb2,
    images_grpc,
    images_pb2,
    leases_grpc,
    leases_pb2,
    snapshots_grpc,
    snapshots_pb2,
    tasks_grpc,
    tasks_pb2,
)

__all__ = ["ContainerdClient", "ContainerdUnavailable", "SnapshotLayer"]

LABEL_SNAPSHOT_REF = "containerd.io/snapshot.ref"
LABEL_GC_EXPIRE = "containerd.io/gc.expire"
LABEL_GC_CONFIG = "containerd.io/gc.ref.content.config"
LABEL_GC_SNAPSHOT = "containerd.io/gc.ref.snapshot.{snapshotter}"
LABEL_GC_LAYER = "containerd.io/gc.ref.content.l.{index}"
LABEL_SOURCE = "containerd.io/distribution.source.{registry}"
LABEL_UNCOMPRESSED = "containerd.io/uncompressed"
_TIMEOUT = 60.0
UNAVAILABLE_PATIENCE = 10.0
"""Seconds to keep retrying a call containerd answers with UNAVAILABLE: it cannot reach a
plugin behind it — our snapshotter socket, which its gRPC client redials with backoff after the
daemon (re)starts — and will shortly."""


class ContainerdUnavailable(DaemonUnavailable):
    code = "containerd_unavailable"
    default_hint = "check that containerd is running and its address (--containerd-address)"


@attrs.frozen
class SnapshotLayer:
    """One layer of the chain: its chain ID and the labels our snapshotter recognises it by."""

    chain_id: Digest
    labels: Mapping[str, str]


def _translate(exc: GRPCError, what: str) -> StarlightError:
    message = f"containerd: {what}: {exc.message or exc.status.name}"
    if exc.status is Status.NOT_FOUND:
        return NotFound(message)
    if exc.status is Status.ALREADY_EXISTS:
        return AlreadyExists(message)
    if exc.status is Status.UNAVAILABLE:
        # containerd answered: what it could not reach is behind it (a snapshotter plugin).
        return ContainerdUnavailable(
            message,
            hint="containerd cannot reach a plugin it needs (the starlight snapshotter socket?)",
        )
    return StarlightError(message)


class ContainerdClient:
    """Talk to containerd at ``address`` in ``namespace``: ``async with ContainerdClient(...)``."""

    def __init__(self, address: str, namespace: str, *, snapshotter: str = "starlight") -> None:
        self.address = address
        self.namespace = namespace
        self.snapshotter = snapshotter
        self._channel = Channel(path=address)
        self._content = content_grpc.ContentStub(self._channel)
        self._images = images_grpc.ImagesStub(self._channel)
        self._leases = leases_grpc.LeasesStub(self._channel)
        self._snapshots = snapshots_grpc.SnapshotsStub(self._channel)
        self._containers = containers_grpc.ContainersStub(self._channel)
        self._tasks = tasks_grpc.TasksStub(self._channel)
        self._lease: str | None = None

    async def __aenter__(self) -> ContainerdClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def _metadata(self) -> dict[str, str]:
        metadata = {"containerd-namespace": self.namespace}
        if self._lease is not None:
            metadata["containerd-lease"] = self._lease
        return metadata

    async def _call(self, what: str, method, request):  # type: ignore[no-untyped-def]
        deadline = anyio.current_time() + UNAVAILABLE_PATIENCE
        delay = 0.1
        try:
            while True:
                try:
                    return await method(request, metadata=self._metadata(), timeout=_TIMEOUT)
                except GRPCError as exc:
                    if exc.status is not Status.UNAVAILABLE or anyio.current_time() >= deadline:
                        raise
                await anyio.sleep(delay)
                delay = min(delay * 2, 1.0)
        except GRPCError as exc:
            raise _translate(exc, what) from exc
        except (ConnectionError, FileNotFoundError, OSError) as exc:
            raise ContainerdUnavailable(
                f"containerd at {self.address} is unreachable: {exc}"
            ) from exc

    # -- leases ----------------------------------------------------------------------------

    @asynccontextmanager
    async def lease(
        self, expire: datetime.timedelta = datetime.timedelta(hours=1)
    ) -> AsyncIterator[str]:
        """Everything created inside is protected from garbage collection until the lease ends
        (or expires, should the daemon die)."""
        lease_id = f"starlight-{secrets.token_hex(8)}"
        until = datetime.datetime.now(datetime.UTC) + expire
        labels = {LABEL_GC_EXPIRE: until.strftime("%Y-%m-%dT%H:%M:%SZ")}
        await self._call(
            "create lease",
            self._leases.Create,
            leases_pb2.CreateRequest(id=lease_id, labels=labels),
        )
        previous, self._lease = self._lease, lease_id
        try:
            yield lease_id
        finally:
            self._lease = previous
            with contextlib.suppress(StarlightError):  # if not, it expires by itself
                await self._call(
                    "delete lease", self._leases.Delete, leases_pb2.DeleteRequest(id=lease_id)
                )

    # -- content ---------------------------------------------------------------------------

    async def content_exists(self, digest: Digest) -> bool:
        try:
            await self._call(
                f"content {digest}", self._content.Info, content_pb2.InfoRequest(digest=digest)
            )
        except NotFound:
            return False
        return True

    async def write_content(
        self, digest: Digest, data: bytes, labels: Mapping[str, str] | None = None
    ) -> None:
        """Store ``data`` under ``digest`` (verified by containerd), or update its labels."""
        if await self.content_exists(digest):
            if labels:
                await self._call(
                    f"label content {digest}",
                    self._content.Update,
                    content_pb2.UpdateRequest(
                        info=content_pb2.Info(digest=digest, labels=dict(labels)),
                        update_mask=field_mask_pb2.FieldMask(
                            paths=[f"labels.{key}" for key in labels]
                        ),
                    ),
                )
            return
        ref = f"starlight-{digest.hex[:24]}-{secrets.token_hex(4)}"
        request = content_pb2.WriteContentRequest(
            action=content_pb2.WriteAction.COMMIT,
            ref=ref,
            total=len(data),
            expected=digest,
            offset=0,
            data=data,
            labels=dict(labels or {}),
        )
        try:
            async with self._content.Write.open(
                metadata=self._metadata(), timeout=_TIMEOUT
            ) as stream:
                await stream.send_message(request, end=True)
                async for _ in stream:
                    pass
        except GRPCError as exc:
            if exc.status is Status.ALREADY_EXISTS:
                return
            raise _translate(exc, f"write content {digest}") from exc
        except (ConnectionError, OSError) as exc:
            raise ContainerdUnavailable(
                f"containerd at {self.address} is unreachable: {exc}"
            ) from exc

    # -- images ----------------------------------------------------------------------------

    async def set_image(
        self,
        name: str,
        media_type: str,
        digest: Digest,
        size: int,
        labels: Mapping[str, str] | None = None,
    ) -> None:
        """Create or re-point the image record ``name``."""
        image = images_pb2.Image(
            name=name,
            labels=dict(labels or {}),
            target=descriptor_pb2.Descriptor(media_type=media_type, digest=digest, size=size),
        )
        try:
            await self._call(
                f"create image {name}",
                self._images.Create,
                images_pb2.CreateImageRequest(image=image),
            )
        except AlreadyExists:
            await self._call(
                f"update image {name}",
                self._images.Update,
                images_pb2.UpdateImageRequest(
                    image=image, update_mask=field_mask_pb2.FieldMask(paths=["target", "labels"])
                ),
            )

    async def get_image(self, name: str) -> images_pb2.Image | None:
        try:
            response = await self._call(
                f"image {name}", self._images.Get, images_pb2.GetImageRequest(name=name)
            )
        except NotFound:
            return None
        image: images_pb2.Image = response.image
        return image

    async def list_images(self, filters: Sequence[str] = ()) -> list[images_pb2.Image]:
        response = await self._call(
            "list images", self._images.List, images_pb2.ListImagesRequest(filters=list(filters))
        )
        return list(response.images)

    async def delete_image(self, name: str) -> None:
        with suppress(NotFound):
            await self._call(
                f"delete image {name}",
                self._images.Delete,
                images_pb2.DeleteImageRequest(name=name, sync=False),
            )

    # -- snapshots (containerd's API, our snapshotter behind it) ----------------------------

    async def snapshot_exists(self, key: str) -> bool:
        try:
            await self._call(
                f"stat snapshot {key}",
                self._snapshots.Stat,
                snapshots_pb2.StatSnapshotRequest(snapshotter=self.snapshotter, key=key),
            )
        except NotFound:
            return False
        return True

    async def prepare_chain(self, layers: Sequence[SnapshotLayer]) -> None:
        """Create the committed chain, base first; layers already there are skipped."""
        parent = ""
        for layer in layers:
            if not await self.snapshot_exists(layer.chain_id):
                key = f"starlight-pull-{secrets.token_hex(6)} {layer.chain_id}"
                labels = {LABEL_SNAPSHOT_REF: str(layer.chain_id), **layer.labels}
                try:
                    await self._call(
                        f"prepare snapshot {layer.chain_id}",
                        self._snapshots.Prepare,
                        snapshots_pb2.PrepareSnapshotRequest(
                            snapshotter=self.snapshotter, key=key, parent=parent, labels=labels
                        ),
                    )
                except AlreadyExists:
                    pass  # the remote-snapshot answer: the layer is ours, committed as chain_id
                else:
                    # The snapshotter did not recognise the layer: undo, and say so.
                    await self.remove_snapshot(key)
                    raise StarlightError(
                        f"the starlight snapshotter did not provide layer {layer.chain_id}; "
                        "is containerd configured with the starlight proxy plugin?"
                    )
            parent = str(layer.chain_id)

    async def remove_snapshot(self, key: str) -> None:
        with suppress(NotFound):
            await self._call(
                f"remove snapshot {key}",
                self._snapshots.Remove,
                snapshots_pb2.RemoveSnapshotRequest(snapshotter=self.snapshotter, key=key),
            )

    async def list_snapshots(self) -> list[snapshots_pb2.Info]:
        infos: list[snapshots_pb2.Info] = []
        try:
            async with self._snapshots.List.open(
                metadata=self._metadata(), timeout=_TIMEOUT
            ) as stream:
                await stream.send_message(
                    snapshots_pb2.ListSnapshotsRequest(snapshotter=self.snapshotter), end=True
                )
                async for response in stream:
                    infos.extend(response.info)
        except GRPCError as exc:
            raise _translate(exc, "list snapshots") from exc
        return infos

    # -- containers and tasks (for reset) ---------------------------------------------------

    async def list_containers(self, filters: Sequence[str] = ()) -> list[containers_pb2.Container]:
        response = await self._call(
            "list containers",
            self._containers.List,
            containers_pb2.ListContainersRequest(filters=list(filters)),
        )
        return list(response.containers)

    async def stop_task(self, container_id: str, *, timeout: float = 15.0) -> None:
        """Kill a container's task (all its processes) and delete it; no task is fine."""
        with contextlib.suppress(NotFound):
            await self._call(
                f"kill task {container_id}",
                self._tasks.Kill,
                tasks_pb2.KillRequest(container_id=container_id, signal=9, all=True),
            )
            with anyio.move_on_after(timeout), contextlib.suppress(GRPCError):
                await self._tasks.Wait(
                    tasks_pb2.WaitRequest(container_id=container_id), metadata=self._metadata()
                )
            await self._call(
                f"delete task {container_id}",
                self._tasks.Delete,
                tasks_pb2.DeleteTaskRequest(container_id=container_id),
            )

    async def delete_container(self, container_id: str) -> None:
        with contextlib.suppress(NotFound):
            await self._call(
                f"delete container {container_id}",
                self._containers.Delete,
                containers_pb2.DeleteContainerRequest(id=container_id),
            )
