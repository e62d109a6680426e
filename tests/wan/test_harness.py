"""The WAN harness's pure parts: flow accounting, statistics, the floor, targets, CSV/JSON and
the figure, from small hand-made inputs (no link, no services)."""

from __future__ import annotations

import csv
import hashlib
import json
import math
import struct
import uuid
from datetime import UTC, datetime
from pathlib import Path

import pytest

from benchmarks.wan.floors import read_before_ready
from benchmarks.wan.flows import FlowTable
from benchmarks.wan.flows import summarise as summarise_flows
from benchmarks.wan.harness import QUICK_LINKS, _parser, parse_link, settings_from
from benchmarks.wan.packet import VNET_HDR
from benchmarks.wan.results import (
    Floor,
    Results,
    Run,
    check_targets,
    floor_transfer_seconds,
    geometric_mean,
    load_results,
    render_summary,
    stat,
    summarise,
    write_results,
)
from starlight_core.digest import Digest
from starlight_core.layer.toc import TOC, Chunk, Entry, EntryType, LayerInfo
from starlight_core.oci import OCI_LAYER_GZIP
from starlight_core.platform import Platform
from starlight_core.trace import AccessKind, FileAccess, Trace, TracedImage, TraceHeader

EDGE = bytes([10, 77, 0, 2])
CLOUD = bytes([10, 77, 0, 1])


def _frame(up: bool, sport: int, dport: int, flags: int, payload: int) -> bytes:
    """A vnet header and an IPv4/TCP packet with ``payload`` zero bytes."""
    tcp = struct.pack("!HHIIBBHHH", sport, dport, 0, 0, 5 << 4, flags, 65535, 0, 0)
    total = 20 + len(tcp) + payload
    src, dst = (EDGE, CLOUD) if up else (CLOUD, EDGE)
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, total, 0, 0, 64, 6, 0, src, dst)
    return VNET_HDR.pack(0, 0, 0, 0, 0, 0) + ip + tcp + bytes(payload)


SYN, ACK, PSH = 0x02, 0x10, 0x08


# --- flows ------------------------------------------------------------------------------------


def test_flow_table_counts_connections_requests_bytes_and_times() -> None:
    table = FlowTable()
    table.observe(True, _frame(True, 40000, 5800, SYN, 0), 1.0)
    table.observe(False, _frame(False, 5800, 40000, SYN | ACK, 0), 1.1)
    table.observe(True, _frame(True, 40000, 5800, ACK | PSH, 200), 1.2)  # request 1
    table.observe(False, _frame(False, 5800, 40000, ACK, 0), 1.25)  # a bare ACK: not a reply
    table.observe(False, _frame(False, 5800, 40000, ACK | PSH, 1000), 1.3)
    table.observe(False, _frame(False, 5800, 40000, ACK | PSH, 1000), 1.4)
    table.observe(True, _frame(True, 40000, 5800, ACK, 0), 1.41)  # ACKs are not requests
    table.observe(True, _frame(True, 40000, 5800, ACK | PSH, 100), 1.5)  # request 2
    table.observe(True, _frame(True, 40000, 5800, ACK | PSH, 100), 1.55)  # same request
    table.observe(False, _frame(False, 5800, 40000, ACK | PSH, 500), 1.6)
    [flow] = table.flows()
    assert (flow.edge_port, flow.cloud_port) == (40000, 5800)
    assert flow.opened == 1.0
    assert flow.first_down == 1.3
    assert flow.last_down == 1.6
    assert flow.requests == 2
    assert flow.down_payload == 2500
    assert flow.up_payload == 400
    assert flow.down_bytes == 2 * 40 + 2500 + 3 * 40  # every packet's IP bytes
    summary = summarise_flows(table.report(), since=0.5)
    assert summary.connections == 1
    assert summary.round_trips == 3
    assert summary.wire_bytes == flow.down_bytes + flow.up_bytes
    assert summary.first_down == 1.3


def test_flow_table_keeps_a_reused_port_apart_and_resets() -> None:
    table = FlowTable()
    table.observe(True, _frame(True, 40000, 8090, SYN, 0), 1.0)
    table.observe(True, _frame(True, 40001, 8090, SYN, 0), 1.0)
    table.observe(True, _frame(True, 40000, 8090, SYN, 0), 2.0)  # the port, used again
    assert len(table.flows()) == 3
    assert summarise_flows(table.report(), since=1.5).connections == 1
    table.reset()
    assert table.flows() == []
    summary = summarise_flows([])
    assert (summary.connections, summary.first_down, summary.wire_bytes) == (0, None, 0)


