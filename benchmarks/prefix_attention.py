"""Suite ``prefix_attention``: ``rlloss.shared_prefix_attention`` (one prompt held once for its G completions)
forward + backward against SDPA on the repeated-prompt batch ``[G, P+S]``, FlexAttention and PrefixGrouper on the
packed stream; speed-ups next to the ideal FLOP ratio of docs/math.md §8 and issue #12's targets.
"""
from __future__ import annotations

import itertools
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Tuple

import torch
import torch.nn.functional as F

import rlloss
from rlloss import reference

from . import _core as core

DESCRIPTION = ("shared_prefix_attention fwd+bwd: CPU torch backend vs repeated-prompt SDPA; GPU triton vs "
               "SDPA flash, FlexAttention, PrefixGrouper")


@dataclass(frozen=True)
class Shape:
    """``groups`` prompts of P tokens, each with G completions of S tokens; Hq query, Hkv key/value heads of dim d."""

    G: int
    P: int
    S: int
    Hq: int
    Hkv: int
    d: int
    groups: int = 1

    @property
    def T(self) -> int:
        return self.groups * (self.P + self.G * self.S)

    def __str__(self) -> str:
        head = f"groups={self.groups} " if self.groups > 1 else ""
        return f"{head}G={self.G} P={self.P} S={self.S} Hq={self.Hq} Hkv={self.Hkv} d={self.d}"


GPU_GRID, GPU_QUICK = ((8, 16), (1024, 4096, 16384), (256, 512, 2048)), ((16, 1024, 512), (16, 4096, 512))
GPU_HEADS, GPU_DTYPE = (32, 8, 128), torch.bfloat16
CPU_SHAPES = {False: Shape(G=4, P=128, S=32, Hq=4, Hkv=2, d=64), True: Shape(G=4, P=32, S=8, Hq=4, Hkv=2, d=64)}
CPU_MANY_SHORT = Shape(G=8, P=32, S=3, Hq=4, Hkv=2, d=64, groups=16)  # issue #12's toy loop: 144 segments
CPU_WARMUP_CALLS, CPU_TIMED_CALLS, SEED = 1, 7, 0
# Forward FLOPs are 4·d per (query, key) pair and head; the backward 2.5 times that. Every implementation is
# credited with the pairs of the shared layout, so TFLOP/s is a rescaled speed.
FWD_BWD_FLOP_FACTOR = 3.5
TARGET_FRACTION_OF_IDEAL, TARGET_SPEEDUP_VS_FLEX = 0.8, 1.3  # issue #12, for the kernels on a GPU


IDEAL_NOTE = "ideal: the attention FLOP ratio of docs/math.md §8, G(P+S)² / (P² + G·S(2P+S))"
GRADIENTS_NOTE = ("Every case gets one random upstream gradient (the repeated batch each prompt copy 1/G of it), so "
                  "all compute the same gradients once mapped onto the packed stream (a prompt's summed over its "
                  "copies)")


def layout_of(shape: Shape, device) -> rlloss.SharedPrefixLayout:
    return rlloss.SharedPrefixLayout.from_groups([shape.P] * shape.groups, [[shape.S] * shape.G] * shape.groups,
                                                 device=device)


def ideal_attention_ratio(s: Shape) -> float:
    return s.G * (s.P + s.S) ** 2 / (s.P**2 + s.G * s.S * (2 * s.P + s.S))


def make_inputs(shape: Shape, dtype: torch.dtype, device: str) -> Dict[str, Any]:
    """The packed stream: q [T, Hq, d], k, v [T, Hkv, d], upstream gradient do [T, Hq, d]."""
    gen = torch.Generator(device=device).manual_seed(SEED)
    randn = lambda heads: torch.randn(shape.T, heads, shape.d, generator=gen, device=device).to(dtype)  # noqa: E731
    return {"q": randn(shape.Hq), "k": randn(shape.Hkv), "v": randn(shape.Hkv), "do": randn(shape.Hq), "shape": shape}


def repeated_rows(s: Shape, device) -> torch.Tensor:
    """[groups·G, P+S] packed-stream row of every token of the repeated batch."""
    rows = []
    for group in range(s.groups):
        prompt = group * (s.P + s.G * s.S) + torch.arange(s.P, device=device)
        rows += [torch.cat([prompt, prompt[-1] + 1 + g * s.S + torch.arange(s.S, device=device)]) for g in range(s.G)]
    return torch.stack(rows)


