"""Suite ``logprobs``: ``rlloss.token_logprobs`` (log-probs and entropy straight from hidden states and the
lm_head weight), forward + backward with both outputs and random upstream gradients.

CPU default (no GPU): the chunked ``torch`` backend against the naive materialised baseline (full [N, V]
float32 logits, log_softmax, gather, entropy, autograd) at N=2048, D=256, V=32000, float32. Each case runs
in a fresh process so its peak RSS is its own; both are held against the float64 reference.

GPU: bfloat16 at N ∈ {2048, 8192, 32768}, D=4096, V ∈ {32000, 131072, 151936}: the ``triton`` backend against
the naive baseline (bf16 logits, float32 log_softmax), ``torch.compile`` of it, Cut Cross-Entropy and
Liger-Kernel's fused linear cross-entropy (each peer only where it imports), timed by
``triton.testing.do_bench``, with peak memory, achieved TFLOP/s and its fraction of the measured bf16 matmul
rate; every peer's log-probs are checked against rlloss's so a wrong peer shows. Each shape also has the floor
row: the four bare cuBLAS GEMMs of that shape (h·Wᵀ forward, h·Wᵀ again for the backward recompute, dz·W and
dzᵀ·h), timed the same way in the same run; every row reports its time over the floor's.
"""
from __future__ import annotations

import itertools
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch
from torch import Tensor

import rlloss
from rlloss import reference

from . import _harness as harness
from ._registry import Suite

# --- sizes and settings -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Shape:
    """N tokens, hidden size D, vocabulary V."""

    N: int
    D: int
    V: int

    def __str__(self) -> str:
        return f"N={self.N} D={self.D} V={self.V}"


CPU_DEFAULT_SHAPE = Shape(N=2048, D=256, V=32000)
CPU_QUICK_SHAPE = Shape(N=1024, D=128, V=16384)
CPU_DTYPE = torch.float32
CPU_WARMUP_CALLS = 1
CPU_TIMED_CALLS = 3
# Tiny shape run once before the inputs are built, so thread pools exist before memory is measured.
THREAD_POOL_WARMUP_SHAPE = Shape(N=64, D=32, V=1000)

GPU_HIDDEN = 4096
GPU_TOKENS = (2048, 8192, 32768)
GPU_VOCABS = (32000, 131072, 151936)
GPU_TOKENS_QUICK = (2048, 8192)
GPU_VOCABS_QUICK = (32000, 151936)
GPU_DTYPE = torch.bfloat16
# Rows of every GPU case checked against a float32 materialised reference (cheap: [rows, V]).
GPU_REFERENCE_ROWS = 256

# Nominal FLOPs of forward + backward per (token, hidden, vocab) triple: logits 2, dh 2, dW 2 and one logit
# recompute 2. The same count is used for every implementation (naive does 6, rlloss 8), so
# TFLOP/s is a rescaled speed that compares across implementations and with the matmul peak.
FLOPS_PER_NDV = 8

# Random inputs: weight scaled so the logits have this standard deviation (a peaked distribution, as a trained
# model's is, rather than a flat one); fixed seed so every process builds the same tensors.
LOGIT_STD = 2.0
SEED = 0


def gpu_shapes(quick: bool) -> List[Shape]:
    tokens, vocabs = (GPU_TOKENS_QUICK, GPU_VOCABS_QUICK) if quick else (GPU_TOKENS, GPU_VOCABS)
    return [Shape(N, GPU_HIDDEN, V) for V, N in itertools.product(vocabs, tokens)]


def nominal_flops(shape: Shape) -> int:
    return FLOPS_PER_NDV * shape.N * shape.D * shape.V


# --- inputs and one forward + backward ---------------------------------------------------------------------


class Inputs(NamedTuple):
    hidden: Tensor  # [N, D], requires grad
    weight: Tensor  # [V, D], requires grad
    targets: Tensor  # [N] int64
    grad_logprobs: Tensor  # [N] float32 upstream gradient of the log-probs
    grad_entropy: Tensor  # [N] float32 upstream gradient of the entropy


class Outputs(NamedTuple):
    logprobs: Tensor
    entropy: Optional[Tensor]
    grad_hidden: Tensor
    grad_weight: Tensor


