"""The benchmark's results as data: runs, floors, their summary, the targets; CSV and JSON.

Pure: no processes, no clocks. ``harness.py`` fills a ``Results`` run by run and writes it
after each one (``write_results``), so an interrupted benchmark keeps what it measured;
``figure.py`` and ``python -m benchmarks.wan --report results.json`` read it back
(``load_results``).

Terms
-----
- method: ``stock`` (containerd pull + overlayfs), ``starlight``, ``starlight-unordered``
  (``--no-ordering``: the bundle in layer order), ``curl`` (the bundle starlight received,
  downloaded in one request: no container is started).
- scenario: ``deploy`` (v1 on an empty worker), ``update`` (v1 present, v2 built as an
  application update on v1's base layer), ``rebuild`` (v1 present, v2 rebuilt from an updated
  base: every layer digest differs).
- floor (e) = max(i, ii): (i) two round trips (the TCP handshake, then the request) plus the
  compressed bytes of the files the container read before it was ready, and which the worker
  did not already hold, at the link's payload rate (``rate × 1448 / 1500``); (ii) the median
  time the container takes to become ready when its image is already local.
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import statistics
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import IO, Any, Final

import attrs
import cattrs

__all__ = [
    "METHODS",
    "METHOD_LABELS",
    "PAYLOAD_FRACTION",
    "SCENARIOS",
    "SCENARIO_LABELS",
    "Floor",
    "Results",
    "Run",
    "Stat",
    "SummaryRow",
    "TargetCheck",
    "check_targets",
    "floor_transfer_seconds",
    "geometric_mean",
    "load_results",
    "merge_results",
    "render_comparison",
    "render_summary",
    "render_targets",
    "stat",
    "summarise",
    "write_results",
]

METHODS: Final = ("stock", "starlight", "starlight-unordered", "curl")
METHOD_LABELS: Final = {
    "stock": "containerd (stock)",
    "starlight": "starlight",
    "starlight-unordered": "starlight, no trace order",
    "curl": "curl of the bundle",
    "floor": "floor (e)",
}
SCENARIOS: Final = ("deploy", "update", "rebuild")
SCENARIO_LABELS: Final = {
    "deploy": "cold deploy",
    "update": "update (app, shared base)",
    "rebuild": "update (full rebuild)",
}
PAYLOAD_FRACTION: Final = 1448 / 1500
"""TCP payload per IP byte with full-size segments (MSS 1448, MTU 1500)."""
FLOOR_ROUND_TRIPS: Final = 2


@attrs.frozen
class Run:
    """One measured deploy (or a failed attempt: ``error`` set, numbers None)."""

    link: str
    rtt_ms: float
    rate_mbit: float
    workload: str
    scenario: str
    method: str
    repeat: int
    ready_s: float | None = None
    """From the pull command to the probe's first success (curl: to the download's end)."""
    local_s: float | None = None
    """Until every byte of the image is on the worker."""
    ttfb_s: float | None = None
    """Until the first payload byte from the cloud reached the edge."""
    wire_bytes: int | None = None
    """IP bytes both ways over the link, retransmissions included."""
    connections: int | None = None
    requests: int | None = None
    cpu_s: float | None = None
    """Worker CPU: containerd, shims, daemon, FUSE server and the commands run."""
    local_ready_s: float | None = None
    """stock: a second start of the same image once it is fully local."""
    error: str = ""

    @property
    def round_trips(self) -> int | None:
        if self.connections is None or self.requests is None:
            return None
        return self.connections + self.requests


def floor_transfer_seconds(rtt_ms: float, rate_mbit: float, compressed_bytes: int) -> float:
    """Part (i) of the floor: handshake and request round trips, then the bytes at the
    link's payload rate."""
    rate = rate_mbit * 1e6 / 8 * PAYLOAD_FRACTION
    return FLOOR_ROUND_TRIPS * rtt_ms / 1000 + compressed_bytes / rate


@attrs.frozen
class Floor:
    """What the container needed, per workload and scenario (from its start-up trace)."""

    workload: str
    scenario: str
    read_files: int
    """Files with content the container read before it was ready."""
    read_bytes: int
    """Their compressed size, counting only contents the worker did not already hold."""
    traced: bool = True
    """False when no trace could be recorded (then part (i) counts every byte starlight
    sent: an upper bound, said so in the results)."""


@attrs.frozen
class Stat:
    median: float
    low: float
    high: float
    n: int


