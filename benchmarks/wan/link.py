"""``WanLink``: two network namespaces joined by the emulated link, set up and torn down.

    with WanLink(rtt_ms=150, rate_mbit=100) as link:
        print(link.verify().render())
        registry = Registry(workdir, netns=link.cloud, listen=link.cloud_ip)
        ...

Inside each namespace: loopback, and a TUN device ``wan0`` (MTU 1500) holding the namespace's
only other address — ``10.77.0.1`` in "cloud", ``10.77.0.2`` in "edge" — as a point-to-point
link to the other. Every packet between them goes through the forwarder process
(``benchmarks.wan.forwarder``). The addresses are the same in every run: they exist only
inside the namespaces, so parallel runs never see each other's.

Both namespaces get the same host tuning, stated here because it shapes every measurement:
``tcp_no_metrics_save`` (each connection starts with a fresh slow start, as a first contact
does, instead of the ssthresh a previous run left in the route cache) and socket-buffer maxima
of at least four times the path's capacity so that the link, not a host's buffers, limits
throughput. The congestion control is the host's default (a namespace inherits it, and may
only switch to one listed in the host's ``net.ipv4.tcp_allowed_congestion_control``); pass
``congestion=`` to choose, and read ``link.congestion`` for what is in effect.

Teardown (``close()``, run by ``__exit__``, by ``atexit`` and on SIGTERM/SIGHUP, which are
turned into ``SystemExit`` while a link is open) stops the forwarder, kills whatever still
runs inside the namespaces and deletes them. A run killed with SIGKILL leaves its namespaces
behind; the next ``WanLink`` deletes them (see ``netns.remove_stale``), and its forwarder
exits by itself when its stdin (a pipe from the dead harness) reaches EOF.
"""

from __future__ import annotations

import atexit
import json
import os
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import FrameType, TracebackType
from typing import IO, TYPE_CHECKING, Any, Final, TypeVar

import attrs

from benchmarks.wan.netns import (
    NetnsError,
    call_in_netns,
    create_netns,
    delete_netns,
    netns_argv,
    new_netns_names,
    remove_stale,
    run_ip,
)

if TYPE_CHECKING:
    from benchmarks.wan.verify import LinkReport

__all__ = ["CLOUD_IP", "DEFAULT_SWEEP", "EDGE_IP", "LinkConfig", "WanLink"]

T = TypeVar("T")

DEVICE: Final = "wan0"
CLOUD_IP: Final = "10.77.0.1"
EDGE_IP: Final = "10.77.0.2"
MTU: Final = 1500
# A router buffer below this would drop every TSO burst of a sender on a fast LAN (a 64 KiB
# super-packet); ~43 full-size packets, still far below one BDP on all but the 2 ms link.
MIN_QUEUE_BYTES: Final = 64 * 1024
_READY_TIMEOUT: Final = 20.0
_STOP_TIMEOUT: Final = 5.0
_REPO_ROOT: Final = Path(__file__).resolve().parents[2]


@attrs.frozen
class LinkConfig:
    """What the link emulates: round-trip time, rate (IP bytes), router buffer.

    ``queue_bytes=None`` means one bandwidth-delay product, at least ``MIN_QUEUE_BYTES``.
    """

    rtt_ms: float = attrs.field(validator=attrs.validators.ge(0))
    rate_mbit: float = attrs.field(validator=attrs.validators.gt(0))
    queue_bytes: int | None = None
    offload: bool = True
    congestion: str | None = None  # None: the host's default
    # Most segments the sender's kernel may put in one GSO super-packet; None: about 1 ms of
    # the link's time (see effective_gso_segments).
    gso_segments: int | None = None

    @property
    def bdp_bytes(self) -> int:
        return int(self.rate_mbit * 1e6 / 8 * self.rtt_ms / 1000)

    @property
    def effective_queue_bytes(self) -> int:
        if self.queue_bytes is not None:
            return self.queue_bytes
        return max(self.bdp_bytes, MIN_QUEUE_BYTES)

    @property
    def effective_gso_segments(self) -> int:
        """The forwarder moves a super-packet as one unit (it arrives whole, and the receiver
        acknowledges it with one ACK), so its size is the grain of the emulation. Unbounded,
        the kernel sends up to 45 segments (64 KiB); that much ACK aggregation inflates the
        window of BBR (which the hosts here use) and multiplies drops at 200 Mbit/s. ~1 ms of
        link time per unit keeps the grain far below every RTT of the sweep at little CPU
        cost (17 segments at 200 Mbit/s, 8 at 100, 2 at 10)."""
        if self.gso_segments is not None:
            return self.gso_segments
        per_millisecond = self.rate_mbit * 1e6 / 8 / 1000 / MTU
        return max(2, min(64, round(per_millisecond)))

    @property
    def label(self) -> str:
        return f"{self.rtt_ms:g} ms / {self.rate_mbit:g} Mbit/s"


