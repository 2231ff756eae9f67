"""Suite ``prefix_model``: a whole transformers model, forward + backward of a DAPO loss on G completions of one
prompt, packed (``SharedPrefixBatch`` + ``enable_shared_prefix``) against the repeated-prompt batch; issue #12's
targets.
"""
from __future__ import annotations

from typing import Any, Dict, List

import torch

from rlloss import FusedPolicyLoss, LossConfig, SharedPrefixBatch

from . import _core as core

DESCRIPTION = ("whole-model fwd+bwd, G completions of one prompt: packed shared-prefix vs repeated-prompt SDPA "
               "(GPU: Qwen2-0.5B shape, G=16 P=4096 S=512)")
QWEN2_05B = dict(name="Qwen2-0.5B shape", hidden=896, layers=24, heads=14, kv_heads=2, intermediate=4864, vocab=151936)
QWEN2_05B_QUICK = dict(QWEN2_05B, name="Qwen2-0.5B width, 4 layers", layers=4)
CPU_MODEL = dict(name="tiny", hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128, vocab=1000)
GPU_GROUP, GPU_GROUP_QUICK = dict(G=16, P=4096, S=512), dict(G=8, P=1024, S=256)
CPU_GROUP, CPU_GROUP_QUICK = dict(G=4, P=96, S=24), dict(G=4, P=32, S=8)
CPU_WARMUP_CALLS, CPU_TIMED_CALLS, SEED = 1, 5, 0
TARGET_SPEEDUP, TARGET_MEMORY_RATIO = 3.0, 0.4  # issue #12: the packed step against the repeated one
PACKED_TORCH = ("packed-torch", "subject", "SharedPrefixBatch + enable_shared_prefix(backend='torch')", True, "torch",
                False)
REPEATED = ("repeated", "baseline", "[G, P+S] batch, attn_implementation='sdpa'", False, None, False)
# (name, role, label, packed, shared_prefix_attention backend (None: the device's default), checkpointing)
GPU_CASES = (("packed", "subject", "SharedPrefixBatch + enable_shared_prefix (Triton kernels)", True, None, False),
             PACKED_TORCH,
             REPEATED, ("packed+ckpt", "subject", "packed, gradient checkpointing", True, None, True),
             ("repeated+ckpt", "baseline", "repeated, gradient checkpointing", False, None, True))
CPU_CASES = (PACKED_TORCH, REPEATED)


def model_str(m: Dict[str, Any]) -> str:
    return (f"{m['name']} (hidden {m['hidden']}, {m['layers']} layers, {m['heads']}/{m['kv_heads']} heads, "
            f"MLP {m['intermediate']}, vocab {m['vocab']})")


def build(m: Dict[str, Any], group: Dict[str, int], dtype: torch.dtype, device: str):
    """A random-weight Qwen2ForCausalLM (no download), training mode, attention "sdpa"; and the inputs."""
    import transformers

    config = transformers.Qwen2Config(
        hidden_size=m["hidden"], num_hidden_layers=m["layers"], num_attention_heads=m["heads"],
        num_key_value_heads=m["kv_heads"], intermediate_size=m["intermediate"], vocab_size=m["vocab"],
        max_position_embeddings=32768, tie_word_embeddings=True, attention_dropout=0.0, use_cache=False)
    torch.manual_seed(SEED)
    with torch.device(device):
        model = transformers.Qwen2ForCausalLM(config)
    model.set_attn_implementation("sdpa")
    gen = torch.Generator().manual_seed(SEED)
    prompt = torch.randint(0, m["vocab"], (group["P"],), generator=gen).to(device)
    completions = torch.randint(0, m["vocab"], (group["G"], group["S"]), generator=gen).to(device)
    advantages = torch.randn(group["G"], generator=gen).to(device)
    return model.to(dtype).train(), (prompt, completions, advantages,
                                     SharedPrefixBatch.pack([prompt], [list(completions.unbind(0))]))


