"""Start a workload image with stock containerd and wait for its readiness probe.

``run_workload`` runs ``ctr run --net-host --env PORT=<port>`` (as the harness does inside its
edge namespace), collects the container's output in a file, polls the workload's probe and
its ready log line, and kills the task at the end. ``smoke`` does the whole round trip on
private services: registry, publish, pull, run, ready.
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Final

import attrs

from benchmarks.images.builder import Builder
from benchmarks.images.recipe import Workload
from benchmarks.services import free_port
from benchmarks.services.containerd import Containerd
from benchmarks.services.registry import Registry
from starlight_core.reference import Reference

__all__ = ["Ready", "WorkloadNotReady", "run_workload", "smoke"]

_POLL: Final = 0.05
_LOG_GRACE: Final = 60.0  # a loaded machine prints late


class WorkloadNotReady(RuntimeError):
    """The container exited or its probe did not succeed in time; carries its output."""


@attrs.frozen
class Ready:
    seconds: float
    """From ``ctr run`` to the probe's first success."""
    log_seconds: float | None
    """From ``ctr run`` to the ready log line (None if it never appeared)."""
    output: str


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except FileNotFoundError:
        return ""


@contextlib.contextmanager
def _container(
    containerd: Containerd, reference: Reference, port: int, workload: Workload, log: Path
) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    name = f"{workload.name}-{uuid.uuid4().hex[:8]}"
    command = containerd.ctr_argv(
        "run",
        "--rm",
        "--net-host",
        *[arg for env in workload.run_env(port) for arg in ("--env", env)],
        str(reference),
        name,
    )
    handle: IO[bytes] = log.open("wb")
    process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=handle, stderr=handle)
    try:
        yield process, name
    finally:
        containerd.ctr("tasks", "kill", "-s", "SIGKILL", name, check=False, timeout=30)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        containerd.ctr("containers", "delete", name, check=False, timeout=30)
        handle.close()


def run_workload(
    containerd: Containerd,
    reference: Reference,
    workload: Workload,
    *,
    port: int | None = None,
    log: Path,
    timeout: float = 120.0,
) -> Ready:
    """Run the (pulled) image until its probe succeeds; raise ``WorkloadNotReady`` if it
    exits first or ``timeout`` passes. The task is killed before returning."""
    port = port if port is not None else free_port()
    probe = workload.probe_on(port)
    log_probe = workload.log_probe
    started = time.monotonic()
    log_seconds: float | None = None
    ready_seconds: float | None = None
    with _container(containerd, reference, port, workload, log) as (process, name):
        while True:
            output = _read(log)
            now = time.monotonic() - started
            if log_seconds is None and log_probe.check(output=output):
                log_seconds = now
            if ready_seconds is None and probe.check(output=output):
                ready_seconds = now
            # The output reaches the file through containerd's pipes, after the service may
            # already have answered: give the ready line a moment to arrive too.
            if ready_seconds is not None and (
                log_seconds is not None or now - ready_seconds > _LOG_GRACE
            ):
                return Ready(seconds=ready_seconds, log_seconds=log_seconds, output=output)
            if process.poll() is not None:
                raise WorkloadNotReady(
                    f"{workload.name} ({name}) exited with {process.returncode} before "
                    f"{probe.describe()}; output:\n{_read(log)[-4000:]}"
                )
            if now > timeout:
                raise WorkloadNotReady(
                    f"{workload.name} ({name}) not ready ({probe.describe()}) after "
                    f"{timeout:.0f} s; output:\n{output[-4000:]}"
                )
            time.sleep(_POLL)


def smoke(
    workload: Workload,
    workdir: Path,
    *,
    version: str = "v1",
    kind: str = "app-update",
    builder: Builder | None = None,
    timeout: float = 120.0,
) -> Ready:
    """Build, push, pull and start one image on private services under ``workdir``."""
    from benchmarks.images.workloads import publish

    with Registry(workdir / "registry") as registry, Containerd(workdir / "containerd") as ctrd:
        image = asyncio.run(
            publish(workload, version, registry.host, kind=kind, convert=False, builder=builder)
        )
        ctrd.ctr("images", "pull", "--plain-http", str(image.original), timeout=600)
        return run_workload(
            ctrd, image.original, workload, log=workdir / "output.log", timeout=timeout
        )
