"""Suite ``distributed``: the vocabulary-parallel path (docs/distributed.md), ``token_logprobs`` (log-probs and
entropy) and ``FusedPolicyLoss`` (``dapo``) forward + backward, float32, ``torch`` backend: one process holding the
whole lm_head against 2 gloo ranks holding half of its rows each. No GPU case yet: CUDA machines run the CPU case.
"""
from __future__ import annotations

import json
import os
import socket
import tempfile
import time
from pathlib import Path
from unittest import mock
from typing import Any, Dict, List

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import rlloss

from . import _core as core

SHAPE, QUICK_SHAPE = core.BatchShape(B=4, T=256, D=256, V=32000), core.BatchShape(B=2, T=64, D=64, V=4000)
WORLD, WARMUP_CALLS, TIMED_CALLS, SEED = 2, 1, 5, 0
CASES = ("token_logprobs", "FusedPolicyLoss dapo")
DESCRIPTION = (f"vocabulary-parallel token_logprobs and FusedPolicyLoss over {WORLD} gloo ranks vs 1 process "
               "(CPU; time and peak memory per rank)")


def _step(case: str, shape: core.BatchShape, rows: slice, group):
    """A forward + backward of ``case`` on the weight rows ``rows``: returns (call, the hidden leaf)."""
    x, randn, gen = core.lm_head_inputs((shape.B, shape.T), shape.D, shape.V, torch.float32, "cpu", 1.0, seed=SEED)
    h, w, targets = x["hidden"], x["weight"][rows].detach().clone().requires_grad_(), x["targets"]
    mask = torch.rand(shape.B, shape.T, generator=gen) > 0.1
    advantages, old = randn(shape.B), -torch.rand(shape.B, shape.T, generator=gen) * 3
    upstream = randn(2, shape.B, shape.T)
    loss_fn = rlloss.FusedPolicyLoss(rlloss.LossConfig.preset("dapo"), backend="torch", process_group=group)

    def call() -> float:
        h.grad = w.grad = None
        if case == "token_logprobs":
            out = rlloss.token_logprobs(h, w, targets, return_entropy=True, backend="torch", process_group=group)
            value = out.logprobs.sum()
            ((out.logprobs * upstream[0]).sum() + (out.entropy * upstream[1]).sum()).backward()
        else:
            value = loss_fn(h, w, targets, mask, advantages, old_logprobs=old).loss
            value.backward()
        return float(value.detach())

    return call, h


def _process(rank: int, world: int, port: int, shape: core.BatchShape, out_dir: str) -> None:
    """One process of a case: world 1 is the single process (no group), world 2 one gloo rank."""
    torch.set_num_threads(1)
    group = None
    if world > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=world)
        group = dist.group.WORLD
    per_rank = shape.V // world
    rows = slice(rank * per_rank, shape.V if rank == world - 1 else (rank + 1) * per_rank)
    results: Dict[str, Any] = {}
    for case in CASES:
        call, h = _step(case, shape, rows, group)
        for _ in range(WARMUP_CALLS):
            call()
        peak, was_reset, value = core.cpu_peak_memory(call)
        samples = []
        for _ in range(TIMED_CALLS):
            if group is not None:
                dist.barrier()
            start = time.perf_counter()
            call()
            samples.append((time.perf_counter() - start) * 1e3)
        results[case] = {"value": value, "grad_hidden": h.grad.flatten()[:4096].tolist(), "samples_ms": samples,
                         "peak_memory_bytes": peak, "peak_reset": was_reset, "vocab_rows": rows.stop - rows.start}
    if group is not None:
        dist.destroy_process_group()
    Path(out_dir, f"world{world}-rank{rank}.json").write_text(json.dumps(results))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(world: int, shape: core.BatchShape, out_dir: str) -> List[Dict[str, Any]]:
    with mock.patch.dict(os.environ, core.LIVE_MEMORY_ENV):  # inherited by the spawned processes
        mp.spawn(_process, args=(world, _free_port(), shape, out_dir), nprocs=world)
    return [json.loads(Path(out_dir, f"world{world}-rank{rank}.json").read_text()) for rank in range(world)]


def run_cpu(ctx: core.RunContext) -> core.Report:
    shape = QUICK_SHAPE if ctx.quick else SHAPE
    records: List[Dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as out_dir:
        runs = {}
        for world in (1, WORLD):
            ctx.progress(f"distributed: {world} process(es), {shape}")
            try:
                runs[world] = _run(world, shape, out_dir)
            except Exception as exc:  # recorded as the failed case of the report
                for case in CASES:
                    records.append(core.failure({"impl": f"{world} process(es)", "case": case, "shape": str(shape),
                                                    "status": "error", "error": None}, exc))
    for world, ranks in runs.items():
        for rank, results in enumerate(ranks):
            for case in CASES:
                r = results[case]
                timing = core.timing(r["samples_ms"], f"time.perf_counter, median of {TIMED_CALLS} calls after "
                                     f"{WARMUP_CALLS} warm-up")
                record = {"impl": "1 process" if world == 1 else f"{world} gloo ranks: rank {rank}", "case": case,
                          "shape": str(shape), "vocab_rows": r["vocab_rows"], "status": "ok", "error": None,
                          "value": r["value"], "peak_memory_bytes": r["peak_memory_bytes"], **timing}
                if world > 1 and 1 in runs:
                    single = runs[1][0][case]
                    record["diff_value"] = abs(r["value"] - single["value"])
                    record["diff_grad_hidden"] = max(abs(a - b)
                                                     for a, b in zip(r["grad_hidden"], single["grad_hidden"]))
                records.append(record)
    columns = (
        core.IMPL, core.col("case", "case"), core.col("vocab rows", "vocab_rows"), core.STATUS,
        core.col("fwd+bwd ms (median)", "time_ms", core.MS), core.spread(),
        core.col("peak memory beyond inputs (MiB)", "peak_memory_bytes", *core.MIB_COL),
        core.col("|Δ value| vs 1 process", "diff_value", core.ERR),
        core.col("max |Δ dh| vs 1 process", "diff_grad_hidden", core.ERR),
    )
    return core.Report(
        suite="distributed", mode="cpu-default",
        title=f"distributed — CPU: vocabulary-parallel over {WORLD} gloo ranks vs 1 process, {shape}, float32",
        config={"shape": str(shape), "world": WORLD, "threads_per_process": 1, "warmup_calls": WARMUP_CALLS,
                "timed_calls": TIMED_CALLS, "cases": list(CASES), "backend": "torch",
                "plot": {"series": ["impl"], "category": "case"}},
        records=records, columns=columns,
        notes=[
            "Each configuration runs in fresh processes (torch.multiprocessing spawn), one torch thread each: the "
            f"{WORLD} ranks use {WORLD}× the cores of the single process. Time: median of {TIMED_CALLS} calls after "
            f"{WARMUP_CALLS} warm-up, the ranks released together by a barrier before each call, so a rank's time "
            "includes its waits on the all-gather of the statistics and the all-reduce of the hidden gradient.",
            "Peak memory: the peak RSS during one forward + backward after the warm-up, minus the RSS before it, "
            f"with {core.MMAP_NOTE}; it includes the gradients the call returns. Δ dh: the first 4096 entries of "
            "the hidden states' gradient.",
            "No GPU case yet (NCCL on ≥ 2 GPUs, bfloat16, the Triton kernels): on CUDA machines this suite runs the "
            "same CPU case.",
        ],
    )


run_gpu = run_cpu  # no GPU case yet (NCCL on ≥ 2 GPUs, bfloat16, the Triton kernels)
