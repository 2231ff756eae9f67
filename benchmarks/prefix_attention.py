"""Suite ``prefix_attention``: ``rlloss.shared_prefix_attention`` (one prompt held once for its G completions),
forward + backward with a random upstream gradient, against the ways a trainer runs the same attention today.

GPU: bfloat16, Hq=32, Hkv=8, d=128, one prompt of P tokens and G completions of S tokens each, for
G ∈ {8, 16}, P ∈ {1024, 4096, 16384}, S ∈ {256, 512, 2048}:

- ``rlloss-triton``: the Triton kernels on the packed stream ``[prompt | c_1 | … | c_G]``;
- ``rlloss-triton-fused-dq``: the same with ``deterministic=False`` (dQ inside the dK/dV pass, atomics);
- ``sdpa-repeated``: ``torch.nn.functional.scaled_dot_product_attention`` restricted to the flash backend on
  the repeated-prompt batch ``[G, P+S]`` (what a trainer without prefix sharing runs) — the baseline;
- ``flex``: FlexAttention (``torch.nn.attention.flex_attention``, compiled) on the packed stream with the
  equivalent block mask;
- ``prefix-grouper``: PrefixGrouper from PyPI (``prefix_grouper``) on the packed stream, its attention
  function flash-attn when it imports, else SDPA with a lower-right causal mask; skipped where it does not
  import.

Every case reports time (``triton.testing.do_bench``), peak memory, the speed-up over ``sdpa-repeated`` next
to the ideal attention FLOP ratio of docs/math.md §8 and over ``flex``, each rlloss row against issue #12's targets
(≥ 0.8 of the ideal speed-up, ≥ 1.3× FlexAttention) in the report's notes, and the max abs difference of
each implementation's output and gradients (mapped onto the packed stream, a prompt's gradients summed over
its copies) from rlloss's.

CPU default (no GPU): the ``torch`` backend against SDPA on the repeated-prompt batch, float32, in the
benchmark's own process (time and equality with a float64 reference, no memory figure), so that
``python -m benchmarks`` stays short on a CPU: one prompt and four completions (tiny under ``--quick``), and the
many-short-completions batch of a GRPO toy loop — 16 prompts of 32 tokens, each with 8 completions of 3 tokens
(144 segments) — where a per-segment implementation loses to the repeated batch.
"""
from __future__ import annotations

import itertools
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

import rlloss
from rlloss import reference

from . import _harness as harness
from ._registry import Suite

# --- sizes and settings -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Shape:
    """``groups`` prompts of P tokens, each with G completions of S tokens; Hq query and Hkv key/value heads of
    dim d."""

    G: int
    P: int
    S: int
    Hq: int
    Hkv: int
    d: int
    groups: int = 1

    @property
    def T(self) -> int:
        """Tokens of the packed stream."""
        return self.groups * (self.P + self.G * self.S)

    def __str__(self) -> str:
        head = f"groups={self.groups} " if self.groups > 1 else ""
        return f"{head}G={self.G} P={self.P} S={self.S} Hq={self.Hq} Hkv={self.Hkv} d={self.d}"


GPU_GROUPS = (8, 16)
GPU_PROMPTS = (1024, 4096, 16384)
GPU_COMPLETIONS = (256, 512, 2048)
GPU_QUICK = ((16, 1024, 512), (16, 4096, 512))
GPU_HEADS = (32, 8)
GPU_HEAD_DIM = 128
GPU_DTYPE = torch.bfloat16

CPU_DEFAULT_SHAPE = Shape(G=4, P=128, S=32, Hq=4, Hkv=2, d=64)
CPU_QUICK_SHAPE = Shape(G=4, P=32, S=8, Hq=4, Hkv=2, d=64)
# Issue #12's GRPO toy loop: 16 groups × 8 completions of 3 tokens (144 segments); run in both modes.
CPU_MANY_SHORT_SHAPE = Shape(G=8, P=32, S=3, Hq=4, Hkv=2, d=64, groups=16)
CPU_DTYPE = torch.float32
CPU_WARMUP_CALLS = 1
CPU_TIMED_CALLS = 7

# Forward FLOPs are 4·d per (query, key) pair and head (Q·Kᵀ and P·V); the backward does 2.5 times that (dV,
# dP, dQ, dK and the recomputed Q·Kᵀ). Every implementation is credited with the pairs the shared layout
# needs, so TFLOP/s is a rescaled speed that compares across implementations.
FWD_BWD_FLOP_FACTOR = 3.5
SEED = 0


def gpu_shapes(quick: bool) -> List[Shape]:
    triples = GPU_QUICK if quick else itertools.product(GPU_GROUPS, GPU_PROMPTS, GPU_COMPLETIONS)
    return [Shape(G, P, S, *GPU_HEADS, GPU_HEAD_DIM) for G, P, S in triples]


