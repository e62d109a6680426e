"""The server as its own process: it outlives its clients, re-attach is idempotent, a dead
mount is cleaned up, and the control socket answers bad input without falling over."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from benchmarks.services import wait_for
from starlight_core.errors import AlreadyExists, FailedPrecondition, InvalidInput, NotFound
from starlight_core.layer.toc import Entry, EntryType
from starlight_worker.fs import AsyncFsClient, ensure_running
from starlight_worker.fs.mountpoint import is_dead_mount
from tests.worker.fs.conftest import Server, running_server
from tests.worker.fs.layers import Layer, overlay, place, write_layer_dir

pytestmark = pytest.mark.e2e

BOUND = 30.0

LAYER = Layer.of(
    (Entry("present", EntryType.FILE), b"present content " * 1000),
    (Entry("late", EntryType.FILE), b"late content"),
)

# A daemon that attaches, then dies with a request half sent.
DAEMON = """
import socket, sys, time
from starlight_worker.fs import AsyncFsClient, ensure_running
client = ensure_running(sys.argv[1], sys.argv[2])
print(client.ping().pid, client.attach("restart", sys.argv[3]), flush=True)
sock = socket.socket(socket.AF_UNIX)
sock.connect(sys.argv[1])
sock.sendall(b'{"op": "att')
print("ready", flush=True)
time.sleep(600)
"""


def test_daemon_dying_mid_request_does_not_disturb_the_server(
    server: Server, tmp_path: Path
) -> None:
    layer_dir = write_layer_dir(LAYER, tmp_path / "layer", withhold=["late"])
    root = server.client.attach("restart", layer_dir)
    pid = server.client.ping().pid
    held = open(root / "present", "rb")  # noqa: SIM115 - a container's file across the restart
    waiting: list[bytes] = []
    reader = threading.Thread(target=lambda: waiting.append((root / "late").read_bytes()))
    reader.start()
    wait_for(lambda: server.client.ping().waiting == 1, timeout=BOUND, what="waiting read")

    daemon = subprocess.Popen(
        [sys.executable, "-c", DAEMON, str(server.socket), str(server.mountpoint),
         str(layer_dir)],
        stdout=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    assert daemon.stdout is not None
    first = daemon.stdout.readline().split()
    assert first == [str(pid), str(root)]  # same server, same path: re-attach is idempotent
    assert daemon.stdout.readline().strip() == "ready"
    daemon.send_signal(signal.SIGKILL)
    daemon.wait()
    daemon.stdout.close()

    # The restarted daemon finds the same server with the same layer, once.
    client = ensure_running(server.socket, server.mountpoint)
    assert client.ping().pid == pid
    assert [info.layer_key for info in client.list()].count("restart") == 1
    assert client.attach("restart", layer_dir) == root
    assert held.read() == b"present content " * 1000
    held.close()
    place(layer_dir, "late", b"late content")
    client.arrived("restart", ["late"])
    reader.join(BOUND)
    assert waiting == [b"late content"]


STARTER = """
import sys, time
from starlight_worker.fs import ensure_running
print(ensure_running(sys.argv[1], sys.argv[2]).ping().pid, flush=True)
time.sleep(600)
"""


def test_server_started_by_a_daemon_outlives_the_daemon(tmp_path: Path) -> None:
    socket_path, mountpoint = tmp_path / "srv" / "fs.sock", tmp_path / "srv" / "mnt"
    daemon = subprocess.Popen(
        [sys.executable, "-c", STARTER, str(socket_path), str(mountpoint)],
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    assert daemon.stdout is not None
    pid = int(daemon.stdout.readline())
    os.killpg(daemon.pid, signal.SIGKILL)  # the daemon and everything in its process group
    daemon.wait()
    daemon.stdout.close()
    with running_server(tmp_path / "srv") as server:
        assert server.client.ping().pid == pid
        root = server.client.attach("outlived", write_layer_dir(LAYER, tmp_path / "layer"))
        assert (root / "present").read_bytes() == LAYER.contents["present"]


@pytest.mark.anyio
async def test_async_client(server: Server, tmp_path: Path) -> None:
    client = AsyncFsClient(server.socket)
    layer_dir = write_layer_dir(LAYER, tmp_path / "layer", withhold=["late"])
    assert await client.attach("async", layer_dir) == server.mountpoint / "async"
    assert "async" in [info.layer_key for info in await client.list()]
    assert (await client.ping()).pid == server.client.ping().pid
    assert await client.arrived("async", ["late"]) == 0  # nobody waits for it
    assert await client.detach("async") is True


def test_attach_checks_its_arguments(server: Server, tmp_path: Path) -> None:
    first = write_layer_dir(LAYER, tmp_path / "one")
    second = write_layer_dir(LAYER, tmp_path / "two")
    path = server.client.attach("checked", first)
    assert path == server.mountpoint / "checked"
    assert server.client.attach("checked", first) == path
    with pytest.raises(AlreadyExists):
        server.client.attach("checked", second)
    for bad in ("a/b", "sha256:abc", "a,b", "..", ""):
        with pytest.raises(InvalidInput):
            server.client.attach(bad, first)
    with pytest.raises(NotFound):
        server.client.attach("no-toc", tmp_path)
    (tmp_path / "bad" / "fs").mkdir(parents=True)
    (tmp_path / "bad" / "toc.json").write_text('{"version": 1, "entries": "nope"}')
    with pytest.raises(InvalidInput):
        server.client.attach("bad-toc", tmp_path / "bad")
    assert "bad-toc" not in os.listdir(server.mountpoint)


def test_attach_after_a_failed_lookup_is_visible(server: Server, tmp_path: Path) -> None:
    # The kernel caches negative lookups for long; attach must invalidate that entry.
    assert not (server.mountpoint / "late-key").exists()
    layer_dir = write_layer_dir(LAYER, tmp_path / "layer")
    server.client.attach("late-key", layer_dir)
    assert (server.mountpoint / "late-key" / "present").read_bytes() == LAYER.contents["present"]
    server.client.detach("late-key")
    assert not (server.mountpoint / "late-key").exists()


def test_control_socket_answers_garbage_and_keeps_serving(server: Server) -> None:
    with socket.socket(socket.AF_UNIX) as sock:
        sock.connect(str(server.socket))
        reader = sock.makefile("rb")
        for line, code in (
            (b"not json\n", "invalid_input"),
            (b'{"op": "explode"}\n', "invalid_input"),
            (b'{"op": "attach", "surprise": 1}\n', "invalid_input"),
            (b'{"op": "detach"}\n', "invalid_input"),
        ):
            sock.sendall(line)
            answer = json.loads(reader.readline())
            assert answer["ok"] is False, line
            assert answer["error"] == code, line
        sock.sendall(b'{"op": "ping"}\n')
        assert json.loads(reader.readline())["result"]["pid"] == server.client.ping().pid


def test_shutdown_is_refused_while_an_overlay_uses_the_mount(
    server: Server, tmp_path: Path
) -> None:
    layer_dir = write_layer_dir(LAYER, tmp_path / "layer")
    root = server.client.attach("busy", layer_dir)
    with overlay([root, layer_dir / "fs"], tmp_path / "ovl") as merged:
        with pytest.raises(FailedPrecondition):
            server.client.shutdown()
        assert (merged / "present").read_bytes() == LAYER.contents["present"]
    assert server.client.ping().layers >= 1


def test_a_second_server_for_the_same_socket_exits(server: Server, tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "starlight_worker.fs", "--socket", str(server.socket),
         "--mountpoint", str(tmp_path / "other")],
        capture_output=True, text=True, timeout=BOUND, check=False,
    )  # fmt: skip
    assert done.returncode == 3, done.stderr
    assert "already serves" in done.stderr
    assert server.client.ping().mountpoint == str(server.mountpoint)


def test_ensure_running_replaces_a_crashed_server(tmp_path: Path) -> None:
    with running_server(tmp_path / "srv") as server:
        layer_dir = write_layer_dir(LAYER, tmp_path / "layer")
        server.client.attach("crash", layer_dir)
        old = server.client.ping().pid
        os.kill(old, signal.SIGKILL)
        wait_for(lambda: is_dead_mount(server.mountpoint), timeout=BOUND, what="dead mount")

        client = ensure_running(server.socket, server.mountpoint)
        info = client.ping()
        assert info.pid != old
        assert info.layers == 0
        assert not is_dead_mount(server.mountpoint)
        root = client.attach("crash", layer_dir)
        assert (root / "present").read_bytes() == LAYER.contents["present"]


def test_sigterm_unmounts_and_exits(tmp_path: Path) -> None:
    with running_server(tmp_path / "srv") as server:
        pid = server.client.ping().pid
        os.kill(pid, signal.SIGTERM)
        wait_for(
            lambda: not os.path.ismount(server.mountpoint) and not server.socket.exists(),
            timeout=BOUND,
            what="server exit",
        )
        assert not server.client.is_alive()
