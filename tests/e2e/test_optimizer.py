"""The optimizer end to end: real registry, proxy, containerd, runc, daemon and FUSE.

A test image whose entrypoint reads a known sequence of files spread across layers runs with
the optimizer on; ``ctr-starlight report`` uploads its trace; a clean worker's bundle (asked of
the proxy directly and decoded here) then sends those files first, in that order. A second
trace in another order merges as ``docs/traces.md`` says, ``ordering=false`` gives layer order,
a group's containers get one joint order, and a trace survives a daemon crash.
"""

from __future__ import annotations

import asyncio
import subprocess
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest

from benchmarks.images.busybox import busybox_members
from benchmarks.stack import Stack
from starlight_core.digest import Digest
from starlight_core.fsview import merge as merged_view
from starlight_core.proxy_client import DeltaRequest, ProxyClient
from starlight_core.reference import Reference
from starlight_core.testing import TarMember, build_tar
from starlight_core.trace import Trace, decode, merge, merge_group
from starlight_proxy.testing import DecodedBundle, decode_bundle
from starlight_worker.fs import FsClient
from tests.e2e.conftest import Publish

pytestmark = pytest.mark.e2e

T = 1_700_000_000
READS = "cat /a/3; cat /b/1; cat /c/2"


def _layer(directory: str) -> bytes:
    return build_tar(
        [
            TarMember(directory, kind="dir", mtime=T),
            *(
                TarMember(f"{directory}/{i}", data=f"{directory}{i}\n".encode() * 50, mtime=T)
                for i in range(1, 4)
            ),
        ]
    )


LAYERS = [build_tar(busybox_members()), _layer("a"), _layer("b"), _layer("c")]
LAYER_ORDER = [
    "bin/busybox",
    "etc/passwd",
    "etc/group",
    *(f"{d}/{i}" for d in "abc" for i in range(1, 4)),
]
"""Every file with content, in layer order (busybox_members has bin/busybox, etc/passwd and
etc/group)."""


def _cli(stack: Stack, *args: str) -> str:
    code, out, err = stack.cli(*args)
    assert code == 0, f"{args}: {err}\n--- daemon log ---\n{stack.daemon.log()[-3000:]}"
    return out


def _traces(stack: Stack, where: str = "sent") -> dict[str, Trace]:
    directory = stack.daemon.root / "traces" / where
    return {path.stem: decode(path.read_bytes()) for path in directory.glob("*.jsonl")}


def _fetch(stack: Stack, *refs: Reference, ordering: bool = True) -> DecodedBundle:
    async def fetch() -> bytes:
        async with ProxyClient(stack.proxy.url) as proxy:
            request = DeltaRequest(to=tuple(str(r) for r in refs), ordering=ordering)
            async with proxy.delta(request) as stream:
                return await stream.read()

    return decode_bundle(asyncio.run(fetch()))


def _sent_order(bundle: DecodedBundle) -> list[tuple[int, str]]:
    """(image, path) of every content in the order the bundle sent it."""
    header = bundle.header
    paths: dict[Digest, tuple[int, str]] = {}
    for image, info in enumerate(header.images):
        layers = [header.layers[i] for i in info.layers]
        for name, _, _, entry in merged_view(layers).file_entries():
            if entry.digest is not None:
                paths.setdefault(entry.digest, (image, name))
    order: list[tuple[int, str]] = []
    for index in bundle.extents:
        item = paths[header.extents[index].content]
        if item not in order:
            order.append(item)
    return order


def _paths(bundle: DecodedBundle) -> list[str]:
    return [path for _, path in _sent_order(bundle)]


def _with_content(order: Sequence[str]) -> list[str]:
    return [path for path in order if path in LAYER_ORDER]


def _read_order(trace: Trace) -> list[str]:
    return [a.path for a in trace.accesses]


def _new_traces(stack: Stack, before: dict[str, Trace]) -> list[Trace]:
    now = _traces(stack)
    return [trace for key, trace in now.items() if key not in before]


@pytest.fixture(scope="module")
def image(publish: Publish) -> Reference:
    _, converted = publish(LAYERS, name="optimized", cmd=["/bin/sh", "-c", READS])
    return converted