def from_repeated(x: torch.Tensor, s: Shape, reduce: bool) -> torch.Tensor:
    """[groups·G, H, P+S, d] → [T, H, d] float32: a prompt row summed over its G copies (``reduce``, gradients)
    or taken from the first (outputs, equal in every copy)."""
    x = x.transpose(1, 2).float()
    x = x.reshape(s.groups, s.G, *x.shape[1:])  # [groups, G, P+S, H, d]
    prompt = x[:, :, : s.P].sum(1) if reduce else x[:, 0, : s.P]
    return torch.cat([prompt, x[:, :, s.P:].reshape(s.groups, s.G * s.S, *x.shape[3:])], 1).reshape(s.T, *x.shape[3:])


def heads_first(x: torch.Tensor) -> torch.Tensor:
    """[T, H, d] packed → [1, H, T, d] (FlexAttention's and PrefixGrouper's layout)."""
    return x.transpose(0, 1)[None].contiguous()


def _timed_ms(fn: Callable[[], Any]) -> Tuple[float, Any]:
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    sync()
    start = time.perf_counter()
    result = fn()
    sync()
    return (time.perf_counter() - start) * 1e3, result


def prepared(leaves, upstream, attend, to_packed, setup_ms: float, info=None):
    """The call a case times: drop the last output and gradients, attend, backward. It hands back a collect()
    that maps output and gradients onto the packed stream, and carries ``clear`` (run before a memory
    measurement) and the fields it adds to its record (setup time: building a layout, mask or plan)."""
    last: Dict[str, torch.Tensor] = {}

    def clear():
        last.clear()
        for x in leaves:
            x.grad = None

    def step():
        clear()
        out = attend()
        out.backward(upstream)
        last["out"] = out.detach()
        return lambda: {"out": to_packed(last["out"], False), "dq": to_packed(leaves[0].grad, True),
                        "dk": to_packed(leaves[1].grad, True), "dv": to_packed(leaves[2].grad, True),
                        "fields": {"setup_ms": setup_ms, **(info or {})}}

    step.clear = clear
    return step


def leaves(x, transform=lambda t: t):
    return [transform(x[k]).detach().clone().requires_grad_() for k in "qkv"]


def rlloss_case(backend: str, deterministic: bool = True) -> core.Case:
    def prepare(x):
        q, k, v = leaves(x)
        setup_ms, layout = _timed_ms(lambda: layout_of(x["shape"], q.device))
        info = None
        if backend == "triton":  # the tables of every block size the kernels may choose
            from rlloss.kernels import prefix_attention as kernels

            for tuned, tiled in ((kernels._fwd, "BLOCK_M"), (kernels._dq, "BLOCK_M"), (kernels._dkdv, "BLOCK_N")):
                setup_ms += _timed_ms(lambda: layout.kernel_tables(kernels._tiled_blocks(tuned, tiled)))[0]
        if backend == "torch":  # its plan: query blocks, buckets, and the intra-op threads it runs on
            from rlloss import prefix_attention as module

            ms, plan = _timed_ms(lambda: module._torch_plan(layout, (q.shape[1], k.shape[1], q.shape[2])))
            setup_ms += ms
            info = {"query_block": plan["block"], "buckets": len(plan["masks"]),
                    "intra_op_threads": module._torch_threads(plan)}
        return prepared([q, k, v], x["do"], lambda: rlloss.shared_prefix_attention(
            q, k, v, layout, backend=backend, deterministic=deterministic), lambda t, _: t.float(), setup_ms, info)

    if deterministic:
        return core.Case(f"rlloss-{backend}", "subject", f"rlloss.shared_prefix_attention, backend={backend!r}",
                         prepare)
    return core.Case(f"rlloss-{backend}-fused-dq", "subject", f"rlloss.shared_prefix_attention, backend={backend!r}, "
                     "deterministic=False (dQ inside the dK/dV pass, float32 atomics)", prepare)


