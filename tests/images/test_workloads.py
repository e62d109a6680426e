"""The workload catalogue, build plans and the pieces of the builder that need no root:
probes, the lock file, apt output parsing, the local repository, settling a tree."""

from __future__ import annotations

import http.server
import json
import os
import shutil
import socket
import socketserver
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from benchmarks.images import apt, rootfs
from benchmarks.images.builder import EPOCHS, LOCK_PATH, UNIVERSES, Builder, Layer
from benchmarks.images.lock import Deb, Lock, Wheel
from benchmarks.images.probe import Probe
from benchmarks.images.recipe import Apt, Copy, Pip, Version, Workload
from benchmarks.images.workloads import (
    BUILDS,
    ENTRYPOINT,
    QUICK,
    WORKLOADS,
    image_config,
    tag_for,
)
from starlight_core import oci, wire
from starlight_core.digest import Digest

# --- the catalogue --------------------------------------------------------------------------


def test_catalogue_covers_the_papers_kinds_of_image() -> None:
    assert len(WORKLOADS) >= 8
    for name in ("redis", "postgres", "nginx", "python-flask"):
        assert name in WORKLOADS
    assert {"openjdk", "node"} & set(WORKLOADS), "one large runtime"
    assert set(QUICK) >= {"redis", "nginx", "memcached"}
    assert len({w.paper for w in WORKLOADS.values()}) == len(WORKLOADS)


@pytest.mark.parametrize("name", sorted(WORKLOADS))
def test_each_workload_is_a_genuine_update(name: str) -> None:
    workload = WORKLOADS[name]
    v1, v2 = workload.versions["v1"], workload.versions["v2"]
    assert v1 != v2, "v2 must change some pinned version"
    assert set(v1.debian) == set(v2.debian)
    assert set(v1.pypi) == set(v2.pypi)
    for pins in (v1.debian, v2.debian):
        assert all(version and " " not in version for version in pins.values())
    assert workload.entrypoint == (ENTRYPOINT,)
    entrypoints = [s for s in workload.steps if isinstance(s, Copy) and ENTRYPOINT in s.files]
    assert len(entrypoints) == 1
    script, mode = entrypoints[0].files[ENTRYPOINT]
    assert mode == 0o755
    assert script.startswith("#!/bin/sh\nset -e\n")
    # Foreground, in place of the shell (signals reach the service), on $PORT.
    assert "exec " in script
    assert "PORT" in script or any(s.find("PORT") >= 0 for s in map(str, workload.steps))
    assert workload.run_env(1234) == ["PORT=1234"]
    probe = workload.probe_on(1234)
    assert probe.kind == "log" or probe.port == 1234


def test_missing_pin_is_refused() -> None:
    with pytest.raises(ValueError, match="no pinned version"):
        Workload(
            name="broken",
            description="",
            paper="",
            steps=(Apt(("redis-server", "redis-tools")),),
            versions={
                "v1": Version(debian={"redis-server": "1"}),
                "v2": Version(debian={"redis-server": "2", "redis-tools": "2"}),
            },
            entrypoint=("/x",),
            port=1,
            probe=Probe(kind="tcp", port=1),
            ready_log="x",
        )


def test_tags() -> None:
    assert [tag_for(v, k) for v, k in BUILDS] == ["v1", "v2-update", "v2-rebuild"]


# --- build plans ----------------------------------------------------------------------------