def layout_of(shape: Shape, device: str) -> rlloss.SharedPrefixLayout:
    return rlloss.SharedPrefixLayout.from_groups([shape.P] * shape.groups, [[shape.S] * shape.G] * shape.groups,
                                                 device=device)


def ideal_attention_ratio(shape: Shape) -> float:
    """FLOPs of the repeated-prompt batch over those of the shared layout: (G(P+S)²) / (P² + G·S(2P+S)), the
    same for any number of equal groups."""
    G, P, S = shape.G, shape.P, shape.S
    return G * (P + S) ** 2 / (P**2 + G * S * (2 * P + S))


def useful_flops(shape: Shape) -> float:
    """Forward + backward FLOPs of the visible (query, key) pairs of the shared layout."""
    return FWD_BWD_FLOP_FACTOR * layout_of(shape, "cpu").attention_flops(shape.d, shape.Hq)


# --- inputs, outputs and the mapping between the packed stream and the repeated batch -----------------------


class Inputs(NamedTuple):
    """The packed stream: q [T, Hq, d], k, v [T, Hkv, d], upstream gradient do [T, Hq, d]."""

    q: Tensor
    k: Tensor
    v: Tensor
    do: Tensor
    shape: Shape


class Outputs(NamedTuple):
    """Output and gradients on the packed stream (a prompt row's gradient summed over its copies)."""

    out: Tensor
    dq: Tensor
    dk: Tensor
    dv: Tensor


def make_inputs(shape: Shape, dtype: torch.dtype, device: str, seed: int = SEED) -> Inputs:
    gen = torch.Generator(device=device).manual_seed(seed)

    def randn(heads: int) -> Tensor:
        return torch.randn(shape.T, heads, shape.d, generator=gen, device=device, dtype=torch.float32).to(dtype)

    return Inputs(randn(shape.Hq), randn(shape.Hkv), randn(shape.Hkv), randn(shape.Hq), shape)


def repeated_rows(shape: Shape, device) -> Tensor:
    """[groups·G, P+S] packed-stream row of every token of the repeated batch (the prompt's rows in every copy
    of its group)."""
    rows = []
    for group in range(shape.groups):
        prompt = group * (shape.P + shape.G * shape.S) + torch.arange(shape.P, device=device)
        rows += [torch.cat([prompt, prompt[-1] + 1 + g * shape.S + torch.arange(shape.S, device=device)])
                 for g in range(shape.G)]
    return torch.stack(rows)


def to_repeated(x: Tensor, rows: Tensor) -> Tensor:
    """[T, H, d] packed → [groups·G, H, P+S, d] repeated batch, contiguous."""
    return x[rows].transpose(1, 2).contiguous()


def from_repeated(x: Tensor, shape: Shape, reduce: bool) -> Tensor:
    """[groups·G, H, P+S, d] → [T, H, d] float32: a prompt row summed over its G copies (``reduce``, for
    gradients) or taken from the first copy (outputs, equal in every copy)."""
    x = x.transpose(1, 2).float()                                                  # [groups·G, P+S, H, d]
    x = x.reshape(shape.groups, shape.G, *x.shape[1:])
    prompt = x[:, :, : shape.P].sum(1) if reduce else x[:, 0, : shape.P]           # [groups, P, H, d]
    completions = x[:, :, shape.P:].reshape(shape.groups, shape.G * shape.S, *x.shape[3:])
    return torch.cat([prompt, completions], dim=1).reshape(shape.T, *x.shape[3:])


def repeated_upstream(do: Tensor, rows: Tensor, shape: Shape) -> Tensor:
    """The repeated batch's upstream gradient: each copy of a prompt row gets 1/G of the packed one, so the
    summed gradients equal the packed stream's."""
    share = torch.ones(shape.P + shape.S, device=do.device)
    share[: shape.P] = 1.0 / shape.G
    return (do[rows].float() * share[None, :, None, None]).to(do.dtype).transpose(1, 2).contiguous()


def heads_first(x: Tensor) -> Tensor:
    """[T, H, d] packed → [1, H, T, d] contiguous (FlexAttention's and PrefixGrouper's layout)."""
    return x.transpose(0, 1)[None].contiguous()


# --- implementations --------------------------------------------------------------------------------------


class Prepared(NamedTuple):
    """``step`` runs one forward + backward on the implementation's own input layout (what is timed; it
    starts by dropping the previous call's output and gradients); ``collect`` maps the last step's output and
    gradients onto the packed stream; ``clear`` drops them (before a memory measurement); ``setup_ms`` is the
    one-off cost of building its mask or layout, outside the timed step."""

    step: Callable[[], None]
    collect: Callable[[], Outputs]
    clear: Callable[[], None]
    setup_ms: float
    info: Optional[Dict[str, Any]] = None  # filled by the steps (e.g. which kernel path ran), goes to the record


