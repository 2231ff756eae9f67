"""Naive oracles straight from docs/math.md, for tests and benchmarks only.

Every function here is plain differentiable PyTorch that materialises whatever it needs ([N, V] logits
included) and keeps the dtype it is given, so calling it on float64 inputs gives the float64 ground truth
that every backend is held against. Nothing here is tuned; clarity wins over speed. The O(B·T) per-token math
of the policy loss is not written a second time here: :func:`policy_loss` runs the torch backend's formulas
(rlloss/policy.py) in float64 under autograd, so the kernel is held against one torch copy of each formula.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor


# --- docs/math.md §1: token log-probs and entropy -------------------------------------------------------------


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
    logits = torch.where(valid.unsqueeze(-1), logits, 0.0)
    logp = torch.log_softmax(logits, dim=-1)
    token_logp = logp.gather(-1, torch.where(valid, targets, 0).unsqueeze(-1)).squeeze(-1)
    p = logp.exp()  # a −inf logit has p = 0 and contributes 0 (never 0·(−inf))
    entropy = -(p * torch.where(p == 0, 0.0, logp)).sum(-1)
    return torch.where(valid, token_logp, 0.0), torch.where(valid, entropy, 0.0)


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
    hidden = torch.where(valid, hidden, 0.0)
    logits = logits_from_hidden(hidden, weight, bias, temperature=temperature, softcap=softcap)
    return logprobs_from_logits(logits, targets, ignore_index=ignore_index)


# --- docs/math.md §2: group advantages ---------------------------------------------------------------------


def group_advantages(rewards: Tensor, group_sizes, *, mode: str = "grpo", eps: float = 1e-6,
                     singleton: str = "zero", response_lengths: Optional[Tensor] = None,
                     baselines: Optional[Tensor] = None, group_ids: Optional[Tensor] = None) -> Tensor:
    """Group-relative advantages [B] of ``rewards`` [B] split into consecutive groups of ``group_sizes`` (a list
    of ints; None for the ungrouped modes reinforce_plus_plus and remax), or into the groups of equal
    ``group_ids`` (then ``group_sizes`` is None), in float64 whatever the rewards' dtype (advantages carry no
    gradient). Modes and arguments as :func:`rlloss.group_advantages`, ε given explicitly.

    The formulas of docs/math.md §2 are not written a second time here: this is the torch backend's
    (rlloss/advantages.py, which computes every statistic in float64) on float64 rewards, so the kernel is held
    against one torch copy. The naive mean cannot resolve a spread far below the rewards' common offset (1e-2
    on 1e12); every mode is translation invariant, so hand such rewards over with the offset taken off.
    """
    from .advantages import group_advantages as torch_group_advantages  # rlloss.advantages imports this module

    def wide(x):
        return None if x is None else x.detach().to(torch.float64)

    return torch_group_advantages(
        wide(rewards), group_sizes=group_sizes, group_ids=group_ids, mode=mode, eps=eps, singleton=singleton,
        response_lengths=wide(response_lengths), baselines=wide(baselines), backend="torch")


def gigpo_advantages(episode_rewards: Tensor, step_returns: Tensor, episode_ids: Tensor, anchor_ids: Tensor, *,
                     step_weight: float = 1.0, normalize_std: bool = False, eps: float = 1e-6) -> Tensor:
    """GiGPO (docs/math.md §9) row by row in float64: A_E over the rows of the same episode group (a group of
    one: mean 0, std 1), A_S over the rows of the same episode group and anchor state (a group of one: its own
    mean, std 1); A = A_E + ω·A_S."""
    R = episode_rewards.detach().double().tolist()
    S = step_returns.detach().double().tolist()
    ep, anchor = episode_ids.tolist(), anchor_ids.tolist()

    def normalised(values, members, i, singleton_mean):
        group = torch.tensor([values[j] for j in members], dtype=torch.float64)
        mean = torch.tensor(singleton_mean(values[i]), dtype=torch.float64) if len(members) == 1 else group.mean()
        std = torch.tensor(1.0, dtype=torch.float64) if len(members) == 1 else group.std()
        x = values[i] - mean
        return x / (std + eps) if normalize_std else x

    out = []
    for i in range(len(R)):
        episode_group = [j for j in range(len(R)) if ep[j] == ep[i]]
        step_group = [j for j in episode_group if anchor[j] == anchor[i]]
        a_e = normalised(R, episode_group, i, lambda v: 0.0)
        a_s = normalised(S, step_group, i, lambda v: v)
        out.append(a_e + step_weight * a_s)
    return torch.stack(out) if out else torch.zeros(0, dtype=torch.float64)


# --- docs/math.md §3–§6: ratios, policy losses, KL, rollout correction, aggregation ---------------------------


def policy_loss(
    logprobs: Tensor,
    old_logprobs: Optional[Tensor],
    advantages: Tensor,
    mask: Tensor,
    *,
    config,
    ref_logprobs: Optional[Tensor] = None,
    entropy: Optional[Tensor] = None,
    rollout_logprobs: Optional[Tensor] = None,
    num_items_in_batch=None,
    num_sequences_in_batch=None,
    pos_logprobs: Optional[Tensor] = None,
    neg_logprobs: Optional[Tensor] = None,
    rollout_weights: Optional[Tensor] = None,
    epsilon_low: Optional[Tensor] = None,
    epsilon_high: Optional[Tensor] = None,
) -> Tuple[Tensor, dict]:
    """(loss, metrics) of docs/math.md §3–§6 in float64 by plain autograd, returned in logprobs' dtype; ``config``
    is a LossConfig.

    The per-token formulas are the torch backend's own (rlloss/policy.py ``_loss_rows``: one torch copy of the
    math), run here in float64 and differentiated by autograd w.r.t. ``logprobs`` and ``entropy`` instead of
    through the policy_loss op; what stays the oracle's is the float64 and the autograd. Masked tokens are
    replaced by 0 before any arithmetic, so their inputs never reach the loss or a gradient. The rollout weights
    are formed over the given mask, then verl's rejection sampling shrinks the mask of every term (docs/math.md
    §5); clip_cov draws its tokens with torch.randperm on the default generator, as verl.
    """
    from . import policy  # rlloss.policy imports this module

    def wide(x):
        return None if x is None else x.to(torch.float64)

    m = mask if mask.dtype == torch.bool else mask != 0
    old, rollout = wide(old_logprobs), wide(rollout_logprobs)
    m, rollout_weights = policy.apply_rollout_rs_and_normalise(
        config, m, logprobs.detach().to(torch.float64) if old is None else old, rollout, wide(rollout_weights))
    normaliser = policy.aggregation_normaliser(config, m, num_items_in_batch, num_sequences_in_batch)
    loss_t, stats = policy._loss_rows(
        wide(logprobs), wide(entropy), old, wide(advantages), m, wide(ref_logprobs), rollout, config, normaliser,
        wide(pos_logprobs), wide(neg_logprobs), rollout_weights, (wide(epsilon_low), wide(epsilon_high)))
    names = policy.metric_names(config, ref_logprobs is not None, entropy is not None, rollout_logprobs is not None)
    metrics = policy._metrics_from_stats(stats, names)
    dt = logprobs.dtype
    return loss_t.sum(1).sum().to(dt), {name: value.to(dt) for name, value in metrics.items()}


# --- docs/math.md §8: shared-prefix attention --------------------------------------------------------------


def shared_prefix_attention(q: Tensor, k: Tensor, v: Tensor, allowed: Tensor, *, scale: float) -> Tensor:
    """Dense masked attention: q [T, Hq, d], k/v [T, Hkv, d], ``allowed`` [T, T] bool (query, key).

    Grouped-query heads are expanded by repetition; every query sees at least its own key.
    """
    group = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q, k) * scale
    scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v)


# --- docs/math.md §7: contrastive-teacher credit -----------------------------------------------------------------


def contrastive_credit(
    advantages: Tensor,
    mask: Tensor,
    pos_logprobs: Tensor,
    *,
    neg_logprobs: Optional[Tensor] = None,
    base_logprobs: Optional[Tensor] = None,
    lam: float = 0.5,
    eps_w: float = 0.2,
    mode: str = "cepo",
) -> Tensor:
    """Â [B, T] in float64, detached: docs/math.md §7, Δ = ℓ⁺ − ℓ⁻ ("cepo") or ℓ⁺ − ℓ° ("rlsd", ℓ° =
    ``base_logprobs``), Â = A·((1 − λ) + λ·clip(exp(sign(A)·Δ), 1 − ε_w, 1 + ε_w))·m, with the formula of
    rlloss.credit.credit_advantage (its one torch copy) run in float64. ``advantages`` is [B] or [B, T]; masked
    tokens are zeroed before any arithmetic.
    """
    from .credit import credit_advantage  # rlloss.credit imports this module

    m = mask if mask.dtype == torch.bool else mask != 0
    zero = torch.zeros((), dtype=torch.float64, device=m.device)

    def clean(x):
        return torch.where(m, x.detach().to(torch.float64), zero)

    A = clean(advantages[:, None] if advantages.ndim == 1 else advantages)
    other = neg_logprobs if mode == "cepo" else base_logprobs
    return credit_advantage(A, clean(pos_logprobs) - clean(other), lam, eps_w)
