"""The figure, in the style of the Starlight paper's: time to ready per workload, one bar per
method, one row per scenario (cold deploy, update with a shared base, full rebuild); one PNG
per link. Bars are medians, whiskers min–max; the floor (e) is a bar of its own.

    python -m benchmarks.wan.figure DIR/results.json     # draws DIR/figure-*.png again
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Final

from benchmarks.wan.results import (
    METHOD_LABELS,
    METHODS,
    SCENARIO_LABELS,
    SCENARIOS,
    Results,
    SummaryRow,
    load_results,
    summarise,
)

__all__ = ["figure_name", "main", "render_figures"]

_COLOURS: Final = {
    "stock": "#7f7f7f",
    "starlight": "#d62728",
    "starlight-unordered": "#ff9896",
    "curl": "#1f77b4",
    "floor": "#2ca02c",
}


def figure_name(rtt_ms: float, rate_mbit: float) -> str:
    return f"figure-{rtt_ms:g}ms-{rate_mbit:g}mbit.png"


def render_figures(results: Results, directory: Path) -> list[Path]:
    """Draw one figure per link measured; return their paths."""
    import matplotlib

    matplotlib.use("Agg")
    rows = summarise(results)
    links: dict[tuple[float, float], list[SummaryRow]] = {}
    for row in rows:
        links.setdefault((row.rtt_ms, row.rate_mbit), []).append(row)
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for (rtt, rate), link_rows in sorted(links.items()):
        path = directory / figure_name(rtt, rate)
        _draw(link_rows, f"{rtt:g} ms RTT, {rate:g} Mbit/s", path)
        paths.append(path)
    return paths


def _draw(rows: Sequence[SummaryRow], title: str, path: Path) -> None:
    import matplotlib.pyplot as plt

    scenarios = [s for s in SCENARIOS if any(r.scenario == s for r in rows)]
    workloads = sorted({r.workload for r in rows})
    series = [m for m in METHODS if any(r.method == m for r in rows)] + ["floor"]
    index = {(r.workload, r.scenario, r.method): r for r in rows}
    width = 0.8 / len(series)
    figure, axes = plt.subplots(
        len(scenarios),
        1,
        figsize=(max(6.0, 1.3 * len(workloads) + 2), 2.8 * len(scenarios) + 0.6),
        squeeze=False,
    )
    for row_axes, scenario in zip(axes, scenarios, strict=True):
        ax = row_axes[0]
        for k, method in enumerate(series):
            xs, heights, low, high = [], [], [], []
            for i, workload in enumerate(workloads):
                if method == "floor":
                    any_row = next(
                        (r for m in METHODS if (r := index.get((workload, scenario, m)))), None
                    )
                    value = any_row.floor_s if any_row is not None else None
                    spread = (0.0, 0.0)
                else:
                    row = index.get((workload, scenario, method))
                    stat = row.ready if row is not None else None
                    value = stat.median if stat is not None else None
                    spread = (
                        (stat.median - stat.low, stat.high - stat.median)
                        if stat is not None
                        else (0.0, 0.0)
                    )
                if value is None:
                    continue
                xs.append(i - 0.4 + width * (k + 0.5))
                heights.append(value)
                low.append(spread[0])
                high.append(spread[1])
            if xs:
                ax.bar(
                    xs,
                    heights,
                    width,
                    yerr=[low, high],
                    capsize=2,
                    color=_COLOURS.get(method, "#bcbd22"),
                    label=METHOD_LABELS.get(method, method),
                    edgecolor="black",
                    linewidth=0.4,
                )
        ax.set_xticks(range(len(workloads)))
        ax.set_xticklabels(workloads)
        ax.set_ylabel("time to ready (s)")
        ax.set_title(SCENARIO_LABELS.get(scenario, scenario), fontsize=10)
        ax.grid(axis="y", linestyle=":", linewidth=0.5)
        ax.set_axisbelow(True)
    handles, labels = axes[0][0].get_legend_handles_labels()
    columns = min(len(series), 3)
    legend_rows = -(-len(series) // columns)
    top = 1 - (0.2 + 0.17 * legend_rows) / figure.get_figheight()
    figure.suptitle(title, y=0.995, fontsize=11)
    figure.legend(
        handles,
        labels,
        loc="upper center",
        bbox_to_anchor=(0.5, 0.975),
        ncol=columns,
        fontsize=8,
        frameon=False,
    )
    figure.tight_layout(rect=(0, 0, 1, top))
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1:
        print("usage: python -m benchmarks.wan.figure RESULTS_JSON")
        return 2
    path = Path(args[0])
    for figure in render_figures(load_results(path), path.parent):
        print(figure)
    return 0


if __name__ == "__main__":
    sys.exit(main())
