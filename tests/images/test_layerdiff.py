"""The tree diff that makes application layers: unpacking base + diff gives the new tree.

Each case builds a ``before`` and an ``after`` tree on disk, makes the base layer (the whole
``before`` tree) and the diff layer, and stacks the two with ``starlight_core.fsview.merge`` —
the model of what containerd's overlayfs snapshotter shows — which must equal ``after``
name by name: type, mode, owner, mtime, content, link target, xattrs, hard links.
"""

from __future__ import annotations

import io
import os
import shutil
import stat
import tarfile
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from benchmarks.images.layerdiff import (
    OPAQUE_MARKER,
    TreeSnapshot,
    diff_layer,
    snapshot,
    tree_layer,
)
from starlight_core.fsview import merge
from starlight_core.layer.toc import EntryType
from starlight_core.testing import convert_bytes

T0 = 1_700_000_000
T1 = 1_700_100_000

# (kind, mode, uid, gid, mtime, size, digest, link target, xattrs)
Summary = tuple[str, int, int, int, int, int, str, str, tuple[tuple[str, bytes], ...]]

_KIND = {
    EntryType.FILE: "file",
    EntryType.DIR: "dir",
    EntryType.SYMLINK: "symlink",
    EntryType.CHAR: "char",
    EntryType.BLOCK: "block",
    EntryType.FIFO: "fifo",
}


def _merged(layers: list[bytes]) -> tuple[dict[str, Summary], list[set[str]]]:
    tocs = [convert_bytes(layer)[1] for layer in layers]
    view = merge(tocs)
    result: dict[str, Summary] = {}
    inodes: dict[tuple[int, int], set[str]] = {}
    for name, node in view.items():
        if name == "":
            continue
        entry = node.entry
        digest = str(entry.content_digest or "").removeprefix("sha256:")
        result[name] = (
            _KIND[entry.type],
            entry.mode,
            entry.uid,
            entry.gid,
            entry.mtime_ns // 1_000_000_000,
            entry.size if entry.type is EntryType.FILE else 0,
            digest,
            entry.linkname if entry.type is EntryType.SYMLINK else "",
            tuple(sorted(entry.xattrs.items())),
        )
        if node.inode is not None and entry.type is EntryType.FILE:
            inodes.setdefault(node.inode, set()).add(name)
    return result, sorted((g for g in inodes.values() if len(g) > 1), key=sorted)


def _expected(tree: TreeSnapshot) -> tuple[dict[str, Summary], list[set[str]]]:
    result = {
        name: (n.kind, n.mode, n.uid, n.gid, n.mtime, n.size, n.digest, n.target, n.xattrs)
        for name, n in tree.nodes.items()
    }
    groups = {frozenset(g) for g in tree.links.values()}
    return result, sorted((set(g) for g in groups), key=sorted)


def _names(layer: bytes) -> list[str]:
    with tarfile.open(fileobj=io.BytesIO(layer)) as archive:
        return [m.name.rstrip("/") for m in archive.getmembers()]


def _members(layer: bytes) -> dict[str, tarfile.TarInfo]:
    with tarfile.open(fileobj=io.BytesIO(layer)) as archive:
        return {m.name.rstrip("/"): m for m in archive.getmembers()}


