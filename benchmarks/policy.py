"""Suite ``policy`` (issue #3): ``rlloss.FusedPolicyLoss`` forward + backward from hidden states against
``token_logprobs`` + ``policy_loss``, TRL's GRPO math on materialised logits, Liger-Kernel (GPU), ``token_logprobs``
alone and the three bare GEMMs (GPU); ``dapo`` and ``gspo``, plain and with KL + entropy bonus.
"""
from __future__ import annotations

import functools
import inspect
from typing import Any, Dict, List

import torch

import rlloss

from . import _core as core

DESCRIPTION = ("FusedPolicyLoss fwd+bwd (dapo/gspo, ±KL+entropy): CPU vs TRL-style and unfused; GPU also vs Liger "
               "and the 3-GEMM cuBLAS floor")
Shape = core.BatchShape
PLAIN, KL_ENTROPY = dict(name="plain", beta=0.0, entropy_coef=0.0), dict(name="kl+entropy", beta=0.04,
                                                                        entropy_coef=0.01)
PRESETS, VARIANTS = ("dapo", "gspo"), (PLAIN, KL_ENTROPY)
CPU_SHAPE, CPU_QUICK_SHAPE = Shape(B=4, T=128, D=256, V=32000), Shape(B=2, T=128, D=128, V=8192)
CPU_PRESET, CPU_VARIANT, CPU_WARMUP_CALLS, CPU_TIMED_CALLS = "dapo", KL_ENTROPY, 1, 3
TINY_SHAPE = Shape(B=1, T=16, D=16, V=256)  # starts the thread pools before memory is measured
GPU_HIDDEN, GPU_VOCAB, GPU_DTYPE, GPU_BACKEND = 4096, 151936, torch.bfloat16, "triton"
GPU_BATCHES, TARGET_BT = ((8, 1024), (8, 4096), (4, 16384)), (8, 4096)  # the targets are at TARGET_BT
FLOPS_PER_NDV = 8  # as in the logprobs suite: logits, d hidden, d weight and one recompute, 2·N·D·V each
LOGIT_STD, OLD_SPREAD, REF_SPREAD, SEED = 2.0, 0.05, 0.1, 0  # std of ℓ° − ℓ, ℓʳ − ℓ: the clip is hit on some tokens


INPUTS_NOTE = (f"uniform targets, every token counted (so every path does the same work), advantages ~ N(0, 1), old "
               f"log-probs = the policy's own + N(0, {OLD_SPREAD}²), reference = own + N(0, {REF_SPREAD}²).")


def loss_config(preset: str, variant: Dict[str, Any]) -> rlloss.LossConfig:
    return rlloss.LossConfig.preset(preset, beta=variant["beta"], entropy_coef=variant["entropy_coef"])


def make_inputs(shape: Shape, dtype: torch.dtype, device: str, backend: str) -> Dict[str, torch.Tensor]:
    """Random inputs, the same in every process; old and reference log-probs are the policy's own plus noise."""
    x, randn, _ = core.lm_head_inputs((shape.B, shape.T), shape.D, shape.V, dtype, device, LOGIT_STD, seed=SEED)
    advantages = randn(shape.B)
    with torch.no_grad():
        own = rlloss.token_logprobs(x["hidden"], x["weight"], x["targets"], backend=backend).logprobs.float()
    return {**x, "advantages": advantages,
            "mask": torch.ones(shape.B, shape.T, dtype=torch.bool, device=device),  # every path does the same work
            "old_logprobs": own + OLD_SPREAD * randn(shape.B, shape.T),
            "ref_logprobs": own + REF_SPREAD * randn(shape.B, shape.T),
            "grad_logprobs": randn(shape.N), "grad_entropy": randn(shape.N)}


def loss_step(forward, x: Dict[str, torch.Tensor], config: rlloss.LossConfig):
    return core.loss_step(lambda x: forward(x, config), x)