@dataclass(frozen=True)
class Implementation:
    """One contender. role: "subject" (rlloss), "baseline" (SDPA on repeated prompts) or "peer"."""

    name: str
    role: str
    label: str
    prepare: Callable[[Inputs], Prepared]
    unavailable: Callable[[], Optional[str]] = lambda: None
    note: str = ""


def _leaves(*xs: Tensor) -> List[Tensor]:
    return [x.detach().clone().requires_grad_() for x in xs]


def _clear(last: Dict[str, Tensor], *leaves: Tensor) -> Callable[[], None]:
    def clear() -> None:
        last.clear()
        for x in leaves:
            x.grad = None

    return clear


def _timed_ms(fn: Callable[[], Any]) -> Tuple[float, Any]:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    result = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return (time.perf_counter() - start) * 1e3, result


def rlloss_implementation(backend: str, deterministic: bool = True) -> Implementation:
    def prepare(inputs: Inputs) -> Prepared:
        q, k, v = _leaves(inputs.q, inputs.k, inputs.v)
        setup_ms, layout = _timed_ms(lambda: layout_of(inputs.shape, str(q.device)))
        if backend in ("triton", "interpret"):  # the tables of every block size the kernels may choose
            from rlloss.kernels import prefix_attention as kernels

            for tuned, tiled in ((kernels._fwd, "BLOCK_M"), (kernels._dq, "BLOCK_M"), (kernels._dkdv, "BLOCK_N")):
                ms, _ = _timed_ms(lambda: layout.kernel_tables(kernels._tiled_blocks(tuned, tiled)))
                setup_ms += ms
        info = None
        if backend == "torch":  # its plan: query blocks, buckets, and the intra-op threads it runs on
            from rlloss import prefix_attention as module

            ms, plan = _timed_ms(lambda: module._torch_plan(layout, (q.shape[1], k.shape[1], q.shape[2])))
            setup_ms += ms
            info = {"query_block": plan["block"], "buckets": len(plan["masks"]),
                    "intra_op_threads": module._torch_threads(plan)}
        last: Dict[str, Tensor] = {}
        clear = _clear(last, q, k, v)

        def step() -> None:
            clear()
            out = rlloss.shared_prefix_attention(q, k, v, layout, backend=backend, deterministic=deterministic)
            out.backward(inputs.do)
            last["out"] = out.detach()

        def collect() -> Outputs:
            return Outputs(last["out"].float(), q.grad.float(), k.grad.float(), v.grad.float())

        return Prepared(step, collect, clear, setup_ms, info)

    if deterministic:
        return Implementation(f"rlloss-{backend}", "subject", f"rlloss.shared_prefix_attention, backend={backend!r}",
                              prepare)
    return Implementation(f"rlloss-{backend}-fused-dq", "subject", f"rlloss.shared_prefix_attention, backend="
                          f"{backend!r}, deterministic=False (dQ inside the dK/dV pass, float32 atomics)", prepare)


def _sdpa_repeated(flash_only: bool) -> Callable[[Inputs], Prepared]:
    def prepare(inputs: Inputs) -> Prepared:
        shape = inputs.shape
        rows = repeated_rows(shape, inputs.q.device)
        q, k, v = _leaves(*(to_repeated(x, rows) for x in (inputs.q, inputs.k, inputs.v)))
        do = repeated_upstream(inputs.do, rows, shape)
        last: Dict[str, Tensor] = {}
        clear = _clear(last, q, k, v)
        group = q.shape[1] // k.shape[1]
        info = {"kv_heads": "enable_gqa" if flash_only else "repeated"}

        def attend() -> Tensor:
            if info["kv_heads"] == "enable_gqa":
                return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
            return F.scaled_dot_product_attention(q, k.repeat_interleave(group, 1), v.repeat_interleave(group, 1),
                                                  is_causal=True)

        def step() -> None:
            clear()
            if flash_only:
                from torch.nn.attention import SDPBackend, sdpa_kernel

                with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                    try:
                        out = attend()
                    except RuntimeError:  # a flash build without grouped-query support: repeat K/V heads
                        if info["kv_heads"] != "enable_gqa":
                            raise
                        info["kv_heads"] = "repeated (the flash backend refused enable_gqa)"
                        out = attend()
            else:
                out = attend()
            out.backward(do)
            last["out"] = out.detach()

        def collect() -> Outputs:
            return Outputs(from_repeated(last["out"], shape, reduce=False), from_repeated(q.grad, shape, True),
                           from_repeated(k.grad, shape, True), from_repeated(v.grad, shape, True))

        return Prepared(step, collect, clear, 0.0, info)

    return prepare