def _write(path: Path, data: bytes = b"data\n", *, mode: int = 0o644, mtime: int = T0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    path.chmod(mode)
    os.utime(path, (mtime, mtime))


def _settle(root: Path, mtime: int) -> None:
    """Every name gets ``mtime`` (as a build's clamp to SOURCE_DATE_EPOCH would do)."""
    for dirpath, dirnames, filenames in os.walk(root, topdown=False):
        for name in dirnames + filenames:
            os.utime(os.path.join(dirpath, name), (mtime, mtime), follow_symlinks=False)
    os.utime(root, (mtime, mtime))


def _check(before: Path, after: Path) -> bytes:
    """The diff layer, after checking base + diff == after (and base alone == before)."""
    base = tree_layer(before)
    assert _merged([base]) == _expected(snapshot(before))
    diff = diff_layer(before, after)
    assert _merged([base, diff]) == _expected(snapshot(after))
    return diff


@pytest.fixture
def trees(tmp_path: Path) -> tuple[Path, Path, Callable[[], bytes]]:
    """``before`` and ``after`` (filled by the test, ``after`` starts as a copy of
    ``before`` when ``fork()`` is called), and ``fork`` itself."""
    before = tmp_path / "before"
    after = tmp_path / "after"
    before.mkdir()

    def fork() -> bytes:
        _settle(before, T0)
        shutil.copytree(before, after, symlinks=True)
        _settle(after, T0)
        return b""

    return before, after, fork


def test_identical_trees_give_an_empty_layer(tmp_path: Path) -> None:
    root = tmp_path / "root"
    _write(root / "etc" / "hostname", b"box\n")
    (root / "bin").mkdir()
    (root / "bin" / "sh").symlink_to("dash")
    _settle(root, T0)
    assert _names(diff_layer(root, root)) == []


def test_added_changed_and_untouched_files(trees: tuple[Path, Path, Callable[[], bytes]]) -> None:
    before, after, fork = trees
    _write(before / "etc" / "keep", b"same\n")
    _write(before / "etc" / "content", b"old\n")
    _write(before / "etc" / "mode", b"x\n")
    _write(before / "etc" / "time", b"t\n")
    _write(before / "usr" / "share" / "doc" / "deep", b"deep\n")
    fork()
    _write(after / "etc" / "content", b"new content\n")
    (after / "etc" / "mode").chmod(0o4755)
    os.utime(after / "etc" / "time", (T1, T1))
    _write(after / "usr" / "share" / "doc" / "added", b"added\n")
    _write(after / "srv" / "new" / "file", b"brand new\n")
    for directory in ("etc", "usr/share/doc", "srv", "srv/new"):
        os.utime(after / directory, (T1, T1))
    diff = _check(before, after)
    names = _names(diff)
    assert "etc/keep" not in names
    assert "usr/share/doc/deep" not in names
    # Parents come with what they hold, before it: a layer records every directory it touches.
    assert names == [
        "etc",
        "etc/content",
        "etc/mode",
        "etc/time",
        "srv",
        "srv/new",
        "srv/new/file",
        "usr",
        "usr/share",
        "usr/share/doc",
        "usr/share/doc/added",
    ]
    assert _members(diff)["etc/mode"].mode == 0o4755


def test_removed_names_become_whiteouts_top_most_only(
    trees: tuple[Path, Path, Callable[[], bytes]],
) -> None:
    before, after, fork = trees
    _write(before / "etc" / "gone", b"bye\n")
    _write(before / "etc" / "stays", b"hi\n")
    _write(before / "opt" / "tool" / "bin" / "tool", b"#!\n", mode=0o755)
    _write(before / "opt" / "tool" / "lib" / "x.so", b"elf\n")
    _write(before / "opt" / "other", b"o\n")
    fork()
    (after / "etc" / "gone").unlink()
    shutil.rmtree(after / "opt" / "tool")
    _settle(after, T0)
    diff = _check(before, after)
    assert _names(diff) == ["etc", "etc/.wh.gone", "opt", "opt/.wh.tool"]
    whiteout = _members(diff)["etc/.wh.gone"]
    assert whiteout.isfile()
    assert whiteout.size == 0


def test_directory_whose_old_names_are_all_gone_is_opaque(
    trees: tuple[Path, Path, Callable[[], bytes]],
) -> None:
    before, after, fork = trees
    _write(before / "var" / "lib" / "apt" / "lists" / "lock", b"")
    _write(before / "var" / "lib" / "apt" / "lists" / "partial" / "x", b"x\n")
    _write(before / "app" / "v1" / "main.py", b"print(1)\n")
    _write(before / "app" / "v1" / "util.py", b"u\n")
    fork()
    shutil.rmtree(after / "var" / "lib" / "apt" / "lists")
    (after / "var" / "lib" / "apt" / "lists").mkdir()
    shutil.rmtree(after / "app" / "v1")
    _write(after / "app" / "v1" / "main.py", b"print(2)\n")
    _write(after / "app" / "v1" / "new.py", b"n\n")
    (after / "app" / "v1" / "util.py").unlink(missing_ok=True)
    _settle(after, T0)
    _write(after / "app" / "v1" / "main.py", b"print(2)\n")  # replaced: main.py kept its name
    diff = _check(before, after)
    names = _names(diff)
    assert f"var/lib/apt/lists/{OPAQUE_MARKER}" in names
    assert not any(n.startswith("var/lib/apt/lists/.wh.") and OPAQUE_MARKER not in n for n in names)
    # app/v1 keeps one old name (main.py): per-name whiteouts, no opaque marker.
    assert "app/v1/.wh.util.py" in names
    assert f"app/v1/{OPAQUE_MARKER}" not in names


def test_replaced_directory_content_is_opaque_with_new_children(
    trees: tuple[Path, Path, Callable[[], bytes]],
) -> None:
    before, after, fork = trees
    _write(before / "srv" / "www" / "index.html", b"old site\n")
    _write(before / "srv" / "www" / "img" / "logo.png", b"png\n")
    fork()
    shutil.rmtree(after / "srv" / "www")
    _write(after / "srv" / "www" / "app.js", b"new site\n")
    _settle(after, T0)
    diff = _check(before, after)
    assert _names(diff) == ["srv", "srv/www", f"srv/www/{OPAQUE_MARKER}", "srv/www/app.js"]


def test_type_changes(trees: tuple[Path, Path, Callable[[], bytes]]) -> None:
    before, after, fork = trees
    _write(before / "d2f" / "inner" / "file", b"inner\n")
    _write(before / "f2d", b"was a file\n")
    _write(before / "f2l", b"was a file\n")
    (before / "l2f").symlink_to("f2d")
    fork()
    shutil.rmtree(after / "d2f")
    _write(after / "d2f", b"now a file\n")
    (after / "f2d").unlink()
    _write(after / "f2d" / "child", b"now a dir\n")
    (after / "f2l").unlink()
    (after / "f2l").symlink_to("d2f")
    (after / "l2f").unlink()
    _write(after / "l2f", b"now a file\n")
    _settle(after, T0)
    diff = _check(before, after)
    members = _members(diff)
    assert members["d2f"].isfile()
    assert members["f2d"].isdir()
    assert members["f2l"].issym()
    assert members["l2f"].isfile()
    # Unpacking the new entry replaces the old one: no whiteout is needed (containerd's differ
    # writes none either), and the old directory's children are not listed.
    assert not any(".wh." in name for name in members)
    assert "d2f/inner" not in members


def test_symlinks(trees: tuple[Path, Path, Callable[[], bytes]]) -> None:
    before, after, fork = trees
    (before / "usr" / "bin").mkdir(parents=True)
    (before / "usr" / "bin" / "python3").symlink_to("python3.11")
    (before / "usr" / "bin" / "awk").symlink_to("/etc/alternatives/awk")
    (before / "dangling").symlink_to("/nowhere")
    fork()
    (after / "usr" / "bin" / "python3").unlink()
    (after / "usr" / "bin" / "python3").symlink_to("python3.12")
    (after / "usr" / "bin" / "pip").symlink_to("pip3")
    _settle(after, T0)
    diff = _check(before, after)
    members = _members(diff)
    assert members["usr/bin/python3"].linkname == "python3.12"
    assert members["usr/bin/pip"].linkname == "pip3"
    assert "usr/bin/awk" not in members
    assert "dangling" not in members


def test_hard_links_new_name_for_an_old_file(
    trees: tuple[Path, Path, Callable[[], bytes]],
) -> None:
    before, after, fork = trees
    _write(before / "usr" / "bin" / "perl5.36", b"perl binary\n", mode=0o755)
    _write(before / "usr" / "bin" / "unrelated", b"u\n")
    fork()
    os.link(after / "usr" / "bin" / "perl5.36", after / "usr" / "bin" / "perl")
    _settle(after, T0)
    diff = _check(before, after)
    members = _members(diff)
    # The whole group travels: a hard link can only point to an earlier entry of its layer.
    assert members["usr/bin/perl"].isfile()
    assert members["usr/bin/perl"].size == len(b"perl binary\n")
    assert members["usr/bin/perl5.36"].islnk()
    assert members["usr/bin/perl5.36"].linkname == "usr/bin/perl"
    assert "usr/bin/unrelated" not in members


def test_hard_links_in_a_new_tree_and_broken_up(
    trees: tuple[Path, Path, Callable[[], bytes]],
) -> None:
    before, after, fork = trees
    _write(before / "a" / "one", b"shared\n")
    os.link(before / "a" / "one", before / "b-two")
    _write(before / "c" / "solo", b"solo\n")
    fork()
    # copytree does not keep hard links: make them again in the copy, then break one group.
    (after / "b-two").unlink()
    os.link(after / "a" / "one", after / "b-two")
    _settle(after, T0)
    assert _names(diff_layer(before, after)) == []
    (after / "b-two").unlink()
    _write(after / "b-two", b"shared\n")
    _settle(after, T0)
    diff = _check(before, after)
    assert set(_names(diff)) == {"a", "a/one", "b-two"}
    assert not any(m.islnk() for m in _members(diff).values())


def _user_xattrs_supported(path: Path) -> bool:
    try:
        os.setxattr(path, "user.probe", b"1")
    except OSError:
        return False
    os.removexattr(path, "user.probe")
    return True


def test_xattrs_and_capabilities(trees: tuple[Path, Path, Callable[[], bytes]]) -> None:
    before, after, fork = trees
    _write(before / "bin" / "ping", b"elf\n", mode=0o755)
    _write(before / "etc" / "labelled", b"l\n")
    if not _user_xattrs_supported(before / "etc" / "labelled"):
        pytest.skip("this filesystem has no user xattrs")
    fork()
    os.setxattr(after / "etc" / "labelled", "user.color", b"blue")
    capability = bytes.fromhex("0000000200200000000000000000000000000000")  # cap_net_raw+ep
    try:
        os.setxattr(after / "bin" / "ping", "security.capability", capability)
    except PermissionError:
        pytest.skip("setting file capabilities needs CAP_SETFCAP")
    _settle(after, T0)
    diff = _check(before, after)
    members = _members(diff)
    assert members["etc/labelled"].pax_headers["SCHILY.xattr.user.color"] == "blue"
    raw = members["bin/ping"].pax_headers["SCHILY.xattr.security.capability"]
    assert raw.encode("utf-8", "surrogateescape") == capability


@pytest.mark.skipif(os.geteuid() != 0, reason="changing owners needs root")
def test_owners_are_numeric_and_kept(trees: tuple[Path, Path, Callable[[], bytes]]) -> None:
    before, after, fork = trees
    _write(before / "var" / "lib" / "redis" / "dump.rdb", b"rdb\n")
    fork()
    os.chown(after / "var" / "lib" / "redis", 101, 102)
    os.chown(after / "var" / "lib" / "redis" / "dump.rdb", 101, 102)
    _settle(after, T0)
    diff = _check(before, after)
    member = _members(diff)["var/lib/redis/dump.rdb"]
    assert (member.uid, member.gid, member.uname, member.gname) == (101, 102, "", "")


def test_special_files_and_sockets(tmp_path: Path) -> None:
    import socket

    root = tmp_path / "root"
    root.mkdir()
    os.mkfifo(root / "fifo")
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(root / "sock"))
    if os.geteuid() == 0:
        os.mknod(root / "null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    _settle(root, T0)
    members = _members(tree_layer(root))
    assert members["fifo"].isfifo()
    assert "sock" not in members  # a tar layer cannot hold a socket
    if os.geteuid() == 0:
        assert (members["null"].devmajor, members["null"].devminor) == (1, 3)


def test_layers_are_deterministic(tmp_path: Path) -> None:
    def build(root: Path) -> None:
        for i in range(30):
            _write(root / f"d{i % 4}" / f"f{i}", bytes([i]) * (i * 100), mode=0o600 + i % 3)
        (root / "link").symlink_to("d1/f1")
        os.link(root / "d2" / "f2", root / "d3" / "hard")
        _settle(root, T0)

    one, two = tmp_path / "one", tmp_path / "two"
    build(one)
    build(two)
    layer = tree_layer(one)
    assert layer == tree_layer(two)
    assert layer == tree_layer(one)
    for info in _members(layer).values():
        assert (info.uname, info.gname) == ("", "")


# --- random trees ---------------------------------------------------------------------------

_NAMES = st.sampled_from(["a", "b", "c", "a-b", "a.b", "z"])
_PATHS = st.lists(_NAMES, min_size=1, max_size=3).map("/".join)
_OPS = st.lists(
    st.tuples(
        st.sampled_from(["file", "dir", "symlink", "hardlink", "remove", "chmod", "touch"]),
        st.one_of(_PATHS, st.just("source-of-links")),
        st.binary(max_size=20),
    ),
    max_size=12,
)


def _blocked(root: Path, rel: str) -> bool:
    """An ancestor of ``rel`` is a symlink or a non-directory: nothing can be made below it."""
    parts = Path(rel).parts[:-1]
    for i in range(1, len(parts) + 1):
        ancestor = root.joinpath(*parts[:i])
        if ancestor.is_symlink() or (ancestor.exists() and not ancestor.is_dir()):
            return True
    return False


def _apply(root: Path, ops: list[tuple[str, str, bytes]]) -> None:
    for op, rel, data in ops:
        if _blocked(root, rel):
            continue
        path = root / rel
        present = path.exists() or path.is_symlink()
        is_dir = path.is_dir() and not path.is_symlink()
        if op in ("chmod", "touch"):
            if present and not path.is_symlink():
                if op == "chmod":
                    path.chmod(0o700 if is_dir else 0o640)
                else:
                    os.utime(path, (T1, T1))
            continue
        if op == "dir" and is_dir:
            continue
        if is_dir:
            shutil.rmtree(path)
        elif present:
            path.unlink()
        if op == "remove":
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        if op == "file":
            path.write_bytes(data)
        elif op == "dir":
            path.mkdir()
        elif op == "symlink":
            path.symlink_to(data.hex() or "x")
        else:
            source = root / "source-of-links"
            if path == source or source.is_dir() or source.is_symlink():
                continue
            if not source.exists():
                source.write_bytes(b"linked")
            os.link(source, path)


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(first=_OPS, second=_OPS)
def test_random_changes_stack_to_the_new_tree(
    tmp_path: Path, first: list[tuple[str, str, bytes]], second: list[tuple[str, str, bytes]]
) -> None:
    work = tmp_path / os.urandom(6).hex()
    before, after = work / "before", work / "after"
    before.mkdir(parents=True)
    _apply(before, first)
    _settle(before, T0)
    shutil.copytree(before, after, symlinks=True)
    # Restore the hard links copytree split.
    for name, group in snapshot(before).links.items():
        if name != group[0]:
            (after / name).unlink()
            os.link(after / group[0], after / name)
    _apply(after, second)
    _settle(after, T0)
    _check(before, after)
    shutil.rmtree(work)