def test_flow_table_ignores_what_is_not_ipv4_tcp() -> None:
    table = FlowTable()
    udp = bytearray(_frame(True, 1, 2, 0, 10))
    udp[VNET_HDR.size + 9] = 17
    table.observe(True, bytes(udp), 1.0)
    table.observe(True, b"\0" * 12, 1.0)
    assert table.flows() == []


# --- statistics and the floor -----------------------------------------------------------------


def test_stat_and_geometric_mean() -> None:
    s = stat([3.0, None, 1.0, 2.0])
    assert s is not None
    assert (s.median, s.low, s.high, s.n) == (2.0, 1.0, 3.0, 3)
    assert stat([None]) is None
    mean = geometric_mean([2.0, 8.0])
    assert mean is not None
    assert math.isclose(mean, 4.0)
    assert geometric_mean([]) is None


def test_floor_transfer_is_two_round_trips_plus_bytes_at_the_payload_rate() -> None:
    # 100 Mbit/s of IP bytes carry 1448/1500 of that in payload.
    payload_rate = 100e6 / 8 * 1448 / 1500
    seconds = floor_transfer_seconds(150, 100, int(payload_rate))
    assert math.isclose(seconds, 0.3 + 1.0, rel_tol=1e-6)
    assert floor_transfer_seconds(2, 10, 0) == pytest.approx(0.004)


def _digest(text: str) -> Digest:
    return Digest("sha256:" + hashlib.sha256(text.encode()).hexdigest())


def _file(name: str, content: str, compressed: int) -> Entry:
    digest = _digest(content)
    return Entry(
        name=name,
        type=EntryType.FILE,
        size=100,
        digest=digest,
        chunks=(Chunk(0, 100, 0, compressed, digest),),
    )


def _toc(layer: str, entries: list[Entry]) -> TOC:
    info = LayerInfo(
        digest=_digest(f"blob {layer}"),
        size=1,
        diff_id=_digest(f"diff {layer}"),
        media_type=OCI_LAYER_GZIP,
    )
    return TOC(layer=info, entries=tuple(entries))


def _trace(accesses: list[tuple[int, int | Digest, str]]) -> Trace:
    header = TraceHeader(
        trace_id=str(uuid.uuid4()),
        image=TracedImage(
            reference="registry.test/app:v1",
            manifest_digest=_digest("manifest"),
            platform=Platform(os="linux", architecture="amd64"),
        ),
        container_id="c1",
        started_at=datetime(2026, 1, 1, tzinfo=UTC),
    )
    return Trace.build(
        header,
        [
            FileAccess(offset_ns=t, layer=layer, path=path, kind=AccessKind.OPEN)
            for t, layer, path in accesses
        ],
    )


def test_read_before_ready_counts_compressed_contents_once_up_to_the_cutoff() -> None:
    base = _toc(
        "base",
        [
            Entry(name="etc", type=EntryType.DIR),
            _file("etc/a", "A", 10),
            _file("bin/sh", "SH", 200),
            _file("etc/old", "OLD", 7),
        ],
    )
    app = _toc("app", [_file("app/server", "SERVER", 1000), _file("app/copy-of-a", "A", 10)])
    trace = _trace(
        [
            (1, 0, "etc"),  # a directory: no content
            (2, 0, "bin/sh"),
            (3, base.layer.diff_id, "etc/a"),  # by diff_id
            (4, 1, "app/copy-of-a"),  # the same content again: once
            (5, 1, "app/server"),
            (6, 0, "missing"),  # not in the layer: ignored
            (99, 0, "etc/old"),  # after ready
        ]
    )
    assert read_before_ready(trace, [base, app], cutoff_ns=50) == (3, 1210)
    assert read_before_ready(trace, [base, app], cutoff_ns=100) == (4, 1217)
    # An update: what the old image held need not travel.
    held = {_digest("SH"), _digest("A")}
    assert read_before_ready(trace, [base, app], cutoff_ns=50, held=held) == (1, 1000)


# --- summary, targets, files, figure ------------------------------------------------------------

LINK = "150 ms / 100 Mbit/s"