def prepare(case, shared, device: str):
    """Put the model in the case's attention and checkpointing mode; the forward + backward of the loss on the
    completion tokens, parameter gradients dropped first (each call's peak includes allocating them)."""
    from rlloss.integrations.transformers import disable_shared_prefix, enable_shared_prefix

    model, (prompt, completions, advantages, batch) = shared
    packed, backend, checkpointing = case.make
    if packed:
        enable_shared_prefix(model, backend=backend)
    else:
        disable_shared_prefix(model)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_disable()
    loss_fn = FusedPolicyLoss(LossConfig.preset("dapo"))

    def step():
        model.zero_grad(set_to_none=True)
        if packed:
            hidden = batch.gather_hidden(model.model(**batch.model_inputs(), use_cache=False).last_hidden_state)
        else:  # the hidden states that predict the completions, sliced from [G, P+S]
            ids = torch.cat([prompt.expand(completions.shape[0], -1), completions], dim=1)
            hidden = model.model(input_ids=ids, use_cache=False).last_hidden_state[:, prompt.numel() - 1: -1]
        loss = loss_fn(hidden, model.lm_head.weight, batch.targets, batch.mask, advantages).loss
        loss.backward()
        return lambda: {"loss": loss.detach().float().cpu(), "grads": {
            n: p.grad.detach().float().cpu() for n, p in model.named_parameters() if p.grad is not None}}

    step.clear = lambda: (model.zero_grad(set_to_none=True), core.free(device))
    return step


def compare(record: Dict[str, Any], outputs, anchor) -> None:
    """|Δloss| and the largest relative parameter-gradient difference ‖Δg‖/‖g‖ over all parameters."""
    worst, worst_name = 0.0, None
    for name, grad in anchor["grads"].items():
        other = outputs["grads"].get(name)
        rel = float("inf") if other is None else float((other - grad).norm() / grad.norm().clamp(min=1e-30))
        if rel > worst:
            worst, worst_name = rel, name if other is not None else f"{name} (no gradient)"
        if other is None:
            break
    record.update(diff_loss=float((outputs["loss"] - anchor["loss"]).abs()), grad_rel_diff=worst,
                  grad_rel_diff_param=worst_name)


def measure(ctx: core.RunContext, m, group, dtype, device: str, cases, probes) -> List[Dict[str, Any]]:
    packed_tokens, repeated_tokens = group["P"] + group["G"] * group["S"], group["G"] * (group["P"] + group["S"])
    cases = [core.Case(c[0], c[1], c[2], c[3:]) for c in cases]

    def base(case):
        packed, backend, checkpointing = case.make
        return core.record(case, backend=backend, checkpointing=checkpointing, model=m["name"], **group,
                           tokens=packed_tokens if packed else repeated_tokens,
                           completion_tokens=group["G"] * group["S"],
                           ideal_tokenwise_speedup=repeated_tokens / packed_tokens, dtype=core.dtype_name(dtype),
                           device=device)

    records = core.measure_cases(
        cases, base, lambda: build(m, group, dtype, device), lambda c, shared: prepare(c, shared, device), probes,
        device, core.counter("prefix_model", ("G", "P", "S"), len(cases), ctx.progress), compare,
        lambda r, out: {"loss": float(out["loss"]),
                        "completion_tokens_per_s": r["completion_tokens"] / (r["time_ms"] * 1e-3)})
    baselines = {r["checkpointing"]: r for r in records if r["role"] == "baseline" and r["status"] == "ok"}
    for r in records:  # against the repeated batch with the same checkpointing mode
        base_row = baselines.get(r["checkpointing"])
        if base_row is not None and r["status"] == "ok" and r is not base_row:
            r["speedup_vs_repeated"] = base_row["time_ms"] / r["time_ms"]
            r["fraction_of_ideal"] = r["speedup_vs_repeated"] / r["ideal_tokenwise_speedup"]
            if r.get("peak_memory_bytes") and base_row.get("peak_memory_bytes"):
                r["memory_vs_repeated"] = r["peak_memory_bytes"] / base_row["peak_memory_bytes"]
    return records


