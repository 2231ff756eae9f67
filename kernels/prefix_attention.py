"""Triton kernels for shared-prefix attention (docs/math.md §8): flash attention over a forest of segments.

A query of segment s sees every key of s's ancestor segments and the keys of s up to its own position. The
layout arrives as the int32 tables of ``SharedPrefixLayout.kernel_tables(blocks)``, those of every block size
an autotuned kernel may tile with, in one set: each kernel finds its own BLOCK's through ``block_first``.

Forward, one program per (query block, q head): online softmax in float32 in the log2 domain; writes O and
lse [Hq, T] (natural log, float32). Backward: delta = rowsum(dO · O); dK/dV, one program per (key block, kv
head) over the queries of its own segment and of every descendant, for each q head of its group, so every
output row has one writer; dQ from its own pass like the forward (deterministic, flash-attention 2's split)
or, with ``deterministic=False``, added into a float32 buffer with atomics inside the dK/dV pass. Programs
run heaviest first: the grid is 1-D over (block order × heads), heads fastest. The loop structure:
docs/api/shared_prefix_attention.md, "Kernel design"; the autotuned candidates, where the softmax scale
enters and the two dQ paths: docs/design/prefix_attention.md.

This module imports nothing from rlloss: it takes tensors (and a ``tables(blocks)`` callable) and returns
tensors.
"""
from __future__ import annotations

import os
from typing import Callable, Sequence, Tuple

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634
_LN2 = tl.constexpr(0.6931471805599453)
_LOG2E = tl.constexpr(LOG2E)

# How a run of key tiles (forward, dQ) or query tiles (dK/dV) is masked.
_FULL = tl.constexpr(0)     # every tile whole: no mask at all
_BOUNDS = tl.constexpr(1)   # the range's end cuts the last tile
_CAUSAL = tl.constexpr(2)   # diagonal tiles of a segment: key ≤ query, and the range's end

Tables = Callable[[Sequence[int]], dict]


@triton.jit
def _load_tile(base, rows, stride_t, live, offs_d, HEAD_DIM: tl.constexpr, ROW_MASK: tl.constexpr,
               PAD_D: tl.constexpr, TRANSPOSED: tl.constexpr = False):
    """[len(rows), BLOCK_D] tile of one head, or its transpose [BLOCK_D, len(rows)] read straight from memory;
    rows that are not live and padded head-dim lanes read 0."""
    if TRANSPOSED:
        ptrs = base + rows.to(tl.int64)[None, :] * stride_t + offs_d[:, None]
        row_mask, d_mask = live[None, :], (offs_d < HEAD_DIM)[:, None]
    else:
        ptrs = base + rows.to(tl.int64)[:, None] * stride_t + offs_d[None, :]
        row_mask, d_mask = live[:, None], (offs_d < HEAD_DIM)[None, :]
    if ROW_MASK and PAD_D:
        tile = tl.load(ptrs, mask=row_mask & d_mask, other=0.0)
    elif ROW_MASK:
        tile = tl.load(ptrs, mask=row_mask, other=0.0)
    elif PAD_D:
        tile = tl.load(ptrs, mask=d_mask, other=0.0)
    else:
        tile = tl.load(ptrs)
    return tile


