"""The whole starlight deployment on one machine, real parts only:
registry → proxy → (fault-injecting link) → daemon ← containerd (with the starlight plugin).

Across an emulated WAN (``benchmarks.wan``): ``start_wan_cloud`` puts registry and proxy in the
link's cloud namespace, ``start_wan_edge`` containerd and the daemon in its edge namespace.

Used by the end-to-end tests, the demo and the benchmark harness.
"""

from __future__ import annotations

import os
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import attrs
from click.testing import CliRunner

from benchmarks.services.containerd import Containerd
from benchmarks.services.daemon import DaemonProcess
from benchmarks.services.faulty import FaultyProxy
from benchmarks.services.proxy import ProxyProcess
from benchmarks.services.registry import Registry
from benchmarks.wan.link import WanLink
from starlight_cli.main import cli
from starlight_core.reference import Reference

__all__ = [
    "Stack",
    "WanCloud",
    "WanEdge",
    "start_stack",
    "start_wan_cloud",
    "start_wan_edge",
    "stop_stack",
    "stop_wan_cloud",
    "stop_wan_edge",
]

T = TypeVar("T")


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
    workdir: Path,
    registry: Registry,
    *,
    content_timeout: float = 60.0,
    direct: bool = False,
    metrics: bool = False,
    extra: dict[str, str] | None = None,
    before_daemon: Callable[[DaemonProcess], None] | None = None,
) -> Stack:
    """Start proxy, containerd and daemon. The daemon reaches the proxy through ``stack.link``
    (a fault-injecting forwarder, itself a Python process hop) unless ``direct``: measurements
    use ``direct=True`` so the forwarder's own speed does not count. ``metrics`` serves the
    daemon's metrics, ``extra`` sets daemon config keys, ``before_daemon`` runs once the
    daemon's directories are known, before it starts (e.g. to mount its root)."""
    proxy = ProxyProcess(
        workdir / "proxy", registries=[{"host": registry.host, "plain_http": True}]
    )
    proxy.start()
    link = FaultyProxy(proxy.url)
    link.start()
    daemon = DaemonProcess(
        workdir / "daemon",
        proxy=proxy.url if direct else link.url,
        containerd_address="",
        content_timeout=content_timeout,
        metrics=metrics,
        extra=extra,
    )
    containerd = Containerd(workdir / "containerd", snapshotter_socket=daemon.snapshotter_socket)
    containerd.start()
    daemon.containerd_address = containerd.address
    daemon.namespace = containerd.namespace
    if before_daemon is not None:
        before_daemon(daemon)
    daemon.start()
    wait_snapshotter_reachable(containerd)
    return Stack(registry, proxy, link, containerd, daemon)


def snapshotter_reachable(containerd: Containerd) -> bool:
    """containerd (re)connects to the starlight snapshotter on its own schedule (gRPC backoff
    once the socket appears or comes back): until then its calls to it fail at once."""
    ls = containerd.ctr("snapshots", "--snapshotter", "starlight", "ls", check=False)
    return ls.returncode == 0


def wait_snapshotter_reachable(containerd: Containerd, timeout: float = 60.0) -> None:
    """Block until containerd reaches the starlight snapshotter (after a daemon start)."""
    deadline = time.monotonic() + timeout
    while not snapshotter_reachable(containerd):
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"containerd did not reach the starlight snapshotter within {timeout:.0f}s"
            )
        time.sleep(0.1)


def stop_stack(stack: Stack) -> None:
    stack.containerd.stop()
    stack.daemon.close()
    stack.link.stop()
    stack.proxy.stop()


# --- across an emulated WAN link (benchmarks.wan) -------------------------------------------

CLOUD_REGISTRY_PORT = 5800
CLOUD_PROXY_PORT = 8090


@attrs.frozen
class WanCloud:
    """Registry and proxy in the link's cloud namespace, on fixed ports of its address (the
    namespace is private, so fixed ports clash with nothing): image references and the
    proxy's database stay valid when a later link brings them up again on the same work
    directory."""

    link: WanLink
    registry: Registry
    proxy: ProxyProcess

    def call(self, function: Callable[[], T]) -> T:
        """Run ``function`` on a thread inside the cloud namespace (pushes, notify)."""
        return self.link.call("cloud", function)


@attrs.frozen
class WanEdge:
    """containerd (with the starlight plugin) and a starlight-daemon in the edge namespace;
    the daemon reaches the proxy, and containerd's stock pulls reach the registry, over the
    link."""

    link: WanLink
    containerd: Containerd
    daemon: DaemonProcess

    def cli_argv(self, *args: str) -> list[str]:
        """``ctr-starlight ARGS`` against this edge's daemon, run inside the edge namespace."""
        cli = str(Path(sys.executable).with_name("ctr-starlight"))
        return self.link.argv("edge", [cli, *args])

    def cli_env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("STARLIGHT_")}
        env["STARLIGHT_DAEMON_SOCKET"] = self.daemon.control_socket
        env["STARLIGHT_PROXY"] = self.daemon.proxy
        env["STARLIGHT_CLI_CONFIG"] = "/nonexistent"
        return env


def start_wan_cloud(workdir: Path, link: WanLink) -> WanCloud:
    """Start (or start again, on the same ``workdir``) the registry and proxy in ``cloud``."""
    registry = Registry(
        workdir / "registry", netns=link.cloud, listen=link.cloud_ip, port=CLOUD_REGISTRY_PORT
    )
    registry.start()
    try:
        proxy = ProxyProcess(
            workdir / "proxy",
            registries=[{"host": registry.host, "plain_http": True}],
            netns=link.cloud,
            listen=link.cloud_ip,
            port=CLOUD_PROXY_PORT,
        )
        proxy.start()
    except BaseException:
        registry.stop()
        raise
    return WanCloud(link, registry, proxy)


def stop_wan_cloud(cloud: WanCloud) -> None:
    try:
        cloud.proxy.stop()
    finally:
        cloud.registry.stop()


def start_wan_edge(workdir: Path, cloud: WanCloud, *, content_timeout: float = 300.0) -> WanEdge:
    """Start a fresh worker (containerd and daemon) under ``workdir`` in ``edge``."""
    link = cloud.link
    daemon = DaemonProcess(
        workdir / "daemon",
        proxy=cloud.proxy.url,
        containerd_address="",
        content_timeout=content_timeout,
        netns=link.edge,
    )
    containerd = Containerd(
        workdir / "containerd", snapshotter_socket=daemon.snapshotter_socket, netns=link.edge
    )
    containerd.start()
    try:
        daemon.containerd_address = containerd.address
        daemon.namespace = containerd.namespace
        daemon.start()
        wait_snapshotter_reachable(containerd)
    except BaseException:
        containerd.stop()
        daemon.close()
        raise
    return WanEdge(link, containerd, daemon)


def stop_wan_edge(edge: WanEdge) -> None:
    try:
        edge.containerd.stop()
    finally:
        edge.daemon.close()
