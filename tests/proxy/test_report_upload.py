"""The worker's side of reports against the proxy app (``httpx.ASGITransport``): the tracer
uploads finished traces, files each as sent, rejected (with the reason) or still pending, and
repeats safely; and it finishes the traces it finds on disk after a restart.

The FUSE server is replaced by a stand-in here (``tests/e2e/test_optimizer.py`` runs the real
one): these tests are about files on disk and HTTP.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

import httpx
import pytest

from starlight_core import wire
from starlight_core.errors import ProxyUnavailable
from starlight_core.proxy_client import ProxyClient
from starlight_core.trace import AccessKind, FileAccess, TracedImage, decode, encode
from starlight_proxy.app import create_app
from starlight_proxy.config import ProxyConfig
from starlight_proxy.store import ImageRecord, SQLMetadataStore
from starlight_worker.fs import AsyncFsClient
from starlight_worker.fs.protocol import Access, AttachedLayerInfo
from starlight_worker.store import Store
from starlight_worker.tracer import Tracer
from tests.proxy.test_report_store import APP_LAYERS, make_trace
from tests.proxy.test_store import AMD64, index_image

pytestmark = pytest.mark.anyio


class FakeFused:
    """What the tracer asks of the FUSE server, answered from memory."""

    def __init__(self) -> None:
        self.records: list[Access] = []
        self.served: list[str] = []
        self.tracing = False

    async def trace_drain(self) -> list[Access]:
        records, self.records = self.records, []
        return records

    async def trace_on(self) -> None:
        self.tracing = True

    async def trace_off(self) -> None:
        self.tracing = False

    async def list(self) -> list[AttachedLayerInfo]:
        return [AttachedLayerInfo(key, "/x", "/y", 0, True, 1) for key in self.served]

    async def detach(self, key: str) -> bool:
        if key not in self.served:
            return False
        self.served.remove(key)
        return True


async def always(_: str) -> bool:
    return True


@pytest.fixture
async def app_image(store: SQLMetadataStore) -> ImageRecord:
    return await index_image(store, APP_LAYERS, label="app")


@pytest.fixture
async def proxy(store: SQLMetadataStore) -> AsyncIterator[ProxyClient]:
    app = create_app(ProxyConfig(), store=store)
    async with ProxyClient("http://proxy.test", transport=httpx.ASGITransport(app=app)) as client:
        yield client


@pytest.fixture
def tracer(tmp_path: Path) -> Tracer:
    worker_store = Store(tmp_path / "worker")
    fused = cast(AsyncFsClient, FakeFused())
    return Tracer(
        root=tmp_path / "worker",
        store=worker_store,
        fused=fused,
        fuse_mountpoint=tmp_path / "mnt",
        snapshot_exists=always,
        worker="node-1",
    )


def finished(tracer: Tracer, data: bytes, name: str) -> Path:
    tracer.directory.mkdir(parents=True, exist_ok=True)
    path = tracer.directory / f"{name}.jsonl"
    path.write_bytes(data)
    return path


async def test_report_files_each_trace_by_the_proxys_answer(
    tracer: Tracer, proxy: ProxyClient, app_image: ImageRecord, store: SQLMetadataStore
) -> None:
    good = make_trace(app_image, [(10, 0, "a/2"), (20, 1, "b/1")])
    stored_before = make_trace(app_image, [(10, 0, "a/1")])
    assert (await proxy.report(encode(stored_before))).stored
    bad = make_trace(app_image, [(10, 0, "no/such/file")])
    stranger = make_trace(app_image, [(10, 0, "a/1")], reference="127.0.0.1:5000/elsewhere:latest")
    for trace in (good, stored_before, bad, stranger):
        finished(tracer, encode(trace), trace.trace_id)

    outcome = await tracer.report(proxy)
    assert (outcome.sent, outcome.already_sent, outcome.pending) == (1, 1, 1)
    assert outcome.images == (f"{app_image.name}@{app_image.digest}",)
    (rejected,) = [r for r in outcome.rejected if "rejected" in r]
    assert bad.trace_id in rejected
    assert "no/such/file" in rejected
    (kept,) = [r for r in outcome.rejected if "kept for later" in r]
    assert stranger.trace_id in kept
    assert "not known to this proxy" in kept

    sent = {p.stem for p in tracer.sent_dir.glob("*.jsonl")}
    assert sent == {good.trace_id, stored_before.trace_id}
    assert (tracer.rejected_dir / f"{bad.trace_id}.jsonl").exists()
    assert "no/such/file" in (tracer.rejected_dir / f"{bad.trace_id}.reason").read_text()
    assert [p.stem for p in tracer.pending()] == [stranger.trace_id]
    traces = await store.list_traces(app_image.id)
    assert {t.trace_id for t in traces} == {stored_before.trace_id, good.trace_id}

    # Again: only the pending one is tried, and kept again.
    again = await tracer.report(proxy)
    assert (again.sent, again.already_sent, again.pending) == (0, 0, 1)
    # An upload repeated (a crash before the file moved) is harmless.
    finished(tracer, encode(good), good.trace_id)
    assert (await tracer.report(proxy)).already_sent == 1


async def test_an_unreachable_proxy_moves_nothing(tracer: Tracer, app_image: ImageRecord) -> None:
    trace = make_trace(app_image, [(10, 0, "a/2")])
    path = finished(tracer, encode(trace), trace.trace_id)
    async with ProxyClient("http://127.0.0.1:9", timeout=2.0) as unreachable:
        with pytest.raises(ProxyUnavailable):
            await tracer.report(unreachable)
    assert path.exists()
    assert tracer.pending() == [path]


async def test_traces_found_after_a_restart_are_finished(tmp_path: Path) -> None:
    """A daemon restarted with the optimizer off finishes the traces it was keeping: sorted,
    deduplicated, torn lines dropped; a container the FUSE server no longer serves is
    forgotten (its views are gone)."""
    root = tmp_path / "worker"
    traces = root / "traces"
    traces.mkdir(parents=True)
    image = TracedImage(
        reference="127.0.0.1:5000/app:latest",
        manifest_digest=APP_LAYERS[0].layer.digest,
        platform=AMD64,
    )
    trace_ids = [str(uuid.uuid4()), str(uuid.uuid4())]
    state: dict[str, Any] = {
        "version": 1,
        "optimizer": {"enabled": False, "group": None},
        "containers": [
            {
                "snapshot": f"ns/{n}/container-{n}",
                "trace_id": trace_id,
                "container_id": f"container-{n}",
                "image": wire.unstructure(image),
                "start_ns": 1_000,
                "started_at": "2024-05-01T12:00:00Z",
                "group": "shop",
                "tracing": True,
                "aliases": [
                    {"key": f"sha256-{n}@x", "layer": f"sha256-{n}", "index": 0, "attached_ns": 5}
                ],
            }
            for n, trace_id in enumerate(trace_ids)
        ],
    }
    (traces / "state.json").write_text(wire.dumps(state).decode())
    lines = [
        FileAccess(300, 1, "b/1", AccessKind.READ),
        FileAccess(100, 0, "a/1", AccessKind.GETATTR),
        FileAccess(200, 0, "a/1", AccessKind.OPEN),  # a later access to the same file
    ]
    partial = b"".join(wire.dumps(a) + b"\n" for a in lines) + b'{"offset_ns": 4'
    (traces / f"{trace_ids[0]}.partial").write_bytes(partial)

    fused = FakeFused()
    fused.served = ["sha256-1@x"]  # the first container's view is gone, the second's is not
    tracer = Tracer(
        root=root,
        store=Store(root),
        fused=cast(AsyncFsClient, fused),
        fuse_mountpoint=tmp_path / "mnt",
        snapshot_exists=always,
        worker="node-1",
    )
    await tracer.load()
    assert not tracer.state.enabled
    (path,) = tracer.pending()
    trace = decode(path.read_bytes())
    assert trace.trace_id == trace_ids[0]
    assert [(a.offset_ns, a.path, a.kind) for a in trace.accesses] == [
        (100, "a/1", AccessKind.GETATTR),
        (300, "b/1", AccessKind.READ),
    ]
    assert trace.header.group == "shop"
    assert trace.header.worker == "node-1"
    assert trace.header.started_at == datetime(2024, 5, 1, 12, tzinfo=UTC)
    assert not (traces / f"{trace_ids[0]}.partial").exists()
    # The second container still runs on its view: kept, its (empty) trace finished.
    assert tracer.aliases() == ["sha256-1@x"]
    assert len(tracer.pending()) == 1