def logprobs_step(x: Dict[str, torch.Tensor], backend: str):
    """``token_logprobs`` alone on the same tokens: log-probs and entropy, random upstream gradients."""
    def step():
        x["hidden"].grad = x["weight"].grad = None
        out = rlloss.token_logprobs(x["hidden"].flatten(0, 1), x["weight"], x["targets"].reshape(-1),
                                    return_entropy=True, backend=backend)
        torch.autograd.backward([out.logprobs, out.entropy], [x["grad_logprobs"], x["grad_entropy"]])
        return {"grad_hidden": x["hidden"].grad, "grad_weight": x["weight"].grad}

    return step


def fused(backend: str):
    def forward(x, config):
        return rlloss.FusedPolicyLoss(config, backend=backend)(
            x["hidden"], x["weight"], x["targets"], x["mask"], x["advantages"], old_logprobs=x["old_logprobs"],
            ref_logprobs=x["ref_logprobs"] if config.beta else None).loss
    return lambda: forward


def unfused(backend: str):
    def forward(x, config):
        B, T, D = x["hidden"].shape
        out = rlloss.token_logprobs(x["hidden"].reshape(-1, D), x["weight"], x["targets"].reshape(-1),
                                    return_entropy=config.entropy_coef != 0.0, backend=backend)
        return rlloss.policy_loss(out.logprobs.view(B, T), x["old_logprobs"], x["advantages"], x["mask"],
                                  config=config, ref_logprobs=x["ref_logprobs"] if config.beta else None,
                                  entropy=None if out.entropy is None else out.entropy.view(B, T),
                                  backend=backend).loss
    return lambda: forward


def trl_style(x, config: rlloss.LossConfig) -> torch.Tensor:
    """TRL's GRPO loss on materialised logits (``GRPOTrainer._compute_loss`` math): ρ = exp(ℓ − ℓ°) per token or
    of the masked mean log-ratio per sequence (GSPO), −min(ρA, clip(ρ)A), + β·k3(ℓʳ − ℓ), − c_H·H, then the
    preset's aggregation."""
    mask = x["mask"].float()
    logits = (x["hidden"] @ x["weight"].T).float()  # [B, T, V]: input-dtype matmul, float32 log-softmax
    lse = torch.logsumexp(logits, dim=-1)
    logp = logits.gather(-1, x["targets"].unsqueeze(-1)).squeeze(-1) - lse
    log_ratio = logp - x["old_logprobs"]
    if config.importance_sampling_level == "sequence":
        log_ratio = ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).unsqueeze(-1)
    ratio, advantages = torch.exp(log_ratio), x["advantages"].unsqueeze(-1)
    per_token = -torch.min(ratio * advantages,
                           torch.clamp(ratio, 1 - config.epsilon_low, 1 + config.epsilon_high) * advantages)
    if config.beta != 0.0:
        per_token = per_token + config.beta * (torch.exp(x["ref_logprobs"] - logp) - (x["ref_logprobs"] - logp) - 1)
    if config.entropy_coef != 0.0:
        per_token = per_token - config.entropy_coef * (lse - (torch.softmax(logits, dim=-1) * logits).sum(-1))
    if config.aggregation == "token_mean":
        return (per_token * mask).sum() / mask.sum().clamp(min=1.0)
    if config.aggregation == "seq_mean_token_mean":
        return ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    raise ValueError(f"the TRL-style path implements token_mean and seq_mean_token_mean, not {config.aggregation}")


def liger_settings(config: rlloss.LossConfig):
    """(LigerFusedLinearGRPOLoss keyword arguments, what differs from ``config``) for a dapo/gspo config."""
    loss_type = {"token_mean": "dapo", "seq_mean_token_mean": "grpo"}.get(config.aggregation)
    if loss_type is None or config.loss_mode != "ppo_clip":
        raise ValueError(f"no Liger GRPO mapping for {config!r}")
    settings = dict(beta=config.beta, use_ref_model=config.beta != 0.0, epsilon_low=config.epsilon_low,
                    epsilon_high=config.epsilon_high, loss_type=loss_type,
                    importance_sampling_level=config.importance_sampling_level, temperature=1.0)
    differs = [f"no entropy bonus (Liger's GRPO loss has none; rlloss subtracts {config.entropy_coef}·H)"
               ] if config.entropy_coef else []
    if config.beta != 0.0 and config.kl_estimator != "k3":
        differs.append(f"KL estimator k3, not {config.kl_estimator}")
    return settings, differs


