"""Triton kernels for token log-probs and entropy (MATH.md §1), from hidden states or from logits.

Forward: each program owns a block of tokens and a contiguous range of vocabulary tiles. It forms each
logit tile z = cap(h·Wᵀ + b)/T with tl.dot and folds it into per-token online statistics, shifted by the
running max M so they stay exact when logits are large:

    M = max_v z_v,   A = Σ_v e^{z_v − M},   C = Σ_v (z_v − M)·e^{z_v − M},   z_y (the target's logit)

Each (token block, vocab split) writes its partial (M, A, C, z_y); partials merge exactly (see
``rlloss.logprobs.merge_stats``), so the vocabulary can be split across programs when there are too few
token blocks to fill the GPU, and across tensor-parallel ranks later.

Backward: the logit tiles are recomputed, dz is formed in registers from the saved lse and Σp·z, and
dhidden and dweight are accumulated in float32 by two kernels that each own their output rows (tokens for
dhidden, vocabulary rows for dweight): no atomics, so results are bitwise reproducible. Neither kernel
ever holds more than a [BLOCK_N, BLOCK_V] tile of logits.

This module imports nothing from rlloss: it takes tensors and returns tensors.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

# Row order of the statistics tensor written by the forward kernels.
STAT_MAX, STAT_SUMEXP, STAT_SHIFTED_SUM, STAT_TARGET = 0, 1, 2, 3
NUM_STATS = 4

# Upper bound on the float32 scratch the backward allocates when a gradient's dtype is not float32
# (its rows are then accumulated slab by slab and cast once into the gradient).
GRAD_SCRATCH_BYTES = 64 << 20


@triton.jit
def _tanh(x):
    # tanh from exp, exact at the extremes: exp overflow gives 1 − 0, underflow gives 1 − 2.
    return 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)


@triton.jit
def _logits_tile(
    h_ptr, w_ptr, b_ptr, rows, cols, row_live, col_mask, D, stride_h, stride_w,
    inv_temperature, softcap,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """z = cap(h[rows]·W[cols]ᵀ + b[cols]) / T as a float32 [BLOCK_N, BLOCK_V] tile, and tanh(x/c).

    Rows that are not live are read as zeros, so whatever they hold (inf, NaN) never enters the math.
    """
    h_rows = h_ptr + rows.to(tl.int64)[:, None] * stride_h
    w_rows = w_ptr + cols.to(tl.int64)[:, None] * stride_w
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        d_mask = d < D
        h = tl.load(h_rows + d[None, :], mask=row_live[:, None] & d_mask[None, :], other=0.0)
        w = tl.load(w_rows + d[None, :], mask=col_mask[:, None] & d_mask[None, :], other=0.0)
        acc = tl.dot(h, tl.trans(w), acc, input_precision=DOT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    t = acc  # placeholder when there is no soft-cap; only read when HAS_SOFTCAP
    if HAS_SOFTCAP:
        t = _tanh(acc / softcap)
        acc = softcap * t
    return acc * inv_temperature, t


@triton.jit
def _online_update(m, a, c, zy, z, cols, col_mask, targets):
    """Fold one logit tile into the shifted online statistics (M, A, C, z_y) of its rows."""
    valid = col_mask[None, :]
    m_new = tl.maximum(m, tl.max(tl.where(valid, z, float("-inf")), axis=1))
    shift = tl.where(valid, z - m_new[:, None], 0.0)
    e = tl.where(valid, tl.exp(shift), 0.0)
    # Rescale the old sums to the new max: C' = e^{M−M'}·(C + (M − M')·A). Before the first tile M − M' is
    # −inf and A is 0: the shift is zeroed there so no inf·0 arises.
    alpha = tl.exp(m - m_new)
    c = alpha * (c + tl.where(a > 0.0, m - m_new, 0.0) * a) + tl.sum(shift * e, axis=1)
    a = alpha * a + tl.sum(e, axis=1)
    zy += tl.sum(tl.where(cols[None, :] == targets[:, None], z, 0.0), axis=1)
    return m_new, a, c, zy


@triton.jit
def _stats_program(tgt_ptr, split, N, V, tiles_per_split, ignore_index,
                   BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr):
    """A statistics program's tokens (rows, masks, targets), its empty statistics and its vocabulary range."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    targets = tl.load(tgt_ptr + rows, mask=row_mask, other=ignore_index)
    live = row_mask & (targets != ignore_index)
    m = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
    zero = tl.zeros((BLOCK_N,), dtype=tl.float32)
    v_begin = split * tiles_per_split * BLOCK_V
    v_end = tl.minimum(V, v_begin + tiles_per_split * BLOCK_V)
    return rows, row_mask, targets, live, m, zero, zero, zero, v_begin, v_end


