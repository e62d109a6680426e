"""The whole starlight deployment on one machine, real parts only:
registry → proxy → (fault-injecting link) → daemon ← containerd (with the starlight plugin).

Used by the end-to-end tests, the demo and the benchmark harness.
"""

from __future__ import annotations

import uuid
from pathlib import Path

import attrs
from click.testing import CliRunner

from benchmarks.services.containerd import Containerd
from benchmarks.services.daemon import DaemonProcess
from benchmarks.services.faulty import FaultyProxy
from benchmarks.services.proxy import ProxyProcess
from benchmarks.services.registry import Registry
from starlight_cli.main import cli
from starlight_core.reference import Reference

__all__ = ["Stack", "start_stack", "stop_stack"]


@attrs.frozen
class Stack:
    registry: Registry
    proxy: ProxyProcess
    link: FaultyProxy
    """Between the daemon and the proxy: tests throttle or cut the bundle stream here."""
    containerd: Containerd
    daemon: DaemonProcess

    def cli(self, *args: str) -> tuple[int, str, str]:
        """Run ctr-starlight against this stack's proxy and daemon."""
        result = CliRunner().invoke(
            cli,
            list(args),
            env={
                "STARLIGHT_PROXY": self.proxy.url,
                "STARLIGHT_DAEMON_SOCKET": self.daemon.control_socket,
                "STARLIGHT_CLI_CONFIG": "/nonexistent",
            },
        )
        return result.exit_code, result.stdout, result.stderr

    def pull(self, ref: Reference, *args: str) -> str:
        code, out, err = self.cli("pull", "-q", "-n", self.containerd.namespace, *args, str(ref))
        assert code == 0, f"pull failed: {err}\n--- daemon log ---\n{self.daemon.log()[-4000:]}"
        return out

    def run(self, ref: Reference, *command: str, snapshotter: str = "starlight") -> str:
        name = f"c-{uuid.uuid4().hex[:10]}"
        result = self.containerd.ctr(
            "run", "--rm", "--snapshotter", snapshotter, str(ref), name, *command
        )
        return result.stdout


def start_stack(
    workdir: Path, registry: Registry, *, content_timeout: float = 60.0, direct: bool = False
) -> Stack:
    """Start proxy, containerd and daemon. The daemon reaches the proxy through ``stack.link``
    (a fault-injecting forwarder, itself a Python process hop) unless ``direct``: measurements
    use ``direct=True`` so the forwarder's own speed does not count."""
    proxy = ProxyProcess(
        workdir / "proxy", registries=[{"host": registry.host, "plain_http": True}]
    )
    proxy.start()
    link = FaultyProxy(proxy.url)
    link.start()
    daemon_dir = workdir / "daemon"
    daemon = DaemonProcess(
        daemon_dir,
        proxy=proxy.url if direct else link.url,
        containerd_address="",
        content_timeout=content_timeout,
    )
    containerd = Containerd(workdir / "containerd", snapshotter_socket=daemon.snapshotter_socket)
    containerd.start()
    daemon.containerd_address = containerd.address
    daemon.namespace = containerd.namespace
    daemon.start()
    return Stack(registry, proxy, link, containerd, daemon)


def stop_stack(stack: Stack) -> None:
    stack.containerd.stop()
    stack.daemon.close()
    stack.link.stop()
    stack.proxy.stop()