def make_inputs(shape: Shape, dtype: torch.dtype, device: str, seed: int = SEED) -> Inputs:
    """Random inputs, identical in every process for the same (shape, dtype, device, seed)."""
    gen = torch.Generator(device=device).manual_seed(seed)

    def randn(*size: int) -> Tensor:
        return torch.randn(*size, generator=gen, device=device, dtype=torch.float32)

    hidden = randn(shape.N, shape.D).to(dtype).requires_grad_()
    weight = (randn(shape.V, shape.D) * (LOGIT_STD / shape.D**0.5)).to(dtype).requires_grad_()
    targets = torch.randint(0, shape.V, (shape.N,), generator=gen, device=device)
    return Inputs(hidden, weight, targets, randn(shape.N), randn(shape.N))


Forward = Callable[[Tensor, Tensor, Tensor], Tuple[Tensor, Optional[Tensor]]]


def fwd_bwd_step(forward: Forward, inputs: Inputs, nll_sum_backward: bool = False) -> Callable[[], Outputs]:
    """One forward + backward through ``forward`` with the inputs' upstream gradients (the entropy's only
    where the implementation returns one); input gradients are reset first, so calls do not accumulate.

    nll_sum_backward: the upstream gradient of the log-probs is −1 everywhere (``nll.sum().backward()``),
    for implementations whose per-token backward only takes a uniform upstream gradient.
    """
    grad_logprobs = -torch.ones_like(inputs.grad_logprobs) if nll_sum_backward else inputs.grad_logprobs

    def step() -> Outputs:
        inputs.hidden.grad = None
        inputs.weight.grad = None
        logprobs, entropy = forward(inputs.hidden, inputs.weight, inputs.targets)
        tensors, grads = [logprobs], [grad_logprobs.to(logprobs.dtype)]
        if entropy is not None:
            tensors.append(entropy)
            grads.append(inputs.grad_entropy.to(entropy.dtype))
        torch.autograd.backward(tensors, grads)
        return Outputs(logprobs.detach(), None if entropy is None else entropy.detach(),
                       inputs.hidden.grad, inputs.weight.grad)

    return step


# --- implementations --------------------------------------------------------------------------------------


def naive_logprobs(hidden: Tensor, weight: Tensor, targets: Tensor) -> Tuple[Tensor, Tensor]:
    """The materialised baseline: full [N, V] logits in the input dtype, float32 log_softmax, gather,
    entropy, autograd through all of it."""
    logp = torch.log_softmax((hidden @ weight.T).float(), dim=-1)
    return logp.gather(1, targets[:, None]).squeeze(1), -(logp.exp() * logp).sum(-1)


@dataclass(frozen=True)
class Implementation:
    """One contender.

    role: "subject" (rlloss), "baseline" (naive materialised) or "peer" (another library).
    make_forward: called once per case, so e.g. torch.compile starts from a fresh cache for every shape.
    unavailable: why it cannot run here (a missing package), or None.
    has_entropy: whether it returns the entropy (peers computing cross-entropy do not).
    nll_sum_backward: see :func:`fwd_bwd_step`.
    """

    name: str
    role: str
    label: str
    make_forward: Callable[[], Forward]
    unavailable: Callable[[], Optional[str]] = lambda: None
    has_entropy: bool = True
    nll_sum_backward: bool = False
    note: str = ""


def rlloss_implementation(backend: str, max_scratch_bytes: Optional[int] = None, suffix: str = "") -> Implementation:
    """rlloss.token_logprobs; ``max_scratch_bytes`` None is the default chunk bound (docs/design/logprobs.md:
    on a GPU a larger bound makes the weight-gradient GEMM compute bound, hence the 1 GiB variant)."""
    def make_forward() -> Forward:
        def forward(hidden, weight, targets):
            out = rlloss.token_logprobs(hidden, weight, targets, return_entropy=True, backend=backend,
                                        max_scratch_bytes=max_scratch_bytes)
            return out.logprobs, out.entropy

        return forward

    scratch = "" if max_scratch_bytes is None else f", max_scratch_bytes={max_scratch_bytes}"
    return Implementation(f"rlloss-{backend}{suffix}", "subject",
                          f"rlloss.token_logprobs, backend={backend!r}{scratch}", make_forward)


