"""The WAN benchmark: real workload images, genuine updates, deployed across the emulated link
by stock containerd, by starlight (with and without trace order) and by curl of the bundle,
against the floor of what the container needed.

    python -m benchmarks.wan --quick              # ~10 minutes: small images, 150 ms / 100 Mbit/s
    python -m benchmarks.wan                      # the default sweep, every workload, 3 repeats
    python -m benchmarks.wan --links 150/100 --workloads redis nginx --repeats 5
    python -m benchmarks.wan --report DIR/results.json   # tables and figures again, from results

Per link (``benchmarks.wan.link``; verified and printed first): registry and proxy start in
the cloud namespace (``benchmarks.stack.start_wan_cloud``, state kept across links); every
workload's three images (v1, v2 as an app update, v2 as a full rebuild) are built from the
cache, pushed, converted and notified once; then, once per workload, a *training* worker with
the optimizer on deploys each image, runs it until ready and reports its start-up trace
(the proxy orders later bundles by it; the harness keeps which files were read before ready,
for the floor). Then for every scenario, repeat and method a fresh worker
(``start_wan_edge``) is measured by ``benchmarks.wan.measure``. Results are written after every
run (``results.py``): ``results.json``, ``runs.csv``, ``summary.csv``, ``summary.md`` and one
figure per link (``figure.py``).

Needs root (network namespaces, containerd, FUSE). Everything it starts is stopped on exit,
also on an error or Ctrl-C; the work directory is removed unless ``--keep-workdir``.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Final

import attrs
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from benchmarks.images.builder import Builder
from benchmarks.images.recipe import Workload
from benchmarks.images.workloads import QUICK, WORKLOADS, PublishedImage, publish
from benchmarks.stack import (
    WanCloud,
    WanEdge,
    start_wan_cloud,
    start_wan_edge,
    stop_wan_cloud,
    stop_wan_edge,
)
from benchmarks.wan.link import DEFAULT_SWEEP, LinkConfig, WanLink
from benchmarks.wan.measure import (
    Container,
    EdgeProber,
    Sample,
    measure_curl,
    measure_starlight,
    measure_stock,
    pull_starlight,
    run_measured,
)
from benchmarks.wan.results import (
    METHODS,
    SCENARIOS,
    Results,
    Run,
    check_targets,
    render_comparison,
    render_summary,
    render_targets,
    summarise,
    write_results,
)

__all__ = ["Harness", "main", "parse_link", "peers"]

QUICK_LINKS: Final = (LinkConfig(rtt_ms=150, rate_mbit=100),)
IMAGES: Final = (("v1", "app-update"), ("v2", "app-update"), ("v2", "rebuild"))
_SCENARIO_IMAGES: Final = {
    # scenario: (target, old)
    "deploy": (("v1", "app-update"), None),
    "update": (("v2", "app-update"), ("v1", "app-update")),
    "rebuild": (("v2", "rebuild"), ("v1", "app-update")),
}
PLATFORM: Final = "linux/amd64"


def parse_link(text: str) -> LinkConfig:
    """``RTT/RATE`` in ms and Mbit/s, e.g. ``150/100``."""
    try:
        rtt, rate = text.split("/")
        return LinkConfig(rtt_ms=float(rtt), rate_mbit=float(rate))
    except (ValueError, TypeError) as exc:
        raise argparse.ArgumentTypeError(
            f"a link is RTT_MS/RATE_MBIT, e.g. 150/100: {text!r}"
        ) from exc


def peers() -> list[dict[str, str]]:
    """Which other lazy-pulling snapshotters this machine could run, and why not."""
    found = []
    stargz = shutil.which("containerd-stargz-grpc")
    remote = shutil.which("ctr-remote")
    found.append(
        {
            "name": "stargz-snapshotter (eStargz)",
            "status": "not run",
            "reason": (
                f"Debian's stargz-snapshotter package ships only ctr-remote ({remote}); "
                "the snapshotter daemon containerd-stargz-grpc is in no Debian package or "
                "PyPI distribution, and nothing may be downloaded from elsewhere"
                if stargz is None
                else f"containerd-stargz-grpc found at {stargz}, not wired into the harness yet"
            ),
        }
    )
    for name, binary in (
        ("nydus", "containerd-nydus-grpc"),
        ("overlaybd", "overlaybd-snapshotter"),
        ("SOCI", "soci-snapshotter-grpc"),
    ):
        path = shutil.which(binary)
        found.append(
            {
                "name": name,
                "status": "not run",
                "reason": f"{binary} not installed: no Debian package or PyPI distribution"
                if path is None
                else f"{binary} found at {path}, not wired into the harness yet",
            }
        )
    return found


@attrs.frozen
class Settings:
    links: tuple[LinkConfig, ...]
    workloads: tuple[str, ...]
    scenarios: tuple[str, ...]
    methods: tuple[str, ...]
    repeats: int
    out: Path
    workdir: Path
    keep_workdir: bool = False
    train: bool = True


def _edge_timeout(image: PublishedImage, rate_mbit: float) -> float:
    """Generous: three times the image's transfer time at the link rate, plus two minutes."""
    return 120.0 + 3 * image.compressed_size * 8 / (rate_mbit * 1e6)


