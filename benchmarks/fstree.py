"""Snapshot a directory tree with everything a root filesystem is made of, and compare two.

Names, types, permission bits (incl. setuid/setgid/sticky), owners, mtimes (ns), sizes,
symlink targets, device numbers, xattrs, content digests, and which names share an inode
(hard links). Used to prove that two ways of producing a root filesystem agree.
"""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Iterable, Mapping
from pathlib import Path

import attrs

__all__ = ["Node", "diff_trees", "snapshot_tree"]


@attrs.frozen
class Node:
    kind: str
    mode: int
    uid: int
    gid: int
    mtime_ns: int | None
    size: int
    link: str = ""
    rdev: tuple[int, int] = (0, 0)
    xattrs: tuple[tuple[str, bytes], ...] = ()
    digest: str = ""
    links: int = 1
    inode_group: str = ""
    """For hard links: the smallest name sharing this inode (stable across trees)."""


def _kind(st: os.stat_result) -> str:
    for test, name in (
        (stat.S_ISDIR, "dir"),
        (stat.S_ISREG, "file"),
        (stat.S_ISLNK, "symlink"),
        (stat.S_ISCHR, "char"),
        (stat.S_ISBLK, "block"),
        (stat.S_ISFIFO, "fifo"),
        (stat.S_ISSOCK, "socket"),
    ):
        if test(st.st_mode):
            return name
    return "unknown"


def _xattrs(path: str, skip: Iterable[str]) -> tuple[tuple[str, bytes], ...]:
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError:
        return ()
    result = []
    for name in sorted(names):
        if any(name.startswith(prefix) for prefix in skip):
            continue
        try:
            result.append((name, os.getxattr(path, name, follow_symlinks=False)))
        except OSError:
            continue
    return tuple(result)


def snapshot_tree(
    root: Path | str,
    *,
    dir_mtimes: bool = True,
    skip_xattrs: Iterable[str] = ("trusted.overlay.",),
    exclude: Iterable[str] = (),
) -> dict[str, Node]:
    """Walk ``root`` (not following symlinks, not crossing into other mounts' contents)."""
    root = str(root)
    skip = tuple(skip_xattrs)
    excluded = set(exclude)
    nodes: dict[str, Node] = {}
    inodes: dict[tuple[int, int], list[str]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = os.path.relpath(dirpath, root)
        dirnames.sort()
        dirnames[:] = [
            d for d in dirnames if os.path.normpath(os.path.join(rel_dir, d)) not in excluded
        ]
        for name in [*dirnames, *sorted(filenames)]:
            path = os.path.join(dirpath, name)
            rel = os.path.normpath(os.path.join(rel_dir, name))
            if rel in excluded:
                continue
            st = os.lstat(path)
            kind = _kind(st)
            digest = ""
            if kind == "file":
                with open(path, "rb") as handle:
                    digest = hashlib.file_digest(handle, "sha256").hexdigest()
                if st.st_nlink > 1:
                    inodes.setdefault((st.st_dev, st.st_ino), []).append(rel)
            nodes[rel] = Node(
                kind=kind,
                mode=stat.S_IMODE(st.st_mode),
                uid=st.st_uid,
                gid=st.st_gid,
                mtime_ns=None if (kind == "dir" and not dir_mtimes) else st.st_mtime_ns,
                size=st.st_size if kind in ("file", "symlink") else 0,
                link=os.readlink(path) if kind == "symlink" else "",
                rdev=(os.major(st.st_rdev), os.minor(st.st_rdev))
                if kind in ("char", "block")
                else (0, 0),
                xattrs=_xattrs(path, skip),
                digest=digest,
                links=st.st_nlink if kind == "file" else 1,
            )
    for names in inodes.values():
        group = min(names)
        for name in names:
            nodes[name] = attrs.evolve(nodes[name], inode_group=group)
    return nodes


def diff_trees(a: Mapping[str, Node], b: Mapping[str, Node]) -> list[str]:
    """Human-readable differences between two snapshots (empty when equal)."""
    problems = []
    for name in sorted(set(a) | set(b)):
        if name not in b:
            problems.append(f"only in first: {name}")
        elif name not in a:
            problems.append(f"only in second: {name}")
        elif a[name] != b[name]:
            fields = [
                f"{f.name}: {getattr(a[name], f.name)!r} != {getattr(b[name], f.name)!r}"
                for f in attrs.fields(Node)
                if getattr(a[name], f.name) != getattr(b[name], f.name)
            ]
            problems.append(f"{name}: " + "; ".join(fields))
    return problems
