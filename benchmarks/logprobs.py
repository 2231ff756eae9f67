"""Suite ``logprobs``: ``rlloss.token_logprobs`` forward + backward (log-probs and entropy, random upstream
gradients) against materialised logits; on a GPU also ``torch.compile`` of them, Cut Cross-Entropy, Liger-Kernel,
TFLOP/s against the measured bf16 matmul and a floor row per shape (the four bare cuBLAS GEMMs).
"""
from __future__ import annotations

import itertools
from typing import Any, Dict

import torch

import rlloss
from rlloss import reference

from . import _core as core

DESCRIPTION = ("token_logprobs fwd+bwd (logprobs + entropy): CPU torch backend vs naive; GPU triton vs peers "
               "and the 4-GEMM cuBLAS floor (time / floor)")
CPU_SHAPE, CPU_QUICK_SHAPE, CPU_DTYPE = dict(N=2048, D=256, V=32000), dict(N=1024, D=128, V=16384), torch.float32
CPU_WARMUP_CALLS, CPU_TIMED_CALLS = 1, 3
TINY_SHAPE = dict(N=64, D=32, V=1000)  # run once before the inputs are built: thread pools exist before memory
GPU_HIDDEN, GPU_DTYPE = 4096, torch.bfloat16
GPU_GRID = {False: ((2048, 8192, 32768), (32000, 131072, 151936)), True: ((2048, 8192), (32000, 151936))}
GPU_REFERENCE_ROWS = 256  # rows of every GPU case checked against float32 logits (cheap: [rows, V])
# Nominal FLOPs of forward + backward per (token, hidden, vocab): logits, dh, dW and one recompute, 2 each; the
# same count for every implementation (naive does 6, rlloss 8), so TFLOP/s is a rescaled speed.
FLOPS_PER_NDV = 8
LOGIT_STD, SEED = 2.0, 0  # weight scaled for logits of this std (peaked, as a trained model's)
NO_ENTROPY, UNIFORM_UPSTREAM = ("cce", "cce-exact", "liger"), ("liger",)


def make_inputs(shape: Dict[str, int], dtype: torch.dtype, device: str) -> Dict[str, torch.Tensor]:
    x, randn, _ = core.lm_head_inputs((shape["N"],), shape["D"], shape["V"], dtype, device, LOGIT_STD, seed=SEED)
    return {**x, "grad_logprobs": randn(shape["N"]), "grad_entropy": randn(shape["N"])}


def fwd_bwd(case: core.Case, x: Dict[str, torch.Tensor], with_grads: bool = True):
    """One forward + backward with the inputs' upstream gradients (−1 everywhere for a peer whose backward takes
    only a uniform one); the input gradients reset first. The step hands back the outputs (the gradients only
    ``with_grads``: they would keep a second set alive while timing)."""
    forward = case.make()
    grad_logprobs = -torch.ones_like(x["grad_logprobs"]) if case.name in UNIFORM_UPSTREAM else x["grad_logprobs"]

    def step():
        x["hidden"].grad = x["weight"].grad = None
        logprobs, entropy = forward(x["hidden"], x["weight"], x["targets"])
        tensors, grads = [logprobs], [grad_logprobs.to(logprobs.dtype)]
        if entropy is not None:
            tensors.append(entropy)
            grads.append(x["grad_entropy"].to(entropy.dtype))
        torch.autograd.backward(tensors, grads)
        out = {"logprobs": logprobs.detach(), "entropy": None if entropy is None else entropy.detach()}
        return {**out, "grad_hidden": x["hidden"].grad, "grad_weight": x["weight"].grad} if with_grads else out

    return step


def naive(hidden, weight, targets):
    """Full [N, V] logits in the input dtype, float32 log_softmax, gather, entropy, autograd through all of it."""
    logp = torch.log_softmax((hidden @ weight.T).float(), dim=-1)
    return logp.gather(1, targets[:, None]).squeeze(1), -(logp.exp() * logp).sum(-1)


