"""Token log-probs and entropy (docs/math.md §1): from hidden states and the lm_head weight without ever holding
[tokens × vocab] logits, or from logits a trainer already holds in one streaming pass.

The per-token statistics, the chunked executor, the autograd functions and the public API; the Triton kernels
are in ``rlloss.kernels.logprobs``, the naive oracle in ``rlloss.reference``.
"""
from __future__ import annotations

import functools
import sys
from typing import Callable, List, NamedTuple, Optional, Tuple

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from . import _checks
from ._checks import compute_dtype
from ._backend import accepted_dtypes, implementation, kernels, resolve_backend, uses_kernels
from . import reference

__all__ = ["TokenLogprobs", "token_logprobs", "logprobs_from_logits", "merge_stats"]

# Default bound on the logit scratch of one chunk of tokens (see docs/design/logprobs.md). On a GPU 256 MiB
# holds 294 tokens × 151936 vocabulary entries of float32 logits plus their bfloat16 gradient. Elsewhere the
# CPU BLAS is as fast from a few hundred rows on, and 64 MiB keeps the peak memory small (measured on the
# benchmark shape: 64 MiB was as fast as 256 MiB, docs/design/logprobs.md).
DEFAULT_MAX_SCRATCH_BYTES = 256 << 20
CPU_MAX_SCRATCH_BYTES = 64 << 20
# Tokens per chunk in batch-invariant mode: a constant, so every GEMM and pass has the same shape whatever N
# is (wide enough that the GEMMs stay compute-bound).
BATCH_INVARIANT_ROWS = 256
# Logits below this count as this: e^{floor − M} is exactly 0 and (floor − M)·0 = 0, so masked vocabulary
# entries (−inf) never produce −inf·0. The kernels use the same value (kernels/logprobs.py).
LOGIT_FLOOR = -1e30


class TokenLogprobs(NamedTuple):
    """Per-token results of :func:`token_logprobs` / :func:`logprobs_from_logits`.

    logprobs: log p(target) with the targets' shape, float32 (float64 for float64 inputs); 0 where ignored.
    entropy:  entropy of the token distribution, same shape and dtype, or None unless it was asked for.
    """

    logprobs: Tensor
    entropy: Optional[Tensor]


# --- statistics (docs/math.md §1, online form shifted by the max) --------------------------------------------


class RowStats(NamedTuple):
    """Per-token statistics of z (each [N]): ``shift`` M = max z, ``total`` A = Σ e^{z−M},
    ``ratio`` C/A = Σ p·(z − M), ``target`` z_y − M. Everything else follows without cancellation:
    log p_y = (z_y − M) − log A, H = log A − C/A, lse = M + log A."""

    shift: Tensor
    total: Tensor
    ratio: Tensor
    target: Tensor

    def logprobs(self) -> Tensor:
        return self.target - self.total.log()

    def entropy(self) -> Tensor:
        return self.total.log() - self.ratio


def merge_stats(stats: Tensor) -> RowStats:
    """Merge partial statistics over vocabulary splits exactly.

    Args:
        stats: [4, S, N] planes (M, A, C, z_y) of S disjoint vocabulary splits (kernel programs or
            tensor-parallel ranks), C = Σ (z − M)·e^{z−M} shifted by its own split's M, z_y unshifted (0 in
            the splits that do not hold the target).
    Returns:
        :class:`RowStats` over the whole vocabulary.
    """
    m, a, c, zy = stats.unbind(0)
    top = m.amax(dim=0)
    scale = torch.exp(m - top)
    total = (a * scale).sum(0)
    shifted = (scale * (c + (m - top) * a)).sum(0)
    return RowStats(top, total, shifted / total, zy.sum(0) - top)


def dz_coefficients(stats: RowStats, g_logp: Optional[Tensor], g_ent: Optional[Tensor], live: Tensor,
                    inv_temperature: float) -> Tuple[Tensor, Tensor, Tensor]:
    """Per-row (a, b, g) with d(loss)/dx_v = e^{s_v}·(a·s_v + b) + g·1[v = y] for s = z − M: the dz of
    docs/math.md §1 with p_v = e^{s_v}/A and z_v − Σp·z = s_v − C/A gives a = −g_H/A, b = (g_H·C/A − g_ℓ)/A,
    g = g_ℓ, each times 1/T (the soft-cap factor is applied per element by the passes), and exactly 0 on rows
    that are not live whatever the upstream gradients hold. The one place this formula is written; both
    executors consume it.
    """
    zero = torch.zeros((), dtype=stats.total.dtype, device=stats.total.device)
    inv_total = inv_temperature / stats.total
    a = b = g = torch.zeros_like(stats.total)
    if g_ent is not None:
        g_ent = g_ent.to(stats.total.dtype)
        a = -g_ent * inv_total
        b = g_ent * stats.ratio * inv_total
    if g_logp is not None:
        g_logp = g_logp.to(stats.total.dtype)
        b = b - g_logp * inv_total
        g = g_logp * inv_temperature
    return torch.where(live, a, zero), torch.where(live, b, zero), torch.where(live, g, zero)


# --- the chunked executor: GEMMs in the vendor BLAS, one elementwise pass between them ------------------


class LinearOptions(NamedTuple):
    """How a hidden-state (or logits) pass runs; checked by the public functions."""

    temperature: float
    softcap: Optional[float]
    ignore_index: int
    backend: str
    max_scratch_bytes: int = DEFAULT_MAX_SCRATCH_BYTES
    batch_invariant: bool = False


