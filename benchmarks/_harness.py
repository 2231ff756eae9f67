"""What every suite shares: the device, the environment record, timing and peak-memory probes (CPU and
CUDA), running a case in a fresh process, records, contenders and the columns every table has, and writing the
JSON + markdown report. A suite module holds only its shapes, its contenders and its report columns.

CUDA-only pieces import Triton and touch ``torch.cuda`` inside the functions that need them, so this module
imports and its CPU half runs on a machine without a GPU.
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

# The checkout this package runs from (``benchmarks/`` at the repository root, also installed as ``rlloss.bench``
# by an editable install); for a non-editable install it is site-packages/rlloss, which has no docs/ and no .git.
REPO_ROOT = Path(__file__).resolve().parent.parent
# Where the committed results live in a checkout (``--update-docs``), one folder per device slug.
DOCS_RESULTS_ROOT = REPO_ROOT / "docs" / "benchmarks"
# Where a run writes by default: a folder of the current directory, never the installed package.
DEFAULT_OUT_ROOT = Path("rlloss-bench-results")
REPORT_SCHEMA_VERSION = 1
MIB = 1 << 20
GIB = 1 << 30
KIB = 1 << 10

# What a benchmark number depends on: an uncommitted change here makes the recorded commit inexact.
MEASURED_CODE_PATHS = ("rlloss", "kernels", "benchmarks", "setup.py", "pyproject.toml")
# A case run in its own process may take this long before it is killed and recorded as an error.
ISOLATED_CASE_TIMEOUT_S = 900


# --- device and environment ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Device:
    """Where a run happens. ``type`` is "cpu" or "cuda"; ``slug`` names the results folder."""

    type: str
    name: str
    slug: str


def slugify(name: str) -> str:
    """'NVIDIA H100 80GB HBM3' → 'nvidia-h100-80gb-hbm3'."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "unknown"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def detect_device(requested: str = "auto") -> Device:
    """The device of this run: CUDA when present (or asked for), else the CPU.

    Raises:
        ValueError: ``requested`` is not "auto", "cpu" or "cuda", or "cuda" without a CUDA device.
    """
    if requested not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', got {requested!r}")
    use_cuda = torch.cuda.is_available() if requested == "auto" else requested == "cuda"
    if use_cuda:
        if not torch.cuda.is_available():
            raise ValueError("--device cuda was asked for, but torch sees no CUDA device")
        name = torch.cuda.get_device_name()
        return Device("cuda", name, slugify(name))
    return Device("cpu", _cpu_model(), "cpu")


def is_checkout() -> bool:
    """Whether this package runs from a git checkout of the repository (editable install or the repository root),
    as opposed to an installed copy in site-packages."""
    return (REPO_ROOT / ".git").exists() and DOCS_RESULTS_ROOT.is_dir()


def docs_results_dir(device: Device) -> Path:
    """``docs/benchmarks/<device-slug>/`` of this checkout: where the committed results live.

    Raises:
        ValueError: this package does not run from a checkout (an installed copy has no docs/).
    """
    if not is_checkout():
        raise ValueError(f"--update-docs writes the committed results of a checkout, but this package runs from "
                         f"{REPO_ROOT}, which is no checkout of the repository (no .git and docs/benchmarks/ "
                         "there); install it from a clone with pip install -e, or pass --out DIR")
    return DOCS_RESULTS_ROOT / device.slug


def _git(*args: str) -> Optional[str]:
    if not (REPO_ROOT / ".git").exists():  # an installed copy: another repository's git must not answer
        return None
    try:
        done = subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def _triton_version() -> Optional[str]:
    try:
        import triton
    except ImportError:
        return None
    return triton.__version__


def load_average() -> Optional[float]:
    """The 1-minute load average (other work on the machine slows CPU timings), where the OS has one."""
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else None