def report(mode: str, title: str, m, group, dtype, records, cases, config, with_memory: bool, notes) -> core.Report:
    G, P, S = group["G"], group["P"], group["S"]
    return core.Report(
        "prefix_model", mode,
        f"{title}: {model_str(m)}, G={G} P={P} S={S}, {core.dtype_name(dtype)}, forward + backward",
        {"model": m, "group": group, "dtype": core.dtype_name(dtype), "seed": SEED, **config,
         "cases": {c[0]: c[2] for c in cases}},
        records, [core.IMPL, core.col("tokens", "tokens"), core.STATUS, core.col("fwd+bwd ms", "time_ms", core.MS),
                  core.col("speed-up vs repeated", "speedup_vs_repeated", ".2f"),
                  core.col("ideal (token ratio)", "ideal_tokenwise_speedup", ".2f"),
                  core.col("completion tokens/s", "completion_tokens_per_s", ".0f")]
        + ([core.col("peak memory (GiB)", "peak_memory_bytes", *core.GIB_COL),
            core.col("memory vs repeated", "memory_vs_repeated", ".2f")] if with_memory else [])
        + [core.col("|Δloss| vs packed", "diff_loss", core.ERR),
           core.col("max ‖Δgrad‖/‖grad‖ vs packed", "grad_rel_diff", core.ERR)],
        notes=[
            f"The packed stream holds {P + G * S} tokens, the repeated batch {G * (P + S)}. Forward + backward of the "
            "model and of rlloss.FusedPolicyLoss (DAPO, random advantages, on-policy) on the G·S completion tokens "
            "only (their hidden states gathered from the packed stream, sliced from the repeated batch): the lm_head "
            "never runs on a prompt position. The repeated batch has no padding (all completions have S tokens), "
            "its best case.",
            "ideal (token ratio): G(P+S)/(P+G·S) of docs/math.md §8, the speed-up of every token-wise layer "
            "(attention's differs, the loss costs the same); the JSON's fraction_of_ideal is the speed-up over it.",
            "|Δloss| and max ‖Δgrad‖/‖grad‖ (over every parameter tensor, its name in the JSON) compare each case "
            "with `packed` (the first subject): the same function, so rounding only.",
        ] + notes)


def run_cpu(ctx: core.RunContext) -> core.Report:
    group = CPU_GROUP_QUICK if ctx.quick else CPU_GROUP
    records = measure(ctx, CPU_MODEL, group, torch.float32, "cpu", CPU_CASES,
                      core.cpu_probes(CPU_WARMUP_CALLS, CPU_TIMED_CALLS))
    return report("cpu-default", "prefix_model — CPU smoke run", CPU_MODEL, group, torch.float32, records, CPU_CASES,
                  {"warmup_calls": CPU_WARMUP_CALLS, "timed_calls": CPU_TIMED_CALLS}, False, [
        f"Time: median of {CPU_TIMED_CALLS} calls after {CPU_WARMUP_CALLS} warm-up call, in the benchmark's process, "
        f"{torch.get_num_threads()} torch threads; no memory figure. A smoke run of the code path and the equality, "
        "not a performance claim: the GPU run is the measurement."])


def run_gpu(ctx: core.RunContext) -> core.Report:
    m, group = (QWEN2_05B_QUICK, GPU_GROUP_QUICK) if ctx.quick else (QWEN2_05B, GPU_GROUP)
    records = measure(ctx, m, group, torch.bfloat16, ctx.device.type, GPU_CASES, core.CUDA_PROBES)
    return report("gpu", f"prefix_model — {ctx.device.name}", m, group, torch.bfloat16, records, GPU_CASES, {}, True, [
        core.CUDA_CASE_NOTE + " One random-weight model, switched between cases (enable_shared_prefix / "
        "disable_shared_prefix, gradient checkpointing). speed-up and memory vs repeated: against the repeated "
        "batch with the same checkpointing mode.",
        core.CUDA_MEMORY_METHOD + " The weights are allocated before; the parameter gradients are dropped before "
        "every call, so each peak includes allocating them.", core.CUDA_TIME_NOTE,
    ] + [f"targets, `{r['impl']}`: speed-up vs repeated {core.verdict(r.get('speedup_vs_repeated'), TARGET_SPEEDUP)}; "
         f"memory vs repeated {core.verdict(r.get('memory_vs_repeated'), TARGET_MEMORY_RATIO, False)}"
         for r in records if r["role"] == "subject"])
