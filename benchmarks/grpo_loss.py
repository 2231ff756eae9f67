"""Suite ``grpo_loss``: issue #9's case, TRL's GRPO loss with ``loss_type="bnpo"`` from hidden states, forward +
backward: rlloss (also ``rlloss-ext``, docs/math.md §9, and ``rlloss-select``) against naive torch, Liger-Kernel and
Cut Cross-Entropy; on a CPU every measurement is a fresh process of one case, and the issue's :data:`TARGETS`.
"""
from __future__ import annotations

import inspect
import statistics
import tempfile
from typing import Any, Dict, List

import torch

import rlloss

from . import _core as core

DESCRIPTION = "issue #9 GRPO loss (bnpo) fwd+bwd, 4×1024×256×32000 fp32: rlloss vs naive, Liger, CCE; targets"
PRESET, DTYPE, THREADS = "bnpo", torch.float32, 2  # every measuring process runs THREADS (the issue's setting)
SHAPE, QUICK_SHAPE = core.BatchShape(B=4, T=1024, D=256, V=32000), core.BatchShape(B=2, T=256, D=128, V=8192)
TIMING_ROUNDS, QUICK_TIMING_ROUNDS, CALLS_PER_ROUND, WARMUP_CALLS = 3, 1, 2, 1
LOGIT_STD, OLD_SPREAD, SEED, SELECT_FRACTION = 2.0, 0.05, 0, 0.2
INPUT_CHUNK_TOKENS = 512  # the inputs' own log-probs are computed in chunks: never a full [N, V] tensor
TARGETS = (
    core.Target("rlloss time ≤ 0.75× naive's", "time_ms", "rlloss", "naive", 0.75),
    core.Target("rlloss time ≤ 1.0× Cut Cross-Entropy's (impl='torch_compile')", "time_ms", "rlloss", "cce", 1.0),
    core.Target("rlloss peak memory ≤ 0.15× naive's", "peak_memory_bytes", "rlloss", "naive", 0.15),
    core.Target("rlloss-ext time ≤ 1.05× rlloss's", "time_ms", "rlloss-ext", "rlloss", 1.05),  # issue #14
)
# Issue #9's own measurement on its machine (2 threads), kept in the JSON for comparison only.
ISSUE_BASELINE = {"naive": {"time_s": 1.80, "peak_gib": 1.49}, "rlloss": {"time_s": 2.22, "peak_gib": 0.13},
                  "liger": {"time_s": 2.15, "peak_gib": 0.19}, "cce": {"time_s": 1.34, "peak_gib": 0.59}}
CONFIG = rlloss.LossConfig.preset(PRESET)


def make_inputs(shape: core.BatchShape, dtype: torch.dtype, device: str) -> Dict[str, torch.Tensor]:
    """Random inputs, the same in every process; old log-probs = the policy's own (plain torch) + noise."""
    x, randn, _ = core.lm_head_inputs((shape.B, shape.T), shape.D, shape.V, dtype, device, LOGIT_STD, seed=SEED)
    advantages = randn(shape.B)
    with torch.no_grad():
        h, t = x["hidden"].reshape(-1, shape.D), x["targets"].reshape(-1)
        own = torch.cat([torch.log_softmax((h[i:i + INPUT_CHUNK_TOKENS] @ x["weight"].T).float(), -1)
                         .gather(1, t[i:i + INPUT_CHUNK_TOKENS, None]).squeeze(1)
                         for i in range(0, shape.N, INPUT_CHUNK_TOKENS)]).view(shape.B, shape.T)
    return {**x, "advantages": advantages,
            "mask": torch.ones(shape.B, shape.T, dtype=torch.bool, device=device),
            "old_logprobs": own + OLD_SPREAD * randn(shape.B, shape.T)}


def bnpo_loss(logprobs, x) -> torch.Tensor:
    """TRL's GRPO loss with ``loss_type="bnpo"``, plainly (the naive and CCE paths)."""
    ratio = torch.exp(logprobs - x["old_logprobs"])
    clipped = torch.clamp(ratio, 1 - CONFIG.epsilon_low, 1 + CONFIG.epsilon_high)
    advantages, mask = x["advantages"].unsqueeze(-1), x["mask"].float()
    return (-torch.min(ratio * advantages, clipped * advantages) * mask).sum() / mask.sum().clamp(min=1.0)


