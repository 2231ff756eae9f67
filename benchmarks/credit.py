"""Suite ``credit``: the contrastive-teacher credit of docs/math.md §7 (CEPO / RLSD): the teacher's read-out
(``token_logprobs`` under ``no_grad`` vs materialised logits) and ``FusedPolicyLoss`` with the credit formed in its
kernel, vs ``contrastive_credit`` first and vs no credit. CPU float32; GPU bfloat16, B×T=8×4096, D=4096, V=151936.
"""
from __future__ import annotations

import tempfile
from typing import Any, Dict, List

import torch

import rlloss
from rlloss import reference

from . import _core as core

DESCRIPTION = "contrastive credit: teacher read-out (streaming vs materialised logits); loss with vs without credit"
Shape = core.BatchShape
# The torch backend streams over [rows, vocab] tiles of 2²² elements: the teacher shape holds several.
CPU_TEACHER_SHAPE, CPU_LOSS_SHAPE = Shape(B=4, T=256, D=128, V=32000), Shape(B=2, T=256, D=128, V=16384)
CPU_QUICK_TEACHER_SHAPE, CPU_QUICK_LOSS_SHAPE = Shape(B=2, T=128, D=64, V=16384), Shape(B=2, T=64, D=64, V=4096)
CPU_WARMUP_CALLS, CPU_TIMED_CALLS, TINY_SHAPE = 1, 3, Shape(B=1, T=16, D=16, V=256)
GPU_SHAPE, GPU_QUICK_SHAPE = Shape(B=8, T=4096, D=4096, V=151936), Shape(B=2, T=4096, D=4096, V=151936)
GPU_DTYPE = torch.bfloat16
GPU_BACKEND, GPU_REFERENCE_ROWS = "triton", 256  # teacher rows checked against float64 log-probs of the inputs
LOGIT_STD, TEACHER_SPREAD, SEED = 2.0, 0.5, 0  # std of ℓ± − ℓ°: the clip is hit on some tokens
LOSS_PRESET = "verl_dapo"  # the CEPO setting of docs/math.md §7: ε 0.2 / 0.28, dual clip 3, token-mean, no KL
TEACHER = (core.Case("rlloss", "subject", "token_logprobs under no_grad (streaming, no [N, V] tensor, no graph)"),
           core.Case("naive", "baseline", "no_grad: logits = h·Wᵀ, float32 log_softmax, gather"))
LOSS = (core.Case("fused-credit", "subject", "FusedPolicyLoss(credit='cepo'): Â formed inside the loss kernel"),
        core.Case("credit-then-fused", "peer", "contrastive_credit → [B, T] Â → FusedPolicyLoss without credit"),
        core.Case("fused-no-credit", "baseline", "FusedPolicyLoss without credit (plain GRPO advantages)"))