def test_plans_v1_app_update_and_rebuild(tmp_path: Path) -> None:
    builder = Builder(tmp_path, lock_path=tmp_path / "lock.json")
    python = WORKLOADS["python-flask"]
    v1 = builder.plan(python, "v1")
    update = builder.plan(python, "v2", "app-update")
    rebuild = builder.plan(python, "v2", "rebuild")
    assert len(v1) == len(update) == len(rebuild) == len(python.steps) + 1
    assert {(s.universe, s.epoch) for s in v1} == {(UNIVERSES["v1"], EPOCHS["v1"])}
    assert {(s.universe, s.epoch) for s in rebuild} == {(UNIVERSES["v2"], EPOCHS["v2"])}
    # The app update keeps the base and the apt layer (same pins: docker's cache would hit)
    # and rebuilds from the first step whose pins changed (pip) on.
    assert update[0] == v1[0]
    assert update[1] == v1[1]
    assert isinstance(update[2].step, Pip)
    assert (update[2].label, update[2].universe) == ("v2-update", UNIVERSES["v2"])
    assert all(s.label == "v2-update" for s in update[2:])
    with pytest.raises(ValueError, match="unknown kind"):
        builder.plan(python, "v2", "sideways")


def test_layer_keys_follow_docker_cache_semantics() -> None:
    """With the committed lock: the app update shares v1's base layer key, the rebuild shares
    no key with v1, and every key differs between workloads' application steps."""
    lock = Lock.load(LOCK_PATH)
    builder = Builder(Path("/nonexistent"), lock_path=LOCK_PATH)
    seen: dict[str, str] = {}
    for name, workload in WORKLOADS.items():
        keys = {}
        for version, kind in BUILDS:
            stages = builder.plan(workload, version, kind)
            parent = ""
            chain = []
            for stage in stages:
                key = builder._key(parent, builder._lock_key(workload, stage), stage)
                assert key is not None, f"{name} is not locked: build it once and commit the lock"

                chain.append(key)
                parent = key
            keys[tag_for(version, kind)] = chain
        assert keys["v1"][0] == keys["v2-update"][0]
        assert keys["v1"][-1] != keys["v2-update"][-1]
        assert not set(keys["v1"]) & set(keys["v2-rebuild"])
        assert not set(keys["v2-update"][1:]) & set(keys["v2-rebuild"])
        for key in keys["v1"][1:]:
            assert seen.setdefault(key, name) == name
        assert lock.sets[f"base/{UNIVERSES['v1']}"]


def test_lock_is_complete_and_consistent() -> None:
    lock = Lock.load(LOCK_PATH)
    assert set(lock.sets) >= {"base/release", "base/security"}
    for pins in lock.sets.values():
        assert list(pins) == sorted(pins)
        for pin in pins:
            deb = lock.debs[pin]
            assert len(deb.sha256) == 64
            assert deb.filename.endswith(f"_{deb.architecture}.deb")
    # Each application set holds the exact versions its workload pins.
    for key, pins in lock.sets.items():
        if key.startswith("base/"):
            continue
        name, label, index = key.split("/")
        workload = WORKLOADS[name]
        version = workload.versions["v1" if label == "v1" else "v2"]
        step = workload.steps[int(index) - 1]
        assert isinstance(step, Apt)
        for package in step.packages:
            assert f"{package}={version.debian[package]}" in pins
    # The updated base differs from the release base, but not entirely.
    release, security = set(lock.sets["base/release"]), set(lock.sets["base/security"])
    assert release != security
    assert len(release & security) > len(release) // 2


def test_lock_round_trip(tmp_path: Path) -> None:
    lock = Lock()
    deb = Deb(architecture="amd64", filename="pool/main/x/x_1_amd64.deb", sha256="0" * 64, size=3)
    lock.add("x/v1/1", {"x=1": deb, "a=2": deb})
    lock.wheels["flask==3.0.3"] = Wheel(filename="flask-3.0.3-py3-none-any.whl", sha256="1" * 64)
    path = tmp_path / "lock.json"
    lock.save(path)
    again = Lock.load(path)
    assert again == lock
    assert again.sets["x/v1/1"] == ("a=2", "x=1")
    text = path.read_text()
    again.save(path)
    assert path.read_text() == text, "saving is deterministic"
    again.forget(["x/v1/1"])
    assert again.sets == {}
    assert again.debs == {}


# --- image config ---------------------------------------------------------------------------