def test_a_traced_start_orders_the_next_bundle(stack: Stack, image: Reference) -> None:
    assert _paths(_fetch(stack, image)) == LAYER_ORDER  # no trace yet: layer order
    before = _traces(stack)
    assert "optimizer on" in _cli(stack, "optimizer", "on")
    _cli(stack, "pull", "-q", "-n", stack.containerd.namespace, "--wait", str(image))
    assert stack.run(image) == "a3\n" * 50 + "b1\n" * 50 + "c2\n" * 50
    out = _cli(stack, "report")
    assert out.startswith("1 traces sent"), out
    assert f"start-up order updated: {image.name}@" in out

    (first,) = _new_traces(stack, before)
    assert first.header.image.reference == str(image)
    assert first.header.container_id.startswith("c-")
    reads = _read_order(first)
    # Before the entrypoint runs, containerd and runc read /etc/group and /etc/passwd of the
    # root filesystem; then the shell (bin/sh -> busybox) starts and reads our files.
    traced = _with_content(reads)
    assert traced[-4:] == ["bin/busybox", "a/3", "b/1", "c/2"], reads
    assert set(traced) <= {"etc/group", "etc/passwd", "bin/busybox", "a/3", "b/1", "c/2"}
    layers = {a.path: a.layer for a in first.accesses}
    assert (layers["bin/busybox"], layers["a/3"], layers["b/1"], layers["c/2"]) == (0, 1, 2, 3)
    offsets = [a.offset_ns for a in first.accesses]
    assert offsets == sorted(offsets)
    assert offsets[0] > 0

    # Reporting again sends nothing; the proxy takes a repeated upload as a no-op.
    assert _cli(stack, "report").startswith("0 traces sent")

    # A clean worker: the bundle sends the traced files first, in the traced order.
    _cli(stack, "optimizer", "off")
    _cli(stack, "reset")
    bundle = _fetch(stack, image)
    assert _paths(bundle) == [*traced, *(p for p in LAYER_ORDER if p not in traced)]
    assert _paths(_fetch(stack, image, ordering=False)) == LAYER_ORDER
    # And the clean worker runs it (pulled in that order).
    stack.pull(image, "--wait")
    assert stack.run(image).startswith("a3\n")

    # A second start reading in another order: the merge rule decides (docs/traces.md).
    _cli(stack, "optimizer", "on")
    stack.run(image, "/bin/sh", "-c", "cat /c/2 /a/1 >/dev/null")
    _cli(stack, "optimizer", "off")
    before_second = _traces(stack)
    assert _cli(stack, "report").startswith("1 traces sent")
    (second,) = _new_traces(stack, before_second)
    assert _with_content(_read_order(second))[-3:] == ["bin/busybox", "c/2", "a/1"]
    ranked = _with_content(list(merge([first, second]).order()))
    assert _paths(_fetch(stack, image)) == [*ranked, *(p for p in LAYER_ORDER if p not in ranked)]
    # c/2, read by both (mean normalised rank < 1), now beats a/3 and b/1, which the second
    # trace did not read (each absence counts 2: their mean is at least 1); a/1 is ranked now.
    assert ranked.index("c/2") < ranked.index("a/3") < ranked.index("b/1")
    assert "a/1" in ranked
    _cli(stack, "reset")


def test_a_group_gets_one_joint_order(stack: Stack, publish: Publish, image: Reference) -> None:
    _, other = publish(
        [LAYERS[0], _layer("d")], name="optimized-db", cmd=["/bin/sh", "-c", "cat /d/2"]
    )
    before = _traces(stack)
    code, _, err = stack.cli("optimizer", "on", "--group", "not a group")
    assert code != 0
    assert "invalid optimizer group 'not a group'" in err
    assert "group shop" in _cli(stack, "optimizer", "on", "--group", "shop")
    for reference in (image, other):
        stack.pull(reference, "--wait")
        stack.run(reference)
    _cli(stack, "optimizer", "off")
    assert _cli(stack, "report").startswith("2 traces sent")
    traces = _new_traces(stack, before)
    assert {t.header.group for t in traces} == {"shop"}
    # One order across both images (each container's offsets counted from its own start):
    # the base layer's contents are shared, sent once, where the first needs them.
    contents = {*LAYER_ORDER, "d/1", "d/2", "d/3"}
    joint = [path for _, path in merge_group(traces).order() if path in contents]
    expected = list(dict.fromkeys(joint))
    assert "d/2" in expected
    assert "a/3" in expected
    sent = _paths(_fetch(stack, image, other))
    assert sent[: len(expected)] == expected
    assert set(sent[len(expected) :]) == contents - set(expected)
    _cli(stack, "reset")