def sdpa_repeated(flash_only: bool):
    def prepare(x):
        s = x["shape"]
        rows = repeated_rows(s, x["q"].device)
        q, k, v = leaves(x, lambda t: t[rows].transpose(1, 2).contiguous())
        share = torch.ones(s.P + s.S, device=x["do"].device)
        share[: s.P] = 1.0 / s.G  # each prompt copy gets 1/G of the upstream gradient: the sums are the packed one's
        do = (x["do"][rows].float() * share[None, :, None, None]).to(x["do"].dtype).transpose(1, 2).contiguous()
        info, group = {"kv_heads": "enable_gqa" if flash_only else "repeated"}, q.shape[1] // k.shape[1]

        def sdpa():
            if info["kv_heads"] == "enable_gqa":
                return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
            return F.scaled_dot_product_attention(q, k.repeat_interleave(group, 1), v.repeat_interleave(group, 1),
                                                  is_causal=True)

        def attend():
            if not flash_only:
                return sdpa()
            from torch.nn.attention import SDPBackend, sdpa_kernel

            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                try:
                    return sdpa()
                except RuntimeError:  # a flash build without grouped-query support: repeat K/V heads
                    if info["kv_heads"] != "enable_gqa":
                        raise
                    info["kv_heads"] = "repeated (the flash backend refused enable_gqa)"
                    return sdpa()

        return prepared([q, k, v], do, attend, lambda t, reduce: from_repeated(t, s, reduce), 0.0, info)
    return prepare


def flex_visibility(s: Shape, device) -> Callable:
    """FlexAttention's ``mask_mod``: a query sees its own segment's keys up to itself and every key of its
    segment's parent (the prompt)."""
    lengths = ([s.P] + [s.S] * s.G) * s.groups
    index = torch.arange(len(lengths), device=device)
    segment = torch.repeat_interleave(index, torch.tensor(lengths, device=device))
    prompt = index // (s.G + 1) * (s.G + 1)
    parent = torch.where(prompt == index, -2, prompt)
    return lambda b, h, q_idx, kv_idx: (((segment[q_idx] == segment[kv_idx]) & (kv_idx <= q_idx))
                                        | (segment[kv_idx] == parent[segment[q_idx]]))


def flex(x):
    import torch._dynamo
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    s, device = x["shape"], x["q"].device
    setup_ms, mask = _timed_ms(lambda: create_block_mask(flex_visibility(s, device), B=None, H=None, Q_LEN=s.T,
                                                         KV_LEN=s.T, device=device))
    torch._dynamo.reset()  # a fresh graph cache per shape: no recompile limit, no fallback to eager
    attend = torch.compile(flex_attention, dynamic=False)
    q, k, v = leaves(x, heads_first)
    return prepared([q, k, v], heads_first(x["do"]), lambda: attend(q, k, v, block_mask=mask, enable_gqa=True),
                    lambda t, _: t[0].transpose(0, 1).float(), setup_ms)


def grouper_attention() -> Tuple[Callable, str]:
    """The attention function PrefixGrouper calls (prefix self-attention, suffix concat-attention): q
    [b, Hq, Lq, d], k, v [b, Hkv, Lk, d] → [b, Lq, Hq, d], causal aligned bottom right. The groups here have no
    padding, so its padding mask is all ones and not applied."""
    try:
        from flash_attn import flash_attn_func
    except Exception:  # no flash-attn wheel: SDPA with a lower-right causal bias
        from torch.nn.attention.bias import causal_lower_right

        def sdpa_attention(q, k, v, attn_mask, *args, **kwargs):
            if q.shape[2] == k.shape[2]:
                return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True).transpose(1, 2)
            group = q.shape[1] // k.shape[1]
            return F.scaled_dot_product_attention(q, k.repeat_interleave(group, 1), v.repeat_interleave(group, 1),
                                                  attn_mask=causal_lower_right(q.shape[2], k.shape[2])).transpose(1, 2)

        return sdpa_attention, ("SDPA (is_causal for the prefix; a lower-right causal bias with K/V heads repeated "
                                "for the suffixes: flash-attn is not installed)")
    return (lambda q, k, v, *args, **kwargs: flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                             causal=True),
            "flash_attn.flash_attn_func(causal=True) (bottom-right causal, native GQA)")


