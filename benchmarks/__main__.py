"""``python -m benchmarks`` (in the repository root) or ``rlloss-bench`` / ``python -m rlloss.bench`` (anywhere,
after ``pip install``): run the benchmark suites on this machine's device and write their reports.

On a machine without a GPU every suite runs its embedded CPU default; on a CUDA machine the GPU comparison.
Reports go to ``--out DIR`` (default ``./rlloss-bench-results/<device-slug>/``, printed at the start), or with
``--update-docs`` to ``docs/benchmarks/<device-slug>/`` of the checkout, the committed results. Each suite writes
``<suite>.{json,md}`` and a PNG plot drawn from its JSON (``plots``; skipped with the reason when matplotlib is
missing). A progress line is printed per case, each suite's table and targets after it, and a table across the
suites at the end. Exit status 1 when an rlloss case failed with an error (an out-of-memory case or a failing
peer is recorded, not fatal).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from collections import Counter
from typing import Any, Dict, List, Optional

from . import _harness as harness
from ._registry import available_suites
from .plots import plot_reports


def _prog() -> str:
    """How this run was started: the console script, or ``python -m`` and the package's import name."""
    return "rlloss-bench" if Path(sys.argv[0]).stem == "rlloss-bench" else f"python -m {__package__}"


def _parser(suite_names: List[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=_prog(),
        description="Benchmarks of rlloss. Without a GPU each suite runs its CPU default; with CUDA the GPU "
        "comparison against the naive baseline and other libraries.",
    )
    parser.add_argument("--suite", action="append", metavar="NAME", choices=suite_names,
                        help=f"suite to run, repeatable (default: all of {', '.join(suite_names)})")
    parser.add_argument("--quick", action="store_true",
                        help="smaller sizes; reports are written as <suite>-quick.{json,md}")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--out", metavar="DIR", type=Path,
                       help=f"output folder (default: ./{harness.DEFAULT_OUT_ROOT}/<device-slug>/)")
    where.add_argument("--update-docs", action="store_true",
                       help="write into docs/benchmarks/<device-slug>/ of this checkout, replacing the committed "
                            "results (only from a clone of the repository)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="run the CPU default or the GPU comparison (default: CUDA when present)")
    parser.add_argument("--list", action="store_true", help="list the suites and exit")
    return parser


def _subject_failed(report: harness.SuiteReport) -> bool:
    return any(r.get("role") == "subject" and r.get("status") == "error" for r in report.records)


def main(argv: Optional[List[str]] = None) -> int:
    suites = available_suites()
    args = _parser(sorted(suites)).parse_args(argv)
    if args.list:
        for name, suite in suites.items():
            print(f"{name:<16} {suite.description}")
        return 0

    device = harness.detect_device(args.device)
    if args.update_docs:
        try:
            out_dir = harness.docs_results_dir(device)
        except ValueError as exc:
            print(f"{_prog()}: {exc}", file=sys.stderr)
            return 2
    else:
        out_dir = (args.out if args.out is not None else harness.DEFAULT_OUT_ROOT / device.slug).resolve()
    env = harness.environment(device, " ".join([_prog(), *(sys.argv[1:] if argv is None else argv)]))
    ctx = harness.RunContext(device=device, quick=args.quick, progress=lambda line: print(line, flush=True))
    selected = args.suite or sorted(suites)
    print(f"rlloss benchmarks on {device.type} ({device.name}); suites: {', '.join(selected)}"
          f"{' (quick)' if args.quick else ''}; writing to {out_dir}", flush=True)

    failed = False
    summary: List[Dict[str, Any]] = []
    run_start = time.perf_counter()
    for name in selected:
        start = time.perf_counter()
        report = suites[name].run(ctx)
        wall_time_s = time.perf_counter() - start
        summary.append(_summary_row(report, wall_time_s))
        suite_env = {**env, "suite_wall_time_s": wall_time_s, "load_average_1min_after": harness.load_average()}
        json_path, md_path = harness.write_report(report, suite_env, out_dir, args.quick)
        print(f"\n{report.title} ({wall_time_s:.1f} s)\n")
        print(harness.markdown_table(report.records, report.columns))
        for skip in report.skips:
            print(f"skipped {skip['impl']}: {skip['reason']}")
        if report.targets:
            print("\nTargets (this run's numbers; reported, never asserted):")
            for row in report.targets:
                print("  " + harness.target_line(row))
        print(f"\nwrote {json_path}\nwrote {md_path}", flush=True)
        summary[-1]["files"] = f"{json_path.name}, {md_path.name}"
        for png in plot_reports([json_path], log=lambda line: print(line, flush=True)):
            summary[-1]["files"] += f", {png.name}"
        failed |= _subject_failed(report)
    print(f"\nAll suites ({time.perf_counter() - run_start:.1f} s in all)\n")
    print(harness.markdown_table(summary, _SUMMARY_COLUMNS), flush=True)
    return 1 if failed else 0


def _summary_row(report: harness.SuiteReport, wall_time_s: float) -> Dict[str, Any]:
    statuses = Counter(record.get("status", "?") for record in report.records)
    return {"suite": report.suite, "mode": report.mode, "cases": len(report.records),
            "statuses": ", ".join(f"{count} {status}" for status, count in sorted(statuses.items())) or "none",
            "skipped": ", ".join(skip["impl"] for skip in report.skips) or "—", "wall_time_s": wall_time_s,
            "targets": _targets_summary(report.targets), "files": ""}


def _targets_summary(targets: List[Dict[str, Any]]) -> str:
    if not targets:
        return "—"
    met = sum(row["status"] == "met" for row in targets)
    return f"{met}/{len(targets)} met"


_SUMMARY_COLUMNS = (
    harness.Column("suite", lambda r: r["suite"]),
    harness.Column("mode", lambda r: r["mode"]),
    harness.Column("cases", lambda r: str(r["cases"])),
    harness.Column("status", lambda r: r["statuses"]),
    harness.Column("skipped peers", lambda r: r["skipped"]),
    harness.Column("targets", lambda r: r["targets"]),
    harness.Column("wall time (s)", lambda r: f"{r['wall_time_s']:.1f}"),
    harness.Column("files", lambda r: r["files"]),
)


if __name__ == "__main__":
    sys.exit(main())
