"""Suite ``credit``: the contrastive-teacher credit of docs/math.md §7 (CEPO / RLSD).

Two comparisons:

``teacher``  the teacher pass's read-out, forward only: final hidden states at the completion positions →
             gathered log-probs. ``rlloss.token_logprobs`` under ``torch.no_grad()`` (streaming over the
             vocabulary, no [N, V] tensor, no autograd graph) against the materialised baseline (logits in the
             input dtype, float32 log_softmax, gather). The gather of the [R, L, D] decoder output to the
             completion rows is the same for both and not timed.
``loss``     ``FusedPolicyLoss`` forward + backward with the credit formed inside its kernel
             (``LossConfig(credit="cepo")`` and the teacher log-probs) against the same loss without credit,
             and against the credit computed first as a [B, T] tensor (``contrastive_credit``) and passed as
             per-token advantages.

CPU default (no GPU): float32, the ``torch`` backend; the teacher read-out at B×T = 4×256, D = 128, V = 32000
(each case's peak memory in a fresh process of its own), the loss at B×T = 2×256, D = 128, V = 16384; all
timings in one further fresh process; every output held against the float64 reference. GPU: bfloat16, B×T = 8×4096, D = 4096, V = 151936 (Qwen's vocabulary), the ``triton``
backend, ``triton.testing.do_bench`` and ``torch.cuda.max_memory_allocated``.
"""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any, Callable, Dict, List, NamedTuple, Optional

import torch
from torch import Tensor

import rlloss
from rlloss import reference

from . import _harness as harness
from ._registry import Suite

# --- sizes and settings -----------------------------------------------------------------------------------


Shape = harness.BatchShape


# The torch backend streams over [rows, vocab] tiles of 2²² elements: the teacher shape holds several, so the
# streaming shows in the peak memory; the loss shape is smaller (forward + backward of three variants).
CPU_TEACHER_SHAPE = Shape(B=4, T=256, D=128, V=32000)
CPU_LOSS_SHAPE = Shape(B=2, T=256, D=128, V=16384)
CPU_QUICK_TEACHER_SHAPE = Shape(B=2, T=128, D=64, V=16384)
CPU_QUICK_LOSS_SHAPE = Shape(B=2, T=64, D=64, V=4096)
CPU_DTYPE = torch.float32
CPU_WARMUP_CALLS = 1
CPU_TIMED_CALLS = 3
THREAD_POOL_WARMUP_SHAPE = Shape(B=1, T=16, D=16, V=256)

GPU_SHAPE = Shape(B=8, T=4096, D=4096, V=151936)
GPU_QUICK_SHAPE = Shape(B=2, T=4096, D=4096, V=151936)
GPU_DTYPE = torch.bfloat16
GPU_REFERENCE_ROWS = 256  # teacher rows checked against float32 logits of the same (rounded) inputs

LOGIT_STD = 2.0  # weight scaled so the logits have this standard deviation
TEACHER_SPREAD = 0.5  # std of ℓ± − ℓ° in the random teacher log-probs: the clip is hit on some tokens
SEED = 0
LOSS_PRESET = "verl_dapo"  # the CEPO setting of docs/math.md §7: ε 0.2 / 0.28, dual clip 3, token-mean, no KL


# --- inputs -----------------------------------------------------------------------------------------------


class TeacherInputs(NamedTuple):
    hidden: Tensor  # [N, D], no grad
    weight: Tensor  # [V, D], a Parameter-like leaf that requires grad, as an lm_head's does
    targets: Tensor  # [N] int64


class LossInputs(NamedTuple):
    hidden: Tensor  # [B, T, D] leaf, requires grad
    weight: Tensor  # [V, D] leaf, requires grad
    targets: Tensor  # [B, T]
    mask: Tensor  # [B, T] bool, sequences of varying length
    advantages: Tensor  # [B] float32
    old_logprobs: Tensor  # [B, T] float32 (the policy's own: ratio 1)
    pos_logprobs: Tensor  # [B, T] float32
    neg_logprobs: Tensor  # [B, T] float32


