"""The four distributions: one version, complete package lists, honest dependencies, and a
pure core that imports no I/O library."""

from __future__ import annotations

import importlib
import pkgutil
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
DISTRIBUTIONS = ["starlight_core", "starlight_proxy", "starlight_worker", "starlight_cli"]


def _project(name: str) -> dict[str, Any]:
    return tomllib.loads((ROOT / name / "pyproject.toml").read_text())


def test_one_version_for_all() -> None:
    versions = {name: _project(name)["project"]["version"] for name in DISTRIBUTIONS}
    assert len(set(versions.values())) == 1, versions
    version = next(iter(versions.values()))
    for name in DISTRIBUTIONS:
        assert importlib.import_module(name).__version__ == version
    for name in DISTRIBUTIONS[1:]:
        deps = _project(name)["project"]["dependencies"]
        assert f"starlight-core=={version}" in deps


@pytest.mark.parametrize("name", DISTRIBUTIONS)
def test_every_subpackage_is_packaged(name: str) -> None:
    listed = set(_project(name)["tool"]["setuptools"]["packages"])
    on_disk = {
        name
        + (
            "." + ".".join(p.parent.relative_to(ROOT / name).parts)
            if p.parent != ROOT / name
            else ""
        )
        for p in (ROOT / name).rglob("__init__.py")
        if "egg-info" not in str(p) and "protos" not in p.parts and "build" not in p.parts
    }
    assert on_disk <= listed, f"missing from {name}/pyproject.toml: {sorted(on_disk - listed)}"


def test_core_declares_only_its_own_dependencies() -> None:
    deps = {
        d.split(">")[0].split("=")[0] for d in _project("starlight_core")["project"]["dependencies"]
    }
    assert deps <= {"attrs", "cattrs", "httpx"}


def test_importing_the_core_pulls_in_no_io_library() -> None:
    code = (
        "import sys, starlight_core, starlight_core.layer.writer, starlight_core.layer.scan, "
        "starlight_core.delta, starlight_core.bundle, starlight_core.trace, starlight_core.fsview, "
        "starlight_core.wire, starlight_core.testing; "
        "bad = [m for m in ('anyio', 'httpx', 'psycopg', 'fuse', 'grpclib', 'starlette', "
        "'sqlite3', 'socket') if m in sys.modules]; print(','.join(bad))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_the_cli_does_not_drag_fuse_in() -> None:
    code = "import sys, starlight_cli.main; print('fuse' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def _public_modules(package: str) -> list[str]:
    module = importlib.import_module(package)
    names = [package]
    for info in pkgutil.walk_packages(module.__path__, prefix=package + "."):
        if "._" in info.name or info.name.endswith(("_pb2", "_grpc", "__main__")):
            continue
        names.append(info.name)
    return names


@pytest.mark.parametrize("module_name", _public_modules("starlight_core"))
def test_core_modules_declare_all(module_name: str) -> None:
    module = importlib.import_module(module_name)
    exported = getattr(module, "__all__", None)
    assert exported is not None, f"{module_name} has no __all__"
    for name in exported:
        assert hasattr(module, name), f"{module_name}.__all__ names missing {name}"


_PIP_WHEEL = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q"]


@pytest.mark.parametrize("name", DISTRIBUTIONS)
def test_each_distribution_builds_alone(name: str, tmp_path: Path) -> None:
    """A wheel built from the folder alone carries its package and declares its own deps."""
    # Build from a copy, in the copy: setuptools writes build/ beside the sources, which here
    # are the package itself.
    source = tmp_path / "src" / name
    shutil.copytree(ROOT / name, source, ignore=shutil.ignore_patterns("*.egg-info", "build"))
    out = tmp_path / "wheels"
    subprocess.run(
        [*_PIP_WHEEL, "-w", str(out), str(source)],
        check=True,
        capture_output=True,
        cwd=source,
    )
    (wheel,) = out.glob("*.whl")
    with zipfile.ZipFile(wheel) as archive:
        files = archive.namelist()
        metadata = archive.read(next(f for f in files if f.endswith("METADATA"))).decode()
    assert f"{name}/__init__.py" in files
    assert not any(f.startswith(("tests/", "benchmarks/")) for f in files)
    requires = [
        line.split(": ", 1)[1] for line in metadata.splitlines() if line.startswith("Requires-Dist")
    ]
    declared = _project(name)["project"]["dependencies"]
    assert len(requires) == len(declared)