def naive_implementation(dtype: torch.dtype) -> Implementation:
    logits = "float32 logits" if dtype == torch.float32 else f"{str(dtype).replace('torch.', '')} logits → float32"
    return Implementation("naive", "baseline", f"materialised [N, V] {logits} log_softmax, autograd",
                          lambda: naive_logprobs)


def _compiled_naive() -> Forward:
    import torch._dynamo

    torch._dynamo.reset()  # fresh graph cache per shape: no recompile limit, no fallback to eager
    return torch.compile(naive_logprobs, dynamic=False)


COMPILED_NAIVE = Implementation(
    "naive-compile", "baseline", "torch.compile(naive), dynamic=False", _compiled_naive,
    note="compile and autotuning happen in the untimed warm-up call",
)


def _cce_forward(impl: str) -> Callable[[], Forward]:
    def make_forward() -> Forward:
        from cut_cross_entropy import linear_cross_entropy

        def forward(hidden, weight, targets):
            nll = linear_cross_entropy(hidden, weight, targets, reduction="none", impl=impl)
            return -nll, None

        return forward

    return make_forward


CCE_NOTE = "returns −log p only (no entropy)"
CCE = Implementation(
    "cce", "peer", "cut_cross_entropy.linear_cross_entropy(impl='cce')", _cce_forward("cce"),
    harness.import_error("cut_cross_entropy", "cut-cross-entropy"), has_entropy=False,
    note=CCE_NOTE + "; gradient filtering on (filter_eps='auto'): approximate gradients",
)
CCE_EXACT = Implementation(
    "cce-exact", "peer", "cut_cross_entropy.linear_cross_entropy(impl='cce_exact')", _cce_forward("cce_exact"),
    harness.import_error("cut_cross_entropy", "cut-cross-entropy"), has_entropy=False,
    note=CCE_NOTE + "; no gradient filtering",
)


def _liger_forward() -> Forward:
    from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss

    loss_fn = LigerFusedLinearCrossEntropyLoss(reduction="none")

    def forward(hidden, weight, targets):
        out = loss_fn(weight, hidden, targets)  # Liger takes the weight first
        if hasattr(out, "loss"):  # a CrossEntropyOutput when extra outputs are asked for
            out = out.loss
        elif isinstance(out, tuple):
            out = out[0]
        return -out, None

    return forward


LIGER = Implementation(
    "liger", "peer", "liger_kernel LigerFusedLinearCrossEntropyLoss(reduction='none')", _liger_forward,
    harness.import_error("liger_kernel.transformers.fused_linear_cross_entropy", "liger-kernel"), has_entropy=False,
    nll_sum_backward=True,
    note="returns −log p only (no entropy); computes its gradients inside the forward; backward is "
    "nll.sum().backward() (uniform upstream gradient), because Liger's reduction='none' backward has scaled "
    "its precomputed gradients by a single upstream value in released versions",
)

# The floor row of each GPU shape (harness.gemm_floor): not a contender, the bare GEMMs an implementation of
# log-probs + entropy with one logit recompute cannot avoid.
GEMM_FLOOR = Implementation("gemm-floor", "floor", "bare cuBLAS GEMMs: h·Wᵀ, h·Wᵀ (recompute), dz·W, dzᵀ·h",
                            lambda: None, note="torch.mm into preallocated outputs, the inputs' dtype")

CPU_IMPLEMENTATIONS = (rlloss_implementation("torch"), naive_implementation(CPU_DTYPE))
GPU_IMPLEMENTATIONS = (rlloss_implementation("triton"), rlloss_implementation("triton", 1 << 30, "-1GiB"),
                       naive_implementation(GPU_DTYPE), COMPILED_NAIVE,
                       CCE, CCE_EXACT, LIGER)


# --- comparing outputs ------------------------------------------------------------------------------------


def float64_reference(inputs: Inputs) -> Outputs:
    """Ground truth: ``rlloss.reference`` on float64 copies of the inputs, the same upstream gradients."""
    hidden = inputs.hidden.detach().double().requires_grad_()
    weight = inputs.weight.detach().double().requires_grad_()
    logprobs, entropy = reference.token_logprobs(hidden, weight, inputs.targets)
    torch.autograd.backward([logprobs, entropy], [inputs.grad_logprobs.double(), inputs.grad_entropy.double()])
    return Outputs(logprobs.detach(), entropy.detach(), hidden.grad, weight.grad)


