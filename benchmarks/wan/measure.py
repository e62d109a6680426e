"""One measured deploy over the emulated link, by each method, on a fresh worker.

Every measurement starts from a worker started afresh (``benchmarks.stack.start_wan_edge``):
for an update, the old version is pulled first, by the same method, and not measured. Then,
from the moment the pull command is started:

- ``stock``: ``ctr images pull --plain-http`` (containerd's own client: fetch and unpack into
  overlayfs), then ``ctr run --net-host`` until the workload's probe succeeds; then the same
  image is started once more, now fully local, for the floor's part (ii);
- ``starlight`` / ``starlight-unordered``: ``ctr-starlight pull [--no-ordering]`` (returns
  when the image's metadata is in and containers can start), ``ctr run --snapshotter
  starlight`` until ready; the container keeps running until the daemon says the image is
  complete (its ``Images`` call, polled);
- ``curl``: the ``POST /starlight/delta`` request starlight's pull made, replayed by curl from
  the edge: the time to download the bundle starlight received, in one request.

Counted for each: bytes on the wire and client round trips (the forwarder's per-connection
counts: ``benchmarks.wan.flows``), time to the first payload byte reaching the edge, time to
ready, time until every byte is local, and worker CPU seconds: containerd, its shims, the
starlight daemon and its FUSE server (``/proc`` counters sampled before the pull and once the
deploy is over, container still running), plus the client commands the method ran (their
``wait4`` rusage).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import os
import re
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO, Final

import attrs

from benchmarks.images.probe import Probe
from benchmarks.images.recipe import Workload
from benchmarks.stack import WanEdge
from benchmarks.wan.flows import summarise
from benchmarks.wan.link import WanLink
from benchmarks.wan.netns import setns

__all__ = [
    "Container",
    "EdgeProber",
    "Sample",
    "WorkerCpu",
    "WorkloadNotReady",
    "measure_curl",
    "measure_starlight",
    "measure_stock",
    "pull_starlight",
    "pull_stock",
    "run_measured",
]

_POLL: Final = 0.05
_CLK_TCK: Final = os.sysconf("SC_CLK_TCK")
_COMMAND_TIMEOUT: Final = 1800.0


class WorkloadNotReady(RuntimeError):
    """The container exited, or its probe did not succeed in time; carries its output."""


@attrs.frozen
class Sample:
    """What one measured deploy gave; times in seconds from the pull command's start."""

    ready_s: float
    local_s: float | None
    ttfb_s: float | None
    wire_bytes: int
    connections: int
    requests: int
    cpu_s: float
    local_ready_s: float | None = None
    """``stock`` only: ready time of a second start once the image is fully local."""


# --- running commands -----------------------------------------------------------------------


@attrs.frozen
class Finished:
    returncode: int
    cpu_s: float
    ended: float
    output: str


def run_measured(
    argv: Sequence[str], *, env: dict[str, str] | None = None, timeout: float = _COMMAND_TIMEOUT
) -> Finished:
    """Run ``argv`` to its end; its CPU time (and its reaped children's) from ``wait4``."""
    process = subprocess.Popen(
        list(argv),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=env,
    )
    assert process.stdout is not None
    chunks: list[bytes] = []
    reader = threading.Thread(target=lambda: chunks.append(process.stdout.read()), daemon=True)  # type: ignore[union-attr]
    reader.start()
    timer = threading.Timer(timeout, process.kill)
    timer.start()
    try:
        _, status, usage = os.wait4(process.pid, 0)
    finally:
        timer.cancel()
    ended = time.monotonic()
    process.returncode = os.waitstatus_to_exitcode(status)
    reader.join()
    process.stdout.close()
    return Finished(
        returncode=process.returncode,
        cpu_s=usage.ru_utime + usage.ru_stime,
        ended=ended,
        output=b"".join(chunks).decode(errors="replace"),
    )


