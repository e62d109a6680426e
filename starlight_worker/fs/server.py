"""``fused``: the layer filesystem server process.

``python -m starlight_worker.fs --socket PATH --mountpoint DIR [--timeout S] [--poll S]``

One FUSE mount at DIR presents every attached layer read-only at ``DIR/<layer_key>``, in the
form overlayfs expects of a lower directory; a control server on the unix socket PATH takes
commands (the protocol is described in ``starlight_worker.fs.protocol``).

It is its own process, started detached by the daemon, so that containers keep reading while
the daemon restarts: nothing here depends on a client staying connected. Threads:

- the FUSE thread runs libfuse's loop, which runs the callbacks on its own worker threads;
- the control server answers each connection on a thread of its own;
- the main thread owns the signals: SIGTERM/SIGINT/SIGHUP fail waiting readers, unmount
  (lazily if the mount is busy) and exit. Installing Python handlers before libfuse starts keeps
  libfuse from installing its own, which would end the loop without telling us.

A lock file next to the socket makes a second server for the same socket exit at once
(exit status 3) instead of stealing the socket.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import logging
import os
import signal
import socketserver
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from types import FrameType
from typing import Any, Final

import attrs

from starlight_core.errors import FailedPrecondition, InvalidInput, StarlightError
from starlight_worker import __version__
from starlight_worker.fs import protocol
from starlight_worker.fs.filesystem import LayerFilesystem
from starlight_worker.fs.mount import serve
from starlight_worker.fs.mountpoint import is_dead_mount, unmount
from starlight_worker.fs.protocol import EXIT_ALREADY_RUNNING

__all__ = ["EXIT_ALREADY_RUNNING", "ServerConfig", "main", "run"]

log = logging.getLogger("starlight_worker.fs")

EXIT_MOUNT_FAILED: Final = 4


@attrs.frozen
class ServerConfig:
    socket: Path
    mountpoint: Path
    content_timeout: float = 300.0
    """Seconds a read waits for a missing file before failing with EIO."""
    poll_interval: float = 1.0
    """Seconds between re-checks for a file nobody announced."""
    log_level: str = "WARNING"


class _Control:
    """Runs control requests against the filesystem (one instance per server)."""

    def __init__(self, fs: LayerFilesystem, config: ServerConfig, stop: threading.Event) -> None:
        self.fs = fs
        self.config = config
        self.stop = stop
        self.shutting_down = False

    def handle(self, request: protocol.Request) -> Any:
        op = request.op
        if op == "ping":
            return protocol.ServerInfo(
                pid=os.getpid(),
                mountpoint=str(self.config.mountpoint),
                version=__version__,
                layers=self.fs.layer_count(),
                waiting=self.fs.waiting(),
            )
        if op == "attach":
            key, directory = _need(request.layer_key, "layer_key"), request.layer_dir
            return {"path": str(self.fs.attach(key, _need(directory, "layer_dir")))}
        if op == "detach":
            return {"detached": self.fs.detach(_need(request.layer_key, "layer_key"))}
        if op == "arrived":
            key = _need(request.layer_key, "layer_key")
            return {"woken": self.fs.arrived(key, request.names)}
        if op == "list":
            return self.fs.layers()
        if op == "trace_on":
            self.fs.tracer.start()
            return {}
        if op == "trace_off":
            self.fs.tracer.stop()
            return {}
        if op == "trace_drain":
            return self.fs.tracer.drain()
        if op == "shutdown":
            # umount alone cannot tell: overlayfs holds private clones of its lower mounts, so
            # the mount unmounts fine while containers still read through it. Our own
            # bookkeeping can: a layer still attached may still be in use.
            attached, handles = self.fs.layer_count(), self.fs.open_files()
            if attached or handles:
                raise FailedPrecondition(
                    f"{attached} layers attached, {handles} files open",
                    hint="detach every layer (after unmounting its overlays) first",
                )
            why = unmount(self.config.mountpoint)
            if why is not None:
                raise FailedPrecondition(
                    f"cannot unmount {self.config.mountpoint}: {why}",
                    hint="unmount the overlays that use its layers first",
                )
            # The FUSE loop ends on its own now; the handler sets ``stop`` once it has answered.
            self.shutting_down = True
            return {}
        raise InvalidInput(f"unknown op {op!r}")


def _need(value: str | None, field: str) -> str:
    if not value:
        raise InvalidInput(f"{field} is required")
    return value


class _ConnectionHandler(socketserver.StreamRequestHandler):
    server: _ControlServer

    def handle(self) -> None:
        while True:
            try:
                line = self.rfile.readline(protocol.MAX_LINE)
            except OSError:
                return
            if not line:
                return
            if not line.endswith(b"\n"):
                self._send(protocol.encode_error(InvalidInput("request line too long")))
                return
            control = self.server.control
            try:
                answer = protocol.encode_result(control.handle(protocol.decode_request(line)))
            except StarlightError as exc:
                answer = protocol.encode_error(exc)
            except Exception as exc:
                log.exception("control request failed")
                answer = protocol.encode_error(exc)
            sent = self._send(answer)
            if control.shutting_down:
                control.stop.set()
                return
            if not sent:
                return

    def _send(self, data: bytes) -> bool:
        try:
            self.wfile.write(data)
            self.wfile.flush()
        except OSError:
            return False  # the client went away; nothing else depends on it
        return True


class _ControlServer(socketserver.ThreadingUnixStreamServer):
    daemon_threads = True
    control: _Control


def run(config: ServerConfig) -> int:
    """Serve until told to stop; returns the process exit status."""
    config.socket.parent.mkdir(parents=True, exist_ok=True)
    lock = open(f"{config.socket}.lock", "a+b")  # noqa: SIM115 - held for the process's life
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        log.error("another server already serves %s", config.socket)
        return EXIT_ALREADY_RUNNING

    if is_dead_mount(config.mountpoint):
        log.warning("%s is a dead FUSE mount; unmounting it lazily", config.mountpoint)
        unmount(config.mountpoint, lazy=True)
    config.mountpoint.mkdir(parents=True, exist_ok=True)

    stop = threading.Event()

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        log.info("signal %d: stopping", signum)
        stop.set()

    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, on_signal)

    fs = LayerFilesystem(
        config.mountpoint,
        content_timeout=config.content_timeout,
        poll_interval=config.poll_interval,
    )
    failure: list[BaseException] = []

    def fuse_main() -> None:
        try:
            serve(fs, config.mountpoint)
        except BaseException as exc:
            failure.append(exc)

    fuse_thread = threading.Thread(target=fuse_main, name="fuse", daemon=True)
    fuse_thread.start()
    while not fs.mounted.wait(0.1):
        if not fuse_thread.is_alive():
            log.error("mounting %s failed: %s", config.mountpoint, failure or "libfuse error")
            return EXIT_MOUNT_FAILED

    if config.socket.exists() or config.socket.is_symlink():
        config.socket.unlink()  # a stale socket: we hold the lock, so it is nobody's
    server = _ControlServer(str(config.socket), _ConnectionHandler)
    server.control = _Control(fs, config, stop)
    os.chmod(config.socket, 0o600)
    control_thread = threading.Thread(target=server.serve_forever, name="control", daemon=True)
    control_thread.start()
    log.info("serving %s (control at %s)", config.mountpoint, config.socket)

    control = server.control
    try:
        while not stop.wait(0.5):
            if not fuse_thread.is_alive():
                if control.shutting_down:
                    stop.wait(5)  # let the shutdown request be answered
                else:
                    log.warning("%s was unmounted from outside; exiting", config.mountpoint)
                break
    finally:
        server.shutdown()
        server.server_close()
        _unlink_quietly(config.socket)
        fs.stop()
        if fuse_thread.is_alive() and os.path.ismount(config.mountpoint):
            why = unmount(config.mountpoint)
            if why is not None:
                log.warning("%s is busy (%s); detaching it lazily", config.mountpoint, why)
                unmount(config.mountpoint, lazy=True)
        # The loop ends once the kernel drops the connection, which waits for every user of
        # the filesystem, overlayfs' private clones of the mount included.
        fuse_thread.join(timeout=10)
        if fuse_thread.is_alive():
            log.warning("the FUSE connection is still in use; exiting breaks its users")
    if failure:
        log.error("FUSE loop failed: %s", failure[0])
        return 1
    return 0


def _unlink_quietly(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


def _parse(argv: Sequence[str] | None) -> ServerConfig:
    parser = argparse.ArgumentParser(
        prog="python -m starlight_worker.fs",
        description="Serve attached Starlight layers read-only through one FUSE mount.",
    )
    parser.add_argument("--socket", required=True, type=Path, help="control socket path")
    parser.add_argument("--mountpoint", required=True, type=Path, help="FUSE mountpoint")
    parser.add_argument(
        "--timeout", type=float, default=300.0,
        help="seconds a read waits for a missing file before EIO (default 300)",
    )  # fmt: skip
    parser.add_argument(
        "--poll", type=float, default=1.0,
        help="seconds between re-checks for unannounced arrivals (default 1)",
    )  # fmt: skip
    parser.add_argument("--log-level", default=os.environ.get("STARLIGHT_FS_LOG", "WARNING"))
    args = parser.parse_args(argv)
    if args.timeout <= 0 or args.poll <= 0:
        parser.error("--timeout and --poll must be positive")
    return ServerConfig(
        socket=args.socket.absolute(),
        mountpoint=args.mountpoint.absolute(),
        content_timeout=args.timeout,
        poll_interval=args.poll,
        log_level=str(args.log_level).upper(),
    )


def main(argv: Sequence[str] | None = None) -> int:
    config = _parse(argv)
    logging.basicConfig(
        level=config.log_level,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # fusepy logs every errno reply (ENOENT, ENODATA…) at debug level: keep that quiet.
    logging.getLogger("fuse").setLevel(max(logging.INFO, logging.getLogger().level))
    return run(config)


def cli() -> None:
    """The ``starlight-fused`` console script."""
    raise SystemExit(main())