def make_inputs(shape: Shape, dtype: torch.dtype, device: str, backend=None) -> Dict[str, torch.Tensor]:
    """The teacher's (``backend`` None: hidden [N, D] without grad) or the loss's inputs (sequences of varying
    length, on-policy old log-probs, teacher log-probs ℓ± = ℓ° + noise)."""
    lead = (shape.N,) if backend is None else (shape.B, shape.T)
    x, randn, gen = core.lm_head_inputs(lead, shape.D, shape.V, dtype, device, LOGIT_STD, backend is not None, SEED)
    if backend is None:
        return x
    lengths = torch.randint(shape.T // 2, shape.T + 1, (shape.B,), generator=gen, device=device)
    x["mask"] = torch.arange(shape.T, device=device)[None, :] < lengths[:, None]
    x["advantages"] = randn(shape.B)
    with torch.no_grad():
        x["old"] = rlloss.token_logprobs(x["hidden"], x["weight"], torch.where(x["mask"], x["targets"], -100),
                                         backend=backend).logprobs
    x["pos"], x["neg"] = (x["old"] + TEACHER_SPREAD * randn(shape.B, shape.T) for _ in "pn")
    return x


def teacher_step(impl: str, x, backend: str):
    def step():
        with torch.no_grad():
            if impl == "rlloss":
                return rlloss.token_logprobs(x["hidden"], x["weight"], x["targets"], backend=backend).logprobs
            logp = torch.log_softmax((x["hidden"] @ x["weight"].T).float(), dim=-1)
            return logp.gather(1, x["targets"][:, None]).squeeze(1)
    return step


def loss_config(credit: bool) -> rlloss.LossConfig:
    config = rlloss.LossConfig.preset(LOSS_PRESET)
    return config.replace(credit="cepo", credit_lambda=0.5, credit_eps_w=0.2) if credit else config


def loss_step(impl: str, x, backend: str):
    """One forward + backward of the policy loss; input gradients reset first."""
    credit, loss_fn = loss_config(True), rlloss.FusedPolicyLoss(loss_config(impl == "fused-credit"), backend=backend)

    def step():
        x["hidden"].grad = x["weight"].grad = None
        advantages, teacher = x["advantages"], {}
        if impl == "fused-credit":
            teacher = {"pos_logprobs": x["pos"], "neg_logprobs": x["neg"]}
        elif impl == "credit-then-fused":
            advantages = rlloss.contrastive_credit(advantages, x["mask"], x["pos"], neg_logprobs=x["neg"],
                                                   lam=credit.credit_lambda, eps_w=credit.credit_eps_w,
                                                   backend=backend)
        out = loss_fn(x["hidden"], x["weight"], x["targets"], x["mask"], advantages, old_logprobs=x["old"], **teacher)
        out.loss.backward()
        return out.loss.detach()
    return step


def teacher_reference(x, rows=None) -> torch.Tensor:
    with torch.no_grad():
        return reference.token_logprobs(x["hidden"][:rows].double(), x["weight"].detach().double(),
                                        x["targets"][:rows])[0]


def reference_loss(x) -> float:
    """The float64 value of the loss with the credit (docs/math.md §3–§7), through [N, V] logits."""
    with torch.no_grad():
        d = {k: v.double() if v.is_floating_point() else v for k, v in x.items()}
        logprobs, _ = reference.token_logprobs(d["hidden"], d["weight"], torch.where(x["mask"], x["targets"], -100))
        return float(reference.policy_loss(logprobs, d["old"], d["advantages"], x["mask"], config=loss_config(True),
                                           pos_logprobs=d["pos"], neg_logprobs=d["neg"])[0])


def base_record(case: core.Case, part: str, backend: str, shape: Shape, dtype, device: str) -> Dict[str, Any]:
    """A record of the teacher or the loss ``part``: the teacher's rlloss named for its backend, a loss's label
    naming it."""
    return {"case": part, "impl": f"rlloss-{backend}" if case.name == "rlloss" else case.name, "role": case.role,
            "label": case.label if part == "teacher" else f"{case.label}, backend={backend!r}", **vars(shape),
            "N": shape.N, "dtype": core.dtype_name(dtype), "device": device, "status": "ok", "error": None}


TEACHER_NOTE = ("Teacher pass: final hidden states of the completion tokens (as after `TeacherInputs.gather_hidden`) → "
                "their log-probs, forward only; `naive` materialises the logits.")
LOSS_NOTE = ("Policy loss: `FusedPolicyLoss` forward + backward (`verl_dapo`), gradients w.r.t. hidden states and "
             "lm_head weight")
COLUMNS = [
    ("case", lambda r: "teacher pass (fwd only)" if r["case"] == "teacher" else "policy loss fwd+bwd"), core.IMPL,
    core.BTDV, core.STATUS, core.col("ms (median)", "time_ms", core.MS), core.spread("low–high ms"),
    core.col("peak memory beyond inputs (MiB)", "peak_memory_bytes", *core.MIB_COL),
    core.col("= [N, V] fp32 tensors", "peak_memory_in_logits_tensors", ".2f"),
    core.col("max abs diff vs reference", "diff_reference", core.ERR),
    ("vs rlloss / fused-credit", lambda r: core.fmt(
        r.get("diff_rlloss") if r.get("diff_rlloss") is not None else r.get("diff_fused_credit"), core.ERR)),
]

# --- CPU default --------------------------------------------------------------------------------------------


def cpu_step(payload: Dict[str, Any]):
    """A teacher read-out at ``payload["shape"]``, after a tiny one that starts the thread pools."""
    teacher_step(payload["impl"], make_inputs(TINY_SHAPE, torch.float32, "cpu"), "torch")()
    return teacher_step(payload["impl"], make_inputs(Shape(**payload["shape"]), torch.float32, "cpu"), "torch")


def cpu_times(payload: Dict[str, Any]) -> Dict[str, Any]:
    """In a fresh process: the interleaved times of the teacher cases, then of the loss cases, their loss values,
    and the teacher log-probs the memory processes saved against the float64 reference."""
    results = {f"teacher/{k}": v for k, v in core.cpu_times_interleaved(
        {c.name: cpu_step({"impl": c.name, "shape": payload["shape"]}) for c in TEACHER},
        CPU_WARMUP_CALLS, CPU_TIMED_CALLS).items()}
    expected = teacher_reference(make_inputs(Shape(**payload["shape"]), torch.float32, "cpu"))
    for impl, path in payload["outputs_paths"].items():
        results[f"teacher/{impl}"]["diff_reference"] = core.max_abs_diff(torch.load(path), expected)
    x = make_inputs(Shape(**payload["loss_shape"]), torch.float32, "cpu", "torch")
    steps = {c.name: loss_step(c.name, x, "torch") for c in LOSS}
    expected = reference_loss(x)
    for impl, timed in core.cpu_times_interleaved(steps, CPU_WARMUP_CALLS, CPU_TIMED_CALLS).items():
        timed["loss"] = float(steps[impl]())
        if impl != "fused-no-credit":
            timed["diff_reference"] = abs(timed["loss"] - expected)
        results[f"loss/{impl}"] = timed
    return results


def run_cpu(ctx: core.RunContext) -> core.Report:
    shape, loss_shape = (CPU_QUICK_TEACHER_SHAPE, CPU_QUICK_LOSS_SHAPE) if ctx.quick else (CPU_TEACHER_SHAPE,
                                                                                           CPU_LOSS_SHAPE)
    records = {f"{part}/{c.name}": base_record(c, part, "torch", s, torch.float32, "cpu")
               for part, cases, s in (("teacher", TEACHER, shape), ("loss", LOSS, loss_shape)) for c in cases}
    with tempfile.TemporaryDirectory(prefix="rlloss-bench-credit-") as tmp:
        teacher = {c.name: records[f"teacher/{c.name}"] for c in TEACHER}
        saved = core.measure_memory(__name__, teacher, {"shape": vars(shape), "tmp": tmp}, ctx.progress)
        try:
            times = core.run_isolated(f"{__name__}:cpu_times", {"shape": vars(shape), "loss_shape": vars(loss_shape),
                                                                "outputs_paths": saved})
        except RuntimeError as exc:
            times = {}
            for record in (r for r in records.values() if r["status"] == "ok"):
                core.failure(record, exc)
    done = core.counter("credit", ("case", "B", "T", "V"), len(records), ctx.progress)
    for key, record in records.items():
        record.update(times.get(key, {}))
        done(record)
    logits_bytes = shape.N * shape.V * 4
    core.add_memory_in_logits_tensors(list(records.values()), logits_bytes)
    return core.Report(
        "credit", "cpu-default", "credit — CPU default: float32, teacher read-out and policy loss with credit", {
            "teacher_shape": vars(shape), "loss_shape": vars(loss_shape), "dtype": "float32",
            "warmup_calls": CPU_WARMUP_CALLS, "timed_calls": CPU_TIMED_CALLS, "seed": SEED, "logit_std": LOGIT_STD,
            "teacher_spread": TEACHER_SPREAD, "loss_preset": LOSS_PRESET, "logits_tensor_bytes": logits_bytes},
        list(records.values()), COLUMNS, notes=[
            TEACHER_NOTE + " `rlloss-torch` streams over the vocabulary in chunks (no [N, V] tensor, no autograd "
            f"graph although the weight requires grad). One float32 [N, V] tensor here is {core.fmt_mib(logits_bytes)}"
            " MiB. max abs diff: log-probs against `rlloss.reference` in float64.",
            LOSS_NOTE + f", random [B] advantages, on-policy old log-probs, teacher log-probs ℓ± = ℓ° + N(0, "
            f"{TEACHER_SPREAD}²); max abs diff of the two credit paths: the loss against the float64 reference.",
            core.cpu_memory_note(call="teacher read-out"),
            core.cpu_time_note(CPU_WARMUP_CALLS, CPU_TIMED_CALLS) + " The teacher and the loss cases are two "
            "comparisons, each interleaved.",
        ])


# --- GPU ----------------------------------------------------------------------------------------------------


def run_gpu(ctx: core.RunContext) -> core.Report:
    shape, device, probes = GPU_QUICK_SHAPE if ctx.quick else GPU_SHAPE, ctx.device.type, core.CUDA_PROBES
    done = core.counter("credit", ("case",), len(TEACHER) + len(LOSS), ctx.progress)
    expected: List[torch.Tensor] = []

    def teacher_inputs():
        x = make_inputs(shape, GPU_DTYPE, device)
        expected.append(teacher_reference(x, GPU_REFERENCE_ROWS))
        return x

    records = core.measure_cases(
        TEACHER, lambda c: base_record(c, "teacher", GPU_BACKEND, shape, GPU_DTYPE, device), teacher_inputs,
        lambda c, x: teacher_step(c.name, x, GPU_BACKEND), probes, device, done,
        lambda record, out, anchor: record.update(diff_rlloss=core.max_abs_diff(out, anchor)),
        lambda record, out: {"diff_reference": core.max_abs_diff(out[:GPU_REFERENCE_ROWS], expected[0])})
    records += core.measure_cases(
        LOSS, lambda c: base_record(c, "loss", GPU_BACKEND, shape, GPU_DTYPE, device),
        lambda: make_inputs(shape, GPU_DTYPE, device, GPU_BACKEND), lambda c, x: loss_step(c.name, x, GPU_BACKEND),
        probes, device, done, lambda record, out, anchor: record.update(diff_fused_credit=core.max_abs_diff(
            out, anchor)) if record["impl"] == "credit-then-fused" else None, lambda record, out: {"loss": float(out)})
    core.add_memory_in_logits_tensors(records, shape.N * shape.V * 4)
    return core.Report(
        "credit", "gpu", f"credit — {ctx.device.name}: {shape}, bfloat16, teacher read-out and loss with credit", {
            "shape": vars(shape), "dtype": "bfloat16", "seed": SEED, "logit_std": LOGIT_STD,
            "teacher_spread": TEACHER_SPREAD, "loss_preset": LOSS_PRESET, "reference_rows": GPU_REFERENCE_ROWS,
            "logits_tensor_bytes_fp32": shape.N * shape.V * 4},
        records, COLUMNS, notes=[
            TEACHER_NOTE + f" `naive` holds bf16 logits and their float32 log_softmax. max abs diff vs reference: "
            f"the first {GPU_REFERENCE_ROWS} tokens against float64 log-probs of the same bf16 inputs; the JSON's "
            "`diff_rlloss`: naive against rlloss on all tokens.",
            LOSS_NOTE + "; `credit-then-fused` includes the separate `contrastive_credit` launch and its [B, T] "
            "tensor; the JSON's `diff_fused_credit`: its loss against `fused-credit`'s.",
            core.CUDA_CASE_NOTE, core.CUDA_MEMORY_METHOD, core.CUDA_TIME_NOTE,
        ])