def _check(finished: Finished, what: str) -> Finished:
    if finished.returncode != 0:
        raise RuntimeError(f"{what} failed ({finished.returncode}):\n{finished.output[-3000:]}")
    return finished


# --- probing inside the edge ------------------------------------------------------------------


class EdgeProber:
    """Runs readiness probes on one thread that lives in the edge namespace (the containers
    run with ``--net-host`` there: their ports exist only inside it)."""

    def __init__(self, netns: str) -> None:
        self._pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, initializer=setns, initargs=(netns,), thread_name_prefix="probe"
        )

    def check(self, probe: Probe, output: str) -> bool:
        return self._pool.submit(probe.check, output=output, host="127.0.0.1").result()

    def close(self) -> None:
        self._pool.shutdown(wait=True)


# --- worker CPU ---------------------------------------------------------------------------------


class WorkerCpu:
    """CPU seconds of the worker's long-lived processes: containerd, its shims, the daemon,
    the FUSE server (found by their command lines, which name this worker's files)."""

    def __init__(self, edge: WanEdge) -> None:
        self._marks = (
            str(edge.containerd.config_path),
            str(edge.daemon.config_path),
            edge.daemon.fused_socket,
        )
        self._address = edge.containerd.address

    def _ours(self, argv: list[str]) -> bool:
        if not argv:
            return False
        program = os.path.basename(argv[0])
        if program.startswith("containerd-shim"):
            return self._address in argv
        if program in ("ctr", "nsenter", "ctr-starlight"):
            return False
        return any(mark in argv for mark in self._marks)

    def sample(self) -> dict[int, float]:
        found: dict[int, float] = {}
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            try:
                argv = Path(entry.path, "cmdline").read_bytes().split(b"\0")
                if not self._ours([a.decode(errors="replace") for a in argv if a]):
                    continue
                stat = Path(entry.path, "stat").read_text()
            except OSError:
                continue
            fields = stat.rsplit(")", 1)[1].split()
            found[int(entry.name)] = (int(fields[11]) + int(fields[12])) / _CLK_TCK
        return found

    @staticmethod
    def spent(before: dict[int, float], after: dict[int, float]) -> float:
        return sum(cpu - before.get(pid, 0.0) for pid, cpu in after.items())


# --- containers ---------------------------------------------------------------------------------


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except FileNotFoundError:
        return ""


class Container:
    """``ctr run --rm --net-host`` of one image in the edge, watched until ready."""

    def __init__(
        self,
        edge: WanEdge,
        reference: str,
        workload: Workload,
        *,
        snapshotter: str,
        log: Path,
    ) -> None:
        self.edge = edge
        self.reference = reference
        self.workload = workload
        self.snapshotter = snapshotter
        self.log = log
        self.name = f"{workload.name}-{uuid.uuid4().hex[:8]}"
        self._process: subprocess.Popen[bytes] | None = None
        self._handle: IO[bytes] | None = None
        self.started = 0.0

    def start(self) -> None:
        containerd = self.edge.containerd
        argv = self.edge.link.argv(
            "edge",
            containerd.ctr_argv(
                "run",
                "--rm",
                "--net-host",
                "--snapshotter",
                self.snapshotter,
                *[arg for env in self.workload.run_env() for arg in ("--env", env)],
                self.reference,
                self.name,
            ),
        )
        self._handle = self.log.open("wb")
        self.started = time.monotonic()
        self._process = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=self._handle, stderr=self._handle
        )

    def wait_ready(self, prober: EdgeProber, *, timeout: float) -> float:
        """The monotonic time the probe first succeeded."""
        assert self._process is not None
        probe = self.workload.probe_on()
        while True:
            output = _read(self.log)
            if prober.check(probe, output):
                return time.monotonic()
            if self._process.poll() is not None:
                raise WorkloadNotReady(
                    f"{self.workload.name} ({self.name}) exited with "
                    f"{self._process.returncode} before {probe.describe()}; output:\n"
                    f"{_read(self.log)[-3000:]}"
                )
            if time.monotonic() - self.started > timeout:
                raise WorkloadNotReady(
                    f"{self.workload.name} ({self.name}) not ready ({probe.describe()}) after "
                    f"{timeout:.0f} s; output:\n{output[-3000:]}"
                )
            time.sleep(_POLL)

    def stop(self) -> float:
        """Kill it and remove it; the CPU seconds of its ``ctr run`` client."""
        process, self._process = self._process, None
        cpu = 0.0
        containerd = self.edge.containerd
        if process is not None:
            containerd.ctr("tasks", "kill", "-s", "SIGKILL", self.name, check=False, timeout=60)
            timer = threading.Timer(60, process.kill)
            timer.start()
            try:
                _, status, usage = os.wait4(process.pid, 0)
                process.returncode = os.waitstatus_to_exitcode(status)
                cpu = usage.ru_utime + usage.ru_stime
            finally:
                timer.cancel()
            containerd.ctr("containers", "delete", self.name, check=False, timeout=60)
        if self._handle is not None:
            self._handle.close()
            self._handle = None
        return cpu

    @contextlib.contextmanager
    def running(self) -> Iterator[Container]:
        self.start()
        try:
            yield self
        finally:
            self.stop()


