"""Triton kernel for the contrastive-teacher token credit Â_t = A·((1−λ) + λ·w_t)·m_t (docs/math.md §7).

``credit_advantage`` is the per-token formula; the policy-loss kernel (``kernels.policy``) calls the same
function on the advantage it loads, so the credit is formed inside the loss without an extra [B, T] pass.
``credit_rows`` launches the standalone kernel behind ``rlloss.contrastive_credit``.

This module imports nothing from rlloss: it takes tensors and returns tensors.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

# Tokens one program handles; the grid is (B, cdiv(T, BLOCK_T)).
BLOCK_T = 256


@triton.jit
def credit_advantage(adv, delta, lam, log_w_low, log_w_high):
    """Â = A·((1−λ) + λ·w), w = exp(clip(sign(A)·Δ, log(1−ε_w), log(1+ε_w))): the clip is taken in log space,
    so no |Δ| overflows exp; A = 0 gives exactly 0 whatever Δ holds."""
    sign = tl.where(adv > 0.0, 1.0, tl.where(adv < 0.0, -1.0, 0.0))
    log_w = tl.minimum(tl.maximum(sign * delta, log_w_low, propagate_nan=tl.PropagateNan.ALL), log_w_high,
                       propagate_nan=tl.PropagateNan.ALL)
    scaled = adv * ((1.0 - lam) + lam * tl.exp(log_w))
    return tl.where(adv != 0.0, scaled, 0.0)


@triton.jit
def _credit_kernel(
    adv_ptr, live_ptr, pos_ptr, base_ptr, out_ptr,
    T, stride_adv, stride_live, stride_pos, stride_base,
    lam: tl.float32, log_w_low: tl.float32, log_w_high: tl.float32,
    ADV_PER_TOKEN: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    t = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    inb = t < T
    live = inb & (tl.load(live_ptr + row * stride_live + t, mask=inb, other=0) != 0)
    if ADV_PER_TOKEN:
        adv = tl.load(adv_ptr + row * stride_adv + t, mask=live, other=0.0).to(tl.float32)
    else:
        adv = tl.where(live, tl.load(adv_ptr + row * stride_adv).to(tl.float32), 0.0)
    pos = tl.load(pos_ptr + row * stride_pos + t, mask=live, other=0.0).to(tl.float32)
    base = tl.load(base_ptr + row * stride_base + t, mask=live, other=0.0).to(tl.float32)
    out = credit_advantage(adv, pos - base, lam, log_w_low, log_w_high)
    tl.store(out_ptr + row * T + t, out, mask=inb)


def log_weight_bounds(eps_w: float):
    """(log(1 − ε_w), log(1 + ε_w)): the clip of the token weight, in log space."""
    return math.log1p(-eps_w), math.log1p(eps_w)


def _row_major(x: torch.Tensor) -> torch.Tensor:
    """``x`` with unit stride along its last dim, copied only when it must (the policy and credit launchers)."""
    return x if x.shape[-1] <= 1 or x.stride(-1) == 1 else x.contiguous()


def credit_rows(advantages: torch.Tensor, live: torch.Tensor, pos_logprobs: torch.Tensor,
                base_logprobs: torch.Tensor, *, lam: float, eps_w: float) -> torch.Tensor:
    """Token advantages [B, T] float32. advantages: [B] or [B, T]; live: [B, T] bool; pos_logprobs and
    base_logprobs (ℓ⁻ for CEPO, ℓ° for RLSD): [B, T], any float dtype and row stride."""
    B, T = live.shape
    out = torch.empty((B, T), dtype=torch.float32, device=live.device)
    if B == 0 or T == 0:
        return out
    adv, pos, base = (_row_major(x) for x in (advantages, pos_logprobs, base_logprobs))
    live_u8 = _row_major(live).view(torch.uint8)
    low, high = log_weight_bounds(eps_w)
    grid = (B, triton.cdiv(T, BLOCK_T))
    _credit_kernel[grid](
        adv, live_u8, pos, base, out,
        T, adv.stride(0), live_u8.stride(0), pos.stride(0), base.stride(0),
        float(lam), low, high,
        ADV_PER_TOKEN=advantages.ndim == 2, BLOCK=BLOCK_T, num_warps=4,
    )
    return out