def stat(values: Iterable[float | int | None]) -> Stat | None:
    kept = [float(v) for v in values if v is not None]
    if not kept:
        return None
    return Stat(statistics.median(kept), min(kept), max(kept), len(kept))


def geometric_mean(values: Sequence[float]) -> float | None:
    kept = [v for v in values if v > 0 and math.isfinite(v)]
    if not kept:
        return None
    return math.exp(sum(math.log(v) for v in kept) / len(kept))


@attrs.frozen
class SummaryRow:
    link: str
    rtt_ms: float
    rate_mbit: float
    workload: str
    scenario: str
    method: str
    runs: int
    errors: int
    ready: Stat | None
    local: Stat | None
    ttfb: Stat | None
    wire_bytes: Stat | None
    round_trips: Stat | None
    cpu: Stat | None
    floor_s: float | None
    floor_transfer_s: float | None
    floor_local_s: float | None

    @property
    def ratio_to_floor(self) -> float | None:
        if self.ready is None or not self.floor_s:
            return None
        return self.ready.median / self.floor_s


@attrs.frozen
class Results:
    started: str
    settings: dict[str, Any]
    links: list[dict[str, Any]] = attrs.field(factory=list)
    """The verification report of every link, as measured at the start of its run."""
    runs: list[Run] = attrs.field(factory=list)
    floors: list[Floor] = attrs.field(factory=list)
    peers: list[dict[str, str]] = attrs.field(factory=list)
    """Other lazy-pulling snapshotters: which ran, which could not and why."""
    images: list[dict[str, Any]] = attrs.field(factory=list)
    notes: list[str] = attrs.field(factory=list)


_converter = cattrs.Converter()


def _key(row: Run | SummaryRow) -> tuple[str, str, str]:
    return (row.link, row.workload, row.scenario)


def summarise(results: Results) -> list[SummaryRow]:
    """One row per link × workload × scenario × method (those measured), plus a ``floor``
    row holding the floor's time as its ``ready``."""
    floors = {(f.workload, f.scenario): f for f in results.floors}
    groups: dict[tuple[str, str, str, str], list[Run]] = {}
    for run in results.runs:
        groups.setdefault((*_key(run), run.method), []).append(run)
    # Part (ii) of each floor: the median local start of the target image, from stock runs.
    local_starts: dict[tuple[str, str, str], list[float]] = {}
    for run in results.runs:
        if run.method == "stock" and run.local_ready_s is not None:
            local_starts.setdefault(_key(run), []).append(run.local_ready_s)
    rows: list[SummaryRow] = []
    seen_keys: list[tuple[str, str, str]] = []
    for (link, workload, scenario, method), runs in groups.items():
        ok = [r for r in runs if not r.error]
        first = runs[0]
        floor_i, floor_ii, floor_s = _floor(
            floors.get((workload, scenario)),
            local_starts.get((link, workload, scenario), []),
            first.rtt_ms,
            first.rate_mbit,
        )
        if (link, workload, scenario) not in seen_keys:
            seen_keys.append((link, workload, scenario))
        rows.append(
            SummaryRow(
                link=link,
                rtt_ms=first.rtt_ms,
                rate_mbit=first.rate_mbit,
                workload=workload,
                scenario=scenario,
                method=method,
                runs=len(runs),
                errors=len(runs) - len(ok),
                ready=stat(r.ready_s for r in ok),
                local=stat(r.local_s for r in ok),
                ttfb=stat(r.ttfb_s for r in ok),
                wire_bytes=stat(r.wire_bytes for r in ok),
                round_trips=stat(r.round_trips for r in ok),
                cpu=stat(r.cpu_s for r in ok),
                floor_s=floor_s,
                floor_transfer_s=floor_i,
                floor_local_s=floor_ii,
            )
        )
    order = {m: i for i, m in enumerate(METHODS)}
    scenario_order = {s: i for i, s in enumerate(SCENARIOS)}
    rows.sort(
        key=lambda r: (
            r.rtt_ms,
            r.rate_mbit,
            r.workload,
            scenario_order.get(r.scenario, 99),
            order.get(r.method, 99),
        )
    )
    return rows