class Harness:
    def __init__(self, settings: Settings, *, console: Console | None = None) -> None:
        self.settings = settings
        self.console = console or Console()
        self.results = Results(
            started=datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            settings={
                "links": [c.label for c in settings.links],
                "workloads": list(settings.workloads),
                "scenarios": list(settings.scenarios),
                "methods": list(settings.methods),
                "repeats": settings.repeats,
                "train": settings.train,
            },
            peers=peers(),
        )
        self.scenarios = {name: _SCENARIO_IMAGES[name] for name in settings.scenarios}
        wanted = {key for target, old in self.scenarios.values() for key in (target, old) if key}
        self.needed = tuple(key for key in IMAGES if key in wanted)
        """The images the chosen scenarios deploy (built, published and trained)."""
        self.images: dict[tuple[str, str, str], PublishedImage] = {}
        self.trained: set[str] = set()
        self._edges = 0

    # --- the whole run ---

    def say(self, text: str) -> None:
        self.console.print(text, highlight=False)

    def run(self) -> Results:
        s = self.settings
        s.workdir.mkdir(parents=True, exist_ok=True)
        for peer in self.results.peers:
            self.say(f"peer {peer['name']}: {peer['status']} ({peer['reason']})")
        self._build()
        total = len(s.links) * len(s.workloads) * len(s.scenarios) * s.repeats * len(s.methods)
        with Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=self.console,
        ) as progress:
            task = progress.add_task("runs", total=total)
            self._progress: Callable[[str], None] = lambda text: progress.update(
                task, description=text
            )
            self._advance: Callable[[], None] = lambda: progress.advance(task)
            for config in s.links:
                self._link(config)
        self.write()
        return self.results

    def write(self) -> None:
        write_results(self.results, self.settings.out)
        try:
            from benchmarks.wan.figure import render_figures

            render_figures(self.results, self.settings.out)
        except ImportError as exc:  # matplotlib missing: the tables still stand
            self.say(f"no figure: {exc}")

    def _build(self) -> None:
        builder = Builder(progress=lambda text: self._status(f"build: {text}"))
        for name in self.settings.workloads:
            for version, kind in self.needed:
                started = time.monotonic()
                cached = builder.cached(WORKLOADS[name], version, kind)
                builder.build(WORKLOADS[name], version, kind)
                if not cached:
                    self.say(f"built {name} {version} {kind} in {time.monotonic() - started:.0f} s")

    def _status(self, text: str) -> None:
        self.console.log(text, highlight=False)

    def _link(self, config: LinkConfig) -> None:
        s = self.settings
        with WanLink.for_config(config, log_path=s.workdir / "forwarder.log") as link:
            report = link.verify()
            self.say(report.render())
            self.results.links.append(report.as_dict())
            cloud = start_wan_cloud(s.workdir / "cloud", link)
            prober = EdgeProber(link.edge)
            try:
                for name in s.workloads:
                    workload = WORKLOADS[name]
                    self._publish(cloud, workload)
                    if s.train and name not in self.trained:
                        self._train(cloud, prober, workload)
                        self.trained.add(name)
                    for scenario in s.scenarios:
                        for repeat in range(s.repeats):
                            for method in s.methods:
                                self._measure(cloud, prober, workload, scenario, method, repeat)
            finally:
                prober.close()
                stop_wan_cloud(cloud)

    # --- images ---

    def _publish(self, cloud: WanCloud, workload: Workload) -> None:
        from starlight_core.proxy_client import ProxyClient

        for version, kind in self.needed:
            key = (workload.name, version, kind)
            if key in self.images:
                continue
            self._progress(f"publish {workload.name} {version} {kind}")
            image = cloud.call(
                functools.partial(
                    asyncio.run, publish(workload, version, cloud.registry.host, kind=kind)
                )
            )
            assert image.starlight is not None

            async def notify(reference: str = str(image.starlight)) -> None:
                async with ProxyClient(cloud.proxy.url) as proxy:
                    await proxy.notify(reference)

            cloud.call(lambda: asyncio.run(notify()))
            self.images[key] = image
            self.results.images.append(
                {
                    "workload": workload.name,
                    "version": version,
                    "kind": kind,
                    "original": str(image.original),
                    "starlight": str(image.starlight),
                    "layers": len(image.layers),
                    "size": image.size,
                    "compressed_size": image.compressed_size,
                }
            )

    # --- training: start-up traces, and what the container read before ready ---

    def _train(self, cloud: WanCloud, prober: EdgeProber, workload: Workload) -> None:
        from benchmarks.wan.floors import floors_from_store

        self._progress(f"train {workload.name}")
        edge, path = self._start_edge(cloud)
        ready_at: dict[str, float] = {}
        try:
            self._cli(edge, "optimizer", "on")
            for version, kind in self.needed:
                image = self.images[(workload.name, version, kind)]
                reference = str(image.starlight)
                pull_starlight(edge, reference, wait=True)
                container = Container(
                    edge,
                    reference,
                    workload,
                    snapshotter="starlight",
                    log=path / f"train-{version}-{kind}.log",
                )
                with container.running():
                    ready = container.wait_ready(
                        prober, timeout=_edge_timeout(image, cloud.link.config.rate_mbit)
                    )
                    ready_at[reference] = time.time() - (time.monotonic() - ready)
            self._cli(edge, "optimizer", "off")
            self._cli(edge, "report")
            images = {
                (version, kind): self.images[(workload.name, version, kind)]
                for version, kind in self.needed
            }
            floors, notes = floors_from_store(
                edge.daemon.root, workload.name, images, self.scenarios, ready_at
            )
        except Exception as exc:
            self.say(f"[red]training {workload.name} failed: {exc}[/red]")
            floors, notes = [], [f"{workload.name}: no start-up trace ({exc})"]
        finally:
            self._stop_edge(edge, path)
        self.results.floors.extend(floors)
        self.results.notes.extend(notes)
        for floor in floors:
            self.say(
                f"{workload.name} {floor.scenario}: {floor.read_files} files read before ready, "
                f"{floor.read_bytes / 1e6:.1f} MB to transfer"
            )

    def _cli(self, edge: WanEdge, *args: str) -> str:
        finished = run_measured(edge.cli_argv(*args), env=edge.cli_env())
        if finished.returncode != 0:
            raise RuntimeError(f"ctr-starlight {' '.join(args)}: {finished.output[-2000:]}")
        return finished.output

    # --- one measurement ---

    def _start_edge(self, cloud: WanCloud) -> tuple[WanEdge, Path]:
        self._edges += 1
        path = self.settings.workdir / f"edge-{self._edges}"
        return start_wan_edge(path, cloud), path

    def _stop_edge(self, edge: WanEdge, path: Path) -> None:
        try:
            stop_wan_edge(edge)
        finally:
            if not self.settings.keep_workdir:  # kept: its logs show what each run did
                shutil.rmtree(path, ignore_errors=True)

    def _measure(
        self,
        cloud: WanCloud,
        prober: EdgeProber,
        workload: Workload,
        scenario: str,
        method: str,
        repeat: int,
    ) -> None:
        config = cloud.link.config
        label = f"{config.label} {workload.name} {scenario} {method} #{repeat + 1}"
        self._progress(label)
        target_key, old_key = _SCENARIO_IMAGES[scenario]
        target = self.images[(workload.name, *target_key)]
        old = self.images[(workload.name, *old_key)] if old_key else None
        timeout = _edge_timeout(target, config.rate_mbit)
        run = Run(
            link=config.label,
            rtt_ms=config.rtt_ms,
            rate_mbit=config.rate_mbit,
            workload=workload.name,
            scenario=scenario,
            method=method,
            repeat=repeat,
        )
        try:
            sample = self._sample(cloud, prober, workload, method, target, old, timeout)
            run = attrs.evolve(
                run,
                ready_s=sample.ready_s,
                local_s=sample.local_s,
                ttfb_s=sample.ttfb_s,
                wire_bytes=sample.wire_bytes,
                connections=sample.connections,
                requests=sample.requests,
                cpu_s=sample.cpu_s,
                local_ready_s=sample.local_ready_s,
            )
            local = f", local {sample.local_s:.2f}s" if sample.local_s is not None else ""
            self.say(
                f"{label}: ready {sample.ready_s:.2f}s{local}, "
                f"{sample.wire_bytes / 1e6:.1f} MB, {sample.connections}+{sample.requests} "
                f"round trips, CPU {sample.cpu_s:.2f}s"
            )
        except Exception as exc:
            run = attrs.evolve(run, error=f"{type(exc).__name__}: {exc}"[:2000])
            self.say(f"[red]{label}: failed: {exc}[/red]")
        self.results.runs.append(run)
        self.write()
        self._advance()

    def _sample(
        self,
        cloud: WanCloud,
        prober: EdgeProber,
        workload: Workload,
        method: str,
        target: PublishedImage,
        old: PublishedImage | None,
        timeout: float,
    ) -> Sample:
        if method == "curl":
            from starlight_core import wire
            from starlight_core.proxy_client import DeltaRequest

            body = wire.dumps(
                DeltaRequest(
                    to=(str(target.starlight),),
                    from_=(str(old.starlight),) if old is not None else (),
                    platform=PLATFORM,
                    # The worker holds the old version's file lists (as a starlight pull says).
                    tocs=tuple(layer.diff_id for layer in old.layers) if old is not None else (),
                )
            )
            scratch = Path(tempfile.mkdtemp(dir=self.settings.workdir))
            try:
                return measure_curl(cloud.link, cloud.proxy.url, body, scratch=scratch)
            finally:
                shutil.rmtree(scratch, ignore_errors=True)
        edge, path = self._start_edge(cloud)
        try:
            if method == "stock":
                return measure_stock(
                    edge,
                    prober,
                    workload,
                    str(target.original),
                    old=str(old.original) if old is not None else None,
                    logs=path,
                    timeout=timeout,
                )
            return measure_starlight(
                edge,
                prober,
                workload,
                str(target.starlight),
                old=str(old.starlight) if old is not None else None,
                ordering=method == "starlight",
                logs=path,
                timeout=timeout,
            )
        finally:
            self._stop_edge(edge, path)