def test_image_config_is_deterministic_and_runs_the_entrypoint(tmp_path: Path) -> None:
    layers = [
        Layer(
            key=str(i),
            tar=tmp_path / f"{i}.tar",
            blob=tmp_path / f"{i}.tar.gz",
            diff_id=Digest("sha256:" + f"{i}" * 64),
            digest=Digest("sha256:" + f"{i + 5}" * 64),
            size=10,
            compressed_size=5,
            created_by=f"step {i}",
            created=EPOCHS["v1"],
            seconds=0.0,
        )
        for i in range(3)
    ]
    redis = WORKLOADS["redis"]
    data = image_config(redis, "v1", "app-update", layers)
    assert data == image_config(redis, "v1", "app-update", layers)
    config = wire.loads(data, oci.ImageConfig)
    assert config.rootfs.diff_ids == tuple(layer.diff_id for layer in layers)
    assert config.config is not None
    assert config.config.entrypoint == (ENTRYPOINT,)
    assert config.config.labels == {
        "org.starlight.workload": "redis",
        "org.starlight.version": "v1",
        "org.starlight.build": "v1",
    }
    assert config.created == "2026-10-01T00:00:00Z"
    assert [h.created_by for h in config.history or ()] == ["step 0", "step 1", "step 2"]


# --- probes ---------------------------------------------------------------------------------


def test_log_probe() -> None:
    probe = Probe(kind="log", pattern=r"ready for connections")
    assert not probe.check(output="starting\n")
    assert probe.check(output="starting\nmariadbd: ready for connections.\n")
    with pytest.raises(ValueError, match="pattern"):
        Probe(kind="log")


@pytest.fixture
def pong_server() -> Iterator[int]:
    class Handler(socketserver.BaseRequestHandler):
        def handle(self) -> None:
            data = self.request.recv(64)
            self.request.sendall(b"+PONG\r\n" if data == b"PING\r\n" else b"-ERR\r\n")

    with socketserver.TCPServer(("127.0.0.1", 0), Handler) as server:
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        yield server.server_address[1]
        server.shutdown()


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_tcp_probe(pong_server: int) -> None:
    ping = Probe(kind="tcp", port=pong_server, send=b"PING\r\n", expect=b"+PONG")
    assert ping.check()
    assert not Probe(kind="tcp", port=pong_server, send=b"PINK\r\n", expect=b"+PONG").check()
    assert Probe(kind="tcp", port=pong_server).check()
    assert not ping.on_port(_closed_port()).check()


def test_http_probe() -> None:
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200 if self.path == "/" else 404)
            self.end_headers()

        def log_message(self, format: str, *args: object) -> None:
            pass

    with http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler) as server:
        threading.Thread(target=server.serve_forever, daemon=True).start()
        port = server.server_address[1]
        assert Probe(kind="http", port=port, path="/").check()
        assert not Probe(kind="http", port=port, path="/missing").check()
        server.shutdown()
    assert not Probe(kind="http", port=_closed_port()).check()


# --- apt plumbing ---------------------------------------------------------------------------


def test_simulated_install_lines_are_parsed() -> None:
    lines = [
        "Inst libc6 [2.36-9+deb12u7] (2.36-9+deb12u14 Debian:12.15/oldstable [amd64]) []",
        "Inst redis-server (5:7.0.15-1~deb12u7 Debian:12.15/oldstable [amd64])",
        "Conf redis-server (5:7.0.15-1~deb12u7 Debian:12.15/oldstable [amd64])",
    ]
    parsed = [m.groups() for line in lines if (m := apt._INST.match(line))]
    assert parsed == [("libc6", "2.36-9+deb12u14"), ("redis-server", "5:7.0.15-1~deb12u7")]


def test_stanzas_keep_continuation_lines() -> None:
    text = "Package: a\nDescription: one\n two\n\nPackage: b\nPriority: required\n"
    assert list(apt._stanzas(text)) == [
        {"Package": "a", "Description": "one\n two"},
        {"Package": "b", "Priority": "required"},
    ]


