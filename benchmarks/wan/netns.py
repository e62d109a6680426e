"""Network namespaces: create, enter, run in, and clean up after a killed run.

Only the *network* namespace is entered. ``ip netns exec`` would also give every command its own
mount namespace (it remounts ``/sys``), and then containerd, the starlight daemon and its FUSE
server would not see each other's mounts; ``nsenter --net`` does not do that.

Names carry their owner: ``slwan-<pid>-<start time>-<token>-<role>``. A namespace whose owner
process is gone (a run killed with SIGKILL, a crashed test session) is *stale*;
``remove_stale()`` deletes it and kills what still runs inside it, and ``WanLink`` calls it on
every start. The owner's start time (from ``/proc/<pid>/stat``) guards against pid reuse.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import signal
import subprocess
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Final, TypeVar

__all__ = [
    "NAME_PREFIX",
    "NetnsError",
    "call_in_netns",
    "create_netns",
    "delete_netns",
    "list_netns",
    "netns_argv",
    "netns_path",
    "netns_pids",
    "new_netns_names",
    "remove_stale",
    "run_ip",
    "setns",
]

NAME_PREFIX: Final = "slwan"
NETNS_DIR: Final = Path("/run/netns")
NSENTER: Final = "/usr/bin/nsenter"
IP: Final = "/usr/sbin/ip"
_CLONE_NEWNET: Final = 0x40000000
_NAME = re.compile(
    rf"^{NAME_PREFIX}-(?P<pid>\d+)-(?P<start>\d+)-(?P<token>[0-9a-f]+)-(?P<role>\w+)$"
)

T = TypeVar("T")


class NetnsError(RuntimeError):
    """A namespace could not be created, entered or removed (the message says which and why)."""


def netns_path(name: str) -> Path:
    return NETNS_DIR / name


def netns_argv(netns: str | None, argv: Sequence[str]) -> list[str]:
    """``argv`` run inside network namespace ``netns`` (unchanged when ``netns`` is None)."""
    if netns is None:
        return list(argv)
    return [NSENTER, f"--net={netns_path(netns)}", "--", *argv]


def run_ip(*args: str, netns: str | None = None, check: bool = True) -> str:
    """Run ``ip [-n netns] args``; a failure raises ``NetnsError`` with ip's message."""
    command = [IP, *(("-n", netns) if netns else ()), *args]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if check and result.returncode != 0:
        raise NetnsError(f"{' '.join(command)} failed: {result.stderr.strip()}")
    return result.stdout


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def setns(name: str) -> None:
    """Move the *calling thread* into network namespace ``name`` (Python 3.11 has no os.setns).

    Sockets created afterwards by this thread belong to that namespace for their whole life,
    whichever thread later uses them.
    """
    fd = os.open(netns_path(name), os.O_RDONLY | os.O_CLOEXEC)
    try:
        if _libc().setns(fd, _CLONE_NEWNET) != 0:
            errno = ctypes.get_errno()
            raise NetnsError(f"setns into {name}: {os.strerror(errno)}")
    finally:
        os.close(fd)


def call_in_netns(netns: str | None, function: Callable[[], T]) -> T:
    """Call ``function`` on a fresh thread that lives in ``netns`` and return its result.

    The thread is thrown away afterwards, so the caller's own namespace never changes. With
    ``netns=None`` the function is called directly. Whatever ``function`` raises is re-raised.
    """
    if netns is None:
        return function()
    outcome: list[T] = []
    failure: list[BaseException] = []

    def body() -> None:
        try:
            setns(netns)
            outcome.append(function())
        except BaseException as exc:
            failure.append(exc)

    thread = threading.Thread(target=body, name=f"netns-{netns}", daemon=True)
    thread.start()
    thread.join()
    if failure:
        raise failure[0]
    return outcome[0]


def _start_time(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # Field 22 (starttime); the command name (field 2) may hold spaces, so split after it.
    return int(stat.rsplit(")", 1)[1].split()[19])


def new_netns_names(roles: Sequence[str]) -> dict[str, str]:
    """Fresh names for this process, one per role, sharing one random token."""
    pid = os.getpid()
    token = os.urandom(3).hex()
    return {role: f"{NAME_PREFIX}-{pid}-{_start_time(pid)}-{token}-{role}" for role in roles}


def list_netns() -> list[str]:
    try:
        return sorted(entry.name for entry in NETNS_DIR.iterdir())
    except FileNotFoundError:
        return []


def create_netns(name: str) -> None:
    """Create ``name`` with its loopback up (containerd and the daemon talk over localhost)."""
    run_ip("netns", "add", name)
    try:
        run_ip("link", "set", "lo", "up", netns=name)
    except BaseException:
        delete_netns(name)
        raise


def netns_pids(name: str) -> list[int]:
    out = run_ip("netns", "pids", name, check=False)
    return [int(word) for word in out.split() if word.isdigit()]


def delete_netns(name: str, *, kill: bool = True) -> None:
    """Delete ``name``; with ``kill``, first SIGKILL whatever still runs inside it.

    Only namespaces this harness created come here (ours, or stale ones of a dead run), so
    their processes were started by the harness.
    """
    if kill:
        for pid in netns_pids(name):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    if netns_path(name).exists():
        run_ip("netns", "delete", name, check=False)


def _is_stale(name: str) -> bool:
    match = _NAME.match(name)
    if match is None:
        return False
    pid, start = int(match["pid"]), int(match["start"])
    return _start_time(pid) != start


def remove_stale() -> list[str]:
    """Delete namespaces left by harness runs whose process is gone; return their names."""
    removed = []
    for name in list_netns():
        if _is_stale(name):
            delete_netns(name)
            removed.append(name)
    return removed