def _floor(
    floor: Floor | None, local_starts: list[float], rtt_ms: float, rate_mbit: float
) -> tuple[float | None, float | None, float | None]:
    transfer = (
        floor_transfer_seconds(rtt_ms, rate_mbit, floor.read_bytes) if floor is not None else None
    )
    local = statistics.median(local_starts) if local_starts else None
    parts = [p for p in (transfer, local) if p is not None]
    return transfer, local, (max(parts) if parts else None)


# --- targets ----------------------------------------------------------------------------------


@attrs.frozen
class TargetCheck:
    name: str
    goal: str
    value: str
    met: bool | None
    """None: not measured (the runs it needs are missing)."""
    detail: str = ""


def _index(rows: Sequence[SummaryRow]) -> dict[tuple[str, str, str, str], SummaryRow]:
    return {(r.link, r.workload, r.scenario, r.method): r for r in rows}


def _median(row: SummaryRow | None) -> float | None:
    return None if row is None or row.ready is None else row.ready.median


def _speedups(
    rows: Sequence[SummaryRow], link: str, scenarios: Sequence[str]
) -> dict[tuple[str, str], float]:
    index = _index(rows)
    out = {}
    for row in rows:
        if row.link != link or row.scenario not in scenarios or row.method != "starlight":
            continue
        stock = _median(index.get((link, row.workload, row.scenario, "stock")))
        ours = _median(row)
        if stock and ours:
            out[(row.workload, row.scenario)] = stock / ours
    return out


def check_targets(
    rows: Sequence[SummaryRow], *, target_link: str = "150 ms / 100 Mbit/s"
) -> list[TargetCheck]:
    """The issue's targets, against the medians."""
    checks: list[TargetCheck] = []
    for name, scenarios, goal in (
        ("cold deploy speed-up vs stock", ("deploy",), 3.0),
        ("update speed-up vs stock (app update and rebuild)", ("update", "rebuild"), 5.0),
    ):
        speedups = _speedups(rows, target_link, scenarios)
        mean = geometric_mean(list(speedups.values()))
        detail = ", ".join(f"{w}/{s} {v:.2f}×" for (w, s), v in sorted(speedups.items()))
        checks.append(
            TargetCheck(
                name=f"{name} at {target_link} (geometric mean)",
                goal=f"≥ {goal:g}×",
                value="-" if mean is None else f"{mean:.2f}×",
                met=None if mean is None else mean >= goal,
                detail=detail,
            )
        )
    index = _index(rows)
    slow: list[str] = []
    far: list[str] = []
    compared = 0
    for row in rows:
        if row.rtt_ms < 150 or row.method != "starlight" or row.ready is None:
            continue
        curl = _median(index.get((row.link, row.workload, row.scenario, "curl")))
        if curl is not None:
            compared += 1
            if row.ready.median > curl:
                where = f"{row.link} {row.workload}/{row.scenario}"
                slow.append(f"{where} {row.ready.median:.2f}s > {curl:.2f}s")
        ratio = row.ratio_to_floor
        if ratio is not None and ratio > 2.0:
            far.append(f"{row.link} {row.workload}/{row.scenario} {ratio:.2f}×")
    checks.append(
        TargetCheck(
            name="at ≥ 150 ms: starlight ready no later than curl of its bundle",
            goal="every workload",
            value=f"{compared - len(slow)}/{compared}",
            met=None if not compared else not slow,
            detail="; ".join(slow),
        )
    )
    floored = [r for r in rows if r.rtt_ms >= 150 and r.method == "starlight" and r.ratio_to_floor]
    checks.append(
        TargetCheck(
            name="at ≥ 150 ms: starlight within 2× of the floor (e)",
            goal="every workload",
            value=f"{len(floored) - len(far)}/{len(floored)}",
            met=None if not floored else not far,
            detail="; ".join(far),
        )
    )
    cpu_ratios = {}
    for row in rows:
        if row.link != target_link or row.method != "starlight" or row.cpu is None:
            continue
        stock = index.get((row.link, row.workload, row.scenario, "stock"))
        if stock is not None and stock.cpu is not None and stock.cpu.median > 0:
            cpu_ratios[(row.workload, row.scenario)] = row.cpu.median / stock.cpu.median
    worst = max(cpu_ratios.values(), default=None)
    checks.append(
        TargetCheck(
            name=f"worker CPU vs stock at {target_link} (worst case)",
            goal="≤ 1.5×",
            value="-" if worst is None else f"{worst:.2f}×",
            met=None if worst is None else worst <= 1.5,
            detail=", ".join(f"{w}/{s} {v:.2f}×" for (w, s), v in sorted(cpu_ratios.items())),
        )
    )
    return checks