def float32_reference_rows(inputs: Inputs, rows: int) -> Tuple[Tensor, Tensor]:
    """(log-probs, entropy) of the first ``rows`` tokens from float32 logits of the (rounded) inputs."""
    with torch.no_grad():
        logits = inputs.hidden[:rows].float() @ inputs.weight.float().T
        logp = torch.log_softmax(logits, dim=-1)
        return logp.gather(1, inputs.targets[:rows, None]).squeeze(1), -(logp.exp() * logp).sum(-1)


# --- records ----------------------------------------------------------------------------------------------


def base_record(impl: Implementation, shape: Shape, dtype: torch.dtype, device: str) -> Dict[str, Any]:
    return {
        "impl": impl.name, "role": impl.role, "label": impl.label, "note": impl.note,
        "N": shape.N, "D": shape.D, "V": shape.V, "dtype": harness.dtype_name(dtype), "device": device,
        "outputs": "logprobs+entropy" if impl.has_entropy else "logprobs only",
        "upstream_grad": "uniform (nll.sum())" if impl.nll_sum_backward else "random",
        "flops": nominal_flops(shape), "status": "ok", "error": None,
    }


# --- CPU default --------------------------------------------------------------------------------------------

_CPU_IMPLEMENTATIONS_BY_NAME = {impl.name: impl for impl in CPU_IMPLEMENTATIONS}


def _cpu_steps(impl_names: Sequence[str], shape: Shape) -> Dict[str, Callable[[], Outputs]]:
    """Forward + backward of each named implementation on the same inputs, each after a tiny-shape call that
    starts the thread pools."""
    inputs = make_inputs(shape, CPU_DTYPE, "cpu")
    steps = {}
    for name in impl_names:
        impl = _CPU_IMPLEMENTATIONS_BY_NAME[name]
        forward = impl.make_forward()
        fwd_bwd_step(forward, make_inputs(THREAD_POOL_WARMUP_SHAPE, CPU_DTYPE, "cpu"), impl.nll_sum_backward)()
        steps[name] = fwd_bwd_step(forward, inputs, impl.nll_sum_backward)
    return steps


def measure_cpu_memory(payload: Dict[str, Any]) -> Dict[str, Any]:
    """In a fresh process (``harness.run_isolated``): peak memory of one implementation's first full-size
    forward + backward; saves its outputs for the parent to compare."""
    (step,) = _cpu_steps([payload["impl"]], Shape(**payload["shape"])).values()
    peak, peak_was_reset, outputs = harness.cpu_peak_memory(step)
    torch.save(outputs._asdict(), payload["outputs_path"])
    return {"peak_memory_bytes": peak, "peak_counter_reset": peak_was_reset}


def measure_cpu_times(payload: Dict[str, Any]) -> Dict[str, Any]:
    """In a fresh process: the time of every implementation, calls interleaved so that other load on the
    machine slows them alike."""
    steps = _cpu_steps(payload["impls"], Shape(**payload["shape"]))
    timings = harness.cpu_times_interleaved(steps, CPU_WARMUP_CALLS, CPU_TIMED_CALLS)
    return {name: timing.as_record() for name, timing in timings.items()}


def _cpu_columns() -> List[harness.Column]:
    C = harness.Column
    return [
        harness.IMPL_COLUMN,
        C("N × D × V", lambda r: f"{r['N']} × {r['D']} × {r['V']}"),
        harness.STATUS_COLUMN,
        *harness.CPU_TIME_MEMORY_COLUMNS,
        C("max abs diff logprobs", lambda r: harness.fmt_err(r.get("diff_logprobs"))),
        C("entropy", lambda r: harness.fmt_err(r.get("diff_entropy"))),
        C("d hidden", lambda r: harness.fmt_err(r.get("diff_grad_hidden"))),
        C("d weight", lambda r: harness.fmt_err(r.get("diff_grad_weight"))),
    ]


