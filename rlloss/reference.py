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
# (advantages section: owned by the group_advantages work)


# --- MATH.md §3–§6: ratios, policy losses, KL, rollout correction, aggregation ---------------------------
# (policy section: owned by the policy_loss work)