def test_a_trace_survives_a_daemon_crash(stack: Stack, image: Reference) -> None:
    before = _traces(stack)
    _cli(stack, "optimizer", "on")
    stack.pull(image, "--wait")
    name = f"c-{uuid.uuid4().hex[:10]}"
    ctr = stack.containerd.ctr_argv(
        "run", "--rm", "--snapshotter", "starlight", str(image), name,
        "/bin/sh", "-c", "cat /a/2 >/dev/null; sleep 4; cat /b/3 >/dev/null",
    )  # fmt: skip
    running = subprocess.Popen(ctr, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        time.sleep(1.5)
        stack.daemon.kill()  # the FUSE server keeps serving and recording
        stack.daemon.start()
        _, err = running.communicate(timeout=60)
        assert running.returncode == 0, err
    finally:
        if running.poll() is None:
            running.kill()
    _cli(stack, "optimizer", "off")
    assert _cli(stack, "report").startswith("1 traces sent")
    (trace,) = _new_traces(stack, before)
    reads = _with_content(_read_order(trace))
    assert reads[-3:] == ["bin/busybox", "a/2", "b/3"], reads
    _cli(stack, "reset")


def _start(stack: Stack, image: Reference, script: str, sync_dir: Path) -> subprocess.Popen[bytes]:
    ctr = stack.containerd.ctr_argv(
        "run", "--rm", "--snapshotter", "starlight",
        "--mount", f"type=bind,src={sync_dir},dst=/sync,options=rbind:ro",
        str(image), f"c-{uuid.uuid4().hex[:10]}", "/bin/sh", "-c", script,
    )  # fmt: skip
    return subprocess.Popen(ctr, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _wait_for(condition: Callable[[], bool], what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def test_containers_sharing_layers_get_their_own_traces(
    stack: Stack, image: Reference, tmp_path: Path
) -> None:
    """Two containers of one image at once: each trace holds its own container's reads only
    (each gets its own views of the layers), and turning the optimizer off while they run
    finishes both traces without disturbing them."""
    before = _traces(stack)
    _cli(stack, "optimizer", "on")
    stack.pull(image, "--wait")
    wait = "while [ ! -e /sync/go ]; do sleep 0.1; done"
    one = _start(stack, image, f"cat /a/1 >/dev/null; {wait}; cat /c/1", tmp_path)
    two = _start(stack, image, f"cat /b/2 >/dev/null; {wait}; cat /c/3", tmp_path)
    partials = stack.daemon.root / "traces"
    try:

        def recorded(path: str) -> bool:
            return any(path.encode() in p.read_bytes() for p in partials.glob("*.partial"))

        _wait_for(lambda: recorded('"a/1"') and recorded('"b/2"'), "both first reads")
        _cli(stack, "optimizer", "off")  # both traces end here; the containers go on
        (tmp_path / "go").touch()
        outputs = [process.communicate(timeout=60) for process in (one, two)]
        assert [p.returncode for p in (one, two)] == [0, 0], outputs
    finally:
        for process in (one, two):
            if process.poll() is None:
                process.kill()
    assert _cli(stack, "report").startswith("2 traces sent")
    reads = sorted(_with_content(_read_order(t)) for t in _new_traces(stack, before))
    assert [r[-1] for r in reads] == ["a/1", "b/2"], reads
    assert "b/2" not in reads[0]
    assert "a/1" not in reads[1]
    assert all("c/1" not in r and "c/3" not in r for r in reads)  # read after the end
    # Their snapshots are gone, so are their views.
    fused = FsClient(stack.daemon.fused_socket)
    assert [info.layer_key for info in fused.list() if "@" in info.layer_key] == []
    _cli(stack, "reset")