def _cpu_progress(index: int, total: int, record: Dict[str, Any]) -> str:
    head = f"[{index}/{total}] logprobs {record['impl']:<14} N={record['N']} D={record['D']} V={record['V']} " \
           f"{record['dtype']} fwd+bwd"
    if record["status"] != "ok":
        return f"{head}: {record['status']}: {record['error']}"
    return f"{head}: {harness.fmt_ms(record['time_ms'])} ms, peak +{harness.fmt_mib(record['peak_memory_bytes'])} MiB"


def run_cpu_default(ctx: harness.RunContext) -> harness.SuiteReport:
    shape = CPU_QUICK_SHAPE if ctx.quick else CPU_DEFAULT_SHAPE
    dtype_name = harness.dtype_name(CPU_DTYPE)
    itemsize = torch.empty((), dtype=CPU_DTYPE).element_size()
    records, saved = [], {}
    with tempfile.TemporaryDirectory(prefix="rlloss-bench-logprobs-") as tmp:
        for impl in CPU_IMPLEMENTATIONS:
            record = base_record(impl, shape, CPU_DTYPE, "cpu")
            outputs_path = Path(tmp) / f"{impl.name}.pt"
            payload = {"impl": impl.name, "shape": vars(shape), "outputs_path": str(outputs_path)}
            ctx.progress(f"logprobs {impl.name}: peak memory in a fresh process")
            if harness.measure_memory_isolated(record, f"{__name__}:measure_cpu_memory", payload):
                saved[impl.name] = outputs_path
            records.append(record)

        timed = [record for record in records if record["status"] == "ok"]
        ctx.progress(f"logprobs {', '.join(r['impl'] for r in timed)}: {CPU_TIMED_CALLS} interleaved timed calls "
                     "each in one fresh process")
        times = harness.run_isolated_or_fail(f"{__name__}:measure_cpu_times",
                                             {"impls": [r["impl"] for r in timed], "shape": vars(shape)}, timed)
        if times is not None:
            for record in timed:
                record.update(times[record["impl"]])
                record["gflops_per_s"] = record["flops"] / (record["time_ms"] * 1e-3) / 1e9
        for index, record in enumerate(records, start=1):
            ctx.progress(_cpu_progress(index, len(records), record))

        ctx.progress("float64 reference (rlloss.reference, autograd) for the max-abs-diff columns")
        expected = float64_reference(make_inputs(shape, CPU_DTYPE, "cpu"))
        for record in records:
            if record["impl"] in saved:
                outputs = Outputs(**torch.load(saved[record["impl"]]))
                record.update(harness.output_diffs(outputs, expected, "diff"))

    logits_bytes = shape.N * shape.V * itemsize
    harness.add_memory_in_logits_tensors(records, logits_bytes)
    return harness.SuiteReport(
        suite="logprobs", mode="cpu-default",
        title=f"logprobs — CPU default: {shape}, {dtype_name}, forward + backward, logprobs and entropy",
        config={
            "shape": vars(shape), "dtype": dtype_name, "warmup_calls": CPU_WARMUP_CALLS,
            "timed_calls": CPU_TIMED_CALLS, "seed": SEED, "logit_std": LOGIT_STD,
            "logits_tensor_bytes": logits_bytes,
            "input_bytes": (shape.N * shape.D + shape.V * shape.D) * itemsize + shape.N * 8 + 2 * shape.N * 4,
            "input_grad_bytes": (shape.N * shape.D + shape.V * shape.D) * itemsize,
            "nominal_flops": nominal_flops(shape), "diff_reference": "float64 rlloss.reference, autograd",
        },
        records=records, columns=_cpu_columns(),
        notes=[
            f"Both implementations run forward + backward of (logprobs, entropy) with random upstream gradients; "
            f"`rlloss-torch` is the chunked torch backend (never an [N, V] tensor), `naive` materialises "
            f"[N, V] logits and autograd keeps several [N, V] tensors. One {dtype_name} [N, V] tensor here is "
            f"{harness.fmt_mib(logits_bytes)} MiB; the input gradients both return are "
            f"{harness.fmt_mib((shape.N + shape.V) * shape.D * itemsize)} MiB.",
            harness.CPU_MEMORY_METHOD,
            f"Time: median of {CPU_TIMED_CALLS} calls after {CPU_WARMUP_CALLS} warm-up call, in one fresh process "
            "with the default allocator, the implementations' calls interleaved (A B A B ...) so that other "
            f"load on the machine slows them alike; {torch.get_num_threads()} torch threads. The JSON's "
            "`load_average_1min*` fields tell whether other work shared the machine.",
            "max abs diff: against `rlloss.reference` evaluated in float64 on the same inputs and upstream "
            "gradients (logprobs, entropy, d hidden, d weight).",
            f"Random inputs: hidden ~ N(0, 1), weight scaled for logits of std {LOGIT_STD}, uniform targets, "
            f"seed {SEED}.",
        ],
    )