def liger():
    from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

    accepted, modules = inspect.signature(LigerFusedLinearGRPOLoss.__init__).parameters, {}

    def forward(x, config):
        if config not in modules:
            settings, _ = liger_settings(config)
            missing = [key for key in settings if key not in accepted]
            if missing:
                raise TypeError(f"this liger-kernel's LigerFusedLinearGRPOLoss lacks {missing}")
            modules[config] = LigerFusedLinearGRPOLoss(compiled=True, chunk_size=1, **settings)
        out = modules[config](x["hidden"], x["weight"], x["targets"], x["mask"].long(), x["advantages"],
                              ref_per_token_logps=x["ref_logprobs"] if config.beta else None,
                              old_per_token_logps=x["old_logprobs"])
        return out[0] if isinstance(out, tuple) else out
    return forward


def cases(backend: str) -> List[core.Case]:
    return [core.Case("fused", "subject", f"rlloss.FusedPolicyLoss, backend={backend!r}", fused(backend)),
            core.Case("unfused", "rlloss", f"rlloss.token_logprobs + rlloss.policy_loss, backend={backend!r}",
                      unfused(backend))]


TRL = core.Case("trl", "baseline", "TRL-style: materialised logits, float32 selective log-softmax, torch loss ops",
                lambda: trl_style, note="written here from TRL's GRPO loss (not TRL's code): [B, T, V] logits in "
                "the input dtype, upcast to float32, logsumexp + gather, the entropy from the same float32 logits "
                "when the loss uses it")
LIGER = core.Case(
    "liger", "peer", "liger_kernel.chunked_loss.LigerFusedLinearGRPOLoss(compiled=True, chunk_size=1)", liger,
    core.import_error("liger_kernel.chunked_loss", "liger-kernel"),
    "dapo → loss_type='dapo' (token-mean over the local mask), gspo → loss_type='grpo' with "
    "importance_sampling_level='sequence'; ε_low/ε_high as the preset; KL: beta, use_ref_model=True, "
    "ref_per_token_logps (Liger's KL is k3, as rlloss's default); no entropy bonus in Liger, so in the "
    "kl+entropy variant its loss lacks the −c_H·H term and its difference from rlloss shows that; "
    "computes its gradients inside the forward")
CPU_CASES = (cases("torch")[0], TRL, cases("torch")[1])
GPU_CASES = (*cases(GPU_BACKEND), TRL, LIGER)
LOGPROBS_ONLY = core.Case("token_logprobs", "floor",
                          "rlloss.token_logprobs alone (logprobs + entropy, random upstream gradients)")
GEMM_FLOOR = core.Case("gemm-floor", "floor", "bare cuBLAS GEMMs: h·Wᵀ, dz·W, dzᵀ·h (torch.mm)",
                       note="the fused loss's three GEMMs alone, torch.mm into preallocated outputs")


def base_record(case: core.Case, shape: Shape, dtype, device: str, preset=None, variant=None) -> Dict[str, Any]:
    config = loss_config(preset, variant) if preset else None
    return core.record(
        case, note=case.note, preset=preset, variant=variant and variant["name"], beta=variant and variant["beta"],
        entropy_coef=variant and variant["entropy_coef"], **vars(shape), N=shape.N, tokens=shape.N,
        dtype=core.dtype_name(dtype), device=device, flops=FLOPS_PER_NDV * shape.N * shape.D * shape.V,
        differs="; ".join(liger_settings(config)[1]) if config and case.name == "liger" else "")


def add_ratios(records: List[Dict[str, Any]]) -> None:
    """Each path's time over fused's and fused's peak over its own, for one configuration."""
    anchor = next((r for r in records if r["impl"] == "fused" and r.get("time_ms")), None)
    for record in records:
        if anchor is not None and record is not anchor and record.get("time_ms"):
            record["time_vs_fused"] = record["time_ms"] / anchor["time_ms"]
            if record.get("peak_memory_bytes") and anchor.get("peak_memory_bytes") is not None:
                record["fused_memory_fraction"] = anchor["peak_memory_bytes"] / record["peak_memory_bytes"]


