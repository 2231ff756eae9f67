"""``python -m benchmarks`` / ``rlloss-bench``: run the suites on this machine's device (CPU default or GPU
comparison), writing ``<suite>.{json,md,png}`` per suite. Exit status 1 when an rlloss case failed with an error
(an out-of-memory case or a failing peer is recorded, not fatal).
"""
from __future__ import annotations

import argparse
import importlib
import sys
import time
from collections import Counter
from pathlib import Path
from typing import List, Optional

from . import _core as core
from .plots import plot_reports

# Each is a module of this package with DESCRIPTION, run_cpu(ctx) and run_gpu(ctx) -> core.Report.
SUITES = ("advantages", "credit", "distributed", "grpo_loss", "logprobs", "policy", "prefix_attention",
          "prefix_model")
SUMMARY_COLUMNS = (
    core.col("suite", "suite"), core.col("mode", "mode"), core.col("cases", "cases"),
    core.col("status", "statuses"), core.col("skipped peers", "skipped"), core.col("targets", "targets"),
    core.col("wall time (s)", "wall_time_s", ".1f"), core.col("files", "files"),
)


def main(argv: Optional[List[str]] = None) -> int:
    prog = "rlloss-bench" if Path(sys.argv[0]).stem == "rlloss-bench" else f"python -m {__package__}"
    parser = argparse.ArgumentParser(prog=prog, description="Benchmarks of rlloss. Without a GPU each suite runs "
                                     "its CPU default; with CUDA the GPU comparison against the naive baseline "
                                     "and other libraries.")
    parser.add_argument("--suite", action="append", metavar="NAME", choices=SUITES,
                        help=f"suite to run, repeatable (default: all of {', '.join(SUITES)})")
    parser.add_argument("--quick", action="store_true", help="smaller sizes; reports are written as "
                        "<suite>-quick.{json,md}")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--out", metavar="DIR", type=Path,
                       help=f"output folder (default: ./{core.DEFAULT_OUT_ROOT}/<device-slug>/)")
    where.add_argument("--update-docs", action="store_true", help="write into docs/benchmarks/<device-slug>/ of "
                       "this checkout, replacing the committed results (only from a clone of the repository)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="run the CPU default or the GPU comparison (default: CUDA when present)")
    parser.add_argument("--list", action="store_true", help="list the suites and exit")
    args = parser.parse_args(argv)
    suites = {name: importlib.import_module(f"{__package__}.{name}") for name in args.suite or SUITES}
    if args.list:
        for name, module in suites.items():
            print(f"{name:<16} {module.DESCRIPTION}")
        return 0

    device = core.detect_device(args.device)
    try:
        out_dir = (core.docs_results_dir(device) if args.update_docs
                   else (args.out or core.DEFAULT_OUT_ROOT / device.slug).resolve())
    except ValueError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 2
    env = core.environment(device, " ".join([prog, *(sys.argv[1:] if argv is None else argv)]))
    ctx = core.RunContext(device, args.quick, lambda line: print(line, flush=True))
    print(f"rlloss benchmarks on {device.type} ({device.name}); suites: {', '.join(suites)}"
          f"{' (quick)' if args.quick else ''}; writing to {out_dir}", flush=True)
    failed, summary, run_start = False, [], time.perf_counter()
    for name, module in suites.items():
        start = time.perf_counter()
        report = (module.run_gpu if device.type == "cuda" else module.run_cpu)(ctx)
        wall_time_s = time.perf_counter() - start
        suite_env = {**env, "suite_wall_time_s": wall_time_s, "load_average_1min_after": core.load_average()}
        json_path, md_path = core.write_report(report, suite_env, out_dir, args.quick)
        print(f"\n{report.title} ({wall_time_s:.1f} s)\n\n{core.markdown_table(report.records, report.columns)}")
        for skip in report.skips:
            print(f"skipped {skip['impl']}: {skip['reason']}")
        if report.targets:
            print("\nTargets (this run's numbers; reported, never asserted):")
            for row in report.targets:
                print(f"  {row['status'].upper():<12} {row['target']}: "
                      + (f"measured {row['ratio']:.2f}×" if row["ratio"] is not None else row["reason"]))
        print(f"\nwrote {json_path}\nwrote {md_path}", flush=True)
        pngs = plot_reports([json_path], log=lambda line: print(line, flush=True))
        statuses = Counter(r.get("status", "?") for r in report.records)
        met = sum(row["status"] == "met" for row in report.targets)
        summary.append({
            "suite": report.suite, "mode": report.mode, "cases": len(report.records),
            "statuses": ", ".join(f"{n} {status}" for status, n in sorted(statuses.items())) or "none",
            "skipped": ", ".join(skip["impl"] for skip in report.skips) or "—", "wall_time_s": wall_time_s,
            "targets": f"{met}/{len(report.targets)} met" if report.targets else "—",
            "files": ", ".join(path.name for path in (json_path, md_path, *pngs)),
        })
        failed |= any(r.get("role") == "subject" and r.get("status") == "error" for r in report.records)
    print(f"\nAll suites ({time.perf_counter() - run_start:.1f} s in all)\n")
    print(core.markdown_table(summary, SUMMARY_COLUMNS), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
