"""What every suite shares: environment record, timing, peak memory, GEMM floor, fresh processes, the loop over
cases, targets and the JSON + markdown report. CUDA-only pieces import Triton inside the functions that need them.
``python -m <package>._core module:function payload.json result.json`` runs a case in its own process.
"""
from __future__ import annotations

import datetime
import gc
import importlib
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
DOCS_RESULTS_ROOT = REPO_ROOT / "docs" / "benchmarks"  # committed results, one folder per device slug
DEFAULT_OUT_ROOT = Path("rlloss-bench-results")  # a folder of the current directory, never the package
REPORT_SCHEMA_VERSION = 1
KIB, MIB, GIB = 1 << 10, 1 << 20, 1 << 30
# What a benchmark number depends on: an uncommitted change here makes the recorded commit inexact.
MEASURED_CODE_PATHS = ("rlloss", "kernels", "benchmarks", "setup.py", "pyproject.toml")
ISOLATED_CASE_TIMEOUT_S = 900  # a case in its own process is killed after this and recorded as an error
Record = Dict[str, Any]

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
            return next(line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine() or "unknown CPU"


def detect_device(requested: str = "auto") -> Device:
    """CUDA when present (or asked for), else the CPU. Raises ValueError for "cuda" without a CUDA device."""
    if requested == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for, but torch sees no CUDA device")
    if requested == "cpu" or not torch.cuda.is_available():
        return Device("cpu", _cpu_model(), "cpu")
    return Device("cuda", torch.cuda.get_device_name(), slugify(torch.cuda.get_device_name()))


def docs_results_dir(device: Device) -> Path:
    """``docs/benchmarks/<device-slug>/`` of this checkout; ValueError from an installed copy (no docs/)."""
    if not ((REPO_ROOT / ".git").exists() and DOCS_RESULTS_ROOT.is_dir()):
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


def load_average() -> Optional[float]:
    """The 1-minute load average (other work on the machine slows CPU timings), where the OS has one."""
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else None


def environment(device: Device, command: str) -> Record:
    """Everything needed to tell two runs apart: commit, device, library versions, threads, time."""
    status = _git("status", "--porcelain", "--untracked-files=no", "--", *MEASURED_CODE_PATHS)
    try:
        from triton import __version__ as triton_version
    except ImportError:
        triton_version = None
    env = {
        "commit": _git("rev-parse", "HEAD"), "commit_dirty": bool(status) if status is not None else None,
        "device_type": device.type, "device_name": device.name, "device_slug": device.slug,
        "torch": torch.__version__, "triton": triton_version, "python": platform.python_version(),
        "platform": platform.platform(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "load_average_1min": load_average(),
        "timestamp_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "command": command,
    }
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability()
        env.update(cuda=torch.version.cuda, compute_capability=f"{major}.{minor}",
                   gpu_memory_bytes=torch.cuda.get_device_properties(0).total_memory)
    return env


@dataclass(frozen=True)
class BatchShape:
    """B sequences of T completion tokens, hidden size D, vocabulary V."""

    B: int
    T: int
    D: int
    V: int

    @property
    def N(self) -> int:
        return self.B * self.T

    def __str__(self) -> str:
        return f"B×T={self.B}×{self.T} D={self.D} V={self.V}"


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


# --- the report -------------------------------------------------------------------------------------------


@dataclass
class RunContext:
    device: Device
    quick: bool
    progress: Callable[[str], None] = print


@dataclass
class Report:
    """``records``: one flat dict per case; ``columns``: (header, render) of the markdown table; ``skips``:
    ``{"impl", "reason"}`` of peers that could not run; ``notes``: how it was measured; ``targets``: Target rows."""

    suite: str
    mode: str
    title: str
    config: Record
    records: List[Record]
    columns: Sequence[Tuple[str, Callable[[Record], str]]] = field(repr=False)
    skips: List[Dict[str, str]] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)
    targets: List[Record] = field(default_factory=list)


def markdown_table(records: Sequence[Record], columns) -> str:
    """Every cell with pipes escaped and line breaks folded (an error message must not split a row)."""
    def cell(text: Any) -> str:
        return " ".join(str(text).replace("|", "\\|").split())

    rows = [[cell(header) for header, _ in columns], ["---"] * len(columns)]
    rows += [[cell(render(record)) for _, render in columns] for record in records]
    return "\n".join("| " + " | ".join(row) + " |" for row in rows)


def report_markdown(report: Report, env: Record, quick: bool) -> str:
    commit = (env.get("commit") or "unknown")[:12] + (
        " with uncommitted changes to the measured code" if env.get("commit_dirty") else "")
    load = ""
    if env.get("load_average_1min") is not None:
        after = env.get("load_average_1min_after")
        load = (f" 1-minute load average {env['load_average_1min']:.1f} when the run started"
                + (f" and {after:.1f} when it ended" if after is not None else "")
                + f", on {env['cpu_count']} cores: the run itself adds up to its {env['torch_threads']} threads, "
                "anything beyond that is other work that slowed the CPU timings.")
    lines = [
        f"# {report.title}", "",
        f"Device: {env['device_name']}. Commit `{commit}`, torch {env['torch']}, triton {env['triton']}, "
        f"Python {env['python']}, {env['torch_threads']} torch threads, {env['timestamp_utc']}.",
        f"Command: `{env['command']}`" + (" (quick sizes)" if quick else "")
        + (f", suite wall time {env['suite_wall_time_s']:.0f} s" if "suite_wall_time_s" in env else "") + "." + load,
        "Generated by the benchmark run; numbers are measured, never edited by hand. "
        "The JSON beside this file holds every field.", "",
        markdown_table(report.records, report.columns), "",
    ]
    if report.targets:
        lines += ["Targets (measured in this run; reported, never asserted):", "",
                  markdown_table(report.targets, TARGET_COLUMNS), ""]
    if report.skips:
        lines += ["Skipped:", ""] + [f"- `{skip['impl']}`: {skip['reason']}" for skip in report.skips] + [""]
    if report.notes:
        lines += ["How it was measured:", ""] + [f"- {note}" for note in report.notes] + [""]
    return "\n".join(lines)


def write_report(report: Report, env: Record, out_dir: Path, quick: bool) -> Tuple[Path, Path]:
    """``<suite>.json`` and ``<suite>.md`` (``<suite>-quick.*`` for quick runs: never over the full results)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"{report.suite}-quick" if quick else report.suite
    data = {"schema_version": REPORT_SCHEMA_VERSION, "suite": report.suite, "mode": report.mode, "quick": quick,
            "environment": env, "config": report.config, "notes": report.notes, "skips": report.skips,
            "targets": report.targets, "records": report.records}
    (out_dir / f"{stem}.json").write_text(json.dumps(data, indent=1, default=str) + "\n")
    (out_dir / f"{stem}.md").write_text(report_markdown(report, env, quick))
    return out_dir / f"{stem}.json", out_dir / f"{stem}.md"


# --- formatting and the columns every table shares ----------------------------------------------------------


def fmt(value: Optional[float], spec: str = ".1f", scale: float = 1) -> str:
    """``value / scale`` in ``spec``; "ms" picks .1f from 10 on, .3f below; "—" for None."""
    if value is None:
        return "—"
    return format(value / scale, (".1f" if value >= 10 else ".3f") if spec == "ms" else spec)


def fmt_mib(value: Optional[float]) -> str:
    return fmt(value, ".1f", MIB)


def col(header: str, key: str, spec: Optional[str] = None, scale: float = 1) -> Tuple[str, Callable[[Record], str]]:
    """A column showing ``record[key]`` formatted by :func:`fmt` (as text where ``spec`` is None)."""
    return header, lambda r: str(r.get(key, "—")) if spec is None else fmt(r.get(key), spec, scale)


MS, ERR, MIB_COL, GIB_COL, PCT = "ms", ".1e", (".1f", MIB), (".2f", GIB), (".0f", 0.01)
IMPL = ("impl", lambda r: f"`{r['impl']}`")
STATUS = ("status", lambda r: r["status"] if r["error"] is None else f"{r['status']}: {r['error']}")
BTDV = ("B×T, D, V", lambda r: f"{r['B']}×{r['T']}, {r['D']}, {r['V']}")


def spread(header: str = "min–max ms") -> Tuple[str, Callable[[Record], str]]:
    """The spread of a time: min–max of CPU repeats, 20th–80th percentile on CUDA."""
    return header, lambda r: ("—" if r.get("time_ms") is None
                              else f"{fmt(r['time_low_ms'], 'ms')}–{fmt(r['time_high_ms'], 'ms')}")


CPU_TIME_MEMORY_COLUMNS = (col("fwd+bwd ms (median)", "time_ms", MS), spread(),
                           col("peak memory beyond inputs (MiB)", "peak_memory_bytes", *MIB_COL),
                           col("= [N, V] tensors", "peak_memory_in_logits_tensors", ".2f"))

# --- targets ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """A target an issue states as a ratio of two measured figures: ``subject``'s ``key`` over ``baseline``'s
    at most ``limit``. Reported as met, missed or not measured, never asserted."""

    text: str
    key: str
    subject: str
    baseline: str
    limit: float

    def evaluate(self, records: Sequence[Record]) -> Record:
        by_impl = {r["impl"]: r for r in records if r.get("status") == "ok"}
        names = (self.subject, self.baseline)
        a, b = (by_impl.get(name, {}).get(self.key) for name in names)
        missing = [name for name, value in zip(names, (a, b)) if not value]
        ratio = None if missing else a / b
        return {"target": self.text, "key": self.key, "subject": self.subject, "baseline": self.baseline,
                "limit": self.limit, "ratio": ratio, "status": "not measured" if missing else
                "met" if ratio <= self.limit else "missed",
                "reason": f"no {self.key} for {' and '.join(missing)} in this run" if missing else None}


def verdict(value: Optional[float], target: float, at_least: bool = True) -> str:
    """'1.52 (met, target ≥ 1.3)' for a target stated on one record's figure."""
    if value is None:
        return "not measured"
    met = value >= target if at_least else value <= target
    return f"{value:.2f} ({'met' if met else 'missed'}, target {'≥' if at_least else '≤'} {target})"


TARGET_COLUMNS = (
    ("target", lambda r: r["target"]),
    ("measured ratio", lambda r: "—" if r["ratio"] is None else f"{r['ratio']:.2f}×"),
    ("limit", lambda r: f"≤ {r['limit']:g}×"),
    ("status", lambda r: r["status"] + (f" ({r['reason']})" if r.get("reason") else "")),
)

# --- timing -----------------------------------------------------------------------------------------------


def timing(samples_ms: Sequence[float], method: str) -> Record:
    return {"time_ms": statistics.median(samples_ms), "time_low_ms": min(samples_ms),
            "time_high_ms": max(samples_ms), "time_samples": len(samples_ms), "time_method": method}


def timed_calls_ms(fn: Callable[[], Any], warmup: int, calls: int) -> List[float]:
    samples = []
    for _ in range(warmup + calls):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e3)
    return samples[warmup:]