# --- the daemon's view of an image --------------------------------------------------------------


def _complete(socket: str, reference: str) -> bool:
    from starlight_cli.daemon import control_client
    from starlight_worker.api import control_pb2 as pb

    async def ask() -> bool:
        async with control_client(socket) as control:
            response = await control.Images(pb.ImagesRequest())
        digest = reference.rpartition("@")[2]
        return any(
            image.complete and (image.reference == reference or image.manifest_digest == digest)
            for image in response.images
        )

    return asyncio.run(ask())


def wait_complete(socket: str, reference: str, *, timeout: float) -> float:
    """Poll the daemon until ``reference`` is complete; the monotonic time it was seen so."""
    deadline = time.monotonic() + timeout
    while True:
        if _complete(socket, reference):
            return time.monotonic()
        if time.monotonic() > deadline:
            raise TimeoutError(f"{reference} not complete after {timeout:.0f} s")
        time.sleep(0.1)


# --- the methods --------------------------------------------------------------------------------


def pull_stock(edge: WanEdge, reference: str) -> Finished:
    containerd = edge.containerd
    argv = edge.link.argv("edge", containerd.ctr_argv("images", "pull", "--plain-http", reference))
    return _check(run_measured(argv), f"ctr images pull {reference}")


def pull_starlight(
    edge: WanEdge,
    reference: str,
    *,
    old: str | None = None,
    ordering: bool = True,
    wait: bool = False,
) -> Finished:
    args = ["pull", "-q", "-n", edge.containerd.namespace]
    args += ["--from", old] if old else ["--cold"]
    if not ordering:
        args.append("--no-ordering")
    if wait:
        args.append("--wait")
    argv = edge.cli_argv(*args, reference)
    return _check(run_measured(argv, env=edge.cli_env()), f"ctr-starlight pull {reference}")


def _sample(
    link: WanLink,
    started: float,
    ready: float,
    local: float | None,
    cpu: float,
    *,
    local_ready: float | None = None,
) -> Sample:
    flows = summarise(link.flows(), since=started)
    return Sample(
        ready_s=ready - started,
        local_s=None if local is None else local - started,
        ttfb_s=None if flows.first_down is None else flows.first_down - started,
        wire_bytes=flows.wire_bytes,
        connections=flows.connections,
        requests=flows.requests,
        cpu_s=cpu,
        local_ready_s=local_ready,
    )


