"""Suite ``advantages``: ``rlloss.group_advantages`` (docs/math.md §2), every mode, groups of 16 and of 8–24, against
naive torch; GPU: 1M rewards and the fraction of the copy bandwidth (issue: ≥ 50 %); CPU: 64k rewards.
"""
from __future__ import annotations

import functools
from typing import Any, Dict, List, Optional

import torch
from torch import Tensor

import rlloss
from rlloss import reference
from rlloss.advantages import ADVANTAGE_MODES

from . import _core as core

DESCRIPTION = ("group_advantages, every mode, equal and varying group sizes: rlloss vs naive torch "
               "(GPU: fraction of copy bandwidth)")
GROUP_SIZE, VARIABLE_SIZES, EPS, SEED = 16, (8, 24), 1e-6, 0
REWARDS = {"gpu": 1 << 20, "gpu-quick": 1 << 20, "cpu": 1 << 16, "cpu-quick": 1 << 12}
CPU_WARMUP_CALLS, CPU_TIMED_CALLS, CPU_THREADS = 1, 5, 1
GPU_BACKEND, COPY_ELEMENTS = "triton", 1 << 28  # the copy measuring the bandwidth: 1 GiB read, 1 GiB written
GROUPINGS = (f"G={GROUP_SIZE}", f"G∈[{VARIABLE_SIZES[0]}, {VARIABLE_SIZES[1]}]")


