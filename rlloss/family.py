"""Methods of the GRPO family built on rlloss's extension points (docs/math.md §9): MC-GRPO's pivot mask, D³S's
sample selection, GiGPO's two-level advantages, and the pairwise decomposed advantage of LamPO.

Each helper is host-side bookkeeping over [B] per-completion values (rewards, advantages, group labels); the
loss itself stays :func:`rlloss.policy_loss` / :class:`rlloss.FusedPolicyLoss`, fed the advantages, masks and
clip ranges these return. The float64 oracles are in ``rlloss.reference``.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
from torch import Tensor

from . import _checks
from ._backend import TORCH
from .advantages import _check_rewards, check_grouping, group_advantages

__all__ = ["mc_grpo_keep_mask", "d3s_sample_mask", "discounted_returns", "gigpo_advantages",
           "pairwise_advantages"]

GroupSizes = Union[Tensor, Sequence[int], None]


def _group_index(rewards: Tensor, group_size: Optional[int], group_sizes: GroupSizes,
                 group_ids: Optional[Tensor]) -> Tensor:
    """[B] int64 index of each completion's group (0, 1, …), from exactly one of the three groupings (checked
    as in :func:`rlloss.group_advantages`)."""
    rewards = _check_rewards(rewards)
    group_size, sizes, group_ids = check_grouping(rewards, group_size, group_sizes, group_ids, grouped=True)
    if group_ids is not None:
        return torch.unique(group_ids, return_inverse=True)[1].to(rewards.device)
    if group_size is not None:
        return torch.arange(rewards.shape[0], device=rewards.device) // group_size
    sizes = sizes.to(rewards.device)
    return torch.repeat_interleave(torch.arange(sizes.numel(), device=rewards.device), sizes)


def mc_grpo_keep_mask(rewards: Tensor, *, group_size: Optional[int] = None, group_sizes: GroupSizes = None,
                      group_ids: Optional[Tensor] = None) -> Tensor:
    """MC-GRPO's keep-mask (docs/math.md §9): False at each group's pivot, True elsewhere.

    MC-GRPO samples G + 1 completions per prompt, takes the group's (lower) median reward as the baseline
    (``group_advantages(mode="mc_grpo")``) and drops the pivot — the completion whose reward is that median,
    advantage 0 — from the loss, so G completions per prompt carry gradient. Here the pivot is the first
    completion of the group (in batch order) whose reward equals the lower median; the paper's code takes the
    index ``torch.median`` reports, which differs only when several completions tie at the median (all of them
    have A = 0).

    Args:
        rewards: [B] floating, finite.
        group_size, group_sizes, group_ids: the groups, exactly one of them, as in :func:`rlloss.group_advantages`.

    Returns:
        [B] bool on rewards' device. Select the kept rows (``x[keep]``) before the loss, as the paper's code
        does, or pass ``mask & keep[:, None]`` with ``num_sequences_in_batch`` set to the kept count.
    """
    index = _group_index(rewards, group_size, group_sizes, group_ids)  # checks rewards: [B] floating, finite
    centered = group_advantages(rewards.double(), group_size=group_size, group_sizes=group_sizes,
                                group_ids=group_ids, mode="median", backend=TORCH)
    # The pivot: the first position (in batch order) of each group where the centred reward is 0.
    B = centered.shape[0]
    position = torch.arange(B, device=centered.device)
    candidate = torch.where(centered == 0, position, torch.full_like(position, B))
    first = torch.full((int(index.max()) + 1 if B else 0,), B, dtype=torch.int64, device=centered.device)
    return position != first.scatter_reduce(0, index, candidate, reduce="amin")[index]


def d3s_sample_mask(advantages: Tensor, keep: int, *, group_size: Optional[int] = None,
                    group_sizes: GroupSizes = None, group_ids: Optional[Tensor] = None) -> Tensor:
    """D³S's sample-level selection (docs/math.md §9): in each group, the ``keep`` completions whose advantages
    have the largest variance (all of a group with at most ``keep`` members).

    A subset of fixed size with the largest variance is made of the a smallest and the keep − a largest values
    for some a; every a is tried. Ties between equal variances go to the smaller a, ties between equal
    advantages to the earlier completion.

    Args:
        advantages: [B] floating, one per completion (e.g. from :func:`rlloss.group_advantages` over the full
            group).
        keep: k ≥ 1, the completions kept per group (D³S's schedule sets it per step).
        group_size, group_sizes, group_ids: the groups, exactly one, as in :func:`rlloss.group_advantages`.

    Returns:
        [B] bool, True for the kept completions.
    """
    advantages = _checks.floating("advantages", advantages)
    keep = _checks.integer("keep", keep, minimum=1)
    index = _group_index(advantages, group_size, group_sizes, group_ids).cpu()
    values = advantages.detach().double().cpu()
    out = torch.zeros(values.shape, dtype=torch.bool)
    for g in range(int(index.max()) + 1 if values.numel() else 0):
        members = (index == g).nonzero().flatten()
        if members.numel() <= keep:
            out[members] = True
            continue
        order = members[torch.sort(values[members], stable=True).indices]
        best, best_var = None, -1.0
        for low in range(keep + 1):
            chosen = torch.cat([order[:low], order[order.numel() - (keep - low):]])
            var = float(values[chosen].var(unbiased=False))
            if var > best_var:
                best, best_var = chosen, var
        out[best] = True
    return out.to(advantages.device)


def discounted_returns(rewards: Tensor, trajectory_ids: Tensor, gamma: float) -> Tensor:
    """Per-step discounted returns G_t = r_t + γ·G_{t+1} within each trajectory (GiGPO's step returns).

    Args:
        rewards: [B] floating, one per step (row); the steps of a trajectory in batch order.
        trajectory_ids: [B] integers, equal for the steps of one trajectory.
        gamma: γ ∈ [0, 1].

    Returns:
        [B] float64 returns.
    """
    rewards = _checks.floating("rewards", rewards)
    trajectory_ids = _checks.tensor("trajectory_ids", trajectory_ids)
    _checks.same_shape("trajectory_ids", trajectory_ids, rewards.shape, "rewards'")
    if not 0.0 <= _checks.number("gamma", gamma, "a float") <= 1.0:
        raise ValueError(f"gamma must lie in [0, 1], got {gamma}")
    r = rewards.detach().double().cpu().tolist()
    ids = trajectory_ids.cpu().tolist()
    running, out = {}, [0.0] * len(r)
    for t in reversed(range(len(r))):
        running[ids[t]] = r[t] + gamma * running.get(ids[t], 0.0)
        out[t] = running[ids[t]]
    return torch.tensor(out, dtype=torch.float64, device=rewards.device)


def gigpo_advantages(episode_rewards: Tensor, step_returns: Tensor, episode_ids: Tensor, anchor_ids: Tensor, *,
                     step_weight: float = 1.0, normalize_std: bool = False, eps: float = 1e-6) -> Tensor:
    """GiGPO's advantage of each step (docs/math.md §9): A = A_E + ω·A_S.

    Rows are the steps of the episodes of a batch. A_E normalises each row's episode reward within its
    episode group (``episode_ids``: the episodes of one task; every step row counts, and a group of one has
    mean 0 and std 1); A_S normalises the step returns within the anchor-state group: the rows of one episode
    group whose anchor state (``anchor_ids``, e.g. a hash of the observation) is the same (a group of one gets
    0). Normalisation is R − mean, or (R − mean)/(std + ε) with ``normalize_std`` (unbiased std).

    Args:
        episode_rewards: [B] the reward of each row's episode.
        step_returns: [B] each step's return (e.g. :func:`discounted_returns`).
        episode_ids, anchor_ids: [B] integers.
        step_weight: ω.
        normalize_std: GiGPO's "mean_std_norm" (True) or "mean_norm" (False).
        eps: ε of the std normalisation.

    Returns:
        [B] advantages (float32, float64 for float64 inputs): the per-sequence ``advantages`` of the loss.
    """
    episode_ids = _checks.tensor("episode_ids", episode_ids)
    anchor_ids = _checks.tensor("anchor_ids", anchor_ids)
    _checks.same_shape("anchor_ids", anchor_ids, episode_ids.shape, "episode_ids'")
    mode = "grpo" if normalize_std else "no_std"
    episode = group_advantages(episode_rewards, group_ids=episode_ids, mode=mode, eps=eps, singleton="verl")
    # The anchor-state groups: one per distinct (episode group, anchor state) pair.
    step_groups = torch.unique(torch.stack([episode_ids, anchor_ids]), dim=1, return_inverse=True)[1]
    step = group_advantages(step_returns, group_ids=step_groups.to(step_returns.device), mode=mode, eps=eps)
    return episode + step_weight * step.to(episode.dtype)


def pairwise_advantages(rewards: Tensor, pair_weights: Optional[Tensor] = None, *, group_size: Optional[int] = None,
                        group_sizes: GroupSizes = None, group_ids: Optional[Tensor] = None) -> Tensor:
    """Pairwise decomposed advantage (docs/math.md §9, LamPO's structure):
    A_i = 1/(G − 1) · Σ_{j in i's group, j ≠ i} w_ij·(R_i − R_j); a group of one gets 0.

    With every w_ij = 1 this is RLOO's advantage. LamPO weighs each comparison by a confidence computed from
    the sequence log-probability difference of i and j; that function is not given here (see docs/math.md §9):
    pass the weights.

    Args:
        rewards: [B] floating.
        pair_weights: [B, B] floating weights w_ij (only pairs within a group are read), or None for 1.
        group_size, group_sizes, group_ids: the groups, exactly one, as in :func:`rlloss.group_advantages`.

    Returns:
        [B] float64 advantages.
    """
    index = _group_index(rewards, group_size, group_sizes, group_ids)  # checks rewards: [B] floating, finite
    r = rewards.detach().double()
    same = (index[:, None] == index[None, :]) & ~torch.eye(r.numel(), dtype=torch.bool, device=r.device)
    w = torch.ones_like(same, dtype=torch.float64)
    if pair_weights is not None:
        pair_weights = _checks.floating("pair_weights", pair_weights)
        _checks.shape("pair_weights", pair_weights, same.shape, "[B, B]")
        w = pair_weights.detach().double()
    gaps = torch.where(same, w * (r[:, None] - r[None, :]), torch.zeros((), dtype=torch.float64, device=r.device))
    return gaps.sum(1) / same.sum(1).clamp(min=1).double()
