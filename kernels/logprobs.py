"""Triton kernels for token log-probs and entropy (docs/math.md §1): the bandwidth-light passes over a block of
logits. The heavy products (logits = h·Wᵀ, dh = dz·W, dW += dzᵀ·h) are vendor-BLAS GEMMs issued by
``rlloss.logprobs`` on a bounded chunk of tokens; these kernels are what runs between them.

Both kernels read raw logits x [N, V] (a GEMM's float32 output, or logits a trainer holds, any float dtype)
and apply the same transform on load: z = max(cap(x + b)/T, −1e30), cap(x) = c·tanh(x/c).

- ``_stats_kernel``: grid (token blocks, vocabulary splits); each program folds its tiles into the online
  statistics M, A, C, z_y of docs/math.md §1, shifted by the running max M (exact at large logits). Partial
  statistics of disjoint splits merge exactly (``rlloss.logprobs.merge_stats``).
- ``_dlogits_kernel``: dz_v = e_v·(a·s_v + b) + g·1[v = y] with s = z − M and e = e^s, then through the
  soft-cap. The per-row coefficients a, b, g (the log-prob and entropy gradients, 1/A and 1/T folded in) are
  formed once per row by ``rlloss.logprobs.dz_coefficients``. The output may alias the input when their
  dtypes agree (each element is read before it is written by the same program).

The logit floor (``LOGIT_FLOOR`` of rlloss.logprobs) keeps masked vocabularies (−inf logits) exact: e = 0 and
s·e = 0 there, never −inf·0. This module imports nothing from rlloss: it takes tensors and returns tensors.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

NUM_STATS = 4  # planes of the statistics tensor, in the order M, A, C, z_y


@triton.jit
def _tanh(x):
    # tanh from exp, exact at the extremes: exp overflow gives 1 − 0, underflow gives 1 − 2.
    return 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)


@triton.jit
def _load_logits(x_ptr, b_ptr, rows, cols, live, col_mask, stride_x, inv_temperature, softcap,
                 HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr):
    """(z, tanh(x/c)) of a [rows, cols] tile, float32; rows that are not live read as zeros."""
    x_tile = x_ptr + rows.to(tl.int64)[:, None] * stride_x + cols[None, :]
    x = tl.load(x_tile, mask=live[:, None] & col_mask[None, :], other=0.0).to(tl.float32)
    if HAS_BIAS:
        x += tl.load(b_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    t = x  # placeholder when there is no soft-cap; only read when HAS_SOFTCAP
    if HAS_SOFTCAP:
        t = _tanh(x / softcap)
        x = softcap * t
    return tl.maximum(x * inv_temperature, -1e30, propagate_nan=tl.PropagateNan.ALL), t


@triton.jit
def _stats_kernel(
    x_ptr, b_ptr, tgt_ptr, stats_ptr, N, V, stride_x, tiles_per_split, ignore_index,
    inv_temperature: tl.float32, softcap: tl.float32,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
):
    """Partial (M, A, C, z_y) of a block of tokens over one vocabulary split, into stats [4, splits, N]."""
    split = tl.program_id(1)
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    targets = tl.load(tgt_ptr + rows, mask=row_mask, other=ignore_index)
    live = row_mask & (targets != ignore_index)
    m = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
    a = tl.zeros((BLOCK_N,), dtype=tl.float32)
    c = tl.zeros((BLOCK_N,), dtype=tl.float32)
    zy = tl.zeros((BLOCK_N,), dtype=tl.float32)
    v_begin = split * tiles_per_split * BLOCK_V
    v_end = tl.minimum(V, v_begin + tiles_per_split * BLOCK_V)
    for v0 in range(v_begin, v_end, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        col_mask = cols < v_end
        z, _ = _load_logits(x_ptr, b_ptr, rows, cols, live, col_mask, stride_x, inv_temperature, softcap,
                            HAS_BIAS, HAS_SOFTCAP)
        valid = col_mask[None, :]
        m_new = tl.maximum(m, tl.max(tl.where(valid, z, float("-inf")), axis=1))
        shift = tl.where(valid, z - m_new[:, None], 0.0)
        e = tl.where(valid, tl.exp(shift), 0.0)
        # Rescale the old sums to the new max: C' = e^{M−M'}·(C + (M − M')·A). Before the first tile M − M'
        # is −inf and A is 0: the shift is zeroed there so no inf·0 arises.
        alpha = tl.exp(m - m_new)
        c = alpha * (c + tl.where(a > 0.0, m - m_new, 0.0) * a) + tl.sum(shift * e, axis=1)
        a = alpha * a + tl.sum(e, axis=1)
        zy += tl.sum(tl.where(cols[None, :] == targets[:, None], z, 0.0), axis=1)
        m = m_new
    base = stats_ptr + split.to(tl.int64) * N + rows
    plane = tl.num_programs(1).to(tl.int64) * N  # one [splits, N] plane per statistic
    tl.store(base + 0 * plane, m, mask=row_mask)
    tl.store(base + 1 * plane, a, mask=row_mask)
    tl.store(base + 2 * plane, c, mask=row_mask)
    tl.store(base + 3 * plane, zy, mask=row_mask)


@triton.jit
def _dlogits_kernel(
    x_ptr, b_ptr, tgt_ptr, shift_ptr, coef_a_ptr, coef_b_ptr, coef_g_ptr, dz_ptr,
    N, V, stride_x, stride_dz, ignore_index, inv_temperature: tl.float32, softcap: tl.float32,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
):
    """d(loss)/dx of one [BLOCK_N, BLOCK_V] tile: e^s·(a·s + b) + g·1[v = y], s = z − M, through the cap."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    row_mask = rows < N
    col_mask = cols < V
    targets = tl.load(tgt_ptr + rows, mask=row_mask, other=ignore_index)
    live = row_mask & (targets != ignore_index)
    m = tl.load(shift_ptr + rows, mask=live, other=0.0)
    coef_a = tl.load(coef_a_ptr + rows, mask=live, other=0.0)
    coef_b = tl.load(coef_b_ptr + rows, mask=live, other=0.0)
    coef_g = tl.load(coef_g_ptr + rows, mask=live, other=0.0)
    z, t = _load_logits(x_ptr, b_ptr, rows, cols, live, col_mask, stride_x, inv_temperature, softcap,
                        HAS_BIAS, HAS_SOFTCAP)
    s = z - m[:, None]
    dz = tl.exp(s) * (coef_a[:, None] * s + coef_b[:, None])
    dz += tl.where(cols[None, :] == targets[:, None], coef_g[:, None], 0.0)
    if HAS_SOFTCAP:
        dz = dz * (1.0 - t * t)
    dz = tl.where(live[:, None], dz, 0.0)
    dz_tile = dz_ptr + rows.to(tl.int64)[:, None] * stride_dz + cols[None, :]
    tl.store(dz_tile, dz.to(dz_ptr.dtype.element_ty), mask=row_mask[:, None] & col_mask[None, :])