SDPA_REPEATED = Implementation(
    "sdpa-repeated", "baseline", "F.scaled_dot_product_attention, flash backend only, is_causal, enable_gqa, on "
    "the repeated-prompt batch [G, Hq, P+S, d]", _sdpa_repeated(flash_only=True),
    note="the prompt is repeated in every sequence (G copies of its Q, K, V and their gradients)",
)
SDPA_REPEATED_CPU = Implementation(
    "sdpa-repeated", "baseline", "F.scaled_dot_product_attention, is_causal, K/V heads repeated, on the "
    "repeated-prompt batch [groups·G, Hq, P+S, d]", _sdpa_repeated(flash_only=False),
)


def _segment_tables(shape: Shape, device) -> Tuple[Tensor, Tensor]:
    """(segment id [T], parent segment of each segment [S], −2 for a prompt) of the packed stream."""
    lengths = ([shape.P] + [shape.S] * shape.G) * shape.groups
    index = torch.arange(len(lengths), device=device)
    segment = torch.repeat_interleave(index, torch.tensor(lengths, device=device))
    prompt = index // (shape.G + 1) * (shape.G + 1)  # the prompt segment of each segment's group
    parent = torch.where(prompt == index, -2, prompt)
    return segment, parent


def flex_visibility(shape: Shape, device) -> Callable:
    """FlexAttention's ``mask_mod`` of the packed stream: a query sees its own segment's keys up to itself
    and every key of its segment's parent (the prompt)."""
    segment, parent = _segment_tables(shape, device)

    def visible(b, h, q_idx, kv_idx):
        same = (segment[q_idx] == segment[kv_idx]) & (kv_idx <= q_idx)
        return same | (segment[kv_idx] == parent[segment[q_idx]])

    return visible


def _flex(inputs: Inputs) -> Prepared:
    import torch._dynamo
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    shape = inputs.shape
    visible = flex_visibility(shape, inputs.q.device)
    setup_ms, block_mask = _timed_ms(lambda: create_block_mask(visible, B=None, H=None, Q_LEN=shape.T,
                                                               KV_LEN=shape.T, device=inputs.q.device))
    torch._dynamo.reset()  # a fresh graph cache per shape: no recompile limit, no fallback to eager
    attend = torch.compile(flex_attention, dynamic=False)
    q, k, v = _leaves(*(heads_first(x) for x in (inputs.q, inputs.k, inputs.v)))
    do = heads_first(inputs.do)
    last: Dict[str, Tensor] = {}
    clear = _clear(last, q, k, v)

    def step() -> None:
        clear()
        out = attend(q, k, v, block_mask=block_mask, enable_gqa=True)
        out.backward(do)
        last["out"] = out.detach()

    def collect() -> Outputs:
        packed = lambda x: x[0].transpose(0, 1).float()  # noqa: E731
        return Outputs(packed(last["out"]), packed(q.grad), packed(k.grad), packed(v.grad))

    return Prepared(step, collect, clear, setup_ms)


FLEX = Implementation(
    "flex", "peer", "torch.compile(flex_attention) on the packed stream [1, Hq, T, d], block mask of the same "
    "visibility, enable_gqa", _flex, harness.import_error("torch.nn.attention.flex_attention", "torch>=2.5"),
    note="compile and autotuning happen in the untimed warm-up call; block-mask construction is the setup time",
)


def _grouper_attention() -> Tuple[Callable[..., Tensor], str]:
    """The attention function PrefixGrouper calls twice (prefix self-attention, suffix concat-attention):
    q [b, Hq, Lq, d], k, v [b, Hkv, Lk, d] → [b, Lq, Hq, d], causal aligned to the bottom right (a suffix's
    first query sees every prefix key). The benchmark's groups have no padding, so the padding mask it passes
    is all ones and is not applied."""
    try:
        from flash_attn import flash_attn_func
    except Exception:  # no flash-attn wheel: SDPA with a lower-right causal bias
        from torch.nn.attention.bias import causal_lower_right

        def sdpa_attention(q, k, v, attn_mask, *args, **kwargs):
            if q.shape[2] == k.shape[2]:
                out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
            else:
                group = q.shape[1] // k.shape[1]
                bias = causal_lower_right(q.shape[2], k.shape[2])
                out = F.scaled_dot_product_attention(q, k.repeat_interleave(group, 1), v.repeat_interleave(group, 1),
                                                     attn_mask=bias)
            return out.transpose(1, 2)

        return sdpa_attention, ("SDPA (is_causal for the prefix; a lower-right causal bias with K/V heads repeated "
                                "for the suffixes: flash-attn is not installed)")

    def flash_attention(q, k, v, attn_mask, *args, **kwargs):
        return flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=True)

    return flash_attention, "flash_attn.flash_attn_func(causal=True) (bottom-right causal, native GQA)"