DEFAULT_SWEEP: Final[tuple[LinkConfig, ...]] = (
    *(LinkConfig(rtt_ms=rtt, rate_mbit=100) for rtt in (2, 50, 150, 300)),
    *(LinkConfig(rtt_ms=150, rate_mbit=rate) for rate in (10, 50, 200)),
)


# --- teardown on exit and on signals, for every open link ----------------------------------

_open_links: list[WanLink] = []
_previous_handlers: dict[int, Any] = {}
_lock = threading.Lock()
_EXIT_SIGNALS: Final = (signal.SIGTERM, signal.SIGHUP)


def _exit_on_signal(signum: int, _frame: FrameType | None) -> None:
    # SystemExit unwinds the stack, so every ``with WanLink(...)`` (and every service launcher
    # nested in it) exits normally.
    raise SystemExit(128 + signum)


def _register(link: WanLink) -> None:
    with _lock:
        if not _open_links and threading.current_thread() is threading.main_thread():
            for signum in _EXIT_SIGNALS:
                if signal.getsignal(signum) is signal.SIG_DFL:
                    _previous_handlers[signum] = signal.signal(signum, _exit_on_signal)
        _open_links.append(link)


def _unregister(link: WanLink) -> None:
    with _lock:
        if link in _open_links:
            _open_links.remove(link)
        if not _open_links and threading.current_thread() is threading.main_thread():
            for signum, previous in _previous_handlers.items():
                signal.signal(signum, previous)
            _previous_handlers.clear()


@atexit.register
def _close_all() -> None:
    for link in list(_open_links):
        link.close()


# --- the link ------------------------------------------------------------------------------


