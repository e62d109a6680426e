"""Our containerd API modules: wire facts equal containerd 1.6's, imports stay light, and the
committed generated files match the .proto sources."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

from starlight_worker.api import (
    content_pb2,
    descriptor_pb2,
    images_pb2,
    leases_pb2,
    mount_pb2,
    snapshots_pb2,
)

REPO = Path(__file__).resolve().parents[3]


def fields(message: type) -> dict[str, int]:
    return {f.name: f.number for f in message.DESCRIPTOR.fields}  # type: ignore[attr-defined]


def methods(module: object, service: str) -> dict[str, tuple[bool, bool]]:
    descriptor = module.DESCRIPTOR.services_by_name[service]  # type: ignore[attr-defined]
    return {m.name: (m.client_streaming, m.server_streaming) for m in descriptor.methods}


def test_snapshots_wire_facts() -> None:
    service = snapshots_pb2.DESCRIPTOR.services_by_name["Snapshots"]
    assert service.full_name == "containerd.services.snapshots.v1.Snapshots"
    assert methods(snapshots_pb2, "Snapshots") == {
        "Prepare": (False, False),
        "View": (False, False),
        "Mounts": (False, False),
        "Commit": (False, False),
        "Remove": (False, False),
        "Stat": (False, False),
        "Update": (False, False),
        "List": (False, True),
        "Usage": (False, False),
        "Cleanup": (False, False),
    }
    assert fields(snapshots_pb2.Info) == {
        "name": 1,
        "parent": 2,
        "kind": 3,
        "created_at": 4,
        "updated_at": 5,
        "labels": 6,
    }
    assert fields(snapshots_pb2.PrepareSnapshotRequest) == {
        "snapshotter": 1,
        "key": 2,
        "parent": 3,
        "labels": 4,
    }
    assert fields(snapshots_pb2.CommitSnapshotRequest) == {
        "snapshotter": 1,
        "name": 2,
        "key": 3,
        "labels": 4,
    }
    assert fields(snapshots_pb2.UpdateSnapshotRequest) == {
        "snapshotter": 1,
        "info": 2,
        "update_mask": 3,
    }
    assert fields(snapshots_pb2.UsageResponse) == {"size": 1, "inodes": 2}
    assert fields(snapshots_pb2.ListSnapshotsRequest) == {"snapshotter": 1, "filters": 2}
    assert (snapshots_pb2.VIEW, snapshots_pb2.ACTIVE, snapshots_pb2.COMMITTED) == (1, 2, 3)


def test_types_wire_facts() -> None:
    assert mount_pb2.Mount.DESCRIPTOR.full_name == "containerd.types.Mount"
    assert fields(mount_pb2.Mount) == {"type": 1, "source": 2, "target": 3, "options": 4}
    assert descriptor_pb2.Descriptor.DESCRIPTOR.full_name == "containerd.types.Descriptor"
    assert fields(descriptor_pb2.Descriptor) == {
        "media_type": 1,
        "digest": 2,
        "size": 3,
        "annotations": 5,
    }


def test_content_images_leases_wire_facts() -> None:
    assert methods(content_pb2, "Content") == {
        "Info": (False, False),
        "Update": (False, False),
        "List": (False, True),
        "Delete": (False, False),
        "Read": (False, True),
        "Status": (False, False),
        "ListStatuses": (False, False),
        "Write": (True, True),
        "Abort": (False, False),
    }
    assert fields(content_pb2.WriteContentRequest) == {
        "action": 1,
        "ref": 2,
        "total": 3,
        "expected": 4,
        "offset": 5,
        "data": 6,
        "labels": 7,
    }
    assert (content_pb2.STAT, content_pb2.WRITE, content_pb2.COMMIT) == (0, 1, 2)
    assert set(methods(images_pb2, "Images")) == {"Get", "List", "Create", "Update", "Delete"}
    assert fields(images_pb2.Image) == {
        "name": 1,
        "labels": 2,
        "target": 3,
        "created_at": 7,
        "updated_at": 8,
    }
    assert set(methods(leases_pb2, "Leases")) == {
        "Create",
        "Delete",
        "List",
        "AddResource",
        "DeleteResource",
        "ListResources",
    }
    assert fields(leases_pb2.CreateRequest) == {"id": 1, "labels": 3}
    assert images_pb2.DESCRIPTOR.package == "containerd.services.images.v1"
    assert leases_pb2.DESCRIPTOR.package == "containerd.services.leases.v1"
    assert content_pb2.DESCRIPTOR.package == "containerd.services.content.v1"


def test_api_imports_no_fuse() -> None:
    code = (
        "import sys\n"
        "from starlight_worker.api import content_grpc, images_grpc, leases_grpc, snapshots_grpc\n"
        "heavy = [m for m in sys.modules if m.split('.')[0] in ('fuse', 'anyio', 'httpx')"
        " or m.startswith('starlight_worker.snapshotter')]\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.skipif(
    importlib.util.find_spec("grpc_tools") is None, reason="grpcio-tools not installed"
)
def test_generated_files_are_up_to_date() -> None:
    result = subprocess.run(
        [str(REPO / "scripts" / "gen-protos"), "--check"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