# --- CPU default ------------------------------------------------------------------------------------------


def cpu_step(payload: Dict[str, Any]):
    """One case's fwd+bwd (dapo, KL + entropy), after a tiny call that starts the thread pools."""
    config, make = loss_config(CPU_PRESET, CPU_VARIANT), next(c for c in CPU_CASES if c.name == payload["impl"]).make
    loss_step(make(), make_inputs(TINY_SHAPE, torch.float32, "cpu", "torch"), config)()
    return loss_step(make(), make_inputs(Shape(**payload["shape"]), torch.float32, "cpu", "torch"), config)


def cpu_check(payload: Dict[str, Any], results: Dict[str, Any]) -> None:
    """The saved results against fused's and against ``FusedPolicyLoss(backend="reference")`` in float64."""
    x = make_inputs(Shape(**payload["shape"]), torch.float32, "cpu", "torch")
    x = {k: v.detach().double().requires_grad_() if k in ("hidden", "weight") else
         v.double() if v.is_floating_point() else v for k, v in x.items()}
    expected = loss_step(fused("reference")(), x, loss_config(CPU_PRESET, CPU_VARIANT))()
    saved = {name: torch.load(path) for name, path in payload["outputs_paths"].items() if name in results}
    for name, result in saved.items():
        results[name]["loss"] = float(result["loss"])
        results[name].update(core.diffs(result, expected, "diff_reference", rel="also"))
        if "fused" in saved and name != "fused":
            results[name].update(core.diffs(result, saved["fused"], "diff_fused", rel="also"))


def run_cpu(ctx: core.RunContext) -> core.Report:
    shape = CPU_QUICK_SHAPE if ctx.quick else CPU_SHAPE
    records = {c.name: base_record(c, shape, torch.float32, "cpu", CPU_PRESET, CPU_VARIANT) for c in CPU_CASES}
    rows = core.measure_cpu_isolated(__name__, records, {"shape": vars(shape)}, ctx.progress, CPU_WARMUP_CALLS,
                                     CPU_TIMED_CALLS, ("B", "T", "preset", "variant"))
    logits_bytes, grad_bytes = shape.N * shape.V * 4, (shape.N + shape.V) * shape.D * 4
    core.add_memory_in_logits_tensors(rows, logits_bytes)
    add_ratios(rows)
    return core.Report(
        "policy", "cpu-default", f"policy — CPU default: {shape}, float32, {CPU_PRESET} with KL and entropy, "
        "forward + backward", {
            "shape": vars(shape), "dtype": "float32", "preset": CPU_PRESET, "variant": CPU_VARIANT,
            "loss_config": repr(loss_config(CPU_PRESET, CPU_VARIANT)), "warmup_calls": CPU_WARMUP_CALLS,
            "timed_calls": CPU_TIMED_CALLS, "seed": SEED, "logit_std": LOGIT_STD, "old_spread": OLD_SPREAD,
            "ref_spread": REF_SPREAD, "logits_tensor_bytes": logits_bytes, "input_grad_bytes": grad_bytes,
            "diff_reference": "FusedPolicyLoss(backend='reference') on float64 copies of the inputs"},
        rows, [core.IMPL, core.BTDV, core.STATUS, *core.CPU_TIME_MEMORY_COLUMNS,
               core.col("|Δloss| vs fused", "diff_fused_loss", core.ERR),
               core.col("max abs Δ d hidden vs fused", "diff_fused_grad_hidden", core.ERR),
               core.col("d weight vs fused", "diff_fused_grad_weight", core.ERR),
               core.col("|Δloss| vs float64", "diff_reference_loss", core.ERR),
               core.col("d hidden vs float64", "diff_reference_grad_hidden", core.ERR),
               core.col("d weight vs float64", "diff_reference_grad_weight", core.ERR)],
        notes=[
            f"`{CPU_PRESET}` with β = {CPU_VARIANT['beta']} (k3 KL) and entropy bonus c_H = "
            f"{CPU_VARIANT['entropy_coef']}; " + INPUTS_NOTE + " `fused` and `unfused` are the chunked torch backend "
            "(never an [N, V] tensor); `trl` materialises float32 logits, autograd keeps several [N, V] tensors. One "
            f"float32 [N, V] tensor is {core.fmt_mib(logits_bytes)} MiB; the input gradients every path returns "
            f"{core.fmt_mib(grad_bytes)} MiB.",
            core.CPU_MEMORY_METHOD,
            core.cpu_time_note(CPU_WARMUP_CALLS, CPU_TIMED_CALLS) + " Not a statement about the Triton kernels.",
            "vs fused: |Δ| of the loss and max |Δ| of the gradients from FusedPolicyLoss's; vs float64: from "
            "FusedPolicyLoss on the reference backend in float64.",
        ])


