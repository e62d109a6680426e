"""Layers made of real Debian packages, reproducibly.

``apt-get download`` fetches the ``.deb`` files (cached), ``dpkg-deb -x`` unpacks them, and the
tree becomes a tar with sorted entries, root ownership and the packages' own mtimes — the same
bytes on every run. Used by the conversion benchmark and the workload images.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tarfile
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import IO

__all__ = ["CACHE", "download", "packages_layer", "tree_to_tar"]

CACHE = Path(os.environ.get("STARLIGHT_BENCH_CACHE", "/var/cache/starlight-bench"))


def download(packages: Sequence[str], cache: Path = CACHE) -> list[Path]:
    """The ``.deb`` files of ``packages`` (exact names, or ``name=version``), from the cache or
    fetched with ``apt-get download``."""
    debs = cache / "debs"
    debs.mkdir(parents=True, exist_ok=True)
    wanted: list[Path] = []
    missing: list[str] = []
    for package in packages:
        name, _, version = package.partition("=")
        pattern = f"{name}_{version.replace(':', '%3a') if version else ''}*.deb"
        found = sorted(debs.glob(pattern))
        if found:
            wanted.append(found[-1])
        else:
            missing.append(package)
    if missing:
        subprocess.run(
            ["apt-get", "download", "-q", *missing],
            cwd=debs,
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        return download(packages, cache)
    return wanted


def tree_to_tar(root: Path) -> bytes:
    """A deterministic tar of ``root``: sorted, owned by root, mtimes as on disk."""
    with tempfile.SpooledTemporaryFile(max_size=1 << 30) as buffer:
        _write_tree(buffer, root)
        buffer.seek(0)
        return buffer.read()


def _write_tree(buffer: IO[bytes], root: Path) -> None:
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as archive:
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()
            rel_dir = os.path.relpath(dirpath, root)
            for name in sorted(dirnames + filenames):
                path = os.path.join(dirpath, name)
                arcname = os.path.normpath(os.path.join(rel_dir, name))
                info = archive.gettarinfo(path, arcname)
                info.uid = info.gid = 0
                info.uname = info.gname = "root"
                # Whole seconds, as package files and docker-built layers have them: a float
                # mtime would make tarfile add a PAX record to every entry.
                info.mtime = int(info.mtime)
                if info.isreg():
                    with open(path, "rb") as handle:
                        archive.addfile(info, handle)
                else:
                    archive.addfile(info)


def packages_layer(packages: Sequence[str], cache: Path = CACHE) -> bytes:
    """One layer holding the files of ``packages`` (unpacked, not configured)."""
    staging = Path(tempfile.mkdtemp(prefix="starlight-layer-"))
    try:
        for deb in download(packages, cache):
            subprocess.run(["dpkg-deb", "-x", str(deb), str(staging)], check=True)
        return tree_to_tar(staging)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
