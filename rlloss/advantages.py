"""Group-relative advantages (MATH.md §2): GRPO, Dr. GRPO, batch-std, RLOO, median (MC-GRPO) and
rank-Gaussian normalisation of per-completion rewards, over groups of equal or varying size.

Layout of this module: the argument checks, the vectorised ``torch`` backend, and the public API. The Triton
kernel lives in ``rlloss.kernels.advantages``; the naive oracle in ``rlloss.reference``. Advantages carry no
gradient (rewards come from outside the graph), so there is no autograd function: the result is detached.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from . import _checks
from . import reference
from ._backend import resolve_backend

__all__ = ["ADVANTAGE_MODES", "group_advantages"]

ADVANTAGE_MODES = ("grpo", "no_std", "batch_std", "rloo", "median", "median_mad", "rank_gaussian")
_EPS_MODES = ("grpo", "batch_std", "median_mad")


# --- checks ---------------------------------------------------------------------------------------------


def _check_rewards(rewards: object) -> Tensor:
    rewards = _checks.tensor("rewards", rewards)
    _checks.ndim("rewards", rewards, 1, "[B]")
    _checks.dtype_in("rewards", rewards, _checks.FLOAT_DTYPES)
    finite = torch.isfinite(rewards)
    if rewards.numel() and not bool(finite.all()):
        bad = rewards[~finite]
        raise ValueError(
            f"rewards must be finite; {bad.numel()} of {rewards.numel()} are not, e.g. {bad[0].item()}"
        )
    return rewards


def _check_group_size(group_size: object, B: int) -> int:
    group_size = _checks.integer("group_size", group_size)
    if group_size < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size}")
    if B % group_size:
        raise ValueError(f"rewards' length B = {B} must be a multiple of group_size = {group_size}")
    return group_size


def _check_group_sizes(group_sizes: object, B: int) -> Tensor:
    """group_sizes as a CPU int64 tensor: 1-D integers, each >= 1, summing to B (one host sync)."""
    if isinstance(group_sizes, Tensor):
        if group_sizes.dtype == torch.bool or group_sizes.dtype.is_floating_point or group_sizes.is_complex():
            dtype = str(group_sizes.dtype).replace("torch.", "")
            raise TypeError(f"group_sizes must hold integers, got dtype {dtype}")
        _checks.ndim("group_sizes", group_sizes, 1, "[num_groups]")
        sizes = group_sizes.detach().to("cpu", torch.int64)
    elif isinstance(group_sizes, Sequence) and not isinstance(group_sizes, (str, bytes)):
        for s in group_sizes:
            if isinstance(s, bool) or not isinstance(s, int):
                raise TypeError(f"group_sizes must hold ints, got an element of type {type(s).__name__}")
        sizes = torch.tensor(list(group_sizes), dtype=torch.int64)
    else:
        raise TypeError(
            f"group_sizes must be a 1-D integer tensor or a sequence of ints, got {type(group_sizes).__name__}"
        )
    if sizes.numel() and int(sizes.min()) < 1:
        empty = int((sizes < 1).nonzero()[0])
        raise ValueError(f"group_sizes must all be >= 1 (no empty groups), got {int(sizes[empty])} at index {empty}")
    total = int(sizes.sum())
    if total != B:
        raise ValueError(f"group_sizes must sum to rewards' length B = {B}, got a sum of {total}")
    return sizes


def _check_mode(mode: object) -> str:
    if not isinstance(mode, str) or mode not in ADVANTAGE_MODES:
        raise ValueError(f"mode must be one of {ADVANTAGE_MODES}, got {mode!r}")
    return mode


def _check_eps(eps: object) -> float:
    if isinstance(eps, bool) or not isinstance(eps, (int, float)):
        raise TypeError(f"eps must be a float, got {type(eps).__name__}")
    if not math.isfinite(eps) or eps < 0:
        raise ValueError(f"eps must be a finite number >= 0, got {eps}")
    return float(eps)


# --- torch backend: vectorised over the groups of each size ---------------------------------------------


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _safe_divide(x: Tensor, denom: Tensor) -> Tensor:
    """x / denom, and 0 where denom is 0 (only reachable with ε = 0)."""
    ok = denom > 0
    return torch.where(ok, x / torch.where(ok, denom, torch.ones_like(denom)), torch.zeros_like(x))


def _lower_median(x: Tensor) -> Tensor:
    """Per-row lower median [n, 1] of x [n, G]: sorted position ⌊(G − 1)/2⌋, as torch.median."""
    k = (x.shape[1] - 1) // 2
    return x.sort(dim=1).values[:, k : k + 1]


def _normal_quantile_by_rank(x: Tensor) -> Tensor:
    """Φ⁻¹((rank − ½)/G) per row of x [n, G], ties sharing their mean rank (see kernels.advantages)."""
    G = x.shape[1]
    ordered = x.sort(dim=1).values
    m = torch.searchsorted(ordered, x, side="left") + torch.searchsorted(ordered, x, side="right")
    tail = torch.minimum(m, 2 * G - m).to(torch.float64) / (2 * G)
    magnitude = -torch.special.ndtri(tail)
    return torch.where(m > G, magnitude, -magnitude).to(x.dtype)


def _rows_advantages(x: Tensor, mode: str, eps: float, batch_std: Optional[Tensor]) -> Tensor:
    """Advantages of n groups of equal size G, x [n, G] in the compute dtype."""
    G = x.shape[1]
    if mode == "rank_gaussian":
        return _normal_quantile_by_rank(x)
    if mode in ("median", "median_mad"):
        centered = x - _lower_median(x)
        if mode == "median":
            return centered
        return _safe_divide(centered, _lower_median(centered.abs()) + eps)
    # Residuals taken from each group's first reward: equal rewards give residuals of exactly 0.
    shifted = x - x[:, :1]
    centered = shifted - shifted.mean(dim=1, keepdim=True)
    if mode == "no_std" or G == 1:  # a singleton's residual is 0 in every mode
        return centered
    if mode == "rloo":
        return centered * (G / (G - 1))
    if mode == "grpo":
        std = (centered.square().sum(dim=1, keepdim=True) / (G - 1)).sqrt()
        return _safe_divide(centered, std + eps)
    return _safe_divide(centered, batch_std + eps)  # batch_std


def _torch_batch_std(r: Tensor) -> Tensor:
    """Unbiased std of all rewards, 0 for a single one (TRL's scale_rewards="batch")."""
    if r.numel() < 2:
        return torch.zeros((), dtype=r.dtype, device=r.device)
    shifted = r - r[0]
    return (shifted - shifted.mean()).square().sum().div(r.numel() - 1).sqrt()


def _torch_group_advantages(
    rewards: Tensor, group_size: Optional[int], sizes: Optional[Tensor], mode: str, eps: float
) -> Tensor:
    r = rewards.to(_compute_dtype(rewards.dtype))
    batch_std = _torch_batch_std(r) if mode == "batch_std" else None
    if group_size is not None:
        return _rows_advantages(r.reshape(-1, group_size), mode, eps, batch_std).reshape(-1)
    out = torch.empty_like(r)
    starts = torch.cumsum(sizes, 0) - sizes
    for G in torch.unique(sizes).tolist():
        first = starts[sizes == G].to(r.device)
        index = first[:, None] + torch.arange(G, device=r.device)
        out[index] = _rows_advantages(r[index], mode, eps, batch_std)
    return out


# --- public API -----------------------------------------------------------------------------------------


def _offsets(B: int, group_size: Optional[int], sizes: Optional[Tensor], device: torch.device) -> Tensor:
    if group_size is not None:
        return torch.arange(0, B + 1, group_size, dtype=torch.int64, device=device)
    return torch.cat([sizes.new_zeros(1), torch.cumsum(sizes, 0)]).to(device)


def group_advantages(
    rewards: Tensor,
    *,
    group_size: Optional[int] = None,
    group_sizes: Union[Tensor, Sequence[int], None] = None,
    mode: str = "grpo",
    eps: float = 1e-6,
    backend: Optional[str] = None,
) -> Tensor:
    """Group-relative advantages of per-completion rewards (MATH.md §2).

    The rewards are split into consecutive groups (the completions of one prompt): runs of ``group_size``,
    or of the lengths in ``group_sizes``. With μ_g, σ_g the mean and unbiased std of group g (size G):

    ================  =====================================================  ======================================
    mode              A_i                                                    reproduces
    ================  =====================================================  ======================================
    ``grpo``          (R_i − μ_g)/(σ_g + ε)                                  TRL scale_rewards="group" (ε=1e-4),
                                                                             verl grpo (ε=1e-6)
    ``no_std``        R_i − μ_g                                              Dr. GRPO; TRL scale_rewards="none"
    ``batch_std``     (R_i − μ_g)/(σ_batch + ε), σ_batch the unbiased std    TRL scale_rewards="batch"
                      of all B rewards (0 when B = 1)
    ``rloo``          G/(G−1)·(R_i − μ_g)                                    RLOO; verl rloo
    ``median``        R_i − med_g                                            MC-GRPO without scaling
    ``median_mad``    (R_i − med_g)/(MAD_g + ε), MAD_g = med_g|R − med_g|    MC-GRPO (ε=1e-3)
    ``rank_gaussian`` Φ⁻¹((rank_i − ½)/G), ties share their mean rank        G²RPO
    ================  =====================================================  ======================================

    med is the lower median (sorted position ⌊(G−1)/2⌋, as torch.median). A group whose rewards are all
    equal — a singleton included — gives exactly 0 in every mode, never rounding noise divided by ε and
    never NaN; a zero denominator (possible only with ε = 0) gives 0.

    Args:
        rewards: [B] float16, bfloat16, float32 or float64, finite.
        group_size: G for groups of equal size (B must be a multiple of G).
        group_sizes: [num_groups] integer tensor (any device) or sequence of ints, each >= 1, summing to B.
            Exactly one of ``group_size`` and ``group_sizes`` must be given.
        mode: one of ``ADVANTAGE_MODES`` (table above).
        eps: ε >= 0 added to the denominator in ``grpo``, ``batch_std`` and ``median_mad``; unused otherwise.
        backend: "triton", "interpret", "torch" or "reference"; default from ``RLLOSS_BACKEND`` or the device.

    Returns:
        Advantages [B], float32 (float64 for float64 rewards), detached: no gradient flows to the rewards.

    Raises:
        TypeError: rewards not a floating tensor, group_size/group_sizes/eps of the wrong type.
        ValueError: rewards not 1-D or not finite, both or neither of group_size/group_sizes, a size < 1,
            sizes not tiling B, unknown mode, eps < 0 or not finite, an unusable backend.

    Example:
        >>> r = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0])
        >>> group_advantages(r, group_size=3)
        tensor([ 1.1547, -0.5773, -0.5773,  0.0000,  0.0000,  0.0000])
    """
    rewards = _check_rewards(rewards).detach()
    B = rewards.shape[0]
    if (group_size is None) == (group_sizes is None):
        given = "both" if group_size is not None else "neither"
        raise ValueError(f"exactly one of group_size and group_sizes must be given, got {given}")
    sizes = None
    if group_size is not None:
        group_size = _check_group_size(group_size, B)
    else:
        sizes = _check_group_sizes(group_sizes, B)
    mode = _check_mode(mode)
    eps = _check_eps(eps)
    name = resolve_backend(backend, rewards.device)
    out_dtype = _compute_dtype(rewards.dtype)

    if B == 0:
        return torch.empty((0,), dtype=out_dtype, device=rewards.device)
    if name == "reference":
        per_group = [group_size] * (B // group_size) if group_size is not None else sizes.tolist()
        return reference.group_advantages(rewards, per_group, mode=mode, eps=eps).to(out_dtype)
    if name == "torch":
        return _torch_group_advantages(rewards, group_size, sizes, mode, eps)
    from .kernels import advantages as kernels

    max_size = group_size if group_size is not None else int(sizes.max())
    return kernels.group_advantages(
        rewards.contiguous(), _offsets(B, group_size, sizes, rewards.device), mode=mode, eps=eps,
        max_group_size=max_size,
    )