def prefix_grouper(x):
    from prefix_grouper import PrefixGrouper

    s = x["shape"]
    if s.groups != 1:
        raise NotImplementedError("this adapter packs one group per stream")
    setup_ms, grouper = _timed_ms(lambda: PrefixGrouper([[s.P] + [s.S] * s.G], device=x["q"].device,
                                                        padding_mode="right"))
    if not bool(grouper.padding_mask.all()):
        raise RuntimeError("PrefixGrouper padded the group; this adapter does not apply padding masks")
    attention, q, k, v = grouper_attention()[0], *leaves(x, heads_first)
    return prepared([q, k, v], x["do"][None], lambda: grouper.forward(attention, q, k, v),  # output [b, T, Hq, d]
                    lambda t, grad: (t[0].transpose(0, 1) if grad else t[0]).float(), setup_ms)


CPU_CASES = (rlloss_case("torch"), core.Case(
    "sdpa-repeated", "baseline", "F.scaled_dot_product_attention, is_causal, K/V heads repeated, on the "
    "repeated-prompt batch [groups·G, Hq, P+S, d]", sdpa_repeated(flash_only=False)))
PREFIX_GROUPER = core.Case("prefix-grouper", "peer", "prefix_grouper.PrefixGrouper.forward on the packed stream "
                           "[1, Hq, T, d]", prefix_grouper, core.import_error("prefix_grouper", "prefix_grouper"))
GPU_CASES = (
    rlloss_case("triton"), rlloss_case("triton", deterministic=False),
    core.Case("sdpa-repeated", "baseline", "F.scaled_dot_product_attention, flash backend only, is_causal, "
              "enable_gqa, on the repeated-prompt batch [G, Hq, P+S, d]", sdpa_repeated(flash_only=True),
              note="the prompt is repeated in every sequence (G copies of its Q, K, V and their gradients)"),
    core.Case("flex", "peer", "torch.compile(flex_attention) on the packed stream [1, Hq, T, d], block mask of the "
              "same visibility, enable_gqa", flex, core.import_error("torch.nn.attention.flex_attention", "torch>=2.5"),
              note="compile and autotuning happen in the untimed warm-up call; block-mask construction is the setup "
                   "time"),
    PREFIX_GROUPER,
)


def base_record(case: core.Case, s: Shape, dtype: torch.dtype, device: str) -> Dict[str, Any]:
    return core.record(case, note=case.note, **vars(s), T=s.T, dtype=core.dtype_name(dtype), device=device,
                       useful_flops=FWD_BWD_FLOP_FACTOR * layout_of(s, "cpu").attention_flops(s.d, s.Hq),
                       ideal_attention_ratio=ideal_attention_ratio(s))


def add_speedups(records: List[Dict[str, Any]]) -> None:
    """Speed-up over ``sdpa-repeated`` (and ``flex``) of the same shape, and the fraction of the ideal ratio."""
    key = lambda r: (r.get("groups", 1), r["G"], r["P"], r["S"])  # noqa: E731
    times = {(key(r), r["impl"]): r["time_ms"] for r in records if r["status"] == "ok"}
    for r in (r for r in records if r["status"] == "ok"):
        baseline, flex_ms = times.get((key(r), "sdpa-repeated")), times.get((key(r), "flex"))
        r["speedup_vs_sdpa"] = baseline / r["time_ms"] if baseline else None
        r["fraction_of_ideal"] = r["speedup_vs_sdpa"] / r["ideal_attention_ratio"] if baseline else None
        r["speedup_vs_flex"] = flex_ms / r["time_ms"] if flex_ms else None


def float64_reference(x) -> Dict[str, torch.Tensor]:
    """The dense float64 oracle on the packed stream (small shapes only: it holds a [T, T] mask)."""
    q, k, v = (x[n].detach().double().requires_grad_() for n in "qkv")
    out = reference.shared_prefix_attention(q, k, v, layout_of(x["shape"], q.device).dense_mask(),
                                            scale=x["shape"].d ** -0.5)
    out.backward(x["do"].double())
    return {"out": out.detach(), "dq": q.grad, "dk": k.grad, "dv": v.grad}


def diff_columns(prefix: str, against: str):
    return [core.col(f"max abs diff out vs {against}", f"{prefix}_out", core.ERR)] + [
        core.col(name, f"{prefix}_{name}", core.ERR) for name in ("dq", "dk", "dv")]