# --- GPU comparison -----------------------------------------------------------------------------------------


def measure_case(impl: Implementation, inputs: Inputs, probes: harness.Probes) -> Tuple[Dict[str, Any], Outputs]:
    """Warm-up call (compiles, autotunes), one call for peak memory and the outputs (log-probs and entropy;
    its gradients are dropped, so the timing runs without a second set alive), then the timing."""
    step = fwd_bwd_step(impl.make_forward(), inputs, impl.nll_sum_backward)
    step()
    peak, outputs = probes.peak_memory(step)
    outputs = Outputs(outputs.logprobs, outputs.entropy, None, None)
    timing = probes.time(step)
    return {"peak_memory_bytes": peak, **timing.as_record()}, outputs


def compare_implementations(
    shapes: Sequence[Shape], dtype: torch.dtype, device: str, impls: Sequence[Implementation], probes: harness.Probes,
    progress: Callable[[str], None], matmul_tflops: Optional[float] = None,
    floor_gemms: Optional[Sequence[str]] = None,
) -> List[Dict[str, Any]]:
    """Every implementation on every shape; the first ``subject`` is the anchor the others are checked
    against, and every one is checked on its first rows against a float32 materialised reference.

    floor_gemms: the GEMMs of the floor row timed first at each shape (``harness.LOGPROBS_FLOOR_GEMMS``), each
    row's ``time_vs_gemm_floor`` its time over the floor's; None: no floor row.
    """
    per_shape = len(impls) + (floor_gemms is not None)
    records, total, index = [], len(shapes) * per_shape, 0
    for shape in shapes:
        floor = None
        if floor_gemms is not None:  # first, alone: its tensors are freed before the inputs are built
            index += 1
            floor = base_record(GEMM_FLOOR, shape, dtype, device)
            floor["outputs"] = "GEMMs only"
            try:
                floor.update(harness.gemm_floor(shape.N, shape.D, shape.V, dtype, device, floor_gemms, probes.time))
                harness.add_rates(floor, matmul_tflops)
            except Exception as exc:  # out of memory: recorded like any case
                harness.failure(floor, exc)
            harness.free_device_memory(device)
            records.append(floor)
            progress(_gpu_progress(index, total, floor))
        shape_start = len(records) - (floor is not None)
        try:
            inputs = make_inputs(shape, dtype, device)
            reference_rows = float32_reference_rows(inputs, GPU_REFERENCE_ROWS)
        except Exception as exc:  # the inputs themselves do not fit: every case of this shape fails alike
            inputs = None
            for impl in impls:
                index += 1
                records.append(harness.failure(base_record(impl, shape, dtype, device), exc))
                progress(_gpu_progress(index, total, records[-1]))
            harness.free_device_memory(device)
            continue
        anchor: Optional[Outputs] = None
        for impl in impls:
            index += 1
            record = base_record(impl, shape, dtype, device)
            try:
                measured, outputs = measure_case(impl, inputs, probes)
            except Exception as exc:  # OOM, a peer's unsupported option, a compile failure: record, go on
                harness.failure(record, exc)
            else:
                record.update(measured)
                harness.add_rates(record, matmul_tflops)
                rows = GPU_REFERENCE_ROWS
                record["diff_ref_rows_logprobs"] = harness.max_abs_diff(outputs.logprobs[:rows], reference_rows[0])
                record["diff_ref_rows_entropy"] = harness.max_abs_diff(
                    None if outputs.entropy is None else outputs.entropy[:rows], reference_rows[1])
                if anchor is None and impl.role == "subject":
                    anchor = outputs
                elif anchor is not None:
                    record["diff_rlloss_logprobs"] = harness.max_abs_diff(outputs.logprobs, anchor.logprobs)
                    record["diff_rlloss_entropy"] = harness.max_abs_diff(outputs.entropy, anchor.entropy)
                del outputs
            inputs.hidden.grad, inputs.weight.grad = None, None
            harness.free_device_memory(device)
            if floor is not None:
                harness.add_floor_ratios([record], floor)
            progress(_gpu_progress(index, total, record))
            records.append(record)
        del inputs, anchor
        harness.free_device_memory(device)
        if floor is not None:
            harness.add_floor_ratios(records[shape_start:], floor)
    return records