def fused(config: rlloss.LossConfig, extension_points: bool = False):
    loss_fn = rlloss.FusedPolicyLoss(config)

    def forward(x):
        if not extension_points:
            return loss_fn(x["hidden"], x["weight"], x["targets"], x["mask"], x["advantages"],
                           old_logprobs=x["old_logprobs"]).loss
        B, T = x["mask"].shape
        eps = {k: torch.full((B,), getattr(config, k), device=x["mask"].device)
               for k in ("epsilon_low", "epsilon_high")}
        return loss_fn(x["hidden"], x["weight"], x["targets"], x["mask"], x["advantages"][:, None].expand(B, T),
                       old_logprobs=x["old_logprobs"], **eps).loss
    return forward


def naive():
    def forward(x):
        logits = x["hidden"] @ x["weight"].T  # [B, T, V]; log-softmax in at least float32
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        return bnpo_loss(torch.log_softmax(logits, dim=-1).gather(-1, x["targets"].unsqueeze(-1)).squeeze(-1), x)
    return forward


def liger(compiled: bool):
    def make():
        from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

        settings = dict(loss_type="bnpo", beta=0.0, use_ref_model=False, epsilon_low=CONFIG.epsilon_low,
                        epsilon_high=CONFIG.epsilon_high, importance_sampling_level="token", temperature=1.0,
                        compiled=compiled)
        missing = [k for k in settings if k not in inspect.signature(LigerFusedLinearGRPOLoss.__init__).parameters]
        if missing:
            raise TypeError(f"this liger-kernel's LigerFusedLinearGRPOLoss lacks {missing}")
        module = LigerFusedLinearGRPOLoss(**settings)

        def forward(x):
            out = module(x["hidden"], x["weight"], x["targets"], x["mask"].long(), x["advantages"],
                         old_per_token_logps=x["old_logprobs"])
            return out[0] if isinstance(out, tuple) else out  # (loss, metrics)
        return forward
    return make


def cce(impl: str):
    def make():
        from cut_cross_entropy import linear_cross_entropy

        return lambda x: bnpo_loss(-linear_cross_entropy(x["hidden"], x["weight"], x["targets"], reduction="none",
                                                         impl=impl).float(), x)
    return make


LIGER_NOTE = ("loss_type='bnpo', beta=0, use_ref_model=False, ε_low = ε_high = 0.2, chunk_size=1 (its default: "
              "one sequence per chunk); computes its gradients inside the forward")
LIGER_MISSING, CCE_MISSING = (core.import_error("liger_kernel.chunked_loss", "liger-kernel"),
                              core.import_error("cut_cross_entropy", "cut-cross-entropy"))
COMMON = (
    core.Case("rlloss", "subject", "rlloss.FusedPolicyLoss(LossConfig.preset('bnpo')), automatic backend",
              lambda: fused(CONFIG), note="the torch backend on CPU, triton on CUDA; never an [N, V] tensor"),
    core.Case("rlloss-ext", "subject", "rlloss.FusedPolicyLoss, advantages [B, T] and clip ranges as [B] tensors",
              lambda: fused(CONFIG, True), note="the one-pass extension points (docs/math.md §9) set to the plain "
              "loss's values: the same loss, the options' cost"),
    core.Case("rlloss-select", "subject", f"rlloss.FusedPolicyLoss, token_select='entropy', fraction "
              f"{SELECT_FRACTION} (TRL top_entropy_quantile)",
              lambda: fused(CONFIG.replace(token_select="entropy", token_select_fraction=SELECT_FRACTION)),
              note="a batch quantile of the entropy: the two-pass route (statistics, then a recompute); a different "
                   "loss (only the top-entropy tokens' policy term)"),
    core.Case("naive", "baseline", "torch: [B, T, V] logits, log_softmax, gather, the loss in torch ops", naive,
              note="autograd keeps the logits and the log-softmax: several [N, V] tensors"),
)
CCE = core.Case("cce", "peer", "cut_cross_entropy.linear_cross_entropy(reduction='none', impl='torch_compile') + "
                "the GRPO loss", cce("torch_compile"), CCE_MISSING, "CCE's torch.compile path (the one that runs on "
                "a CPU): −log p per token, then the same loss code as naive; compiled in the untimed warm-up call")
CPU_CASES = (*COMMON, core.Case("liger", "peer", "liger_kernel.chunked_loss.LigerFusedLinearGRPOLoss(compiled=False)",
                                liger(False), LIGER_MISSING, LIGER_NOTE), CCE)
GPU_CASES = (*COMMON, core.Case("liger", "peer", "liger_kernel.chunked_loss.LigerFusedLinearGRPOLoss(compiled=True)",
                                liger(True), LIGER_MISSING, LIGER_NOTE), CCE,
             core.Case("cce-kernel", "peer", "cut_cross_entropy.linear_cross_entropy(reduction='none', impl='cce') + "
                       "the GRPO loss", cce("cce"), CCE_MISSING, "CCE's Triton kernel (GPU only), gradient filtering "
                       "on (its default)"))