def environment(device: Device, command: Optional[str] = None) -> Dict[str, Any]:
    """Everything needed to tell two runs apart: commit, device, library versions, threads, time.
    ``command``: how the run was started (default: ``python -m <this package>`` and the arguments)."""
    # Uncommitted changes to the measured code only (documentation edits do not change a number).
    status = _git("status", "--porcelain", "--untracked-files=no", "--", *MEASURED_CODE_PATHS)
    env = {
        "commit": _git("rev-parse", "HEAD"),
        "commit_dirty": bool(status) if status is not None else None,
        "device_type": device.type,
        "device_name": device.name,
        "device_slug": device.slug,
        "torch": torch.__version__,
        "triton": _triton_version(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average_1min": load_average(),
        "timestamp_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "command": command or " ".join([Path(sys.executable).name, "-m", __package__, *sys.argv[1:]]),
    }
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability()
        env["cuda"] = torch.version.cuda
        env["compute_capability"] = f"{major}.{minor}"
        env["gpu_memory_bytes"] = torch.cuda.get_device_properties(0).total_memory
    return env


# --- shapes ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BatchShape:
    """B sequences of T completion tokens, hidden size D, vocabulary V (the policy and credit suites)."""

    B: int
    T: int
    D: int
    V: int

    @property
    def N(self) -> int:
        return self.B * self.T

    def __str__(self) -> str:
        return f"B×T={self.B}×{self.T} D={self.D} V={self.V}"


# --- the context a suite runs in and the report it returns -------------------------------------------------


@dataclass
class RunContext:
    """What ``python -m benchmarks`` hands a suite."""

    device: Device
    quick: bool
    progress: Callable[[str], None] = print


@dataclass(frozen=True)
class Column:
    """One column of the markdown table: a header and how to render it from a record."""

    header: str
    render: Callable[[Dict[str, Any]], str]


@dataclass
class SuiteReport:
    """What a suite measured.

    mode: which set of cases ran ("cpu-default", "gpu-peers", ...).
    config: the sizes, dtypes and repeat counts of the run (goes to the JSON as is).
    records: one flat dict per (implementation, shape): plots group and filter on its keys.
    skips: ``{"impl": ..., "reason": ...}`` for every implementation that could not run at all.
    notes: methodology lines for the markdown (memory method, FLOP convention, ...).
    targets: the issue's targets evaluated on this run's records (:func:`evaluate_targets`), reported as met or
        missed, never asserted.
    """

    suite: str
    mode: str
    title: str
    config: Dict[str, Any]
    records: List[Dict[str, Any]]
    columns: Sequence[Column] = field(repr=False)
    skips: List[Dict[str, str]] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)
    targets: List[Dict[str, Any]] = field(default_factory=list)


def markdown_cell(text: Any) -> str:
    """One markdown table cell: pipes escaped (a "|Δloss|" header or an error message would otherwise split the
    row) and line breaks folded. Every generated table cell, headers included, goes through here."""
    return " ".join(str(text).replace("|", "\\|").split())


def markdown_table(records: Sequence[Dict[str, Any]], columns: Sequence[Column]) -> str:
    rows = [[markdown_cell(column.header) for column in columns], ["---"] * len(columns)]
    rows += [[markdown_cell(column.render(record)) for column in columns] for record in records]
    return "\n".join("| " + " | ".join(row) + " |" for row in rows)


def report_stem(suite: str, quick: bool) -> str:
    """File stem of a suite's report: quick runs never overwrite the full results."""
    return f"{suite}-quick" if quick else suite


def report_json(report: SuiteReport, env: Dict[str, Any], quick: bool) -> Dict[str, Any]:
    return {
        "schema_version": REPORT_SCHEMA_VERSION,
        "suite": report.suite,
        "mode": report.mode,
        "quick": quick,
        "environment": env,
        "config": report.config,
        "notes": report.notes,
        "skips": report.skips,
        "targets": report.targets,
        "records": report.records,
    }