def _run(
    workload: str, scenario: str, method: str, ready: float, *, repeat: int = 0, **more: float
) -> Run:
    values = {
        "ready_s": ready,
        "local_s": ready + 1,
        "ttfb_s": 0.3,
        "wire_bytes": 1_000_000,
        "connections": 1 if method != "stock" else 4,
        "requests": 1 if method != "stock" else 5,
        "cpu_s": 1.0,
        **more,
    }
    return Run(
        link=LINK,
        rtt_ms=150,
        rate_mbit=100,
        workload=workload,
        scenario=scenario,
        method=method,
        repeat=repeat,
        **values,  # type: ignore[arg-type]
    )


def _results() -> Results:
    runs = []
    for workload, stock, ours in (("redis", 12.0, 3.0), ("nginx", 8.0, 4.0)):
        runs += [
            _run(workload, "deploy", "stock", stock, local_ready_s=0.5),
            _run(workload, "deploy", "stock", stock + 2, local_ready_s=0.7, repeat=1),
            _run(workload, "deploy", "starlight", ours, cpu_s=1.2),
            _run(workload, "deploy", "starlight-unordered", ours * 2),
            _run(workload, "deploy", "curl", ours + 0.5),
            _run(workload, "update", "stock", stock / 2, local_ready_s=0.6),
            _run(workload, "update", "starlight", ours / 4, cpu_s=2.0),
            _run(workload, "update", "curl", ours / 5),
        ]
    runs.append(Run(LINK, 150, 100, "redis", "update", "starlight", 1, error="boom"))
    floors = [
        Floor(workload="redis", scenario="deploy", read_files=3, read_bytes=6_000_000),
        Floor(workload="nginx", scenario="deploy", read_files=2, read_bytes=0),
    ]
    return Results(
        started="2026-01-01T00:00:00Z", settings={"repeats": 2}, runs=runs, floors=floors
    )


def test_summary_medians_errors_and_floors() -> None:
    rows = summarise(_results())
    by = {(r.workload, r.scenario, r.method): r for r in rows}
    stock = by[("redis", "deploy", "stock")]
    assert stock.runs == 2
    assert stock.errors == 0
    assert stock.ready is not None
    assert stock.ready.median == 13.0
    assert stock.ready.low == 12.0
    assert stock.ready.high == 14.0
    assert stock.round_trips is not None
    assert stock.round_trips.median == 9
    # The floor: max(transfer of what was read, local start) — redis: the transfer.
    ours = by[("redis", "deploy", "starlight")]
    assert ours.floor_transfer_s == pytest.approx(floor_transfer_seconds(150, 100, 6_000_000))
    assert ours.floor_local_s == pytest.approx(0.6)
    assert ours.floor_s == ours.floor_transfer_s
    assert ours.floor_transfer_s is not None
    assert ours.ratio_to_floor == pytest.approx(3.0 / ours.floor_transfer_s)
    # nginx read nothing that had to travel: the local start is the floor.
    assert by[("nginx", "deploy", "curl")].floor_s == pytest.approx(0.6)
    failed = by[("redis", "update", "starlight")]
    assert (failed.runs, failed.errors) == (2, 1)
    assert by[("redis", "update", "stock")].floor_transfer_s is None  # no trace
    order = [r.method for r in rows if r.workload == "nginx" and r.scenario == "deploy"]
    assert order == ["stock", "starlight", "starlight-unordered", "curl"]


def test_targets_are_checked_against_medians() -> None:
    checks = {c.name.split(" at ")[0]: c for c in check_targets(summarise(_results()))}
    deploy = checks["cold deploy speed-up vs stock"]
    assert deploy.value == f"{math.sqrt(13 / 3 * 9 / 4):.2f}×"
    assert deploy.met is True  # sqrt(13/3 × 9/4) = 3.12
    update = checks["update speed-up vs stock (app update and rebuild)"]
    assert update.met is True  # 8×
    curl = checks["at ≥ 150 ms: starlight ready no later than curl of its bundle"]
    assert curl.met is False
    assert curl.value == "2/4"
    cpu = checks["worker CPU vs stock"]
    assert cpu.value == "2.00×"
    assert cpu.met is False


def test_targets_without_measurements_say_so() -> None:
    results = Results(started="x", settings={}, runs=[_run("redis", "deploy", "stock", 5.0)])
    checks = check_targets(summarise(results))
    assert all(c.met is None for c in checks)