def _gpu_progress(index: int, total: int, record: Dict[str, Any]) -> str:
    head = f"[{index}/{total}] logprobs {record['impl']:<14} N={record['N']:<6} V={record['V']:<7}"
    if record["status"] != "ok":
        return f"{head}: {record['status']}: {record['error']}"
    fraction = record.get("matmul_fraction")
    text = (f"{head}: {harness.fmt_ms(record['time_ms'])} ms, {record['tflops']:.1f} TFLOP/s"
            + (f" ({100 * fraction:.0f}% of matmul)" if fraction else "")
            + (f", peak {harness.fmt_gib(record['peak_memory_bytes'])} GiB"
               if record.get("peak_memory_bytes") is not None else "")
            + (f", {record['time_vs_gemm_floor']:.2f}× the GEMM floor"
               if record.get("time_vs_gemm_floor") is not None and record["role"] != "floor" else ""))
    if record.get("diff_rlloss_logprobs") is not None:
        text += f", max|Δlogp| vs rlloss {record['diff_rlloss_logprobs']:.1e}"
    return text


def _gpu_columns() -> List[harness.Column]:
    C = harness.Column
    return [
        harness.IMPL_COLUMN,
        C("N", lambda r: str(r["N"])),
        C("V", lambda r: str(r["V"])),
        C("outputs", lambda r: r["outputs"]),
        harness.STATUS_COLUMN,
        C("fwd+bwd ms", lambda r: harness.fmt_ms(r.get("time_ms"))),
        C("TFLOP/s (8·N·D·V)", lambda r: harness.fmt_num(r.get("tflops"))),
        C("% of bf16 matmul", lambda r: "—" if r.get("matmul_fraction") is None
          else f"{100 * r['matmul_fraction']:.0f}"),
        C("time / GEMM floor", lambda r: harness.fmt_num(r.get("time_vs_gemm_floor"), 2)),
        C("peak memory (GiB)", lambda r: harness.fmt_gib(r.get("peak_memory_bytes"))),
        C("max abs diff logprobs vs rlloss", lambda r: harness.fmt_err(r.get("diff_rlloss_logprobs"))),
        C("entropy vs rlloss", lambda r: harness.fmt_err(r.get("diff_rlloss_entropy"))),
        C(f"logprobs vs fp32 ref ({GPU_REFERENCE_ROWS} rows)",
          lambda r: harness.fmt_err(r.get("diff_ref_rows_logprobs"))),
    ]