GEMM_FLOOR = core.Case("gemm-floor", "floor", "bare cuBLAS GEMMs h·Wᵀ, dz·W, dzᵀ·h (torch.mm)")


def base_record(case: core.Case, shape: core.BatchShape, device: str) -> Dict[str, Any]:
    return core.record(case, note=case.note, preset=PRESET, **vars(shape), N=shape.N, tokens=shape.N,
                       dtype=core.dtype_name(DTYPE), device=device)


def finish(records: List[Dict[str, Any]], shape: core.BatchShape) -> None:
    """Each record's peak in [N, V] tensors, its time and peak memory over naive's."""
    core.add_memory_in_logits_tensors(records, shape.N * shape.V * 4)
    naive = next((r for r in records if r["impl"] == "naive" and r["status"] == "ok"), {})
    for record in records:
        for key, ratio_key in (("time_ms", "time_vs_naive"), ("peak_memory_bytes", "memory_vs_naive")):
            if record.get(key) is not None and naive.get(key):
                record[ratio_key] = record[key] / naive[key]


# --- CPU default: every measurement in a fresh process ------------------------------------------------------


def cpu_step(payload: Dict[str, Any]):
    torch.set_num_threads(payload["threads"])
    make = next(c for c in CPU_CASES if c.name == payload["impl"]).make
    return core.loss_step(make(), make_inputs(core.BatchShape(**payload["shape"]), DTYPE, "cpu"))


def cpu_time(payload: Dict[str, Any]) -> List[float]:
    """In a fresh process: the wall times of ``calls`` calls after ``warmup`` untimed ones."""
    return core.timed_calls_ms(cpu_step(payload), payload["warmup"], payload["calls"])


def run_cpu(ctx: core.RunContext) -> core.Report:
    shape = QUICK_SHAPE if ctx.quick else SHAPE
    rounds, calls = (QUICK_TIMING_ROUNDS if ctx.quick else TIMING_ROUNDS), CALLS_PER_ROUND
    cases, skips = core.split_available(CPU_CASES, ctx.progress)
    records = {c.name: base_record(c, shape, "cpu") for c in cases}
    payload = {"shape": vars(shape), "threads": THREADS, "warm": True}
    with tempfile.TemporaryDirectory(prefix="rlloss-bench-grpo-") as tmp:
        saved = core.measure_memory(__name__, records, {**payload, "tmp": tmp}, ctx.progress)
        for round_index in range(1, rounds + 1):
            for name in [c.name for c in cases if records[c.name]["status"] == "ok"]:
                try:
                    done = core.run_isolated(f"{__name__}:cpu_time", {**payload, "impl": name,
                                                                      "warmup": WARMUP_CALLS, "calls": calls})
                except RuntimeError as exc:
                    core.failure(records[name], exc)
                    continue
                records[name].setdefault("time_samples_ms", []).extend(done)
                records[name].setdefault("round_medians_ms", []).append(statistics.median(done))
                ctx.progress(f"grpo_loss round {round_index}/{rounds} {name}: "
                             + ", ".join(f"{ms:.0f}" for ms in done) + " ms")
        method = (f"time.perf_counter in {rounds} fresh processes per implementation, the processes interleaved "
                  f"round by round; each: {WARMUP_CALLS} untimed call, then {calls} timed; median and min–max of "
                  "all timed calls")
        for record in records.values():
            if record["status"] == "ok" and record.get("time_samples_ms"):
                record.update(core.timing(record["time_samples_ms"], method))
        anchor = torch.load(saved["rlloss"]) if "rlloss" in saved else None
        for name, path in saved.items():
            if anchor is not None and name != "rlloss":
                records[name].update(core.diffs(torch.load(path), anchor, "diff_rlloss", rel="only"))
    rows = list(records.values())
    finish(rows, shape)
    done = core.counter("grpo_loss", ("B", "T", "V"), len(rows), ctx.progress)
    for record in rows:
        done(record)
    return report("cpu-default", "CPU default", shape, rows, skips, cases, False,
                  {"rounds": rounds, "calls": calls, "logits_bytes": shape.N * shape.V * 4}, [
        core.cpu_memory_note("one full-size untimed call has run (thread pools started, CCE's graph "
                             "compiled; the input gradients dropped)"),
        f"Time: {method}; every process runs {THREADS} torch threads and the default allocator. The JSON holds "
        "every sample and each process's median (`round_medians_ms`). Not a statement about the Triton kernels."])