def measure_stock(
    edge: WanEdge,
    prober: EdgeProber,
    workload: Workload,
    reference: str,
    *,
    old: str | None,
    logs: Path,
    timeout: float,
) -> Sample:
    if old is not None:
        pull_stock(edge, old)
    meter = WorkerCpu(edge)
    link = edge.link
    link.flows(reset=True)
    before = meter.sample()
    started = time.monotonic()
    pulled = pull_stock(edge, reference)
    container = Container(
        edge, reference, workload, snapshotter="overlayfs", log=logs / "stock.log"
    )
    with container.running():
        ready = container.wait_ready(prober, timeout=timeout)
        after = meter.sample()
        sample_flows = link.flows()
    client = pulled.cpu_s + container.stop()
    # Part (ii) of the floor: the same container, its image now fully local.
    again = Container(
        edge, reference, workload, snapshotter="overlayfs", log=logs / "stock-local.log"
    )
    with again.running():
        local_ready = again.wait_ready(prober, timeout=timeout) - again.started
    flows = summarise(sample_flows, since=started)
    return Sample(
        ready_s=ready - started,
        local_s=pulled.ended - started,
        ttfb_s=None if flows.first_down is None else flows.first_down - started,
        wire_bytes=flows.wire_bytes,
        connections=flows.connections,
        requests=flows.requests,
        cpu_s=WorkerCpu.spent(before, after) + client,
        local_ready_s=local_ready,
    )


def measure_starlight(
    edge: WanEdge,
    prober: EdgeProber,
    workload: Workload,
    reference: str,
    *,
    old: str | None,
    ordering: bool,
    logs: Path,
    timeout: float,
    old_present: bool = False,
) -> Sample:
    """``old``: the image the worker updates from (pulled first unless ``old_present``)."""
    if old is not None and not old_present:
        pull_starlight(edge, old, wait=True)
    meter = WorkerCpu(edge)
    link = edge.link
    link.flows(reset=True)
    before = meter.sample()
    started = time.monotonic()
    pulled = pull_starlight(edge, reference, old=old, ordering=ordering)
    name = "starlight" if ordering else "starlight-unordered"
    container = Container(
        edge, reference, workload, snapshotter="starlight", log=logs / f"{name}.log"
    )
    with container.running():
        ready = container.wait_ready(prober, timeout=timeout)
        local = wait_complete(edge.daemon.control_socket, reference, timeout=timeout)
        after = meter.sample()
        client = pulled.cpu_s + container.stop()
    return _sample(link, started, ready, local, WorkerCpu.spent(before, after) + client)


_CURL_FORMAT: Final = "%{http_code} %{time_starttransfer} %{time_total} %{size_download}"


def measure_curl(link: WanLink, proxy_url: str, body: bytes, *, scratch: Path) -> Sample:
    """Download the bundle ``body`` asks for, in one request, with curl from the edge."""
    request = scratch / "delta-request.json"
    request.write_bytes(body)
    argv = link.argv(
        "edge",
        [
            "curl",
            "-sS",
            "-o",
            "/dev/null",
            "-X",
            "POST",
            "-H",
            "Content-Type: application/json",
            "-H",
            "Accept: application/json",
            "--data-binary",
            f"@{request}",
            "-w",
            _CURL_FORMAT,
            f"{proxy_url}/starlight/delta",
        ],
    )
    link.flows(reset=True)
    started = time.monotonic()
    finished = _check(run_measured(argv), "curl of the bundle")
    match = re.search(r"(\d{3}) ([\d.]+) ([\d.]+) (\d+)", finished.output)
    if match is None or match[1] != "200":
        raise RuntimeError(f"curl of the bundle: unexpected answer {finished.output[-500:]!r}")
    flows = summarise(link.flows(), since=started)
    total = float(match[3])
    return Sample(
        ready_s=total,
        local_s=total,
        ttfb_s=float(match[2]),
        wire_bytes=flows.wire_bytes,
        connections=flows.connections,
        requests=flows.requests,
        cpu_s=finished.cpu_s,
    )