def _scratch_bytes_per_logit(dtype: torch.dtype, backend: str) -> int:
    """Bytes of scratch per logit of a chunk: the logits in the compute dtype, plus the gradient in the input
    dtype on the kernels when that is 16-bit (the torch executor's block buffers are a fixed ~1 MiB more)."""
    size = compute_dtype(dtype).itemsize
    return size + (dtype.itemsize if uses_kernels(backend) and dtype.itemsize < size else 0)


def chunk_rows(n_tokens: int, vocab: int, dtype: torch.dtype, options: LinearOptions) -> int:
    """Tokens per chunk: as many as ``max_scratch_bytes`` allows (at least 1, at most N), or the constant
    BATCH_INVARIANT_ROWS in batch-invariant mode."""
    if options.batch_invariant:
        return BATCH_INVARIANT_ROWS
    per_row = vocab * _scratch_bytes_per_logit(dtype, options.backend)
    return max(1, min(n_tokens, options.max_scratch_bytes // per_row))


@functools.lru_cache(maxsize=None)
def _cuda_out_dtype_gemm(device: torch.device) -> bool:
    """Whether cuBLAS 16-bit GEMMs with float32 output (``torch.mm(..., out_dtype=)``, torch ≥ 2.8) work here."""
    try:
        a = torch.ones((2, 2), dtype=torch.bfloat16, device=device)
        acc = torch.zeros((2, 2), dtype=torch.float32, device=device)
        torch.mm(a, a, torch.float32, out=acc)
        torch.addmm(acc, a, a, torch.float32, out=acc)
        return True  # no value read back: the probe never synchronises
    except (RuntimeError, TypeError):
        return False


def _mm(a: Tensor, b: Tensor, out: Tensor, accumulate: bool = False) -> None:
    """out (+)= a @ b with float32 accumulation; ``out`` may be float32 while a and b are 16-bit."""
    if a.dtype != out.dtype and not (a.is_cuda and _cuda_out_dtype_gemm(a.device)):
        a, b = a.to(out.dtype), b.to(out.dtype)
    out_dtype = (out.dtype,) if a.dtype != out.dtype else ()  # cuBLAS's float32 output of 16-bit operands
    if accumulate:
        torch.addmm(out, a, b, *out_dtype, out=out)  # beta = 1 into the accumulator itself
    else:
        torch.mm(a, b, *out_dtype, out=out)


# The torch executor runs its elementwise passes over cache-sized blocks of rows of the chunk, so the several
# torch ops of a pass reread data from cache, not from memory (the GEMMs still see the whole chunk).
TORCH_BLOCK_BYTES = 1 << 20


def _torch_blocks(n: int, width: int, itemsize: int):
    rows = max(1, TORCH_BLOCK_BYTES // (width * itemsize))
    return [(r, min(n, r + rows)) for r in range(0, n, rows)], rows


def _torch_transform(z: Tensor, bias, options: LinearOptions, shift: Optional[Tensor], floor: bool) -> Tensor:
    """Turn raw logits x (rows of a chunk, in place) into s = z − M with z = cap(x + b)/T; returns M (the row
    max, or ``shift`` when known)."""
    if bias is not None:
        z.add_(bias.to(z.dtype))
    if options.softcap is not None:
        z.div_(options.softcap).tanh_().mul_(options.softcap)
    if options.temperature != 1.0:
        z.mul_(1.0 / options.temperature)
    if floor:
        z.clamp_(min=LOGIT_FLOOR)
    if shift is None:
        shift = z.amax(dim=1)
    z.sub_(shift[:, None])
    return shift


def _torch_stats(z: Tensor, bias, options: LinearOptions, floor: bool, safe_targets: Tensor, e_buf: Tensor):
    """RowStats of a chunk of raw logits, block by block; z becomes s = z − M in place."""
    blocks, _ = _torch_blocks(z.shape[0], z.shape[1], z.element_size())
    parts = []
    for r0, r1 in blocks:
        s = z[r0:r1]
        shift = _torch_transform(s, bias, options, None, floor)
        e = torch.exp(s, out=e_buf[: r1 - r0])
        total = e.sum(1)
        shifted_sum = torch.linalg.vecdot(s, e, dim=1)  # Σ s·e^s, row by row
        parts.append((shift, total, shifted_sum / total, s.gather(1, safe_targets[r0:r1, None]).squeeze(1)))
    return RowStats(*(torch.cat(p) for p in zip(*parts)))


def _torch_dlogits(z: Tensor, shift: Tensor, coef, safe_targets: Tensor, options: LinearOptions, e_buf: Tensor,
                   shifted: bool, bias, floor: bool) -> Tensor:
    """dz = e^s·(a·s + b) + g·1[v = y] (· the soft-cap factor 1 − tanh²), written over z block by block.

    ``shifted``: z already holds s = z − M (after :func:`_torch_stats`); otherwise it holds raw logits (a
    recompute) and is transformed here with the saved M."""
    a, b, g = coef
    blocks, _ = _torch_blocks(z.shape[0], z.shape[1], z.element_size())
    for r0, r1 in blocks:
        s = z[r0:r1]
        if not shifted:
            _torch_transform(s, bias, options, shift[r0:r1], floor)
        e = torch.exp(s, out=e_buf[: r1 - r0])
        factor = None
        if options.softcap is not None:  # tanh(x/c) = (s + M)·T/c
            factor = (s + shift[r0:r1, None]).mul_(options.temperature / options.softcap).square_().neg_().add_(1)
        s.mul_(a[r0:r1, None]).add_(b[r0:r1, None]).mul_(e)
        s.scatter_add_(1, safe_targets[r0:r1, None], g[r0:r1, None])
        if factor is not None:
            s.mul_(factor)
    return z


class VocabShard(NamedTuple):
    """How :func:`run_pass` runs on one shard of a vocabulary-sharded lm_head (``rlloss.distributed``).

    The targets given to the pass are then local ids (global id − the shard's first row) where the target lies
    in this shard, and an id outside [0, V_shard) that is not ``ignore_index`` elsewhere.

    chunk_vocab: the vocabulary size chunks are sized for, the same on every rank (the largest shard), so that
        every rank runs the same chunks and issues the same collectives.
    merge: ``(local stats of a chunk, owned [n] bool: the target lies in this shard) -> stats over the whole
        vocabulary``; called once per chunk of a statistics pass, before d(loss)/dz is formed.
    """

    chunk_vocab: int
    merge: Callable[[RowStats, Tensor], RowStats]


class PassResult(NamedTuple):
    """What :func:`run_pass` returns: per-token outputs when it computed statistics, gradients when asked."""

    logprobs: Optional[Tensor]
    entropy: Optional[Tensor]
    stats: Optional[RowStats]
    grad_input: Optional[Tensor]
    grad_weight: Optional[Tensor]
    grad_bias: Optional[Tensor]


def run_pass(
    x: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    targets: Tensor,
    options: LinearOptions,
    *,
    stats: Optional[RowStats] = None,
    upstream=None,
    needs: Tuple[bool, bool, bool] = (False, False, False),
    grad_out: Optional[Tensor] = None,
    shard: Optional[VocabShard] = None,
) -> PassResult:
    """The one chunked algorithm behind every log-prob job, chunk by chunk (C tokens from :func:`chunk_rows`):
    logits GEMM, one elementwise pass, gradient GEMMs (docs/design/logprobs.md). ``x`` is hidden [N, D] with
    ``weight`` [V, D], or logits [N, V] with ``weight`` None (dz is then the gradient).

    Jobs:
      - ``stats`` None: compute the statistics (log-probs and entropy come back).
      - ``upstream`` (g_logp, g_ent) [N] tensors (None = zero) with ``stats`` from a forward: the recompute
        backward.
      - ``upstream`` a callable ``(begin, end, logprobs, entropy) -> (g_logp, g_ent)`` with ``stats`` None:
        the one-pass fused loss, gradients formed in the same pass as the statistics.
    ``needs`` = which of (grad of x, grad of weight, grad of bias) to form; ``grad_out`` an optional [N, V]
    buffer for the logits gradient (the logits themselves for an in-place backward). ``shard``: the weight is
    one shard of the vocabulary (see :class:`VocabShard`); each chunk's statistics are merged over the shards
    before they are used.
    """
    N = x.shape[0]
    linear = weight is not None
    V = weight.shape[0] if linear else x.shape[1]
    device, backend = x.device, options.backend
    cd = compute_dtype(x.dtype)
    live = targets != options.ignore_index
    owned = live if shard is None else live & (targets >= 0) & (targets < V)  # the target's row is here
    safe_targets = torch.where(owned, targets, torch.zeros_like(targets)).clamp_(0, V - 1)
    inv_t = 1.0 / options.temperature
    wants_grad = upstream is not None
    floor = bias is not None or not linear  # a GEMM of finite rows gives finite logits

    out_logp = out_ent = parts = None
    if stats is None:
        out_logp = torch.zeros(N, dtype=cd, device=device)
        out_ent = torch.zeros(N, dtype=cd, device=device)
        parts = [torch.empty(N, dtype=cd, device=device) for _ in range(4)]
    grad_x = grad_w = grad_b = None
    if wants_grad and needs[0]:
        grad_x = grad_out if grad_out is not None else torch.empty_like(x)
    if wants_grad and linear and needs[1]:  # accumulated in float32 for 16-bit weights
        grad_w = torch.zeros(weight.shape, dtype=torch.float32 if weight.dtype.itemsize < 4 else weight.dtype,
                             device=device)
    if wants_grad and bias is not None and needs[2]:
        grad_b = torch.zeros(V, dtype=cd, device=device)
    if N == 0:
        return _pass_result(out_logp, out_ent, stats, parts, grad_x, grad_w, grad_b, x, weight, bias)

    rows = chunk_rows(N, V if shard is None else shard.chunk_vocab, x.dtype, options)
    kernel_path = uses_kernels(backend)
    on_cuda_16bit = x.is_cuda and x.dtype.itemsize < 4 and linear and _cuda_out_dtype_gemm(device)
    w_gemm = None
    if linear:
        w_gemm = weight if (on_cuda_16bit or weight.dtype == cd) else weight.to(cd)
    scratch = torch.empty((rows, V), dtype=cd, device=device)
    e_buf = None
    if not kernel_path:
        e_buf = torch.empty((min(rows, _torch_blocks(rows, V, cd.itemsize)[1]), V), dtype=cd, device=device)
    dz_buf = scratch  # where the kernels write the linear path's dz: over the logits when the dtypes agree
    if kernel_path and wants_grad and linear and x.dtype != cd:
        dz_buf = torch.empty((rows, V), dtype=x.dtype, device=device)  # the gradient GEMMs' 16-bit operand
    h_buf = None
    if linear and options.batch_invariant:
        h_buf = torch.zeros((rows, x.shape[1]), dtype=w_gemm.dtype, device=device)
    zero = torch.zeros((), dtype=cd, device=device)
    x_zero = torch.zeros((), dtype=x.dtype, device=device)  # ignored tokens' rows count as 0, even inf or NaN

    for begin in range(0, N, rows):
        end = min(N, begin + rows)
        n = end - begin
        live_c, tgt_c, safe_c = live[begin:end], targets[begin:end], safe_targets[begin:end]
        # -- logits of the chunk, float32 (compute dtype) -------------------------------------------------
        z = scratch[:n]
        if linear:
            h = torch.where(live_c[:, None], x[begin:end], x_zero).to(w_gemm.dtype)
            if h_buf is not None:  # batch-invariant: every GEMM has exactly `rows` rows
                h_buf[:n].copy_(h)
                h_buf[n:].zero_()
                _mm(h_buf, w_gemm.T, scratch)
            else:
                _mm(h, w_gemm.T, z)
        elif kernel_path:
            z = x[begin:end]  # the kernels read the trainer's logits directly
        else:
            z.copy_(torch.where(live_c[:, None], x[begin:end], x_zero))
        # -- statistics ---------------------------------------------------------------------------------
        if stats is not None:
            chunk_stats = RowStats(*(t[begin:end] for t in stats))
        elif kernel_path:
            partial = kernels("logprobs").logits_stats(z, bias, tgt_c, ignore_index=options.ignore_index,
                                                       temperature=options.temperature, softcap=options.softcap,
                                                       batch_invariant=options.batch_invariant)
            chunk_stats = merge_stats(partial.to(cd))
        else:
            chunk_stats = _torch_stats(z, bias, options, floor, safe_c, e_buf)
        if shard is not None and stats is None:
            local_shift = chunk_stats.shift
            chunk_stats = shard.merge(chunk_stats, owned[begin:end])
        if stats is None:
            for part, value in zip(parts, chunk_stats):
                part[begin:end] = value
            logp_c = out_logp[begin:end] = torch.where(live_c, chunk_stats.logprobs(), zero)
            ent_c = out_ent[begin:end] = torch.where(live_c, chunk_stats.entropy(), zero)
        if not wants_grad:
            continue
        # -- gradient of the chunk's logits, then the two products ---------------------------------------
        if callable(upstream):
            g_logp, g_ent = upstream(begin, end, logp_c, ent_c)
        else:
            g_logp, g_ent = (None if g is None else g[begin:end] for g in upstream)
        coef = dz_coefficients(chunk_stats, g_logp, g_ent, live_c, inv_t)
        if shard is not None:  # the 1[v = y] term belongs to the shard that holds y
            coef = (*coef[:2], torch.where(owned[begin:end], coef[2], zero))
        if kernel_path:
            dz = kernels("logprobs").dlogits(z, bias, tgt_c, chunk_stats.shift.float(), *(c.float() for c in coef),
                                             ignore_index=options.ignore_index, temperature=options.temperature,
                                             softcap=options.softcap,
                                             out=dz_buf[:n] if linear else grad_x[begin:end])
        else:
            if shard is not None and stats is None:  # z holds z − M of this shard: shift it by the global M
                z.sub_((chunk_stats.shift - local_shift)[:, None])
            dz = _torch_dlogits(z, chunk_stats.shift, coef, safe_c, options, e_buf, stats is None, bias, floor)
            if not linear and grad_x is not None:
                grad_x[begin:end] = dz
        if linear:
            if grad_x is not None:  # dh_c = dz·W, in dz's dtype (float32 accumulation inside the GEMM)
                w_dz = weight if weight.dtype == dz.dtype else w_gemm
                if grad_x.dtype == dz.dtype:
                    torch.mm(dz, w_dz, out=grad_x[begin:end])
                else:
                    grad_x[begin:end] = dz @ w_dz
            if grad_w is not None:  # dW += dzᵀ·h_c, accumulated in float32
                _mm(dz.T, h, grad_w, accumulate=True)
        if grad_b is not None:
            grad_b += dz.sum(0, dtype=cd)
    return _pass_result(out_logp, out_ent, stats, parts, grad_x, grad_w, grad_b, x, weight, bias)


def _pass_result(out_logp, out_ent, stats, parts, grad_x, grad_w, grad_b, x, weight, bias) -> PassResult:
    """The pass's outputs, each gradient in its input's dtype (a no-op ``to`` where it already is)."""
    grads = (g if g is None else g.to(like.dtype) for g, like in zip((grad_x, grad_w, grad_b), (x, weight, bias)))
    return PassResult(out_logp, out_ent, RowStats(*parts) if stats is None else stats, *grads)


# --- autograd -----------------------------------------------------------------------------------------


# The hidden-state path is a torch.library custom op with a fake (meta) implementation and a registered
# autograd formula, so torch.compile(fullgraph=True) treats it as one node and CUDA graphs can capture it.
# Absent optional results travel as empty tensors (an op cannot return None).
EMPTY = (0,)  # the shape of an absent optional result of a registered op


def token_logprobs_impl(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], targets: Tensor,
                       temperature: float, softcap: Optional[float], ignore_index: int, backend: str,
                       max_scratch_bytes: int, batch_invariant: bool) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(logprobs, entropy, shift, total, ratio) [N]: the statistics pass (2·N·D·V FLOPs)."""
    options = LinearOptions(temperature, softcap, ignore_index, backend, max_scratch_bytes, batch_invariant)
    result = run_pass(hidden, weight, bias, targets, options)
    return (result.logprobs, result.entropy, *result.stats[:3])


_token_logprobs_op = torch.library.custom_op("rlloss::token_logprobs", token_logprobs_impl, mutates_args=())


@_token_logprobs_op.register_fake
def _(hidden, weight, bias, targets, *options):
    return tuple(hidden.new_empty(hidden.shape[:1], dtype=compute_dtype(hidden.dtype)) for _ in range(5))


def token_logprobs_backward_impl(g_logp: Optional[Tensor], g_ent: Optional[Tensor], hidden: Tensor, weight: Tensor,
                                bias: Optional[Tensor], targets: Tensor, shift: Tensor, total: Tensor,
                                ratio: Tensor, needs: List[bool], temperature: float, softcap: Optional[float],
                                ignore_index: int, backend: str, max_scratch_bytes: int,
                                batch_invariant: bool) -> Tuple[Tensor, Tensor, Tensor]:
    """(dhidden, dweight, dbias) for upstream gradients of the log-probs and entropy: one recompute of each
    chunk's logits and the two gradient GEMMs (6·N·D·V FLOPs). Unneeded gradients come back empty."""
    options = LinearOptions(temperature, softcap, ignore_index, backend, max_scratch_bytes, batch_invariant)
    needs = (needs[0], needs[1], bias is not None and needs[2])
    if g_logp is None and g_ent is None:
        result = PassResult(None, None, None, torch.zeros_like(hidden), torch.zeros_like(weight),
                            torch.zeros_like(bias) if bias is not None else None)
    else:
        result = run_pass(hidden, weight, bias, targets, options, stats=RowStats(shift, total, ratio, shift),
                          upstream=(g_logp, g_ent), needs=needs)
    grads = (result.grad_input, result.grad_weight, result.grad_bias)
    return tuple(g if n and g is not None else hidden.new_empty(EMPTY) for g, n in zip(grads, needs))


_token_logprobs_backward_op = torch.library.custom_op("rlloss::token_logprobs_backward",
                                                      token_logprobs_backward_impl, mutates_args=())


@_token_logprobs_backward_op.register_fake
def _(g_logp, g_ent, hidden, weight, bias, targets, shift, total, ratio, needs, *options):
    like = (hidden, weight, bias)
    return tuple(torch.empty_like(t) if n and t is not None else hidden.new_empty(EMPTY) for t, n in zip(like, needs))


def _token_logprobs_setup(ctx, inputs, output):
    ctx.mark_non_differentiable(*output[2:])
    hidden, weight, bias, targets, *options = inputs
    ctx.save_for_backward(hidden, weight, bias, targets, *output[2:])
    ctx.options = options
    ctx.set_materialize_grads(False)


def _token_logprobs_backward(ctx, g_logp, g_ent, *_):
    hidden, weight, bias, targets, shift, total, ratio = ctx.saved_tensors
    needs = [bool(n) for n in ctx.needs_input_grad[:3]]
    grads = _token_logprobs_backward_op(g_logp, g_ent, hidden, weight, bias, targets, shift, total, ratio, needs,
                                        *ctx.options)
    grads = tuple(g if n else None for g, n in zip(grads, needs))
    return (*grads, None, None, None, None, None, None, None)


_token_logprobs_op.register_autograd(_token_logprobs_backward, setup_context=_token_logprobs_setup)


class _LogitsLogprobs(torch.autograd.Function):
    """(logprobs, entropy) [N] from logits [N, V] and targets [N]."""

    @staticmethod
    def forward(ctx, logits, targets, options, inplace_backward):
        result = run_pass(logits, None, None, targets, options)
        ctx.save_for_backward(logits, targets, *result.stats[:3])
        ctx.options, ctx.inplace_backward = options, inplace_backward
        ctx.set_materialize_grads(False)
        return result.logprobs, result.entropy

    @staticmethod
    @once_differentiable
    def backward(ctx, g_logp, g_ent):
        logits, targets, shift, total, ratio = ctx.saved_tensors
        out = logits if ctx.inplace_backward else torch.empty_like(logits)
        if g_logp is None and g_ent is None:
            return out.zero_(), None, None, None
        run_pass(logits, None, None, targets, ctx.options, stats=RowStats(shift, total, ratio, shift),
                 upstream=(g_logp, g_ent), needs=(True, False, False), grad_out=out)
        return out, None, None, None


# --- public API ---------------------------------------------------------------------------------------


def _check_targets(targets: object, lead_shape: torch.Size, lead_name: str) -> Tensor:
    targets = _checks.tensor("targets", targets)
    if targets.dtype != torch.int64:
        raise TypeError(f"targets must be int64 token ids, got {_checks.dtype_name(targets.dtype)}")
    _checks.same_shape("targets", targets, lead_shape, f"{lead_name}'s leading")
    return targets


def masked_targets(mask: object, targets: Tensor, ignore_index: int, check_values: bool) -> Tensor:
    """``targets`` with ``ignore_index`` where ``mask`` (targets' shape, bool or 0/1) is False: those tokens then
    give 0 and exactly zero gradient on every backend, as ignored ones do (one host read for a non-bool mask
    when ``check_values``)."""
    mask = _checks.tensor("mask", mask)
    _checks.same_shape("mask", mask, targets.shape, "targets'")
    _checks.same_device(targets=targets, mask=mask)
    return targets.masked_fill(~_checks.mask(mask, targets.shape, check_values), ignore_index)


def _rows(x: Tensor, width: int) -> Tensor:
    """[..., width] → [n, width] with unit stride along width (copies only when it must)."""
    x = x.reshape(-1, width)
    return x if x.stride(1) == 1 or x.shape[0] == 0 else x.contiguous()


class LinearInputs(NamedTuple):
    """Checked inputs of the hidden-state path (see :func:`check_linear_inputs`)."""

    hidden: Tensor
    weight: Tensor
    targets: Tensor
    bias: Optional[Tensor]
    options: LinearOptions


def check_options(temperature, softcap, ignore_index, backend_name: str, max_scratch_bytes,
                  batch_invariant, device: torch.device = torch.device("cpu")) -> LinearOptions:
    """Check the scalar options shared by the log-prob functions and FusedPolicyLoss (host side, no sync);
    ``max_scratch_bytes=None`` becomes the default for ``device``."""
    temperature = _checks.positive_finite("temperature", temperature)
    if softcap is not None:
        softcap = _checks.positive_finite("softcap", softcap)
    ignore_index = _checks.integer("ignore_index", ignore_index)
    if max_scratch_bytes is None:
        max_scratch_bytes = DEFAULT_MAX_SCRATCH_BYTES if device.type == "cuda" else CPU_MAX_SCRATCH_BYTES
    max_scratch_bytes = _checks.integer("max_scratch_bytes", max_scratch_bytes)
    if max_scratch_bytes <= 0:
        raise ValueError(f"max_scratch_bytes must be a positive number of bytes, got {max_scratch_bytes}")
    _checks.boolean("batch_invariant", batch_invariant)
    return LinearOptions(temperature, softcap, ignore_index, backend_name, max_scratch_bytes, batch_invariant)


def _reject_dtensor(**tensors) -> None:
    """A DTensor (an FSDP2 or tensor-parallel parameter outside its module's forward) holds only this rank's part:
    say what to pass instead (docs/distributed.md)."""
    dtensor = sys.modules.get("torch.distributed.tensor")  # not imported: no DTensor can exist
    if dtensor is None:
        return
    for name, t in tensors.items():
        if isinstance(t, dtensor.DTensor):
            raise TypeError(
                f"{name} is a DTensor with placements {tuple(t.placements)}; pass plain tensors: under FSDP2 "
                f"(fully_shard) call the loss inside the forward of the module fully_shard wrapped, where {name} "
                f"is gathered and its gradient reduce-scattered by FSDP; for a vocabulary-sharded lm_head (tensor "
                f"parallelism) pass {name}.to_local() with process_group=the tensor-parallel group "
                f"(docs/distributed.md)")


def check_linear_inputs(hidden, weight, targets, bias, *, temperature, softcap, ignore_index, backend,
                        max_scratch_bytes=None, batch_invariant=False) -> LinearInputs:
    """Check the arguments of :func:`token_logprobs` on the host (no device value read: the callers check the
    targets' range themselves, where they count) and resolve the backend."""
    hidden = _checks.tensor("hidden", hidden)
    weight = _checks.tensor("weight", weight)
    _reject_dtensor(hidden=hidden, weight=weight, bias=bias)
    if hidden.ndim < 1:
        raise ValueError("hidden must be [..., D], got a 0-D tensor")
    _checks.ndim("weight", weight, 2, "[V, D]")
    targets = _check_targets(targets, hidden.shape[:-1], "hidden")
    if bias is not None:
        bias = _checks.tensor("bias", bias)
        _checks.ndim("bias", bias, 1, "[V]")
    _checks.same_device(hidden=hidden, weight=weight, targets=targets, bias=bias)
    name = resolve_backend(backend, hidden.device)
    _checks.dtype_in("hidden", hidden, accepted_dtypes(name))
    if weight.dtype != hidden.dtype:
        raise TypeError(f"weight must have hidden's dtype {hidden.dtype}, got {weight.dtype}")
    V, D = weight.shape
    if V == 0:
        raise ValueError("weight must have at least one vocabulary row, got V = 0")
    if D == 0:
        raise ValueError("weight must have a hidden size D of at least 1, got D = 0")
    if hidden.shape[-1] != D:
        raise ValueError(f"hidden's last dim must equal weight's D = {D}, got hidden shape {tuple(hidden.shape)}")
    if bias is not None:
        _checks.dtype_in("bias", bias, _checks.FLOAT_DTYPES)
        if bias.shape[0] != V:
            raise ValueError(f"bias must be [V] with V = {V}, got shape {tuple(bias.shape)}")
    options = check_options(temperature, softcap, ignore_index, name, max_scratch_bytes, batch_invariant,
                            hidden.device)
    return LinearInputs(hidden, weight, targets, bias, options)


def prepare_linear(inputs: LinearInputs) -> Tuple[Tensor, Tensor, Optional[Tensor], Tensor]:
    """(hidden [N, D], weight, bias, targets [N]) with the unit strides the passes and GEMMs want."""
    weight = inputs.weight if inputs.weight.stride(1) == 1 else inputs.weight.contiguous()
    bias = inputs.bias.contiguous() if inputs.bias is not None else None  # the kernels index bias with unit stride
    return _rows(inputs.hidden, weight.shape[1]), weight, bias, inputs.targets.reshape(-1)


def token_logprobs(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    *,
    bias: Optional[Tensor] = None,
    temperature: float = 1.0,
    softcap: Optional[float] = None,
    return_entropy: bool = False,
    mask: Optional[Tensor] = None,
    ignore_index: int = -100,
    max_scratch_bytes: Optional[int] = None,
    batch_invariant: bool = False,
    check_inputs: bool = True,
    backend: Optional[str] = None,
    process_group=None,
) -> TokenLogprobs:
    """Log-prob of each target token (and the entropy of each token's distribution) straight from the final
    hidden states and the lm_head weight, never materialising [tokens × vocab] logits.

    With z = cap(h·Wᵀ + b)/T, cap(x) = c·tanh(x/c) when ``softcap`` is c (docs/math.md §1):
    ``logprobs = z_y − logsumexp(z)`` and ``entropy = logsumexp(z) − Σ_v softmax(z)_v·z_v``.

    The tokens are processed in chunks whose float32 logits fit ``max_scratch_bytes``: one GEMM and one
    elementwise pass per chunk, one recompute in the backward (8·N·D·V FLOPs in all; docs/design/logprobs.md).

    Args:
        hidden: [..., D] float16, bfloat16 or float32 (float64 too on the ``torch``/``reference`` backends).
        weight: [V, D], same dtype as hidden.
        targets: [...] int64 with hidden's leading shape; values in [0, V) or ``ignore_index``.
        bias: optional [V] floating bias of the lm_head.
        temperature: T > 0 dividing the logits (after the soft-cap).
        softcap: c > 0 for Gemma-style logit soft-capping, or None.
        return_entropy: also return the entropy (otherwise ``entropy`` is None).
        mask: optional [...] bool (or 0/1) with targets' shape, True where a token is scored: tokens outside it
            give 0 and receive exactly zero gradient, as ``ignore_index`` tokens do, whatever their targets or
            hidden rows hold. Combines with ``ignore_index``: a token counts when its mask is True and its target
            is not ``ignore_index``.
        ignore_index: target value whose tokens give 0 and receive exactly zero gradient, even when their
            hidden rows hold inf or NaN.
        max_scratch_bytes: bound on the logit scratch of one chunk; None = 256 MiB on CUDA (294 tokens at
            V = 151936 with bfloat16 inputs) and 64 MiB elsewhere. Larger chunks make the weight-gradient GEMM
            more efficient on a GPU (docs/design/logprobs.md); the chunk never exceeds the number of tokens.
        batch_invariant: make each token's log-prob and entropy bitwise independent of N, of the chunk size
            and of the other rows (fixed chunk shape and vocabulary reduction order), so that trainer and
            inference engine can agree bit for bit. Costs padding of the last chunk.
        check_inputs: run the checks that read device values (targets in range where they count, a non-bool
            mask holding only 0/1). With False the call never synchronises with the host (CUDA-graph capture,
            ``torch.compile`` without graph breaks); bad targets then give undefined results instead of an error.
        backend: "triton", "torch" or "reference"; default from ``RLLOSS_BACKEND`` or the
            device (``triton`` on CUDA, ``torch`` elsewhere). See docs/backends.md.
        process_group: a ``torch.distributed`` group over which the lm_head is sharded by vocabulary rows
            (tensor parallelism): ``weight`` (and ``bias``) hold this rank's contiguous rows, rank r's after
            those of ranks 0..r−1 (uneven shards allowed; the layout is all-gathered, one host sync), while
            ``hidden`` and the global ``targets`` are the same on every rank. Results are the unsharded ones on
            every rank; the gradient of ``hidden`` is summed over the group inside the op, that of the weight
            shard stays local. Not on the ``reference`` backend. See docs/distributed.md.

    Returns:
        :class:`TokenLogprobs` whose tensors have targets' shape, float32 (float64 for float64 inputs).
        Both are differentiable w.r.t. hidden, weight and bias for any upstream gradients. When no input
        requires a gradient (or under ``torch.no_grad()``) the call is forward-only: no autograd node is
        built and nothing is saved — the cheap path for teacher and old-policy log-probs.

    Raises:
        TypeError: non-tensor arguments, non-floating or mismatched dtypes, targets not int64, a complex mask.
        ValueError: wrong ranks or shapes (mask included), V = 0, targets out of range, a mask with values other
            than 0/1, tensors on different devices, temperature or softcap not finite and > 0,
            max_scratch_bytes ≤ 0, an unusable backend.

    Example:
        >>> h, W = torch.randn(2, 5, 16), torch.randn(100, 16)
        >>> y = torch.randint(0, 100, (2, 5))
        >>> out = token_logprobs(h, W, y, return_entropy=True)
        >>> out.logprobs.shape, out.entropy.shape
        (torch.Size([2, 5]), torch.Size([2, 5]))
    """
    _checks.boolean("check_inputs", check_inputs)
    inputs = check_linear_inputs(hidden, weight, targets, bias, temperature=temperature, softcap=softcap,
                                 ignore_index=ignore_index, backend=backend, max_scratch_bytes=max_scratch_bytes,
                                 batch_invariant=batch_invariant)
    options = inputs.options
    if mask is not None:
        inputs = inputs._replace(targets=masked_targets(mask, inputs.targets, options.ignore_index, check_inputs))
    targets = inputs.targets
    if check_inputs and process_group is None:  # a shard's range check needs the global V (distributed.py)
        _checks.targets_in_range(targets, inputs.weight.shape[0], options.ignore_index)
    if process_group is not None:
        from .distributed import vocab_parallel_logprobs

        logprobs, entropy = vocab_parallel_logprobs(*prepare_linear(inputs), options, process_group, check_inputs)
        logprobs, entropy = logprobs.view(targets.shape), entropy.view(targets.shape)
    else:
        logprobs, entropy = implementation(_LINEAR_IMPLEMENTATIONS, options.backend)(inputs)
    return TokenLogprobs(logprobs, entropy if return_entropy else None)


# token_logprobs per backend, one signature: checked inputs -> (logprobs, entropy) with targets' shape.


def _reference_linear(inputs: LinearInputs) -> Tuple[Tensor, Tensor]:
    options = inputs.options
    out = reference.token_logprobs(inputs.hidden, inputs.weight, inputs.targets, bias=inputs.bias,
                                   temperature=options.temperature, softcap=options.softcap,
                                   ignore_index=options.ignore_index)
    return tuple(x.to(compute_dtype(inputs.hidden.dtype)) for x in out)


def _chunked_linear(inputs: LinearInputs) -> Tuple[Tensor, Tensor]:
    """The chunked executor, its elementwise pass in torch or in the kernels (``options.backend``). Forward only
    when nothing needs a gradient (teacher or old-policy passes): no autograd node."""
    logprobs, entropy, *_ = _token_logprobs_op(*prepare_linear(inputs), *inputs.options)
    return logprobs.view(inputs.targets.shape), entropy.view(inputs.targets.shape)


_LINEAR_IMPLEMENTATIONS = dict(reference=_reference_linear, torch=_chunked_linear, kernel=_chunked_linear)


def logprobs_from_logits(
    logits: Tensor,
    targets: Tensor,
    *,
    temperature: float = 1.0,
    return_entropy: bool = False,
    mask: Optional[Tensor] = None,
    ignore_index: int = -100,
    inplace_backward: bool = False,
    max_scratch_bytes: Optional[int] = None,
    check_inputs: bool = True,
    backend: Optional[str] = None,
) -> TokenLogprobs:
    """Log-prob of each target and the entropy from logits a trainer already holds, in one streaming pass
    (no float32 copy of the logits on the kernels, no log-softmax tensor).

    ``logprobs = z_y − logsumexp(z)``, ``entropy = logsumexp(z) − Σ_v softmax(z)_v·z_v`` with z = logits/T
    (docs/math.md §1). −inf logits (a masked vocabulary) are exact: they get probability 0 and gradient 0.

    Args:
        logits: [..., V] float16, bfloat16 or float32 (float64 too on the ``torch``/``reference`` backends).
        targets: [...] int64 with logits' leading shape; values in [0, V) or ``ignore_index``.
        temperature: T > 0 dividing the logits.
        return_entropy: also return the entropy (otherwise ``entropy`` is None).
        mask: optional [...] bool (or 0/1) with targets' shape, True where a row is scored: rows outside it give
            0 and receive exactly zero gradient, as ``ignore_index`` rows do (combined as in
            :func:`token_logprobs`).
        ignore_index: target value whose rows give 0 and receive exactly zero gradient.
        inplace_backward: the backward writes d(loss)/d(logits) into the logits' own buffer instead of
            allocating another [..., V] tensor. The logits must then not be read after the backward (not by
            another loss either); ignored on the ``reference`` backend.
        max_scratch_bytes: bound on the float32 working copy of one chunk of rows on the ``torch`` backend.
        check_inputs: as for :func:`token_logprobs`.
        backend: as for :func:`token_logprobs`.

    Returns:
        :class:`TokenLogprobs` with targets' shape, float32 (float64 for float64 logits).

    Example:
        >>> logits = torch.randn(3, 7, 50, requires_grad=True)
        >>> y = torch.randint(0, 50, (3, 7))
        >>> logprobs_from_logits(logits, y).logprobs.sum().backward()
    """
    _checks.boolean("check_inputs", check_inputs)
    logits = _checks.tensor("logits", logits)
    if logits.ndim < 1:
        raise ValueError("logits must be [..., V], got a 0-D tensor")
    targets = _check_targets(targets, logits.shape[:-1], "logits")
    _checks.same_device(logits=logits, targets=targets)
    name = resolve_backend(backend, logits.device)
    _checks.dtype_in("logits", logits, accepted_dtypes(name))
    V = logits.shape[-1]
    if V == 0:
        raise ValueError("logits must have a vocabulary dimension of at least 1, got V = 0")
    options = check_options(temperature, None, ignore_index, name, max_scratch_bytes, False, logits.device)
    if mask is not None:
        targets = masked_targets(mask, targets, options.ignore_index, check_inputs)
    if check_inputs:
        _checks.targets_in_range(targets, V, options.ignore_index)

    logprobs, entropy = implementation(_LOGITS_IMPLEMENTATIONS, name)(logits, targets, options, bool(inplace_backward))
    return TokenLogprobs(logprobs, entropy if return_entropy else None)


# logprobs_from_logits per backend, one signature: checked logits [..., V], targets [...], options and
# inplace_backward -> (logprobs, entropy) with targets' shape.


def _reference_logits(logits: Tensor, targets: Tensor, options: LinearOptions,
                      inplace_backward: bool) -> Tuple[Tensor, Tensor]:
    out = reference.logprobs_from_logits(logits / options.temperature, targets, ignore_index=options.ignore_index)
    return tuple(x.to(compute_dtype(logits.dtype)) for x in out)


def _chunked_logits(logits: Tensor, targets: Tensor, options: LinearOptions,
                    inplace_backward: bool) -> Tuple[Tensor, Tensor]:
    # Without a gradient to form (no_grad, or logits that need none) apply builds no node and saves nothing.
    logprobs, entropy = _LogitsLogprobs.apply(_rows(logits, logits.shape[-1]), targets.reshape(-1), options,
                                              inplace_backward)
    return logprobs.view(targets.shape), entropy.view(targets.shape)


_LOGITS_IMPLEMENTATIONS = dict(reference=_reference_logits, torch=_chunked_logits, kernel=_chunked_logits)
