"""Compile every Triton kernel of rlloss.kernels for an H100 (sm_90) without a GPU.

The test suite runs the kernels through Triton's interpreter, which is lenient: it does not type-check
loop-carried values, reject unsupported ops or constexpr misuse, or enforce tl.dot's shape rules. This script
runs the real compiler (``triton.compile`` on an ``ASTSource``, target ``GPUTarget("cuda", 90, 32)``) on the
constexpr variants and CUDA block configurations the launchers in ``kernels/`` really use, down to PTX and,
when Triton's bundled ptxas is found, to cubin.

Run it WITHOUT TRITON_INTERPRET (kernels decorated under the interpreter cannot be compiled):

    python tests/compile_kernels.py [--ptx-only] [--jobs N] [-k SUBSTRING] [--list] [--verbose]

Exit status 0 when every case compiles, 1 otherwise (each failure is printed with its error). Every case also
reports its shared memory (``metadata.shared``, against the H100's 227 KiB per block) and, from ptxas's log,
its registers and spill bytes: those are reported, not failed on.

Each case is a kernel and example arguments: a dtype for each pointer, a value for each scalar (by parameter name
or an fnmatch pattern such as ``"*_ptr"`` or ``"stride_*"``), the constexprs the launchers pass, and the launch's
num_warps / num_stages. The parameter list, which parameters are constexprs and the type of each float scalar (the
kernels annotate them ``tl.float32``) come from the kernel itself; Triton's own launch binder turns the example
values into the signature and specialisations as a real launch does (pointers 16-byte aligned, integers that are
multiples of 16 marked divisible by 16, an integer equal to 1, such as the stride of a [B] advantage vector or a
GQA group of 1, a constexpr). A new kernel parameter needs an edit here only when no pattern gives its example.
Block sizes, num_warps and num_stages are read from the kernel modules' own CUDA tables, so a retuned table is
checked as it is.
"""
from __future__ import annotations

import argparse
import contextlib
import fnmatch
import functools
import io
import multiprocessing
import os
import re
import shutil
import sys
import tempfile
import time
import traceback
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Dict, List, Optional, Tuple

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    sys.exit("compile_kernels: unset TRITON_INTERPRET (interpreted kernels cannot be compiled)")
# Triton 3.9 warns when this is unset; 1 is the default of every release so far (and of the launchers).
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime.jit import MockTensor, create_function_from_signature  # noqa: E402

from rlloss.kernels import advantages as adv_k  # noqa: E402
from rlloss.kernels import credit as credit_k  # noqa: E402
from rlloss.kernels import logprobs as lp_k  # noqa: E402
from rlloss.kernels import policy as pol_k  # noqa: E402
from rlloss.kernels import prefix_attention as pa_k  # noqa: E402
from rlloss.kernels import tables  # noqa: E402

TARGET_ARCH = 90
TARGET = GPUTarget("cuda", TARGET_ARCH, 32)
H100_SHARED_PER_BLOCK = 227 * 1024  # 228 KiB per SM, of which 227 KiB are available to one block
DEFAULT_NUM_WARPS = 4
DEFAULT_NUM_STAGES = 3  # Triton's CUDA default, what a launch without num_stages gets

# Example scalars: an int Triton sees as a plain i32 (not 1, not a multiple of 16), one real launches keep a
# multiple of 16 (marked divisible by 16), and the example of each annotated scalar type.
INT = 1003
ALIGNED = 1024
_ANNOTATED = {"fp32": 0.5}
_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32, "fp64": torch.float64,
           "u8": torch.uint8, "i32": torch.int32, "i64": torch.int64}


@dataclass
class Case:
    name: str
    kernel: object
    signature: Dict[str, str]
    constexprs: Dict[Tuple[int, ...], object]
    attrs: Dict[Tuple[int, ...], list]
    options: Dict[str, object]
    quick: bool = True  # part of the --quick subset (the test's)


@dataclass
class Result:
    name: str
    ok: bool
    seconds: float
    error: str = ""
    shared: Optional[int] = None
    registers: Optional[int] = None
    spill_stores: Optional[int] = None
    spill_loads: Optional[int] = None
    stack: Optional[int] = None
    notes: List[str] = field(default_factory=list)