SHAPE_COLUMNS = [core.col(name, name) for name in ("G", "P", "S")]
SPEEDUP_COLUMNS = [core.col("speed-up vs sdpa-repeated", "speedup_vs_sdpa", ".2f"),
                   core.col("ideal (FLOP ratio)", "ideal_attention_ratio", ".2f"),
                   core.col("fraction of ideal", "fraction_of_ideal", ".2f")]


def run_cpu(ctx: core.RunContext) -> core.Report:
    """In this process (the cases are small): per shape, the cases' timed calls interleaved round by round, and
    the max abs differences of each from the float64 reference. A failing case is left out of the timing."""
    shapes, records = [CPU_SHAPES[ctx.quick], CPU_MANY_SHORT], []
    for shape, case_name in zip(shapes, ("one group", "many short completions")):
        expected = float64_reference(make_inputs(shape, torch.float32, "cpu"))
        tiny = Shape(G=2, P=8, S=4, Hq=shape.Hq, Hkv=shape.Hkv, d=shape.d)
        rows, steps, collects = {}, {}, {}
        for case in CPU_CASES:
            rows[case.name] = base_record(case, shape, torch.float32, "cpu")
            try:
                case.make(make_inputs(tiny, torch.float32, "cpu"))()  # start the thread pools
                step = case.make(make_inputs(shape, torch.float32, "cpu"))
                collects[case.name], steps[case.name] = step(), step
            except Exception as exc:
                core.failure(rows[case.name], exc)
        ctx.progress(f"prefix_attention {' / '.join(steps)}: {shape}, {CPU_TIMED_CALLS} timed calls each, interleaved")
        timings = core.cpu_times_interleaved(steps, CPU_WARMUP_CALLS, CPU_TIMED_CALLS) if steps else {}
        for name, timed in timings.items():
            outputs = collects[name]()
            rows[name].update(**timed, **outputs.pop("fields"), **core.diffs(outputs, expected, "diff"))
        records += [dict(record, case=case_name) for record in rows.values()]
    add_speedups(records)
    return core.Report(
        "prefix_attention", "cpu-default",
        f"prefix_attention — CPU default: {'; '.join(map(str, shapes))}, float32, forward + backward", {
            "shapes": [dict(vars(s), T=s.T, ideal_attention_ratio=ideal_attention_ratio(s)) for s in shapes],
            "dtype": "float32", "warmup_calls": CPU_WARMUP_CALLS, "timed_calls": CPU_TIMED_CALLS, "seed": SEED,
            "diff_reference": "float64 rlloss.reference (dense mask), autograd", "plot": {"facet": "case"}},
        records, [core.IMPL, core.col("groups", "groups"), *SHAPE_COLUMNS, core.STATUS,
                  core.col("fwd+bwd ms (median)", "time_ms", core.MS), core.spread(), *SPEEDUP_COLUMNS,
                  core.col("threads", "intra_op_threads"), *diff_columns("diff", "float64")],
        notes=[
            "Equality and time at two small shapes, no memory figure; the Triton kernels do not run on a CPU (the "
            "interpreter is a test tool), the GPU table compares them.",
            "`rlloss-torch` runs query blocks of the packed stream against the keys each block sees, a masked SDPA "
            "call per bucket of blocks with similar key counts; `sdpa-repeated` runs causal SDPA on [groups·G, P+S]. "
            + GRADIENTS_NOTE + ", compared with the float64 reference.",
            core.cpu_time_note(CPU_WARMUP_CALLS, CPU_TIMED_CALLS, "in the benchmark's process") + " threads: the "
            "intra-op threads `rlloss-torch` ran on (all, but where other processes keep cores busy — load average "
            "less its own busy threads, plus its threads, ≥ cores + 0.5 — at most one per 4 ms of estimated work); "
            "`sdpa-repeated` runs on all.", IDEAL_NOTE + " (the same for any number of equal groups).",
        ])