def run_gpu(ctx: core.RunContext) -> core.Report:
    shape, device, probes = QUICK_SHAPE if ctx.quick else SHAPE, ctx.device.type, core.CUDA_PROBES
    cases, skips = core.split_available(GPU_CASES, ctx.progress)
    done = core.counter("grpo_loss", ("B", "T", "V"), len(cases) + 1, ctx.progress)
    floor = core.floor_row(base_record(GEMM_FLOOR, shape, device), shape.N, shape.D, shape.V, DTYPE, device,
                           core.FUSED_LOSS_FLOOR_GEMMS, done)
    records = [floor] + core.measure_cases(
        cases, lambda c: base_record(c, shape, device), lambda: make_inputs(shape, DTYPE, device),
        lambda c, x: core.loss_step(c.make(), x), probes, device, done,
        lambda record, out, anchor: record.update(core.diffs(out, anchor, "diff_rlloss", rel="only")),
        lambda record, out: {"loss": float(out["loss"])})
    core.add_floor_ratios(records, floor)
    finish(records, shape)
    return report("gpu-peers", ctx.device.name, shape, records, skips, cases, True, {
        "logits_bytes": shape.N * shape.V * 4, "floor_gemms": list(core.FUSED_LOSS_FLOOR_GEMMS)}, [
        core.CUDA_CASE_NOTE, core.CUDA_MEMORY_METHOD, core.CUDA_TIME_NOTE, core.GEMM_FLOOR_NOTE])


def report(mode, where, shape, records, skips, cases, gpu, config, notes) -> core.Report:
    eps, logits_bytes = CONFIG.epsilon_low, shape.N * shape.V * 4
    return core.Report(
        "grpo_loss", mode, f"grpo_loss — {where}: {shape}, float32, preset {PRESET!r}"
        + ("" if gpu else " (TRL loss_type='bnpo')") + ", forward + backward"
        + ("" if gpu else f", {THREADS} threads"), {
            "shape": vars(shape), "dtype": "float32", "preset": PRESET, "loss_config": repr(CONFIG),
            "threads": THREADS, "warmup_calls": WARMUP_CALLS, "seed": SEED, "logit_std": LOGIT_STD,
            "old_spread": OLD_SPREAD, "mask": "all tokens counted",
            "implementations": {c.name: {"label": c.label, "note": c.note} for c in cases},
            "issue_baseline": {"source": "issue #9, measured on its author's machine with 2 threads", **ISSUE_BASELINE},
            **config},
        records, [
            core.IMPL, core.STATUS, ("loss", lambda r: "—" if r.get("loss") is None else f"{r['loss']:.6f}"),
            core.col("|Δloss| vs rlloss", "diff_rlloss_loss", core.ERR),
            core.col("fwd+bwd ms (median)", "time_ms", core.MS),
            core.spread("20–80th pct ms" if gpu else "min–max ms"),
            core.col("time / naive", "time_vs_naive", ".2f"),
        ] + ([core.col("time / GEMM floor", "time_vs_gemm_floor", ".2f")] if gpu else []) + [
            core.col("peak memory (MiB)", "peak_memory_bytes", *core.MIB_COL),
            core.col("memory / naive", "memory_vs_naive", ".3f"),
            core.col("= [N, V] tensors", "peak_memory_in_logits_tensors", ".2f"),
            core.col("d hidden rel vs rlloss", "diff_rlloss_grad_hidden_rel", core.ERR),
            core.col("d weight rel vs rlloss", "diff_rlloss_grad_weight_rel", core.ERR)],
        skips, [
            f"TRL's GRPO with loss_type='bnpo' (preset `{PRESET}`): ρ = exp(ℓ − ℓ°), −min(ρA, clip(ρ, {1 - eps:g}, "
            f"{1 + eps:g})A) per token, summed over the batch's token count; β = 0, no entropy term. Inputs: hidden ~ "
            f"N(0, 1), weight scaled for logits of std {LOGIT_STD}, uniform targets, every token counted, advantages ~"
            f" N(0, 1), old log-probs = the policy's own + N(0, {OLD_SPREAD}²), seed {SEED}.",
            f"One float32 [N, V] tensor is {core.fmt_mib(logits_bytes)} MiB; the input gradients every path returns "
            f"{core.fmt_mib((shape.N + shape.V) * shape.D * 4)} MiB. vs rlloss: |Δ| of the loss, and max |Δ| of the "
            "gradients over the max abs of rlloss's.",
        ] + notes + [f"`{c.name}`: {c.note}" for c in cases if c.note],
        [t.evaluate(records) for t in TARGETS])
