"""Suite ``policy``: the whole policy loss from hidden states — ``rlloss.FusedPolicyLoss`` (log-probs, entropy
and the GRPO-family loss in one autograd node, never a [tokens × vocab] tensor), forward + backward, issue #3.

Contenders, every one on the same inputs and checked against ``FusedPolicyLoss`` (loss value and gradients of
hidden states and lm_head weight):

``fused``           ``rlloss.FusedPolicyLoss(LossConfig.preset(...))``: the subject.
``unfused``         ``rlloss.token_logprobs`` then ``rlloss.policy_loss`` (two autograd nodes, [B, T] tensors
                    between them).
``trl``             the TRL-style path, written here from TRL's documented GRPO math: materialised logits
                    ``hidden @ Wᵀ`` in the input dtype, float32 selective log-softmax (logsumexp, gather), the
                    entropy from the same float32 logits where the loss uses it, then the clipped surrogate,
                    k3 KL and aggregation in torch ops, autograd through all of it.
``liger``           Liger-Kernel's ``LigerFusedLinearGRPOLoss`` (``liger_kernel.chunked_loss``), GPU only,
                    with the preset mapped onto its arguments (see :func:`liger_settings`; what it cannot
                    express — the entropy bonus — is recorded in the ``differs`` field).
``token_logprobs``  ``rlloss.token_logprobs`` alone (log-probs and entropy, random upstream gradients): the
                    floor the fused loss is held against (issue #3: within 10 %).
``gemm-floor``      (GPU) the three bare cuBLAS GEMMs the fused loss cannot avoid at the shape, h·Wᵀ, dz·W and
                    dzᵀ·h (it forms dz in its forward, so no recompute); every row's time over it is reported.

GPU: bfloat16, D = 4096, V = 151936, B×T ∈ {8×1024, 8×4096, 4×16384} (``--quick``: 8×1024), the ``dapo`` and
``gspo`` presets, each plain and with KL (β = 0.04, ref log-probs) and entropy bonus (c_H = 0.01); timed by
``triton.testing.do_bench``, peak memory by ``torch.cuda.max_memory_allocated`` deltas, achieved TFLOP/s
(8·N·D·V) against the bf16 matmul rate measured in the same run.

CPU default (no GPU): float32, the ``torch`` backend, B×T = 4×128, D = 256, V = 32000, ``dapo`` with KL and
entropy: fused vs TRL-style vs unfused, each case's peak memory in a fresh process, times in one more, every
result also held against ``FusedPolicyLoss`` on the ``reference`` backend in float64.
"""
from __future__ import annotations

import inspect
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch
from torch import Tensor

import rlloss

from . import _harness as harness
from ._registry import Suite

# --- sizes and settings -----------------------------------------------------------------------------------


Shape = harness.BatchShape


@dataclass(frozen=True)
class Variant:
    """What is switched on beside the surrogate: the KL to a reference (β) and the entropy bonus (c_H)."""

    name: str
    beta: float
    entropy_coef: float


PLAIN = Variant("plain", 0.0, 0.0)
KL_ENTROPY = Variant("kl+entropy", 0.04, 0.01)
VARIANTS = (PLAIN, KL_ENTROPY)
PRESETS = ("dapo", "gspo")

CPU_SHAPE = Shape(B=4, T=128, D=256, V=32000)
CPU_QUICK_SHAPE = Shape(B=2, T=128, D=128, V=8192)
CPU_DTYPE = torch.float32
CPU_PRESET = "dapo"
CPU_VARIANT = KL_ENTROPY
CPU_WARMUP_CALLS = 1
CPU_TIMED_CALLS = 3
THREAD_POOL_WARMUP_SHAPE = Shape(B=1, T=16, D=16, V=256)

GPU_HIDDEN = 4096
GPU_VOCAB = 151936
GPU_BATCHES = ((8, 1024), (8, 4096), (4, 16384))
GPU_DTYPE = torch.bfloat16
# The targets are stated at this shape.
TARGET_BT = (8, 4096)

FLOPS_PER_NDV = 8  # as in the logprobs suite: logits, d hidden, d weight and one recompute, 2·N·D·V each
LOGIT_STD = 2.0  # weight scaled so the logits have this standard deviation
OLD_SPREAD = 0.05  # std of ℓ° − ℓ: the clip is hit on some tokens
REF_SPREAD = 0.1  # std of ℓʳ − ℓ
SEED = 0


def gpu_shapes(quick: bool) -> List[Shape]:
    batches = GPU_BATCHES[:1] if quick else GPU_BATCHES
    return [Shape(B, T, GPU_HIDDEN, GPU_VOCAB) for B, T in batches]


def loss_config(preset: str, variant: Variant) -> rlloss.LossConfig:
    return rlloss.LossConfig.preset(preset, beta=variant.beta, entropy_coef=variant.entropy_coef)


def nominal_flops(shape: Shape) -> int:
    return FLOPS_PER_NDV * shape.N * shape.D * shape.V


# --- inputs -----------------------------------------------------------------------------------------------


class Inputs(NamedTuple):
    hidden: Tensor  # [B, T, D] leaf, requires grad
    weight: Tensor  # [V, D] leaf, requires grad
    targets: Tensor  # [B, T] int64
    mask: Tensor  # [B, T] bool, all True: every path does the same work on every token
    advantages: Tensor  # [B] float32
    old_logprobs: Tensor  # [B, T] float32
    ref_logprobs: Tensor  # [B, T] float32
    grad_logprobs: Tensor  # [N] float32, upstream gradient for token_logprobs alone
    grad_entropy: Tensor  # [N] float32