def _example(case: str, kernel, param, args: Dict[str, object]):
    """The example value of a plain (not constexpr) parameter: ``args`` by name, then its first matching pattern,
    then the parameter's annotation, then INT; a pointer's example is a dtype name, made a tensor stand-in."""
    value = args.get(param.name)
    if value is None:
        value = next((v for k, v in args.items() if fnmatch.fnmatchcase(param.name, k)), None)
    if value is None:
        if param.name.endswith("_ptr"):
            raise ValueError(f"{case}: pointer {param.name} of {kernel.__name__} has no dtype")
        value = _ANNOTATED[param.annotation] if param.annotation else INT
    if isinstance(value, str):  # a dtype name: a tensor whose data pointer is 16-byte aligned, as torch's are
        return MockTensor(_DTYPES[value])
    return value


@functools.lru_cache(maxsize=None)
def _backend():
    return triton.compiler.make_backend(TARGET)


@functools.lru_cache(maxsize=None)
def _binder(kernel):
    """Triton's launch binder of ``kernel``: example arguments to (bound arguments, specialisation, options)."""
    return create_function_from_signature(kernel.signature, kernel.params, _backend())


def make_case(name, kernel, *, args=None, const=None, num_warps=DEFAULT_NUM_WARPS, num_stages=DEFAULT_NUM_STAGES,
              quick=True) -> Case:
    """A compile case of ``kernel`` from example arguments, specialised by Triton's own launch binder.

    args: example values of the plain parameters by name or fnmatch pattern (first match wins after an exact
    name): a dtype name ("fp32", "bf16", "u8", "i64", ...) for a pointer, an int or a float for a scalar; the rest
    default as :func:`_example` says. const: the value of every constexpr parameter without a default.
    """
    args, const = dict(args or {}), dict(const or {})
    names = [p.name for p in kernel.params]
    unknown = (set(const) | {k for k in args if not any(c in k for c in "*?[")}) - set(names)
    if unknown:
        raise ValueError(f"{name}: not parameters of {kernel.__name__}: {sorted(unknown)}")
    values = {}
    for p in kernel.params:
        if p.is_constexpr:
            if p.name not in const and not p.has_default:
                raise ValueError(f"{name}: constexpr {p.name} of {kernel.__name__} has no value")
            if p.name in const:
                values[p.name] = const[p.name]
        else:
            values[p.name] = _example(name, kernel, p, args)
    bound, specialization, _ = _binder(kernel)(**values)
    signature = {p.name: spec[0] for p, spec in zip(kernel.params, specialization)}
    # specialization: per parameter ("constexpr", value) or (type, attribute string: "D" = divisible by 16).
    constexprs, attrs = {}, {}
    for i, ((kind, attr), value) in enumerate(zip(specialization, bound.values())):
        if kind == "constexpr":
            constexprs[(i,)] = value
        elif attr:
            attrs[(i,)] = _backend().parse_attr(attr)
    return Case(name, kernel, signature, constexprs, attrs, dict(num_warps=num_warps, num_stages=num_stages),
                quick)


# --- logprobs ------------------------------------------------------------------------------------------

def logprobs_cases() -> List[Case]:
    """The two elementwise passes of the chunked log-prob path: statistics and d(loss)/dx, over float32
    GEMM output (the hidden-state path) or a trainer's logits in any float dtype, with and without bias
    and soft-cap; the gradient written in place (float32) or into a 16-bit buffer."""
    cases = []
    c = dict(lp_k.blocks(torch.device("cuda")))
    nw = c.pop("num_warps", DEFAULT_NUM_WARPS)
    ns = c.pop("num_stages", DEFAULT_NUM_STAGES)
    variants = ((False, False), (True, True), (True, False), (False, True))  # (bias, softcap)
    for xt in ("fp32", "fp16", "bf16"):
        for i, (bias, cap) in enumerate(variants):
            cases.append(make_case(
                f"logprobs.stats[{xt},bias={int(bias)},softcap={int(cap)}]", lp_k._stats_kernel,
                args=dict(tgt_ptr="i64", stats_ptr="fp32", stride_x=ALIGNED, **{"*_ptr": xt}),
                num_warps=nw, num_stages=ns,
                const=dict(HAS_BIAS=bias, HAS_SOFTCAP=cap, **c), quick=i < 2,
            ))
            for dzt in sorted({xt, "bf16"} if xt == "fp32" else {xt}):
                cases.append(make_case(
                    f"logprobs.dlogits[{xt}->{dzt},bias={int(bias)},softcap={int(cap)}]", lp_k._dlogits_kernel,
                    args={"x_ptr": xt, "b_ptr": xt, "tgt_ptr": "i64", "dz_ptr": dzt, "*_ptr": "fp32",
                          "stride_*": ALIGNED},
                    num_warps=nw, num_stages=ns,
                    const=dict(HAS_BIAS=bias, HAS_SOFTCAP=cap, **c), quick=i < 2,
                ))
    return cases


