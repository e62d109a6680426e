"""The whole harness, for real but small: one built workload, a short fast link, every method
and the training trace, then the files it writes. Needs root, containerd, FUSE, the workload's
image in the build cache (``STARLIGHT_WORKLOAD_IMAGES=build`` builds it, which takes minutes)."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from benchmarks.images.builder import Builder
from benchmarks.images.workloads import WORKLOADS
from benchmarks.wan.harness import IMAGES, Harness, Settings
from benchmarks.wan.link import LinkConfig
from benchmarks.wan.netns import list_netns
from benchmarks.wan.results import METHODS, summarise

pytestmark = pytest.mark.e2e

WORKLOAD = "redis"


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """containerd's sockets live in its work directory: unix socket paths must stay short."""
    path = Path(tempfile.mkdtemp(prefix="slw-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_a_small_benchmark_runs_every_method_and_writes_its_results(
    tmp_path: Path, short_dir: Path
) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root")
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed")
    builder = Builder()
    cached = all(builder.cached(WORKLOADS[WORKLOAD], v, k) for v, k in IMAGES)
    if not cached and os.environ.get("STARLIGHT_WORKLOAD_IMAGES") != "build":
        pytest.skip(f"{WORKLOAD}'s images are not in the build cache")
    before = set(list_netns())
    settings = Settings(
        links=(LinkConfig(rtt_ms=20, rate_mbit=200),),
        workloads=(WORKLOAD,),
        scenarios=("deploy", "update"),
        methods=METHODS,
        repeats=1,
        out=tmp_path / "out",
        workdir=short_dir,
    )
    results = Harness(settings).run()

    assert [r.error for r in results.runs] == [""] * 8
    runs = {(r.scenario, r.method): r for r in results.runs}
    for scenario in ("deploy", "update"):
        stock, ours, curl = (runs[(scenario, m)] for m in ("stock", "starlight", "curl"))
        # Starlight asks once, on one connection; a stock pull asks for every blob.
        assert (ours.connections, ours.requests) == (1, 1)
        assert (curl.connections, curl.requests) == (1, 1)
        assert stock.requests is not None
        assert stock.requests >= 3  # manifest, config, the layers it lacks
        # curl fetched the very bundle the daemon received.
        assert ours.wire_bytes is not None
        assert curl.wire_bytes is not None
        assert abs(ours.wire_bytes - curl.wire_bytes) < 0.05 * curl.wire_bytes
        for run in (stock, ours, runs[(scenario, "starlight-unordered")]):
            assert run.ready_s is not None
            assert run.ready_s > 0.04  # two round trips at least
            assert run.local_s is not None
            assert run.cpu_s is not None
            assert run.cpu_s > 0
        assert stock.local_ready_s is not None
    # An update carries less than a cold deploy, for both.
    for method in ("stock", "starlight"):
        assert runs[("update", method)].wire_bytes < runs[("deploy", method)].wire_bytes  # type: ignore[operator]
    # The training trace gave the floor its part (i) for every scenario.
    floors = {f.scenario: f for f in results.floors}
    assert set(floors) == {"deploy", "update"}  # the scenarios measured
    assert floors["deploy"].read_files > 0
    assert floors["deploy"].read_bytes > floors["update"].read_bytes
    rows = summarise(results)
    assert all(r.floor_s is not None and r.floor_s > 0 for r in rows)
    out = settings.out
    for name in (
        "results.json",
        "runs.csv",
        "summary.csv",
        "summary.md",
        "figure-20ms-200mbit.png",
    ):
        assert (out / name).stat().st_size > 0
    assert len(results.links) == 1
    assert results.links[0]["throughput_mbit"] > 0
    # Everything was torn down: no namespace of ours is left, no mount below the work dir.
    assert not {n for n in list_netns() if n.startswith("slwan-")} - before
    mounts = Path("/proc/self/mountinfo").read_text()
    assert str(settings.workdir) not in mounts