@triton.jit
def _store_stats(stats_ptr, split, n_splits, N, rows, row_mask, m, a, c, zy):
    base = stats_ptr + split.to(tl.int64) * N + rows
    plane = n_splits.to(tl.int64) * N  # one [n_splits, N] plane per statistic
    tl.store(base + 0 * plane, m, mask=row_mask)
    tl.store(base + 1 * plane, a, mask=row_mask)
    tl.store(base + 2 * plane, c, mask=row_mask)
    tl.store(base + 3 * plane, zy, mask=row_mask)


@triton.jit
def _dlogits(
    z, t, cols, col_mask, targets, row_live, lse, mean_z, g_logp, g_ent, inv_temperature,
    HAS_LOGP_GRAD: tl.constexpr, HAS_ENTROPY_GRAD: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
):
    """d(loss)/d(pre-temperature, pre-cap logits) of a tile (MATH.md §1):

    dz_v = g_ℓ·(1[v=y] − p_v) − g_H·p_v·(z_v − Σ_u p_u z_u), then through /T and the soft-cap.
    """
    p = tl.exp(z - lse[:, None])
    dz = tl.zeros(z.shape, dtype=tl.float32)
    if HAS_LOGP_GRAD:
        onehot = tl.where(cols[None, :] == targets[:, None], 1.0, 0.0)
        dz += g_logp[:, None] * (onehot - p)
    if HAS_ENTROPY_GRAD:
        dz -= g_ent[:, None] * p * (z - mean_z[:, None])
    dx = tl.where(row_live[:, None] & col_mask[None, :], dz * inv_temperature, 0.0)
    if HAS_SOFTCAP:
        dx = dx * (1.0 - t * t)
    return dx


@triton.jit
def _load_row_state(tgt_ptr, lse_ptr, mean_ptr, glogp_ptr, gent_ptr, rows, row_mask, ignore_index,
                    HAS_LOGP_GRAD: tl.constexpr, HAS_ENTROPY_GRAD: tl.constexpr):
    """Targets, liveness, saved lse / Σp·z and upstream gradients of a block of tokens."""
    targets = tl.load(tgt_ptr + rows, mask=row_mask, other=ignore_index)
    live = row_mask & (targets != ignore_index)
    lse = tl.load(lse_ptr + rows, mask=live, other=0.0)
    mean_z = tl.load(mean_ptr + rows, mask=live, other=0.0)
    g_logp = lse  # placeholders, only read when the matching flag is set
    g_ent = lse
    if HAS_LOGP_GRAD:
        g_logp = tl.load(glogp_ptr + rows, mask=live, other=0.0)
    if HAS_ENTROPY_GRAD:
        g_ent = tl.load(gent_ptr + rows, mask=live, other=0.0)
    return targets, live, lse, mean_z, g_logp, g_ent


# --- from hidden states -------------------------------------------------------------------------------