# --- policy --------------------------------------------------------------------------------------------

def policy_cases() -> List[Case]:
    """A covering set: every loss mode, IS level, KL estimator (with and without verl's clamp and ratio
    weighting), credit mode and rollout correction appears at least once, with the block sizes' extremes. Each
    variant is the launcher's config fields and given inputs (kernels.policy.kernel_constexprs maps them to
    constexprs, as it does for policy_loss_rows), the log-prob dtype and the block size; kl=None: no reference
    log-probs."""
    P = pol_k
    seq_mean = "seq_mean_token_mean"
    off = dict(credit=None, rollout_correction=None, aggregation="token_mean", adv_per_token=False, has_old=True,
               delta=None, dual_clip=None, has_entropy=False, entropy_coef=0.01, kl_ratio_weighted=False,
               kl_clamp=False)
    variants = [
        dict(off, loss_mode="ppo_clip", importance_sampling_level="token", kl="k1", delta=3.0, dual_clip=3.0,
             has_entropy=True, block_t=P.MAX_BLOCK_T, dt="fp32"),
        dict(off, loss_mode="ppo_clip", importance_sampling_level="sequence", kl="k3", credit="cepo",
             rollout_correction="sequence_truncate", aggregation=seq_mean, adv_per_token=True,
             kl_ratio_weighted=True, kl_clamp=True, block_t=P.MIN_BLOCK_T, dt="bf16"),
        dict(off, loss_mode="cispo_trl", importance_sampling_level="sequence_token", kl="k2", credit="rlsd",
             rollout_correction="token_mask", has_entropy=True, block_t=256, dt="fp32"),
        dict(off, loss_mode="cispo_verl", importance_sampling_level="token", kl="abs",
             rollout_correction="token_truncate", aggregation=seq_mean, adv_per_token=True, delta=3.0,
             kl_ratio_weighted=True, block_t=P.MAX_BLOCK_T, dt="bf16"),
        dict(off, loss_mode="gpg", importance_sampling_level="token", kl="k3+", credit="rlsd", has_old=False,
             has_entropy=True, kl_clamp=True, block_t=64, dt="fp32"),
        dict(off, loss_mode="sapo", importance_sampling_level="sequence", kl="k3", rollout_correction="sequence_mask",
             adv_per_token=True, has_entropy=True, block_t=P.MAX_BLOCK_T, dt="fp32"),
        dict(off, loss_mode="sapo", importance_sampling_level="token", kl=None, credit="cepo", block_t=P.MAX_BLOCK_T,
             dt="fp16"),
        dict(off, loss_mode="ppo_clip", importance_sampling_level="sequence_token", kl="k3+",
             rollout_correction="token_mask", aggregation=seq_mean, adv_per_token=True, delta=3.0,
             dual_clip=3.0, has_entropy=True, kl_ratio_weighted=True, block_t=128, dt="fp32"),
    ]
    covered = {k: {v[k] for v in variants} for k in ("loss_mode", "importance_sampling_level", "kl", "credit")}
    assert covered["loss_mode"] >= set(tables.KERNEL_LOSS_MODES)
    assert covered["importance_sampling_level"] >= set(tables.IS_LEVELS)
    assert covered["kl"] >= set(tables.KERNEL_KL_ESTIMATORS) and covered["credit"] >= set(tables.CREDIT_MODES)
    cases = []
    for v in variants:
        v = dict(v)
        dt, kl = v.pop("dt"), v.pop("kl")
        given = {k: v.pop(k) for k in ("has_old", "adv_per_token", "has_entropy", "block_t")}
        const = P.kernel_constexprs(SimpleNamespace(kl_estimator=kl or "k3", **v), has_ref=kl is not None,
                                    has_rollout=v["rollout_correction"] is not None, **given)
        name = (f"policy[{v['loss_mode']},{v['importance_sampling_level']},kl={kl},credit={v['credit']},"
                f"rollout={v['rollout_correction']},{dt},BLOCK_T={given['block_t']}]")
        # A [B] advantage vector is contiguous: Triton specialises its stride of 1 into a constexpr.
        args = {"adv_ptr": "fp32", "live_ptr": "u8", "grad_*_ptr": "fp32", "stats_ptr": "fp32", "norm_ptr": "fp32",
                "*_ptr": dt, "stride_adv": INT if given["adv_per_token"] else 1}
        cases.append(make_case(name, P._policy_loss_kernel, args=args, const=const))
    return cases


