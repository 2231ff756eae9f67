"""Naive oracles straight from MATH.md, for tests and benchmarks only.

Every function here is plain differentiable PyTorch that materialises whatever it needs ([N, V] logits
included) and keeps the dtype it is given, so calling it on float64 inputs gives the float64 ground truth
that every backend is held against. Nothing here is tuned; clarity wins over speed.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor


# --- MATH.md §1: token log-probs and entropy -------------------------------------------------------------


def logits_from_hidden(
    hidden: Tensor,
    weight: Tensor,
    bias: Optional[Tensor] = None,
    *,
    temperature: float = 1.0,
    softcap: Optional[float] = None,
) -> Tensor:
    """z = cap(h·Wᵀ + b) / T, with cap(x) = c·tanh(x/c) when ``softcap`` is c, else the identity."""
    z = torch.nn.functional.linear(hidden, weight, bias)
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    return z / temperature


def logprobs_from_logits(
    logits: Tensor, targets: Tensor, *, ignore_index: int = -100
) -> Tuple[Tensor, Tensor]:
    """Log-prob of each target and the entropy of each row of ``logits`` [..., V].

    Rows whose target is ``ignore_index`` give 0 for both and pass no gradient, whatever they hold.
    """
    valid = targets != ignore_index
    logits = torch.where(valid.unsqueeze(-1), logits, torch.zeros((), dtype=logits.dtype))
    logp = torch.log_softmax(logits, dim=-1)
    safe_targets = torch.where(valid, targets, torch.zeros_like(targets))
    token_logp = logp.gather(-1, safe_targets.unsqueeze(-1)).squeeze(-1)
    entropy = -(logp.exp() * logp).sum(-1)
    zero = torch.zeros((), dtype=logits.dtype)
    return torch.where(valid, token_logp, zero), torch.where(valid, entropy, zero)


def token_logprobs(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    *,
    bias: Optional[Tensor] = None,
    temperature: float = 1.0,
    softcap: Optional[float] = None,
    ignore_index: int = -100,
) -> Tuple[Tensor, Tensor]:
    """Log-probs and entropy from hidden states ``[..., D]`` through the full ``[..., V]`` logits."""
    valid = (targets != ignore_index).unsqueeze(-1)
    # Zero ignored rows before the matmul so inf/NaN there cannot reach any gradient.
    hidden = torch.where(valid, hidden, torch.zeros((), dtype=hidden.dtype))
    logits = logits_from_hidden(hidden, weight, bias, temperature=temperature, softcap=softcap)
    return logprobs_from_logits(logits, targets, ignore_index=ignore_index)


# --- MATH.md §2: group advantages ---------------------------------------------------------------------


def _lower_median(x: Tensor) -> Tensor:
    """The lower median: the element of sorted rank ⌊(n−1)/2⌋, as torch.median returns it."""
    return x.sort().values[(x.numel() - 1) // 2]


def _group_advantage(r: Tensor, mode: str, eps: float, batch_std: Tensor) -> Tensor:
    """Advantages of one group of float64 rewards ``r`` [G] (MATH.md §2)."""
    G = r.numel()
    zeros = torch.zeros_like(r)
    if bool((r == r[0]).all()):  # zero variance (a singleton included): exactly 0 in every mode
        return zeros
    if mode in ("median", "median_mad"):
        centered = r - _lower_median(r)
        if mode == "median":
            return centered
        scale = _lower_median(centered.abs()) + eps
        return centered / scale if scale > 0 else zeros
    if mode == "rank_gaussian":
        less = (r[None, :] < r[:, None]).sum(1).to(r.dtype)
        ties = (r[None, :] == r[:, None]).sum(1).to(r.dtype)
        rank = less + (ties + 1) / 2  # 1-based, ties share their mean rank
        return torch.special.ndtri((rank - 0.5) / G)
    centered = r - r.mean()
    if mode == "no_std":
        return centered
    if mode == "rloo":
        return centered * G / (G - 1)
    scale = (r.std() if mode == "grpo" else batch_std) + eps
    return centered / scale if scale > 0 else zeros


def group_advantages(rewards: Tensor, group_sizes, *, mode: str = "grpo", eps: float = 1e-6) -> Tensor:
    """Group-relative advantages [B] of ``rewards`` [B] split into consecutive groups of ``group_sizes``.

    A plain loop over the groups, computed and returned in float64 whatever the rewards' dtype (advantages
    carry no gradient). Modes as in MATH.md §2: grpo, no_std, batch_std, rloo, median, median_mad
    ((R − median)/(MAD + ε)), rank_gaussian. Medians are lower medians (torch.median); σ is unbiased; a
    group whose rewards are all equal gives exactly 0; a zero denominator (only possible with ε = 0) gives 0.
    The naive mean cannot resolve a spread far below the rewards' common offset (1e-2 on 1e12); every mode
    is translation invariant, so hand such rewards over with the offset taken off.
    """
    r = rewards.detach().to(torch.float64)
    # TRL's scale_rewards="batch": the unbiased std of all rewards (0 for a single reward).
    batch_std = r.std() if r.numel() > 1 else torch.zeros((), dtype=torch.float64)
    out = torch.zeros_like(r)
    begin = 0
    for size in [int(s) for s in group_sizes]:
        out[begin : begin + size] = _group_advantage(r[begin : begin + size], mode, eps, batch_std)
        begin += size
    return out


# --- MATH.md §3–§6: ratios, policy losses, KL, rollout correction, aggregation ---------------------------
# (policy section: owned by the policy_loss work)
