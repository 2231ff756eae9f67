"""PNG plots of benchmark reports, drawn from their JSON only (matplotlib optional: without it plots are skipped):

    python -m benchmarks.plots docs/benchmarks/cpu [more folders or .json files]

writes ``<stem>.png`` beside each ``<stem>.json``: a row per metric (:data:`METRICS`), a column per axis the "ok"
records vary (:data:`AXES`) times one per facet value, or bars per series; steered by ``config["plot"]``:
``{"facet": key, "series": [keys], "category": key}``.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

MIB = 1 << 20

# (record key, axis label) of the axes a suite may vary, in column order.
AXES: Tuple[Tuple[str, str], ...] = (
    ("tokens", "tokens (B·T)"), ("N", "tokens N"), ("V", "vocabulary V"), ("P", "prompt length P"),
    ("S", "completion length S"), ("G", "group size G"), ("rewards", "rewards"),
)
# (record key, axis label, transform, log scale, key of an ideal drawn dashed beside it)
Metric = Tuple[str, str, Callable[[float], float], bool, Optional[str]]
METRICS: Tuple[Metric, ...] = (
    ("time_ms", "time (ms)", float, True, None),
    ("peak_memory_bytes", "peak memory (MiB)", lambda v: v / MIB, False, None),
    ("matmul_fraction", "% of measured bf16 matmul", lambda v: 100 * v, False, None),
    ("speedup_vs_sdpa", "speed-up vs SDPA (dashed: ideal)", float, False, "ideal_attention_ratio"),
    ("speedup_vs_repeated", "speed-up vs repeated (dashed: ideal)", float, False, "ideal_tokenwise_speedup"),
    ("bandwidth_fraction", "% of measured copy bandwidth", lambda v: 100 * v, False, None),
)
DEFAULT_SERIES = ("case", "preset", "variant", "checkpointing", "impl")


def _matplotlib():
    """The pyplot module on the Agg backend, or the reason it cannot be had."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as exc:  # ImportError, or a broken install
        return None, f"matplotlib is not available ({type(exc).__name__}: {exc}); pip install matplotlib"
    return plt, None


def _varying(records: Sequence[Dict[str, Any]], key: str) -> bool:
    return len({r.get(key) for r in records if r.get(key) is not None}) > 1


def _label(record: Dict[str, Any], keys: Sequence[str]) -> str:
    return " / ".join(str(record[k]) for k in keys if record.get(k) is not None) or "all"


def _plan(report: Dict[str, Any]):
    """(ok records, facet key or None, series keys, category key or None, x axes, metrics) of a report."""
    records = [r for r in report.get("records", []) if r.get("status") == "ok"]
    hints = (report.get("config") or {}).get("plot") or {}
    facet, category = (key if key and _varying(records, key) else None for key in (hints.get("facet"),
                                                                                 hints.get("category")))
    series = [k for k in hints.get("series", DEFAULT_SERIES) if k == "impl" or _varying(records, k)]
    axes = [(key, label) for key, label in AXES if _varying(records, key)]
    if any(key == "tokens" for key, _ in axes):  # tokens and N are the same axis where both exist
        axes = [(key, label) for key, label in axes if key != "N"]
    metrics = [m for m in METRICS if any(isinstance(r.get(m[0]), (int, float)) for r in records)]
    return records, facet, series, category, axes, metrics


def _slice(records: Sequence[Dict[str, Any]], axis: str, axes: Sequence[Tuple[str, str]]) -> List[Dict[str, Any]]:
    """The records along ``axis`` with every other varying axis at its largest value."""
    out = list(records)
    for other, _ in axes:
        if other != axis:
            top = max(r[other] for r in out if r.get(other) is not None)
            out = [r for r in out if r.get(other) == top]
    return out


def _draw_lines(ax, records, axis: str, series: Sequence[str], metric: Metric) -> None:
    key, _, transform, log, ideal = metric
    groups: Dict[str, List[Dict[str, Any]]] = {}
    for r in records:
        if isinstance(r.get(key), (int, float)):
            groups.setdefault(_label(r, series), []).append(r)
    for name, rows in groups.items():
        rows.sort(key=lambda r: r[axis])
        (line,) = ax.plot([r[axis] for r in rows], [transform(r[key]) for r in rows], marker="o", label=name)
        if ideal is not None and all(isinstance(r.get(ideal), (int, float)) for r in rows):
            ax.plot([r[axis] for r in rows], [r[ideal] for r in rows], linestyle="--", color=line.get_color())
    ax.set_xscale("log", base=2)
    if log:
        ax.set_yscale("log")