# --- launch helpers -----------------------------------------------------------------------------------


def blocks(device: torch.device) -> dict:
    """Block shape of both kernels: few rows, a wide vocabulary tile (they stream; nothing is reused)."""
    if device.type != "cuda":
        return dict(BLOCK_N=16, BLOCK_V=512, num_warps=4)  # interpreter: fewer, larger steps
    return dict(BLOCK_N=4, BLOCK_V=1024, num_warps=8)


def vocab_splits(n_row_blocks: int, n_tiles: int, device: torch.device, fixed: bool,
                 splits: Optional[int] = None) -> tuple:
    """(splits, tiles_per_split): split the vocabulary when the token blocks alone cannot fill the device (two
    waves of its SMs, a nominal 4 programs under the interpreter).

    ``fixed`` (batch-invariant mode) makes the split depend on V alone, never on the number of tokens;
    ``splits`` overrides the automatic number.
    """
    if splits is None:
        target = 2 * torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
        splits = target if fixed else triton.cdiv(target, n_row_blocks)
    tiles_per_split = triton.cdiv(n_tiles, min(n_tiles, max(1, splits)))
    return triton.cdiv(n_tiles, tiles_per_split), tiles_per_split


def logits_stats(
    x: torch.Tensor,
    bias: Optional[torch.Tensor],
    targets: torch.Tensor,
    *,
    ignore_index: int,
    temperature: float,
    softcap: Optional[float],
    batch_invariant: bool = False,
    splits: Optional[int] = None,
) -> torch.Tensor:
    """Partial statistics [4, splits, N] float32 of z = cap(x + bias)/T, x [N, V] with unit stride on V.

    ``splits`` overrides the automatic number of vocabulary splits (tests of the exact merge).
    """
    N, V = x.shape
    cfg = blocks(x.device)
    n_row_blocks = triton.cdiv(N, cfg["BLOCK_N"])
    n_tiles = triton.cdiv(V, cfg["BLOCK_V"])
    splits, tiles_per_split = vocab_splits(n_row_blocks, n_tiles, x.device, batch_invariant, splits)
    stats = torch.empty((NUM_STATS, splits, N), dtype=torch.float32, device=x.device)
    _stats_kernel[(n_row_blocks, splits)](
        x, bias if bias is not None else x, targets, stats, N, V, x.stride(0), tiles_per_split, ignore_index,
        1.0 / temperature, softcap if softcap is not None else 1.0,
        HAS_BIAS=bias is not None, HAS_SOFTCAP=softcap is not None, **cfg,
    )
    return stats


def dlogits(
    x: torch.Tensor,
    bias: Optional[torch.Tensor],
    targets: torch.Tensor,
    shift: torch.Tensor,
    coef_a: torch.Tensor,
    coef_b: torch.Tensor,
    coef_g: torch.Tensor,
    *,
    ignore_index: int,
    temperature: float,
    softcap: Optional[float],
    out: torch.Tensor,
) -> torch.Tensor:
    """Write d(loss)/dx into ``out`` [N, V] (which may be ``x`` itself when the dtypes agree) and return it.

    shift is the per-row max M; coef_a, coef_b, coef_g the per-row coefficients (all float32 [N]).
    """
    N, V = x.shape
    cfg = blocks(x.device)
    grid = (triton.cdiv(N, cfg["BLOCK_N"]), triton.cdiv(V, cfg["BLOCK_V"]))
    _dlogits_kernel[grid](
        x, bias if bias is not None else x, targets, shift, coef_a, coef_b, coef_g, out,
        N, V, x.stride(0), out.stride(0), ignore_index, 1.0 / temperature,
        softcap if softcap is not None else 1.0,
        HAS_BIAS=bias is not None, HAS_SOFTCAP=softcap is not None, **cfg,
    )
    return out