def run_gpu(ctx: core.RunContext) -> core.Report:
    device, (Hq, Hkv, d) = ctx.device.type, GPU_HEADS
    shapes = [Shape(G, P, S, Hq, Hkv, d) for G, P, S in (GPU_QUICK if ctx.quick else itertools.product(*GPU_GRID))]
    cases, skips = core.split_available(GPU_CASES, ctx.progress)
    done = core.counter("prefix_attention", ("G", "P", "S"), len(shapes) * len(cases), ctx.progress)
    records: List[Dict[str, Any]] = []

    def after(record, outputs):
        return {**outputs.pop("fields"), "tflops": record["useful_flops"] / (record["time_ms"] * 1e-3) / 1e12}

    for shape in shapes:
        records += core.measure_cases(
            cases, lambda c: base_record(c, shape, GPU_DTYPE, device), lambda: make_inputs(shape, GPU_DTYPE, device),
            lambda c, x: c.make(x), core.CUDA_PROBES, device, done,
            lambda record, out, anchor: record.update(core.diffs(out, anchor, "diff_rlloss")), after)
    add_speedups(records)
    notes = {c.name: c.note for c in GPU_CASES if c.note}
    if not any(skip["impl"] == PREFIX_GROUPER.name for skip in skips):
        try:
            notes[PREFIX_GROUPER.name] = ("its attention function: " + grouper_attention()[1]
                                          + "; it repeats the prompt's K/V per completion")
        except Exception as exc:  # noqa: BLE001 - the note must never fail the suite
            notes[PREFIX_GROUPER.name] = f"attention function unavailable ({core.describe_error(exc, 120)})"
    return core.Report(
        "prefix_attention", "gpu-peers", f"prefix_attention — {ctx.device.name}: bfloat16, Hq={Hq}, Hkv={Hkv}, d={d}, "
        "forward + backward", {
            "shapes": [vars(s) for s in shapes], "dtype": "bfloat16", "seed": SEED,
            "flops_convention": f"{FWD_BWD_FLOP_FACTOR} × 4·d·Hq per visible (query, key) pair of the shared layout",
            "implementations": {c.name: {"label": c.label, "note": notes.get(c.name, "")} for c in GPU_CASES}},
        records, [core.IMPL, *SHAPE_COLUMNS, core.STATUS, core.col("fwd+bwd ms", "time_ms", core.MS),
                  *SPEEDUP_COLUMNS, core.col("speed-up vs flex", "speedup_vs_flex", ".2f"),
                  core.col("useful TFLOP/s", "tflops", ".1f"),
                  core.col("peak memory (GiB)", "peak_memory_bytes", *core.GIB_COL),
                  core.col("setup ms", "setup_ms", core.MS), *diff_columns("diff_rlloss", "rlloss")],
        skips, notes=[
            "One prompt of P tokens and G completions of S tokens. " + core.CUDA_CASE_NOTE + " " + GRADIENTS_NOTE
            + ", which the diff columns compare with rlloss's.",
            core.CUDA_MEMORY_METHOD + " The repeated batch's inputs (G copies of the prompt) are allocated before.",
            core.CUDA_TIME_NOTE,
            "speed-up vs sdpa-repeated: its time over this row's. " + IDEAL_NOTE + ", the speed-up of a kernel as "
            f"fast per FLOP as flash attention; fraction of ideal = speed-up / ideal (issue #12's target for rlloss: "
            f"≥ {TARGET_FRACTION_OF_IDEAL}; vs flex: ≥ {TARGET_SPEEDUP_VS_FLEX}).",
            f"useful TFLOP/s credits every implementation with the shared layout's pairs ({FWD_BWD_FLOP_FACTOR} × "
            "4·d·Hq FLOPs per visible (query, key) pair): a rescaled speed. setup ms: the layout and its kernel "
            "tables (rlloss), the block mask (flex) or the group info (PrefixGrouper), once per batch, untimed.",
        ] + [f"`{name}`: {note}" for name, note in notes.items()] + [
            f"targets, `{r['impl']}` G={r['G']} P={r['P']} S={r['S']}: fraction of ideal "
            f"{core.verdict(r.get('fraction_of_ideal'), TARGET_FRACTION_OF_IDEAL)}; speed-up vs flex "
            f"{core.verdict(r.get('speedup_vs_flex'), TARGET_SPEEDUP_VS_FLEX)}"
            for r in records if r["role"] == "subject"])