@triton.jit
def _linear_stats_kernel(
    h_ptr, w_ptr, b_ptr, tgt_ptr, stats_ptr,
    N, V, D, stride_h, stride_w, tiles_per_split, ignore_index, inv_temperature, softcap,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    split = tl.program_id(1)
    rows, row_mask, targets, live, m, a, c, zy, v_begin, v_end = _stats_program(
        tgt_ptr, split, N, V, tiles_per_split, ignore_index, BLOCK_N, BLOCK_V
    )
    for v0 in range(v_begin, v_end, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        col_mask = cols < v_end
        z, _ = _logits_tile(
            h_ptr, w_ptr, b_ptr, rows, cols, live, col_mask, D, stride_h, stride_w,
            inv_temperature, softcap, HAS_BIAS, HAS_SOFTCAP, BLOCK_N, BLOCK_V, BLOCK_D, DOT_PRECISION,
        )
        m, a, c, zy = _online_update(m, a, c, zy, z, cols, col_mask, targets)
    _store_stats(stats_ptr, split, tl.num_programs(1), N, rows, row_mask, m, a, c, zy)


@triton.jit
def _linear_grad_hidden_kernel(
    h_ptr, w_ptr, b_ptr, tgt_ptr, lse_ptr, mean_ptr, glogp_ptr, gent_ptr, dh_ptr,
    row_begin, row_end, V, D, stride_h, stride_w, ignore_index, inv_temperature, softcap,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    HAS_LOGP_GRAD: tl.constexpr, HAS_ENTROPY_GRAD: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """dh[rows] = Σ_tiles dx_tile · W_tile, accumulated in the float32 rows of dh_ptr this program owns.

    dh_ptr is a contiguous [row_end − row_begin, D] float32 buffer whose row 0 is token row_begin.
    """
    rows = row_begin + tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < row_end
    targets, live, lse, mean_z, g_logp, g_ent = _load_row_state(
        tgt_ptr, lse_ptr, mean_ptr, glogp_ptr, gent_ptr, rows, row_mask, ignore_index,
        HAS_LOGP_GRAD, HAS_ENTROPY_GRAD,
    )
    dh_rows = dh_ptr + (rows - row_begin).to(tl.int64)[:, None] * D
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        col_mask = cols < V
        z, t = _logits_tile(
            h_ptr, w_ptr, b_ptr, rows, cols, live, col_mask, D, stride_h, stride_w,
            inv_temperature, softcap, HAS_BIAS, HAS_SOFTCAP, BLOCK_N, BLOCK_V, BLOCK_D, DOT_PRECISION,
        )
        dx = _dlogits(z, t, cols, col_mask, targets, live, lse, mean_z, g_logp, g_ent, inv_temperature,
                      HAS_LOGP_GRAD, HAS_ENTROPY_GRAD, HAS_SOFTCAP)
        dx = dx.to(w_ptr.dtype.element_ty)
        w_rows = w_ptr + cols.to(tl.int64)[:, None] * stride_w
        for d0 in range(0, D, BLOCK_D):
            d = d0 + tl.arange(0, BLOCK_D)
            d_mask = d < D
            w = tl.load(w_rows + d[None, :], mask=col_mask[:, None] & d_mask[None, :], other=0.0)
            out_mask = row_mask[:, None] & d_mask[None, :]
            acc = tl.load(dh_rows + d[None, :], mask=out_mask, other=0.0)
            acc = tl.dot(dx, w, acc, input_precision=DOT_PRECISION)
            tl.store(dh_rows + d[None, :], acc, mask=out_mask)


@triton.jit
def _linear_grad_weight_kernel(
    h_ptr, w_ptr, b_ptr, tgt_ptr, lse_ptr, mean_ptr, glogp_ptr, gent_ptr, dw_ptr, db_ptr,
    col_begin, col_end, N, D, stride_h, stride_w, ignore_index, inv_temperature, softcap,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    HAS_LOGP_GRAD: tl.constexpr, HAS_ENTROPY_GRAD: tl.constexpr,
    COMPUTE_DW: tl.constexpr, COMPUTE_DB: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """dW[cols] = Σ_token blocks dx_tileᵀ · h_block (and db[cols] = Σ dx) for the vocabulary rows it owns.

    dw_ptr is a contiguous [col_end − col_begin, D] float32 buffer whose row 0 is vocabulary row col_begin;
    db_ptr a float32 [V] buffer.
    """
    cols = col_begin + tl.program_id(0) * BLOCK_V + tl.arange(0, BLOCK_V)
    col_mask = cols < col_end
    dw_rows = dw_ptr + (cols - col_begin).to(tl.int64)[:, None] * D
    db = tl.zeros((BLOCK_V,), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        rows = n0 + tl.arange(0, BLOCK_N)
        row_mask = rows < N
        targets, live, lse, mean_z, g_logp, g_ent = _load_row_state(
            tgt_ptr, lse_ptr, mean_ptr, glogp_ptr, gent_ptr, rows, row_mask, ignore_index,
            HAS_LOGP_GRAD, HAS_ENTROPY_GRAD,
        )
        z, t = _logits_tile(
            h_ptr, w_ptr, b_ptr, rows, cols, live, col_mask, D, stride_h, stride_w,
            inv_temperature, softcap, HAS_BIAS, HAS_SOFTCAP, BLOCK_N, BLOCK_V, BLOCK_D, DOT_PRECISION,
        )
        dx = _dlogits(z, t, cols, col_mask, targets, live, lse, mean_z, g_logp, g_ent, inv_temperature,
                      HAS_LOGP_GRAD, HAS_ENTROPY_GRAD, HAS_SOFTCAP)
        if COMPUTE_DB:
            db += tl.sum(dx, axis=0)
        if COMPUTE_DW:
            dx_t = tl.trans(dx.to(h_ptr.dtype.element_ty))
            h_rows = h_ptr + rows.to(tl.int64)[:, None] * stride_h
            for d0 in range(0, D, BLOCK_D):
                d = d0 + tl.arange(0, BLOCK_D)
                d_mask = d < D
                h = tl.load(h_rows + d[None, :], mask=live[:, None] & d_mask[None, :], other=0.0)
                out_mask = col_mask[:, None] & d_mask[None, :]
                acc = tl.load(dw_rows + d[None, :], mask=out_mask, other=0.0)
                acc = tl.dot(dx_t, h, acc, input_precision=DOT_PRECISION)
                tl.store(dw_rows + d[None, :], acc, mask=out_mask)
    if COMPUTE_DB:
        tl.store(db_ptr + cols, db, mask=col_mask)


# --- from logits --------------------------------------------------------------------------------------


@triton.jit
def _logits_stats_kernel(
    z_ptr, tgt_ptr, stats_ptr, N, V, stride_z, tiles_per_split, ignore_index, inv_temperature,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
):
    split = tl.program_id(1)
    rows, row_mask, targets, live, m, a, c, zy, v_begin, v_end = _stats_program(
        tgt_ptr, split, N, V, tiles_per_split, ignore_index, BLOCK_N, BLOCK_V
    )
    z_rows = z_ptr + rows.to(tl.int64)[:, None] * stride_z
    for v0 in range(v_begin, v_end, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        col_mask = cols < v_end
        z = tl.load(z_rows + cols[None, :], mask=live[:, None] & col_mask[None, :], other=0.0)
        z = z.to(tl.float32) * inv_temperature
        m, a, c, zy = _online_update(m, a, c, zy, z, cols, col_mask, targets)
    _store_stats(stats_ptr, split, tl.num_programs(1), N, rows, row_mask, m, a, c, zy)


@triton.jit
def _logits_grad_kernel(
    z_ptr, tgt_ptr, lse_ptr, mean_ptr, glogp_ptr, gent_ptr, dz_ptr,
    N, V, stride_z, stride_dz, ignore_index, inv_temperature,
    HAS_LOGP_GRAD: tl.constexpr, HAS_ENTROPY_GRAD: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
):
    """d(loss)/d(logits) of one tile; dz_ptr may alias z_ptr (each element is read before it is written)."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    row_mask = rows < N
    col_mask = cols < V
    targets, live, lse, mean_z, g_logp, g_ent = _load_row_state(
        tgt_ptr, lse_ptr, mean_ptr, glogp_ptr, gent_ptr, rows, row_mask, ignore_index,
        HAS_LOGP_GRAD, HAS_ENTROPY_GRAD,
    )
    z_tile = z_ptr + rows.to(tl.int64)[:, None] * stride_z + cols[None, :]
    z = tl.load(z_tile, mask=live[:, None] & col_mask[None, :], other=0.0).to(tl.float32) * inv_temperature
    dz = _dlogits(z, z, cols, col_mask, targets, live, lse, mean_z, g_logp, g_ent, inv_temperature,
                  HAS_LOGP_GRAD, HAS_ENTROPY_GRAD, False)
    dz_tile = dz_ptr + rows.to(tl.int64)[:, None] * stride_dz + cols[None, :]
    tl.store(dz_tile, dz.to(dz_ptr.dtype.element_ty), mask=row_mask[:, None] & col_mask[None, :])


# --- launch helpers -----------------------------------------------------------------------------------


def _num_programs_target(device: torch.device) -> int:
    """Programs that fill the device: two waves of its SMs (a nominal 4 under the interpreter)."""
    if device.type == "cuda":
        return 2 * torch.cuda.get_device_properties(device).multi_processor_count
    return 4


# Block shapes per kernel. The backward kernels read-modify-write a float32 accumulator slice of D once per
# inner tile, so their arithmetic intensity is about (inner block)/2 FLOP per byte: the dimension they loop
# over (vocabulary for dhidden, tokens for dweight) gets the wide block. Untuned on hardware yet; see
# docs/design/logprobs.md.
_GPU_BLOCKS_16BIT = {
    "stats": dict(BLOCK_N=128, BLOCK_V=128, BLOCK_D=64, num_warps=8, num_stages=3),
    "grad_hidden": dict(BLOCK_N=64, BLOCK_V=256, BLOCK_D=64, num_warps=8, num_stages=2),
    "grad_weight": dict(BLOCK_N=256, BLOCK_V=64, BLOCK_D=64, num_warps=8, num_stages=2),
}
_GPU_BLOCKS_FP32 = {
    "stats": dict(BLOCK_N=64, BLOCK_V=64, BLOCK_D=32, num_warps=4, num_stages=2),
    "grad_hidden": dict(BLOCK_N=32, BLOCK_V=128, BLOCK_D=32, num_warps=4, num_stages=2),
    "grad_weight": dict(BLOCK_N=128, BLOCK_V=32, BLOCK_D=32, num_warps=4, num_stages=2),
}
# Under the interpreter each block step is a Python-level numpy call: large blocks mean fewer steps.
_INTERPRETER_BLOCKS = {
    "stats": dict(BLOCK_N=32, BLOCK_V=128, BLOCK_D=64),
    "grad_hidden": dict(BLOCK_N=32, BLOCK_V=128, BLOCK_D=64),
    "grad_weight": dict(BLOCK_N=32, BLOCK_V=128, BLOCK_D=64),
}


def _linear_blocks(kernel: str, dtype: torch.dtype, device: torch.device) -> dict:
    if device.type != "cuda":
        return _INTERPRETER_BLOCKS[kernel]
    return (_GPU_BLOCKS_FP32 if dtype == torch.float32 else _GPU_BLOCKS_16BIT)[kernel]


def _dot_precision(dtype: torch.dtype) -> str:
    # float32 inputs get exact float32 products; TF32 would cost ~1e-3 relative in the logits.
    return "ieee" if dtype == torch.float32 else "tf32"


def _vocab_split(n_row_blocks: int, n_tiles: int, device: torch.device) -> tuple:
    """(splits, tiles_per_split): split the vocabulary when the token blocks alone cannot fill the device."""
    splits = min(n_tiles, max(1, triton.cdiv(_num_programs_target(device), n_row_blocks)))
    tiles_per_split = triton.cdiv(n_tiles, splits)
    return triton.cdiv(n_tiles, tiles_per_split), tiles_per_split


def linear_stats(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    targets: torch.Tensor,
    *,
    ignore_index: int,
    temperature: float,
    softcap: Optional[float],
    vocab_splits: Optional[int] = None,
) -> torch.Tensor:
    """Partial statistics [4, splits, N] float32 of logits = cap(hidden·weightᵀ + bias)/T.

    hidden [N, D] (unit stride on D), weight [V, D] (unit stride on D), bias [V] or None, targets [N] int64.
    Planes are (M, A, C, z_y) in the order STAT_*; ``vocab_splits`` overrides the automatic split count.
    """
    N, D = hidden.shape
    V = weight.shape[0]
    cfg = _linear_blocks("stats", hidden.dtype, hidden.device)
    n_row_blocks = triton.cdiv(N, cfg["BLOCK_N"])
    n_tiles = triton.cdiv(V, cfg["BLOCK_V"])
    if vocab_splits is None:
        splits, tiles_per_split = _vocab_split(n_row_blocks, n_tiles, hidden.device)
    else:
        tiles_per_split = triton.cdiv(n_tiles, max(1, min(vocab_splits, n_tiles)))
        splits = triton.cdiv(n_tiles, tiles_per_split)
    stats = torch.empty((NUM_STATS, splits, N), dtype=torch.float32, device=hidden.device)
    _linear_stats_kernel[(n_row_blocks, splits)](
        hidden, weight, bias if bias is not None else hidden, targets, stats,
        N, V, D, hidden.stride(0), weight.stride(0), tiles_per_split, ignore_index,
        1.0 / temperature, softcap if softcap is not None else 1.0,
        HAS_BIAS=bias is not None, HAS_SOFTCAP=softcap is not None,
        DOT_PRECISION=_dot_precision(hidden.dtype), **cfg,
    )
    return stats


def _slabs(total: int, row_bytes: int, block_rows: int, device: torch.device):
    """Row ranges [begin, end) whose float32 scratch fits GRAD_SCRATCH_BYTES, but never fewer rows than one
    wave of programs (a slab that leaves SMs idle costs more time than its scratch saves memory)."""
    min_rows = block_rows * max(1, _num_programs_target(device) // 2)
    step = max(min_rows, (GRAD_SCRATCH_BYTES // row_bytes) // block_rows * block_rows)
    return [(b, min(total, b + step)) for b in range(0, total, step)]


def _accumulate_rows(out: torch.Tensor, block_rows: int, launch) -> None:
    """Run ``launch(begin, end, buffer)`` over row slabs of ``out`` with a float32 accumulator.

    A float32 contiguous ``out`` is accumulated in place; otherwise each slab is accumulated in a bounded
    float32 scratch (see _slabs) and cast once into ``out``.
    """
    total, width = out.shape
    if out.dtype == torch.float32 and out.is_contiguous():
        out.zero_()
        launch(0, total, out)
        return
    slabs = _slabs(total, 4 * width, block_rows, out.device)
    scratch = torch.empty((slabs[0][1] - slabs[0][0], width), dtype=torch.float32, device=out.device)
    for begin, end in slabs:
        buf = scratch[: end - begin]
        buf.zero_()
        launch(begin, end, buf)
        out[begin:end].copy_(buf)


def linear_backward(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    targets: torch.Tensor,
    lse: torch.Tensor,
    mean_logit: torch.Tensor,
    grad_logprobs: Optional[torch.Tensor],
    grad_entropy: Optional[torch.Tensor],
    *,
    ignore_index: int,
    temperature: float,
    softcap: Optional[float],
    need_hidden: bool,
    need_weight: bool,
    need_bias: bool,
):
    """(dhidden, dweight, dbias) for upstream gradients of the log-probs and/or the entropy (None = zero).

    lse and mean_logit (Σ_v p_v z_v) are the forward's per-token float32 results. dhidden and dweight come
    in the dtypes of hidden and weight, dbias in float32; each is None when not needed.
    """
    N, D = hidden.shape
    V = weight.shape[0]
    dummy = lse
    common = dict(
        ignore_index=ignore_index,
        inv_temperature=1.0 / temperature,
        softcap=softcap if softcap is not None else 1.0,
        HAS_BIAS=bias is not None,
        HAS_SOFTCAP=softcap is not None,
        HAS_LOGP_GRAD=grad_logprobs is not None,
        HAS_ENTROPY_GRAD=grad_entropy is not None,
        DOT_PRECISION=_dot_precision(hidden.dtype),
    )
    args = (
        hidden, weight, bias if bias is not None else dummy, targets, lse, mean_logit,
        grad_logprobs if grad_logprobs is not None else dummy,
        grad_entropy if grad_entropy is not None else dummy,
    )
    grad_hidden = grad_weight = grad_bias = None
    if need_hidden:
        grad_hidden = torch.empty_like(hidden)
        cfg_dh = _linear_blocks("grad_hidden", hidden.dtype, hidden.device)

        def launch_dh(begin, end, buf):
            grid = (triton.cdiv(end - begin, cfg_dh["BLOCK_N"]),)
            _linear_grad_hidden_kernel[grid](
                *args, buf, begin, end, V, D, hidden.stride(0), weight.stride(0), **common, **cfg_dh
            )

        _accumulate_rows(grad_hidden, cfg_dh["BLOCK_N"], launch_dh)
    if need_weight or need_bias:
        grad_weight = torch.empty_like(weight) if need_weight else None
        grad_bias = torch.empty((V,), dtype=torch.float32, device=hidden.device) if need_bias else dummy
        cfg_dw = _linear_blocks("grad_weight", hidden.dtype, hidden.device)

        def launch_dw(begin, end, buf):
            grid = (triton.cdiv(end - begin, cfg_dw["BLOCK_V"]),)
            _linear_grad_weight_kernel[grid](
                *args, buf, grad_bias, begin, end, N, D, hidden.stride(0), weight.stride(0),
                COMPUTE_DW=need_weight, COMPUTE_DB=need_bias, **common, **cfg_dw,
            )

        if need_weight:
            _accumulate_rows(grad_weight, cfg_dw["BLOCK_V"], launch_dw)
        else:  # bias only: one pass over every vocabulary row, nothing to accumulate into
            launch_dw(0, V, dummy)
        if not need_bias:
            grad_bias = None
    return grad_hidden, grad_weight, grad_bias


def _logits_blocks(device: torch.device) -> dict:
    if device.type != "cuda":
        return dict(BLOCK_N=16, BLOCK_V=512, num_warps=4)
    return dict(BLOCK_N=4, BLOCK_V=1024, num_warps=8)


def logits_stats(
    logits: torch.Tensor, targets: torch.Tensor, *, ignore_index: int, temperature: float
) -> torch.Tensor:
    """Partial statistics [4, splits, N] float32 of logits/T, logits [N, V] with unit stride on V."""
    N, V = logits.shape
    cfg = _logits_blocks(logits.device)
    n_row_blocks = triton.cdiv(N, cfg["BLOCK_N"])
    splits, tiles_per_split = _vocab_split(n_row_blocks, triton.cdiv(V, cfg["BLOCK_V"]), logits.device)
    stats = torch.empty((NUM_STATS, splits, N), dtype=torch.float32, device=logits.device)
    _logits_stats_kernel[(n_row_blocks, splits)](
        logits, targets, stats, N, V, logits.stride(0), tiles_per_split, ignore_index, 1.0 / temperature,
        **cfg,
    )
    return stats


def logits_backward(
    logits: torch.Tensor,
    targets: torch.Tensor,
    lse: torch.Tensor,
    mean_logit: torch.Tensor,
    grad_logprobs: Optional[torch.Tensor],
    grad_entropy: Optional[torch.Tensor],
    *,
    ignore_index: int,
    temperature: float,
    out: torch.Tensor,
) -> torch.Tensor:
    """Write d(loss)/d(logits) into ``out`` [N, V] (which may be ``logits`` itself) and return it."""
    N, V = logits.shape
    cfg = _logits_blocks(logits.device)
    grid = (triton.cdiv(N, cfg["BLOCK_N"]), triton.cdiv(V, cfg["BLOCK_V"]))
    _logits_grad_kernel[grid](
        logits, targets, lse, mean_logit,
        grad_logprobs if grad_logprobs is not None else lse,
        grad_entropy if grad_entropy is not None else lse,
        out, N, V, logits.stride(0), out.stride(0), ignore_index, 1.0 / temperature,
        HAS_LOGP_GRAD=grad_logprobs is not None, HAS_ENTROPY_GRAD=grad_entropy is not None, **cfg,
    )
    return out
