"""The gRPC adapter: ``containerd.services.snapshots.v1.Snapshots`` over a ``Snapshotter``.

Each method decodes its request, calls the snapshotter and encodes the answer; nothing else.
Errors are translated here, at the edge: a ``StarlightError`` becomes a ``GRPCError`` with the
status its class names (NOT_FOUND, ALREADY_EXISTS, FAILED_PRECONDITION, INVALID_ARGUMENT...),
which containerd's proxy client maps back to the matching ``errdefs`` error. Anything else is
a bug and reaches containerd as UNKNOWN (grpclib's default).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Final, TypeVar

from google.protobuf import empty_pb2, timestamp_pb2
from grpclib.const import Status
from grpclib.exceptions import GRPCError
from grpclib.server import Stream

from starlight_core.errors import StarlightError
from starlight_worker.api import mount_pb2, snapshots_grpc
from starlight_worker.api import snapshots_pb2 as pb
from starlight_worker.snapshotter.model import Kind, Mount, SnapshotInfo
from starlight_worker.snapshotter.snapshotter import Snapshotter

__all__ = ["SnapshotsService", "grpc_errors", "info_from_pb", "info_to_pb"]

# Infos per List response message: keeps each message small whatever the number of snapshots.
LIST_BATCH: Final = 100

_NS_PER_S: Final = 1_000_000_000

_Req = TypeVar("_Req")


@contextmanager
def grpc_errors() -> Iterator[None]:
    """Re-raise starlight errors as the gRPC status containerd expects."""
    try:
        yield
    except StarlightError as exc:
        raise GRPCError(Status(exc.grpc_status), str(exc)) from exc


def _timestamp(ns: int) -> timestamp_pb2.Timestamp:
    return timestamp_pb2.Timestamp(seconds=ns // _NS_PER_S, nanos=ns % _NS_PER_S)


def info_to_pb(info: SnapshotInfo) -> pb.Info:
    return pb.Info(
        name=info.name,
        parent=info.parent,
        kind=int(info.kind),  # type: ignore[arg-type]
        created_at=_timestamp(info.created_ns),
        updated_at=_timestamp(info.updated_ns),
        labels=dict(info.labels),
    )


def info_from_pb(message: pb.Info) -> SnapshotInfo:
    """The fields of an Update request's info (kind and times are not client-settable)."""
    kind = Kind(message.kind) if message.kind in Kind._value2member_map_ else Kind.ACTIVE
    return SnapshotInfo(
        name=message.name,
        kind=kind,
        parent=message.parent,
        labels=dict(message.labels),
        created_ns=message.created_at.seconds * _NS_PER_S + message.created_at.nanos,
        updated_ns=message.updated_at.seconds * _NS_PER_S + message.updated_at.nanos,
    )


def _mounts_to_pb(mounts: list[Mount]) -> list[mount_pb2.Mount]:
    return [
        mount_pb2.Mount(type=m.type, source=m.source, target=m.target, options=list(m.options))
        for m in mounts
    ]


async def _request(stream: Stream[_Req, Any]) -> _Req:
    request = await stream.recv_message()
    if request is None:
        raise GRPCError(Status.INVALID_ARGUMENT, "missing request message")
    return request


class SnapshotsService(snapshots_grpc.SnapshotsBase):
    """Serves one snapshotter; the requests' ``snapshotter`` field is ignored (a proxy plugin
    is one snapshotter)."""

    def __init__(self, snapshotter: Snapshotter) -> None:
        self.snapshotter = snapshotter

    async def Prepare(
        self, stream: Stream[pb.PrepareSnapshotRequest, pb.PrepareSnapshotResponse]
    ) -> None:
        request = await _request(stream)
        with grpc_errors():
            mounts = await self.snapshotter.prepare(
                request.key, request.parent, dict(request.labels)
            )
        await stream.send_message(pb.PrepareSnapshotResponse(mounts=_mounts_to_pb(mounts)))

    async def View(self, stream: Stream[pb.ViewSnapshotRequest, pb.ViewSnapshotResponse]) -> None:
        request = await _request(stream)
        with grpc_errors():
            mounts = await self.snapshotter.view(request.key, request.parent, dict(request.labels))
        await stream.send_message(pb.ViewSnapshotResponse(mounts=_mounts_to_pb(mounts)))

    async def Mounts(self, stream: Stream[pb.MountsRequest, pb.MountsResponse]) -> None:
        request = await _request(stream)
        with grpc_errors():
            mounts = await self.snapshotter.mounts(request.key)
        await stream.send_message(pb.MountsResponse(mounts=_mounts_to_pb(mounts)))

    async def Commit(self, stream: Stream[pb.CommitSnapshotRequest, empty_pb2.Empty]) -> None:
        request = await _request(stream)
        with grpc_errors():
            await self.snapshotter.commit(request.name, request.key, dict(request.labels))
        await stream.send_message(empty_pb2.Empty())

    async def Remove(self, stream: Stream[pb.RemoveSnapshotRequest, empty_pb2.Empty]) -> None:
        request = await _request(stream)
        with grpc_errors():
            await self.snapshotter.remove(request.key)
        await stream.send_message(empty_pb2.Empty())

    async def Stat(self, stream: Stream[pb.StatSnapshotRequest, pb.StatSnapshotResponse]) -> None:
        request = await _request(stream)
        with grpc_errors():
            info = await self.snapshotter.stat(request.key)
        await stream.send_message(pb.StatSnapshotResponse(info=info_to_pb(info)))

    async def Update(
        self, stream: Stream[pb.UpdateSnapshotRequest, pb.UpdateSnapshotResponse]
    ) -> None:
        request = await _request(stream)
        paths = list(request.update_mask.paths) if request.HasField("update_mask") else []
        with grpc_errors():
            info = await self.snapshotter.update(info_from_pb(request.info), paths)
        await stream.send_message(pb.UpdateSnapshotResponse(info=info_to_pb(info)))

    async def List(self, stream: Stream[pb.ListSnapshotsRequest, pb.ListSnapshotsResponse]) -> None:
        request = await _request(stream)
        with grpc_errors():
            infos = await self.snapshotter.walk(list(request.filters))
        for start in range(0, len(infos), LIST_BATCH):
            batch = infos[start : start + LIST_BATCH]
            await stream.send_message(pb.ListSnapshotsResponse(info=[info_to_pb(i) for i in batch]))

    async def Usage(self, stream: Stream[pb.UsageRequest, pb.UsageResponse]) -> None:
        request = await _request(stream)
        with grpc_errors():
            usage = await self.snapshotter.usage(request.key)
        await stream.send_message(pb.UsageResponse(size=usage.size, inodes=usage.inodes))

    async def Cleanup(self, stream: Stream[pb.CleanupRequest, empty_pb2.Empty]) -> None:
        await _request(stream)
        with grpc_errors():
            await self.snapshotter.cleanup()
        await stream.send_message(empty_pb2.Empty())
