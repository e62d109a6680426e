"""Build workload images layer by layer, reproducibly, with a build cache like docker's.

The plan of an image is its base layer then one layer per step. Each layer has a key: the hash
of its parent's key, the step's spec (with its pins), the package universe, the build time
(``SOURCE_DATE_EPOCH``) and the exact package set the lock resolved for it. A layer whose key is
in the cache is not built again; building a later one replays the steps on a copy of the
cached base tree (deterministic, so the result is the same — and checked: a replayed layer
whose digest differs from the cached one is reported).

``v1`` is built from bookworm as released at ``EPOCHS["v1"]``. ``v2`` is built at
``EPOCHS["v2"]`` with the security and stable updates, in two ways: ``app-update`` (v1's base
layer and every layer before the first changed step are reused, as docker's cache would) and
``rebuild`` (a new base with the updates applied, and every step run again).
"""

from __future__ import annotations

import contextlib
import fcntl
import gzip
import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import BinaryIO, Final

import attrs

from benchmarks.images import rootfs
from benchmarks.images.apt import AptError, Universe, local_repository
from benchmarks.images.debian import CACHE
from benchmarks.images.layerdiff import TreeSnapshot, snapshot, write_diff
from benchmarks.images.lock import Deb, Lock
from benchmarks.images.recipe import KINDS, VERSIONS, Apt, Copy, Pip, Run, Step, Version, Workload
from benchmarks.images.recipe import step_spec as _step_spec
from benchmarks.images.wheels import fetch_wheels
from starlight_core.digest import Digest

__all__ = [
    "BUILDER_VERSION",
    "EPOCHS",
    "LOCK_PATH",
    "UNIVERSES",
    "Builder",
    "Layer",
]

BUILDER_VERSION: Final = "3"
"""Part of every layer key: change it when the way layers are made changes."""
EPOCHS: Final = {"v1": 1_790_812_800, "v2": 1_794_700_800}
"""SOURCE_DATE_EPOCH of each version's builds (2026-10-01 and 2026-11-15, UTC)."""
UNIVERSES: Final = {"v1": "release", "v2": "security"}
LOCK_PATH: Final = Path(__file__).with_name("workloads.lock.json")
BASE_EXTRA: Final = ("usr-is-merged",)
"""Asked for with the minbase set, as mmdebstrap's merged-/usr setup does, so that apt does not
choose ``usrmerge`` (and perl with it) for init-system-helpers' dependency."""
_GZIP_LEVEL: Final = 6
_COPY_CHUNK: Final = 1 << 20


@attrs.frozen
class Layer:
    """One built layer in the cache: the uncompressed tar and its gzip blob."""

    key: str
    tar: Path
    blob: Path
    diff_id: Digest
    digest: Digest
    size: int
    compressed_size: int
    created_by: str
    created: int
    seconds: float
    """How long building it took (0 for a cache hit on a fresh process: see the metadata)."""


@attrs.frozen
class _Stage:
    """One planned layer: a step (None for the base) with the inputs it is built from."""

    step: Step | None
    index: int
    version: Version
    label: str
    """Which build first makes this layer (``v1``, ``v2-update``, ``v2-rebuild``): names its
    package set in the lock."""
    universe: str
    epoch: int

    def describe(self) -> str:
        if self.step is None:
            return f"debian bookworm minbase ({self.universe})"
        step = self.step
        if isinstance(step, Apt):
            return "apt-get install " + " ".join(step.packages)
        if isinstance(step, Pip):
            return "pip install " + " ".join(step.packages)
        if isinstance(step, Copy):
            return "COPY " + " ".join(sorted(step.files))
        return "RUN " + step.script.strip().splitlines()[0][:60]


def _hash(*parts: str) -> str:
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part.encode())
        digest.update(b"\0")
    return digest.hexdigest()