def cpu_times_interleaved(fns: Dict[str, Callable[[], Any]], warmup: int, repeats: int) -> Dict[str, Record]:
    """Each function's median of ``repeats`` calls after ``warmup``, the calls interleaved round by round
    (A B A B ...) so that load from other processes that comes and goes slows each of them alike."""
    for fn in fns.values():
        timed_calls_ms(fn, warmup, 0)
    samples: Dict[str, List[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            samples[name] += timed_calls_ms(fn, 0, 1)
    method = f"time.perf_counter, median of {repeats} calls after {warmup} warm-up" + (
        ", calls of " + " / ".join(fns) + " interleaved" if len(fns) > 1 else "")
    return {name: timing(s, method) for name, s in samples.items()}


def cpu_time_note(warmup: int, calls: int, where: str = "in one fresh process with the default allocator",
                  threads: Optional[int] = None) -> str:
    """The "Time:" note of a CPU default whose calls are interleaved round by round."""
    return (f"Time: median of {calls} calls after {warmup} warm-up call, {where}, the implementations' calls "
            f"interleaved (A B A B ...) so that other load slows them alike; {threads or torch.get_num_threads()} "
            "torch threads (other work on the machine: the JSON's `load_average_1min*`).")


# triton.testing.do_bench budgets in milliseconds (it picks the call counts) and the quantiles it reports.
DO_BENCH_WARMUP_MS, DO_BENCH_REP_MS = 25, 100
CUDA_TIME_NOTE = (f"Time: `triton.testing.do_bench` median (L2 flushed before every call; warm-up "
                  f"{DO_BENCH_WARMUP_MS} ms, repetitions {DO_BENCH_REP_MS} ms); the JSON's low/high are the "
                  "20th/80th percentiles.")
CUDA_CASE_NOTE = ("Each case in this one process: one untimed warm-up call (Triton compilation, torch.compile, "
                  "autotuning), one call for peak memory and the outputs, then the timing.")


def cuda_time(fn: Callable[[], Any]) -> Record:
    """Median CUDA time of ``fn`` by ``triton.testing.do_bench`` (L2 flushed before every call)."""
    from triton.testing import do_bench

    low, median, high = do_bench(fn, warmup=DO_BENCH_WARMUP_MS, rep=DO_BENCH_REP_MS, quantiles=[0.2, 0.5, 0.8])
    return {"time_ms": median, "time_low_ms": low, "time_high_ms": high, "time_samples": 0,
            "time_method": f"triton.testing.do_bench(warmup={DO_BENCH_WARMUP_MS} ms, rep={DO_BENCH_REP_MS} ms), "
                           "median; low/high are the 20th/80th percentiles"}


MATMUL_REFERENCE_SIZE = 8192  # square bf16 matmul whose rate is the GPU's reference peak in a run


def reference_matmul_tflops(ctx: RunContext, dtype: torch.dtype = torch.bfloat16) -> float:
    a, b = (torch.randn(MATMUL_REFERENCE_SIZE, MATMUL_REFERENCE_SIZE, device="cuda", dtype=dtype) for _ in "ab")
    tflops = 2 * MATMUL_REFERENCE_SIZE**3 / (cuda_time(lambda: torch.matmul(a, b))["time_ms"] * 1e-3) / 1e12
    ctx.progress(f"bf16 torch.matmul {MATMUL_REFERENCE_SIZE}³: {tflops:.0f} TFLOP/s (reference peak)")
    return tflops


def add_rates(record: Record, matmul_tflops: Optional[float]) -> None:
    """TFLOP/s of a timed record (nominal ``flops`` over its median time) and its fraction of the matmul's."""
    record["tflops"] = record["flops"] / (record["time_ms"] * 1e-3) / 1e12
    record["matmul_fraction"] = record["tflops"] / matmul_tflops if matmul_tflops else None


# The bare GEMMs an lm_head op cannot avoid, products of h [N, D], W [V, D] and a logit gradient dz [N, V]
# (2·N·D·V FLOPs each): logits h·Wᵀ, d hidden dz·W, d weight dzᵀ·h.
LOGPROBS_FLOOR_GEMMS = ("h·Wᵀ", "h·Wᵀ", "dz·W", "dzᵀ·h")  # forward, backward recompute, the two gradients
FUSED_LOSS_FLOOR_GEMMS = ("h·Wᵀ", "dz·W", "dzᵀ·h")  # the fused loss forms dz in its forward: no recompute
GEMM_FLOOR_NOTE = (
    "GEMM floor: the bare cuBLAS GEMMs an op of this shape cannot avoid (`torch.mm` into preallocated outputs, "
    "random inputs, same dtype), timed the same way in the same run (each alone in the JSON's `gemm_times_ms`); "
    "time / GEMM floor is a row's time over the floor's at its shape.")


def gemm_floor(N: int, D: int, V: int, dtype: torch.dtype, device: str, gemms: Sequence[str],
               time_fn: Callable[[Callable[[], Any]], Record]) -> Record:
    """``gemms`` back to back, and each alone, on random h, W and one [N, V] buffer that is both the logits
    written and the dz read (random: GPUs run GEMMs on zeros faster)."""
    gen = torch.Generator(device=device).manual_seed(0)
    h = torch.randn(N, D, generator=gen, device=device, dtype=dtype)
    w = torch.randn(V, D, generator=gen, device=device, dtype=dtype) * D**-0.5
    z = torch.randn(N, V, generator=gen, device=device, dtype=dtype)
    dh, dw = torch.empty_like(h), torch.empty_like(w)
    ops = {"h·Wᵀ": lambda: torch.mm(h, w.t(), out=z), "dz·W": lambda: torch.mm(z, w, out=dh),
           "dzᵀ·h": lambda: torch.mm(z.t(), h, out=dw)}
    record = time_fn(lambda: [ops[name]() for name in gemms])
    record["gemm_times_ms"] = {name: time_fn(ops[name])["time_ms"] for name in dict.fromkeys(gemms)}
    record.update(gemms=list(gemms), gemm_flops=2 * N * D * V * len(gemms))
    return record


def add_floor_ratios(records: Sequence[Record], floor: Record) -> None:
    for record in records:
        if floor.get("time_ms") and record.get("time_ms"):
            record["time_vs_gemm_floor"] = record["time_ms"] / floor["time_ms"]


# --- peak memory ------------------------------------------------------------------------------------------

# glibc keeps freed blocks below its (adaptive) mmap threshold cached in its heap, so peak RSS would depend on
# history. Pinned, every block of at least this size is mapped on allocation and unmapped on free: RSS follows
# the live tensors, as torch.cuda.max_memory_allocated does. Only memory-measuring processes run with it.
MALLOC_MMAP_THRESHOLD_BYTES = 128 * KIB
LIVE_MEMORY_ENV = {"MALLOC_MMAP_THRESHOLD_": str(MALLOC_MMAP_THRESHOLD_BYTES)}
MMAP_NOTE = (f"glibc's mmap threshold pinned at {MALLOC_MMAP_THRESHOLD_BYTES // KIB} KiB (`MALLOC_MMAP_THRESHOLD_`): "
             "RSS follows the live tensors, as `torch.cuda.max_memory_allocated` does, not malloc's cache")


def cpu_memory_note(warm: str = "a tiny-shape call has started the thread pools", call: str = "forward + backward"):
    """How :func:`memory_worker` measures, for the notes."""
    return (f"CPU peak memory: each case in a fresh process of its own with {MMAP_NOTE}. After the inputs are "
            f"built and {warm}, the peak-RSS counter is reset (`/proc/self/clear_refs` ← 5); the figure is the peak "
            f"RSS (`VmHWM`, not the inherited `ru_maxrss`) during one full-size {call} minus the RSS before it, the "
            "input gradients it returns included. Timing runs in other processes with the default allocator.")


CPU_MEMORY_METHOD = cpu_memory_note()
CUDA_MEMORY_METHOD = (
    "CUDA peak memory: `torch.cuda.max_memory_allocated()` during one call (after warm-up and "
    "`reset_peak_memory_stats`) minus `memory_allocated()` just before it, inputs and upstream gradients "
    "already allocated; it includes the input gradients the call returns.")


def _proc_status_bytes(key: str) -> Optional[int]:
    try:
        with open("/proc/self/status", encoding="utf-8") as status:
            return next(int(line.split()[1]) * KIB for line in status if line.startswith(key + ":"))
    except (OSError, StopIteration):
        return None


def peak_rss_bytes() -> int:
    """``VmHWM`` (which clear_refs resets); not ``ru_maxrss``, which a child inherits from its parent."""
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else KIB)
    return _proc_status_bytes("VmHWM") or maxrss


def cpu_peak_memory(fn: Callable[[], Any]) -> Tuple[int, bool, Any]:
    """(peak RSS during ``fn`` minus RSS before it, whether the peak counter could be reset (Linux ≥ 4.0), fn's
    result)."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as clear_refs:
            clear_refs.write("5")
        was_reset = True
    except OSError:
        was_reset = False
    before = _proc_status_bytes("VmRSS") or peak_rss_bytes()
    result = fn()
    return max(0, peak_rss_bytes() - before), was_reset, result


def cuda_peak_memory(fn: Callable[[], Any]) -> Tuple[int, Any]:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    result = fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before, result


@dataclass(frozen=True)
class Probes:
    """How a case is timed and its peak memory taken: CUDA, or a CPU in-process stand-in (no memory figure)."""
    time: Callable[[Callable[[], Any]], Record]
    peak_memory: Callable[[Callable[[], Any]], Tuple[Optional[int], Any]]


CUDA_PROBES = Probes(cuda_time, cuda_peak_memory)


def cpu_probes(warmup: int, repeats: int) -> Probes:
    return Probes(lambda fn: cpu_times_interleaved({"fn": fn}, warmup, repeats)["fn"], lambda fn: (None, fn()))


def add_memory_in_logits_tensors(records: Sequence[Record], logits_bytes: int) -> None:
    for record in records:
        if record.get("peak_memory_bytes") is not None:
            record["peak_memory_in_logits_tensors"] = record["peak_memory_bytes"] / logits_bytes


def free(device: str) -> None:
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


# --- failures, peers, comparing outputs --------------------------------------------------------------------


def describe_error(exc: BaseException, limit: int = 300) -> str:
    text = f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0]}"
    return text if len(text) <= limit else text[: limit - 1] + "…"


def failure(record: Record, exc: BaseException) -> Record:
    """Mark ``record`` failed by ``exc``: "oom" or "error", with the error's first line."""
    oom = getattr(torch, "OutOfMemoryError", None) or getattr(torch.cuda, "OutOfMemoryError", ())
    record["status"] = "oom" if isinstance(exc, oom) or "out of memory" in str(exc).lower() else "error"
    record["error"] = describe_error(exc)
    return record


def import_error(module: str, pip_name: str) -> Callable[[], Optional[str]]:
    """A peer's ``unavailable``: why ``module`` does not import here, or None."""
    def unavailable() -> Optional[str]:
        try:
            importlib.import_module(module)
        except Exception as exc:  # ImportError, or a peer whose own import breaks on this stack
            return f"`import {module}` failed ({describe_error(exc, 160)}); pip install {pip_name}"
        return None

    return unavailable


def split_available(impls: Sequence[Any], progress: Callable[[str], None]) -> Tuple[List[Any], List[Dict[str, str]]]:
    """(the cases that can run here, ``{"impl", "reason"}`` for those whose peer does not import)."""
    reasons = {impl.name: impl.unavailable() for impl in impls if impl.unavailable}
    skips = [{"impl": name, "reason": reason} for name, reason in reasons.items() if reason]
    for skip in skips:
        progress(f"skip {skip['impl']}: {skip['reason']}")
    return [impl for impl in impls if not reasons.get(impl.name)], skips


def max_abs_diff(a: Any, b: Any, block: int = 1 << 24) -> Optional[float]:
    """max |a − b| in float64 (blockwise: no full float64 copy of a [V, D] gradient); None where either is
    missing, 0 for empty tensors; |a − b| for numbers."""
    if a is None or b is None:
        return None
    if not isinstance(a, torch.Tensor):
        return abs(float(a) - float(b))
    a, b = a.reshape(-1), b.reshape(-1).to(a.device)
    return max(((a[i:i + block].double() - b[i:i + block].double()).abs().max().item()
                for i in range(0, a.numel(), block)), default=0.0)


def diffs(outputs: Record, expected: Record, prefix: str, rel: str = "") -> Record:
    """``{prefix_<name>: max|Δ|}`` for every output ``expected`` has; ``rel`` "also" or "only" adds (or keeps
    only) ``<name>_rel``, over max |expected|, for tensors."""
    out: Record = {}
    for name, value in expected.items():
        diff = max_abs_diff(outputs.get(name), value)
        if rel != "only" or not isinstance(value, torch.Tensor) or value.dim() == 0:
            out[f"{prefix}_{name}"] = diff
        if rel and isinstance(value, torch.Tensor) and value.dim() > 0:
            scale = max_abs_diff(value, torch.zeros((), dtype=value.dtype))
            out[f"{prefix}_{name}_rel"] = diff / scale if diff is not None and scale else None
    return out


# --- measuring cases ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """One contender: ``role`` "subject" (rlloss), "baseline", "peer" (another library), "rlloss" or "floor";
    ``make`` builds it (the suite decides its signature); ``unavailable`` says why a peer cannot run here."""

    name: str
    role: str
    label: str
    make: Optional[Callable[..., Any]] = None
    unavailable: Optional[Callable[[], Optional[str]]] = None
    note: str = ""


def record(case: Case, **fields: Any) -> Record:
    """``case``'s record before it is measured: its name, role and label, then ``fields``, status "ok"."""
    return {"impl": case.name, "role": case.role, "label": case.label, **fields, "status": "ok", "error": None}


def lm_head_inputs(lead: Tuple[int, ...], D: int, V: int, dtype: torch.dtype, device: str, logit_std: float,
                   hidden_grad: bool = True, seed: int = 0):
    """Hidden states [*lead, D], an lm_head weight [V, D] scaled for logits of std ``logit_std`` (peaked, as a
    trained model's), targets [*lead], the same in every process; and the ``randn`` and generator that drew them."""
    gen = torch.Generator(device=device).manual_seed(seed)
    randn = lambda *size: torch.randn(*size, generator=gen, device=device)  # noqa: E731
    x = {"hidden": randn(*lead, D).to(dtype).requires_grad_(hidden_grad),
         "weight": (randn(V, D) * (logit_std / D**0.5)).to(dtype).requires_grad_(),
         "targets": torch.randint(0, V, lead, generator=gen, device=device)}
    return x, randn, gen


def loss_step(loss_fn: Callable[[Record], torch.Tensor], x: Record) -> Callable[[], Record]:
    """Forward + backward of a scalar loss of ``x``, its gradients reset first: the loss and the gradients."""
    def step() -> Record:
        x["hidden"].grad = x["weight"].grad = None
        loss = loss_fn(x)
        loss.backward()
        return {"loss": loss.detach(), "grad_hidden": x["hidden"].grad, "grad_weight": x["weight"].grad}

    return step


def floor_row(record: Record, N: int, D: int, V: int, dtype: torch.dtype, device: str, gemms: Sequence[str],
              progress: Callable[[Record], None], matmul_tflops: Optional[float] = None) -> Record:
    """``record`` with :func:`gemm_floor`, measured first and alone (freed before the inputs are built)."""
    try:
        record.update(gemm_floor(N, D, V, dtype, device, gemms, CUDA_PROBES.time))
        if "flops" in record:
            add_rates(record, matmul_tflops)
    except Exception as exc:
        failure(record, exc)
    free(device)
    progress(record)
    return record


def measure_cases(cases: Sequence[Case], base: Callable[[Case], Record], inputs: Callable[[], Any],
                  prepare: Callable[[Case, Any], Callable[[], Any]], probes: Probes, device: str,
                  progress: Callable[[Record], None], compare: Callable[[Record, Any, Any], None],
                  after: Callable[[Record, Any], Record] = lambda record, outputs: {}) -> List[Record]:
    """Every case on the same inputs: ``prepare(case, inputs)`` gives its call; one untimed warm-up call, one for
    peak memory and the outputs, then the timing. ``compare(record, outputs, anchor)`` holds a case against the
    first subject's outputs; ``after(record, outputs)`` adds a timed case's own fields. A failure is recorded."""
    records: List[Record] = []
    try:
        shared = inputs()
    except Exception as exc:  # the inputs themselves do not fit: every case fails alike
        for case in cases:
            records.append(failure(base(case), exc))
            progress(records[-1])
        free(device)
        return records
    anchor = None
    for case in cases:
        record = base(case)
        try:
            step = prepare(case, shared)
            step()
            getattr(step, "clear", lambda: None)()  # a step may drop its last outputs before the measurement
            peak, outputs = probes.peak_memory(step)
            outputs = outputs() if callable(outputs) else outputs  # a step may hand back a lazy collect()
            record.update(peak_memory_bytes=peak, **probes.time(step))
            record.update(after(record, outputs))
        except Exception as exc:
            failure(record, exc)
        else:
            if anchor is None and case.role == "subject":
                anchor = outputs
            elif anchor is not None:
                compare(record, outputs, anchor)
            del outputs
        step = None
        free(device)
        records.append(record)
        progress(record)
    del shared, anchor
    free(device)
    return records


def progress_line(suite: str, keys: Sequence[str], index: int, total: int, record: Record) -> str:
    """'[3/8] logprobs naive N=2048 V=32000: 12.3 ms, peak 0.41 GiB, 2.10× the GEMM floor'."""
    head = f"[{index}/{total}] {suite} {record['impl']:<14} " + " ".join(f"{k}={record.get(k)}" for k in keys)
    if record["status"] != "ok":
        return f"{head}: {record['status']}: {record['error']}"
    parts = [f"{fmt(record.get('time_ms'), 'ms')} ms"]
    if record.get("peak_memory_bytes") is not None:
        parts.append(f"peak {fmt_mib(record['peak_memory_bytes'])} MiB")
    for key, text in (("loss", "loss {:.6f}"), ("tflops", "{:.1f} TFLOP/s"), ("time_vs_gemm_floor", "{:.2f}× floor")):
        if record.get(key) is not None:
            parts.append(text.format(record[key]))
    return f"{head}: " + ", ".join(parts)


def counter(suite: str, keys: Sequence[str], total: int, progress: Callable[[str], None]) -> Callable[[Record], None]:
    count = iter(range(1, 1 << 30))
    return lambda record: progress(progress_line(suite, keys, next(count), total, record))


# --- running a case in a fresh process --------------------------------------------------------------------


def run_isolated(function: str, payload: Record, env_overrides: Optional[Dict[str, str]] = None) -> Any:
    """``function`` ("package.module:name", taking and returning JSON-able data) in a fresh Python process with
    ``env_overrides`` in its environment. Raises RuntimeError when it fails or times out."""
    with tempfile.TemporaryDirectory(prefix="rlloss-bench-") as tmp:
        payload_path, result_path = Path(tmp) / "payload.json", Path(tmp) / "result.json"
        payload_path.write_text(json.dumps(payload))
        # The child imports this package under the parent's name ("benchmarks" in the repository root,
        # "rlloss.bench" when installed), from the folder the parent imported it from.
        root = Path(sys.modules[__package__.partition(".")[0]].__file__).resolve().parent.parent
        env = {**os.environ, **(env_overrides or {})}
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), env.get("PYTHONPATH")]))
        command = [sys.executable, "-m", f"{__package__}._core", function, str(payload_path), str(result_path)]
        try:
            done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=ISOLATED_CASE_TIMEOUT_S)
        except subprocess.TimeoutExpired as exc:
            raise RuntimeError(f"{function} ran past {ISOLATED_CASE_TIMEOUT_S} s") from exc
        if done.returncode != 0 or not result_path.exists():
            tail = "\n".join(done.stderr.strip().splitlines()[-20:])
            raise RuntimeError(f"{function} failed in its own process (exit {done.returncode}):\n{tail}")
        return json.loads(result_path.read_text())