def _generator(device: str, seed: int) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def _randn(gen: torch.Generator, device: str, *size: int) -> Tensor:
    return torch.randn(*size, generator=gen, device=device, dtype=torch.float32)


def make_teacher_inputs(shape: Shape, dtype: torch.dtype, device: str, seed: int = SEED) -> TeacherInputs:
    gen = _generator(device, seed)
    hidden = _randn(gen, device, shape.N, shape.D).to(dtype)
    weight = (_randn(gen, device, shape.V, shape.D) * (LOGIT_STD / shape.D**0.5)).to(dtype).requires_grad_()
    targets = torch.randint(0, shape.V, (shape.N,), generator=gen, device=device)
    return TeacherInputs(hidden, weight, targets)


def make_loss_inputs(shape: Shape, dtype: torch.dtype, device: str, backend: str, seed: int = SEED) -> LossInputs:
    gen = _generator(device, seed)
    hidden = _randn(gen, device, shape.B, shape.T, shape.D).to(dtype).requires_grad_()
    weight = (_randn(gen, device, shape.V, shape.D) * (LOGIT_STD / shape.D**0.5)).to(dtype).requires_grad_()
    targets = torch.randint(0, shape.V, (shape.B, shape.T), generator=gen, device=device)
    lengths = torch.randint(shape.T // 2, shape.T + 1, (shape.B,), generator=gen, device=device)
    mask = torch.arange(shape.T, device=device)[None, :] < lengths[:, None]
    advantages = _randn(gen, device, shape.B)
    with torch.no_grad():
        old = rlloss.token_logprobs(hidden, weight, torch.where(mask, targets, -100), backend=backend).logprobs
    pos = old + TEACHER_SPREAD * _randn(gen, device, shape.B, shape.T)
    neg = old + TEACHER_SPREAD * _randn(gen, device, shape.B, shape.T)
    return LossInputs(hidden, weight, targets, mask, advantages, old, pos, neg)


# --- implementations --------------------------------------------------------------------------------------


def teacher_rlloss(backend: str) -> Callable[[TeacherInputs], Tensor]:
    def run(inputs: TeacherInputs) -> Tensor:
        with torch.no_grad():
            return rlloss.token_logprobs(inputs.hidden, inputs.weight, inputs.targets, backend=backend).logprobs

    return run


def teacher_naive(inputs: TeacherInputs) -> Tensor:
    """Materialised: [N, V] logits in the input dtype, a float32 log_softmax, gather (no graph either)."""
    with torch.no_grad():
        logp = torch.log_softmax((inputs.hidden @ inputs.weight.T).float(), dim=-1)
        return logp.gather(1, inputs.targets[:, None]).squeeze(1)


TEACHER_IMPLS = {
    "rlloss": ("subject", "token_logprobs under no_grad (streaming, no [N, V] tensor, no graph)"),
    "naive": ("baseline", "no_grad: logits = h·Wᵀ, float32 log_softmax, gather"),
}


def loss_config(credit: bool):
    config = rlloss.LossConfig.preset(LOSS_PRESET)
    return config.replace(credit="cepo", credit_lambda=0.5, credit_eps_w=0.2) if credit else config


def loss_step(impl: str, inputs: LossInputs, backend: str) -> Callable[[], Tensor]:
    """One forward + backward of the policy loss; input gradients reset first."""
    credit = loss_config(True)
    plain = loss_config(False)
    fused_credit = rlloss.FusedPolicyLoss(credit, backend=backend)
    fused_plain = rlloss.FusedPolicyLoss(plain, backend=backend)
    common = dict(old_logprobs=inputs.old_logprobs)

    def step() -> Tensor:
        inputs.hidden.grad, inputs.weight.grad = None, None
        args = (inputs.hidden, inputs.weight, inputs.targets, inputs.mask)
        if impl == "fused-credit":
            out = fused_credit(*args, inputs.advantages, pos_logprobs=inputs.pos_logprobs,
                               neg_logprobs=inputs.neg_logprobs, **common)
        elif impl == "credit-then-fused":
            token_adv = rlloss.contrastive_credit(inputs.advantages, inputs.mask, inputs.pos_logprobs,
                                                  neg_logprobs=inputs.neg_logprobs, lam=credit.credit_lambda,
                                                  eps_w=credit.credit_eps_w, backend=backend)
            out = fused_plain(*args, token_adv, **common)
        else:  # fused-no-credit
            out = fused_plain(*args, inputs.advantages, **common)
        out.loss.backward()
        return out.loss.detach()

    return step


LOSS_IMPLS = {
    "fused-credit": ("subject", "FusedPolicyLoss(credit='cepo'): Â formed inside the loss kernel"),
    "credit-then-fused": ("peer", "contrastive_credit → [B, T] Â → FusedPolicyLoss without credit"),
    "fused-no-credit": ("baseline", "FusedPolicyLoss without credit (plain GRPO advantages)"),
}


def reference_loss(inputs: LossInputs) -> float:
    """The float64 reference value of the loss with the credit (docs/math.md §3–§7), through [N, V] logits."""
    config = loss_config(True)
    with torch.no_grad():
        targets = torch.where(inputs.mask, inputs.targets, -100)
        logprobs, _ = reference.token_logprobs(inputs.hidden.double(), inputs.weight.double(), targets)
        loss, _ = reference.policy_loss(logprobs, inputs.old_logprobs.double(), inputs.advantages.double(),
                                        inputs.mask, config=config, pos_logprobs=inputs.pos_logprobs.double(),
                                        neg_logprobs=inputs.neg_logprobs.double())
    return float(loss)


def float64_teacher_reference(inputs: TeacherInputs, rows: Optional[int] = None) -> Tensor:
    hidden = inputs.hidden if rows is None else inputs.hidden[:rows]
    targets = inputs.targets if rows is None else inputs.targets[:rows]
    with torch.no_grad():
        logprobs, _ = reference.token_logprobs(hidden.double(), inputs.weight.detach().double(), targets)
    return logprobs


# --- records ----------------------------------------------------------------------------------------------


def base_record(case: str, impl: str, role: str, label: str, shape: Shape, dtype: torch.dtype,
                device: str) -> Dict[str, Any]:
    return {"case": case, "impl": impl, "role": role, "label": label, "B": shape.B, "T": shape.T, "N": shape.N,
            "D": shape.D, "V": shape.V, "dtype": harness.dtype_name(dtype), "device": device, "status": "ok",
            "error": None}


def _columns() -> List[harness.Column]:
    C = harness.Column
    return [
        C("case", lambda r: "teacher pass (fwd only)" if r["case"] == "teacher" else "policy loss fwd+bwd"),
        harness.IMPL_COLUMN,
        C("B×T, D, V", lambda r: f"{r['B']}×{r['T']}, {r['D']}, {r['V']}"),
        harness.STATUS_COLUMN,
        C("ms (median)", lambda r: harness.fmt_ms(r.get("time_ms"))),
        harness.time_spread_column("low–high ms"),
        C("peak memory beyond inputs (MiB)", lambda r: harness.fmt_mib(r.get("peak_memory_bytes"))),
        C("= [N, V] fp32 tensors", lambda r: harness.fmt_num(r.get("peak_memory_in_logits_tensors"), 2)),
        C("max abs diff vs reference", lambda r: harness.fmt_err(r.get("diff_reference"))),
        C("vs rlloss / fused-credit", lambda r: harness.fmt_err(
            r.get("diff_rlloss") if r.get("diff_rlloss") is not None else r.get("diff_fused_credit"))),
    ]


# --- CPU default ------------------------------------------------------------------------------------------


def _cpu_teacher_step(payload: Dict[str, Any]) -> Callable[[], Tensor]:
    impl = teacher_rlloss("torch") if payload["impl"] == "rlloss" else teacher_naive
    impl(make_teacher_inputs(THREAD_POOL_WARMUP_SHAPE, CPU_DTYPE, "cpu"))  # start the thread pools
    inputs = make_teacher_inputs(Shape(**payload["shape"]), CPU_DTYPE, "cpu")
    return lambda: impl(inputs)


def measure_cpu_teacher_memory(payload: Dict[str, Any]) -> Dict[str, Any]:
    """In a fresh process: peak memory of one teacher read-out; saves the log-probs for the parent."""
    peak, was_reset, logprobs = harness.cpu_peak_memory(_cpu_teacher_step(payload))
    torch.save(logprobs, payload["outputs_path"])
    return {"peak_memory_bytes": peak, "peak_counter_reset": was_reset}


def interleaved_cpu_times(steps: Dict[str, Callable[[], Any]]) -> Dict[str, Dict[str, Any]]:
    """The time records of ``steps``, their calls interleaved round by round."""
    timings = harness.cpu_times_interleaved(steps, CPU_WARMUP_CALLS, CPU_TIMED_CALLS)
    return {name: timing.as_record() for name, timing in timings.items()}


def measure_cpu_times(payload: Dict[str, Any]) -> Dict[str, Any]:
    """In a fresh process: the median time of every teacher and loss case, the loss values, and the teacher
    log-probs the memory processes saved against the float64 reference (computed here, not in the parent:
    a child process's peak-RSS counter starts from its parent's, so the parent stays small)."""
    teacher_steps = {f"teacher/{impl}": _cpu_teacher_step({"impl": impl, "shape": payload["teacher_shape"]})
                     for impl in TEACHER_IMPLS}
    results = interleaved_cpu_times(teacher_steps)
    del teacher_steps
    expected = float64_teacher_reference(make_teacher_inputs(Shape(**payload["teacher_shape"]), CPU_DTYPE, "cpu"))
    for impl, saved in payload["outputs_paths"].items():
        results[f"teacher/{impl}"]["diff_reference"] = harness.max_abs_diff(torch.load(saved), expected)
    inputs = make_loss_inputs(Shape(**payload["loss_shape"]), CPU_DTYPE, "cpu", "torch")
    loss_steps = {f"loss/{impl}": loss_step(impl, inputs, "torch") for impl in LOSS_IMPLS}
    results.update(interleaved_cpu_times(loss_steps))
    for key, step in loss_steps.items():
        results[key]["loss"] = float(step())
    results["reference_loss"] = reference_loss(inputs)
    return results


def run_cpu_default(ctx: harness.RunContext) -> harness.SuiteReport:
    shape = CPU_QUICK_TEACHER_SHAPE if ctx.quick else CPU_TEACHER_SHAPE
    loss_shape = CPU_QUICK_LOSS_SHAPE if ctx.quick else CPU_LOSS_SHAPE
    records: Dict[str, Dict[str, Any]] = {}
    for impl, (role, label) in TEACHER_IMPLS.items():
        name = "rlloss-torch" if impl == "rlloss" else impl
        records[f"teacher/{impl}"] = base_record("teacher", name, role, label, shape, CPU_DTYPE, "cpu")
    for impl, (role, label) in LOSS_IMPLS.items():
        records[f"loss/{impl}"] = base_record("loss", impl, role, label + ", backend='torch'", loss_shape,
                                              CPU_DTYPE, "cpu")
    with tempfile.TemporaryDirectory(prefix="rlloss-bench-credit-") as tmp:
        outputs_paths = {}
        for impl in TEACHER_IMPLS:
            record = records[f"teacher/{impl}"]
            outputs_path = Path(tmp) / f"{impl}.pt"
            payload = {"impl": impl, "shape": vars(shape), "outputs_path": str(outputs_path)}
            if harness.measure_memory_isolated(record, f"{__name__}:measure_cpu_teacher_memory", payload):
                outputs_paths[impl] = str(outputs_path)
            ctx.progress(f"credit teacher {record['impl']}: peak "
                         f"+{harness.fmt_mib(record.get('peak_memory_bytes'))} MiB, status {record['status']}")
        timings = harness.run_isolated_or_fail(f"{__name__}:measure_cpu_times", {
            "teacher_shape": vars(shape), "loss_shape": vars(loss_shape), "outputs_paths": outputs_paths},
            [record for record in records.values() if record["status"] == "ok"])
        if timings is not None:
            for key, record in records.items():
                record.update({k: v for k, v in timings[key].items() if k != "loss"})
                if record["case"] == "loss":
                    record["loss"] = timings[key]["loss"]
                    if record["impl"] != "fused-no-credit":
                        record["diff_reference"] = abs(timings[key]["loss"] - timings["reference_loss"])
                ctx.progress(f"credit {record['case']} {record['impl']}: {harness.fmt_ms(record.get('time_ms'))} ms")
    logits_bytes = shape.N * shape.V * 4
    harness.add_memory_in_logits_tensors(list(records.values()), logits_bytes)
    return harness.SuiteReport(
        suite="credit", mode="cpu-default",
        title="credit — CPU default: float32, teacher read-out and policy loss with credit",
        config={"teacher_shape": vars(shape), "loss_shape": vars(loss_shape), "dtype": "float32", "warmup_calls": CPU_WARMUP_CALLS,
                "timed_calls": CPU_TIMED_CALLS, "seed": SEED, "logit_std": LOGIT_STD,
                "teacher_spread": TEACHER_SPREAD, "loss_preset": LOSS_PRESET, "logits_tensor_bytes": logits_bytes},
        records=list(records.values()), columns=_columns(),
        notes=[
            "Teacher pass: final hidden states of the completion tokens → their log-probs, forward only, as "
            "after `TeacherInputs.gather_hidden`. `rlloss-torch` streams over the vocabulary in chunks (no "
            "[N, V] tensor, no autograd graph although the weight requires grad); `naive` materialises the "
            f"logits. One float32 [N, V] tensor here is {harness.fmt_mib(logits_bytes)} MiB. max abs diff: "
            "log-probs against `rlloss.reference` in float64.",
            "Policy loss: `FusedPolicyLoss` forward + backward with the `verl_dapo` preset, random [B] "
            "advantages, on-policy old log-probs, teacher log-probs ℓ± = ℓ° + N(0, 0.5²); 'max abs diff' of "
            "the two credit implementations is the loss value against the float64 reference (logits, §3–§7).",
            harness.CPU_MEMORY_METHOD.replace("forward + backward", "teacher read-out"),
            f"Time: median of {CPU_TIMED_CALLS} calls after {CPU_WARMUP_CALLS} warm-up call, all cases in one "
            f"fresh process with the default allocator, the calls of each comparison interleaved round by round, "
            f"{torch.get_num_threads()} torch threads; the JSON's `load_average_1min` tells whether other work "
            "shared the machine.",
        ],
    )


# --- GPU --------------------------------------------------------------------------------------------------


def compare_on_device(shape: Shape, dtype: torch.dtype, device: str, backend: str, probes: harness.Probes,
                      progress: Callable[[str], None]) -> List[Dict[str, Any]]:
    """Every teacher and loss case at ``shape``; a failing case (OOM included) is recorded, not raised."""
    records: List[Dict[str, Any]] = []

    # teacher read-out, forward only
    try:
        inputs = make_teacher_inputs(shape, dtype, device)
        expected_rows = float64_teacher_reference(inputs, GPU_REFERENCE_ROWS)
    except Exception as exc:  # the inputs themselves do not fit
        inputs = None
        for impl, (role, label) in TEACHER_IMPLS.items():
            records.append(harness.failure(base_record("teacher", impl, role, label, shape, dtype, device), exc))
    anchor = None
    if inputs is not None:
        for impl, (role, label) in TEACHER_IMPLS.items():
            name = f"rlloss-{backend}" if impl == "rlloss" else impl
            record = base_record("teacher", name, role, label, shape, dtype, device)
            fn = teacher_rlloss(backend) if impl == "rlloss" else teacher_naive
            try:
                fn(inputs)  # warm-up: compilation
                peak, logprobs = probes.peak_memory(lambda: fn(inputs))
                record["peak_memory_bytes"] = peak
                record.update(probes.time(lambda: fn(inputs)).as_record())
                record["diff_reference"] = harness.max_abs_diff(logprobs[:GPU_REFERENCE_ROWS], expected_rows)
                if anchor is None:
                    anchor = logprobs
                else:
                    record["diff_rlloss"] = harness.max_abs_diff(logprobs, anchor)
                del logprobs
            except Exception as exc:
                harness.failure(record, exc)
            harness.free_device_memory(device)
            progress(f"credit teacher {name}: {harness.fmt_ms(record.get('time_ms'))} ms, peak "
                     f"{harness.fmt_gib(record.get('peak_memory_bytes'))} GiB, {record['status']}")
            records.append(record)
        del inputs, anchor
        harness.free_device_memory(device)

    # policy loss with and without credit, forward + backward
    try:
        loss_inputs = make_loss_inputs(shape, dtype, device, backend)
    except Exception as exc:
        loss_inputs = None
        for impl, (role, label) in LOSS_IMPLS.items():
            records.append(harness.failure(base_record("loss", impl, role, label, shape, dtype, device), exc))
    if loss_inputs is not None:
        values = {}
        for impl, (role, label) in LOSS_IMPLS.items():
            record = base_record("loss", impl, role, label + f", backend={backend!r}", shape, dtype, device)
            try:
                step = loss_step(impl, loss_inputs, backend)
                step()
                peak, loss = probes.peak_memory(step)
                record["peak_memory_bytes"] = peak
                record.update(probes.time(step).as_record())
                record["loss"] = values[impl] = float(loss)
            except Exception as exc:
                harness.failure(record, exc)
            harness.free_device_memory(device)
            progress(f"credit loss {impl}: {harness.fmt_ms(record.get('time_ms'))} ms, peak "
                     f"{harness.fmt_gib(record.get('peak_memory_bytes'))} GiB, {record['status']}")
            records.append(record)
        if "fused-credit" in values and "credit-then-fused" in values:
            for record in records:
                if record["impl"] == "credit-then-fused":
                    record["diff_fused_credit"] = abs(values["credit-then-fused"] - values["fused-credit"])
        del loss_inputs
        harness.free_device_memory(device)

    harness.add_memory_in_logits_tensors(records, shape.N * shape.V * 4)
    return records


def run_gpu(ctx: harness.RunContext) -> harness.SuiteReport:
    shape = GPU_QUICK_SHAPE if ctx.quick else GPU_SHAPE
    dtype = GPU_DTYPE
    records = compare_on_device(shape, dtype, "cuda", "triton", harness.CUDA_PROBES, ctx.progress)
    logits_bytes = shape.N * shape.V * 4
    return harness.SuiteReport(
        suite="credit", mode="gpu",
        title=f"credit — {ctx.device.name}: {shape}, {harness.dtype_name(dtype)}, teacher read-out and loss with credit",
        config={"shape": vars(shape), "dtype": harness.dtype_name(dtype), "seed": SEED, "logit_std": LOGIT_STD,
                "teacher_spread": TEACHER_SPREAD, "loss_preset": LOSS_PRESET, "reference_rows": GPU_REFERENCE_ROWS,
                "logits_tensor_bytes_fp32": logits_bytes},
        records=records, columns=_columns(),
        notes=[
            "Teacher pass: final hidden states of the completion tokens → their log-probs, forward only "
            "(one untimed warm-up call compiles the kernels). `naive` holds bf16 logits and their float32 "
            f"log_softmax. 'max abs diff vs reference': the first {GPU_REFERENCE_ROWS} tokens against float64 "
            "log-probs of the same bf16 inputs; the JSON's `diff_rlloss` compares naive with rlloss on all tokens.",
            "Policy loss: `FusedPolicyLoss` forward + backward (`verl_dapo`), gradients w.r.t. hidden and "
            "lm_head weight; `credit-then-fused` includes the separate `contrastive_credit` launch and its [B, T] "
            "tensor; the JSON's `diff_fused_credit` is its loss value against `fused-credit`.",
            harness.CUDA_MEMORY_METHOD,
            f"Time: `triton.testing.do_bench` median (warm-up {harness.DO_BENCH_WARMUP_MS} ms, repetitions "
            f"{harness.DO_BENCH_REP_MS} ms); low/high are the 20th/80th percentiles.",
        ],
    )


# --- the suite ----------------------------------------------------------------------------------------------


SUITE = Suite(
    name="credit",
    description="contrastive credit: teacher read-out (streaming vs materialised logits); loss with vs without credit",
    run_cpu=run_cpu_default, run_gpu=run_gpu,
)
