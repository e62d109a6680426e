"""Root filesystems built the way Debian's container images are, reproducibly.

``bootstrap`` runs ``mmdebstrap --variant=minbase`` from a local repository of pinned packages
and dresses the result as the official ``debian:bookworm`` image (deb.debian.org sources, apt
set to keep no caches, no device nodes). ``run`` executes a build step inside a tree with
``chroot`` — a ``RUN`` line of a Dockerfile — in private mount and PID namespaces: ``/proc`` and
a minimal ``/dev`` are mounted for it and vanish with it, and nothing it starts outlives it.
``settle`` removes what a build leaves behind that is not part of an image (logs, apt lists and
caches, temporary files, the ldconfig aux cache, ``*-old`` backups) and clamps every mtime to
``SOURCE_DATE_EPOCH``, so a rebuild gives the same bytes.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Final

from benchmarks.images.keystore import normalise_keystore_file

__all__ = ["BuildError", "bootstrap", "copy_tree", "installed_packages", "run", "settle"]

_HOOKS: Final = (
    # The local repository seen inside the chroot; /usr merged from the start, as bookworm's
    # usr-is-merged (which the base asks for instead of the usrmerge converter) requires.
    "/usr/share/mmdebstrap/hooks/file-mirror-automount",
    "/usr/share/mmdebstrap/hooks/merged-usr",
)
PATH: Final = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
BUILD_HOSTNAME: Final = "buildkitsandbox"
"""The host name build steps see (BuildKit's, so images look as docker-built ones do)."""

# What the official image's sources look like (deb822), and its apt settings for containers:
# no package caches kept, no translations fetched.
_DEBIAN_SOURCES: Final = """\
Types: deb
URIs: http://deb.debian.org/debian
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: http://deb.debian.org/debian-security
Suites: bookworm-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
"""
_CLEAN_COMMAND: Final = (
    "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb "
    "/var/cache/apt/*.bin || true"
)
_APT_CLEAN: Final = f"""\
// Containers: keep no downloaded packages and no binary caches (they only grow layers).
DPkg::Post-Invoke {{ "{_CLEAN_COMMAND}"; }};
APT::Update::Post-Invoke {{ "{_CLEAN_COMMAND}"; }};
Dir::Cache::pkgcache "";
Dir::Cache::srcpkgcache "";
"""
_APT_NO_LANGUAGES: Final = 'Acquire::Languages "none";\n'

# Build leftovers, relative to the root. Globs; directories listed here are emptied, not removed.
_LEFTOVER_FILES: Final = (
    "var/log/dpkg.log",
    "var/log/alternatives.log",
    "var/log/bootstrap.log",
    "var/log/apt/history.log",
    "var/log/apt/term.log",
    "var/log/apt/eipp.log.xz",
    "var/cache/ldconfig/aux-cache",
    "var/lib/dbus/machine-id",
    "var/cache/debconf/*-old",
    "var/lib/dpkg/*-old",
    "var/cache/apt/*.bin",
    "var/cache/apt/archives/*.deb",
    "var/cache/apt/archives/partial/*",
    "usr/sbin/policy-rc.d",
    "root/.cache",
    "root/.wget-hsts",
)
_EMPTIED_DIRS: Final = ("var/lib/apt/lists", "tmp", "var/tmp", "dev")


class BuildError(RuntimeError):
    """A build step failed; the message carries the tail of its output."""


def _check(result: subprocess.CompletedProcess[str], what: str) -> None:
    if result.returncode != 0:
        output = (result.stdout or "") + (result.stderr or "")
        raise BuildError(f"{what} failed (exit {result.returncode}):\n{output[-6000:]}")


def bootstrap(target: Path, repository: str, *, epoch: int) -> None:
    """A minbase bookworm tree at ``target`` (must not exist) from ``repository`` (a
    ``sources.list`` line: the local repository of pinned packages)."""
    if target.exists():
        raise FileExistsError(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    env = {**_clean_env(epoch), "TMPDIR": str(target.parent)}
    # In a private mount namespace: a failing mmdebstrap leaves its bind mounts behind.
    result = subprocess.run(
        [
            "unshare",
            "--mount",
            "--uts",
            "--propagation",
            "private",
            "sh",
            "-c",
            'hostname "$BUILD_HOSTNAME" && exec "$@"',
            "mmdebstrap",
            "mmdebstrap",
            "--mode=root",
            "--variant=minbase",
            "--format=directory",
            *(f"--hook-dir={hooks}" for hooks in _HOOKS),
            '--aptopt=Acquire::Languages "none"',
            "--quiet",
            "bookworm",
            str(target),
            repository,
        ],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    _check(result, "mmdebstrap")
    # The mirror hook leaves the empty mount point of the repository (its host path) behind.
    mirror = re.search(r"file://(/\S+)", repository)
    if mirror is not None:
        with contextlib.suppress(OSError):
            os.removedirs(target / mirror.group(1).lstrip("/"))
    apt = target / "etc" / "apt"
    (apt / "sources.list").unlink(missing_ok=True)
    (apt / "sources.list.d" / "debian.sources").write_text(_DEBIAN_SOURCES)
    (apt / "apt.conf.d" / "docker-clean").write_text(_APT_CLEAN)
    (apt / "apt.conf.d" / "docker-no-languages").write_text(_APT_NO_LANGUAGES)
    # The runtime provides these (ctr/runc bind-mount them); the build host's must not leak.
    for name in ("etc/resolv.conf", "etc/hostname", "etc/hosts"):
        (target / name).unlink(missing_ok=True)
    machine_id = target / "etc" / "machine-id"
    if machine_id.exists():
        machine_id.write_text("")
    settle(target, epoch=epoch)


def _clean_env(epoch: int) -> dict[str, str]:
    return {
        "PATH": PATH,
        "HOME": "/root",
        "LC_ALL": "C.UTF-8",
        "LANG": "C.UTF-8",
        "SOURCE_DATE_EPOCH": str(epoch),
        "DEBIAN_FRONTEND": "noninteractive",
        "DEBCONF_NONINTERACTIVE_SEEN": "true",
        "PYTHONHASHSEED": "0",
        "PIP_DISABLE_PIP_VERSION_CHECK": "1",
        "PIP_NO_CACHE_DIR": "1",
        "TZ": "UTC",
        "BUILD_HOSTNAME": BUILD_HOSTNAME,
    }


# Runs as PID 1 of a new PID namespace with private mount and UTS namespaces: mounts made
# here are never seen by the host and disappear with the namespace; when this script ends, the
# kernel kills whatever the step left running; a package that records the host name (a
# certificate's subject, a config file) records the same fixed name on every build host.
_WRAPPER: Final = r"""
set -e
root="$1"; shift
hostname "$BUILD_HOSTNAME"
mount -t proc proc "$root/proc"
mount -t tmpfs -o mode=0755,size=16m starlight-dev "$root/dev"
mknod -m 666 "$root/dev/null" c 1 3
mknod -m 666 "$root/dev/zero" c 1 5
mknod -m 666 "$root/dev/full" c 1 7
mknod -m 666 "$root/dev/random" c 1 8
mknod -m 666 "$root/dev/urandom" c 1 9
mknod -m 666 "$root/dev/tty" c 5 0
ln -s /proc/self/fd "$root/dev/fd"
mkdir -m 755 "$root/dev/pts" "$root/dev/shm"
while [ "$1" != "--" ]; do
    mount --bind "$1" "$root/$2"
    shift 2
done
shift
chroot "$root" /bin/sh -ec "$1"
"""

# Services must not start while a package is installed into a tree (no init runs there).
_POLICY: Final = "#!/bin/sh\nexit 101\n"


def run(
    root: Path,
    script: str,
    *,
    epoch: int,
    binds: Mapping[str, Path] | None = None,
    env: Mapping[str, str] | None = None,
) -> str:
    """Run ``script`` (``sh -e``) chrooted into ``root``; ``binds`` maps an existing empty
    directory of the tree (e.g. ``mnt``) to a host directory mounted there for the step.
    Returns the step's output; raises ``BuildError`` when it fails."""
    policy = root / "usr" / "sbin" / "policy-rc.d"
    policy.write_text(_POLICY)
    policy.chmod(0o755)
    args: list[str] = []
    for inside, outside in (binds or {}).items():
        args += [str(outside), inside.strip("/")]
    command = [
        "unshare",
        "--mount",
        "--uts",
        "--pid",
        "--fork",
        "--propagation",
        "private",
        "sh",
        "-c",
        _WRAPPER,
        "wrapper",
        str(root),
        *args,
        "--",
        script,
    ]
    try:
        result = subprocess.run(
            command,
            env={**_clean_env(epoch), **(env or {})},
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            check=False,
        )
    finally:
        policy.unlink(missing_ok=True)
    _check(result, f"build step `{script.strip().splitlines()[0][:80]}`")
    return result.stdout + result.stderr


def settle(root: Path, *, epoch: int) -> None:
    """Remove build leftovers, date the Java CA keystore (it records when each certificate was
    added) and clamp every mtime to ``epoch`` (never moving one forward)."""
    for pattern in _LEFTOVER_FILES:
        for path in root.glob(pattern):
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)
    for name in _EMPTIED_DIRS:
        directory = root / name
        if not directory.is_dir():
            continue
        for child in directory.iterdir():
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child)
            else:
                child.unlink()
    limit = epoch * 1_000_000_000
    keystore = root / "etc" / "ssl" / "certs" / "java" / "cacerts"
    # Made in this step (not inherited from an earlier one, already settled at its own date).
    if keystore.is_file() and not keystore.is_symlink() and keystore.stat().st_mtime_ns > limit:
        normalise_keystore_file(keystore, epoch)
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            entry = os.path.join(dirpath, name)
            if os.lstat(entry).st_mtime_ns > limit:
                os.utime(entry, ns=(limit, limit), follow_symlinks=False)
    if os.lstat(root).st_mtime_ns > limit:
        os.utime(root, ns=(limit, limit))


def copy_tree(source: Path, target: Path) -> None:
    """A faithful copy (owners, modes, times, xattrs, hard links, special files)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(
        ["cp", "-a", "--reflink=auto", str(source), str(target)],
        capture_output=True,
        text=True,
        check=False,
    )
    _check(result, f"copying {source}")


def installed_packages(root: Path) -> set[str]:
    """``name=version`` of every package dpkg considers installed in ``root``."""
    status = (root / "var" / "lib" / "dpkg" / "status").read_text()
    installed = set()
    for block in status.split("\n\n"):
        fields = dict(
            line.split(": ", 1) for line in block.splitlines() if ": " in line and line[0] != " "
        )
        if fields.get("Status", "").endswith(" installed"):
            installed.add(f"{fields['Package']}={fields['Version']}")
    return installed