@triton.jit
def _block_of_program(order_ptr, block_first_ptr, block_segment_ptr, block_start_ptr, seg_start_ptr,
                      seg_len_ptr, NUM_HEADS, BLOCK: tl.constexpr):
    """(block's segment, block's first token, segment start, segment end, head) of this program, among the
    BLOCK-token blocks of the tables; the head is int64, so head × (head stride) and head × T cannot
    overflow."""
    pid = tl.program_id(0)
    block = tl.load(order_ptr + tl.load(block_first_ptr + BLOCK) + pid // NUM_HEADS)
    head = pid % NUM_HEADS
    seg = tl.load(block_segment_ptr + block)
    first = tl.load(block_start_ptr + block)
    seg_start = tl.load(seg_start_ptr + seg)
    return seg, first, seg_start, seg_start + tl.load(seg_len_ptr + seg), head.to(tl.int64)


# --- forward ------------------------------------------------------------------------------------------


@triton.jit
def _fwd_keys(acc, l_i, m_i, q, k_head, v_head, stride_kt, stride_vt, rows, lo, hi, qk_scale, offs_d,
              MODE: tl.constexpr, HEAD_DIM: tl.constexpr, PAD_D: tl.constexpr, BLOCK_N: tl.constexpr,
              DOT_PRECISION: tl.constexpr):
    """Fold keys [lo, hi) into the running softmax state of the block's queries.

    With raw scores s_j = q·k_j, c = scale·log2 e (``qk_scale``) and m the running row max in log2 units:
        m' = max(m, c·max_j s_j),   l' = 2^{m−m'}·l + Σ_j 2^{c·s_j−m'},
        acc' = 2^{m−m'}·acc + Σ_j 2^{c·s_j−m'}·v_j
    so each score meets the scale once, in the multiply-add of its exp2 argument. Every row meets a live key
    in its first tile (an ancestor's first key, or its segment's first key), so m is finite after it and
    masked scores (−inf) give exactly 0.
    """
    offs_n = tl.arange(0, BLOCK_N)
    for n0 in range(lo, hi, BLOCK_N):
        cols = n0 + offs_n
        live = cols < hi
        k_t = _load_tile(k_head, cols, stride_kt, live, offs_d, HEAD_DIM, MODE != _FULL, PAD_D, True)
        s = tl.dot(q, k_t, input_precision=DOT_PRECISION)
        if MODE == _CAUSAL:
            s = tl.where(live[None, :] & (cols[None, :] <= rows[:, None]), s, float("-inf"))
        elif MODE == _BOUNDS:
            s = tl.where(live[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
        p = tl.math.exp2(s * qk_scale - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _load_tile(v_head, cols, stride_vt, live, offs_d, HEAD_DIM, MODE != _FULL, PAD_D)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _fwd_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr,
    order_ptr, block_first_ptr, block_segment_ptr, block_start_ptr, seg_start_ptr, seg_len_ptr, anc_ptr_ptr,
    anc_ptr, T, NUM_Q_HEADS, GROUP, qk_scale: tl.float32, seg_len_key, tokens_key,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, PAD_D: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    seg, first, seg_start, seg_end, head = _block_of_program(
        order_ptr, block_first_ptr, block_segment_ptr, block_start_ptr, seg_start_ptr, seg_len_ptr, NUM_Q_HEADS,
        BLOCK_M)
    kv_head = head // GROUP
    rows = first + tl.arange(0, BLOCK_M)
    row_live = rows < seg_end
    offs_d = tl.arange(0, BLOCK_D)
    q = _load_tile(q_ptr + head * stride_qh, rows, stride_qt, row_live, offs_d, HEAD_DIM, True, PAD_D)
    k_head = k_ptr + kv_head * stride_kh
    v_head = v_ptr + kv_head * stride_vh

    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    # Every key of every ancestor segment: whole tiles, then the cut last tile.
    for i in range(tl.load(anc_ptr_ptr + seg), tl.load(anc_ptr_ptr + seg + 1)):
        a = tl.load(anc_ptr + i)
        a_start = tl.load(seg_start_ptr + a)
        a_end = a_start + tl.load(seg_len_ptr + a)
        a_whole = a_start + (a_end - a_start) // BLOCK_N * BLOCK_N
        acc, l_i, m_i = _fwd_keys(acc, l_i, m_i, q, k_head, v_head, stride_kt, stride_vt, rows, a_start,
                                  a_whole, qk_scale, offs_d, _FULL, HEAD_DIM, PAD_D, BLOCK_N, DOT_PRECISION)
        acc, l_i, m_i = _fwd_keys(acc, l_i, m_i, q, k_head, v_head, stride_kt, stride_vt, rows, a_whole,
                                  a_end, qk_scale, offs_d, _BOUNDS, HEAD_DIM, PAD_D, BLOCK_N, DOT_PRECISION)
    # The own segment: keys before the block are all visible (BLOCK_M is a multiple of BLOCK_N, so they
    # are whole tiles); the diagonal tiles up to the block's last query take the causal mask.
    acc, l_i, m_i = _fwd_keys(acc, l_i, m_i, q, k_head, v_head, stride_kt, stride_vt, rows, seg_start,
                              first, qk_scale, offs_d, _FULL, HEAD_DIM, PAD_D, BLOCK_N, DOT_PRECISION)
    acc, l_i, m_i = _fwd_keys(acc, l_i, m_i, q, k_head, v_head, stride_kt, stride_vt, rows, first,
                              tl.minimum(first + BLOCK_M, seg_end), qk_scale, offs_d, _CAUSAL, HEAD_DIM,
                              PAD_D, BLOCK_N, DOT_PRECISION)

    out = acc / l_i[:, None]
    o_ptrs = o_ptr + head * stride_oh + rows.to(tl.int64)[:, None] * stride_ot + offs_d[None, :]
    tl.store(o_ptrs, out.to(o_ptr.dtype.element_ty), mask=row_live[:, None] & (offs_d < HEAD_DIM)[None, :])
    lse = (m_i + tl.math.log2(l_i)) * _LN2
    tl.store(lse_ptr + head * T + rows, lse, mask=row_live)


# --- backward -----------------------------------------------------------------------------------------


@triton.jit
def _delta_kernel(
    o_ptr, do_ptr, delta_ptr, T, stride_ot, stride_oh, stride_dot, stride_doh,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """delta[h, t] = Σ_d dO[t, h, d]·O[t, h, d] (float32), the softmax backward's row term."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    head = tl.program_id(1).to(tl.int64)
    live = rows < T
    offs_d = tl.arange(0, BLOCK_D)
    o = _load_tile(o_ptr + head * stride_oh, rows, stride_ot, live, offs_d, HEAD_DIM, True, True)
    do = _load_tile(do_ptr + head * stride_doh, rows, stride_dot, live, offs_d, HEAD_DIM, True, True)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(delta_ptr + head * T + rows, delta, mask=live)


@triton.jit
def _dq_keys(dq, q, do, lse2, delta, k_head, v_head, stride_kt, stride_vt, rows, lo, hi, qk_scale, offs_d,
             MODE: tl.constexpr, HEAD_DIM: tl.constexpr, PAD_D: tl.constexpr, BLOCK_N: tl.constexpr,
             DOT_PRECISION: tl.constexpr):
    """dQ += dS·K over keys [lo, hi), with P = 2^{s − lse·log2 e} recomputed and dS = P ∘ (dO·Vᵀ − delta)
    (the softmax scale is applied once, at the end)."""
    offs_n = tl.arange(0, BLOCK_N)
    for n0 in range(lo, hi, BLOCK_N):
        cols = n0 + offs_n
        live = cols < hi
        k_t = _load_tile(k_head, cols, stride_kt, live, offs_d, HEAD_DIM, MODE != _FULL, PAD_D, True)
        v_t = _load_tile(v_head, cols, stride_vt, live, offs_d, HEAD_DIM, MODE != _FULL, PAD_D, True)
        s = tl.dot(q, k_t, input_precision=DOT_PRECISION) * qk_scale
        p = tl.math.exp2(s - lse2[:, None])
        if MODE == _CAUSAL:
            p = tl.where(live[None, :] & (cols[None, :] <= rows[:, None]), p, 0.0)
        elif MODE == _BOUNDS:
            p = tl.where(live[None, :], p, 0.0)
        dp = tl.dot(do, v_t, input_precision=DOT_PRECISION)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k_t.dtype), tl.trans(k_t), dq, input_precision=DOT_PRECISION)
    return dq


@triton.jit
def _dq_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr,
    order_ptr, block_first_ptr, block_segment_ptr, block_start_ptr, seg_start_ptr, seg_len_ptr, anc_ptr_ptr,
    anc_ptr, T, NUM_Q_HEADS, GROUP, scale: tl.float32, qk_scale: tl.float32, seg_len_key, tokens_key,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
    stride_dqt, stride_dqh,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, PAD_D: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    seg, first, seg_start, seg_end, head = _block_of_program(
        order_ptr, block_first_ptr, block_segment_ptr, block_start_ptr, seg_start_ptr, seg_len_ptr, NUM_Q_HEADS,
        BLOCK_M)
    kv_head = head // GROUP
    rows = first + tl.arange(0, BLOCK_M)
    row_live = rows < seg_end
    offs_d = tl.arange(0, BLOCK_D)
    q = _load_tile(q_ptr + head * stride_qh, rows, stride_qt, row_live, offs_d, HEAD_DIM, True, PAD_D)
    do = _load_tile(do_ptr + head * stride_doh, rows, stride_dot, row_live, offs_d, HEAD_DIM, True, PAD_D)
    # Rows past the segment read lse = delta = 0 and q = dO = 0: their P is 1, dS is 0, and they are
    # never stored.
    lse2 = tl.load(lse_ptr + head * T + rows, mask=row_live, other=0.0) * _LOG2E
    delta = tl.load(delta_ptr + head * T + rows, mask=row_live, other=0.0)
    k_head = k_ptr + kv_head * stride_kh
    v_head = v_ptr + kv_head * stride_vh

    dq = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    for i in range(tl.load(anc_ptr_ptr + seg), tl.load(anc_ptr_ptr + seg + 1)):
        a = tl.load(anc_ptr + i)
        a_start = tl.load(seg_start_ptr + a)
        a_end = a_start + tl.load(seg_len_ptr + a)
        a_whole = a_start + (a_end - a_start) // BLOCK_N * BLOCK_N
        dq = _dq_keys(dq, q, do, lse2, delta, k_head, v_head, stride_kt, stride_vt, rows, a_start, a_whole,
                      qk_scale, offs_d, _FULL, HEAD_DIM, PAD_D, BLOCK_N, DOT_PRECISION)
        dq = _dq_keys(dq, q, do, lse2, delta, k_head, v_head, stride_kt, stride_vt, rows, a_whole, a_end,
                      qk_scale, offs_d, _BOUNDS, HEAD_DIM, PAD_D, BLOCK_N, DOT_PRECISION)
    dq = _dq_keys(dq, q, do, lse2, delta, k_head, v_head, stride_kt, stride_vt, rows, seg_start, first,
                  qk_scale, offs_d, _FULL, HEAD_DIM, PAD_D, BLOCK_N, DOT_PRECISION)
    dq = _dq_keys(dq, q, do, lse2, delta, k_head, v_head, stride_kt, stride_vt, rows, first,
                  tl.minimum(first + BLOCK_M, seg_end), qk_scale, offs_d, _CAUSAL, HEAD_DIM, PAD_D, BLOCK_N,
                  DOT_PRECISION)

    dq_ptrs = dq_ptr + head * stride_dqh + rows.to(tl.int64)[:, None] * stride_dqt + offs_d[None, :]
    tl.store(dq_ptrs, (dq * scale).to(dq_ptr.dtype.element_ty),
             mask=row_live[:, None] & (offs_d < HEAD_DIM)[None, :])


@triton.jit
def _dkdv_queries(dk, dv, k, v, q_head, do_head, lse_head, delta_head, dq_head, stride_qt, stride_dot,
                  stride_dqt, cols, lo, hi, qk_scale, offs_d, MODE: tl.constexpr, HEAD_DIM: tl.constexpr,
                  PAD_D: tl.constexpr, BLOCK_M: tl.constexpr, FUSED_DQ: tl.constexpr,
                  DOT_PRECISION: tl.constexpr):
    """dV += Pᵀ·dO and dK += dSᵀ·Q over queries [lo, hi) of one head, in the transposed form
    (keys × queries) so the block's keys stay the rows: Pᵀ = 2^{c·k·qᵀ − lse·log2 e}, c = scale·log2 e.
    FUSED_DQ: also dQ[rows] += dS·K, added atomically into the float32 buffer at ``dq_head`` (unscaled)."""
    offs_m = tl.arange(0, BLOCK_M)
    for m0 in range(lo, hi, BLOCK_M):
        rows = m0 + offs_m
        live = rows < hi
        q_t = _load_tile(q_head, rows, stride_qt, live, offs_d, HEAD_DIM, MODE != _FULL, PAD_D, True)
        do = _load_tile(do_head, rows, stride_dot, live, offs_d, HEAD_DIM, MODE != _FULL, PAD_D)
        if MODE == _FULL:
            lse2 = tl.load(lse_head + rows) * _LOG2E
            delta = tl.load(delta_head + rows)
        else:
            lse2 = tl.load(lse_head + rows, mask=live, other=0.0) * _LOG2E
            delta = tl.load(delta_head + rows, mask=live, other=0.0)
        p_t = tl.math.exp2(tl.dot(k, q_t, input_precision=DOT_PRECISION) * qk_scale - lse2[None, :])
        # Rows past the range read q = 0 and lse = 0 (P = 1): they must be zeroed, not just left unstored.
        if MODE == _CAUSAL:
            p_t = tl.where(live[None, :] & (rows[None, :] >= cols[:, None]), p_t, 0.0)
        elif MODE == _BOUNDS:
            p_t = tl.where(live[None, :], p_t, 0.0)
        dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision=DOT_PRECISION)
        dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
        ds_t = (p_t * (dp_t - delta[None, :])).to(q_t.dtype)
        dk = tl.dot(ds_t, tl.trans(q_t), dk, input_precision=DOT_PRECISION)
        if FUSED_DQ:
            dq = tl.dot(tl.trans(ds_t), k, input_precision=DOT_PRECISION)
            tl.atomic_add(dq_head + rows.to(tl.int64)[:, None] * stride_dqt + offs_d[None, :], dq,
                          mask=live[:, None] & (offs_d < HEAD_DIM)[None, :], sem="relaxed")
    return dk, dv


@triton.jit
def _dkdv_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr, dq_ptr,
    order_ptr, block_first_ptr, block_segment_ptr, block_start_ptr, seg_start_ptr, seg_len_ptr, desc_ptr_ptr,
    desc_ptr, T, NUM_KV_HEADS, GROUP, scale: tl.float32, qk_scale: tl.float32, seg_len_key, tokens_key,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
    stride_dkt, stride_dkh, stride_dvt, stride_dvh, stride_dqt, stride_dqh,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, PAD_D: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, FUSED_DQ: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    seg, first, seg_start, seg_end, kv_head = _block_of_program(
        order_ptr, block_first_ptr, block_segment_ptr, block_start_ptr, seg_start_ptr, seg_len_ptr,
        NUM_KV_HEADS, BLOCK_N)
    cols = first + tl.arange(0, BLOCK_N)
    col_live = cols < seg_end
    offs_d = tl.arange(0, BLOCK_D)
    k = _load_tile(k_ptr + kv_head * stride_kh, cols, stride_kt, col_live, offs_d, HEAD_DIM, True, PAD_D)
    v = _load_tile(v_ptr + kv_head * stride_vh, cols, stride_vt, col_live, offs_d, HEAD_DIM, True, PAD_D)
    # The own segment's queries: the diagonal tiles [first, first + BLOCK_N) are causal (BLOCK_N is a
    # multiple of BLOCK_M, so they end on a tile edge), later ones see the whole block.
    diag_end = tl.minimum(first + BLOCK_N, seg_end)
    whole_end = diag_end + (seg_end - diag_end) // BLOCK_M * BLOCK_M
    d_lo = tl.load(desc_ptr_ptr + seg)
    d_hi = tl.load(desc_ptr_ptr + seg + 1)

    dk = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    dv = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    for g in range(GROUP):
        head = kv_head * GROUP + g
        q_head = q_ptr + head * stride_qh
        do_head = do_ptr + head * stride_doh
        lse_head = lse_ptr + head * T
        delta_head = delta_ptr + head * T
        dq_head = dq_ptr + head * stride_dqh
        dk, dv = _dkdv_queries(dk, dv, k, v, q_head, do_head, lse_head, delta_head, dq_head, stride_qt,
                               stride_dot, stride_dqt, cols, first, diag_end, qk_scale, offs_d, _CAUSAL,
                               HEAD_DIM, PAD_D, BLOCK_M, FUSED_DQ, DOT_PRECISION)
        dk, dv = _dkdv_queries(dk, dv, k, v, q_head, do_head, lse_head, delta_head, dq_head, stride_qt,
                               stride_dot, stride_dqt, cols, diag_end, whole_end, qk_scale, offs_d, _FULL,
                               HEAD_DIM, PAD_D, BLOCK_M, FUSED_DQ, DOT_PRECISION)
        dk, dv = _dkdv_queries(dk, dv, k, v, q_head, do_head, lse_head, delta_head, dq_head, stride_qt,
                               stride_dot, stride_dqt, cols, whole_end, seg_end, qk_scale, offs_d, _BOUNDS,
                               HEAD_DIM, PAD_D, BLOCK_M, FUSED_DQ, DOT_PRECISION)
        # Every query of every descendant segment sees the whole block.
        for j in range(d_lo, d_hi):
            s = tl.load(desc_ptr + j)
            s_start = tl.load(seg_start_ptr + s)
            s_end = s_start + tl.load(seg_len_ptr + s)
            s_whole = s_start + (s_end - s_start) // BLOCK_M * BLOCK_M
            dk, dv = _dkdv_queries(dk, dv, k, v, q_head, do_head, lse_head, delta_head, dq_head, stride_qt,
                                   stride_dot, stride_dqt, cols, s_start, s_whole, qk_scale, offs_d, _FULL,
                                   HEAD_DIM, PAD_D, BLOCK_M, FUSED_DQ, DOT_PRECISION)
            dk, dv = _dkdv_queries(dk, dv, k, v, q_head, do_head, lse_head, delta_head, dq_head, stride_qt,
                                   stride_dot, stride_dqt, cols, s_whole, s_end, qk_scale, offs_d, _BOUNDS,
                                   HEAD_DIM, PAD_D, BLOCK_M, FUSED_DQ, DOT_PRECISION)

    out_mask = col_live[:, None] & (offs_d < HEAD_DIM)[None, :]
    rows64 = cols.to(tl.int64)[:, None]
    tl.store(dk_ptr + kv_head * stride_dkh + rows64 * stride_dkt + offs_d[None, :],
             (dk * scale).to(dk_ptr.dtype.element_ty), mask=out_mask)
    tl.store(dv_ptr + kv_head * stride_dvh + rows64 * stride_dvt + offs_d[None, :],
             dv.to(dv_ptr.dtype.element_ty), mask=out_mask)


# --- launch helpers -----------------------------------------------------------------------------------

# Candidate blocks, (BLOCK_M, BLOCK_N, num_warps, num_stages), autotuned per kernel. The forward and dQ
# kernels tile queries by BLOCK_M and loop over keys by BLOCK_N; dK/dV tiles keys by BLOCK_N and loops over
# queries by BLOCK_M. The tiled block is a multiple of the looped one (a segment's tiles before the block are
# whole, its diagonal tiles end on a tile edge). Why these values: docs/design/prefix_attention.md.
_CANDIDATES_16BIT = {
    "fwd": ((128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3), (128, 32, 4, 4), (64, 64, 4, 3), (64, 32, 4, 4)),
    "dq": ((128, 32, 4, 5), (128, 64, 8, 3), (64, 64, 4, 3), (64, 32, 4, 4)),
    "dkdv": ((32, 128, 4, 5), (64, 128, 8, 3), (64, 64, 8, 3), (64, 64, 4, 3), (32, 64, 4, 4)),
}
_CANDIDATES_FP32 = {
    "fwd": ((64, 32, 4, 2), (32, 32, 4, 2)),
    "dq": ((64, 32, 4, 2), (32, 32, 4, 2)),
    "dkdv": ((32, 64, 4, 2), (32, 32, 4, 2)),
}
# Under the interpreter every tile step is a Python-level numpy call: one config, no tuning (a single config
# is launched without benchmarking), small tiles so segments of tests' sizes are several tiles long and the
# whole/bounds/causal paths all run.
_INTERPRETER_CANDIDATES = {"fwd": (32, 16, 4, 1), "dq": (32, 16, 4, 1), "dkdv": (16, 32, 4, 1)}
_INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
_DELTA_BLOCK_M = 64
MAX_HEAD_DIM = 128


def _triton_config(block_m: int, block_n: int, num_warps: int, num_stages: int) -> triton.Config:
    return triton.Config(dict(BLOCK_M=block_m, BLOCK_N=block_n), num_warps=num_warps, num_stages=num_stages)


def _candidates(kernel: str, dtype: torch.dtype) -> tuple:
    """The GPU candidates of ``kernel`` ("fwd", "dq" or "dkdv") for inputs of ``dtype``."""
    return (_CANDIDATES_FP32 if dtype == torch.float32 else _CANDIDATES_16BIT)[kernel]


def _autotuned(kernel: str, fn, **options):
    """``fn`` autotuned over the candidates of ``kernel`` (one fixed config when interpreted), keyed on the
    head dim, the GQA group, the order of the mean segment length and of the stream's length (the dtypes of
    the tensor arguments are part of every key)."""
    if _INTERPRETED:
        configs = [_triton_config(*_INTERPRETER_CANDIDATES[kernel])]
    else:
        configs = [_triton_config(*c) for c in dict.fromkeys(_CANDIDATES_16BIT[kernel] + _CANDIDATES_FP32[kernel])]

    def for_dtype(configs, named_args, **kwargs):
        wanted = _candidates(kernel, named_args["q_ptr"].dtype)
        return [c for c in configs if (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages)
                in wanted]

    return triton.autotune(configs, key=["HEAD_DIM", "GROUP", "seg_len_key", "tokens_key"],
                           prune_configs_by={"early_config_prune": for_dtype}, **options)(fn)


_fwd = _autotuned("fwd", _fwd_kernel)
_dq = _autotuned("dq", _dq_kernel)
_dkdv = _autotuned("dkdv", _dkdv_kernel)
# The fused variant adds into its dQ buffer: the autotuner zeroes it before every trial and before the run.
_dkdv_dq = _autotuned("dkdv", _dkdv_kernel, reset_to_zero=["dq_ptr"])


def _tiled_blocks(tuned, tiled: str) -> Tuple[int, ...]:
    """Every size the autotuned kernel ``tuned`` may tile the layout with (its configs' ``tiled`` block)."""
    return tuple(sorted({c.kwargs[tiled] for c in tuned.configs}))


def _keys(t: dict, T: int) -> Tuple[int, int]:
    """The autotuning keys of a layout: powers of two of its mean segment length and of its length."""
    mean = T // t["seg_len"].numel()
    return min(triton.next_power_of_2(max(mean, 16)), 4096), triton.next_power_of_2(T)


def _dot_precision(dtype: torch.dtype) -> str:
    # float32 inputs get exact float32 products (TF32 would cost ~1e-3 relative in the scores).
    return "ieee" if dtype == torch.float32 else "tf32"


def _block_d(head_dim: int) -> int:
    """Head-dim tile: the next power of two ≥ 16 (tl.dot's minimum); the padded lanes are masked."""
    if not 1 <= head_dim <= MAX_HEAD_DIM:
        raise ValueError(f"head dim must be in [1, {MAX_HEAD_DIM}], got {head_dim}")
    return max(16, triton.next_power_of_2(head_dim))


def _unit_last(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _grid(t: dict, heads: int, tiled: str):
    return lambda meta: (t["num_blocks"][meta[tiled]] * heads,)


def attention_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tables: Tables, *,
                      scale: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """(O [T, Hq, d] in q's dtype, lse [Hq, T] float32, natural log) of shared-prefix attention.

    q [T, Hq, d], k and v [T, Hkv, d] (any strides on T and heads), ``tables(blocks)`` the layout's tables
    for the block sizes ``blocks``.
    """
    q, k, v = _unit_last(q), _unit_last(k), _unit_last(v)
    T, Hq, d = q.shape
    group = Hq // k.shape[1]
    block_d = _block_d(d)
    t = tables(_tiled_blocks(_fwd, "BLOCK_M"))
    o = torch.empty_like(q, memory_format=torch.contiguous_format)
    lse = torch.empty((Hq, T), dtype=torch.float32, device=q.device)
    _fwd[_grid(t, Hq, "BLOCK_M")](
        q, k, v, o, lse,
        t["query_block_order"], t["block_first"], t["block_segment"], t["block_start"], t["seg_start"],
        t["seg_len"], t["anc_ptr"], t["anc"],
        T, Hq, group, scale * LOG2E, *_keys(t, T),
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), o.stride(0), o.stride(1),
        HEAD_DIM=d, BLOCK_D=block_d, PAD_D=block_d != d, DOT_PRECISION=_dot_precision(q.dtype),
    )
    return o, lse


def attention_backward(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
                       lse: torch.Tensor, tables: Tables, *, scale: float,
                       deterministic: bool = True) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dQ, dK, dV) in the inputs' dtypes for the upstream gradient ``do`` [T, Hq, d] of the forward's O.

    ``deterministic``: dQ from its own kernel, bitwise reproducible; else accumulated inside the dK/dV pass
    with float32 atomics (fewer FLOPs, last bits of dQ vary from run to run).
    """
    do, q, k, v, o = (_unit_last(x) for x in (do.to(q.dtype), q, k, v, o))
    T, Hq, d = q.shape
    Hkv = k.shape[1]
    group = Hq // Hkv
    block_d = _block_d(d)
    head = dict(HEAD_DIM=d, BLOCK_D=block_d, PAD_D=block_d != d, DOT_PRECISION=_dot_precision(q.dtype))

    delta = torch.empty((Hq, T), dtype=torch.float32, device=q.device)
    _delta_kernel[(triton.cdiv(T, _DELTA_BLOCK_M), Hq)](
        o, do, delta, T, o.stride(0), o.stride(1), do.stride(0), do.stride(1),
        HEAD_DIM=d, BLOCK_D=block_d, BLOCK_M=_DELTA_BLOCK_M,
    )

    if deterministic:
        dq = torch.empty_like(q, memory_format=torch.contiguous_format)
        t = tables(_tiled_blocks(_dq, "BLOCK_M"))
        _dq[_grid(t, Hq, "BLOCK_M")](
            q, k, v, do, lse, delta, dq,
            t["query_block_order"], t["block_first"], t["block_segment"], t["block_start"], t["seg_start"],
            t["seg_len"], t["anc_ptr"], t["anc"],
            T, Hq, group, scale, scale * LOG2E, *_keys(t, T),
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), do.stride(0),
            do.stride(1), dq.stride(0), dq.stride(1), **head,
        )
    else:
        dq = torch.zeros((T, Hq, d), dtype=torch.float32, device=q.device)

    dk = torch.empty_like(k, memory_format=torch.contiguous_format)
    dv = torch.empty_like(v, memory_format=torch.contiguous_format)
    dkdv = _dkdv if deterministic else _dkdv_dq
    t = tables(_tiled_blocks(dkdv, "BLOCK_N"))
    dq_sum = dk if deterministic else dq  # read only when FUSED_DQ
    dkdv[_grid(t, Hkv, "BLOCK_N")](
        q, k, v, do, lse, delta, dk, dv, dq_sum,
        t["key_block_order"], t["block_first"], t["block_segment"], t["block_start"], t["seg_start"],
        t["seg_len"], t["desc_ptr"], t["desc"],
        T, Hkv, group, scale, scale * LOG2E, *_keys(t, T),
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), do.stride(0),
        do.stride(1), dk.stride(0), dk.stride(1), dv.stride(0), dv.stride(1), dq_sum.stride(0),
        dq_sum.stride(1), FUSED_DQ=not deterministic, **head,
    )
    if not deterministic:
        dq = (dq * scale).to(q.dtype)
    return dq, dk, dv