def _draw_bars(ax, records, series: Sequence[str], category: Optional[str], metric: Metric) -> None:
    key, _, transform, _, ideal = metric
    rows = [r for r in records if isinstance(r.get(key), (int, float))]
    names = list(dict.fromkeys(_label(r, series) for r in rows))
    cats = list(dict.fromkeys(r.get(category) for r in rows)) if category else [None]
    width = 0.8 / max(len(names), 1)
    for i, name in enumerate(names):
        xs, ys = [], []
        for j, cat in enumerate(cats):
            hit = [r for r in rows if _label(r, series) == name and (category is None or r.get(category) == cat)]
            if hit:
                xs.append(j + (i - (len(names) - 1) / 2) * width)
                ys.append(transform(hit[0][key]))
        ax.bar(xs, ys, width=width, label=name)
        if ideal is not None:
            ideals = [r[ideal] for r in rows if _label(r, series) == name and isinstance(r.get(ideal), (int, float))]
            if ideals:
                ax.axhline(ideals[0], linestyle="--", color="grey")
    ax.set_xticks(range(len(cats)))
    ax.set_xticklabels([str(c) if c is not None else "" for c in cats], rotation=30 if category else 0,
                       fontsize=8)  # bars stay on a linear scale: a log-scale bar has no meaningful base


def plot_report(plt, json_path: Path) -> Tuple[Optional[Path], Optional[str]]:
    """Draw ``json_path``'s report with pyplot ``plt`` into the .png beside it. Returns (path, None), or (None,
    why nothing was drawn)."""
    report = json.loads(json_path.read_text())
    records, facet, series, category, axes, metrics = _plan(report)
    if not records or not metrics:
        return None, f"{json_path.name}: no successful record with a plottable metric"
    facets = list(dict.fromkeys(r.get(facet) for r in records)) if facet else [None]
    columns = [(f, axis) for f in facets for axis in (axes or [(None, None)])]
    fig, grid = plt.subplots(len(metrics), len(columns), figsize=(4.6 * len(columns) + 1.5, 2.9 * len(metrics)),
                             squeeze=False)
    for col, (face, (axis, axis_label)) in enumerate(columns):
        chosen = [r for r in records if facet is None or r.get(facet) == face]
        if axis is not None:
            chosen = _slice(chosen, axis, axes)
        fixed = ", ".join(f"{k}={max(r[k] for r in chosen)}" for k, _ in axes if k != axis) if axis else ""
        for row, metric in enumerate(metrics):
            ax = grid[row][col]
            if axis is not None:
                _draw_lines(ax, chosen, axis, series, metric)
            else:
                _draw_bars(ax, chosen, series, category, metric)
            if row == 0:
                title = " ".join(filter(None, [f"{facet}={face}" if facet else "", f"({fixed})" if fixed else ""]))
                ax.set_title(title, fontsize=9)
            if row == len(metrics) - 1 and axis is not None:
                ax.set_xlabel(axis_label, fontsize=9)
            if col == 0:
                ax.set_ylabel(metric[1], fontsize=8)
            ax.tick_params(labelsize=8)
            ax.grid(True, alpha=0.3)
    handles: Dict[str, Any] = {}
    for ax in grid.flat:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, handle)
    env = report.get("environment", {})
    fig.suptitle(f"{report.get('suite')} — {env.get('device_name', '?')} ({report.get('mode')}), "
                 f"commit {(env.get('commit') or '?')[:12]}", fontsize=10)
    if handles:
        fig.legend(list(handles.values()), list(handles), loc="center right", fontsize=7, frameon=False)
    fig.tight_layout(rect=(0, 0, 1 - 1.5 / fig.get_figwidth(), 0.95))
    png_path = json_path.with_suffix(".png")
    fig.savefig(png_path, dpi=90)
    plt.close(fig)
    return png_path, None


def plot_reports(paths: Sequence[Path], log: Callable[[str], None] = print) -> List[Path]:
    """Plot every report JSON among ``paths`` (files, or folders whose ``*.json`` are taken); never raises
    for one bad report, prints why it was skipped."""
    plt, why = _matplotlib()
    if plt is None:
        log(f"plots skipped: {why}")
        return []
    written = []
    for path in paths:
        path = Path(path)
        for json_path in sorted(path.glob("*.json")) if path.is_dir() else [path]:
            try:
                png, reason = plot_report(plt, json_path)
            except Exception as exc:  # a malformed report must not stop the others
                png, reason = None, f"{json_path.name}: {type(exc).__name__}: {exc}"
            if png is None:
                log(f"no plot for {json_path}: {reason}")
            else:
                written.append(png)
                log(f"wrote {png}")
    return written


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else 2
    plot_reports([Path(a) for a in argv])
    return 0


if __name__ == "__main__":
    sys.exit(main())
