"""Suite ``advantages``: ``rlloss.group_advantages`` (group-relative advantages of docs/math.md §2) in every mode,
against a naive torch implementation (``view(-1, G)`` then mean / std / median, as TRL computes GRPO's; for
groups of varying size the same on a padded [groups, max size] view).

GPU: 1M float32 rewards (2²⁰), groups of 16 and groups of varying size (8 to 24), every mode, the ``triton``
backend; time by ``triton.testing.do_bench`` and the achieved bandwidth (rewards read + advantages written,
plus the group offsets for varying sizes, over the time) as a fraction of this GPU's copy bandwidth, measured
in the same run by timing a large tensor copy the same way (issue: ≥ 50 %).

CPU default (no GPU): 64k rewards (2¹⁶), the ``torch`` backend against the naive implementation, every mode,
both groupings, with the max difference of each from the other and from the float64 reference.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

import rlloss
from rlloss import reference
from rlloss.advantages import ADVANTAGE_MODES

from . import _harness as harness
from ._registry import Suite

# --- sizes and settings -----------------------------------------------------------------------------------

GROUP_SIZE = 16
VARIABLE_SIZES = (8, 24)  # group sizes drawn uniformly from this closed range
EPS = 1e-6
SEED = 0
GPU_REWARDS = 1 << 20
GPU_QUICK_REWARDS = 1 << 20
CPU_REWARDS = 1 << 16
CPU_QUICK_REWARDS = 1 << 12
CPU_WARMUP_CALLS = 1
CPU_TIMED_CALLS = 5
CPU_THREADS = 1
# The copy that measures this GPU's memory bandwidth: 2²⁸ float32 (1 GiB read, 1 GiB written).
COPY_ELEMENTS = 1 << 28


@dataclass(frozen=True)
class Grouping:
    """How the rewards are split: groups of ``group_size``, or of random sizes in ``VARIABLE_SIZES``."""

    name: str
    group_size: Optional[int]


EQUAL = Grouping(f"G={GROUP_SIZE}", GROUP_SIZE)
VARIABLE = Grouping(f"G∈[{VARIABLE_SIZES[0]}, {VARIABLE_SIZES[1]}]", None)
GROUPINGS = (EQUAL, VARIABLE)


@dataclass
class Batch:
    rewards: Tensor  # [B] float32
    sizes: Tensor  # [groups] int64, on the rewards' device
    grouping: Grouping


def make_batch(num_rewards: int, grouping: Grouping, device: str, seed: int = SEED) -> Batch:
    """N(0, 1) float32 rewards; group sizes drawn in ``VARIABLE_SIZES``, the remainder spread over the first
    groups so that every size stays in that range and they sum to ``num_rewards``."""
    gen = torch.Generator().manual_seed(seed)
    rewards = torch.randn(num_rewards, generator=gen).to(device)
    if grouping.group_size is not None:
        sizes = torch.full((num_rewards // grouping.group_size,), grouping.group_size, dtype=torch.int64)
    else:
        low, high = VARIABLE_SIZES
        drawn = torch.randint(low, high + 1, (num_rewards // low + 1,), generator=gen)
        ends = torch.cumsum(drawn, 0)
        count = int((ends < num_rewards).sum())
        sizes = drawn[:count].clone()
        rest = num_rewards - int(sizes.sum())  # < high; spread it so that every group stays in range
        if rest >= low:
            sizes = torch.cat([sizes, torch.tensor([rest])])
        else:
            room = (high - sizes).clamp(min=0)
            take = torch.minimum(room, (rest - torch.cumsum(room, 0) + room).clamp(min=0))
            sizes = sizes + take
    return Batch(rewards, sizes.to(device), grouping)


# --- implementations --------------------------------------------------------------------------------------


def rlloss_advantages(backend: str) -> Callable[[Batch, str], Tensor]:
    def run(batch: Batch, mode: str) -> Tensor:
        if batch.grouping.group_size is not None:
            return rlloss.group_advantages(batch.rewards, group_size=batch.grouping.group_size, mode=mode, eps=EPS,
                                           backend=backend)
        return rlloss.group_advantages(batch.rewards, group_sizes=batch.sizes, mode=mode, eps=EPS, backend=backend)

    return run


def _rank_gaussian(x: Tensor, valid: Tensor, n: Tensor) -> Tensor:
    """Φ⁻¹((rank − ½)/G), ties sharing their mean rank, by pairwise comparison within each row."""
    pair = valid[:, None, :] & valid[:, :, None]
    less = ((x[:, None, :] < x[:, :, None]) & pair).sum(-1)
    equal = ((x[:, None, :] == x[:, :, None]) & pair).sum(-1)
    rank = less + (equal + 1) / 2
    return torch.special.ndtri(((rank - 0.5) / n).double()).float()


def _rows(x: Tensor, valid: Tensor, n: Tensor, mode: str, batch_std: Optional[Tensor]) -> Tensor:
    """Naive advantages of the rows of x [groups, width] whose first n entries (``valid``) are rewards."""
    nan = torch.full_like(x, float("nan"))
    if mode == "rank_gaussian":
        return _rank_gaussian(x, valid, n)
    if mode in ("median", "median_mad"):
        centered = x - torch.where(valid, x, nan).nanmedian(dim=1, keepdim=True).values
        if mode == "median":
            return centered
        mad = torch.where(valid, centered.abs(), nan).nanmedian(dim=1, keepdim=True).values
        return centered / (mad + EPS)
    mean = torch.where(valid, x, 0).sum(1, keepdim=True) / n
    centered = x - mean
    if mode == "no_std":
        return centered
    if mode == "rloo":
        return centered * n / (n - 1)
    if mode == "batch_std":
        return centered / (batch_std + EPS)
    std = (torch.where(valid, centered, 0).square().sum(1, keepdim=True) / (n - 1)).sqrt()  # grpo
    return centered / (std + EPS)


def naive_advantages(batch: Batch, mode: str) -> Tensor:
    """The naive torch path: ``rewards.view(-1, G)`` (or a padded gather for varying sizes), mean / std /
    median along the rows, broadcast back (TRL's ``mean_grouped_rewards`` / ``std_grouped_rewards``)."""
    r = batch.rewards.float()
    batch_std = r.std() if mode == "batch_std" else None
    if batch.grouping.group_size is not None:
        x = r.view(-1, batch.grouping.group_size)
        valid = torch.ones_like(x, dtype=torch.bool)
        n = torch.tensor(float(x.shape[1]), device=x.device)
        return _rows(x, valid, n, mode, batch_std).reshape(-1)
    sizes = batch.sizes
    width = VARIABLE_SIZES[1]
    starts = torch.cumsum(sizes, 0) - sizes
    columns = torch.arange(width, device=r.device)
    valid = columns[None, :] < sizes[:, None]
    index = torch.where(valid, starts[:, None] + columns[None, :], torch.zeros_like(valid, dtype=torch.int64))
    out = _rows(r[index], valid, sizes[:, None].float(), mode, batch_std)
    return out[valid]


@dataclass(frozen=True)
class Implementation:
    name: str
    role: str
    label: str
    run: Callable[[Batch, str], Tensor]


NAIVE = Implementation("naive", "baseline", "torch view(-1, G) mean/std/median (padded gather for varying sizes)",
                       naive_advantages)


def rlloss_implementation(backend: str) -> Implementation:
    return Implementation(f"rlloss-{backend}", "subject", f"rlloss.group_advantages, backend={backend!r}",
                          rlloss_advantages(backend))


CPU_IMPLEMENTATIONS = (rlloss_implementation("torch"), NAIVE)
GPU_IMPLEMENTATIONS = (rlloss_implementation("triton"), NAIVE)


# --- measuring ------------------------------------------------------------------------------------------


def bytes_moved(batch: Batch) -> int:
    """Rewards read and advantages written (float32), plus the group offsets read for varying sizes."""
    moved = 2 * batch.rewards.numel() * 4
    if batch.grouping.group_size is None:
        moved += (batch.sizes.numel() + 1) * 8
    return moved


def cuda_copy_bandwidth(elements: int = COPY_ELEMENTS) -> float:
    """This GPU's copy bandwidth in bytes/s: 2·bytes (read + write) of a large float32 copy, by do_bench."""
    src = torch.empty(elements, device="cuda", dtype=torch.float32).normal_()
    dst = torch.empty_like(src)
    timing = harness.cuda_time(lambda: dst.copy_(src))
    return 2 * elements * 4 / (timing.median_ms * 1e-3)


def base_record(impl: Implementation, batch: Batch, mode: str, device: str) -> Dict[str, Any]:
    return {
        "impl": impl.name, "role": impl.role, "label": impl.label, "mode": mode, "grouping": batch.grouping.name,
        "rewards": batch.rewards.numel(), "groups": batch.sizes.numel(), "dtype": "float32", "device": device,
        "bytes_moved": bytes_moved(batch), "status": "ok", "error": None,
    }


Timer = Callable[[Dict[str, Callable[[], Any]]], Dict[str, harness.Timing]]


def compare(num_rewards: int, device: str, impls: Sequence[Implementation], timer: Timer,
            progress: Callable[[str], None], copy_bandwidth: Optional[float] = None,
            with_reference: bool = True) -> List[Dict[str, Any]]:
    """Every implementation, mode and grouping; each result checked against the first implementation's and
    (``with_reference``) against the float64 reference."""
    records: List[Dict[str, Any]] = []
    total, index = len(GROUPINGS) * len(ADVANTAGE_MODES) * len(impls), 0
    for grouping in GROUPINGS:
        batch = make_batch(num_rewards, grouping, device)
        sizes_list = batch.sizes.tolist()
        for mode in ADVANTAGE_MODES:
            expected = (reference.group_advantages(batch.rewards.cpu(), sizes_list, mode=mode, eps=EPS)
                        if with_reference else None)
            outputs: Dict[str, Tensor] = {}
            rows: Dict[str, Dict[str, Any]] = {}
            for impl in impls:
                rows[impl.name] = record = base_record(impl, batch, mode, device)
                try:
                    outputs[impl.name] = impl.run(batch, mode)
                except Exception as exc:
                    harness.failure(record, exc)
            ready = {name: (lambda impl=impl: impl.run(batch, mode)) for impl in impls
                     if (name := impl.name) in outputs}
            try:
                timings = timer(ready)
            except Exception as exc:
                for name in ready:
                    harness.failure(rows[name], exc)
                timings = {}
            first = next(iter(outputs), None)
            for impl in impls:
                record = rows[impl.name]
                if impl.name in timings:
                    record.update(timings[impl.name].as_record())
                    record["bandwidth_bytes_per_s"] = record["bytes_moved"] / (record["time_ms"] * 1e-3)
                    if copy_bandwidth:
                        record["bandwidth_fraction"] = record["bandwidth_bytes_per_s"] / copy_bandwidth
                if impl.name in outputs:
                    if expected is not None:
                        record["diff_reference"] = harness.max_abs_diff(outputs[impl.name].cpu(), expected)
                    if impl.name != first:
                        record["diff_subject"] = harness.max_abs_diff(outputs[impl.name], outputs[first])
                index += 1
                records.append(record)
                progress(_progress_line(index, total, record))
            subject = rows[impls[0].name].get("time_ms")
            for impl in impls[1:]:
                if subject and rows[impl.name].get("time_ms"):
                    rows[impl.name]["time_vs_subject"] = rows[impl.name]["time_ms"] / subject
            del outputs
        del batch
        harness.free_device_memory(device)
    return records


def _progress_line(index: int, total: int, record: Dict[str, Any]) -> str:
    head = f"[{index}/{total}] advantages {record['impl']:<14} {record['grouping']:<11} {record['mode']:<13}"
    if record["status"] != "ok":
        return f"{head}: {record['status']}: {record['error']}"
    text = f"{head}: {harness.fmt_ms(record.get('time_ms'))} ms"
    if record.get("bandwidth_fraction") is not None:
        text += f", {100 * record['bandwidth_fraction']:.0f}% of copy bandwidth"
    if record.get("diff_reference") is not None:
        text += f", max|Δ| vs float64 {record['diff_reference']:.1e}"
    return text


def _columns(gpu: bool) -> List[harness.Column]:
    C = harness.Column
    columns = [
        harness.IMPL_COLUMN,
        C("groups", lambda r: r["grouping"]),
        C("mode", lambda r: r["mode"]),
        harness.STATUS_COLUMN,
        C("ms (median)", lambda r: harness.fmt_ms(r.get("time_ms"))),
        C("time / rlloss", lambda r: harness.fmt_num(r.get("time_vs_subject"), 2)),
        C("GB/s", lambda r: harness.fmt_num(None if r.get("bandwidth_bytes_per_s") is None
                                            else r["bandwidth_bytes_per_s"] / 1e9, 2)),
    ]
    if gpu:
        columns.append(C("% of copy bandwidth", lambda r: "—" if r.get("bandwidth_fraction") is None
                         else f"{100 * r['bandwidth_fraction']:.0f}"))
    columns += [
        C("max abs diff vs rlloss", lambda r: harness.fmt_err(r.get("diff_subject"))),
        C("vs float64 reference", lambda r: harness.fmt_err(r.get("diff_reference"))),
    ]
    return columns


def _notes(num_rewards: int) -> List[str]:
    return [
        f"{num_rewards} float32 rewards ~ N(0, 1); `G={GROUP_SIZE}`: groups of {GROUP_SIZE} "
        f"(`group_size={GROUP_SIZE}`); `G∈[{VARIABLE_SIZES[0]}, {VARIABLE_SIZES[1]}]`: group sizes drawn "
        "uniformly in that range (summing to the count exactly), passed as a [groups] int64 tensor on the rewards' "
        "device (`group_sizes=`); the time includes the API's argument checks (the finiteness check and, for "
        "varying sizes, the host copy of the sizes).",
        "`naive`: the rewards viewed as [groups, G] (for varying sizes gathered into a padded "
        f"[groups, {VARIABLE_SIZES[1]}] view with a validity mask), then mean / unbiased std / lower median "
        "along the rows (torch.median, nanmedian), rank_gaussian by pairwise comparison, written here.",
        "Bytes moved: the rewards read and the advantages written (4 bytes each), plus the group offsets "
        "(8 bytes each) for varying sizes; GB/s is that over the median time.",
        "max abs diff: against `rlloss` (the first row of each mode) and against `rlloss.reference` (a loop over "
        "the groups in float64).",
    ]


def run_gpu(ctx: harness.RunContext) -> harness.SuiteReport:
    num_rewards = GPU_QUICK_REWARDS if ctx.quick else GPU_REWARDS
    copy_bandwidth = cuda_copy_bandwidth()
    ctx.progress(f"float32 copy of {COPY_ELEMENTS} elements: {copy_bandwidth / 1e9:.0f} GB/s (reference bandwidth)")

    def timer(fns: Dict[str, Callable[[], Any]]) -> Dict[str, harness.Timing]:
        return {name: harness.cuda_time(fn) for name, fn in fns.items()}

    records = compare(num_rewards, "cuda", GPU_IMPLEMENTATIONS, timer, ctx.progress, copy_bandwidth)
    return harness.SuiteReport(
        suite="advantages", mode="gpu",
        title=f"advantages — {ctx.device.name}: group_advantages over {num_rewards} float32 rewards, every mode",
        config={"rewards": num_rewards, "group_size": GROUP_SIZE, "variable_sizes": list(VARIABLE_SIZES),
                "eps": EPS, "seed": SEED, "copy_elements": COPY_ELEMENTS, "copy_bandwidth_bytes_per_s": copy_bandwidth,
                "modes": list(ADVANTAGE_MODES),
                "plot": {"facet": "grouping", "series": ["impl"], "category": "mode"}},
        records=records, columns=_columns(gpu=True),
        notes=_notes(num_rewards) + [
            harness.CUDA_TIME_NOTE,
            f"% of copy bandwidth: GB/s over this GPU's copy bandwidth measured in the same run "
            f"({copy_bandwidth / 1e9:.0f} GB/s: read + write of a {COPY_ELEMENTS * 4 >> 30} GiB float32 "
            "`copy_`, timed by do_bench). At 1M rewards a call moves 8 MB, a few microseconds at full "
            "bandwidth, so launch and host overheads weigh in the fraction.",
        ],
    )


def run_cpu_default(ctx: harness.RunContext) -> harness.SuiteReport:
    num_rewards = CPU_QUICK_REWARDS if ctx.quick else CPU_REWARDS

    def timer(fns: Dict[str, Callable[[], Any]]) -> Dict[str, harness.Timing]:
        return harness.cpu_times_interleaved(fns, CPU_WARMUP_CALLS, CPU_TIMED_CALLS)

    threads = torch.get_num_threads()
    torch.set_num_threads(CPU_THREADS)  # a few hundred KiB per call: a thread pool only adds wake-up jitter
    try:
        records = compare(num_rewards, "cpu", CPU_IMPLEMENTATIONS, timer, ctx.progress)
    finally:
        torch.set_num_threads(threads)
    return harness.SuiteReport(
        suite="advantages", mode="cpu-default",
        title=f"advantages — CPU default: group_advantages over {num_rewards} float32 rewards, torch backend vs naive",
        config={"rewards": num_rewards, "group_size": GROUP_SIZE, "variable_sizes": list(VARIABLE_SIZES),
                "eps": EPS, "seed": SEED, "torch_threads": CPU_THREADS, "warmup_calls": CPU_WARMUP_CALLS, "timed_calls": CPU_TIMED_CALLS,
                "modes": list(ADVANTAGE_MODES),
                "plot": {"facet": "grouping", "series": ["impl"], "category": "mode"}},
        records=records, columns=_columns(gpu=False),
        notes=_notes(num_rewards) + [
            f"Time: median of {CPU_TIMED_CALLS} calls after {CPU_WARMUP_CALLS} warm-up call in the benchmark's "
            f"process, the two implementations' calls interleaved; {CPU_THREADS} torch thread (the work per call is far "
            "too small to share). No "
            "memory figure (the tensors are a few hundred KiB). The GPU run measures the Triton kernel.",
        ],
    )


# --- pytest-benchmark cases (benchmarks/test_advantages_bench.py) -------------------------------------------


def bench_cases(device: str, quick: bool) -> List[Tuple[Implementation, Grouping, str, int]]:
    """(implementation, grouping, mode, rewards) for ``pytest benchmarks/ --benchmark-only``: the grpo and
    rank_gaussian modes (the cheapest and the dearest) at the suite's sizes."""
    impls = GPU_IMPLEMENTATIONS if device == "cuda" else CPU_IMPLEMENTATIONS
    num_rewards = (GPU_QUICK_REWARDS if quick else GPU_REWARDS) if device == "cuda" else (
        CPU_QUICK_REWARDS if quick else CPU_REWARDS)
    return [(impl, grouping, mode, num_rewards) for grouping in GROUPINGS for mode in ("grpo", "rank_gaussian")
            for impl in impls]

# --- the suite ------------------------------------------------------------------------------------------------


SUITE = Suite(
    name="advantages",
    description="group_advantages, every mode, equal and varying group sizes: rlloss vs naive torch "
                "(GPU: fraction of copy bandwidth)",
    run_cpu=run_cpu_default, run_gpu=run_gpu,
)