# --- GPU comparison ---------------------------------------------------------------------------------------


# Issue #3's targets at TARGET_BT: (row, its key, the phrase of its value).
TARGET_PHRASES = (("liger", "time_vs_fused", "{:.2f}× faster than Liger (target ≥ 2)"),
                  ("liger", "fused_memory_fraction", "peak {:.2f}× Liger's (target ≤ 0.5)"),
                  ("trl", "time_vs_fused", "{:.2f}× faster than TRL-style (target ≥ 3)"),
                  ("fused", "time_vs_token_logprobs", "{:.2f}× token_logprobs' time (target ≤ 1.10)"),
                  ("fused", "time_vs_gemm_floor", "{:.2f}× its three bare GEMMs' time"))


def target_lines(records: List[Dict[str, Any]]) -> List[str]:
    """The issue's targets, read off the records at the target shape (a sentence per configuration)."""
    lines = []
    for preset, variant in ((p, v["name"]) for p in PRESETS for v in VARIANTS):
        rows = {r["impl"]: r for r in records if (r["B"], r["T"]) == TARGET_BT and r["status"] == "ok"
                and r["preset"] == preset and r["variant"] == variant}
        parts = [text.format(rows[impl][key]) for impl, key, text in TARGET_PHRASES
                 if "fused" in rows and rows.get(impl, {}).get(key) is not None]
        if parts:
            lines.append(f"Issue #3 at B×T = {TARGET_BT[0]}×{TARGET_BT[1]}, {preset}/{variant}: fused is "
                         + ", ".join(parts) + ".")
    return lines