def _prefix_grouper(inputs: Inputs) -> Prepared:
    from prefix_grouper import PrefixGrouper

    shape = inputs.shape
    if shape.groups != 1:
        raise NotImplementedError("this adapter packs one group per stream")
    setup_ms, grouper = _timed_ms(lambda: PrefixGrouper([[shape.P] + [shape.S] * shape.G], device=inputs.q.device,
                                                        padding_mode="right"))
    if not bool(grouper.padding_mask.all()):
        raise RuntimeError("PrefixGrouper padded the group; this adapter does not apply padding masks")
    attention, _ = _grouper_attention()
    q, k, v = _leaves(*(heads_first(x) for x in (inputs.q, inputs.k, inputs.v)))
    do = inputs.do[None]  # its output is [b, T, Hq, d]
    last: Dict[str, Tensor] = {}
    clear = _clear(last, q, k, v)

    def step() -> None:
        clear()
        out = grouper.forward(attention, q, k, v)
        out.backward(do)
        last["out"] = out.detach()

    def collect() -> Outputs:
        packed = lambda x: x[0].transpose(0, 1).float()  # noqa: E731
        return Outputs(last["out"][0].float(), packed(q.grad), packed(k.grad), packed(v.grad))

    return Prepared(step, collect, clear, setup_ms)


def _prefix_grouper_note() -> str:
    try:
        return "its attention function: " + _grouper_attention()[1] + "; it repeats the prompt's K/V per completion"
    except Exception as exc:  # noqa: BLE001 - the note must never fail the suite
        return f"attention function unavailable ({harness.describe_error(exc, 120)})"


PREFIX_GROUPER = Implementation(
    "prefix-grouper", "peer", "prefix_grouper.PrefixGrouper.forward on the packed stream [1, Hq, T, d]",
    _prefix_grouper, harness.import_error("prefix_grouper", "prefix_grouper"),
)

CPU_IMPLEMENTATIONS = (rlloss_implementation("torch"), SDPA_REPEATED_CPU)
GPU_IMPLEMENTATIONS = (rlloss_implementation("triton"), rlloss_implementation("triton", deterministic=False),
                       SDPA_REPEATED, FLEX, PREFIX_GROUPER)
# Issue #12's GPU targets for the kernels: a speed-up over sdpa-repeated of at least this fraction of the
# ideal FLOP ratio, and at least this speed-up over FlexAttention on the same layout.
TARGET_FRACTION_OF_IDEAL = 0.8
TARGET_SPEEDUP_VS_FLEX = 1.3


# --- comparing outputs and records -----------------------------------------------------------------------------


def float64_reference(inputs: Inputs) -> Outputs:
    """The dense float64 oracle on the packed stream (CPU default sizes only: it holds a [T, T] mask)."""
    shape = inputs.shape
    layout = layout_of(shape, str(inputs.q.device))
    q, k, v = (x.detach().double().requires_grad_() for x in (inputs.q, inputs.k, inputs.v))
    out = reference.shared_prefix_attention(q, k, v, layout.dense_mask(), scale=shape.d ** -0.5)
    out.backward(inputs.do.double())
    return Outputs(out.detach(), q.grad, k.grad, v.grad)


def base_record(impl: Implementation, shape: Shape, dtype: torch.dtype, device: str) -> Dict[str, Any]:
    return {
        "impl": impl.name, "role": impl.role, "label": impl.label, "note": impl.note, **vars(shape), "T": shape.T,
        "dtype": harness.dtype_name(dtype), "device": device, "useful_flops": useful_flops(shape),
        "ideal_attention_ratio": ideal_attention_ratio(shape), "status": "ok", "error": None,
    }


def add_speedups(records: Sequence[Dict[str, Any]]) -> None:
    """Speed-up of every record over ``sdpa-repeated`` (and over ``flex``) of its own shape, and the
    fraction of the ideal attention ratio it reaches."""
    def key(r):
        return (r.get("groups", 1), r["G"], r["P"], r["S"])

    times = {(key(r), r["impl"]): r["time_ms"] for r in records if r["status"] == "ok"}
    for r in records:
        if r["status"] != "ok":
            continue
        baseline, flex = times.get((key(r), "sdpa-repeated")), times.get((key(r), "flex"))
        r["speedup_vs_sdpa"] = baseline / r["time_ms"] if baseline else None
        r["fraction_of_ideal"] = r["speedup_vs_sdpa"] / r["ideal_attention_ratio"] if baseline else None
        r["speedup_vs_flex"] = flex / r["time_ms"] if flex else None


# --- CPU default ----------------------------------------------------------------------------------------------