def run_gpu_peers(ctx: harness.RunContext) -> harness.SuiteReport:
    shapes = gpu_shapes(ctx.quick)
    dtype_name = harness.dtype_name(GPU_DTYPE)
    matmul_tflops = harness.reference_matmul_tflops(ctx, GPU_DTYPE)
    impls, skips = harness.split_available(GPU_IMPLEMENTATIONS, ctx.progress)
    records = compare_implementations(shapes, GPU_DTYPE, "cuda", impls, harness.CUDA_PROBES, ctx.progress,
                                      matmul_tflops, floor_gemms=harness.LOGPROBS_FLOOR_GEMMS)
    return harness.SuiteReport(
        suite="logprobs", mode="gpu-peers",
        title=f"logprobs — {ctx.device.name}: {dtype_name}, D={GPU_HIDDEN}, forward + backward",
        config={
            "shapes": [vars(shape) for shape in shapes], "dtype": dtype_name, "seed": SEED, "logit_std": LOGIT_STD,
            "matmul_tflops": matmul_tflops, "matmul_size": harness.MATMUL_REFERENCE_SIZE,
            "flops_convention": f"{FLOPS_PER_NDV}·N·D·V per forward + backward",
            "reference_rows": GPU_REFERENCE_ROWS, "floor_gemms": list(harness.LOGPROBS_FLOOR_GEMMS),
            "implementations": {impl.name: {"label": impl.label, "note": impl.note}
                                for impl in (*GPU_IMPLEMENTATIONS, GEMM_FLOOR)},
        },
        records=records, columns=_gpu_columns(), skips=skips,
        notes=[
            "Each case: one untimed warm-up call (kernel compilation, torch.compile, autotuning), one call for "
            "peak memory and the outputs, then timing. Forward + backward with random upstream gradients of "
            "every output the implementation returns (peers: log-probs only).",
            harness.CUDA_MEMORY_METHOD,
            f"Time: `triton.testing.do_bench` median (L2 cache flushed before every call; warm-up "
            f"{harness.DO_BENCH_WARMUP_MS} ms, repetitions {harness.DO_BENCH_REP_MS} ms); the JSON also holds "
            "the 20th/80th percentiles.",
            f"TFLOP/s counts {FLOPS_PER_NDV}·N·D·V FLOPs for forward + backward for every implementation (logits, "
            "d hidden, d weight and one logit recompute, 2·N·D·V each; naive really does 6, rlloss's kernels 10), so "
            f"it is a rescaled speed. The fraction is of a bf16 torch.matmul of {harness.MATMUL_REFERENCE_SIZE}³ "
            f"measured in the same run: {matmul_tflops:.0f} TFLOP/s.",
            "Peers compute cross-entropy, so their output is −log p (negated here) and they have no entropy; "
            "'vs rlloss' is the max abs difference of their log-probs from rlloss's over all tokens. "
            f"'vs fp32 ref' checks the first {GPU_REFERENCE_ROWS} tokens of every implementation against float32 "
            "logits of the same bf16 inputs.",
            harness.GEMM_FLOOR_NOTE + " Here the floor is four GEMMs (h·Wᵀ for the forward, h·Wᵀ again for the "
            "backward's logit recompute, dz·W, dzᵀ·h): exactly the 8·N·D·V FLOPs of the convention above, so its "
            "TFLOP/s is the GEMMs' real rate.",
        ] + [f"`{impl.name}`: {impl.note}" for impl in GPU_IMPLEMENTATIONS if impl.note],
    )


# --- pytest-benchmark cases (benchmarks/test_logprobs_bench.py) ---------------------------------------------


@dataclass(frozen=True)
class BenchCase:
    impl: Implementation
    shape: Shape
    dtype: torch.dtype
    device: str

    @property
    def id(self) -> str:
        return f"{self.impl.name}-N{self.shape.N}-D{self.shape.D}-V{self.shape.V}"


def bench_cases(device: str, quick: bool) -> List[BenchCase]:
    """The cases ``pytest benchmarks/ --benchmark-only`` times: the CPU default (or quick) sizes on CPU, the
    smallest GPU shape on CUDA."""
    if device == "cuda":
        return [BenchCase(impl, gpu_shapes(quick=True)[0], GPU_DTYPE, device) for impl in GPU_IMPLEMENTATIONS]
    shape = CPU_QUICK_SHAPE if quick else CPU_DEFAULT_SHAPE
    return [BenchCase(impl, shape, CPU_DTYPE, device) for impl in CPU_IMPLEMENTATIONS]


def bench_step(case: BenchCase) -> Callable[[], None]:
    """One synchronised forward + backward of ``case``, after an untimed warm-up call."""
    step = fwd_bwd_step(case.impl.make_forward(), make_inputs(case.shape, case.dtype, case.device),
                        case.impl.nll_sum_backward)
    return harness.synchronised(step, case.device)


# --- the suite ----------------------------------------------------------------------------------------------


SUITE = Suite(
    name="logprobs",
    description="token_logprobs fwd+bwd (logprobs + entropy): CPU torch backend vs naive; GPU triton vs peers "
                "and the 4-GEMM cuBLAS floor (time / floor)",
    run_cpu=run_cpu_default, run_gpu=run_gpu_peers,
)