def report_markdown(report: SuiteReport, env: Dict[str, Any], quick: bool) -> str:
    commit = (env.get("commit") or "unknown")[:12] + (
        " with uncommitted changes to the measured code" if env.get("commit_dirty") else "")
    lines = [
        f"# {report.title}",
        "",
        f"Device: {env['device_name']}. Commit `{commit}`, torch {env['torch']}, triton {env['triton']}, "
        f"Python {env['python']}, {env['torch_threads']} torch threads, {env['timestamp_utc']}.",
        f"Command: `{env['command']}`" + (" (quick sizes)" if quick else "")
        + (f", suite wall time {env['suite_wall_time_s']:.0f} s" if "suite_wall_time_s" in env else "") + "."
        + _load_sentence(env),
        "Generated by the benchmark run; numbers are measured, never edited by hand. "
        "The JSON beside this file holds every field.",
        "",
        markdown_table(report.records, report.columns),
        "",
    ]
    if report.targets:
        lines += ["Targets (measured in this run; reported, never asserted):", "",
                  markdown_table(report.targets, TARGET_COLUMNS), ""]
    if report.skips:
        lines += ["Skipped:", ""] + [f"- `{skip['impl']}`: {skip['reason']}" for skip in report.skips] + [""]
    if report.notes:
        lines += ["How it was measured:", ""] + [f"- {note}" for note in report.notes] + [""]
    return "\n".join(lines)


def _load_sentence(env: Dict[str, Any]) -> str:
    before, after = env.get("load_average_1min"), env.get("load_average_1min_after")
    if before is None:
        return ""
    text = f" 1-minute load average {before:.1f} when the run started"
    text += f" and {after:.1f} when it ended" if after is not None else ""
    return (text + f", on {env['cpu_count']} cores: the run itself adds up to its {env['torch_threads']} threads, "
            "anything beyond that is other work that slowed the CPU timings.")