def rlloss_case(backend: str, max_scratch_bytes=None, suffix: str = "") -> core.Case:
    """``max_scratch_bytes`` None: the default chunk bound; on a GPU a larger one makes the weight-gradient GEMM
    compute bound (docs/design/logprobs.md), hence the 1 GiB variant."""
    def make():
        def forward(hidden, weight, targets):
            out = rlloss.token_logprobs(hidden, weight, targets, return_entropy=True, backend=backend,
                                        max_scratch_bytes=max_scratch_bytes)
            return out.logprobs, out.entropy
        return forward

    scratch = "" if max_scratch_bytes is None else f", max_scratch_bytes={max_scratch_bytes}"
    return core.Case(f"rlloss-{backend}{suffix}", "subject", f"rlloss.token_logprobs, backend={backend!r}{scratch}",
                     make)


def compiled_naive():
    import torch._dynamo

    torch._dynamo.reset()  # fresh graph cache per shape: no recompile limit, no fallback to eager
    return torch.compile(naive, dynamic=False)


def cce(impl: str):
    def make():
        from cut_cross_entropy import linear_cross_entropy

        return lambda h, w, t: (-linear_cross_entropy(h, w, t, reduction="none", impl=impl), None)
    return make


def liger():
    from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss

    loss_fn = LigerFusedLinearCrossEntropyLoss(reduction="none")

    def forward(hidden, weight, targets):
        out = loss_fn(weight, hidden, targets)  # Liger takes the weight first
        out = out.loss if hasattr(out, "loss") else out[0] if isinstance(out, tuple) else out
        return -out, None
    return forward


def naive_case(dtype: torch.dtype) -> core.Case:
    logits = "float32 logits" if dtype == torch.float32 else f"{core.dtype_name(dtype)} logits → float32"
    return core.Case("naive", "baseline", f"materialised [N, V] {logits} log_softmax, autograd", lambda: naive)


CCE_NOTE = "returns −log p only (no entropy)"
CCE_MISSING = core.import_error("cut_cross_entropy", "cut-cross-entropy")
GEMM_FLOOR = core.Case("gemm-floor", "floor", "bare cuBLAS GEMMs: h·Wᵀ, h·Wᵀ (recompute), dz·W, dzᵀ·h",
                       note="torch.mm into preallocated outputs, the inputs' dtype")
CPU_CASES = (rlloss_case("torch"), naive_case(CPU_DTYPE))
GPU_CASES = (
    rlloss_case("triton"), rlloss_case("triton", 1 << 30, "-1GiB"), naive_case(GPU_DTYPE),
    core.Case("naive-compile", "baseline", "torch.compile(naive), dynamic=False", compiled_naive,
              note="compile and autotuning happen in the untimed warm-up call"),
    core.Case("cce", "peer", "cut_cross_entropy.linear_cross_entropy(impl='cce')", cce("cce"), CCE_MISSING,
              CCE_NOTE + "; gradient filtering on (filter_eps='auto'): approximate gradients"),
    core.Case("cce-exact", "peer", "cut_cross_entropy.linear_cross_entropy(impl='cce_exact')", cce("cce_exact"),
              CCE_MISSING, CCE_NOTE + "; no gradient filtering"),
    core.Case("liger", "peer", "liger_kernel LigerFusedLinearCrossEntropyLoss(reduction='none')", liger,
              core.import_error("liger_kernel.transformers.fused_linear_cross_entropy", "liger-kernel"),
              "returns −log p only (no entropy); computes its gradients inside the forward; backward is "
              "nll.sum().backward() (uniform upstream gradient), because Liger's reduction='none' backward has "
              "scaled its precomputed gradients by a single upstream value in released versions"),
)


def base_record(case: core.Case, shape: Dict[str, int], dtype: torch.dtype, device: str) -> Dict[str, Any]:
    return core.record(case, note=case.note, **shape, dtype=core.dtype_name(dtype), device=device,
                       outputs="logprobs only" if case.name in NO_ENTROPY else "logprobs+entropy",
                       upstream_grad="uniform (nll.sum())" if case.name in UNIFORM_UPSTREAM else "random",
                       flops=FLOPS_PER_NDV * shape["N"] * shape["D"] * shape["V"])


# --- CPU default: memory per case in fresh processes, times in one more -------------------------------------


def cpu_step(payload: Dict[str, Any]):
    """The case ``payload["impl"]`` at ``payload["shape"]``, after a tiny-shape call that starts the thread pools."""
    case = next(c for c in CPU_CASES if c.name == payload["impl"])
    fwd_bwd(case, make_inputs(TINY_SHAPE, CPU_DTYPE, "cpu"))()
    return fwd_bwd(case, make_inputs(payload["shape"], CPU_DTYPE, "cpu"))