# --- rendering and files ----------------------------------------------------------------------


def _fmt(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _range(s: Stat | None, digits: int = 2) -> str:
    if s is None:
        return "-"
    if s.n == 1:
        return f"{s.median:.{digits}f}"
    return f"{s.median:.{digits}f} ({s.low:.{digits}f}–{s.high:.{digits}f})"


def render_summary(rows: Sequence[SummaryRow]) -> str:
    """A Markdown table: medians (min–max), per link, workload, scenario and method."""
    header = (
        "| link | workload | scenario | method | ready s | × floor | fully local s | TTFB s "
        "| MB on wire | round trips | worker CPU s | runs |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|---|\n"
    )
    lines = []
    for r in rows:
        mb = None if r.wire_bytes is None else r.wire_bytes.median / 1e6
        lines.append(
            f"| {r.link} | {r.workload} | {r.scenario} | {r.method} | {_range(r.ready)} "
            f"| {_fmt(r.ratio_to_floor)} | {_range(r.local)} | {_range(r.ttfb)} | {_fmt(mb, 1)} "
            f"| {_fmt(r.round_trips.median if r.round_trips else None, 0)} "
            f"| {_fmt(r.cpu.median if r.cpu else None)} "
            f"| {r.runs - r.errors}/{r.runs} |"
        )
    floors: dict[tuple[str, str, str], SummaryRow] = {}
    for r in rows:
        floors.setdefault((r.link, r.workload, r.scenario), r)
    floor_lines = [
        f"| {r.link} | {r.workload} | {r.scenario} | {_fmt(r.floor_s)} "
        f"| {_fmt(r.floor_transfer_s)} | {_fmt(r.floor_local_s)} |"
        for r in floors.values()
    ]
    return (
        header
        + "\n".join(lines)
        + "\n\n| link | workload | scenario | floor (e) s | (i) transfer s | (ii) local start s |\n"
        "|---|---|---|---|---|---|\n" + "\n".join(floor_lines) + "\n"
    )


def render_comparison(rows: Sequence[SummaryRow]) -> str:
    """One line per link × workload × scenario: each method's median time to ready, the
    floor, and the ratios the targets speak of."""
    index = _index(rows)
    keys: list[tuple[str, str, str]] = []
    for r in rows:
        if (r.link, r.workload, r.scenario) not in keys:
            keys.append((r.link, r.workload, r.scenario))
    lines = [
        "| link | workload | scenario | stock s | starlight s | no order s | curl s | floor s "
        "| speed-up | × floor | ÷ curl | CPU ÷ stock | MB stock / starlight |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for link, workload, scenario in keys:
        got = {m: index.get((link, workload, scenario, m)) for m in METHODS}
        ready = {m: _median(row) for m, row in got.items()}
        floor = next((row.floor_s for row in got.values() if row is not None), None)
        ours, stock, curl = ready["starlight"], ready["stock"], ready["curl"]
        cpu = {
            m: row.cpu.median if row is not None and row.cpu is not None else None
            for m, row in got.items()
        }
        wire = {
            m: row.wire_bytes.median / 1e6
            if row is not None and row.wire_bytes is not None
            else None
            for m, row in got.items()
        }
        lines.append(
            f"| {link} | {workload} | {scenario} | {_fmt(stock)} | {_fmt(ours)} "
            f"| {_fmt(ready['starlight-unordered'])} | {_fmt(curl)} | {_fmt(floor)} "
            f"| {_fmt(_ratio(stock, ours))} | {_fmt(_ratio(ours, floor))} "
            f"| {_fmt(_ratio(ours, curl))} | {_fmt(_ratio(cpu['starlight'], cpu['stock']))} "
            f"| {_fmt(wire['stock'], 1)} / {_fmt(wire['starlight'], 1)} |"
        )
    return "\n".join(lines) + "\n"


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else a / b


def render_targets(checks: Sequence[TargetCheck]) -> str:
    lines = ["| target | goal | measured | met |", "|---|---|---|---|"]
    for c in checks:
        met = "not measured" if c.met is None else ("yes" if c.met else "**no**")
        lines.append(f"| {c.name} | {c.goal} | {c.value} | {met} |")
    details = [f"- {c.name}: {c.detail}" for c in checks if c.detail]
    return "\n".join(lines) + ("\n\n" + "\n".join(details) if details else "") + "\n"


_RUN_FIELDS: Final = [a.name for a in attrs.fields(Run)]


def write_results(results: Results, directory: Path) -> dict[str, Path]:
    """``results.json`` (everything), ``runs.csv`` (one row per run), ``summary.csv`` (one row
    per link × workload × scenario × method) and ``summary.md`` (tables and targets)."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = {
        "json": directory / "results.json",
        "runs": directory / "runs.csv",
        "summary": directory / "summary.csv",
        "markdown": directory / "summary.md",
    }
    data = _converter.unstructure(results)
    _atomic_write(paths["json"], json.dumps(data, indent=1) + "\n")
    with _atomic(paths["runs"]) as handle:
        writer = csv.DictWriter(handle, fieldnames=[*_RUN_FIELDS, "round_trips"])
        writer.writeheader()
        for run in results.runs:
            writer.writerow({**attrs.asdict(run), "round_trips": run.round_trips})
    rows = summarise(results)
    with _atomic(paths["summary"]) as handle:
        table = csv.writer(handle)
        stats = ("ready", "local", "ttfb", "wire_bytes", "round_trips", "cpu")
        table.writerow(
            [
                "link",
                "rtt_ms",
                "rate_mbit",
                "workload",
                "scenario",
                "method",
                "runs",
                "errors",
                *[f"{s}_{p}" for s in stats for p in ("median", "min", "max")],
                "floor_s",
                "floor_transfer_s",
                "floor_local_s",
                "ratio_to_floor",
            ]
        )
        for r in rows:
            values: list[Any] = []
            for s in stats:
                value: Stat | None = getattr(r, s)
                values += ["", "", ""] if value is None else [value.median, value.low, value.high]
            table.writerow(
                [
                    r.link,
                    r.rtt_ms,
                    r.rate_mbit,
                    r.workload,
                    r.scenario,
                    r.method,
                    r.runs,
                    r.errors,
                    *values,
                    r.floor_s,
                    r.floor_transfer_s,
                    r.floor_local_s,
                    r.ratio_to_floor,
                ]
            )
    text = "# WAN benchmark results\n\n" + render_comparison(rows) + "\n## Every measure\n\n"
    text += render_summary(rows) + "\n## Targets\n\n"
    text += render_targets(check_targets(rows)) + _render_peers(results)
    _atomic_write(paths["markdown"], text)
    return paths


def _render_peers(results: Results) -> str:
    if not results.peers:
        return ""
    lines = ["\n## Peers\n"]
    lines += [f"- {p['name']}: {p['status']} — {p['reason']}" for p in results.peers]
    return "\n".join(lines) + "\n"


@contextlib.contextmanager
def _atomic(path: Path) -> Iterator[IO[str]]:
    """Write ``path`` whole or not at all (a reader never sees half a file)."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with tmp.open("w", newline="") as handle:
            yield handle
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def _atomic_write(path: Path, text: str) -> None:
    with _atomic(path) as handle:
        handle.write(text)


def merge_results(parts: Sequence[Results]) -> Results:
    """Several result sets as one: a later part's runs of a link × workload replace an
    earlier part's (a re-run), floors of a workload × scenario likewise; links by label."""
    if not parts:
        raise ValueError("nothing to merge")
    runs: list[Run] = []
    floors: dict[tuple[str, str], Floor] = {}
    links: dict[str, dict[str, Any]] = {}
    images: dict[str, dict[str, Any]] = {}
    notes: list[str] = []
    for part in parts:
        replaced = {(r.link, r.workload) for r in part.runs}
        runs = [r for r in runs if (r.link, r.workload) not in replaced] + list(part.runs)
        floors.update({(f.workload, f.scenario): f for f in part.floors})
        for link in part.links:
            config = link.get("config", {})
            links[f"{config.get('rtt_ms')}/{config.get('rate_mbit')}"] = link
        images.update({str(i.get("starlight")): i for i in part.images})
        notes += [n for n in part.notes if n not in notes]
    first = parts[0]
    return Results(
        started=first.started,
        settings={**first.settings, "merged": [p.started for p in parts]},
        links=list(links.values()),
        runs=runs,
        floors=list(floors.values()),
        peers=parts[-1].peers,
        images=list(images.values()),
        notes=notes,
    )


def load_results(path: Path) -> Results:
    return _converter.structure(json.loads(path.read_text()), Results)