def write_report(report: SuiteReport, env: Dict[str, Any], out_dir: Path, quick: bool) -> Tuple[Path, Path]:
    """Write ``<suite>.json`` and ``<suite>.md`` (``<suite>-quick.*`` for quick runs) into ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = report_stem(report.suite, quick)
    json_path, md_path = out_dir / f"{stem}.json", out_dir / f"{stem}.md"
    json_path.write_text(json.dumps(report_json(report, env, quick), indent=1, default=str) + "\n")
    md_path.write_text(report_markdown(report, env, quick))
    return json_path, md_path


# --- formatting -------------------------------------------------------------------------------------------


def fmt_ms(value: Optional[float]) -> str:
    return "—" if value is None else f"{value:.1f}" if value >= 10 else f"{value:.3f}"


def fmt_mib(value: Optional[float]) -> str:
    return "—" if value is None else f"{value / MIB:.1f}"


def fmt_gib(value: Optional[float]) -> str:
    return "—" if value is None else f"{value / GIB:.2f}"


def fmt_err(value: Optional[float]) -> str:
    return "—" if value is None else f"{value:.1e}"


def fmt_num(value: Optional[float], digits: int = 1) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def dtype_name(dtype: torch.dtype) -> str:
    """torch.bfloat16 → 'bfloat16'."""
    return str(dtype).replace("torch.", "")


# Columns every suite's table has: the implementation and the case's status (with its error, if any), and the
# spread of a time distribution (min–max of CPU repeats, 20th–80th percentile on CUDA).
IMPL_COLUMN = Column("impl", lambda r: f"`{r['impl']}`")
STATUS_COLUMN = Column("status", lambda r: r["status"] if r["error"] is None else f"{r['status']}: {r['error']}")


def time_spread_column(header: str = "min–max ms") -> Column:
    return Column(header, lambda r: "—" if r.get("time_ms") is None
                  else f"{fmt_ms(r['time_low_ms'])}–{fmt_ms(r['time_high_ms'])}")


# A CPU default's time and isolated peak memory (with ``peak_memory_in_logits_tensors``).
CPU_TIME_MEMORY_COLUMNS = (
    Column("fwd+bwd ms (median)", lambda r: fmt_ms(r.get("time_ms"))),
    time_spread_column("min–max ms"),
    Column("peak memory beyond inputs (MiB)", lambda r: fmt_mib(r.get("peak_memory_bytes"))),
    Column("= [N, V] tensors", lambda r: fmt_num(r.get("peak_memory_in_logits_tensors"), 2)),
)


# --- targets ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """A target an issue states as a ratio between two measured figures, e.g. rlloss's time ≤ 0.75× naive's.

    text: the target as the issue states it. key: the record field compared ("time_ms", "peak_memory_bytes").
    subject / baseline: the ``impl`` of the two records. limit: the largest ratio subject / baseline that meets it.
    """

    text: str
    key: str
    subject: str
    baseline: str
    limit: float

    def evaluate(self, records: Sequence[Dict[str, Any]]) -> Dict[str, Any]:
        """The target on these records: the measured ratio and "met", "missed" or "not measured" (either side
        missing or failed), with the reason."""
        by_impl = {r["impl"]: r for r in records if r.get("status") == "ok"}
        values = [by_impl.get(name, {}).get(self.key) for name in (self.subject, self.baseline)]
        row = {"target": self.text, "key": self.key, "subject": self.subject, "baseline": self.baseline,
               "limit": self.limit, "ratio": None, "status": "not measured", "reason": None}
        missing = [name for name, value in zip((self.subject, self.baseline), values) if not value]
        if missing:
            row["reason"] = f"no {self.key} for {' and '.join(missing)} in this run"
            return row
        row["ratio"] = values[0] / values[1]
        row["status"] = "met" if row["ratio"] <= self.limit else "missed"
        return row


def evaluate_targets(targets: Sequence[Target], records: Sequence[Dict[str, Any]]) -> List[Dict[str, Any]]:
    return [target.evaluate(records) for target in targets]


def target_line(row: Dict[str, Any]) -> str:
    """'MET     rlloss time ≤ 0.75× naive: measured 0.61×' (the progress line of one evaluated target)."""
    measured = f"measured {row['ratio']:.2f}×" if row["ratio"] is not None else row["reason"]
    return f"{row['status'].upper():<12} {row['target']}: {measured}"


TARGET_COLUMNS = (
    Column("target", lambda r: r["target"]),
    Column("measured ratio", lambda r: "—" if r["ratio"] is None else f"{r['ratio']:.2f}×"),
    Column("limit", lambda r: f"≤ {r['limit']:g}×"),
    Column("status", lambda r: r["status"] + (f" ({r['reason']})" if r.get("reason") else "")),
)


# --- timing -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Timing:
    """A time distribution: the median and a spread (min/max of CPU repeats, 20th/80th percentile on CUDA)."""

    median_ms: float
    low_ms: float
    high_ms: float
    samples: int
    method: str

    def as_record(self) -> Dict[str, Any]:
        return {"time_ms": self.median_ms, "time_low_ms": self.low_ms, "time_high_ms": self.high_ms,
                "time_samples": self.samples, "time_method": self.method}


def cpu_times_interleaved(fns: Dict[str, Callable[[], Any]], warmup: int, repeats: int) -> Dict[str, Timing]:
    """Like :func:`cpu_time` for several functions, their calls interleaved round by round, so that load
    from other processes that comes and goes slows each of them alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    samples: Dict[str, List[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            samples[name].append((time.perf_counter() - start) * 1e3)
    method = f"time.perf_counter, median of {repeats} calls after {warmup} warm-up" + (
        ", calls of " + " / ".join(fns) + " interleaved" if len(fns) > 1 else "")
    return {name: Timing(statistics.median(s), min(s), max(s), repeats, method) for name, s in samples.items()}


def timing_from_samples(samples_ms: Sequence[float], method: str) -> Timing:
    """The median and min–max of wall times measured elsewhere (e.g. in several fresh processes)."""
    return Timing(statistics.median(samples_ms), min(samples_ms), max(samples_ms), len(samples_ms), method)


def timed_calls_ms(fn: Callable[[], Any], warmup: int, calls: int) -> List[float]:
    """Wall time in ms of each of ``calls`` calls of ``fn`` after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(calls):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e3)
    return samples


def cpu_time(fn: Callable[[], Any], warmup: int, repeats: int) -> Timing:
    """Median wall time of ``fn`` over ``repeats`` calls after ``warmup`` untimed calls."""
    return cpu_times_interleaved({"fn": fn}, warmup, repeats)["fn"]


# triton.testing.do_bench budgets in milliseconds (it picks the call counts from a first estimate) and the
# quantiles it reports: the median and a spread.
DO_BENCH_WARMUP_MS = 25
DO_BENCH_REP_MS = 100
DO_BENCH_QUANTILES = (0.2, 0.5, 0.8)
# The timing note of a GPU report.
CUDA_TIME_NOTE = (f"Time: `triton.testing.do_bench` median (L2 flushed before every call; warm-up "
                  f"{DO_BENCH_WARMUP_MS} ms, repetitions {DO_BENCH_REP_MS} ms).")


def cuda_time(fn: Callable[[], Any]) -> Timing:
    """Median CUDA time of ``fn`` by ``triton.testing.do_bench`` (L2 flushed before every call)."""
    from triton.testing import do_bench

    low, median, high = do_bench(fn, warmup=DO_BENCH_WARMUP_MS, rep=DO_BENCH_REP_MS,
                                 quantiles=list(DO_BENCH_QUANTILES))
    return Timing(median, low, high, 0,
                  f"triton.testing.do_bench(warmup={DO_BENCH_WARMUP_MS} ms, rep={DO_BENCH_REP_MS} ms), "
                  "median; low/high are the 20th/80th percentiles")


# Square size of the bf16 matmul whose rate is the GPU's reference peak in this run.
MATMUL_REFERENCE_SIZE = 8192


def cuda_matmul_tflops(dtype: torch.dtype = torch.bfloat16, size: int = MATMUL_REFERENCE_SIZE) -> float:
    """Measured rate of a large ``torch.matmul`` on this GPU, in TFLOP/s (2·size³ FLOPs per call)."""
    a = torch.randn(size, size, device="cuda", dtype=dtype)
    b = torch.randn(size, size, device="cuda", dtype=dtype)
    timing = cuda_time(lambda: torch.matmul(a, b))
    return 2 * size**3 / (timing.median_ms * 1e-3) / 1e12


def reference_matmul_tflops(ctx: "RunContext", dtype: torch.dtype = torch.bfloat16) -> float:
    """:func:`cuda_matmul_tflops`, announced on the run's progress."""
    matmul_tflops = cuda_matmul_tflops(dtype)
    ctx.progress(f"bf16 torch.matmul {MATMUL_REFERENCE_SIZE}³: {matmul_tflops:.0f} TFLOP/s (reference peak)")
    return matmul_tflops


def add_rates(record: Dict[str, Any], matmul_tflops: Optional[float]) -> None:
    """Achieved TFLOP/s of a timed record (its nominal ``flops`` over its median time) and its fraction of the
    reference matmul rate."""
    tflops = record["flops"] / (record["time_ms"] * 1e-3) / 1e12
    record["tflops"] = tflops
    record["matmul_fraction"] = tflops / matmul_tflops if matmul_tflops else None


# --- the GEMM floor ---------------------------------------------------------------------------------------

# The bare GEMMs an lm_head op cannot avoid, as [rows, cols] products of h [N, D], W [V, D] and an [N, V] logit
# gradient dz: logits z = h·Wᵀ, d hidden = dz·W, d weight = dzᵀ·h (2·N·D·V FLOPs each).
LOGPROBS_FLOOR_GEMMS = ("h·Wᵀ", "h·Wᵀ", "dz·W", "dzᵀ·h")  # forward, backward recompute, the two gradients
FUSED_LOSS_FLOOR_GEMMS = ("h·Wᵀ", "dz·W", "dzᵀ·h")  # the fused loss forms dz in its forward: no recompute
GEMM_FLOOR_NOTE = (
    "GEMM floor: the bare cuBLAS GEMMs an op of this shape cannot avoid, `torch.mm` into preallocated outputs on "
    "random inputs of the same dtype, timed the same way in the same run (each GEMM is also timed alone, in the "
    "JSON's `gemm_times_ms`); × GEMM floor is a row's time over the floor's time at its shape."
)


def gemm_floor(N: int, D: int, V: int, dtype: torch.dtype, device: str, gemms: Sequence[str],
               time_fn: Callable[[Callable[[], Any]], Timing]) -> Dict[str, Any]:
    """Time ``gemms`` (names from :data:`LOGPROBS_FLOOR_GEMMS`) back to back, and each distinct one alone, on
    random h [N, D], W [V, D] and one [N, V] buffer that is both the logits written and the dz read.

    Returns record fields: ``time_ms`` and its spread (the sequence), ``gemm_times_ms`` (each GEMM alone),
    ``gemms`` and ``gemm_flops`` (2·N·D·V per GEMM).
    """
    gen = torch.Generator(device=device).manual_seed(0)
    # Random, not zeros: GPUs draw less power on zeros and run such GEMMs faster than real ones.
    h = torch.randn(N, D, generator=gen, device=device, dtype=dtype)
    w = torch.randn(V, D, generator=gen, device=device, dtype=dtype) * D**-0.5
    z = torch.randn(N, V, generator=gen, device=device, dtype=dtype)  # logits out, dz in
    dh, dw = torch.empty_like(h), torch.empty_like(w)
    ops = {
        "h·Wᵀ": lambda: torch.mm(h, w.t(), out=z),
        "dz·W": lambda: torch.mm(z, w, out=dh),
        "dzᵀ·h": lambda: torch.mm(z.t(), h, out=dw),
    }
    unknown = [name for name in gemms if name not in ops]
    if unknown:
        raise ValueError(f"unknown GEMM(s) {unknown}; expected names from {tuple(ops)}")
    sequence = [ops[name] for name in gemms]

    def all_gemms() -> None:
        for op in sequence:
            op()

    record = time_fn(all_gemms).as_record()
    record["gemm_times_ms"] = {name: time_fn(ops[name]).median_ms for name in dict.fromkeys(gemms)}
    record["gemms"] = list(gemms)
    record["gemm_flops"] = 2 * N * D * V * len(gemms)
    del h, w, z, dh, dw
    return record


def add_floor_ratios(records: Sequence[Dict[str, Any]], floor: Dict[str, Any], key: str = "time_vs_gemm_floor",
                     ) -> None:
    """``record[key]`` = record time / floor time for every timed record (the floor's own row included)."""
    if not floor.get("time_ms"):
        return
    for record in records:
        if record.get("time_ms"):
            record[key] = record["time_ms"] / floor["time_ms"]


# --- peak memory ------------------------------------------------------------------------------------------

# glibc malloc keeps freed blocks below its (adaptive) mmap threshold in its heap, so peak RSS would count
# what the allocator caches, which depends on history. Pinning the threshold maps every block of at least
# this size on allocation and unmaps it on free: RSS then follows the live tensors, as
# torch.cuda.max_memory_allocated does on a GPU. Only the memory-measuring process runs with it.
MALLOC_MMAP_THRESHOLD_BYTES = 128 * KIB
LIVE_MEMORY_ENV = {"MALLOC_MMAP_THRESHOLD_": str(MALLOC_MMAP_THRESHOLD_BYTES)}

CPU_MEMORY_METHOD = (
    "CPU peak memory: each case's memory is measured in a fresh Python process of its own. After the inputs "
    "are built (and a tiny-shape call has started the thread pools) the kernel's peak-RSS counter is reset "
    "(`/proc/self/clear_refs` ← 5) and the RSS read; one full-size forward + backward follows, and the figure "
    "is the peak RSS (`VmHWM` of `/proc/self/status`, which that reset lowers; not `ru_maxrss`, which a child "
    "inherits from its parent) minus that RSS. That process runs with glibc's "
    f"mmap threshold pinned at {MALLOC_MMAP_THRESHOLD_BYTES // KIB} KiB (`MALLOC_MMAP_THRESHOLD_`), so every "
    "tensor is mapped when allocated and unmapped when freed and RSS follows the live tensors (as "
    "`torch.cuda.max_memory_allocated` does on a GPU) rather than what malloc keeps cached; timing runs in "
    "another process with the default allocator. The figure includes the input gradients the call returns."
)

CUDA_MEMORY_METHOD = (
    "CUDA peak memory: `torch.cuda.max_memory_allocated()` during one forward+backward (after warm-up and "
    "`reset_peak_memory_stats`) minus `memory_allocated()` just before it, inputs and upstream gradients "
    "already allocated; it includes the input gradients the call returns."
)


def _proc_status_kib(key: str) -> Optional[int]:
    try:
        with open("/proc/self/status", encoding="utf-8") as status:
            for line in status:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def reset_peak_rss() -> bool:
    """Reset this process's peak-RSS counter (Linux ≥ 4.0); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as clear_refs:
            clear_refs.write("5")
    except OSError:
        return False
    return True


def current_rss_bytes() -> int:
    kib = _proc_status_kib("VmRSS")
    if kib is None:  # no procfs: fall back to the peak, the best lower bound the OS offers
        return peak_rss_bytes()
    return kib * KIB


def peak_rss_bytes() -> int:
    """This process's peak RSS: ``VmHWM`` (which ``/proc/self/clear_refs`` resets) where procfs has it.

    Not ``getrusage``'s ``ru_maxrss`` on Linux: a process started by fork + exec inherits its parent's peak
    there and no reset lowers it, so a child of a process that once held more would report the parent's peak.
    """
    hwm_kib = _proc_status_kib("VmHWM")
    if hwm_kib is not None:
        return hwm_kib * KIB
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return maxrss if sys.platform == "darwin" else maxrss * KIB  # bytes on macOS, KiB on Linux


def cpu_peak_memory(fn: Callable[[], Any]) -> Tuple[int, bool, Any]:
    """(peak RSS during ``fn`` minus RSS before it, whether the peak counter could be reset, fn's result)."""
    was_reset = reset_peak_rss()
    before = current_rss_bytes()
    result = fn()
    return max(0, peak_rss_bytes() - before), was_reset, result


def cuda_peak_memory(fn: Callable[[], Any]) -> Tuple[int, Any]:
    """(peak CUDA memory allocated during ``fn`` minus what was allocated before it, fn's result)."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    result = fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before, result


@dataclass(frozen=True)
class Probes:
    """How a case is timed and its memory measured: CUDA in a real run, CPU stand-ins in a smoke run or test."""

    time: Callable[[Callable[[], Any]], Timing]
    peak_memory: Callable[[Callable[[], Any]], Tuple[Optional[int], Any]]


CUDA_PROBES = Probes(time=cuda_time, peak_memory=cuda_peak_memory)


def cpu_probes(warmup: int, repeats: int) -> Probes:
    """CPU stand-ins: :func:`cpu_time` and no memory figure (the call's result, peak None)."""
    return Probes(time=lambda fn: cpu_time(fn, warmup, repeats), peak_memory=lambda fn: (None, fn()))


def add_memory_in_logits_tensors(records: Sequence[Dict[str, Any]], logits_bytes: int) -> None:
    """Each measured peak as a multiple of one [N, V] tensor (``peak_memory_in_logits_tensors``)."""
    for record in records:
        if record.get("peak_memory_bytes") is not None:
            record["peak_memory_in_logits_tensors"] = record["peak_memory_bytes"] / logits_bytes


def is_out_of_memory(exc: BaseException) -> bool:
    oom_type = getattr(torch, "OutOfMemoryError", None) or getattr(torch.cuda, "OutOfMemoryError", ())
    return isinstance(exc, oom_type) or "out of memory" in str(exc).lower()


def describe_error(exc: BaseException, limit: int = 300) -> str:
    first_line = (str(exc).strip().splitlines() or [""])[0]
    text = f"{type(exc).__name__}: {first_line}"
    return text if len(text) <= limit else text[: limit - 1] + "…"


def failure(record: Dict[str, Any], exc: BaseException) -> Dict[str, Any]:
    """Mark ``record`` as failed by ``exc`` ("oom" or "error", with the error's first line) and return it."""
    record["status"] = "oom" if is_out_of_memory(exc) else "error"
    record["error"] = describe_error(exc)
    return record


def free_device_memory(device_type: str) -> None:
    import gc

    gc.collect()
    if device_type == "cuda":
        torch.cuda.empty_cache()


def synchronised(step: Callable[[], Any], device: str) -> Callable[[], None]:
    """``step`` followed by a CUDA synchronisation on ``device`` "cuda" (what pytest-benchmark times), after one
    untimed warm-up call."""
    synchronize = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def synchronised_step() -> None:
        step()
        synchronize()

    synchronised_step()
    return synchronised_step


# --- comparing outputs ------------------------------------------------------------------------------------


def max_abs_diff(a: Optional[torch.Tensor], b: Optional[torch.Tensor]) -> Optional[float]:
    """max |a − b| in float64 (0 for empty tensors); None where either side is missing."""
    if a is None or b is None:
        return None
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def output_diffs(outputs: Tuple, expected: Tuple, prefix: str) -> Dict[str, Optional[float]]:
    """``{prefix_<field>: max|Δ|}`` for every field of two NamedTuples of tensors of the same type."""
    return {f"{prefix}_{name}": max_abs_diff(getattr(outputs, name), getattr(expected, name))
            for name in type(expected)._fields}


# --- contenders -------------------------------------------------------------------------------------------


def import_error(module: str, pip_name: str) -> Callable[[], Optional[str]]:
    """An implementation's ``unavailable``: why ``module`` does not import here, or None."""
    def unavailable() -> Optional[str]:
        try:
            __import__(module)
        except Exception as exc:  # ImportError, or a peer whose own import breaks on this stack
            return f"`import {module}` failed ({describe_error(exc, 160)}); pip install {pip_name}"
        return None

    return unavailable


def split_available(impls: Sequence[Any], progress: Optional[Callable[[str], None]] = None,
                    ) -> Tuple[List[Any], List[Dict[str, str]]]:
    """(implementations that can run here, ``{"impl", "reason"}`` for the others, each said on ``progress``).
    An implementation has ``name`` and ``unavailable() -> Optional[str]``."""
    ready, skips = [], []
    for impl in impls:
        reason = impl.unavailable()
        if reason is None:
            ready.append(impl)
        else:
            skips.append({"impl": impl.name, "reason": reason})
    for skip in skips if progress is not None else ():
        progress(f"skip {skip['impl']}: {skip['reason']}")
    return ready, skips


# --- running a case in a fresh process -------------------------------------------------------------------


def _import_root() -> Path:
    """The folder holding this package's top-level package (the repository root for ``benchmarks``)."""
    top = sys.modules[__package__.partition(".")[0]]
    return Path(top.__file__).resolve().parent.parent


def run_isolated(function: str, payload: Dict[str, Any], env_overrides: Optional[Dict[str, str]] = None,
                 timeout_s: float = ISOLATED_CASE_TIMEOUT_S) -> Dict:
    """Call ``function`` ("package.module:name", taking and returning a JSON-able dict) in a fresh Python
    process, with ``env_overrides`` added to its environment, and return its result.

    Raises:
        RuntimeError: the process failed or timed out (the message ends with its stderr).
    """
    with tempfile.TemporaryDirectory(prefix="rlloss-bench-") as tmp:
        payload_path, result_path = Path(tmp) / "payload.json", Path(tmp) / "result.json"
        payload_path.write_text(json.dumps(payload))
        env = {**os.environ, **(env_overrides or {})}
        # The child imports this package under the name the parent did ("benchmarks" in the repository root,
        # "rlloss.bench" when installed), from the folder the parent imported it from, whatever the directory.
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(_import_root()), env.get("PYTHONPATH")]))
        command = [sys.executable, "-m", f"{__package__}._worker", function, str(payload_path), str(result_path)]
        try:
            done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout_s)
        except subprocess.TimeoutExpired as exc:
            raise RuntimeError(f"{function} ran past {timeout_s:.0f} s") from exc
        if done.returncode != 0 or not result_path.exists():
            tail = "\n".join(done.stderr.strip().splitlines()[-20:])
            raise RuntimeError(f"{function} failed in its own process (exit {done.returncode}):\n{tail}")
        return json.loads(result_path.read_text())


def measure_memory_isolated(record: Dict[str, Any], function: str, payload: Dict[str, Any]) -> bool:
    """:func:`run_isolated` of a CPU memory measurement (glibc's mmap threshold pinned, ``LIVE_MEMORY_ENV``),
    its result merged into ``record``; a failure is recorded on it instead. True where it ran."""
    try:
        record.update(run_isolated(function, payload, LIVE_MEMORY_ENV))
    except RuntimeError as exc:
        failure(record, exc)
        return False
    return True


def run_isolated_or_fail(function: str, payload: Dict[str, Any],
                         records: Sequence[Dict[str, Any]]) -> Optional[Dict]:
    """:func:`run_isolated`'s result, or None with every one of ``records`` marked failed by its error."""
    try:
        return run_isolated(function, payload)
    except RuntimeError as exc:
        for record in records:
            failure(record, exc)
        return None