def make_inputs(shape: Shape, dtype: torch.dtype, device: str, backend: str, seed: int = SEED) -> Inputs:
    """Random inputs, identical in every process for the same arguments; the old and reference log-probs are
    the policy's own (computed once here) plus noise, so ratios and KL are realistic."""
    gen = torch.Generator(device=device).manual_seed(seed)

    def randn(*size: int) -> Tensor:
        return torch.randn(*size, generator=gen, device=device, dtype=torch.float32)

    hidden = randn(shape.B, shape.T, shape.D).to(dtype).requires_grad_()
    weight = (randn(shape.V, shape.D) * (LOGIT_STD / shape.D**0.5)).to(dtype).requires_grad_()
    targets = torch.randint(0, shape.V, (shape.B, shape.T), generator=gen, device=device)
    mask = torch.ones(shape.B, shape.T, dtype=torch.bool, device=device)
    advantages = randn(shape.B)
    with torch.no_grad():
        own = rlloss.token_logprobs(hidden, weight, targets, backend=backend).logprobs.float()
    old = own + OLD_SPREAD * randn(shape.B, shape.T)
    ref = own + REF_SPREAD * randn(shape.B, shape.T)
    return Inputs(hidden, weight, targets, mask, advantages, old, ref, randn(shape.N), randn(shape.N))


# --- implementations --------------------------------------------------------------------------------------


class Result(NamedTuple):
    loss: Optional[Tensor]  # 0-d, detached (None for token_logprobs alone)
    grad_hidden: Tensor
    grad_weight: Tensor


# A loss path: (inputs, config) → the loss tensor (not yet backpropagated).
LossFn = Callable[[Inputs, rlloss.LossConfig], Tensor]


def fused_loss(backend: str) -> Callable[[], LossFn]:
    def make() -> LossFn:
        def forward(inputs: Inputs, config: rlloss.LossConfig) -> Tensor:
            loss_fn = rlloss.FusedPolicyLoss(config, backend=backend)
            return loss_fn(inputs.hidden, inputs.weight, inputs.targets, inputs.mask, inputs.advantages,
                           old_logprobs=inputs.old_logprobs,
                           ref_logprobs=inputs.ref_logprobs if config.beta else None).loss

        return forward

    return make


def unfused_loss(backend: str) -> Callable[[], LossFn]:
    def make() -> LossFn:
        def forward(inputs: Inputs, config: rlloss.LossConfig) -> Tensor:
            B, T, D = inputs.hidden.shape
            out = rlloss.token_logprobs(inputs.hidden.reshape(-1, D), inputs.weight, inputs.targets.reshape(-1),
                                        return_entropy=config.entropy_coef != 0.0, backend=backend)
            entropy = out.entropy.view(B, T) if out.entropy is not None else None
            return rlloss.policy_loss(out.logprobs.view(B, T), inputs.old_logprobs, inputs.advantages, inputs.mask,
                                      config=config, ref_logprobs=inputs.ref_logprobs if config.beta else None,
                                      entropy=entropy, backend=backend).loss

        return forward

    return make


