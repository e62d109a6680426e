"""Copying a content: the cheapest way the filesystem allows, and every fallback gives the
same bytes."""

from __future__ import annotations

import errno
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from starlight_worker.store import clone

DATA = os.urandom(3 * 1024 * 1024 + 17)


@pytest.fixture
def fds(tmp_path: Path) -> Iterator[tuple[int, int, Path]]:
    src = tmp_path / "src"
    src.write_bytes(DATA)
    src_fd = os.open(src, os.O_RDONLY)
    dst = tmp_path / "dst"
    dst_fd = os.open(dst, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    yield src_fd, dst_fd, dst
    os.close(src_fd)
    os.close(dst_fd)


def _unavailable(*args: object, **kwargs: object) -> int:
    raise OSError(errno.ENOSYS, "not here")


def test_the_first_method_that_works(fds: tuple[int, int, Path]) -> None:
    src_fd, dst_fd, dst = fds
    how = clone.clone_file(src_fd, dst_fd, len(DATA))
    assert how in ("reflink", "copy_file_range")
    assert dst.read_bytes() == DATA


@pytest.mark.parametrize("missing", [("copy_file_range",), ("copy_file_range", "sendfile")])
def test_fallbacks(
    fds: tuple[int, int, Path], monkeypatch: pytest.MonkeyPatch, missing: tuple[str, ...]
) -> None:
    src_fd, dst_fd, dst = fds
    monkeypatch.setattr(fcntl, "ioctl", _unavailable)
    for name in missing:
        monkeypatch.setattr(os, name, _unavailable)
    how = clone.clone_file(src_fd, dst_fd, len(DATA))
    assert how == ("sendfile" if len(missing) == 1 else "read")
    assert dst.read_bytes() == DATA


def test_a_real_error_is_raised(
    fds: tuple[int, int, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    src_fd, dst_fd, _ = fds

    def full(*args: object, **kwargs: object) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(fcntl, "ioctl", _unavailable)
    monkeypatch.setattr(os, "copy_file_range", full)
    with pytest.raises(OSError) as excinfo:
        clone.clone_file(src_fd, dst_fd, len(DATA))
    assert excinfo.value.errno == errno.ENOSPC