def measure_cpu_shape(shape: Shape, progress: Callable[[str], None]) -> List[Dict[str, Any]]:
    """In this process (the cases are small): every CPU implementation on ``shape``, their timed calls
    interleaved round by round (load from other processes slows them alike), and the max abs differences of
    each from the float64 reference. An implementation that fails is recorded and left out of the timing."""
    expected = float64_reference(make_inputs(shape, CPU_DTYPE, "cpu"))
    tiny = Shape(G=2, P=8, S=4, Hq=shape.Hq, Hkv=shape.Hkv, d=shape.d)
    records, steps, prepared = {}, {}, {}
    for impl in CPU_IMPLEMENTATIONS:
        records[impl.name] = base_record(impl, shape, CPU_DTYPE, "cpu")
        try:
            impl.prepare(make_inputs(tiny, CPU_DTYPE, "cpu")).step()  # start the thread pools
            prepared[impl.name] = impl.prepare(make_inputs(shape, CPU_DTYPE, "cpu"))
            prepared[impl.name].step()
            steps[impl.name] = prepared[impl.name].step
        except Exception as exc:  # record, go on
            harness.failure(records[impl.name], exc)
    progress(f"prefix_attention {' / '.join(steps)}: {shape}, {CPU_TIMED_CALLS} timed calls each, interleaved")
    timings = harness.cpu_times_interleaved(steps, CPU_WARMUP_CALLS, CPU_TIMED_CALLS) if steps else {}
    for name, timing in timings.items():
        records[name].update(**timing.as_record(), setup_ms=prepared[name].setup_ms, **(prepared[name].info or {}),
                             **harness.output_diffs(prepared[name].collect(), expected, "diff"))
    return list(records.values())


def _cpu_columns() -> List[harness.Column]:
    C = harness.Column
    return [
        harness.IMPL_COLUMN,
        C("groups", lambda r: str(r["groups"])),
        C("G", lambda r: str(r["G"])),
        C("P", lambda r: str(r["P"])),
        C("S", lambda r: str(r["S"])),
        harness.STATUS_COLUMN,
        C("fwd+bwd ms (median)", lambda r: harness.fmt_ms(r.get("time_ms"))),
        harness.time_spread_column("min–max ms"),
        C("speed-up vs sdpa-repeated", lambda r: harness.fmt_num(r.get("speedup_vs_sdpa"), 2)),
        C("ideal (FLOP ratio)", lambda r: harness.fmt_num(r["ideal_attention_ratio"], 2)),
        C("fraction of ideal", lambda r: harness.fmt_num(r.get("fraction_of_ideal"), 2)),
        C("threads", lambda r: str(r.get("intra_op_threads", "—"))),
        C("max abs diff out vs float64", lambda r: harness.fmt_err(r.get("diff_out"))),
        C("dq", lambda r: harness.fmt_err(r.get("diff_dq"))),
        C("dk", lambda r: harness.fmt_err(r.get("diff_dk"))),
        C("dv", lambda r: harness.fmt_err(r.get("diff_dv"))),
    ]


def cpu_shapes(quick: bool) -> List[Shape]:
    return [CPU_QUICK_SHAPE if quick else CPU_DEFAULT_SHAPE, CPU_MANY_SHORT_SHAPE]


def run_cpu_default(ctx: harness.RunContext) -> harness.SuiteReport:
    shapes = cpu_shapes(ctx.quick)
    records = []
    for shape, case in zip(shapes, ("one group", "many short completions")):
        records += [dict(record, case=case) for record in measure_cpu_shape(shape, ctx.progress)]
    add_speedups(records)
    dtype_name = harness.dtype_name(CPU_DTYPE)
    return harness.SuiteReport(
        suite="prefix_attention", mode="cpu-default",
        title=f"prefix_attention — CPU default: {'; '.join(map(str, shapes))}, {dtype_name}, forward + backward",
        config={"shapes": [dict(vars(shape), T=shape.T, ideal_attention_ratio=ideal_attention_ratio(shape))
                           for shape in shapes],
                "dtype": dtype_name, "warmup_calls": CPU_WARMUP_CALLS, "timed_calls": CPU_TIMED_CALLS, "seed": SEED,
                "diff_reference": "float64 rlloss.reference (dense mask), autograd", "plot": {"facet": "case"}},
        records=records, columns=_cpu_columns(),
        notes=[
            "Keeps `python -m benchmarks` short on a CPU: equality and time at two small shapes, no memory figure. "
            "The Triton kernels do not run on a CPU (the interpreter is a test tool); the GPU table is the "
            "comparison of the kernels.",
            "`rlloss-torch` runs query blocks of the packed stream (every prompt once) against the keys each "
            "block sees, a masked SDPA call per bucket of blocks with similar key counts; `sdpa-repeated` runs "
            "causal SDPA on the repeated-prompt batch [groups·G, P+S]. Both get the same random upstream "
            "gradient (each prompt copy 1/G of it); their gradients are mapped onto the packed stream (a "
            "prompt's summed over its copies) and compared with the float64 reference.",
            f"Time: median of {CPU_TIMED_CALLS} calls after {CPU_WARMUP_CALLS} warm-up call, the two "
            f"implementations' calls interleaved, in the benchmark's process; {torch.get_num_threads()} torch "
            "threads. threads: the intra-op threads `rlloss-torch` ran on (all of them, but where other "
            "processes keep cores busy — load average less its own busy threads, plus its threads, ≥ cores + "
            "0.5 — at most one per 4 ms of estimated work); `sdpa-repeated` runs on all of them.",
            "ideal: the attention FLOP ratio of docs/math.md §8, G(P+S)² / (P² + G·S(2P+S)) (the same for any number "
            "of equal groups).",
        ],
    )