def trl_style_loss(inputs: Inputs, config: rlloss.LossConfig) -> Tensor:
    """TRL's GRPO loss on materialised logits (``GRPOTrainer._compute_loss`` math, written out here):
    logits in the input dtype, float32 selective log-softmax, ρ = exp(ℓ − ℓ°) per token or exp of the masked
    mean log-ratio per sequence (GSPO), −min(ρA, clip(ρ)A), + β·k3(ℓʳ − ℓ), − c_H·H, then the aggregation
    of the preset (token-mean, or the mean over sequences of per-sequence token means)."""
    mask = inputs.mask.to(torch.float32)
    logits = (inputs.hidden @ inputs.weight.T).float()  # [B, T, V]: bf16 matmul, float32 log-softmax
    lse = torch.logsumexp(logits, dim=-1)
    logp = logits.gather(-1, inputs.targets.unsqueeze(-1)).squeeze(-1) - lse
    log_ratio = logp - inputs.old_logprobs
    if config.importance_sampling_level == "sequence":
        log_ratio = ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).unsqueeze(-1)
    coef_1 = torch.exp(log_ratio)
    coef_2 = torch.clamp(coef_1, 1 - config.epsilon_low, 1 + config.epsilon_high)
    advantages = inputs.advantages.unsqueeze(-1)
    per_token_loss = -torch.min(coef_1 * advantages, coef_2 * advantages)
    if config.beta != 0.0:
        x = inputs.ref_logprobs - logp
        per_token_loss = per_token_loss + config.beta * (torch.exp(x) - x - 1)
    if config.entropy_coef != 0.0:
        entropy = lse - (torch.softmax(logits, dim=-1) * logits).sum(-1)
        per_token_loss = per_token_loss - config.entropy_coef * entropy
    if config.aggregation == "token_mean":
        return (per_token_loss * mask).sum() / mask.sum().clamp(min=1.0)
    if config.aggregation == "seq_mean_token_mean":
        return ((per_token_loss * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    raise ValueError(f"the TRL-style path implements token_mean and seq_mean_token_mean, not {config.aggregation}")


def liger_settings(config: rlloss.LossConfig) -> Tuple[Dict[str, Any], List[str]]:
    """(LigerFusedLinearGRPOLoss keyword arguments, what differs from ``config``) for a dapo/gspo config."""
    loss_type = {"token_mean": "dapo", "seq_mean_token_mean": "grpo"}.get(config.aggregation)
    if loss_type is None or config.loss_mode != "ppo_clip" or config.importance_sampling_level not in (
            "token", "sequence"):
        raise ValueError(f"no Liger GRPO mapping for {config!r}")
    settings = dict(beta=config.beta, use_ref_model=config.beta != 0.0, epsilon_low=config.epsilon_low,
                    epsilon_high=config.epsilon_high, loss_type=loss_type,
                    importance_sampling_level=config.importance_sampling_level, temperature=1.0)
    differs = []
    if config.entropy_coef != 0.0:
        differs.append(f"no entropy bonus (Liger's GRPO loss has none; rlloss subtracts {config.entropy_coef}·H)")
    if config.beta != 0.0 and config.kl_estimator != "k3":
        differs.append(f"KL estimator k3, not {config.kl_estimator}")
    return settings, differs


def liger_loss(compiled: bool) -> Callable[[], LossFn]:
    def make() -> LossFn:
        from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

        accepted = inspect.signature(LigerFusedLinearGRPOLoss.__init__).parameters
        modules: Dict[rlloss.LossConfig, Any] = {}

        def forward(inputs: Inputs, config: rlloss.LossConfig) -> Tensor:
            if config not in modules:
                settings, _ = liger_settings(config)
                missing = [key for key in settings if key not in accepted]
                if missing:
                    raise TypeError(f"this liger-kernel's LigerFusedLinearGRPOLoss lacks {missing}")
                modules[config] = LigerFusedLinearGRPOLoss(compiled=compiled, chunk_size=1, **settings)
            out = modules[config](inputs.hidden, inputs.weight, inputs.targets, inputs.mask.to(torch.int64),
                                  inputs.advantages, ref_per_token_logps=inputs.ref_logprobs if config.beta else None,
                                  old_per_token_logps=inputs.old_logprobs)
            return out[0] if isinstance(out, tuple) else out

        return forward

    return make


@dataclass(frozen=True)
class Implementation:
    """One contender. role: "subject" (FusedPolicyLoss), "rlloss" (other rlloss paths), "baseline"
    (TRL-style), "peer" (another library). ``differs``: config → what this path cannot express."""

    name: str
    role: str
    label: str
    make: Callable[[], LossFn]
    unavailable: Callable[[], Optional[str]] = lambda: None
    differs: Callable[[rlloss.LossConfig], List[str]] = lambda config: []
    note: str = ""


def fused_implementation(backend: str) -> Implementation:
    return Implementation("fused", "subject", f"rlloss.FusedPolicyLoss, backend={backend!r}", fused_loss(backend))


def unfused_implementation(backend: str) -> Implementation:
    return Implementation("unfused", "rlloss", f"rlloss.token_logprobs + rlloss.policy_loss, backend={backend!r}",
                          unfused_loss(backend))


TRL_STYLE = Implementation(
    "trl", "baseline", "TRL-style: materialised logits, float32 selective log-softmax, torch loss ops",
    lambda: trl_style_loss,
    note="written here from TRL's GRPO loss (not TRL's code): [B, T, V] logits in the input dtype, upcast to "
         "float32, logsumexp + gather, the entropy from the same float32 logits when the loss uses it",
)


def liger_implementation(compiled: bool = True) -> Implementation:
    return Implementation(
        "liger", "peer", f"liger_kernel.chunked_loss.LigerFusedLinearGRPOLoss(compiled={compiled}, chunk_size=1)",
        liger_loss(compiled), harness.import_error("liger_kernel.chunked_loss", "liger-kernel"),
        differs=lambda config: liger_settings(config)[1],
        note="dapo → loss_type='dapo' (token-mean over the local mask), gspo → loss_type='grpo' with "
             "importance_sampling_level='sequence'; ε_low/ε_high as the preset; KL: beta, use_ref_model=True, "
             "ref_per_token_logps (Liger's KL is k3, as rlloss's default); no entropy bonus in Liger, so in the "
             "kl+entropy variant its loss lacks the −c_H·H term and its difference from rlloss shows that; "
             "computes its gradients inside the forward",
    )


CPU_IMPLEMENTATIONS = (fused_implementation("torch"), TRL_STYLE, unfused_implementation("torch"))
GPU_IMPLEMENTATIONS = (fused_implementation("triton"), unfused_implementation("triton"), TRL_STYLE,
                       liger_implementation(compiled=True))


# --- one forward + backward -------------------------------------------------------------------------------


def loss_step(forward: LossFn, inputs: Inputs, config: rlloss.LossConfig) -> Callable[[], Result]:
    """Forward + backward of the scalar loss; input gradients reset first, so calls do not accumulate."""

    def step() -> Result:
        inputs.hidden.grad, inputs.weight.grad = None, None
        loss = forward(inputs, config)
        loss.backward()
        return Result(loss.detach(), inputs.hidden.grad, inputs.weight.grad)

    return step


def logprobs_step(inputs: Inputs, backend: str) -> Callable[[], Result]:
    """``token_logprobs`` alone on the same tokens: log-probs and entropy, random upstream gradients."""
    D = inputs.hidden.shape[-1]

    def step() -> Result:
        inputs.hidden.grad, inputs.weight.grad = None, None
        out = rlloss.token_logprobs(inputs.hidden.reshape(-1, D), inputs.weight, inputs.targets.reshape(-1),
                                    return_entropy=True, backend=backend)
        torch.autograd.backward([out.logprobs, out.entropy], [inputs.grad_logprobs, inputs.grad_entropy])
        return Result(None, inputs.hidden.grad, inputs.weight.grad)

    return step


# --- comparing results ------------------------------------------------------------------------------------


def max_abs_diff(a: Tensor, b: Tensor, block: int = 1 << 24) -> float:
    """max |a − b| in float32 blocks (no full-size float64 copy of a [V, D] gradient)."""
    a, b = a.reshape(-1), b.reshape(-1)
    worst = 0.0
    for start in range(0, a.numel(), block):
        worst = max(worst, (a[start:start + block].float() - b[start:start + block].float()).abs().max().item())
    return worst


def max_abs(a: Tensor, block: int = 1 << 24) -> float:
    a = a.reshape(-1)
    return max((a[s:s + block].float().abs().max().item() for s in range(0, a.numel(), block)), default=0.0)


def result_diffs(result: Result, expected: Result, prefix: str) -> Dict[str, float]:
    """|Δloss| and the max abs gradient differences, also relative to the expected gradient's max abs."""
    out: Dict[str, float] = {}
    if result.loss is not None and expected.loss is not None:
        out[f"{prefix}_loss"] = abs(float(result.loss) - float(expected.loss))
    for name in ("grad_hidden", "grad_weight"):
        diff = max_abs_diff(getattr(result, name), getattr(expected, name))
        scale = max_abs(getattr(expected, name))
        out[f"{prefix}_{name}"] = diff
        out[f"{prefix}_{name}_rel"] = diff / scale if scale > 0 else None
    return out


def float64_reference(inputs: Inputs, config: rlloss.LossConfig) -> Result:
    """Ground truth: ``FusedPolicyLoss`` on the ``reference`` backend (materialised logits, autograd) on
    float64 copies of the inputs."""
    hidden = inputs.hidden.detach().double().requires_grad_()
    weight = inputs.weight.detach().double().requires_grad_()
    copy = inputs._replace(hidden=hidden, weight=weight, old_logprobs=inputs.old_logprobs.double(),
                           ref_logprobs=inputs.ref_logprobs.double(), advantages=inputs.advantages.double())
    return loss_step(fused_loss("reference")(), copy, config)()


# --- records ----------------------------------------------------------------------------------------------


def base_record(impl: Implementation, shape: Shape, dtype: torch.dtype, device: str, preset: Optional[str],
                variant: Optional[Variant]) -> Dict[str, Any]:
    config = loss_config(preset, variant) if preset is not None else None
    return {
        "impl": impl.name, "role": impl.role, "label": impl.label, "note": impl.note,
        "preset": preset, "variant": variant.name if variant else None,
        "beta": variant.beta if variant else None, "entropy_coef": variant.entropy_coef if variant else None,
        "B": shape.B, "T": shape.T, "N": shape.N, "D": shape.D, "V": shape.V, "tokens": shape.N,
        "dtype": harness.dtype_name(dtype), "device": device, "flops": nominal_flops(shape),
        "differs": "; ".join(impl.differs(config)) if config is not None else "",
        "status": "ok", "error": None,
    }


LOGPROBS_ONLY = Implementation("token_logprobs", "floor",
                               "rlloss.token_logprobs alone (logprobs + entropy, random upstream gradients)",
                               lambda: None)
GEMM_FLOOR = Implementation("gemm-floor", "floor", "bare cuBLAS GEMMs: h·Wᵀ, dz·W, dzᵀ·h (torch.mm)", lambda: None,
                            note="the fused loss's three GEMMs alone, torch.mm into preallocated outputs")


# --- GPU comparison (runs on CPU stand-ins in benchmarks/test_policy_bench.py) ----------------------------


def _measure(step: Callable[[], Result], probes: harness.Probes) -> Tuple[Dict[str, Any], Result]:
    """Warm-up call (compiles, autotunes), one call for peak memory and the result, then the timing."""
    step()
    peak, result = probes.peak_memory(step)
    timing = probes.time(step)
    return {"peak_memory_bytes": peak, **timing.as_record()}, result


def compare_implementations(
    shapes: Sequence[Shape], presets: Sequence[str], variants: Sequence[Variant], dtype: torch.dtype, device: str,
    backend: str, impls: Sequence[Implementation], probes: harness.Probes, progress: Callable[[str], None],
    matmul_tflops: Optional[float] = None, floor_gemms: Optional[Sequence[str]] = None,
) -> List[Dict[str, Any]]:
    """Per shape: the GEMM floor (``floor_gemms``, e.g. ``harness.FUSED_LOSS_FLOOR_GEMMS``; None: no such row),
    token_logprobs alone, then every implementation for every (preset, variant); the first ``subject`` of each
    configuration is the anchor every other path is compared with. With a floor, every timed row of the shape
    gets ``time_vs_gemm_floor``."""
    records: List[Dict[str, Any]] = []
    total = len(shapes) * (1 + (floor_gemms is not None) + len(presets) * len(variants) * len(impls))
    counter = iter(range(1, total + 1))

    def done(record: Dict[str, Any]) -> None:
        if gemm_record is not None:
            harness.add_floor_ratios([record], gemm_record)
        records.append(record)
        progress(_progress_line(next(counter), total, record))

    for shape in shapes:
        gemm_record = None
        if floor_gemms is not None:  # first, alone: its tensors are freed before the inputs are built
            gemm_record = base_record(GEMM_FLOOR, shape, dtype, device, None, None)
            try:
                gemm_record.update(harness.gemm_floor(shape.N, shape.D, shape.V, dtype, device, floor_gemms,
                                                      probes.time))
                harness.add_rates(gemm_record, matmul_tflops)
            except Exception as exc:  # out of memory: recorded like any case
                harness.failure(gemm_record, exc)
            harness.free_device_memory(device)
            done(gemm_record)
        floor_record = base_record(LOGPROBS_ONLY, shape, dtype, device, None, None)
        try:
            inputs = make_inputs(shape, dtype, device, backend)
        except Exception as exc:  # the inputs themselves do not fit: every case of this shape fails alike
            done(harness.failure(floor_record, exc))
            for preset in presets:
                for variant in variants:
                    for impl in impls:
                        done(harness.failure(base_record(impl, shape, dtype, device, preset, variant), exc))
            harness.free_device_memory(device)
            continue
        try:
            measured, _ = _measure(logprobs_step(inputs, backend), probes)
            floor_record.update(measured)
            harness.add_rates(floor_record, matmul_tflops)
        except Exception as exc:
            harness.failure(floor_record, exc)
        inputs.hidden.grad, inputs.weight.grad = None, None
        harness.free_device_memory(device)
        done(floor_record)
        floor_ms = floor_record.get("time_ms")

        for preset in presets:
            for variant in variants:
                config = loss_config(preset, variant)
                anchor: Optional[Result] = None
                anchor_record: Optional[Dict[str, Any]] = None
                for impl in impls:
                    record = base_record(impl, shape, dtype, device, preset, variant)
                    try:
                        measured, result = _measure(loss_step(impl.make(), inputs, config), probes)
                    except Exception as exc:  # OOM, a peer's unsupported option: record, go on
                        harness.failure(record, exc)
                    else:
                        record.update(measured)
                        record["loss"] = float(result.loss)
                        harness.add_rates(record, matmul_tflops)
                        if anchor is None and impl.role == "subject":
                            anchor, anchor_record = result, record
                            if floor_ms:
                                record["time_vs_token_logprobs"] = record["time_ms"] / floor_ms
                        elif anchor is not None:
                            record.update(result_diffs(result, anchor, "diff_fused"))
                            record["time_vs_fused"] = record["time_ms"] / anchor_record["time_ms"]
                            if record["peak_memory_bytes"] and anchor_record["peak_memory_bytes"] is not None:
                                record["fused_memory_fraction"] = (anchor_record["peak_memory_bytes"]
                                                                   / record["peak_memory_bytes"])
                        del result
                    inputs.hidden.grad, inputs.weight.grad = None, None
                    harness.free_device_memory(device)
                    done(record)
                del anchor
                harness.free_device_memory(device)
        del inputs
        harness.free_device_memory(device)
    return records


def _progress_line(index: int, total: int, record: Dict[str, Any]) -> str:
    config = (f"{record['preset']}/{record['variant']}" if record["preset"]
              else "GEMMs" if record["impl"] == GEMM_FLOOR.name else "logprobs+entropy")
    head = f"[{index}/{total}] policy {record['impl']:<14} B×T={record['B']}×{record['T']:<6} {config:<16}"
    if record["status"] != "ok":
        return f"{head}: {record['status']}: {record['error']}"
    text = f"{head}: {harness.fmt_ms(record['time_ms'])} ms"
    if record.get("peak_memory_bytes") is not None:
        text += f", peak {harness.fmt_gib(record['peak_memory_bytes'])} GiB"
    if record.get("time_vs_fused") is not None:
        text += f", {record['time_vs_fused']:.2f}× fused's time"
    if record.get("time_vs_token_logprobs") is not None:
        text += f", {record['time_vs_token_logprobs']:.2f}× token_logprobs' time"
    if record.get("time_vs_gemm_floor") is not None and record["impl"] != GEMM_FLOOR.name:
        text += f", {record['time_vs_gemm_floor']:.2f}× the GEMM floor"
    if record.get("diff_fused_loss") is not None:
        text += f", |Δloss| {record['diff_fused_loss']:.1e}"
    return text


def _gpu_columns() -> List[harness.Column]:
    C = harness.Column
    pct = lambda value: "—" if value is None else f"{100 * value:.0f}"  # noqa: E731
    return [
        harness.IMPL_COLUMN,
        C("B×T", lambda r: f"{r['B']}×{r['T']}"),
        C("preset", lambda r: r["preset"] or "—"),
        C("variant", lambda r: r["variant"] or "—"),
        harness.STATUS_COLUMN,
        C("fwd+bwd ms", lambda r: harness.fmt_ms(r.get("time_ms"))),
        C("time / fused", lambda r: harness.fmt_num(r.get("time_vs_fused"), 2)),
        C("fused / token_logprobs", lambda r: harness.fmt_num(r.get("time_vs_token_logprobs"), 2)),
        C("time / GEMM floor", lambda r: harness.fmt_num(r.get("time_vs_gemm_floor"), 2)),
        C("peak GiB", lambda r: harness.fmt_gib(r.get("peak_memory_bytes"))),
        C("fused peak / this", lambda r: harness.fmt_num(r.get("fused_memory_fraction"), 2)),
        C("% of bf16 matmul (8·N·D·V)", lambda r: pct(r.get("matmul_fraction"))),
        C("|Δloss| vs fused", lambda r: harness.fmt_err(r.get("diff_fused_loss"))),
        C("d hidden rel", lambda r: harness.fmt_err(r.get("diff_fused_grad_hidden_rel"))),
        C("d weight rel", lambda r: harness.fmt_err(r.get("diff_fused_grad_weight_rel"))),
        C("differs", lambda r: r.get("differs") or ""),
    ]


def _targets(records: Sequence[Dict[str, Any]]) -> List[str]:
    """The issue's targets, read off the records at the target shape (a sentence per configuration)."""
    lines = []
    B, T = TARGET_BT
    at = [r for r in records if r["B"] == B and r["T"] == T and r["status"] == "ok"]
    floor = next((r for r in at if r["impl"] == LOGPROBS_ONLY.name), None)
    for preset in PRESETS:
        for variant in VARIANTS:
            rows = {r["impl"]: r for r in at if r["preset"] == preset and r["variant"] == variant.name}
            fused = rows.get("fused")
            if fused is None:
                continue
            parts = []
            if "liger" in rows:
                parts.append(f"{rows['liger']['time_vs_fused']:.2f}× faster than Liger (target ≥ 2)")
                if rows["liger"].get("fused_memory_fraction") is not None:
                    parts.append(f"peak {rows['liger']['fused_memory_fraction']:.2f}× Liger's (target ≤ 0.5)")
            if "trl" in rows:
                parts.append(f"{rows['trl']['time_vs_fused']:.2f}× faster than TRL-style (target ≥ 3)")
            if floor is not None:
                parts.append(f"{fused['time_ms'] / floor['time_ms']:.2f}× token_logprobs' time (target ≤ 1.10)")
            if fused.get("time_vs_gemm_floor") is not None:
                parts.append(f"{fused['time_vs_gemm_floor']:.2f}× its three bare GEMMs' time")
            if parts:
                lines.append(f"Issue #3 at B×T = {B}×{T}, {preset}/{variant.name}: fused is " + ", ".join(parts) + ".")
    return lines


def run_gpu(ctx: harness.RunContext) -> harness.SuiteReport:
    shapes = gpu_shapes(ctx.quick)
    variants = VARIANTS
    matmul_tflops = harness.reference_matmul_tflops(ctx, GPU_DTYPE)
    impls, skips = harness.split_available(GPU_IMPLEMENTATIONS, ctx.progress)
    records = compare_implementations(shapes, PRESETS, variants, GPU_DTYPE, "cuda", "triton", impls,
                                      harness.CUDA_PROBES, ctx.progress, matmul_tflops,
                                      floor_gemms=harness.FUSED_LOSS_FLOOR_GEMMS)
    dtype_name = harness.dtype_name(GPU_DTYPE)
    return harness.SuiteReport(
        suite="policy", mode="gpu-peers",
        title=f"policy — {ctx.device.name}: FusedPolicyLoss vs Liger, TRL-style and unfused, {dtype_name}, "
              f"D={GPU_HIDDEN}, V={GPU_VOCAB}, forward + backward",
        config={
            "shapes": [vars(shape) for shape in shapes], "dtype": dtype_name, "presets": list(PRESETS),
            "variants": [vars(v) for v in variants], "seed": SEED, "logit_std": LOGIT_STD,
            "old_spread": OLD_SPREAD, "ref_spread": REF_SPREAD, "matmul_tflops": matmul_tflops,
            "matmul_size": harness.MATMUL_REFERENCE_SIZE,
            "flops_convention": f"{FLOPS_PER_NDV}·N·D·V per forward + backward",
            "floor_gemms": list(harness.FUSED_LOSS_FLOOR_GEMMS),
            "implementations": {i.name: {"label": i.label, "note": i.note}
                                for i in (*GPU_IMPLEMENTATIONS, LOGPROBS_ONLY, GEMM_FLOOR)},
            "plot": {"facet": "preset", "series": ["variant", "impl"]},
        },
        records=records, columns=_gpu_columns(), skips=skips,
        notes=_targets(records) + [
            "Each case: one untimed warm-up call (kernel compilation, torch.compile, autotuning), one call for "
            "peak memory and the loss and gradients, then the timing. Forward + backward of the scalar loss; "
            "`token_logprobs` (one row per shape) is log-probs + entropy with random upstream gradients, the "
            "floor the fused loss is held against.",
            "Inputs: hidden [B, T, D] and lm_head weight [V, D] in bfloat16, uniform targets, every token "
            f"counted (mask all ones, so every path does the same work), advantages ~ N(0, 1), old log-probs = "
            f"the policy's own + N(0, {OLD_SPREAD}²), reference log-probs = own + N(0, {REF_SPREAD}²).",
            harness.CUDA_MEMORY_METHOD,
            f"Time: `triton.testing.do_bench` median (L2 flushed before every call; warm-up "
            f"{harness.DO_BENCH_WARMUP_MS} ms, repetitions {harness.DO_BENCH_REP_MS} ms). time / fused: this "
            "path's time over FusedPolicyLoss's for the same configuration (> 1: fused is faster). "
            f"% of bf16 matmul: {FLOPS_PER_NDV}·N·D·V FLOPs / time over a {harness.MATMUL_REFERENCE_SIZE}³ bf16 "
            f"matmul measured in the same run ({matmul_tflops:.0f} TFLOP/s).",
            "|Δloss| vs fused: absolute difference of the loss values; d hidden / d weight rel: max abs gradient "
            "difference from FusedPolicyLoss's over the max abs of FusedPolicyLoss's gradient. A path whose "
            "`differs` column is filled computes another loss, so its difference is not rounding.",
            harness.GEMM_FLOOR_NOTE + " Here the floor is three GEMMs (h·Wᵀ, dz·W, dzᵀ·h): the fused loss forms "
            "dz in its forward, so it needs no logit recompute; `token_logprobs` needs a fourth.",
        ] + [f"`{impl.name}`: {impl.note}" for impl in GPU_IMPLEMENTATIONS if impl.note],
    )


# --- CPU default ------------------------------------------------------------------------------------------

_CPU_BY_NAME = {impl.name: impl for impl in CPU_IMPLEMENTATIONS}


def _cpu_step(name: str, shape: Shape) -> Callable[[], Result]:
    """One implementation's fwd+bwd at ``shape`` (dapo, KL + entropy), after a tiny call that starts the
    thread pools."""
    config = loss_config(CPU_PRESET, CPU_VARIANT)
    forward = _CPU_BY_NAME[name].make()
    loss_step(forward, make_inputs(THREAD_POOL_WARMUP_SHAPE, CPU_DTYPE, "cpu", "torch"), config)()
    return loss_step(forward, make_inputs(shape, CPU_DTYPE, "cpu", "torch"), config)


def measure_cpu_memory(payload: Dict[str, Any]) -> Dict[str, Any]:
    """In a fresh process: the peak memory of one implementation's first full-size fwd+bwd; saves its loss
    and gradients for the comparison."""
    step = _cpu_step(payload["impl"], Shape(**payload["shape"]))
    peak, was_reset, result = harness.cpu_peak_memory(step)
    torch.save(result._asdict(), payload["outputs_path"])
    return {"peak_memory_bytes": peak, "peak_counter_reset": was_reset}


def measure_cpu_times(payload: Dict[str, Any]) -> Dict[str, Any]:
    """In a fresh process: every implementation's time (calls interleaved), then the differences of the
    saved results from FusedPolicyLoss's and from the float64 reference (computed here, so the parent stays
    small)."""
    shape = Shape(**payload["shape"])
    steps = {name: _cpu_step(name, shape) for name in payload["impls"]}
    results: Dict[str, Any] = {name: t.as_record() for name, t in
                               harness.cpu_times_interleaved(steps, CPU_WARMUP_CALLS, CPU_TIMED_CALLS).items()}
    del steps
    expected = float64_reference(make_inputs(shape, CPU_DTYPE, "cpu", "torch"), loss_config(CPU_PRESET, CPU_VARIANT))
    saved = {name: Result(**torch.load(path)) for name, path in payload["outputs_paths"].items()}
    anchor = saved.get("fused")
    for name, result in saved.items():
        results[name]["loss"] = float(result.loss)
        results[name].update(result_diffs(result, expected, "diff_reference"))
        if anchor is not None and name != "fused":
            results[name].update(result_diffs(result, anchor, "diff_fused"))
    return results


def _cpu_columns() -> List[harness.Column]:
    C = harness.Column
    return [
        harness.IMPL_COLUMN,
        C("B×T, D, V", lambda r: f"{r['B']}×{r['T']}, {r['D']}, {r['V']}"),
        harness.STATUS_COLUMN,
        *harness.CPU_TIME_MEMORY_COLUMNS,
        C("|Δloss| vs fused", lambda r: harness.fmt_err(r.get("diff_fused_loss"))),
        C("max abs Δ d hidden vs fused", lambda r: harness.fmt_err(r.get("diff_fused_grad_hidden"))),
        C("d weight vs fused", lambda r: harness.fmt_err(r.get("diff_fused_grad_weight"))),
        C("|Δloss| vs float64", lambda r: harness.fmt_err(r.get("diff_reference_loss"))),
        C("d hidden vs float64", lambda r: harness.fmt_err(r.get("diff_reference_grad_hidden"))),
        C("d weight vs float64", lambda r: harness.fmt_err(r.get("diff_reference_grad_weight"))),
    ]


def run_cpu_default(ctx: harness.RunContext) -> harness.SuiteReport:
    shape = CPU_QUICK_SHAPE if ctx.quick else CPU_SHAPE
    dtype_name = harness.dtype_name(CPU_DTYPE)
    itemsize = torch.empty((), dtype=CPU_DTYPE).element_size()
    records, saved = [], {}
    with tempfile.TemporaryDirectory(prefix="rlloss-bench-policy-") as tmp:
        for impl in CPU_IMPLEMENTATIONS:
            record = base_record(impl, shape, CPU_DTYPE, "cpu", CPU_PRESET, CPU_VARIANT)
            path = Path(tmp) / f"{impl.name}.pt"
            if harness.measure_memory_isolated(record, f"{__name__}:measure_cpu_memory",
                                               {"impl": impl.name, "shape": vars(shape), "outputs_path": str(path)}):
                saved[impl.name] = str(path)
            ctx.progress(f"policy {impl.name}: peak memory in a fresh process: "
                         f"+{harness.fmt_mib(record.get('peak_memory_bytes'))} MiB, {record['status']}")
            records.append(record)
        timed = [r for r in records if r["status"] == "ok"]
        ctx.progress(f"policy {', '.join(r['impl'] for r in timed)}: {CPU_TIMED_CALLS} interleaved timed calls "
                     "each, then the float64 reference, in one fresh process")
        results = harness.run_isolated_or_fail(f"{__name__}:measure_cpu_times",
                                               {"impls": [r["impl"] for r in timed], "shape": vars(shape),
                                                "outputs_paths": saved}, timed)
        if results is not None:
            for record in timed:
                record.update(results[record["impl"]])
    logits_bytes = shape.N * shape.V * itemsize
    harness.add_memory_in_logits_tensors(records, logits_bytes)
    anchor = next((r for r in records if r["impl"] == "fused" and r.get("time_ms")), None)
    for index, record in enumerate(records, start=1):
        if anchor is not None and record is not anchor and record.get("time_ms"):
            record["time_vs_fused"] = record["time_ms"] / anchor["time_ms"]
            if record.get("peak_memory_bytes"):
                record["fused_memory_fraction"] = anchor["peak_memory_bytes"] / record["peak_memory_bytes"]
        ctx.progress(_progress_line(index, len(records), record))
    config = loss_config(CPU_PRESET, CPU_VARIANT)
    return harness.SuiteReport(
        suite="policy", mode="cpu-default",
        title=f"policy — CPU default: {shape}, {dtype_name}, {CPU_PRESET} with KL and entropy, forward + backward",
        config={
            "shape": vars(shape), "dtype": dtype_name, "preset": CPU_PRESET, "variant": vars(CPU_VARIANT),
            "loss_config": repr(config), "warmup_calls": CPU_WARMUP_CALLS, "timed_calls": CPU_TIMED_CALLS,
            "seed": SEED, "logit_std": LOGIT_STD, "old_spread": OLD_SPREAD, "ref_spread": REF_SPREAD,
            "logits_tensor_bytes": logits_bytes, "input_grad_bytes": (shape.N + shape.V) * shape.D * itemsize,
            "diff_reference": "FusedPolicyLoss(backend='reference') on float64 copies of the inputs",
        },
        records=records, columns=_cpu_columns(),
        notes=[
            f"The `{CPU_PRESET}` preset with β = {CPU_VARIANT.beta} (k3 KL to reference log-probs) and entropy "
            f"bonus c_H = {CPU_VARIANT.entropy_coef}; every token counted; old log-probs = the policy's own + "
            f"N(0, {OLD_SPREAD}²), reference = own + N(0, {REF_SPREAD}²). `fused` and `unfused` are the chunked "
            "torch backend (never an [N, V] tensor); `trl` materialises the float32 logits and autograd keeps "
            f"several [N, V] tensors. One float32 [N, V] tensor here is {harness.fmt_mib(logits_bytes)} MiB; the "
            f"input gradients every path returns are {harness.fmt_mib((shape.N + shape.V) * shape.D * itemsize)} MiB.",
            harness.CPU_MEMORY_METHOD,
            f"Time: median of {CPU_TIMED_CALLS} calls after {CPU_WARMUP_CALLS} warm-up call in one fresh process "
            "with the default allocator, the implementations' calls interleaved; "
            f"{torch.get_num_threads()} torch threads. A CPU time is not a statement about the Triton kernels.",
            "vs fused: absolute differences of the loss and max abs differences of the gradients from "
            "FusedPolicyLoss's; vs float64: from FusedPolicyLoss on the reference backend in float64.",
        ],
    )


# --- pytest-benchmark cases (benchmarks/test_policy_bench.py) ---------------------------------------------


@dataclass(frozen=True)
class BenchCase:
    impl: Implementation
    shape: Shape
    dtype: torch.dtype
    device: str
    preset: str
    variant: Variant

    @property
    def id(self) -> str:
        return f"{self.impl.name}-{self.preset}-{self.variant.name}-B{self.shape.B}-T{self.shape.T}-V{self.shape.V}"


def bench_cases(device: str, quick: bool) -> List[BenchCase]:
    """The CPU default (or quick) case on CPU; the first GPU shape, both presets with KL and entropy, on CUDA."""
    if device == "cuda":
        shape = gpu_shapes(quick=True)[0]
        return [BenchCase(impl, shape, GPU_DTYPE, device, preset, KL_ENTROPY)
                for preset in PRESETS for impl in GPU_IMPLEMENTATIONS]
    shape = CPU_QUICK_SHAPE if quick else CPU_SHAPE
    return [BenchCase(impl, shape, CPU_DTYPE, device, CPU_PRESET, CPU_VARIANT) for impl in CPU_IMPLEMENTATIONS]


def bench_step(case: BenchCase) -> Callable[[], None]:
    """One synchronised forward + backward of ``case``, after an untimed warm-up call."""
    backend = "triton" if case.device == "cuda" else "torch"
    step = loss_step(case.impl.make(), make_inputs(case.shape, case.dtype, case.device, backend),
                     loss_config(case.preset, case.variant))
    return harness.synchronised(step, case.device)


# --- the suite ----------------------------------------------------------------------------------------------


SUITE = Suite(
    name="policy",
    description="FusedPolicyLoss fwd+bwd (dapo/gspo, ±KL+entropy): CPU vs TRL-style and unfused; GPU also vs Liger "
                "and the 3-GEMM cuBLAS floor",
    run_cpu=run_cpu_default, run_gpu=run_gpu,
)