def run_gpu(ctx: core.RunContext) -> core.Report:
    device, probes = ctx.device.type, core.CUDA_PROBES
    shapes = [Shape(B, T, GPU_HIDDEN, GPU_VOCAB) for B, T in GPU_BATCHES[:1 if ctx.quick else None]]
    matmul_tflops = core.reference_matmul_tflops(ctx, GPU_DTYPE)
    impls, skips = core.split_available(GPU_CASES, ctx.progress)
    done = core.counter("policy", ("B", "T", "preset", "variant"),
                        len(shapes) * (2 + len(PRESETS) * len(VARIANTS) * len(impls)), ctx.progress)
    records: List[Dict[str, Any]] = []

    def timed(record, outputs):
        core.add_rates(record, matmul_tflops)
        return {"loss": float(outputs["loss"])} if "loss" in outputs else {}

    for shape in shapes:
        floor = core.floor_row(base_record(GEMM_FLOOR, shape, GPU_DTYPE, device), shape.N, shape.D, shape.V,
                               GPU_DTYPE, device, core.FUSED_LOSS_FLOOR_GEMMS, done, matmul_tflops)
        # The inputs of the shape, built once (a failure is recorded by measure_cases) and shared by its cases.
        build, shape_records = functools.cache(lambda: make_inputs(shape, GPU_DTYPE, device, GPU_BACKEND)), [floor]
        shape_records += core.measure_cases([LOGPROBS_ONLY], lambda c: base_record(c, shape, GPU_DTYPE, device),
                                            build, lambda c, x: logprobs_step(x, GPU_BACKEND), probes, device, done,
                                            lambda *args: None, timed)
        for preset in PRESETS:
            for variant in VARIANTS:
                config = loss_config(preset, variant)
                measured = core.measure_cases(
                    impls, lambda c: base_record(c, shape, GPU_DTYPE, device, preset, variant), build,
                    lambda c, x: loss_step(c.make(), x, config), probes, device, done,
                    lambda record, out, anchor: record.update(core.diffs(out, anchor, "diff_fused", rel="also")), timed)
                add_ratios(measured)
                token_ms = shape_records[1].get("time_ms")
                if measured[0]["impl"] == "fused" and measured[0].get("time_ms") and token_ms:
                    measured[0]["time_vs_token_logprobs"] = measured[0]["time_ms"] / token_ms
                shape_records += measured
        build.cache_clear()
        core.free(device)
        core.add_floor_ratios(shape_records, floor)
        records += shape_records
    return core.Report(
        "policy", "gpu-peers", f"policy — {ctx.device.name}: FusedPolicyLoss vs Liger, TRL-style and unfused, "
        f"bfloat16, D={GPU_HIDDEN}, V={GPU_VOCAB}, forward + backward", {
            "shapes": [vars(shape) for shape in shapes], "dtype": "bfloat16", "presets": list(PRESETS),
            "variants": list(VARIANTS), "seed": SEED, "logit_std": LOGIT_STD, "old_spread": OLD_SPREAD,
            "ref_spread": REF_SPREAD, "matmul_tflops": matmul_tflops, "matmul_size": core.MATMUL_REFERENCE_SIZE,
            "flops_convention": f"{FLOPS_PER_NDV}·N·D·V per forward + backward",
            "floor_gemms": list(core.FUSED_LOSS_FLOOR_GEMMS),
            "implementations": {c.name: {"label": c.label, "note": c.note}
                                for c in (*GPU_CASES, LOGPROBS_ONLY, GEMM_FLOOR)},
            "plot": {"facet": "preset", "series": ["variant", "impl"]}},
        records, [
            core.IMPL, ("B×T", lambda r: f"{r['B']}×{r['T']}"), ("preset", lambda r: r["preset"] or "—"),
            ("variant", lambda r: r["variant"] or "—"), core.STATUS, core.col("fwd+bwd ms", "time_ms", core.MS),
            core.col("time / fused", "time_vs_fused", ".2f"),
            core.col("fused / token_logprobs", "time_vs_token_logprobs", ".2f"),
            core.col("time / GEMM floor", "time_vs_gemm_floor", ".2f"),
            core.col("peak GiB", "peak_memory_bytes", *core.GIB_COL),
            core.col("fused peak / this", "fused_memory_fraction", ".2f"),
            core.col("% of bf16 matmul (8·N·D·V)", "matmul_fraction", *core.PCT),
            core.col("|Δloss| vs fused", "diff_fused_loss", core.ERR),
            core.col("d hidden rel", "diff_fused_grad_hidden_rel", core.ERR),
            core.col("d weight rel", "diff_fused_grad_weight_rel", core.ERR),
            ("differs", lambda r: r.get("differs") or "")],
        skips, notes=target_lines(records) + [
            core.CUDA_CASE_NOTE + " `token_logprobs` (one row per shape: log-probs + entropy, random upstream "
            "gradients) is the floor the fused loss is held against.",
            "bfloat16 hidden [B, T, D] and lm_head weight [V, D]; " + INPUTS_NOTE,
            core.CUDA_MEMORY_METHOD, core.CUDA_TIME_NOTE,
            "time / fused: this path's time over FusedPolicyLoss's for the same configuration (> 1: fused is "
            f"faster). % of bf16 matmul: {FLOPS_PER_NDV}·N·D·V FLOPs / time over a {core.MATMUL_REFERENCE_SIZE}³ "
            f"bf16 matmul measured in the same run ({matmul_tflops:.0f} TFLOP/s).",
            "|Δloss| vs fused: |Δ| of the loss; d hidden / d weight rel: max |Δ| of the gradient from "
            "FusedPolicyLoss's over its max abs. A filled `differs` column means another loss, so its difference is "
            "not rounding.",
            core.GEMM_FLOOR_NOTE + " Here three GEMMs (h·Wᵀ, dz·W, dzᵀ·h): the fused loss forms dz in its forward, "
            "no logit recompute; `token_logprobs` needs a fourth.",
        ] + [f"`{c.name}`: {c.note}" for c in GPU_CASES if c.note])
