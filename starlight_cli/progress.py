"""Progress for people: rich bars on a terminal, nothing otherwise (logs stay quiet)."""

from __future__ import annotations

import sys
from types import TracebackType

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TransferSpeedColumn,
)

__all__ = ["ByteProgress", "stderr_console"]


def stderr_console() -> Console:
    return Console(stderr=True)


class ByteProgress:
    """Named byte-counting bars; a no-op when stderr is not a terminal or ``quiet``."""

    def __init__(self, *, quiet: bool = False) -> None:
        self.enabled = not quiet and sys.stderr.isatty()
        self._progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            TimeElapsedColumn(),
            console=stderr_console(),
            transient=False,
        )
        self._tasks: dict[str, TaskID] = {}

    def __enter__(self) -> ByteProgress:
        if self.enabled:
            self._progress.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self.enabled:
            self._progress.stop()

    def update(self, key: str, description: str, done: int, total: int | None) -> None:
        if not self.enabled:
            return
        task = self._tasks.get(key)
        if task is None:
            task = self._progress.add_task(description, total=total)
            self._tasks[key] = task
        self._progress.update(task, completed=done, total=total, description=description)