# --- advantages ----------------------------------------------------------------------------------------

def advantages_cases() -> List[Case]:
    A = adv_k
    modes = ("grpo", "no_std", "batch_std", "rloo", "median", "median_mad", "rank_gaussian",
             "gpg", "grpo_passk", "grpo_passk_no_std", "opo", "reinforce_plus_plus_baseline")
    cases = []
    for rewards, compute in (("fp32", tl.float32), ("bf16", tl.float32), ("fp64", tl.float64)):
        out = "fp64" if compute == tl.float64 else "fp32"
        for mode in modes:
            cap = A.ORDER_BLOCK_MAX_CUDA if mode in A.ORDER_MODES else A.MEAN_BLOCK_MAX
            blocks = (A._block(1, cap), cap) if rewards == "fp32" else (cap,)
            # opo reads the token counts (int64 here); the whitened mode writes a float64 scratch.
            lengths = "i64" if mode in A.WEIGHTED_MODES else rewards
            target = "fp64" if mode in A.WHITENED_MODES else out
            singleton_rules = (False, True) if mode in ("grpo", "opo", "rloo") else (False,)
            for block in blocks:
                for verl in singleton_rules:
                    cases.append(make_case(
                        f"advantages.group[{mode},{rewards},BLOCK={block},verl_singleton={verl}]",
                        A._group_advantages_kernel,
                        args=dict(rewards_ptr=rewards, lengths_ptr=lengths, out_ptr=target, offsets_ptr="i64",
                                  scalars_ptr="fp64"),
                        const=dict(MODE=mode, VERL_SINGLETON=verl, BLOCK=block, COMPUTE=compute), num_warps=4,
                    ))
        for values in (rewards, "fp64"):  # the rewards (batch_std, reinforce_plus_plus) or the residual scratch
            for weighted, lengths in ((False, values), (True, "i64"), (True, "fp32")):
                cases.append(make_case(
                    f"advantages.batch_moments[{values},weighted={weighted},{lengths}]", A._batch_moments_kernel,
                    args=dict(values_ptr=values, lengths_ptr=lengths, scalars_ptr="fp64"),
                    const=dict(WEIGHTED=weighted, BLOCK=A.BATCH_BLOCK),
                ))
            cases.append(make_case(
                f"advantages.whiten[{values}]", A._whiten_kernel,
                args=dict(values_ptr=values, out_ptr=out, scalars_ptr="fp64"), const=dict(BLOCK=A.BATCH_BLOCK),
            ))
        cases.append(make_case(
            f"advantages.difference[{rewards}]", A._difference_kernel,
            args=dict(rewards_ptr=rewards, baselines_ptr=rewards, out_ptr=out), const=dict(BLOCK=A.BATCH_BLOCK),
        ))
    # B = 1 arrives as the constexpr 1 (the kernels count rather than cast B for this reason).
    cases.append(make_case(
        "advantages.batch_moments[fp32,B=1]", A._batch_moments_kernel,
        args=dict(values_ptr="fp32", lengths_ptr="fp32", scalars_ptr="fp64", B=1),
        const=dict(WEIGHTED=False, BLOCK=A.BATCH_BLOCK),
    ))
    cases.append(make_case(
        "advantages.group[grpo,fp32,B=1]", A._group_advantages_kernel,
        args=dict(offsets_ptr="i64", scalars_ptr="fp64", B=1, **{"*_ptr": "fp32"}),
        const=dict(MODE="grpo", VERL_SINGLETON=True, BLOCK=16, COMPUTE=tl.float32), num_warps=4,
    ))
    return cases


