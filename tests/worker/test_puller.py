"""The worker's resilience logic without real services: background retries of pulls, the
remote-snapshot decisions, the reaper's reading of the mount table, re-attaching after a
restart, and the metrics endpoint. (With a real proxy and store: ``test_puller_proxy.py``;
with everything real: ``tests/e2e/test_resilience*.py``.)"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any, cast

import anyio
import attrs
import httpx
import pytest

from starlight_core.bundle import BundleHeader, ImageInfo
from starlight_core.digest import Digest, sha256_digest
from starlight_core.errors import ImageNotFound, InvalidInput, ProxyUnavailable, StarlightError
from starlight_core.layer.toc import TOC, LayerInfo
from starlight_core.platform import Platform
from starlight_core.reference import Reference
from starlight_worker.daemon import PullManager, retry_delay
from starlight_worker.fs import AsyncFsClient
from starlight_worker.fs.protocol import AttachedLayerInfo
from starlight_worker.layers import LABEL_IMAGE, LABEL_LAYER, StarlightLayers, fuse_layers_in_use
from starlight_worker.metrics import Metrics, parse_address, serve_metrics
from starlight_worker.puller import Pull, PullOptions
from starlight_worker.remote import (
    LABEL_CRI_IMAGE_REF,
    LABEL_CRI_LAYER_DIGEST,
    LABEL_CRI_MANIFEST_DIGEST,
    LABEL_STARGZ_DIGEST,
    LABEL_STARGZ_REFERENCE,
    LayerRequest,
    RemoteSnapshots,
    layer_request,
)
from starlight_worker.snapshotter import LABEL_SNAPSHOT_REF
from starlight_worker.store import LayerState, Store, layer_key

pytestmark = pytest.mark.anyio

MOUNTPOINT = Path("/var/lib/starlight/fuse")
KEY_A = "sha256-" + "a" * 64
KEY_B = "sha256-" + "b" * 64


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


# --- background retries -------------------------------------------------------------------------


def test_retry_delay_doubles_up_to_the_maximum() -> None:
    assert [retry_delay(n, 60) for n in range(1, 9)] == [1, 2, 4, 8, 16, 32, 60, 60]
    assert retry_delay(10_000, 2.5) == 2.5


@attrs.define(eq=False)
class FakePull:
    """A pull whose attempts follow a script: each entry is (became READY, error or None)."""

    options: PullOptions
    script: list[tuple[bool, StarlightError | None]]
    started: list[PullOptions]
    record_id: int | None = None
    usable: bool = False
    error: StarlightError | None = None
    done: anyio.Event = attrs.Factory(anyio.Event)
    ready: anyio.Event = attrs.Factory(anyio.Event)

    def __attrs_post_init__(self) -> None:
        self.record_id = self.options.record_id
        self.usable = self.options.record_id is not None

    async def run(self) -> None:
        self.started.append(self.options)
        usable, error = self.script.pop(0)
        if self.record_id is None:
            self.record_id = 7
        self.usable = self.usable or usable
        self.error = error
        self.ready.set()
        self.done.set()


def _options(**changes: Any) -> PullOptions:
    return attrs.evolve(
        PullOptions(Reference.parse("registry.test/app:v1"), Platform.parse("linux/amd64"), "ns"),
        **changes,
    )


async def test_a_pull_failing_after_ready_is_continued_in_the_background_until_it_completes() -> (
    None
):
    down = ProxyUnavailable("proxy down")
    script: list[tuple[bool, StarlightError | None]] = [
        (True, down),  # READY, then the proxy went away
        (False, down),  # the first retry: still down
        (False, None),  # the second: complete
    ]
    started: list[PullOptions] = []
    async with anyio.create_task_group() as tasks:
        manager = PullManager(
            tasks, lambda o: cast(Pull, FakePull(o, script, started)), backoff_max=0.05
        )
        first = manager.start(_options())
        with anyio.fail_after(10):
            while script:
                await anyio.sleep(0.01)
        assert first.error is down
    assert len(started) == 3
    assert started[0].register is True
    assert started[0].record_id is None
    # Continuations name the same store record and do not register the image again.
    assert [(o.register, o.record_id) for o in started[1:]] == [(False, 7), (False, 7)]
    assert manager.retrying == []


async def test_a_pull_failing_before_ready_is_not_retried() -> None:
    script: list[tuple[bool, StarlightError | None]] = [(False, ImageNotFound("no such image"))]
    started: list[PullOptions] = []
    async with anyio.create_task_group() as tasks:
        manager = PullManager(
            tasks, lambda o: cast(Pull, FakePull(o, script, started)), backoff_max=0.01
        )
        pull = manager.start(_options())
        await pull.done.wait()
        await anyio.sleep(0.1)
    assert len(started) == 1
    assert manager.retrying == []


async def test_retries_end_once_the_image_is_no_longer_wanted() -> None:
    down = ProxyUnavailable("proxy down")
    script: list[tuple[bool, StarlightError | None]] = [(True, down), (False, down)]
    started: list[PullOptions] = []
    asked: list[PullOptions] = []

    async def wanted(options: PullOptions) -> bool:
        asked.append(options)
        return False  # e.g. ctr-starlight reset removed the image meanwhile

    async with anyio.create_task_group() as tasks:
        manager = PullManager(
            tasks,
            lambda o: cast(Pull, FakePull(o, script, started)),
            backoff_max=0.01,
            wanted=wanted,
        )
        manager.start(_options())
        with anyio.fail_after(10):
            while not asked:
                await anyio.sleep(0.01)
        await anyio.sleep(0.1)
    assert len(started) == 1
    assert asked[0].record_id == 7
    assert manager.retrying == []


@attrs.define(eq=False)
class EndlessPull(FakePull):
    """READY at once, then streams forever (a slow link) until cancelled."""

    async def run(self) -> None:
        self.started.append(self.options)
        self.record_id, self.usable = 7, True
        self.ready.set()
        try:
            await anyio.sleep_forever()
        finally:
            self.done.set()


async def test_stop_all_cancels_pulls_under_way_and_retries_none() -> None:
    started: list[PullOptions] = []
    async with anyio.create_task_group() as tasks:
        manager = PullManager(
            tasks, lambda o: cast(Pull, EndlessPull(o, [], started)), backoff_max=0.01
        )
        pull = manager.start(_options())
        await pull.ready.wait()
        assert manager.active == [pull]
        with anyio.fail_after(10):
            assert await manager.stop_all() == ["registry.test/app:v1"]
        assert pull.done.is_set()
        await anyio.sleep(0.1)  # no retry comes
        assert manager.active == []
        assert manager.retrying == []
        assert await manager.stop_all() == []
    assert len(started) == 1


# --- the reaper's reading of the mount table -----------------------------------------------------


def _overlay(lowerdir: str) -> str:
    return (
        "120 25 0:52 / /run/c/rootfs rw,relatime shared:60 - overlay overlay "
        f"rw,lowerdir={lowerdir},upperdir=/x/up,workdir=/x/work,index=off"
    )


def test_fuse_layers_in_use_reads_absolute_lowerdirs() -> None:
    mountinfo = "\n".join(
        [
            "22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw",
            _overlay(f"{MOUNTPOINT}/{KEY_A}:/var/lib/starlight/layers/{KEY_B}/fs"),
            "130 25 0:60 / /var/lib/starlight/fuse rw - fuse.starlight starlight rw",
        ]
    )
    assert fuse_layers_in_use(mountinfo, MOUNTPOINT) == {KEY_A}


def test_fuse_layers_in_use_resolves_lowerdirs_containerd_made_relative() -> None:
    # containerd moved to the common parent (/var/lib/starlight) and named the lowers from it.
    relative = _overlay(f"fuse/{KEY_A}:snapshotter/snapshots/3/fs")
    assert KEY_A in fuse_layers_in_use(relative, MOUNTPOINT)
    # ... or to the FUSE mountpoint itself, when every lower is a FUSE layer.
    only_fuse = _overlay(f"{KEY_A}:{KEY_B}")
    assert {KEY_A, KEY_B} <= fuse_layers_in_use(only_fuse, MOUNTPOINT)


def test_fuse_layers_in_use_counts_a_view_as_a_use_of_its_layer() -> None:
    view = _overlay(f"{MOUNTPOINT}/{KEY_A}@c-1234")
    assert KEY_A in fuse_layers_in_use(view, MOUNTPOINT)


def test_fuse_layers_in_use_ignores_other_filesystems_and_other_paths() -> None:
    mountinfo = "\n".join(
        [
            "30 1 0:40 / /var/lib/starlight/fuse rw - fuse.starlight starlight rw,lowerdir=x",
            _overlay(f"/elsewhere/fuse/{KEY_A}:/var/lib/starlight/fusex/{KEY_B}"),
        ]
    )
    assert fuse_layers_in_use(mountinfo, MOUNTPOINT) == set()


# --- StarlightLayers: remote Prepare, recover, reap ----------------------------------------------


@attrs.define
class FakeStore:
    states: dict[str, LayerState]

    def state(self, key: str) -> LayerState:
        return self.states.get(key, LayerState.ABSENT)

    def layer_dir(self, key: str) -> Path:
        return Path("/var/lib/starlight/layers") / key


@attrs.define
class FakeFused:
    attached: dict[str, str] = attrs.Factory(dict)
    calls: list[tuple[str, str]] = attrs.Factory(list)

    async def attach(self, key: str, layer_dir: Path) -> Path:
        self.calls.append(("attach", key))
        self.attached[key] = str(layer_dir)
        return MOUNTPOINT / key

    async def detach(self, key: str) -> bool:
        self.calls.append(("detach", key))
        return self.attached.pop(key, None) is not None

    async def arrived(self, key: str, names: list[str]) -> int:
        self.calls.append(("arrived", key))
        return 0

    async def list(self) -> list[AttachedLayerInfo]:
        return [
            AttachedLayerInfo(key, directory, str(MOUNTPOINT / key), 1, False)
            for key, directory in self.attached.items()
        ]


def _layers(states: dict[str, LayerState], fused: FakeFused, **kwargs: Any) -> StarlightLayers:
    return StarlightLayers(
        cast(Store, FakeStore(states)), cast(AsyncFsClient, fused), MOUNTPOINT, **kwargs
    )


async def test_prepare_remote_adds_the_layer_the_hook_names_to_the_snapshot_labels() -> None:
    async def hook(key: str, parent: str, labels: Mapping[str, str]) -> Mapping[str, str] | None:
        return {LABEL_LAYER: KEY_A, LABEL_IMAGE: "registry.test/app:v1"}

    layers = _layers({}, FakeFused(), remote_fallback=hook)
    labels = {LABEL_SNAPSHOT_REF: "sha256:" + "c" * 64}
    assert await layers.prepare_remote("extract-1", "", labels) is True
    assert labels[LABEL_LAYER] == KEY_A
    # Labels the snapshotter cannot store again are declined rather than half-provided.
    assert await layers.prepare_remote("extract-2", "", MappingProxyType({})) is False


async def test_prepare_remote_declines_what_the_hook_declines() -> None:
    async def hook(key: str, parent: str, labels: Mapping[str, str]) -> Mapping[str, str] | None:
        return None

    layers = _layers({}, FakeFused(), remote_fallback=hook)
    labels: dict[str, str] = {}
    assert await layers.prepare_remote("extract-1", "", labels) is False
    assert labels == {}


async def test_recover_adopts_what_fused_serves_and_attaches_what_snapshots_need() -> None:
    fused = FakeFused(attached={KEY_A: "/l/a", f"{KEY_A}@view": "/l/a"})
    states = {KEY_A: LayerState.COMPLETE, KEY_B: LayerState.RECEIVING}
    layers = _layers(states, fused)
    adopted, attached = await layers.recover([KEY_A, KEY_B, "sha256-" + "d" * 64])
    assert adopted == [KEY_A]  # views belong to the tracer
    assert attached == [KEY_B]  # receiving, needed; the absent one is left alone
    assert layers.attached == [KEY_A, KEY_B]
    # Idempotent.
    assert await layers.recover([KEY_A, KEY_B]) == ([], [])


async def test_reap_detaches_complete_layers_only_once_unused_for_the_grace(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    fused = FakeFused()
    states = {KEY_A: LayerState.COMPLETE, KEY_B: LayerState.RECEIVING}
    metrics = Metrics()
    layers = _layers(states, fused, detach_grace=0.2, metrics=metrics)
    await layers.attach(KEY_A)
    await layers.attach(KEY_B)
    in_use = {KEY_A}
    monkeypatch.setattr(layers, "_mounted_fuse_layers", lambda: set(in_use))

    assert await layers.reap() == []  # first seen complete
    await anyio.sleep(0.3)
    assert await layers.reap() == []  # still mounted: kept, and the grace starts again
    in_use.clear()
    assert await layers.reap() == []  # unused, but not for long enough yet
    await anyio.sleep(0.3)
    assert await layers.reap() == [KEY_A]
    assert layers.attached == [KEY_B]  # never a layer still receiving
    assert metrics.value("starlight_worker_fuse_detached_total") == 1


# --- remote snapshots: which layer, or why not ----------------------------------------------------


def test_layer_request_reads_cri_and_stargz_labels() -> None:
    digest = "sha256:" + "1" * 64
    manifest = "sha256:" + "2" * 64
    cri = {
        LABEL_CRI_IMAGE_REF: "registry.test/app:v1",
        LABEL_CRI_LAYER_DIGEST: digest,
        LABEL_CRI_MANIFEST_DIGEST: manifest,
    }
    assert layer_request(cri) == LayerRequest(
        Reference.parse("registry.test/app:v1"), Digest(digest), Digest(manifest)
    )
    stargz = {LABEL_STARGZ_REFERENCE: "registry.test/app:v1", LABEL_STARGZ_DIGEST: digest}
    assert layer_request(stargz) == LayerRequest(
        Reference.parse("registry.test/app:v1"), Digest(digest)
    )
    assert layer_request({LABEL_CRI_IMAGE_REF: "registry.test/app:v1"}) is None
    with pytest.raises(InvalidInput):
        layer_request({LABEL_CRI_IMAGE_REF: "Not A Ref", LABEL_CRI_LAYER_DIGEST: digest})


def _toc(blob: str, diff: str) -> TOC:
    return TOC(
        LayerInfo(
            digest=sha256_digest(blob.encode()),
            size=1,
            diff_id=sha256_digest(diff.encode()),
            media_type="application/vnd.oci.image.layer.v1.tar+gzip",
        ),
        (),
    )


MANIFEST = sha256_digest(b"manifest")
HEADER = BundleHeader(
    bundle_id="0" * 64,
    images=(
        ImageInfo(
            reference="registry.test/app:v1",
            manifest_digest=MANIFEST,
            manifest_media_type="application/vnd.oci.image.manifest.v1+json",
            manifest="{}",
            config_digest=sha256_digest(b"config"),
            config="{}",
            platform="linux/amd64",
            layers=(0, 1),
        ),
    ),
    layers=(_toc("blob0", "diff0"), _toc("blob1", "diff1")),
    extents=(),
)


@attrs.define(eq=False)
class ScriptedPull:
    options: PullOptions
    header: BundleHeader | None
    error: StarlightError | None = None
    usable: bool = False
    record_id: int | None = None
    ready: anyio.Event = attrs.Factory(anyio.Event)
    done: anyio.Event = attrs.Factory(anyio.Event)


@attrs.define
class Starter:
    outcome: str = "header"
    started: list[PullOptions] = attrs.Factory(list)

    def start(self, options: PullOptions) -> Pull:
        self.started.append(options)
        pull = ScriptedPull(options, None)
        if self.outcome == "header":
            pull.header, pull.usable = HEADER, True
            pull.ready.set()
        elif self.outcome == "unknown":
            pull.error = ImageNotFound("proxy: image registry.test/app:v1 is not indexed")
            pull.ready.set()
            pull.done.set()
        return cast(Pull, pull)


def _labels(layer: str, ref: str = "registry.test/app:v1", **extra: str) -> dict[str, str]:
    return {
        LABEL_SNAPSHOT_REF: "sha256:" + "9" * 64,
        LABEL_CRI_IMAGE_REF: ref,
        LABEL_CRI_LAYER_DIGEST: str(sha256_digest(layer.encode())),
        **extra,
    }


@pytest.fixture
def metrics() -> Metrics:
    return Metrics()


def _fallbacks(metrics: Metrics, reason: str) -> float:
    return metrics.value("starlight_worker_remote_fallbacks_total", reason=reason)


async def test_remote_layers_of_a_known_image_are_named_with_one_pull(metrics: Metrics) -> None:
    starter = Starter()
    remote = RemoteSnapshots(starter, namespace="k8s.io", metrics=metrics)
    first = await remote.prepare("extract-1", "", _labels("blob0"))
    second = await remote.prepare("extract-2", "sha256:p", _labels("blob1"))
    assert first == {
        LABEL_LAYER: layer_key(sha256_digest(b"diff0")),
        LABEL_IMAGE: "registry.test/app:v1",
    }
    assert second is not None
    assert second[LABEL_LAYER] == layer_key(sha256_digest(b"diff1"))
    assert len(starter.started) == 1
    (options,) = starter.started
    assert options.register is False  # containerd's client registers the image itself
    assert options.namespace == "k8s.io"
    assert metrics.value("starlight_worker_remote_layers_total") == 2


async def test_an_image_the_proxy_does_not_know_falls_back_and_says_so(
    metrics: Metrics, caplog: pytest.LogCaptureFixture
) -> None:
    remote = RemoteSnapshots(Starter("unknown"), namespace="default", metrics=metrics)
    with caplog.at_level(logging.INFO, logger="starlight_worker.remote"):
        assert await remote.prepare("extract-1", "", _labels("blob0")) is None
    assert _fallbacks(metrics, "image_not_found") == 1
    (record,) = [r for r in caplog.records if "falling back" in r.getMessage()]
    assert record.levelno == logging.INFO
    assert "registry.test/app:v1" in record.getMessage()
    assert "not indexed" in record.getMessage()


async def test_declines_name_their_reason(metrics: Metrics) -> None:
    remote = RemoteSnapshots(Starter(), namespace="default", metrics=metrics)
    assert await remote.prepare("extract-1", "", {LABEL_SNAPSHOT_REF: "sha256:x"}) is None
    assert _fallbacks(metrics, "no_image_labels") == 1
    assert await remote.prepare("extract-2", "", _labels("other-blob")) is None
    assert _fallbacks(metrics, "layer_not_in_image") == 1
    other_manifest = {LABEL_CRI_MANIFEST_DIGEST: str(sha256_digest(b"another manifest"))}
    assert await remote.prepare("extract-3", "", _labels("blob0", **other_manifest)) is None
    assert _fallbacks(metrics, "manifest_differs") == 1
    bad = _labels("blob0", ref="Not A Reference")
    assert await remote.prepare("extract-4", "", bad) is None
    assert _fallbacks(metrics, "bad_labels") == 1


async def test_no_header_in_time_falls_back_while_the_pull_goes_on(metrics: Metrics) -> None:
    starter = Starter("silent")
    remote = RemoteSnapshots(starter, namespace="default", timeout=0.05, metrics=metrics)
    assert await remote.prepare("extract-1", "", _labels("blob0")) is None
    assert _fallbacks(metrics, "timeout") == 1


# --- the metrics endpoint ---------------------------------------------------------------------


def test_parse_address() -> None:
    assert parse_address("127.0.0.1:9863") == ("127.0.0.1", 9863)
    assert parse_address("[::1]:80") == ("::1", 80)
    for bad in ("9863", "host:", ":80", "host:99999", "host:port"):
        with pytest.raises(InvalidInput):
            parse_address(bad)


async def test_metrics_are_served_over_http() -> None:
    metrics = Metrics()
    metrics.remote_fallbacks.labels("image_not_found").inc(3)
    async with anyio.create_task_group() as tasks:
        port = await tasks.start(serve_metrics, metrics, "127.0.0.1:0")
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http:
            response = await http.get("/metrics")
            missing = await http.get("/other")
        tasks.cancel_scope.cancel()
    assert response.status_code == 200
    assert 'starlight_worker_remote_fallbacks_total{reason="image_not_found"} 3.0' in response.text
    assert missing.status_code == 404