def cpu_check(payload: Dict[str, Any], results: Dict[str, Any]) -> None:
    """The saved outputs against ``rlloss.reference`` on float64 copies of the inputs, same upstream gradients."""
    x = make_inputs(payload["shape"], CPU_DTYPE, "cpu")
    hidden, weight = (x[k].detach().double().requires_grad_() for k in ("hidden", "weight"))
    logprobs, entropy = reference.token_logprobs(hidden, weight, x["targets"])
    torch.autograd.backward([logprobs, entropy], [x["grad_logprobs"].double(), x["grad_entropy"].double()])
    expected = {"logprobs": logprobs.detach(), "entropy": entropy.detach(), "grad_hidden": hidden.grad,
                "grad_weight": weight.grad}
    for name, path in payload["outputs_paths"].items():
        if name in results:
            results[name].update(core.diffs(torch.load(path), expected, "diff"))


def run_cpu(ctx: core.RunContext) -> core.Report:
    shape = CPU_QUICK_SHAPE if ctx.quick else CPU_SHAPE
    N, D, V = shape["N"], shape["D"], shape["V"]
    rows = core.measure_cpu_isolated(__name__, {c.name: base_record(c, shape, CPU_DTYPE, "cpu") for c in CPU_CASES},
                                     {"shape": shape}, ctx.progress, CPU_WARMUP_CALLS, CPU_TIMED_CALLS, ("N", "D", "V"))
    for record in rows:
        if record.get("time_ms"):
            record["gflops_per_s"] = record["flops"] / (record["time_ms"] * 1e-3) / 1e9
    logits_bytes, grad_bytes = N * V * 4, (N + V) * D * 4
    core.add_memory_in_logits_tensors(rows, logits_bytes)
    return core.Report(
        "logprobs", "cpu-default", f"logprobs — CPU default: N={N} D={D} V={V}, float32, forward + backward, "
        "logprobs and entropy", {
            "shape": shape, "dtype": "float32", "warmup_calls": CPU_WARMUP_CALLS, "timed_calls": CPU_TIMED_CALLS,
            "seed": SEED, "logit_std": LOGIT_STD, "logits_tensor_bytes": logits_bytes,
            "input_bytes": grad_bytes + N * 8 + 2 * N * 4, "input_grad_bytes": grad_bytes,
            "nominal_flops": FLOPS_PER_NDV * N * D * V, "diff_reference": "float64 rlloss.reference, autograd"},
        rows, [core.IMPL, ("N × D × V", lambda r: f"{r['N']} × {r['D']} × {r['V']}"), core.STATUS,
               *core.CPU_TIME_MEMORY_COLUMNS, core.col("max abs diff logprobs", "diff_logprobs", core.ERR),
               core.col("entropy", "diff_entropy", core.ERR),
               core.col("d hidden", "diff_grad_hidden", core.ERR),
               core.col("d weight", "diff_grad_weight", core.ERR)],
        notes=[
            "`rlloss-torch` is the chunked torch backend (never an [N, V] tensor), `naive` materialises [N, V] "
            f"logits and autograd keeps several. One float32 [N, V] tensor here is {core.fmt_mib(logits_bytes)} MiB; "
            f"the input gradients both return are {core.fmt_mib(grad_bytes)} MiB. Inputs: hidden ~ N(0, 1), weight "
            f"scaled for logits of std {LOGIT_STD}, uniform targets, seed {SEED}.",
            core.CPU_MEMORY_METHOD, core.cpu_time_note(CPU_WARMUP_CALLS, CPU_TIMED_CALLS),
            "max abs diff: against `rlloss.reference` in float64 on the same inputs and upstream gradients.",
        ])


# --- GPU comparison ----------------------------------------------------------------------------------------