def memory_worker(payload: Record) -> Record:
    """In a fresh process (glibc's mmap threshold pinned): the suite's ``cpu_step(payload)``, warmed up by a
    full-size call where ``payload["warm"]``, then the peak memory of one call; its outputs saved for the parent."""
    step = getattr(importlib.import_module(payload["module"]), "cpu_step")(payload)
    if payload.get("warm"):
        step()
        gc.collect()
    peak, was_reset, outputs = cpu_peak_memory(step)
    torch.save(outputs, payload["outputs_path"])
    loss = {"loss": float(outputs["loss"])} if payload.get("warm") and "loss" in outputs else {}
    return {"peak_memory_bytes": peak, "peak_counter_reset": was_reset, **loss}


def times_worker(payload: Record) -> Record:
    """In a fresh process: the interleaved times of the suite's ``cpu_step`` of every ``payload["impls"]``,
    then (where the suite has one) its ``cpu_check(payload, results)``, which compares saved outputs here so the
    parent stays small."""
    module = importlib.import_module(payload["module"])
    steps = {name: module.cpu_step({**payload, "impl": name}) for name in payload["impls"]}
    results = cpu_times_interleaved(steps, payload["warmup"], payload["calls"])
    del steps
    if hasattr(module, "cpu_check"):
        module.cpu_check(payload, results)
    return results