# --- command line -------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.wan",
        description="Deploy and update real images across an emulated WAN link: stock "
        "containerd vs starlight vs curl of the bundle vs the floor (needs root).",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="~10 minutes: the small workloads, one link (150 ms / 100 Mbit/s), one repeat",
    )
    parser.add_argument(
        "--links",
        nargs="+",
        type=parse_link,
        metavar="RTT/RATE",
        help="links as RTT_MS/RATE_MBIT (default: the sweep "
        + ", ".join(f"{c.rtt_ms:g}/{c.rate_mbit:g}" for c in DEFAULT_SWEEP)
        + ")",
    )
    parser.add_argument(
        "--workloads", nargs="+", choices=sorted(WORKLOADS), help="default: all (--quick: small)"
    )
    parser.add_argument("--scenarios", nargs="+", choices=SCENARIOS, default=list(SCENARIOS))
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--repeats", type=int, help="runs per method (default 3, --quick 1)")
    parser.add_argument(
        "--no-train",
        action="store_true",
        help="no start-up traces: bundles in the proxy's default order, no floor part (i)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        help="results directory (default /var/tmp/starlight-wan/results-<time>)",
    )
    parser.add_argument("--workdir", type=Path, help="scratch directory (default: a new temp)")
    parser.add_argument("--keep-workdir", action="store_true")
    parser.add_argument(
        "--report",
        type=Path,
        nargs="+",
        metavar="RESULTS_JSON",
        help="no measuring: tables and figures of saved results (several: merged, a later "
        "file's link × workload replacing an earlier one's; written to --out)",
    )
    return parser