def run_gpu(ctx: core.RunContext) -> core.Report:
    tokens, vocabs, device = *GPU_GRID[ctx.quick], ctx.device.type
    shapes = [dict(N=N, D=GPU_HIDDEN, V=V) for V, N in itertools.product(vocabs, tokens)]
    matmul_tflops = core.reference_matmul_tflops(ctx, GPU_DTYPE)
    cases, skips = core.split_available(GPU_CASES, ctx.progress)
    done = core.counter("logprobs", ("N", "V"), len(shapes) * (len(cases) + 1), ctx.progress)
    rows, records = GPU_REFERENCE_ROWS, []

    def rates(record: Dict[str, Any], outputs) -> Dict[str, Any]:
        core.add_rates(record, matmul_tflops)
        return {"diff_ref_rows_logprobs": core.max_abs_diff(outputs["logprobs"][:rows], reference_rows[0]),
                "diff_ref_rows_entropy": core.max_abs_diff(
                    None if outputs["entropy"] is None else outputs["entropy"][:rows], reference_rows[1])}

    def inputs():
        nonlocal reference_rows
        x = make_inputs(shape, GPU_DTYPE, device)
        with torch.no_grad():  # float32 logits of the first rows of the (rounded) inputs
            reference_rows = naive(x["hidden"][:rows].float(), x["weight"].float(), x["targets"][:rows])
        return x

    for shape in shapes:
        reference_rows = None
        floor = core.floor_row({**base_record(GEMM_FLOOR, shape, GPU_DTYPE, device), "outputs": "GEMMs only"},
                               *shape.values(), GPU_DTYPE, device, core.LOGPROBS_FLOOR_GEMMS, done, matmul_tflops)
        measured = core.measure_cases(
            cases, lambda case: base_record(case, shape, GPU_DTYPE, device), inputs,
            lambda case, x: fwd_bwd(case, x, with_grads=False), core.CUDA_PROBES, device, done,
            lambda record, out, anchor: record.update(core.diffs(out, anchor, "diff_rlloss")), rates)
        core.add_floor_ratios([floor, *measured], floor)
        records += [floor, *measured]
    return core.Report(
        "logprobs", "gpu-peers", f"logprobs — {ctx.device.name}: bfloat16, D={GPU_HIDDEN}, forward + backward", {
            "shapes": shapes, "dtype": "bfloat16", "seed": SEED, "logit_std": LOGIT_STD,
            "matmul_tflops": matmul_tflops, "matmul_size": core.MATMUL_REFERENCE_SIZE,
            "flops_convention": f"{FLOPS_PER_NDV}·N·D·V per forward + backward", "reference_rows": rows,
            "floor_gemms": list(core.LOGPROBS_FLOOR_GEMMS),
            "implementations": {c.name: {"label": c.label, "note": c.note} for c in (*GPU_CASES, GEMM_FLOOR)}},
        records, [
            core.IMPL, core.col("N", "N"), core.col("V", "V"), core.col("outputs", "outputs"), core.STATUS,
            core.col("fwd+bwd ms", "time_ms", core.MS), core.col("TFLOP/s (8·N·D·V)", "tflops", ".1f"),
            core.col("% of bf16 matmul", "matmul_fraction", *core.PCT),
            core.col("time / GEMM floor", "time_vs_gemm_floor", ".2f"),
            core.col("peak memory (GiB)", "peak_memory_bytes", *core.GIB_COL),
            core.col("max abs diff logprobs vs rlloss", "diff_rlloss_logprobs", core.ERR),
            core.col("entropy vs rlloss", "diff_rlloss_entropy", core.ERR),
            core.col(f"logprobs vs fp32 ref ({rows} rows)", "diff_ref_rows_logprobs", core.ERR)],
        skips, notes=[
            core.CUDA_CASE_NOTE + " Random upstream gradients of every output a case returns (peers: log-probs "
            "only).", core.CUDA_MEMORY_METHOD, core.CUDA_TIME_NOTE,
            f"TFLOP/s counts {FLOPS_PER_NDV}·N·D·V FLOPs for every implementation (logits, d hidden, d weight, one "
            "logit recompute, 2·N·D·V each; naive really does 6, rlloss's kernels 10): a rescaled speed. % of bf16 "
            f"matmul: of a {core.MATMUL_REFERENCE_SIZE}³ torch.matmul in the same run, {matmul_tflops:.0f} TFLOP/s.",
            "Peers compute cross-entropy: −log p (negated here), no entropy. vs rlloss: max abs difference from "
            f"rlloss's over all tokens; vs fp32 ref: the first {rows} tokens against float32 logits of the same "
            "bf16 inputs.",
            core.GEMM_FLOOR_NOTE + " Here four GEMMs (h·Wᵀ, h·Wᵀ again for the backward's recompute, dz·W, dzᵀ·h): "
            "exactly the 8·N·D·V FLOPs of the convention, so its TFLOP/s is the GEMMs' real rate.",
        ] + [f"`{c.name}`: {c.note}" for c in GPU_CASES if c.note])
