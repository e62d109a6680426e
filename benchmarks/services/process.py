"""The part every launcher shares: a child process whose output goes to a log file.

``ServiceProcess`` starts the process, waits until a readiness check passes (failing fast, with
the log, when the process dies first), stops it (a signal, then SIGKILL after a timeout) and
works as a context manager (``close()`` on exit: ``stop()`` unless a launcher has more to undo).
"""

from __future__ import annotations

import signal
import subprocess
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, Any, ClassVar, Self

from benchmarks.services import wait_for

__all__ = ["ServiceProcess"]


class ServiceProcess:
    name: ClassVar[str] = "service"
    """How messages name the program."""
    stop_timeout: ClassVar[float] = 20.0

    def __init__(self, log_path: Path | None) -> None:
        self.log_path = log_path
        self._process: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    @property
    def pid(self) -> int:
        if self._process is None:
            raise RuntimeError(f"{self.name} is not running")
        return self._process.pid

    def start(self) -> None:
        raise NotImplementedError

    def _spawn(self, argv: Sequence[str], **popen: Any) -> None:
        """Start ``argv`` with stdin closed and stdout+stderr appended to ``log_path``."""
        assert self.log_path is not None
        self._log = self.log_path.open("ab")
        self._process = subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            **popen,
        )

    def _wait_ready(self, check: Callable[[], bool], *, timeout: float, what: str) -> None:
        """Wait for ``check``; stop the process (and raise) if it never passes."""
        try:
            wait_for(check, timeout=timeout, what=what)
        except BaseException:
            self.stop()
            raise

    def _check_alive(self) -> None:
        if self._process is None or self._process.poll() is not None:
            raise RuntimeError(f"{self.name} exited early; its log:\n{self.log()[-4000:]}")

    def _terminate(self, sig: int = signal.SIGTERM) -> None:
        """Send ``sig``, wait, SIGKILL if it lingers; close the log."""
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.send_signal(sig)
            try:
                process.wait(timeout=self.stop_timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if self._log is not None:
            self._log.close()
            self._log = None

    def stop(self) -> None:
        self._terminate()

    def close(self) -> None:
        """Everything ``__exit__`` undoes (launchers with more to clean up override it)."""
        self.stop()

    def log(self) -> str:
        """The program's output so far (for failure messages)."""
        if self.log_path is None:
            return ""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