def _report(paths: Sequence[Path], out: Path | None) -> int:
    from benchmarks.wan.figure import render_figures
    from benchmarks.wan.results import load_results, merge_results

    results = merge_results([load_results(path) for path in paths])
    directory = out or paths[0].parent
    rows = summarise(results)
    print(render_comparison(rows))
    print(render_targets(check_targets(rows)))
    write_results(results, directory)
    for figure in render_figures(results, directory):
        print(f"figure: {figure}")
    return 0


def settings_from(args: argparse.Namespace) -> Settings:
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    links = tuple(args.links) if args.links else (QUICK_LINKS if args.quick else DEFAULT_SWEEP)
    workloads = tuple(args.workloads or (QUICK if args.quick else WORKLOADS))
    repeats = args.repeats if args.repeats is not None else (1 if args.quick else 3)
    if repeats < 1:
        raise SystemExit("--repeats must be at least 1")
    out = args.out or Path("/var/tmp/starlight-wan") / f"results-{stamp}"
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="starlight-wan-", dir="/var/tmp"))
    return Settings(
        links=links,
        workloads=workloads,
        scenarios=tuple(args.scenarios),
        methods=tuple(args.methods),
        repeats=repeats,
        out=out,
        workdir=workdir,
        keep_workdir=args.keep_workdir,
        train=not args.no_train,
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.report is not None:
        return _report(args.report, args.out)
    if os.geteuid() != 0:
        print("python -m benchmarks.wan needs root (network namespaces, containerd, FUSE)")
        return 2
    settings = settings_from(args)
    settings.workdir.mkdir(parents=True, exist_ok=True)
    console = Console(soft_wrap=True)
    console.print(
        f"WAN benchmark: {len(settings.links)} link(s), workloads {', '.join(settings.workloads)}, "
        f"{settings.repeats} repeat(s); results in {settings.out}",
        highlight=False,
    )
    harness = Harness(settings, console=console)
    try:
        results = harness.run()
    except KeyboardInterrupt:
        console.print("interrupted: everything started was stopped; partial results kept")
        harness.write()
        return 130
    finally:
        if not settings.keep_workdir:
            shutil.rmtree(settings.workdir, ignore_errors=True)
    rows = summarise(results)
    print(render_summary(rows))
    print(render_targets(check_targets(rows)))
    print(f"results: {settings.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
