"""Suite ``prefix_model``: a whole transformers model, forward + backward of a policy loss on G completions of
one prompt — packed with shared-prefix attention (``SharedPrefixBatch`` + ``enable_shared_prefix``) against the
standard repeated-prompt batch ``[G, P+S]`` through the model's own SDPA attention.

GPU: a Qwen2-0.5B-shaped model (hidden 896, 24 layers, 14 query / 2 key-value heads of dim 64, MLP 4864,
vocabulary 151936, tied embeddings) with random weights (no download) in bfloat16, one prompt of P=4096 tokens
and G=16 completions of S=512 tokens. Cases:

- ``packed``: the packed stream ``[prompt | c_1 | … | c_G]`` (T = P + G·S tokens), shared-prefix attention on
  the default backend (the Triton kernels);
- ``packed-torch``: the same with the ``torch`` backend of ``shared_prefix_attention`` (autograd per segment);
- ``repeated``: the batch ``[G, P+S]`` with every prompt copied, ``attn_implementation="sdpa"`` (no padding:
  all completions have length S, the best case for the repeated batch) — the baseline;
- ``packed+ckpt`` / ``repeated+ckpt``: both again with gradient checkpointing of every decoder layer.

The loss is the same on every path and never runs on a prompt position: the final hidden states that predict
the G·S completion tokens (gathered on the packed stream, sliced on the repeated batch) go to
``rlloss.FusedPolicyLoss`` (DAPO preset, random advantages) with the tied lm_head. Each case records time
(``triton.testing.do_bench``), peak memory, the speed-up over ``repeated`` next to the ideal token-wise ratio
of docs/math.md §8 ``G(P+S)/(P+G·S)``, and the loss and parameter-gradient differences from ``packed``.
``--quick``: 4 layers of the same width, G=8, P=1024, S=256. The report's notes hold each packed row against
issue #12's targets: ≥ 3× the repeated step's speed at ≤ 0.4× its peak memory.

CPU default (no GPU): a smoke run of a tiny float32 model — ``packed`` on the ``torch`` backend against
``repeated`` — with time and the equality of loss and every parameter gradient, no memory figure.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Sequence

import torch
from torch import Tensor

from rlloss import FusedPolicyLoss, LossConfig, SharedPrefixBatch

from . import _harness as harness
from ._registry import Suite

# --- sizes and settings -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelShape:
    """A Qwen2-style decoder: hidden size, layers, query / key-value heads, MLP size, vocabulary."""

    name: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int

    def __str__(self) -> str:
        return (f"{self.name} (hidden {self.hidden}, {self.layers} layers, {self.heads}/{self.kv_heads} heads, "
                f"MLP {self.intermediate}, vocab {self.vocab})")


@dataclass(frozen=True)
class GroupShape:
    """One prompt of P tokens and G completions of S tokens."""

    G: int
    P: int
    S: int

    @property
    def packed_tokens(self) -> int:
        return self.P + self.G * self.S

    @property
    def repeated_tokens(self) -> int:
        return self.G * (self.P + self.S)

    def __str__(self) -> str:
        return f"G={self.G} P={self.P} S={self.S}"


QWEN2_05B = ModelShape("Qwen2-0.5B shape", hidden=896, layers=24, heads=14, kv_heads=2, intermediate=4864,
                       vocab=151936)
QWEN2_05B_QUICK = ModelShape("Qwen2-0.5B width, 4 layers", hidden=896, layers=4, heads=14, kv_heads=2,
                             intermediate=4864, vocab=151936)
GPU_GROUP = GroupShape(G=16, P=4096, S=512)
GPU_GROUP_QUICK = GroupShape(G=8, P=1024, S=256)
GPU_DTYPE = torch.bfloat16

CPU_MODEL = ModelShape("tiny", hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128, vocab=1000)
CPU_GROUP = GroupShape(G=4, P=96, S=24)
CPU_GROUP_QUICK = GroupShape(G=4, P=32, S=8)
CPU_DTYPE = torch.float32
CPU_WARMUP_CALLS = 1
CPU_TIMED_CALLS = 5

SEED = 0
# Issue #12's end-to-end targets for the packed step against the repeated-prompt step (same checkpointing).
TARGET_SPEEDUP = 3.0
TARGET_MEMORY_RATIO = 0.4


def ideal_tokenwise_speedup(group: GroupShape) -> float:
    """Tokens of the repeated batch over tokens of the packed stream (docs/math.md §8): the speed-up of every
    token-wise layer (projections, MLP, norms), an upper bound for the whole model when attention is cheap."""
    return group.repeated_tokens / group.packed_tokens


# --- model, inputs and one forward + backward -------------------------------------------------------------


def build_model(shape: ModelShape, dtype: torch.dtype, device: str):
    """A random-weight Qwen2ForCausalLM of ``shape`` (no download), in training mode, attention "sdpa"."""
    import transformers

    config = transformers.Qwen2Config(
        hidden_size=shape.hidden, num_hidden_layers=shape.layers, num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads, intermediate_size=shape.intermediate, vocab_size=shape.vocab,
        max_position_embeddings=32768, tie_word_embeddings=True, attention_dropout=0.0, use_cache=False,
    )
    torch.manual_seed(SEED)
    with torch.device(device):
        model = transformers.Qwen2ForCausalLM(config)
    model.set_attn_implementation("sdpa")
    return model.to(dtype).train()


class Inputs(NamedTuple):
    prompt: Tensor        # [P] int64
    completions: Tensor   # [G, S] int64
    advantages: Tensor    # [G] float32
    batch: SharedPrefixBatch


def make_inputs(group: GroupShape, vocab: int, device: str) -> Inputs:
    gen = torch.Generator(device="cpu").manual_seed(SEED)
    prompt = torch.randint(0, vocab, (group.P,), generator=gen)
    completions = torch.randint(0, vocab, (group.G, group.S), generator=gen)
    advantages = torch.randn(group.G, generator=gen)
    batch = SharedPrefixBatch.pack([prompt.to(device)], [list(completions.to(device).unbind(0))])
    return Inputs(prompt.to(device), completions.to(device), advantages.to(device), batch)


def completion_hidden_packed(model, inputs: Inputs) -> Tensor:
    hidden = model.model(**inputs.batch.model_inputs(), use_cache=False).last_hidden_state
    return inputs.batch.gather_hidden(hidden)                                         # [G, S, D]


def completion_hidden_repeated(model, inputs: Inputs) -> Tensor:
    G, P = inputs.completions.shape[0], inputs.prompt.numel()
    ids = torch.cat([inputs.prompt.expand(G, -1), inputs.completions], dim=1)          # [G, P+S]
    hidden = model.model(input_ids=ids, use_cache=False).last_hidden_state
    return hidden[:, P - 1: -1]                                                        # [G, S, D]


@dataclass(frozen=True)
class Case:
    """One way to run the model.

    role: "subject" (packed, rlloss) or "baseline" (repeated prompts, the model's own attention).
    backend: the shared_prefix_attention backend of a packed case (None: the device's default).
    """

    name: str
    role: str
    label: str
    packed: bool
    backend: Optional[str] = None
    checkpointing: bool = False


GPU_CASES = (
    Case("packed", "subject", "SharedPrefixBatch + enable_shared_prefix (Triton kernels)", True),
    Case("packed-torch", "subject", "SharedPrefixBatch + enable_shared_prefix(backend='torch')", True, "torch"),
    Case("repeated", "baseline", "[G, P+S] batch, attn_implementation='sdpa'", False),
    Case("packed+ckpt", "subject", "packed, gradient checkpointing", True, checkpointing=True),
    Case("repeated+ckpt", "baseline", "repeated, gradient checkpointing", False, checkpointing=True),
)
CPU_CASES = (
    Case("packed-torch", "subject", "SharedPrefixBatch + enable_shared_prefix(backend='torch')", True, "torch"),
    Case("repeated", "baseline", "[G, P+S] batch, attn_implementation='sdpa'", False),
)


class Outputs(NamedTuple):
    loss: Tensor
    grads: Dict[str, Tensor]


def configure(model, case: Case) -> None:
    """Put the model in the case's attention implementation and checkpointing mode."""
    from rlloss.integrations.transformers import disable_shared_prefix, enable_shared_prefix

    if case.packed:
        enable_shared_prefix(model, backend=case.backend)
    else:
        disable_shared_prefix(model)
    if case.checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_disable()


def fwd_bwd_step(model, case: Case, inputs: Inputs) -> Callable[[], Tensor]:
    """Forward + backward of the policy loss on the completion tokens; parameter gradients are dropped first,
    so every call allocates them anew (the peak includes them) and calls do not accumulate."""
    loss_fn = FusedPolicyLoss(LossConfig.preset("dapo"))
    batch = inputs.batch
    forward = completion_hidden_packed if case.packed else completion_hidden_repeated

    def step() -> Tensor:
        model.zero_grad(set_to_none=True)
        hidden = forward(model, inputs)
        loss = loss_fn(hidden, model.lm_head.weight, batch.targets, batch.mask, inputs.advantages).loss
        loss.backward()
        return loss.detach()

    return step


def collect(model, loss: Tensor) -> Outputs:
    return Outputs(loss.float().cpu(), {n: p.grad.detach().float().cpu() for n, p in model.named_parameters()
                                        if p.grad is not None})


def output_diffs(outputs: Outputs, anchor: Outputs) -> Dict[str, Any]:
    """|Δloss| and the largest relative parameter-gradient difference ‖Δg‖/‖g‖ over all parameters."""
    worst, worst_name = 0.0, None
    for name, grad in anchor.grads.items():
        other = outputs.grads.get(name)
        if other is None:
            return {"diff_loss": float((outputs.loss - anchor.loss).abs()), "grad_rel_diff": float("inf"),
                    "grad_rel_diff_param": f"{name} (no gradient)"}
        rel = float((other - grad).norm() / grad.norm().clamp(min=1e-30))
        if rel > worst:
            worst, worst_name = rel, name
    return {"diff_loss": float((outputs.loss - anchor.loss).abs()), "grad_rel_diff": worst,
            "grad_rel_diff_param": worst_name}


# --- measuring ------------------------------------------------------------------------------------------------


CPU_PROBES = harness.cpu_probes(CPU_WARMUP_CALLS, CPU_TIMED_CALLS)


def base_record(case: Case, model_shape: ModelShape, group: GroupShape, dtype: torch.dtype,
                device: str) -> Dict[str, Any]:
    return {
        "impl": case.name, "role": case.role, "label": case.label, "backend": case.backend,
        "checkpointing": case.checkpointing, "model": model_shape.name, **vars(group),
        "tokens": group.packed_tokens if case.packed else group.repeated_tokens,
        "completion_tokens": group.G * group.S, "ideal_tokenwise_speedup": ideal_tokenwise_speedup(group),
        "dtype": harness.dtype_name(dtype), "device": device, "status": "ok", "error": None,
    }


def add_speedups(records: Sequence[Dict[str, Any]]) -> None:
    """Speed-up and memory ratio of each row against the repeated batch with the same checkpointing mode."""
    baselines = {r["checkpointing"]: r for r in records if r["role"] == "baseline" and r["status"] == "ok"}
    for record in records:
        base = baselines.get(record["checkpointing"])
        if base is None or record["status"] != "ok" or record is base:
            continue
        record["speedup_vs_repeated"] = base["time_ms"] / record["time_ms"]
        record["fraction_of_ideal"] = record["speedup_vs_repeated"] / record["ideal_tokenwise_speedup"]
        if record.get("peak_memory_bytes") and base.get("peak_memory_bytes"):
            record["memory_vs_repeated"] = record["peak_memory_bytes"] / base["peak_memory_bytes"]


def compare_cases(model_shape: ModelShape, group: GroupShape, dtype: torch.dtype, device: str,
                  cases: Sequence[Case], probes: harness.Probes, progress: Callable[[str], None]) -> List[Dict[str, Any]]:
    """Every case on one model: a warm-up call (compiles), one call for peak memory and the outputs, then the
    timing; loss and gradients compared with the first subject's."""
    records = []
    try:
        model = build_model(model_shape, dtype, device)
        inputs = make_inputs(group, model_shape.vocab, device)
    except Exception as exc:  # the model itself does not fit
        for case in cases:
            records.append(harness.failure(base_record(case, model_shape, group, dtype, device), exc))
        return records
    anchor: Optional[Outputs] = None
    for index, case in enumerate(cases, start=1):
        record = base_record(case, model_shape, group, dtype, device)
        try:
            configure(model, case)
            step = fwd_bwd_step(model, case, inputs)
            step()
            model.zero_grad(set_to_none=True)
            harness.free_device_memory(device)
            peak, loss = probes.peak_memory(step)
            outputs = collect(model, loss)
            timing = probes.time(step)
        except Exception as exc:  # OOM above all: record it and go on
            harness.failure(record, exc)
        else:
            record.update(peak_memory_bytes=peak, loss=float(outputs.loss), **timing.as_record())
            record["completion_tokens_per_s"] = record["completion_tokens"] / (record["time_ms"] * 1e-3)
            if anchor is None and case.role == "subject":
                anchor = outputs
            elif anchor is not None:
                record.update(output_diffs(outputs, anchor))
            del outputs
        model.zero_grad(set_to_none=True)
        harness.free_device_memory(device)
        progress(_progress(index, len(cases), record))
        records.append(record)
    del model, inputs, anchor
    harness.free_device_memory(device)
    add_speedups(records)
    return records


def target_lines(records: Sequence[Dict[str, Any]]) -> List[str]:
    """One line per packed row: its speed-up over and memory against the repeated batch, each "met",
    "missed" or "not measured"."""
    def verdict(value: Optional[float], target: float, at_least: bool) -> str:
        if value is None:
            return "not measured"
        met = value >= target if at_least else value <= target
        return f"{value:.2f} ({'met' if met else 'missed'}, target {'≥' if at_least else '≤'} {target})"

    return [f"targets, `{r['impl']}`: speed-up vs repeated "
            f"{verdict(r.get('speedup_vs_repeated'), TARGET_SPEEDUP, True)}; memory vs repeated "
            f"{verdict(r.get('memory_vs_repeated'), TARGET_MEMORY_RATIO, False)}"
            for r in records if r["role"] == "subject"]


def _progress(index: int, total: int, record: Dict[str, Any]) -> str:
    head = f"[{index}/{total}] prefix_model {record['impl']:<14} G={record['G']} P={record['P']} S={record['S']}"
    if record["status"] != "ok":
        return f"{head}: {record['status']}: {record['error']}"
    text = f"{head}: {harness.fmt_ms(record['time_ms'])} ms"
    if record.get("peak_memory_bytes") is not None:
        text += f", peak {harness.fmt_gib(record['peak_memory_bytes'])} GiB"
    if record.get("grad_rel_diff") is not None:
        text += f", |Δloss| {record['diff_loss']:.1e}, max ‖Δgrad‖/‖grad‖ {record['grad_rel_diff']:.1e}"
    return text


def _columns(with_memory: bool) -> List[harness.Column]:
    C = harness.Column
    columns = [
        harness.IMPL_COLUMN,
        C("tokens", lambda r: str(r["tokens"])),
        harness.STATUS_COLUMN,
        C("fwd+bwd ms", lambda r: harness.fmt_ms(r.get("time_ms"))),
        C("speed-up vs repeated", lambda r: harness.fmt_num(r.get("speedup_vs_repeated"), 2)),
        C("ideal (token ratio)", lambda r: harness.fmt_num(r["ideal_tokenwise_speedup"], 2)),
        C("completion tokens/s", lambda r: harness.fmt_num(r.get("completion_tokens_per_s"), 0)),
    ]
    if with_memory:
        columns += [
            C("peak memory (GiB)", lambda r: harness.fmt_gib(r.get("peak_memory_bytes"))),
            C("memory vs repeated", lambda r: harness.fmt_num(r.get("memory_vs_repeated"), 2)),
        ]
    return columns + [
        C("|Δloss| vs packed", lambda r: harness.fmt_err(r.get("diff_loss"))),
        C("max ‖Δgrad‖/‖grad‖ vs packed", lambda r: harness.fmt_err(r.get("grad_rel_diff"))),
    ]


def _notes(group: GroupShape) -> List[str]:
    return [
        f"One prompt of P={group.P} tokens and G={group.G} completions of S={group.S} tokens: the packed stream "
        f"holds {group.packed_tokens} tokens, the repeated batch {group.repeated_tokens}. Forward + backward of "
        "the whole model and of rlloss.FusedPolicyLoss (DAPO preset, random advantages, on-policy) on the "
        "G·S completion tokens only: the hidden states that predict them are gathered on the packed stream and "
        "sliced from the repeated batch, so the lm_head never runs on a prompt position in either case.",
        "ideal (token ratio): G(P+S)/(P+G·S) of docs/math.md §8, the speed-up of every token-wise layer; attention's "
        "own ratio differs, and the loss costs the same in every case. fraction_of_ideal in the JSON is the "
        "speed-up over that ratio.",
        "|Δloss| and max ‖Δgrad‖/‖grad‖ (over every parameter tensor, its name in the JSON) compare each case "
        "with `packed` (the first subject); the two compute the same function, so they differ by rounding only.",
        "The repeated batch has no padding (every completion has S tokens), its best case; with variable "
        "lengths it would also pay for padding.",
    ]


def run_cpu_default(ctx: harness.RunContext) -> harness.SuiteReport:
    group = CPU_GROUP_QUICK if ctx.quick else CPU_GROUP
    records = compare_cases(CPU_MODEL, group, CPU_DTYPE, "cpu", CPU_CASES, CPU_PROBES, ctx.progress)
    return harness.SuiteReport(
        suite="prefix_model", mode="cpu-default",
        title=f"prefix_model — CPU smoke run: {CPU_MODEL}, {group}, float32, forward + backward",
        config={"model": vars(CPU_MODEL), "group": vars(group), "dtype": "float32", "seed": SEED,
                "warmup_calls": CPU_WARMUP_CALLS, "timed_calls": CPU_TIMED_CALLS,
                "cases": {case.name: case.label for case in CPU_CASES}},
        records=records, columns=_columns(with_memory=False),
        notes=_notes(group) + [
            f"Time: median of {CPU_TIMED_CALLS} calls after {CPU_WARMUP_CALLS} warm-up call, in the benchmark's "
            f"own process, {torch.get_num_threads()} torch threads. No memory figure on CPU. A smoke run of the "
            "code path and of the equality, not a performance claim: the GPU run is the measurement.",
        ],
    )


def run_gpu(ctx: harness.RunContext) -> harness.SuiteReport:
    model_shape = QWEN2_05B_QUICK if ctx.quick else QWEN2_05B
    group = GPU_GROUP_QUICK if ctx.quick else GPU_GROUP
    dtype_name = harness.dtype_name(GPU_DTYPE)
    records = compare_cases(model_shape, group, GPU_DTYPE, "cuda", GPU_CASES, harness.CUDA_PROBES, ctx.progress)
    return harness.SuiteReport(
        suite="prefix_model", mode="gpu",
        title=f"prefix_model — {ctx.device.name}: {model_shape}, {group}, {dtype_name}, forward + backward",
        config={"model": vars(model_shape), "group": vars(group), "dtype": dtype_name, "seed": SEED,
                "cases": {case.name: case.label for case in GPU_CASES}},
        records=records, columns=_columns(with_memory=True),
        notes=_notes(group) + [
            "Each case: one untimed warm-up call (Triton compilation), one call for peak memory and the outputs, "
            "then timing, all on one random-weight model switched between cases (enable_shared_prefix / "
            "disable_shared_prefix, gradient checkpointing on or off).",
            harness.CUDA_MEMORY_METHOD + " The model's weights are allocated before; its parameter gradients are "
            "dropped before every call, so each call's peak includes allocating them.",
            harness.CUDA_TIME_NOTE,
            "speed-up and memory vs repeated: against the repeated batch with the same checkpointing mode.",
        ] + target_lines(records),
    )


# --- the suite ------------------------------------------------------------------------------------------------


SUITE = Suite(
    name="prefix_model",
    description="whole-model fwd+bwd, G completions of one prompt: packed shared-prefix vs repeated-prompt SDPA "
                "(GPU: Qwen2-0.5B shape, G=16 P=4096 S=512)",
    run_cpu=run_cpu_default, run_gpu=run_gpu,
)