# --- credit --------------------------------------------------------------------------------------------

def credit_cases() -> List[Case]:
    cases = []
    for apt, dt in ((True, "fp32"), (False, "fp32"), (True, "bf16"), (False, "fp16")):
        cases.append(make_case(
            f"credit[adv_per_token={int(apt)},{dt}]", credit_k._credit_kernel,
            args=dict(adv_ptr="fp32", live_ptr="u8", pos_ptr=dt, base_ptr=dt, out_ptr="fp32",
                      stride_adv=INT if apt else 1),  # a [B] vector's stride 1 is specialised to a constexpr
            const=dict(ADV_PER_TOKEN=apt, BLOCK=credit_k.BLOCK_T), num_warps=4,
        ))
    return cases


# --- prefix attention ----------------------------------------------------------------------------------

def prefix_attention_cases() -> List[Case]:
    """Every autotuning candidate of every kernel (forward, dQ, dK/dV, dK/dV with the fused atomic dQ) for
    each dtype, head dim and GQA specialisation. --quick: every head dim, dtype, padding and GROUP
    specialisation once per kernel at its first candidate (fp32's IEEE dots unroll into FMA loops that take
    5-15 s each to lower: d = 64 only); the fused dQ variant where it adds to the dK/dV kernel's
    specialisations, at a padded head dim and at GROUP = 1."""
    cases = []
    torch_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    # Strides and the autotuning keys are multiples of 16 in real launches; every pointer not named is a table.
    ints = {"stride_*": ALIGNED, "seg_len_key": ALIGNED, "tokens_key": ALIGNED}
    kernels = (("fwd", "fwd", pa_k._fwd, {}), ("dq", "dq", pa_k._dq, {}),
               ("dkdv", "dkdv", pa_k._dkdv, dict(FUSED_DQ=False)),
               ("dkdv+dq", "dkdv", pa_k._dkdv_dq, dict(FUSED_DQ=True)))
    covering = (("bf16", 64, 4), ("bf16", 80, 4), ("bf16", 128, 1), ("fp16", 96, 4), ("fp32", 64, 4))
    covering_fused = (("bf16", 80, 4), ("bf16", 128, 1))
    for dt in ("bf16", "fp16", "fp32"):
        precision = pa_k._dot_precision(torch_dtype[dt])
        for d in (64, 80, 96, 128):
            block_d = pa_k._block_d(d)
            head = dict(HEAD_DIM=d, BLOCK_D=block_d)
            for group in (4, 1):  # GQA, and MHA where the launch's GROUP = 1 becomes a constexpr
                if group == 1 and d not in (64, 128):
                    continue
                for kind, table, tuned, switch in kernels:
                    kernel = tuned.fn
                    # The fused dQ is a float32 buffer; unfused, dq_ptr is a placeholder (the launch passes dK)
                    # that the kernel never reads.
                    tensors = {"q_ptr": dt, "k_ptr": dt, "v_ptr": dt, "o_ptr": dt, "do_ptr": dt, "dk_ptr": dt,
                               "dv_ptr": dt, "dq_ptr": "fp32" if switch.get("FUSED_DQ") else dt,
                               "lse_ptr": "fp32", "delta_ptr": "fp32"}
                    args = {n: t for n, t in tensors.items() if n in kernel.arg_names}
                    args.update(ints, GROUP=group, **{"*_ptr": "i32"})  # a GROUP of 1 becomes a constexpr
                    for i, (block_m, block_n, nw, ns) in enumerate(pa_k._candidates(table, torch_dtype[dt])):
                        tag = (f"{dt},d={d}" + (",group=1" if group == 1 else "") +
                               f",{block_m}x{block_n},w{nw},s{ns}")
                        quick = i == 0 and (dt, d, group) in (covering_fused if switch.get("FUSED_DQ") else covering)
                        cases.append(make_case(
                            f"prefix_attention.{kind}[{tag}]", kernel, args=args, num_warps=nw, num_stages=ns,
                            const=dict(PAD_D=block_d != d, DOT_PRECISION=precision, BLOCK_M=block_m,
                                       BLOCK_N=block_n, **head, **switch),
                            quick=quick,
                        ))
            cases.append(make_case(
                f"prefix_attention.preprocess[{dt},d={d}]", pa_k._delta_kernel,
                args={"o_ptr": dt, "do_ptr": dt, "delta_ptr": "fp32", "stride_*": ALIGNED},
                const=dict(BLOCK_M=pa_k._DELTA_BLOCK_M, **head),
            ))
    return cases