class Builder:
    """Builds and caches layers. ``cache`` holds what is fetched (debs, wheels, apt lists);
    ``store`` (default: the same directory) holds what is built (base trees, layers)."""

    def __init__(
        self,
        cache: Path = CACHE,
        *,
        store: Path | None = None,
        lock_path: Path = LOCK_PATH,
        progress: Callable[[str], None] | None = None,
    ) -> None:
        self.cache = cache
        self.store = store if store is not None else cache
        self.lock_path = lock_path
        self.lock = Lock.load(lock_path)
        self.progress = progress or (lambda _: None)
        self.irreproducible: list[str] = []
        """Layers rebuilt with a digest other than the cached one (see the module doc)."""

    # --- planning ------------------------------------------------------------------------

    def plan(self, workload: Workload, version: str, kind: str = "app-update") -> list[_Stage]:
        if version not in VERSIONS:
            raise ValueError(f"unknown version {version!r} (one of {VERSIONS})")
        if kind not in KINDS:
            raise ValueError(f"unknown kind {kind!r} (one of {KINDS})")
        v1, v2 = workload.versions["v1"], workload.versions["v2"]
        old = ("v1", UNIVERSES["v1"], EPOCHS["v1"])
        new_label = "v2-update" if kind == "app-update" else "v2-rebuild"
        new = (new_label, UNIVERSES["v2"], EPOCHS["v2"])
        if version == "v1":
            return [_Stage(None, 0, v1, "base", *old[1:])] + [
                _Stage(step, i, v1, *old) for i, step in enumerate(workload.steps, 1)
            ]
        if kind == "rebuild":
            return [_Stage(None, 0, v2, "base", *new[1:])] + [
                _Stage(step, i, v2, *new) for i, step in enumerate(workload.steps, 1)
            ]
        stages = [_Stage(None, 0, v1, "base", *old[1:])]
        cached = True
        for i, step in enumerate(workload.steps, 1):
            cached = cached and _step_spec(step, v1) == _step_spec(step, v2)
            stages.append(_Stage(step, i, v1, *old) if cached else _Stage(step, i, v2, *new))
        return stages

    def _lock_key(self, workload: Workload, stage: _Stage) -> str:
        if stage.step is None:
            return f"base/{stage.universe}"
        return f"{workload.name}/{stage.label}/{stage.index}"

    def _key(self, parent: str, lock_key: str, stage: _Stage) -> str | None:
        """The layer's cache key, or None while its package set is not resolved yet."""
        resolved = ""
        if stage.step is None or isinstance(stage.step, Apt):
            pins = self.lock.sets.get(lock_key)
            if pins is None:
                return None
            resolved = " ".join(pins)
        elif isinstance(stage.step, Pip):
            records = [
                self.lock.wheels.get(pin) for pin in _step_spec_pins(stage.step, stage.version)
            ]
            if any(record is None for record in records):
                return None
            resolved = json.dumps([attrs.asdict(r) for r in records if r is not None])
        spec = "base" if stage.step is None else _step_spec(stage.step, stage.version)
        return _hash(BUILDER_VERSION, parent, spec, stage.universe, str(stage.epoch), resolved)

    def relock(self, workload: Workload) -> None:
        """Forget the workload's resolved package sets and refresh the package lists: the next
        build resolves them again against the archive as it is now."""
        with self._exclusive():
            self.lock = Lock.load(self.lock_path)
            self.lock.forget([key for key in self.lock.sets if key.startswith(f"{workload.name}/")])
            self.lock.save(self.lock_path)
        for name in {UNIVERSES["v1"], UNIVERSES["v2"]}:
            Universe(name, self.cache).update(force=True)

    def cached(self, workload: Workload, version: str, kind: str = "app-update") -> bool:
        """Are all layers of this image in the store already?"""
        return self._cached_layers(workload, self.plan(workload, version, kind)) is not None

    def _cached_layers(self, workload: Workload, stages: Sequence[_Stage]) -> list[Layer] | None:
        layers = []
        parent = ""
        for stage in stages:
            key = self._key(parent, self._lock_key(workload, stage), stage)
            layer = self._load_layer(key) if key is not None else None
            if layer is None:
                return None
            layers.append(layer)
            parent = layer.key
        return layers

    # --- building ------------------------------------------------------------------------

    def build(self, workload: Workload, version: str, kind: str = "app-update") -> list[Layer]:
        """The image's layers, base first: from the store, or built (minutes for big ones)."""
        stages = self.plan(workload, version, kind)
        layers = self._cached_layers(workload, stages)
        if layers is not None:
            return layers
        with self._exclusive():
            self.lock = Lock.load(self.lock_path)  # another builder may have resolved more
            layers = self._cached_layers(workload, stages)
            if layers is not None:
                return layers
            return self._build(workload, version, stages)

    @contextlib.contextmanager
    def _exclusive(self) -> Iterator[None]:
        self.store.mkdir(parents=True, exist_ok=True)
        with open(self.store / "build.lock", "w") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def _build(self, workload: Workload, version: str, stages: Sequence[_Stage]) -> list[Layer]:
        base_stage, steps = stages[0], stages[1:]
        base_tree, base_layer = self._base(base_stage)
        layers = [base_layer]
        work = Path(tempfile.mkdtemp(prefix=f"{workload.name}-", dir=self._dir("work")))
        try:
            root = work / "root"
            rootfs.copy_tree(base_tree, root)
            before = snapshot(root)
            for stage in steps:
                started = time.monotonic()
                self.progress(f"{workload.name} {version}: step {stage.index}: {stage.describe()}")
                self._run_step(workload, stage, root, work)
                rootfs.settle(root, epoch=stage.epoch)
                after = snapshot(root)
                key = self._key(layers[-1].key, self._lock_key(workload, stage), stage)
                assert key is not None, "a step's inputs are resolved once it ran"
                layers.append(
                    self._store_layer(key, before, after, stage, time.monotonic() - started)
                )
                before = after
        finally:
            shutil.rmtree(work, ignore_errors=True)
        return layers

    def _dir(self, name: str) -> Path:
        path = self.store / name
        path.mkdir(parents=True, exist_ok=True)
        return path

    def _base(self, stage: _Stage) -> tuple[Path, Layer]:
        lock_key = f"base/{stage.universe}"
        universe = Universe(stage.universe, self.cache)
        if lock_key not in self.lock.sets:
            self.progress(f"resolving the {stage.universe} minbase package set")
            debs = universe.resolve([*universe.required(), *BASE_EXTRA])
            self._record(lock_key, debs)
        key = self._key("", lock_key, stage)
        assert key is not None
        tree = self._dir("rootfs") / key
        layer = self._load_layer(key)
        if tree.is_dir() and layer is not None:
            return tree, layer
        started = time.monotonic()
        pins = self.lock.sets[lock_key]
        if not tree.is_dir():
            self.progress(f"bootstrapping the {stage.universe} base ({len(pins)} packages)")
            staging = Path(tempfile.mkdtemp(prefix="base-", dir=self._dir("work")))
            try:
                repository = self._repository(universe, pins, staging / "repo")
                rootfs.bootstrap(staging / "root", repository, epoch=stage.epoch)
                self._check_installed(staging / "root", pins, exact=True)
                (staging / "root").rename(tree)
            finally:
                shutil.rmtree(staging, ignore_errors=True)
        layer = self._store_layer(key, None, snapshot(tree), stage, time.monotonic() - started)
        return tree, layer

    def _record(self, lock_key: str, debs: dict[str, Deb]) -> None:
        self.lock.add(lock_key, debs)
        self.lock.save(self.lock_path)

    def _repository(self, universe: Universe, pins: Sequence[str], where: Path) -> str:
        records = {pin: self.lock.debs[pin] for pin in pins}
        files = universe.fetch(list(pins), records)
        return local_repository(list(zip(files, (records[p] for p in pins), strict=True)), where)

    def _check_installed(self, root: Path, pins: Sequence[str], *, exact: bool) -> None:
        installed = rootfs.installed_packages(root)
        missing = sorted(set(pins) - installed)
        extra = sorted(installed - set(pins)) if exact else []
        if missing or extra:
            raise AptError(
                f"{root}: the installed packages differ from the lock: missing {missing}, "
                f"unexpected {extra}"
            )

    def _run_step(self, workload: Workload, stage: _Stage, root: Path, work: Path) -> str:
        step = stage.step
        if isinstance(step, Apt):
            return self._apt(workload, stage, step, root, work)
        if isinstance(step, Pip):
            return self._pip(stage, step, root, work)
        if isinstance(step, Copy):
            for path, (content, mode) in sorted(step.files.items()):
                target = root / path.lstrip("/")
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_text(content)
                target.chmod(mode)
                os.utime(target, (stage.epoch, stage.epoch))
            return ""
        assert isinstance(step, Run)
        return rootfs.run(root, step.script, epoch=stage.epoch)

    def _apt(self, workload: Workload, stage: _Stage, step: Apt, root: Path, work: Path) -> str:
        lock_key = self._lock_key(workload, stage)
        universe = Universe(stage.universe, self.cache)
        wanted = [f"{name}={stage.version.debian[name]}" for name in step.packages]
        if not set(wanted) <= set(self.lock.sets.get(lock_key, ())):
            # Not resolved yet, or resolved for other pins (the workload was edited).
            self.progress(f"resolving {lock_key}: {' '.join(wanted)}")
            debs = universe.resolve(wanted, status=root / "var" / "lib" / "dpkg" / "status")
            missing = sorted(set(wanted) - set(debs))
            if missing:
                raise AptError(f"{lock_key}: apt would not install {missing} (already there?)")
            self._record(lock_key, debs)
        pins = self.lock.sets[lock_key]
        repo = work / "repo"
        shutil.rmtree(repo, ignore_errors=True)
        local_repository_line = self._repository(universe, pins, repo)
        line = local_repository_line.replace(f"file://{repo}", "file:///mnt")
        (repo / "sources.list").write_text(line + "\n")
        (repo / "empty").mkdir(exist_ok=True)
        (repo / "apt.conf").write_text(
            'Dir::Etc::SourceList "/mnt/sources.list";\n'
            'Dir::Etc::SourceParts "/mnt/empty";\n'
            'Dpkg::Options { "--force-confdef"; "--force-confold"; };\n'
        )
        script = "\n".join(
            [
                step.before,
                "apt-get update -qq",
                "apt-get install -y -qq --no-install-recommends " + " ".join(wanted),
                "apt-get clean",
                "rm -rf /var/lib/apt/lists/*",
                step.after,
            ]
        )
        output = rootfs.run(
            root,
            script,
            epoch=stage.epoch,
            binds={"mnt": repo},
            env={"APT_CONFIG": "/mnt/apt.conf"},
        )
        self._check_installed(root, pins, exact=False)
        return output

    def _pip(self, stage: _Stage, step: Pip, root: Path, work: Path) -> str:
        pins = _step_spec_pins(step, stage.version)
        fetched = fetch_wheels(pins, self.lock.wheels, self.cache)
        changed = False
        for pin, (_, wheel) in fetched.items():
            if self.lock.wheels.get(pin) != wheel:
                self.lock.wheels[pin] = wheel
                changed = True
        if changed:
            self.lock.save(self.lock_path)
        wheels = work / "wheels"
        shutil.rmtree(wheels, ignore_errors=True)
        wheels.mkdir()
        for path, _ in fetched.values():
            os.link(path, wheels / path.name)
        venv = step.venv
        script = "\n".join(
            [
                f"[ -x {venv}/bin/python ] || python3 -m venv {venv}",
                f"{venv}/bin/pip install --no-index --find-links /mnt --no-deps -q "
                + " ".join(pins),
                step.after,
            ]
        )
        return rootfs.run(root, script, epoch=stage.epoch, binds={"mnt": wheels})

    # --- the layer store -----------------------------------------------------------------

    def _layer_paths(self, key: str) -> tuple[Path, Path, Path]:
        directory = self.store / "layers"
        return directory / f"{key}.tar", directory / f"{key}.tar.gz", directory / f"{key}.json"

    def _load_layer(self, key: str) -> Layer | None:
        tar, blob, meta = self._layer_paths(key)
        if not (tar.exists() and blob.exists() and meta.exists()):
            return None
        data = json.loads(meta.read_text())
        return Layer(
            key=key,
            tar=tar,
            blob=blob,
            diff_id=Digest(data["diff_id"]),
            digest=Digest(data["digest"]),
            size=data["size"],
            compressed_size=data["compressed_size"],
            created_by=data["created_by"],
            created=data["created"],
            seconds=data["seconds"],
        )

    def _store_layer(
        self,
        key: str,
        before: TreeSnapshot | None,
        after: TreeSnapshot,
        stage: _Stage,
        seconds: float,
    ) -> Layer:
        tar, blob, meta = self._layer_paths(key)
        tar.parent.mkdir(parents=True, exist_ok=True)
        tmp_tar = tar.with_suffix(".tar.tmp")
        with open(tmp_tar, "wb") as out:
            summary = write_diff(before, after, out)
        diff_id = _file_digest(tmp_tar)
        cached = self._load_layer(key)
        if cached is not None:
            tmp_tar.unlink()
            if cached.diff_id != diff_id:
                message = f"layer {key[:12]} ({stage.describe()}) rebuilt as {diff_id}, " + (
                    f"cached as {cached.diff_id}: this step is not reproducible"
                )
                self.irreproducible.append(message)
                self.progress("WARNING: " + message)
            return cached
        tmp_blob = blob.with_suffix(".gz.tmp")
        with open(tmp_tar, "rb") as source, open(tmp_blob, "wb") as sink:
            _gzip(source, sink)
        digest = _file_digest(tmp_blob)
        metadata = {
            "diff_id": str(diff_id),
            "digest": str(digest),
            "size": tmp_tar.stat().st_size,
            "compressed_size": tmp_blob.stat().st_size,
            "created_by": stage.describe(),
            "created": stage.epoch,
            "seconds": round(seconds, 1),
            "summary": attrs.asdict(summary),
        }
        tmp_tar.replace(tar)
        tmp_blob.replace(blob)
        meta.write_text(json.dumps(metadata, indent=1, sort_keys=True) + "\n")
        layer = self._load_layer(key)
        assert layer is not None
        self.progress(
            f"  layer {digest.hex[:12]}: {layer.size / 1e6:.1f} MB, "
            f"{layer.compressed_size / 1e6:.1f} MB gzip, {summary.entries} entries "
            f"(+{summary.added} ~{summary.changed} -{summary.whiteouts}), {seconds:.0f} s"
        )
        return layer


def _step_spec_pins(step: Pip, version: Version) -> list[str]:
    return [f"{name}=={version.pypi[name]}" for name in step.packages]


def _file_digest(path: Path) -> Digest:
    with open(path, "rb") as handle:
        return Digest("sha256:" + hashlib.file_digest(handle, "sha256").hexdigest())


def _gzip(source: BinaryIO, sink: BinaryIO) -> None:
    """gzip as ``docker push`` makes it: one member, no name, mtime 0 (deterministic)."""
    with gzip.GzipFile(
        filename="", mode="wb", fileobj=sink, compresslevel=_GZIP_LEVEL, mtime=0
    ) as compressed:
        while chunk := source.read(_COPY_CHUNK):
            compressed.write(chunk)
