"""Workload images for real: built twice from pinned packages (same digests), and started with
stock containerd (``ctr run --net-host``) until their readiness probe answers.

Building needs root (mmdebstrap, chroot, namespaces) and the package cache or the network.
Big images take minutes to build: they are only started here when already in the cache, or
when ``STARLIGHT_WORKLOAD_IMAGES`` asks (``build``: build what is missing; ``all``: also start
the two v2 images of each workload).
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
import tarfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from benchmarks.images.apt import AptError
from benchmarks.images.builder import LOCK_PATH, Builder, Layer
from benchmarks.images.debian import CACHE
from benchmarks.images.smoke import run_workload
from benchmarks.images.workloads import BUILDS, WORKLOADS, publish, tag_for
from benchmarks.services.containerd import Containerd
from benchmarks.services.registry import Registry

pytestmark = pytest.mark.e2e

_MODE = os.environ.get("STARLIGHT_WORKLOAD_IMAGES", "")


def _needs_tools() -> None:
    for tool in ("mmdebstrap", "unshare", "chroot", "dpkg-deb"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed")


@pytest.fixture
def lock_copy(tmp_path: Path) -> Path:
    """Builds in tests resolve into a copy: the committed lock is never rewritten by them."""
    path = tmp_path / "workloads.lock.json"
    shutil.copy(LOCK_PATH, path)
    return path


def _build(
    builder: Builder, name: str, version: str = "v1", kind: str = "app-update"
) -> list[Layer]:
    try:
        return builder.build(WORKLOADS[name], version, kind)
    except AptError as exc:
        if "left the archive" in str(exc) or "failed (" in str(exc):
            pytest.skip(f"pinned packages not available (no cache, no network?): {exc}")
        raise


def _members(layer: Layer) -> dict[str, tarfile.TarInfo]:
    with tarfile.open(layer.tar) as archive:
        return {m.name.rstrip("/"): m for m in archive.getmembers()}


def test_rebuilding_an_image_gives_the_same_digests(tmp_path: Path, lock_copy: Path) -> None:
    """redis v1 built again from scratch (base bootstrapped again, every step run again) in a
    separate store, matches the build in the shared cache (built now if missing) byte for
    byte."""
    _needs_tools()
    first = _build(Builder(CACHE, lock_path=lock_copy), "redis")
    try:
        second = _build(Builder(CACHE, store=tmp_path / "fresh", lock_path=lock_copy), "redis")
    finally:
        shutil.rmtree(tmp_path / "fresh", ignore_errors=True)  # a base tree and its layers
    assert [layer.diff_id for layer in first] == [layer.diff_id for layer in second]
    assert [layer.digest for layer in first] == [layer.digest for layer in second]
    assert len(first) == 1 + len(WORKLOADS["redis"].steps)

    base, app, entrypoint = (_members(layer) for layer in first)
    # The base looks like debian:bookworm: deb.debian.org sources, no device nodes, no
    # build-host files, no apt lists or logs.
    assert "etc/apt/sources.list.d/debian.sources" in base
    assert not [name for name in base if name.startswith("dev/")]
    for leftover in (
        "etc/hostname",
        "etc/resolv.conf",
        "var/log/dpkg.log",
        "var/cache/ldconfig/aux-cache",
    ):
        assert leftover not in base
    assert not [n for n in base if n.startswith("var/lib/apt/lists/") and "/." not in n]
    assert base["usr/bin/apt-get"].isfile()
    assert base["bin"].issym()
    assert base["bin"].linkname == "usr/bin"
    # The application layer: the package's files with their owners, the cleanup as a
    # Dockerfile does it, nothing from the build host.
    assert app["usr/bin/redis-check-rdb"].isfile()
    assert app["etc/redis/redis.conf"].uid != 0
    assert app["data"].uid == app["etc/redis/redis.conf"].uid
    assert "etc/passwd" in app
    assert not [
        n for n in app if n.startswith(("var/log/apt/", "tmp/", "var/cache/apt/archives/partial/"))
    ]
    assert all(info.mtime <= first[1].created for info in app.values())
    assert all((info.uname, info.gname) == ("", "") for info in app.values())
    assert entrypoint["usr/local/bin/docker-entrypoint.sh"].mode == 0o755


# --- running them ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def containerd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Containerd]:
    with Containerd(tmp_path_factory.mktemp("containerd")) as instance:
        yield instance


def _start(
    name: str,
    version: str,
    kind: str,
    registry: Registry,
    containerd: Containerd,
    workdir: Path,
    *,
    convert: bool = False,
) -> None:
    workload = WORKLOADS[name]
    repository = f"wl-{uuid.uuid4().hex[:8]}/{name}"
    image = asyncio.run(
        publish(name, version, registry.host, kind=kind, repository=repository, convert=convert)
    )
    references = [image.original] + ([image.starlight] if image.starlight else [])
    for reference in references:
        containerd.ctr("images", "pull", "--plain-http", str(reference), timeout=900)
        ready = run_workload(
            containerd, reference, workload, log=workdir / f"{uuid.uuid4().hex}.log", timeout=180
        )
        assert ready.log_seconds is not None, f"no ready line /{workload.ready_log}/ in output"


def test_redis_starts_with_stock_containerd(
    registry: Registry, containerd: Containerd, tmp_path: Path
) -> None:
    """Pushed, converted, pulled by stock containerd, both started with --net-host: the
    PING probe answers +PONG and the ready line appears (original and Starlight format)."""
    _needs_tools()
    _build(Builder(CACHE), "redis")
    _start("redis", "v1", "app-update", registry, containerd, tmp_path, convert=True)


@pytest.mark.parametrize("name", sorted(WORKLOADS))
def test_workload_starts(
    name: str, registry: Registry, containerd: Containerd, tmp_path: Path
) -> None:
    _needs_tools()
    builder = Builder(CACHE)
    builds = list(BUILDS) if _MODE == "all" else [("v1", "app-update")]
    missing = [
        tag_for(version, kind)
        for version, kind in builds
        if not builder.cached(WORKLOADS[name], version, kind)
    ]
    if missing and _MODE not in ("build", "all"):
        pytest.skip(f"{name}:{','.join(missing)} not built (STARLIGHT_WORKLOAD_IMAGES=build)")
    for version, kind in builds:
        _build(builder, name, version, kind)
        _start(name, version, kind, registry, containerd, tmp_path)


def _file_digests(layers: list[Layer]) -> dict[str, int]:
    """Content digest → size of every regular file the image's layers carry."""
    found: dict[str, int] = {}
    for layer in layers:
        with tarfile.open(layer.tar) as archive:
            for member in archive:
                if member.isfile() and member.size:
                    handle = archive.extractfile(member)
                    assert handle is not None
                    found[hashlib.sha256(handle.read()).hexdigest()] = member.size
    return found


@pytest.mark.parametrize("name", ["redis", "nginx", "memcached", "python-flask"])
def test_updates_change_digests_not_most_files(name: str) -> None:
    """The app update keeps v1's base layer; the rebuild changes every layer digest, yet most
    of its content (by bytes) is content v1 already had — what Starlight must not resend."""
    builder = Builder(CACHE)
    workload = WORKLOADS[name]
    if not all(builder.cached(workload, version, kind) for version, kind in BUILDS):
        pytest.skip(f"{name} is not built (python -m benchmarks.images.workloads --build {name})")
    v1, update, rebuild = (builder.build(workload, version, kind) for version, kind in BUILDS)
    assert update[0].digest == v1[0].digest
    assert update[-1].digest != v1[-1].digest
    assert not {layer.digest for layer in rebuild} & {layer.digest for layer in v1}
    old, new = _file_digests(v1), _file_digests(rebuild)
    shared = sum(size for digest, size in new.items() if digest in old)
    assert shared / sum(new.values()) > 0.7
    assert shared < sum(new.values()), "the rebuild carries some new content"