def all_cases() -> List[Case]:
    return logprobs_cases() + policy_cases() + advantages_cases() + credit_cases() + prefix_attention_cases()


# --- compiling -----------------------------------------------------------------------------------------

_PTXAS_REGS = re.compile(r"Used (\d+) registers")
_PTXAS_SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")


def _drop_cubin_stage(*args):
    """add_stages_inspection_hook for --ptx-only: stop after PTX (the cubin stage yields empty bytes)."""
    if not args:  # called for the cache key
        return "ptx-only", "ptx-only"
    _backend, stages = args[0], args[1]
    stages["cubin"] = lambda src, metadata: b""


def compile_case(case: Case, ptx_only: bool) -> Result:
    knobs = getattr(triton, "knobs", None)
    if knobs is not None:  # set both ways: forked workers inherit the parent's knobs
        knobs.runtime.add_stages_inspection_hook = _drop_cubin_stage if ptx_only else None
        knobs.nvidia.dump_ptxas_log = not ptx_only  # ptxas -v's report, printed on stdout
    log = io.StringIO()
    start = time.perf_counter()
    try:
        src = triton.compiler.ASTSource(fn=case.kernel, signature=case.signature, constexprs=case.constexprs,
                                        attrs=case.attrs)
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(src, target=TARGET, options=case.options)
    except Exception as e:  # noqa: BLE001 - every failure is a finding
        msg = "".join(traceback.format_exception_only(type(e), e)).strip()
        return Result(case.name, False, time.perf_counter() - start, error=msg + _tail(log.getvalue()))
    res = Result(case.name, True, time.perf_counter() - start, shared=compiled.metadata.shared)
    if "ptx" not in compiled.asm:
        res.ok, res.error = False, "no PTX produced"
    text = log.getvalue()
    regs = _PTXAS_REGS.findall(text)
    spill = _PTXAS_SPILL.findall(text)
    if regs:
        res.registers = int(regs[-1])
    if spill:
        res.stack, res.spill_stores, res.spill_loads = (int(x) for x in spill[-1])
    if res.shared is not None and res.shared > H100_SHARED_PER_BLOCK:
        res.notes.append(f"shared memory {res.shared} B exceeds the H100's {H100_SHARED_PER_BLOCK} B per block")
    if res.spill_stores:
        res.notes.append(f"register spills: {res.spill_stores} B stores, {res.spill_loads} B loads")
    return res


def _tail(text: str, n: int = 3000) -> str:
    text = text.strip()
    return ("\n" + text[-n:]) if text else ""


def _worker(args):
    index, ptx_only, cache_dir = args
    os.environ["TRITON_CACHE_DIR"] = cache_dir
    return compile_case(_CASES[index], ptx_only)


_CASES: List[Case] = []


def _cost_hint(name: str) -> int:
    if name.startswith("prefix_attention.") and "preprocess" not in name:
        return 3 if "fp32" in name else 2
    return 0


@triton.jit
def _loop_type_change_kernel(out_ptr, n):
    # int32 before the loop, float32 inside: the interpreter runs this, the compiler must reject it.
    acc = tl.zeros((16,), dtype=tl.int32)
    for i in range(n):
        acc = acc + 0.5
    tl.store(out_ptr + tl.arange(0, 16), acc)


def bundled_ptxas() -> Optional[str]:
    try:
        from triton.backends.nvidia.compiler import get_ptxas
        try:
            return get_ptxas(TARGET_ARCH).path
        except TypeError:  # older signature without the arch
            return get_ptxas().path
    except Exception:  # noqa: BLE001
        return None