def group_sizes(num_rewards: int, grouping: str, gen: torch.Generator) -> Tensor:
    """Groups of 16, or sizes drawn in ``VARIABLE_SIZES`` with the remainder spread over the first groups so
    that every size stays in range and they sum to ``num_rewards``."""
    if grouping == GROUPINGS[0]:
        return torch.full((num_rewards // GROUP_SIZE,), GROUP_SIZE, dtype=torch.int64)
    low, high = VARIABLE_SIZES
    drawn = torch.randint(low, high + 1, (num_rewards // low + 1,), generator=gen)
    sizes = drawn[: int((torch.cumsum(drawn, 0) < num_rewards).sum())].clone()
    rest = num_rewards - int(sizes.sum())
    if rest >= low:
        return torch.cat([sizes, torch.tensor([rest])])
    room = (high - sizes).clamp(min=0)
    return sizes + torch.minimum(room, (rest - torch.cumsum(room, 0) + room).clamp(min=0))


def rlloss_advantages(rewards: Tensor, sizes: Tensor, equal: bool, mode: str, backend: str) -> Tensor:
    groups = {"group_size": GROUP_SIZE} if equal else {"group_sizes": sizes}
    return rlloss.group_advantages(rewards, **groups, mode=mode, eps=EPS, backend=backend)


def _rows(x: Tensor, valid: Tensor, n: Tensor, mode: str, batch_std: Optional[Tensor]) -> Tensor:
    """Naive advantages of the rows of x [groups, width] whose first n entries (``valid``) are rewards."""
    nan = torch.full_like(x, float("nan"))
    if mode == "rank_gaussian":  # Φ⁻¹((rank − ½)/G), ties sharing their mean rank, by pairwise comparison
        pair = valid[:, None, :] & valid[:, :, None]
        rank = ((x[:, None, :] < x[:, :, None]) & pair).sum(-1) + (((x[:, None, :] == x[:, :, None]) & pair).sum(-1)
                                                                    + 1) / 2
        return torch.special.ndtri(((rank - 0.5) / n).double()).float()
    if mode in ("median", "median_mad"):
        centered = x - torch.where(valid, x, nan).nanmedian(dim=1, keepdim=True).values
        if mode == "median":
            return centered
        return centered / (torch.where(valid, centered.abs(), nan).nanmedian(dim=1, keepdim=True).values + EPS)
    centered = x - torch.where(valid, x, 0).sum(1, keepdim=True) / n
    if mode == "no_std":
        return centered
    if mode == "rloo":
        return centered * n / (n - 1)
    if mode == "batch_std":
        return centered / (batch_std + EPS)
    return centered / ((torch.where(valid, centered, 0).square().sum(1, keepdim=True) / (n - 1)).sqrt() + EPS)


def naive_advantages(rewards: Tensor, sizes: Tensor, equal: bool, mode: str) -> Tensor:
    """``rewards.view(-1, G)`` (a padded gather for varying sizes), mean / std / median along the rows,
    broadcast back (TRL's ``mean_grouped_rewards`` / ``std_grouped_rewards``)."""
    r = rewards.float()
    batch_std = r.std() if mode == "batch_std" else None
    if equal:
        x = r.view(-1, GROUP_SIZE)
        n = torch.tensor(float(GROUP_SIZE), device=x.device)
        return _rows(x, torch.ones_like(x, dtype=torch.bool), n, mode, batch_std).reshape(-1)
    columns = torch.arange(VARIABLE_SIZES[1], device=r.device)
    valid = columns[None, :] < sizes[:, None]
    index = torch.where(valid, (torch.cumsum(sizes, 0) - sizes)[:, None] + columns[None, :], 0)
    return _rows(r[index], valid, sizes[:, None].float(), mode, batch_std)[valid]


def compare(num_rewards: int, device: str, backend: str, timer, progress,
            copy_bandwidth: Optional[float] = None) -> List[Dict[str, Any]]:
    """Every implementation, mode and grouping, each checked against the float64 reference and rlloss's."""
    impls = [core.Case(f"rlloss-{backend}", "subject", f"rlloss.group_advantages, backend={backend!r}",
                       functools.partial(rlloss_advantages, backend=backend)),
             core.Case("naive", "baseline", "torch view(-1, G) mean/std/median (padded gather for varying sizes)",
                       naive_advantages)]
    records: List[Dict[str, Any]] = []
    done = core.counter("advantages", ("grouping", "mode"), len(GROUPINGS) * len(ADVANTAGE_MODES) * 2, progress)
    for grouping in GROUPINGS:
        gen = torch.Generator().manual_seed(SEED)
        rewards = torch.randn(num_rewards, generator=gen).to(device)
        sizes = group_sizes(num_rewards, grouping, gen).to(device)
        equal = grouping == GROUPINGS[0]
        moved = 2 * num_rewards * 4 + (0 if equal else (sizes.numel() + 1) * 8)  # rewards in, advantages out, offsets
        for mode in ADVANTAGE_MODES:
            expected = reference.group_advantages(rewards.cpu(), sizes.tolist(), mode=mode, eps=EPS)
            calls = {impl.name: (lambda impl=impl: impl.make(rewards, sizes, equal, mode)) for impl in impls}
            rows = {impl.name: core.record(impl, mode=mode, grouping=grouping, rewards=num_rewards,
                                           groups=sizes.numel(), dtype="float32", device=device, bytes_moved=moved)
                    for impl in impls}
            outputs, timings, subject = {}, {}, impls[0].name
            for name, call in calls.items():
                try:
                    outputs[name] = call()
                except Exception as exc:
                    core.failure(rows[name], exc)
            try:
                timings = timer({name: calls[name] for name in outputs})
            except Exception as exc:
                for name in outputs:
                    core.failure(rows[name], exc)
            for name, record in rows.items():
                if name in timings:
                    record.update(timings[name], bandwidth_bytes_per_s=moved / (timings[name]["time_ms"] * 1e-3))
                    if copy_bandwidth:
                        record["bandwidth_fraction"] = record["bandwidth_bytes_per_s"] / copy_bandwidth
                    if name != subject and subject in timings:
                        record["time_vs_subject"] = record["time_ms"] / timings[subject]["time_ms"]
                if name in outputs:
                    record["diff_reference"] = core.max_abs_diff(outputs[name].cpu(), expected)
                    if name != subject and subject in outputs:
                        record["diff_subject"] = core.max_abs_diff(outputs[name], outputs[subject])
                records.append(record)
                done(record)
        core.free(device)
    return records


def columns(gpu: bool):
    return [
        core.IMPL, core.col("groups", "grouping"), core.col("mode", "mode"), core.STATUS,
        core.col("ms (median)", "time_ms", core.MS), core.col("time / rlloss", "time_vs_subject", ".2f"),
        ("GB/s", lambda r: core.fmt(r.get("bandwidth_bytes_per_s"), ".2f", 1e9)),
    ] + ([core.col("% of copy bandwidth", "bandwidth_fraction", *core.PCT)] if gpu else []) + [
        core.col("max abs diff vs rlloss", "diff_subject", core.ERR),
        core.col("vs float64 reference", "diff_reference", core.ERR),
    ]


def report(mode: str, title: str, records, config, notes) -> core.Report:
    n = records[0]["rewards"]
    return core.Report("advantages", mode, f"advantages — {title}: group_advantages over {n} float32 rewards" + (
        ", torch backend vs naive" if mode == "cpu-default" else ", every mode"), {
        "rewards": n, "group_size": GROUP_SIZE, "variable_sizes": list(VARIABLE_SIZES), "eps": EPS, "seed": SEED,
        **config, "modes": list(ADVANTAGE_MODES),
        "plot": {"facet": "grouping", "series": ["impl"], "category": "mode"}},
        records, columns(mode == "gpu"), notes=[
        f"{n} float32 rewards ~ N(0, 1); `G={GROUP_SIZE}`: `group_size={GROUP_SIZE}`; `G∈[{VARIABLE_SIZES[0]}, "
        f"{VARIABLE_SIZES[1]}]`: sizes drawn uniformly in that range (summing to the count), passed as a [groups] "
        "int64 tensor on the rewards' device (`group_sizes=`); the time includes the API's argument checks "
        "(finiteness, and the host copy of varying sizes).",
        f"`naive`: the rewards viewed as [groups, G] (a padded [groups, {VARIABLE_SIZES[1]}] gather with a validity "
        "mask for varying sizes), then mean / unbiased std / lower median along the rows, rank_gaussian by "
        "pairwise comparison, written here.",
        "GB/s: the rewards read and advantages written (4 bytes each) plus the group offsets (8 bytes each, varying "
        "sizes) over the median time. max abs diff: against `rlloss` (each mode's first row) and against "
        "`rlloss.reference` (a loop over the groups in float64).",
    ] + notes)


def run_gpu(ctx: core.RunContext) -> core.Report:
    device, time = ctx.device.type, core.CUDA_PROBES.time
    src = torch.empty(COPY_ELEMENTS, device=device, dtype=torch.float32).normal_()
    dst = torch.empty_like(src)
    copy_bandwidth = 2 * COPY_ELEMENTS * 4 / (time(lambda: dst.copy_(src))["time_ms"] * 1e-3)
    del src, dst
    ctx.progress(f"float32 copy of {COPY_ELEMENTS} elements: {copy_bandwidth / 1e9:.0f} GB/s (reference bandwidth)")
    records = compare(REWARDS["gpu-quick" if ctx.quick else "gpu"], device, GPU_BACKEND,
                      lambda fns: {name: time(fn) for name, fn in fns.items()}, ctx.progress, copy_bandwidth)
    return report("gpu", ctx.device.name, records,
                  {"copy_elements": COPY_ELEMENTS, "copy_bandwidth_bytes_per_s": copy_bandwidth}, [
        core.CUDA_TIME_NOTE,
        f"% of copy bandwidth: GB/s over the copy bandwidth measured in the same run ({copy_bandwidth / 1e9:.0f} "
        f"GB/s: a {COPY_ELEMENTS * 4 >> 30} GiB float32 `copy_`, by do_bench). A call on 1M rewards moves 8 MB, a "
        "few microseconds at full bandwidth, so launch and host overheads weigh in."])


def run_cpu(ctx: core.RunContext) -> core.Report:
    threads = torch.get_num_threads()
    torch.set_num_threads(CPU_THREADS)  # a few hundred KiB per call: a thread pool only adds wake-up jitter
    try:
        records = compare(REWARDS["cpu-quick" if ctx.quick else "cpu"], "cpu", "torch",
                          lambda fns: core.cpu_times_interleaved(fns, CPU_WARMUP_CALLS, CPU_TIMED_CALLS), ctx.progress)
    finally:
        torch.set_num_threads(threads)
    return report("cpu-default", "CPU default", records, {
        "torch_threads": CPU_THREADS, "warmup_calls": CPU_WARMUP_CALLS, "timed_calls": CPU_TIMED_CALLS}, [
        core.cpu_time_note(CPU_WARMUP_CALLS, CPU_TIMED_CALLS, "in the benchmark's process", CPU_THREADS)
        + " One thread: the work per call is too small to share. No memory figure (a few hundred KiB). The GPU run "
        "measures the Triton kernel."])
