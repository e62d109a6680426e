"""Helpers for the snapshotter tests: a client shaped like containerd's proxy snapshotter,
status assertions, and real mounts (root only)."""

from __future__ import annotations

import contextlib
import hashlib
import os
import stat
import subprocess
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import anyio.from_thread
import pytest
from google.protobuf import field_mask_pb2
from grpclib.const import Status
from grpclib.exceptions import GRPCError

from starlight_worker.api import mount_pb2, snapshots_grpc
from starlight_worker.api import snapshots_pb2 as pb
from starlight_worker.snapshotter import Snapshotter, snapshots_server

# containerd's testsuite puts this label on everything so its GC keeps the snapshots.
GC_ROOT = {"containerd.io/gc.root": "2024-01-01T00:00:00Z"}


class Client:
    """The calls containerd's ``snapshots/proxy`` client makes, one method per RPC."""

    def __init__(self, stub: snapshots_grpc.SnapshotsStub, name: str = "starlight") -> None:
        self.stub = stub
        self.name = name

    async def prepare(
        self, key: str, parent: str = "", labels: Mapping[str, str] | None = None
    ) -> list[mount_pb2.Mount]:
        response = await self.stub.Prepare(
            pb.PrepareSnapshotRequest(
                snapshotter=self.name, key=key, parent=parent, labels=dict(labels or GC_ROOT)
            )
        )
        return list(response.mounts)

    async def view(
        self, key: str, parent: str = "", labels: Mapping[str, str] | None = None
    ) -> list[mount_pb2.Mount]:
        response = await self.stub.View(
            pb.ViewSnapshotRequest(
                snapshotter=self.name, key=key, parent=parent, labels=dict(labels or GC_ROOT)
            )
        )
        return list(response.mounts)

    async def mounts(self, key: str) -> list[mount_pb2.Mount]:
        response = await self.stub.Mounts(pb.MountsRequest(snapshotter=self.name, key=key))
        return list(response.mounts)

    async def commit(self, name: str, key: str, labels: Mapping[str, str] | None = None) -> None:
        await self.stub.Commit(
            pb.CommitSnapshotRequest(
                snapshotter=self.name, name=name, key=key, labels=dict(labels or GC_ROOT)
            )
        )

    async def remove(self, key: str) -> None:
        await self.stub.Remove(pb.RemoveSnapshotRequest(snapshotter=self.name, key=key))

    async def stat(self, key: str) -> pb.Info:
        response = await self.stub.Stat(pb.StatSnapshotRequest(snapshotter=self.name, key=key))
        return response.info

    async def update(self, info: pb.Info, *paths: str) -> pb.Info:
        request = pb.UpdateSnapshotRequest(snapshotter=self.name, info=info)
        if paths:
            request.update_mask.CopyFrom(field_mask_pb2.FieldMask(paths=list(paths)))
        response = await self.stub.Update(request)
        return response.info

    async def walk(self, *filters: str) -> list[pb.Info]:
        responses = await self.stub.List(
            pb.ListSnapshotsRequest(snapshotter=self.name, filters=list(filters))
        )
        return [info for response in responses for info in response.info]

    async def usage(self, key: str) -> pb.UsageResponse:
        return await self.stub.Usage(pb.UsageRequest(snapshotter=self.name, key=key))

    async def cleanup(self) -> None:
        await self.stub.Cleanup(pb.CleanupRequest(snapshotter=self.name))


@contextlib.contextmanager
def raises_status(status: Status, match: str | None = None) -> Iterator[None]:
    """Expect a ``GRPCError`` with exactly ``status`` (and ``match`` in its message)."""
    with pytest.raises(GRPCError) as caught:
        yield
    assert caught.value.status is status, f"{caught.value.status}: {caught.value.message}"
    if match is not None:
        assert match in (caught.value.message or "")


# --- real mounts (root) --------------------------------------------------------------------


def mount_all(mounts: Sequence[mount_pb2.Mount], target: Path) -> None:
    """Perform ``mounts`` on ``target`` as containerd's ``mount.All`` does."""
    for m in mounts:
        command = ["mount"]
        if m.type != "bind":
            command += ["-t", m.type]
        command += ["-o", ",".join(m.options), m.source, str(target)]
        subprocess.run(command, check=True, capture_output=True, text=True)


def unmount(target: Path) -> None:
    subprocess.run(["umount", str(target)], check=True, capture_output=True)


@contextlib.contextmanager
def mounted(mounts: Sequence[mount_pb2.Mount], target: Path) -> Iterator[Path]:
    target.mkdir(parents=True, exist_ok=True)
    mount_all(mounts, target)
    try:
        yield target
    finally:
        unmount(target)


def tree(root: Path) -> dict[str, tuple[object, ...]]:
    """Every entry under ``root``: type, permission bits, owner, and content or link target
    (what containerd's fstest compares)."""
    result: dict[str, tuple[object, ...]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in sorted(dirnames + filenames):
            path = Path(dirpath, name)
            st = path.lstat()
            rel = str(path.relative_to(root))
            mode = stat.S_IMODE(st.st_mode)
            if stat.S_ISLNK(st.st_mode):
                detail: object = ("symlink", os.readlink(path))
            elif stat.S_ISREG(st.st_mode):
                detail = ("file", hashlib.sha256(path.read_bytes()).hexdigest())
            elif stat.S_ISDIR(st.st_mode):
                detail = ("dir",)
            else:
                detail = ("other", stat.S_IFMT(st.st_mode), st.st_rdev)
            result[rel] = (detail, mode, st.st_uid, st.st_gid)
    return result


@contextlib.contextmanager
def served_in_thread(
    snapshotter: Snapshotter, path: str
) -> Iterator[anyio.from_thread.BlockingPortal]:
    """Serve ``snapshotter`` on ``path`` from an asyncio loop in a background thread, for
    synchronous tests driving a real containerd; its hooks run in that loop."""
    with (
        anyio.from_thread.start_blocking_portal(backend="asyncio") as portal,
        portal.wrap_async_context_manager(snapshots_server(snapshotter, path)),
    ):
        yield portal