def test_results_written_as_json_csv_markdown_and_read_back(tmp_path: Path) -> None:
    results = _results()
    paths = write_results(results, tmp_path / "out")
    assert load_results(paths["json"]) == results
    with paths["runs"].open() as handle:
        runs = list(csv.DictReader(handle))
    assert len(runs) == len(results.runs)
    assert runs[0]["method"] == "stock"
    assert runs[0]["round_trips"] == "9"
    with paths["summary"].open() as handle:
        summary = list(csv.DictReader(handle))
    assert len(summary) == len(summarise(results))
    assert {"ready_median", "ready_min", "ready_max", "ratio_to_floor"} <= set(summary[0])
    text = paths["markdown"].read_text()
    assert "| 150 ms / 100 Mbit/s | redis | deploy | stock | 13.00 (12.00–14.00)" in text
    assert "## Targets" in text
    assert json.loads(paths["json"].read_text())["runs"][0]["workload"] == "redis"
    assert not list((tmp_path / "out").glob("*.tmp"))


def test_render_summary_marks_missing_values() -> None:
    results = Results(
        started="x", settings={}, runs=[Run(LINK, 150, 100, "w", "deploy", "curl", 0, error="e")]
    )
    table = render_summary(summarise(results))
    assert "| w | deploy | curl | - | - |" in table
    assert "0/1 |" in table


def test_figure_one_png_per_link(tmp_path: Path) -> None:
    from benchmarks.wan.figure import figure_name, render_figures

    results = _results()
    other = [
        Run("50 ms / 100 Mbit/s", 50, 100, "redis", "deploy", "stock", 0, ready_s=5.0),
        Run("50 ms / 100 Mbit/s", 50, 100, "redis", "deploy", "starlight", 0, ready_s=2.0),
    ]
    results = Results(started="x", settings={}, runs=results.runs + other, floors=results.floors)
    paths = render_figures(results, tmp_path)
    assert sorted(p.name for p in paths) == sorted([figure_name(150, 100), figure_name(50, 100)])
    for path in paths:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert path.stat().st_size > 10_000


# --- command line -------------------------------------------------------------------------------


def test_parse_link() -> None:
    config = parse_link("150/100")
    assert (config.rtt_ms, config.rate_mbit) == (150, 100)
    with pytest.raises(Exception, match="RTT_MS/RATE_MBIT"):
        parse_link("150")


def test_quick_settings_are_one_link_small_workloads_one_repeat(tmp_path: Path) -> None:
    from benchmarks.images.workloads import QUICK

    settings = settings_from(_parser().parse_args(["--quick", "--workdir", str(tmp_path)]))
    assert settings.links == QUICK_LINKS
    assert settings.workloads == QUICK
    assert settings.repeats == 1
    full = settings_from(_parser().parse_args(["--workdir", str(tmp_path)]))
    assert full.repeats == 3
    assert len(full.links) == 7


def test_profile_summary_of_collapsed_stacks() -> None:
    from benchmarks.wan.profile import inclusive, top_functions

    main = "main (starlight_worker/daemon.py:1)"
    read = "read (starlight_worker/puller.py:9)"
    collapsed = "\n".join(
        [f"{main};{read} 30", f"{main};sha (hashlib) 50", f"{main};{read};sha (hashlib) 20", "x"]
    )
    top, total = top_functions(collapsed)
    assert total == 100
    assert top[0] == ("sha (hashlib)", 70)
    assert dict(inclusive(collapsed)) == {main: 100, read: 50}


def test_merge_replaces_a_rerun_link_and_workload() -> None:
    from benchmarks.wan.results import merge_results, render_comparison

    first = _results()
    rerun = Results(
        started="later",
        settings={},
        runs=[_run("redis", "deploy", "stock", 20.0), _run("redis", "deploy", "starlight", 2.0)],
        floors=[Floor(workload="redis", scenario="deploy", read_files=1, read_bytes=1)],
        links=[{"config": {"rtt_ms": 150.0, "rate_mbit": 100.0}, "throughput_mbit": 96.0}],
    )
    merged = merge_results([first, rerun])
    assert {r.workload for r in merged.runs} == {"redis", "nginx"}
    assert sorted(r.ready_s or 0 for r in merged.runs if r.workload == "redis") == [2.0, 20.0]
    assert len([r for r in merged.runs if r.workload == "nginx"]) == 8
    assert {(f.workload, f.read_bytes) for f in merged.floors} == {("redis", 1), ("nginx", 0)}
    assert merged.settings["merged"] == [first.started, "later"]
    table = render_comparison(summarise(merged))
    # stock 20 s, starlight 2 s: a 10× speed-up; no curl run: no ratio to it.
    assert "| 150 ms / 100 Mbit/s | redis | deploy | 20.00 | 2.00 | - | - |" in table
    assert "| 10.00 |" in table
    with pytest.raises(ValueError, match="nothing"):
        merge_results([])