def measure_memory(module: str, records: Dict[str, Record], payload: Record,
                   progress: Callable[[str], None]) -> Dict[str, str]:
    """Each case's peak memory in a fresh process of its own (:func:`memory_worker`), merged into ``records``.
    Returns the paths of the saved outputs by case (in ``payload["tmp"]``)."""
    saved = {}
    for name in records:
        path = str(Path(payload["tmp"]) / f"{name}.pt")
        try:
            records[name].update(run_isolated(f"{__name__}:memory_worker", {
                **payload, "module": module, "impl": name, "outputs_path": path}, LIVE_MEMORY_ENV))
            saved[name] = path
        except RuntimeError as exc:
            failure(records[name], exc)
        progress(f"{module.rpartition('.')[2]} {name}: peak memory in a fresh process: "
                 f"+{fmt_mib(records[name].get('peak_memory_bytes'))} MiB, {records[name]['status']}")
    return saved


def measure_cpu_isolated(module: str, records: Dict[str, Record], payload: Record, progress: Callable[[str], None],
                         warmup: int, calls: int, keys: Sequence[str]) -> List[Record]:
    """The CPU default of a suite whose cases differ in memory: :func:`measure_memory`, then every time in one
    more fresh process (:func:`times_worker`), merged into ``records``; each record's progress line by ``keys``."""
    suite = module.rpartition(".")[2]
    with tempfile.TemporaryDirectory(prefix=f"rlloss-bench-{suite}-") as tmp:
        saved = measure_memory(module, records, {**payload, "tmp": tmp}, progress)
        timed = [name for name in records if records[name]["status"] == "ok"]
        progress(f"{suite} {', '.join(timed)}: {calls} interleaved timed calls each in one fresh process")
        try:
            results = run_isolated(f"{__name__}:times_worker", {**payload, "module": module, "impls": timed,
                                                                "outputs_paths": saved, "warmup": warmup,
                                                                "calls": calls})
        except RuntimeError as exc:
            results = {name: failure(records[name], exc) for name in timed}
    done = counter(suite, keys, len(records), progress)
    for name, record in records.items():
        record.update(results.get(name, {}))
        done(record)
    return list(records.values())


def _worker_main(argv: List[str]) -> int:
    target, payload_path, result_path = argv
    module, _, function = target.partition(":")
    result = getattr(importlib.import_module(module), function)(json.loads(Path(payload_path).read_text()))
    Path(result_path).write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(_worker_main(sys.argv[1:]))