@pytest.mark.skipif(shutil.which("dpkg-deb") is None, reason="needs dpkg-deb")
def test_local_repository_uses_the_archives_priority(tmp_path: Path) -> None:
    package = tmp_path / "pkg"
    (package / "DEBIAN").mkdir(parents=True)
    (package / "DEBIAN" / "control").write_text(
        "Package: demo\nVersion: 1.0\nArchitecture: all\nMaintainer: x <x@example.org>\n"
        "Priority: important\nDescription: demo\n"
    )
    deb = tmp_path / "demo_1.0_all.deb"
    subprocess.run(
        ["dpkg-deb", "--root-owner-group", "--build", str(package), str(deb)],
        check=True,
        capture_output=True,
    )
    record = Deb(architecture="all", filename="x", sha256="", size=0, priority="required")
    line = apt.local_repository([(deb, record)], tmp_path / "repo")
    assert line == f"deb [trusted=yes] file://{tmp_path / 'repo'} bookworm main"
    index = (tmp_path / "repo/dists/bookworm/main/binary-amd64/Packages").read_text()
    assert "Priority: required" in index
    assert "Priority: important" not in index
    assert "Filename: pool/demo_1.0_all.deb" in index
    release = (tmp_path / "repo/dists/bookworm/Release").read_text()
    assert "main/binary-amd64/Packages" in release
    assert (tmp_path / "repo/pool/demo_1.0_all.deb").read_bytes() == deb.read_bytes()


# --- settling a tree ------------------------------------------------------------------------


def test_settle_removes_build_leftovers_and_clamps_times(tmp_path: Path) -> None:
    root = tmp_path / "root"
    epoch = EPOCHS["v1"]
    keep = {
        "etc/passwd": b"root:x:0:0::/root:/bin/sh\n",
        "usr/bin/tool": b"old file\n",
        "var/log/apt/.keep": b"",
    }
    gone = {
        "var/log/dpkg.log": b"2026-11-27 install\n",
        "var/log/apt/history.log": b"Start-Date\n",
        "var/cache/ldconfig/aux-cache": b"\x00",
        "var/cache/debconf/config.dat-old": b"x",
        "var/lib/dpkg/status-old": b"x",
        "var/lib/apt/lists/deb.debian.org_Packages": b"x",
        "var/cache/apt/pkgcache.bin": b"x",
        "tmp/scratch": b"x",
        "root/.cache/pip/x": b"x",
        "dev/null": b"",
    }
    for name, data in {**keep, **gone}.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    os.utime(root / "usr/bin/tool", (epoch - 1000, epoch - 1000))
    (root / "usr/bin/link").symlink_to("tool")
    rootfs.settle(root, epoch=epoch)
    for name in keep:
        assert (root / name).exists(), name
    for name in gone:
        assert not (root / name).exists(), name
    for directory in ("var/lib/apt/lists", "tmp", "dev"):
        assert (root / directory).is_dir()
        assert not list((root / directory).iterdir())
    # Older mtimes stay, newer ones (made by the build) become the epoch.
    assert (root / "usr/bin/tool").stat().st_mtime == epoch - 1000
    assert (root / "etc/passwd").stat().st_mtime == epoch
    assert os.lstat(root / "usr/bin/link").st_mtime == epoch
    assert (root / "var").stat().st_mtime == epoch


def test_installed_packages_reads_dpkg_status(tmp_path: Path) -> None:
    status = tmp_path / "var/lib/dpkg/status"
    status.parent.mkdir(parents=True)
    status.write_text(
        "Package: a\nStatus: install ok installed\nVersion: 1\nDescription: x\n y\n\n"
        "Package: b\nStatus: deinstall ok config-files\nVersion: 2\n\n"
        "Package: c\nStatus: install ok installed\nVersion: 1:3~x\n"
    )
    assert rootfs.installed_packages(tmp_path) == {"a=1", "c=1:3~x"}


def test_lock_file_is_valid_json_with_sorted_keys() -> None:
    data = json.loads(LOCK_PATH.read_text())
    assert list(data) == sorted(data)
    assert list(data["debs"]) == sorted(data["debs"])