def main(argv=None) -> int:
    global _CASES
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ptx-only", action="store_true", help="stop at PTX (skip ptxas)")
    parser.add_argument("--quick", action="store_true",
                        help="the covering subset the test suite compiles (every kernel, dtype, head dim and "
                             "constexpr value at least once)")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="parallel compile processes")
    parser.add_argument("-k", dest="filter", default="", help="only cases whose name contains this")
    parser.add_argument("--list", action="store_true", help="list the cases and exit")
    parser.add_argument("--verbose", action="store_true", help="one line per case, not just the problems")
    parser.add_argument("--keep-cache", action="store_true",
                        help="use Triton's usual cache (default: a fresh one, so everything really compiles)")
    args = parser.parse_args(argv)

    _CASES = [c for c in all_cases() if args.filter in c.name and (c.quick or not args.quick)]
    if args.list:
        for c in _CASES:
            print(c.name, c.options)
        return 0
    if not _CASES:
        print("no cases match", args.filter)
        return 1
    ptxas = bundled_ptxas()
    ptx_only = args.ptx_only or ptxas is None
    print(f"triton {triton.__version__}, target sm_{TARGET_ARCH}, {len(_CASES)} cases{' (quick)' * args.quick}, "
          f"{'PTX only' if ptx_only else 'PTX + cubin (ptxas ' + str(ptxas) + ')'}, {args.jobs} jobs")

    cache_dir = os.environ.get("TRITON_CACHE_DIR", "") if args.keep_cache else tempfile.mkdtemp(
        prefix="rlloss-compile-")
    start = time.perf_counter()
    try:
        # The harness must catch what the interpreter lets through: a kernel with a loop-carried value that
        # changes type has to fail to compile, or nothing below means anything.
        os.environ["TRITON_CACHE_DIR"] = cache_dir
        control = compile_case(make_case("self-check (must fail)", _loop_type_change_kernel,
                                         args=dict(out_ptr="fp32")), ptx_only=True)
        if control.ok or "Loop-carried" not in control.error:
            print("FAIL self-check: a kernel with a loop-carried type change did not fail as it must; the harness "
                  "is not really compiling\n     " + (control.error or "it compiled"))
            return 1
        # Longest first (fp32 attention takes 10x the rest), so the pool finishes together.
        order = sorted(range(len(_CASES)), key=lambda i: -_cost_hint(_CASES[i].name))
        work = [(i, ptx_only, cache_dir) for i in order]
        if args.jobs > 1:
            ctx = multiprocessing.get_context("fork")
            with ProcessPoolExecutor(max_workers=args.jobs, mp_context=ctx) as pool:
                done = dict(zip(order, pool.map(_worker, work)))
        else:
            done = dict(zip(order, map(_worker, work)))
        results = [done[i] for i in range(len(_CASES))]
    finally:
        if not args.keep_cache:
            shutil.rmtree(cache_dir, ignore_errors=True)
    wall = time.perf_counter() - start

    failed = [r for r in results if not r.ok]
    for r in results:
        flag = "FAIL" if not r.ok else ("WARN" if r.notes else "ok  ")
        if args.verbose or not r.ok or r.notes:
            res = ""
            if r.ok:
                res = f" shared={r.shared}B"
                if r.registers is not None:
                    res += f" regs={r.registers} spill={r.spill_stores}/{r.spill_loads}B stack={r.stack}B"
            print(f"{flag} {r.name} ({r.seconds:.1f}s){res}")
            for note in r.notes:
                print(f"     {note}")
            if not r.ok:
                print("     " + r.error.replace("\n", "\n     "))
    ok = [r for r in results if r.ok]
    if ok:
        top = max(ok, key=lambda r: r.shared or 0)
        print(f"max shared memory: {top.shared} B ({top.name}); limit {H100_SHARED_PER_BLOCK} B per block")
        with_regs = [r for r in ok if r.registers is not None]
        if with_regs:
            top = max(with_regs, key=lambda r: r.registers)
            print(f"max registers: {top.registers} ({top.name}); "
                  f"{sum(1 for r in with_regs if r.spill_stores)} case(s) spill")
    print(f"{len(ok)}/{len(results)} compiled in {wall:.1f}s wall "
          f"({sum(r.seconds for r in results):.1f}s of compile time)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