# --- GPU comparison -------------------------------------------------------------------------------------------


def compare_implementations(shapes: Sequence[Shape], dtype: torch.dtype, device: str,
                            impls: Sequence[Implementation], probes: harness.Probes,
                            progress: Callable[[str], None]) -> List[Dict[str, Any]]:
    """Every implementation on every shape: a warm-up call (compiles), one call for peak memory and the
    outputs, then the timing; every output is compared with the first subject's."""
    records, total, index = [], len(shapes) * len(impls), 0
    for shape in shapes:
        try:
            inputs = make_inputs(shape, dtype, device)
        except Exception as exc:  # the inputs themselves do not fit
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
            prepared = None
            try:
                prepared = impl.prepare(inputs)
                prepared.step()
                prepared.clear()
                peak, _ = probes.peak_memory(prepared.step)
                outputs = prepared.collect()
                timing = probes.time(prepared.step)
            except Exception as exc:  # OOM, a peer's unsupported option, a compile failure: record, go on
                harness.failure(record, exc)
            else:
                record.update(peak_memory_bytes=peak, setup_ms=prepared.setup_ms, **(prepared.info or {}),
                              **timing.as_record())
                record["tflops"] = record["useful_flops"] / (record["time_ms"] * 1e-3) / 1e12
                if anchor is None and impl.role == "subject":
                    anchor = outputs
                elif anchor is not None:
                    record.update(harness.output_diffs(outputs, anchor, "diff_rlloss"))
                del outputs
            del prepared
            harness.free_device_memory(device)
            progress(_gpu_progress(index, total, record))
            records.append(record)
        del inputs, anchor
        harness.free_device_memory(device)
    add_speedups(records)
    return records


def target_lines(records: Sequence[Dict[str, Any]]) -> List[str]:
    """One line per rlloss kernel row: its fraction of the ideal speed-up and its speed-up over flex against
    the targets, "met", "missed" or "not measured" (a row or its comparison failed)."""
    def verdict(value: Optional[float], target: float) -> str:
        if value is None:
            return "not measured"
        return f"{value:.2f} ({'met' if value >= target else 'missed'}, target ≥ {target})"

    return [f"targets, `{r['impl']}` G={r['G']} P={r['P']} S={r['S']}: fraction of ideal "
            f"{verdict(r.get('fraction_of_ideal'), TARGET_FRACTION_OF_IDEAL)}; speed-up vs flex "
            f"{verdict(r.get('speedup_vs_flex'), TARGET_SPEEDUP_VS_FLEX)}"
            for r in records if r["role"] == "subject"]


def _gpu_progress(index: int, total: int, record: Dict[str, Any]) -> str:
    head = (f"[{index}/{total}] prefix_attention {record['impl']:<15} G={record['G']:<3} P={record['P']:<6} "
            f"S={record['S']:<5}")
    if record["status"] != "ok":
        return f"{head}: {record['status']}: {record['error']}"
    text = (f"{head}: {harness.fmt_ms(record['time_ms'])} ms, {record['tflops']:.1f} TFLOP/s (useful), "
            f"peak {harness.fmt_gib(record['peak_memory_bytes'])} GiB")
    if record.get("diff_rlloss_out") is not None:
        text += f", max|Δout| vs rlloss {record['diff_rlloss_out']:.1e}"
    return text


