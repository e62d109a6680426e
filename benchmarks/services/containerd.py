"""A private containerd (``/usr/bin/containerd``, 1.6) for tests and benchmarks.

Everything containerd keeps lives under the given work directory: ``root/`` (content store,
metadata, its own snapshotters), ``state/`` (task bundles, fifos), the gRPC socket
``containerd.sock`` and the log ``containerd.log``. The CRI plugin is off (no kubelet here) and,
given ``snapshotter_socket``, a ``[proxy_plugins.starlight]`` snapshot plugin points at it, so
``ctr ... --snapshotter starlight`` goes through our snapshotter.

What is shared with other containerd instances on the machine, and how we avoid clashes:
runc's state (``/run/containerd/runc/<namespace>``), shim sockets (``/run/containerd/s/<hash of
our address>``) and cgroups (``/<namespace>/<id>``) are keyed by namespace or address, so every
instance gets its own random namespace (``.namespace``, passed by ``ctr()``).

``stop()`` kills and deletes the tasks of that namespace (their shims exit with them), stops
containerd, unmounts whatever is still mounted below the work directory (task root
filesystems) and removes the namespace's empty runc state directory and parent cgroups.
Images, containers and snapshots stay on disk until the work directory is deleted.

``netns`` runs containerd (and so its shims and ``--net-host`` containers) and every ``ctr``
command (a stock ``ctr images pull`` fetches in the client) inside that network namespace
(``benchmarks.wan``); only the network namespace changes, mounts stay shared.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import socket
import subprocess
from pathlib import Path
from typing import Final

from benchmarks.services.process import ServiceProcess
from benchmarks.wan.netns import netns_argv

__all__ = ["CONTAINERD_BINARY", "CTR_BINARY", "Containerd"]

CONTAINERD_BINARY: Final = "/usr/bin/containerd"
CTR_BINARY: Final = "/usr/bin/ctr"
SNAPSHOTTER_NAME: Final = "starlight"
_START_TIMEOUT: Final = 60.0
_CTR_TIMEOUT: Final = 300.0


class Containerd(ServiceProcess):
    """Launch containerd with its state under ``workdir``.

    ``address`` is its gRPC socket; ``ctr(*args)`` runs ``ctr -a <address> -n <namespace>``.
    """

    name = "containerd"

    def __init__(
        self,
        workdir: Path | str,
        *,
        snapshotter_socket: str | None = None,
        namespace: str | None = None,
        binary: str = CONTAINERD_BINARY,
        ctr_binary: str = CTR_BINARY,
        netns: str | None = None,
    ) -> None:
        self.workdir = Path(workdir).absolute()
        self.netns = netns
        self.snapshotter_socket = snapshotter_socket
        self.namespace = namespace or f"starlight-{secrets.token_hex(4)}"
        self.binary = binary
        self.ctr_binary = ctr_binary
        self.root = self.workdir / "root"
        self.state = self.workdir / "state"
        self.config_path = self.workdir / "config.toml"
        super().__init__(self.workdir / "containerd.log")

    @property
    def address(self) -> str:
        return str(self.workdir / "containerd.sock")

    def start(self) -> None:
        if self.running:
            return
        for tool in (self.binary, self.ctr_binary):
            if not os.access(tool, os.X_OK):
                raise FileNotFoundError(f"{tool} not found: apt-get install containerd")
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(self.config())
        self._spawn(
            netns_argv(self.netns, [self.binary, "--config", str(self.config_path)]),
            cwd=self.workdir,
            start_new_session=True,  # a Ctrl-C in the test runner must not kill it mid-write
        )
        self._wait_ready(
            self._answers, timeout=_START_TIMEOUT, what=f"containerd at {self.address}"
        )

    def stop(self) -> None:
        if self.running:
            self._kill_tasks()  # while containerd still answers ctr
        self._terminate()
        self._unmount_leftovers()
        self._remove_namespace_leftovers()

    def ctr_argv(self, *args: str, binary: str | None = None) -> list[str]:
        """The ``ctr`` command line (``binary`` instead of ctr) for this containerd and
        namespace, for callers that start it themselves (not inside ``netns``)."""
        tool = binary if binary is not None else self.ctr_binary
        return [tool, "-a", self.address, "-n", self.namespace, *args]

    def ctr(
        self,
        *args: str,
        check: bool = True,
        input: str | None = None,
        timeout: float = _CTR_TIMEOUT,
        binary: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run ``ctr`` against this containerd; with ``check``, a failure raises
        ``CalledProcessError`` whose message includes ctr's stderr. ``binary`` runs a
        ctr-compatible client instead (e.g. ``ctr-remote``, whose ``images rpull`` pulls
        through containerd's unpacker and so through the remote-snapshot protocol)."""
        command = netns_argv(self.netns, self.ctr_argv(*args, binary=binary))
        result = subprocess.run(
            command, input=input, capture_output=True, text=True, timeout=timeout, check=False
        )
        if check and result.returncode != 0:
            raise subprocess.CalledProcessError(
                result.returncode,
                command,
                output=result.stdout,
                stderr=f"{result.stderr}\n--- containerd log (tail) ---\n{self.log()[-3000:]}",
            )
        return result

    def config(self) -> str:
        """containerd's config.toml (version 2) for this instance."""
        lines = [
            "version = 2",
            f'root = "{self.root}"',
            f'state = "{self.state}"',
            "oom_score = 0",
            # No kubelet: CRI would only add start-up work and CNI requirements.
            'disabled_plugins = ["io.containerd.grpc.v1.cri"]',
            "",
            "[grpc]",
            f'  address = "{self.address}"',
            "",
            "[ttrpc]",
            f'  address = "{self.address}.ttrpc"',
            "",
            "[debug]",
            '  level = "info"',
            "",
            "[metrics]",
            '  address = ""',
            "",
            '[plugins."io.containerd.internal.v1.opt"]',
            f'  path = "{self.workdir / "opt"}"',
        ]
        if self.snapshotter_socket is not None:
            lines += [
                "",
                f"[proxy_plugins.{SNAPSHOTTER_NAME}]",
                '  type = "snapshot"',
                f'  address = "{self.snapshotter_socket}"',
            ]
        return "\n".join(lines) + "\n"

    def _answers(self) -> bool:
        self._check_alive()
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(2)
            try:
                sock.connect(self.address)
            except (FileNotFoundError, ConnectionRefusedError):
                return False
        return self.ctr("version", check=False, timeout=20).returncode == 0

    def _kill_tasks(self) -> None:
        """Kill and delete this namespace's tasks so that their shims exit too."""
        with contextlib.suppress(subprocess.SubprocessError, OSError):
            listed = self.ctr("tasks", "list", "-q", check=False, timeout=30)
            for task in listed.stdout.split():
                self.ctr("tasks", "kill", "-a", "-s", "SIGKILL", task, check=False, timeout=30)
                self.ctr("tasks", "delete", "-f", task, check=False, timeout=30)

    def _remove_namespace_leftovers(self) -> None:
        """runc's state directory and the parent cgroups of our namespace, once empty (runc
        removes each container's own cgroup, never the namespace's)."""
        candidates = [Path("/run/containerd/runc") / self.namespace]
        candidates += Path("/sys/fs/cgroup").glob(f"*/{self.namespace}")
        candidates.append(Path("/sys/fs/cgroup") / self.namespace)
        for path in candidates:
            with contextlib.suppress(OSError):
                path.rmdir()

    def _unmount_leftovers(self) -> None:
        prefix = str(self.workdir) + "/"
        try:
            with open("/proc/self/mountinfo") as mountinfo:
                points = [line.split()[4] for line in mountinfo]
        except OSError:
            return
        # Deepest first, so nested mounts go before their parents.
        for point in sorted((p for p in points if p.startswith(prefix)), reverse=True):
            subprocess.run(["umount", "-l", point], check=False, capture_output=True)