class WanLink:
    """Two namespaces ("cloud", "edge") and the emulated link between them."""

    def __init__(
        self,
        rtt_ms: float,
        rate_mbit: float,
        *,
        queue_bytes: int | None = None,
        offload: bool = True,
        congestion: str | None = None,
        gso_segments: int | None = None,
        log_path: Path | None = None,
    ) -> None:
        self.config = LinkConfig(
            rtt_ms=rtt_ms,
            rate_mbit=rate_mbit,
            queue_bytes=queue_bytes,
            offload=offload,
            congestion=congestion,
            gso_segments=gso_segments,
        )
        self.log_path = log_path
        names = new_netns_names(["cloud", "edge"])
        self.cloud = names["cloud"]
        self.edge = names["edge"]
        self.cloud_ip = CLOUD_IP
        self.edge_ip = EDGE_IP
        self.device = DEVICE
        self.forwarder_info: dict[str, Any] = {}
        self.congestion = ""  # the congestion control in effect, once open
        self._forwarder: subprocess.Popen[bytes] | None = None
        self._forwarder_log: IO[bytes] | None = None
        self._created: list[str] = []
        self._stats_lock = threading.Lock()

    @classmethod
    def for_config(cls, config: LinkConfig, *, log_path: Path | None = None) -> WanLink:
        return cls(
            config.rtt_ms,
            config.rate_mbit,
            queue_bytes=config.queue_bytes,
            offload=config.offload,
            congestion=config.congestion,
            gso_segments=config.gso_segments,
            log_path=log_path,
        )

    # --- lifecycle ---

    def __enter__(self) -> WanLink:
        self.open()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    @property
    def is_open(self) -> bool:
        return self._forwarder is not None and self._forwarder.poll() is None

    def open(self) -> None:
        if self._created or self._forwarder is not None:
            raise RuntimeError("this WanLink is already open")
        remove_stale()
        _register(self)
        try:
            for name, local, peer in (
                (self.cloud, self.cloud_ip, self.edge_ip),
                (self.edge, self.edge_ip, self.cloud_ip),
            ):
                create_netns(name)
                self._created.append(name)
                self._configure(name, local, peer)
            self._start_forwarder()
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Stop the forwarder and delete both namespaces; safe to call again."""
        process, self._forwarder = self._forwarder, None
        if process is not None:
            if process.stdin is not None:
                process.stdin.close()  # EOF: the forwarder's signal to exit
            try:
                process.wait(timeout=_STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            if process.stdout is not None:
                process.stdout.close()
        if self._forwarder_log is not None:
            self._forwarder_log.close()
            self._forwarder_log = None
        while self._created:
            delete_netns(self._created.pop())
        _unregister(self)

    # --- running things inside ---

    def netns(self, side: str) -> str:
        """The namespace name of ``side`` ("cloud", "edge", or a namespace name itself)."""
        if side == "cloud":
            return self.cloud
        if side == "edge":
            return self.edge
        if side in (self.cloud, self.edge):
            return side
        raise ValueError(f"{side!r} is neither side of this link (cloud, edge)")

    def argv(self, side: str, argv: Sequence[str]) -> list[str]:
        """``argv`` prefixed so that it runs in ``side``'s network namespace."""
        return netns_argv(self.netns(side), argv)

    def exec(self, side: str, argv: Sequence[str], **popen_kwargs: Any) -> subprocess.Popen[Any]:
        """Start ``argv`` inside ``side`` (only its network namespace differs)."""
        return subprocess.Popen(self.argv(side, argv), **popen_kwargs)

    def run(
        self, side: str, argv: Sequence[str], **run_kwargs: Any
    ) -> subprocess.CompletedProcess[Any]:
        run_kwargs.setdefault("check", False)
        return subprocess.run(self.argv(side, argv), **run_kwargs)  # noqa: PLW1510

    def call(self, side: str, function: Callable[[], T]) -> T:
        """Call ``function`` in this process on a thread inside ``side``: every socket it opens
        (an httpx client, a registry push) lives there."""
        return call_in_netns(self.netns(side), function)

    # --- the forwarder ---

    def forwarder_stats(self) -> dict[str, Any]:
        """The forwarder's counters (per direction: offered, dropped, delivered) and CPU time."""
        return self._ask("stats")

    def flows(self, *, reset: bool = False) -> list[dict[str, Any]]:
        """What each TCP connection carried since the last reset (``benchmarks.wan.flows``);
        ``reset=True`` forgets them all and returns nothing."""
        flows: list[dict[str, Any]] = self._ask("flows reset" if reset else "flows")["flows"]
        return flows

    def _ask(self, line: str) -> dict[str, Any]:
        process = self._forwarder
        if process is None or process.stdin is None or process.stdout is None:
            raise RuntimeError("the link is not open")
        with self._stats_lock:
            process.stdin.write(line.encode() + b"\n")
            process.stdin.flush()
            return self._read_message(process, timeout=_READY_TIMEOUT)

    @property
    def forwarder_pid(self) -> int:
        if self._forwarder is None:
            raise RuntimeError("the link is not open")
        return self._forwarder.pid

    def verify(self, **kwargs: Any) -> LinkReport:
        """Measure the link (see ``benchmarks.wan.verify.verify_link``)."""
        from benchmarks.wan.verify import verify_link

        return verify_link(self, **kwargs)

    # --- set-up details ---

    def _configure(self, name: str, local: str, peer: str) -> None:
        config = self.config
        run_ip("tuntap", "add", "dev", self.device, "mode", "tun", "vnet_hdr", netns=name)
        run_ip("link", "set", self.device, "mtu", str(MTU), netns=name)
        segments = str(config.effective_gso_segments)
        run_ip("link", "set", self.device, "gso_max_segs", segments, netns=name)
        run_ip("addr", "add", local, "peer", f"{peer}/32", "dev", self.device, netns=name)
        run_ip("link", "set", self.device, "up", netns=name)
        # Room for four times what the path holds (BDP + router buffer) in flight.
        buffers = max(4 * (config.bdp_bytes + config.effective_queue_bytes), 6 * 1024 * 1024)
        settings = {
            f"net/ipv6/conf/{self.device}/disable_ipv6": "1",
            "net/ipv4/tcp_no_metrics_save": "1",
            "net/ipv4/tcp_rmem": f"4096 131072 {buffers}",
            "net/ipv4/tcp_wmem": f"4096 16384 {buffers}",
        }
        congestion = Path("/proc/sys/net/ipv4/tcp_congestion_control")

        def apply() -> str:
            # /proc/sys/net shows the namespace of the thread that opens it.
            for key, value in settings.items():
                Path("/proc/sys", key).write_text(value + "\n")
            if config.congestion is not None:
                try:
                    congestion.write_text(config.congestion + "\n")
                except PermissionError as exc:
                    raise NetnsError(
                        f"congestion control {config.congestion!r} is not allowed in a network"
                        " namespace: add it to the host's"
                        " net.ipv4.tcp_allowed_congestion_control, or use the default"
                    ) from exc
            return congestion.read_text().strip()

        self.congestion = call_in_netns(name, apply)

    def _start_forwarder(self) -> None:
        config = self.config
        argv = [
            sys.executable,
            "-m",
            "benchmarks.wan.forwarder",
            f"--edge={self.edge}",
            f"--cloud={self.cloud}",
            f"--device={self.device}",
            f"--rtt-ms={config.rtt_ms}",
            f"--rate-mbit={config.rate_mbit}",
            f"--queue-bytes={config.effective_queue_bytes}",
            "--offload" if config.offload else "--no-offload",
        ]
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(_REPO_ROOT), env.get("PYTHONPATH", "")) if p
        )
        if self.log_path is not None:
            self._forwarder_log = self.log_path.open("ab")
        self._forwarder = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._forwarder_log if self._forwarder_log is not None else None,
            env=env,
            cwd=_REPO_ROOT,
            # Its own session: a Ctrl-C meant for the harness must not cut the link before the
            # harness has stopped what runs over it. It exits when its stdin closes.
            start_new_session=True,
        )
        self.forwarder_info = self._read_message(self._forwarder, timeout=_READY_TIMEOUT)
        if not self.forwarder_info.get("ready"):
            raise RuntimeError(f"the WAN forwarder did not start: {self.forwarder_info}")

    @staticmethod
    def _read_message(process: subprocess.Popen[bytes], *, timeout: float) -> dict[str, Any]:
        assert process.stdout is not None
        deadline = time.monotonic() + timeout
        line = b""
        fd = process.stdout.fileno()
        while not line.endswith(b"\n"):
            remaining = deadline - time.monotonic()
            readable, _, _ = select.select([fd], [], [], max(0.0, remaining))
            if not readable:
                raise TimeoutError(f"the WAN forwarder did not answer within {timeout:.0f}s")
            chunk = os.read(fd, 1)
            if not chunk:
                raise RuntimeError(
                    f"the WAN forwarder exited (status {process.wait()}); see its stderr"
                )
            line += chunk
        message: dict[str, Any] = json.loads(line)
        return message


if __name__ == "__main__":  # python -m benchmarks.wan.link: the link alone, from a shell
    from benchmarks.wan.link_cli import main

    sys.exit(main())