def _gpu_columns() -> List[harness.Column]:
    C = harness.Column
    return [
        harness.IMPL_COLUMN,
        C("G", lambda r: str(r["G"])),
        C("P", lambda r: str(r["P"])),
        C("S", lambda r: str(r["S"])),
        harness.STATUS_COLUMN,
        C("fwd+bwd ms", lambda r: harness.fmt_ms(r.get("time_ms"))),
        C("speed-up vs sdpa-repeated", lambda r: harness.fmt_num(r.get("speedup_vs_sdpa"), 2)),
        C("ideal (FLOP ratio)", lambda r: harness.fmt_num(r["ideal_attention_ratio"], 2)),
        C("fraction of ideal", lambda r: harness.fmt_num(r.get("fraction_of_ideal"), 2)),
        C("speed-up vs flex", lambda r: harness.fmt_num(r.get("speedup_vs_flex"), 2)),
        C("useful TFLOP/s", lambda r: harness.fmt_num(r.get("tflops"))),
        C("peak memory (GiB)", lambda r: harness.fmt_gib(r.get("peak_memory_bytes"))),
        C("setup ms", lambda r: harness.fmt_ms(r.get("setup_ms"))),
        C("max abs diff out vs rlloss", lambda r: harness.fmt_err(r.get("diff_rlloss_out"))),
        C("dq", lambda r: harness.fmt_err(r.get("diff_rlloss_dq"))),
        C("dk", lambda r: harness.fmt_err(r.get("diff_rlloss_dk"))),
        C("dv", lambda r: harness.fmt_err(r.get("diff_rlloss_dv"))),
    ]


def run_gpu_peers(ctx: harness.RunContext) -> harness.SuiteReport:
    shapes = gpu_shapes(ctx.quick)
    dtype_name = harness.dtype_name(GPU_DTYPE)
    impls, skips = harness.split_available(GPU_IMPLEMENTATIONS, ctx.progress)
    records = compare_implementations(shapes, GPU_DTYPE, "cuda", impls, harness.CUDA_PROBES, ctx.progress)
    notes = {impl.name: impl.note for impl in GPU_IMPLEMENTATIONS if impl.note}
    if not any(skip["impl"] == PREFIX_GROUPER.name for skip in skips):
        notes[PREFIX_GROUPER.name] = _prefix_grouper_note()
    Hq, Hkv = GPU_HEADS
    return harness.SuiteReport(
        suite="prefix_attention", mode="gpu-peers",
        title=f"prefix_attention — {ctx.device.name}: {dtype_name}, Hq={Hq}, Hkv={Hkv}, d={GPU_HEAD_DIM}, "
              "forward + backward",
        config={
            "shapes": [vars(shape) for shape in shapes], "dtype": dtype_name, "seed": SEED,
            "flops_convention": f"{FWD_BWD_FLOP_FACTOR} × 4·d·Hq per visible (query, key) pair of the shared layout",
            "implementations": {impl.name: {"label": impl.label, "note": notes.get(impl.name, "")}
                                for impl in GPU_IMPLEMENTATIONS},
        },
        records=records, columns=_gpu_columns(), skips=skips,
        notes=[
            "One prompt of P tokens and G completions of S tokens. Each case: one untimed warm-up call "
            "(Triton compilation, torch.compile, autotuning), one call for peak memory and the outputs, then "
            "timing. Forward + backward with one random upstream gradient; the repeated batch gets each prompt "
            "copy 1/G of it, so all implementations compute the same gradients once mapped onto the packed "
            "stream (a prompt's summed over its copies), which the diff columns compare with rlloss's.",
            harness.CUDA_MEMORY_METHOD + " The repeated batch's inputs (G copies of the prompt) are allocated "
            "before the measurement; the gradients each call returns are inside it.",
            harness.CUDA_TIME_NOTE,
            "speed-up vs sdpa-repeated: its time over this row's. ideal: the attention FLOP ratio of docs/math.md §8, "
            "G(P+S)² / (P² + G·S(2P+S)) — the speed-up a kernel as fast per FLOP as flash attention would reach; "
            "fraction of ideal = speed-up / ideal (the issue's target for rlloss: ≥ 0.8). speed-up vs flex: the "
            "issue's target for rlloss is ≥ 1.3.",
            f"useful TFLOP/s credits every implementation with the shared layout's pairs ({FWD_BWD_FLOP_FACTOR} × "
            "4·d·Hq FLOPs per visible (query, key) pair), whatever it computes, so it is a rescaled speed.",
            "setup ms: building the layout and its kernel tables (rlloss), the block mask (flex) or the group "
            "info (PrefixGrouper), once per batch, outside the timed call.",
        ] + [f"`{name}`: {note}" for name, note in notes.items()] + target_lines(records),
    )


# --- the suite ------------------------------------------------------------------------------------------------


SUITE = Suite(
    name="prefix_attention",
    description="shared_prefix_attention fwd+bwd: CPU torch backend vs repeated-prompt SDPA; GPU triton vs "
                "SDPA flash, FlexAttention, PrefixGrouper",
    run_cpu=run_cpu_default, run_gpu=run_gpu_peers,
)
