"""PyPI distributions at pinned versions, as wheels in the cache (offline once fetched).

``pip download`` picks the wheel for the image's Python (CPython 3.11 on x86-64 glibc, the
Debian bookworm interpreter), never building from source; each wheel's file name and SHA-256
are recorded in the lock so that a later fetch must give the same file.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Final

from benchmarks.images.debian import CACHE
from benchmarks.images.lock import Wheel

__all__ = ["WheelError", "fetch_wheels"]

_PLATFORM_ARGS: Final = (
    "--only-binary=:all:",
    "--no-deps",
    "--implementation",
    "cp",
    "--python-version",
    "3.11",
    "--abi",
    "cp311",
    "--platform",
    "manylinux_2_28_x86_64",
    "--platform",
    "manylinux_2_17_x86_64",
    "--platform",
    "manylinux2014_x86_64",
)


class WheelError(RuntimeError):
    pass


def _sha256(path: Path) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def fetch_wheels(
    pins: Sequence[str], locked: Mapping[str, Wheel], cache: Path = CACHE
) -> dict[str, tuple[Path, Wheel]]:
    """``name==version`` → (cached wheel file, its record). A pin found in ``locked`` must
    match its recorded file and SHA-256; a new pin is downloaded and recorded."""
    directory = cache / "wheels"
    directory.mkdir(parents=True, exist_ok=True)
    result: dict[str, tuple[Path, Wheel]] = {}
    for pin in pins:
        record = locked.get(pin)
        if record is not None and (directory / record.filename).exists():
            path = directory / record.filename
        else:
            path = _download(pin, directory)
        wheel = Wheel(filename=path.name, sha256=_sha256(path))
        if record is not None and record != wheel:
            raise WheelError(f"{pin}: got {wheel}, the lock says {record}")
        result[pin] = (path, wheel)
    return result


def _download(pin: str, directory: Path) -> Path:
    staging = Path(tempfile.mkdtemp(prefix="wheel-", dir=directory))
    try:
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--quiet",
                "--disable-pip-version-check",
                "--no-cache-dir",
                *_PLATFORM_ARGS,
                "--dest",
                str(staging),
                pin,
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        files = sorted(staging.glob("*.whl"))
        if result.returncode != 0 or len(files) != 1:
            raise WheelError(f"pip download {pin} failed:\n{result.stderr[-3000:]}")
        target = directory / files[0].name
        shutil.move(files[0], target)
        return target
    finally:
        shutil.rmtree(staging, ignore_errors=True)
