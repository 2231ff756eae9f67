"""Group-relative advantages of per-completion rewards (docs/math.md §2; every mode and its source:
docs/api/group_advantages.md), over groups of equal or varying size.

The argument checks, the vectorised ``torch`` backend and the public API; the Triton kernel lives in
``rlloss.kernels.advantages``, the naive oracle in ``rlloss.reference``. Advantages carry no gradient (rewards
come from outside the graph), so there is no autograd function: the result is detached.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from . import _checks
from . import reference
from . import _backend
from ._backend import resolve_backend

__all__ = ["ADVANTAGE_MODES", "VERL_MODES", "ALL_MODES", "group_advantages"]

# Group normalisations computed from the rewards and the groups alone.
ADVANTAGE_MODES = ("grpo", "no_std", "batch_std", "rloo", "median", "median_mad", "rank_gaussian", "mc_grpo")
# verl's outcome advantage estimators (adv_estimator=…) beyond grpo / rloo, some with extra inputs.
VERL_MODES = ("gpg", "grpo_passk", "grpo_passk_no_std", "opo", "reinforce_plus_plus",
              "reinforce_plus_plus_baseline", "remax")
ALL_MODES = ADVANTAGE_MODES + VERL_MODES

_UNGROUPED_MODES = ("reinforce_plus_plus", "remax")  # no group baseline: group_size/group_sizes optional
_LENGTH_MODES = ("opo", "reinforce_plus_plus", "reinforce_plus_plus_baseline")  # need response_lengths
_WHITENED_MODES = ("reinforce_plus_plus", "reinforce_plus_plus_baseline")  # ε inside √(σ² + ε), default 1e-8
# Modes where verl gives a group of one mean 0 and std 1 (singleton="verl" applies).
_VERL_SINGLETON_MODES = ("grpo", "no_std", "rloo", "gpg", "opo", "reinforce_plus_plus_baseline")
SINGLETON_RULES = ("zero", "verl")


def default_eps(mode: str) -> float:
    """ε when ``eps=None``: verl's 1e-8 under the square root of the whitening modes, MC-GRPO's 1e-3 for
    ``mc_grpo``, else 1e-6."""
    if mode == "mc_grpo":
        return 1e-3
    return 1e-8 if mode in _WHITENED_MODES else 1e-6


# --- checks ---------------------------------------------------------------------------------------------


def _check_rewards(rewards: object, check_inputs: bool = True) -> Tensor:
    rewards = _checks.tensor("rewards", rewards)
    _checks.ndim("rewards", rewards, 1, "[B]")
    _checks.dtype_in("rewards", rewards, _checks.FLOAT_DTYPES)
    if check_inputs:
        _check_finite("rewards", rewards)
    return rewards


def _check_finite(name: str, x: Tensor) -> None:
    """Every element finite — one host sync."""
    finite = torch.isfinite(x)
    if x.numel() and not bool(finite.all()):
        bad = x[~finite]
        raise ValueError(f"{name} must be finite; {bad.numel()} of {x.numel()} are not, e.g. {bad[0].item()}")


def _check_group_size(group_size: object, B: int) -> int:
    group_size = _checks.integer("group_size", group_size, minimum=1)
    if B % group_size:
        raise ValueError(f"rewards' length B = {B} must be a multiple of group_size = {group_size}")
    return group_size


def _check_group_sizes(group_sizes: object, B: int, check_inputs: bool = True) -> Tensor:
    """group_sizes as an int64 tensor: 1-D integers, each >= 1, summing to B.

    A sequence is checked on the host in full. A tensor's values are read on the host (one sync for a GPU
    tensor) only with check_inputs; without, it stays where it is, checked for dtype and rank only.
    """
    if isinstance(group_sizes, Tensor):
        _checks.integer_dtype("group_sizes", group_sizes)
        _checks.ndim("group_sizes", group_sizes, 1, "[num_groups]")
        if group_sizes.numel() == 0 and B > 0:
            raise ValueError(f"group_sizes must sum to rewards' length B = {B}, got no groups")
        if not check_inputs:
            return group_sizes.detach().to(torch.int64)
        sizes = group_sizes.detach().to("cpu", torch.int64)
    elif _checks.is_list(group_sizes):
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


def check_grouping(rewards: Tensor, group_size: object, group_sizes: object, group_ids: object, grouped: bool,
                   check_inputs: bool = True) -> Tuple[Optional[int], Optional[Tensor], Optional[Tensor]]:
    """(group_size, group sizes [G] int64, group_ids [B]), checked, at most one of them not None (exactly one
    when ``grouped``), for the B completions of ``rewards``."""
    given = [name for name, x in (("group_size", group_size), ("group_sizes", group_sizes), ("group_ids", group_ids))
             if x is not None]
    if len(given) > 1:
        raise ValueError(f"exactly one of group_size, group_sizes and group_ids must be given, got "
                         f"{'both' if len(given) == 2 else 'all three'} ({', '.join(given)})")
    if grouped and not given:
        raise ValueError("exactly one of group_size, group_sizes and group_ids must be given, got none")
    B = rewards.shape[0]
    if group_ids is not None:  # any integer values, in any order
        group_ids = _checks.tensor("group_ids", group_ids)
        _checks.integer_dtype("group_ids", group_ids)
        _per_completion("group_ids", group_ids, rewards)
        return None, None, group_ids.detach()
    if group_size is not None:
        return _check_group_size(group_size, B), None, None
    if group_sizes is not None:
        return None, _check_group_sizes(group_sizes, B, check_inputs), None
    return None, None, None


def _check_eps(eps: object, mode: str) -> float:
    if eps is None:
        return default_eps(mode)
    eps = _checks.number("eps", eps, "a float")
    if not math.isfinite(eps) or eps < 0:
        raise ValueError(f"eps must be a finite number >= 0, got {eps}")
    return eps


def _check_singleton(singleton: object, mode: str) -> None:
    _checks.choice("singleton", singleton, SINGLETON_RULES)
    if singleton == "verl" and mode not in _VERL_SINGLETON_MODES:
        raise ValueError(
            f"singleton='verl' applies to the modes where verl gives a group of one mean 0 and std 1, "
            f"{_VERL_SINGLETON_MODES}; got mode={mode!r}"
        )


def _check_response_lengths(lengths: object, mode: str, rewards: Tensor, check_inputs: bool) -> Optional[Tensor]:
    if mode not in _LENGTH_MODES:
        if lengths is not None:
            raise ValueError(f"response_lengths is used only by the modes {_LENGTH_MODES}, got mode={mode!r}")
        return None
    if lengths is None:
        raise ValueError(
            f"mode={mode!r} needs response_lengths: [B] token counts of the completions (mask.sum(-1))")
    lengths = _checks.tensor("response_lengths", lengths)
    if lengths.dtype == torch.bool or lengths.is_complex():
        raise TypeError(f"response_lengths must hold integers or floats, got dtype {_checks.dtype_name(lengths.dtype)}")
    _per_completion("response_lengths", lengths, rewards)
    if check_inputs:
        if lengths.dtype.is_floating_point:
            _check_finite("response_lengths", lengths)
        if lengths.numel() and bool((lengths < 0).any()):
            raise ValueError(f"response_lengths must be >= 0, got {lengths[lengths < 0][0].item()}")
    return lengths.detach().contiguous()


def _check_baselines(baselines: object, mode: str, rewards: Tensor, check_inputs: bool) -> Optional[Tensor]:
    if mode != "remax":
        if baselines is not None:
            raise ValueError(f"baselines is used only by mode 'remax', got mode={mode!r}")
        return None
    if baselines is None:
        raise ValueError("mode='remax' needs baselines: [B] rewards of the greedy completion of each prompt")
    baselines = _checks.tensor("baselines", baselines)
    _checks.dtype_in("baselines", baselines, _checks.FLOAT_DTYPES)
    _per_completion("baselines", baselines, rewards)
    if check_inputs:
        _check_finite("baselines", baselines)
    return baselines.detach().contiguous()


def _per_completion(name: str, x: Tensor, rewards: Tensor) -> None:
    _checks.same_shape(name, x, rewards.shape, "rewards'", "[B]")
    _checks.same_device(rewards=rewards, **{name: x})


# --- torch backend: every group at once, no host read ---------------------------------------------------


def _to_device(sizes: Tensor, device: torch.device) -> Tensor:
    """int64 sizes on ``device``; host sizes go to a GPU through pinned memory, a copy that does not block."""
    if sizes.device.type == "cpu" and device.type == "cuda":
        return sizes.to(torch.int64).pin_memory().to(device, non_blocking=True)
    return sizes.to(device=device, dtype=torch.int64)


class _Groups:
    """Consecutive groups of a [B] vector as device tensors, with no host read.

    Values live in ``rows(v)`` layout: [n, G] for a fixed size G, where per-group statistics are [n, 1] and
    broadcast; [B] for varying sizes, where per-group statistics are [n] (``torch.segment_reduce``:
    deterministic, ``unsafe=True`` so that it does not read the sizes on the host) and ``expand`` gathers
    them back. ``sizes`` has the shape of a per-group statistic.
    """

    def __init__(self, B: int, group_size: Optional[int], sizes: Optional[Tensor], device: torch.device):
        self.size = group_size
        if group_size is not None:
            self.sizes = torch.full((B // group_size, 1), group_size, dtype=torch.int64, device=device)
            return
        # Group ends clamped to [0, B], non-decreasing, the last one B: checked sizes pass unchanged, and
        # unchecked ones (check_inputs=False) cannot make segment_reduce(unsafe=True) read past the batch.
        ends = torch.cummax(torch.cumsum(_to_device(sizes, device), 0).clamp(0, B), 0).values
        ends = torch.cat([ends[:-1], torch.full_like(ends[-1:], B)])
        self.starts = torch.cat([torch.zeros_like(ends[:1]), ends[:-1]])
        self.sizes = ends - self.starts
        self.ids = torch.repeat_interleave(torch.arange(ends.shape[0], device=device), self.sizes, output_size=B)

    def rows(self, v: Tensor) -> Tensor:
        return v if self.size is None else v.view(-1, self.size)

    def sum(self, x: Tensor) -> Tensor:
        if self.size is not None:
            return x.sum(dim=1, keepdim=True)
        return torch.segment_reduce(x, "sum", lengths=self.sizes, unsafe=True)

    def max(self, x: Tensor) -> Tensor:
        if self.size is not None:
            return x.amax(dim=1, keepdim=True)
        return torch.segment_reduce(x, "max", lengths=self.sizes, unsafe=True)

    def expand(self, per_group: Tensor) -> Tensor:
        return per_group if self.size is not None else per_group.index_select(0, self.ids)

    def first(self, x: Tensor) -> Tensor:
        """Each group's first value (an empty group, possible only unchecked, reads the last one)."""
        if self.size is not None:
            return x[:, :1]
        return x.index_select(0, self.starts.clamp(max=x.shape[0] - 1))

    def _within_group_order(self, x: Tensor) -> Tensor:
        """Varying sizes: the permutation that sorts x within each group, the groups staying in place — one
        sort of the unique key (group, global rank), no stable sort needed."""
        position = torch.arange(x.shape[0], device=x.device)
        rank = torch.empty_like(position).scatter_(0, torch.argsort(x), position)
        return torch.argsort(self.ids * x.shape[0] + rank)

    def lower_median(self, x: Tensor) -> Tensor:
        """Per-group lower median: sorted position ⌊(G − 1)/2⌋, as torch.median."""
        if self.size is not None:
            k = (self.size - 1) // 2
            return x.sort(dim=1).values[:, k : k + 1]
        middle = (self.starts + (self.sizes - 1).clamp(min=0) // 2).clamp(max=x.shape[0] - 1)
        return x.index_select(0, self._within_group_order(x).index_select(0, middle))

    def order_counts(self, x: Tensor):
        """(#{j: x_j < x_i}, #{j: x_j ≤ x_i}) within each group, per value (the kernel's counts)."""
        if self.size is not None:
            ordered = x.sort(dim=1).values
            return (torch.searchsorted(ordered, x, side="left"), torch.searchsorted(ordered, x, side="right"))
        # In the within-group sorted order, each tie run [first, last] gives the counts first − start and
        # last + 1 − start; the run bounds are running max/min of the run boundaries.
        B = x.shape[0]
        position = torch.arange(B, device=x.device)
        order = self._within_group_order(x)
        ordered = x.index_select(0, order)
        start = self.expand(self.starts)
        run_begins = (position == start) | (ordered != ordered.roll(1))
        run_ends = (position == start + self.expand(self.sizes) - 1) | (ordered != ordered.roll(-1))
        first = torch.cummax(torch.where(run_begins, position, torch.zeros_like(position)), 0).values
        last = torch.cummin(torch.where(run_ends, position, torch.full_like(position, B)).flip(0), 0).values.flip(0)
        less = torch.empty_like(position).scatter_(0, order, first - start)
        return less, torch.empty_like(position).scatter_(0, order, last + 1 - start)


def _reciprocal(denom: Tensor) -> Tensor:
    """1/denom per group, and 0 where denom is 0 (only reachable with ε = 0)."""
    ok = denom > 0
    return torch.where(ok, 1 / torch.where(ok, denom, torch.ones_like(denom)), torch.zeros_like(denom))


def _residuals(r: Tensor, groups: _Groups, weights: Optional[Tensor], verl_singleton: bool):
    """(R − pivot, R − baseline_g) in rows layout, pivot the group's first reward; see
    kernels.advantages._centre."""
    single = groups.sizes == 1
    pivot = groups.first(r)
    if verl_singleton:
        pivot = torch.where(single, torch.zeros_like(pivot), pivot)
    shifted = r - groups.expand(pivot)
    counted = None
    if weights is None:
        centre = groups.sum(shifted) / groups.sizes
    else:  # OPO; a group without any token (Σ n = 0) gets 0
        n = groups.rows(weights).to(r.dtype)
        total = groups.sum(n)
        counted = total > 0
        centre = groups.sum(n * shifted) * _reciprocal(total)
    if verl_singleton:
        centre = torch.where(single, torch.zeros_like(centre), centre)
        counted = None if counted is None else counted | single
    residual = shifted - groups.expand(centre)
    if counted is not None:
        residual = residual * groups.expand(counted.to(r.dtype))
    return shifted, residual


def _group_std(shifted: Tensor, residual: Tensor, groups: _Groups, scaled: bool) -> Tensor:
    """Unbiased std per group. scaled: from squares of residuals divided by the group's largest
    |R − pivot|, each in [0, 4], so no overflow or underflow at any reward magnitude."""
    bessel = (groups.sizes - 1).clamp(min=1)
    if not scaled:
        return (groups.sum(residual * residual) / bessel).sqrt()
    largest = groups.max(shifted.abs())
    unit = residual / groups.expand(torch.where(largest > 0, largest, torch.ones_like(largest)))
    return largest * (groups.sum(unit * unit) / bessel).sqrt()


def _batch_moments(v: Tensor, weights: Optional[Tensor], scaled: bool):
    """(v − v₀ − μ, unbiased std of v) over the batch, each value counted n_i times (verl's masked_whiten
    over tokens; Bessel N − 1 with N = Σ n) or once (Bessel B − 1); see kernels.advantages._batch_moments_kernel.
    scaled: squares of residuals divided by the largest counted |v − v₀|, as in a group."""
    shifted = v - v[0]
    if weights is None:
        residual = shifted - shifted.sum() / v.numel()
        bessel = max(v.numel() - 1, 1)
    else:
        n = weights.to(v.dtype)
        count = n.sum()
        residual = shifted - (n * shifted).sum() * _reciprocal(count)
        bessel = torch.where(count > 1, count - 1, torch.ones_like(count))
    largest = torch.ones((), dtype=v.dtype, device=v.device)
    unit = residual
    if scaled:
        magnitude = shifted.abs() if weights is None else torch.where(n > 0, shifted.abs(), torch.zeros_like(v))
        largest = magnitude.max()
        unit = residual / torch.where(largest > 0, largest, torch.ones_like(largest))
    squares = (unit * unit).sum() if weights is None else (n * unit * unit).sum()
    return residual, largest * (squares / bessel).sqrt()


def _whiten(v: Tensor, weights: Tensor, eps: float, scaled: bool) -> Tensor:
    residual, std = _batch_moments(v, weights, scaled)
    return residual * _reciprocal(torch.hypot(std, torch.full_like(std, math.sqrt(eps))))


def _passk_advantages(r: Tensor, groups: _Groups, eps: float, normalise: bool, scaled: bool) -> Tensor:
    top = groups.max(r)
    at_top = r == groups.expand(top)
    copies = groups.sum(at_top.to(r.dtype))
    below = groups.max(torch.where(at_top, torch.full_like(r, -math.inf), r))
    second = torch.where(copies > 1, top, below)
    gap = torch.where(groups.sizes > 1, top - second, torch.zeros_like(top))
    if normalise:
        gap = gap * _reciprocal(_group_std(*_residuals(r, groups, None, False), groups, scaled) + eps)
    return torch.where(at_top, groups.expand(gap), torch.zeros_like(r))


def _normal_quantile_by_rank(x: Tensor, groups: _Groups) -> Tensor:
    """Φ⁻¹((rank − ½)/G) within each group, ties sharing their mean rank (see kernels.advantages)."""
    less, not_above = groups.order_counts(x)
    m = less + not_above  # 2·rank − 1
    size = groups.expand(groups.sizes)
    tail = torch.minimum(m, 2 * size - m).to(x.dtype) / (2 * size).to(x.dtype)
    magnitude = -torch.special.ndtri(tail)
    return torch.where(m > size, magnitude, -magnitude)


def _group_mode_advantages(r: Tensor, groups: _Groups, mode: str, eps: float, verl_singleton: bool,
                           lengths: Optional[Tensor], scaled: bool) -> Tensor:
    """The grouped modes, in rows layout."""
    if mode == "rank_gaussian":
        return _normal_quantile_by_rank(r, groups)
    if mode in ("median", "median_mad", "mc_grpo"):
        centered = r - groups.expand(groups.lower_median(r))
        if mode == "median":
            return centered
        by_mad = centered * groups.expand(_reciprocal(groups.lower_median(centered.abs()) + eps))
        if mode == "median_mad":
            return by_mad
        # MC-GRPO: the non-zero advantages times G / #{|A| > 1e-6} of their group (G counts the pivot)
        nonzero = (by_mad.abs() > 1e-6).to(r.dtype)
        factor = groups.sizes.to(r.dtype) / groups.sum(nonzero).clamp(min=1.0)
        return torch.where(nonzero > 0, by_mad * groups.expand(factor), by_mad)
    if mode in ("grpo_passk", "grpo_passk_no_std"):
        return _passk_advantages(r, groups, eps, mode == "grpo_passk", scaled)
    # the mean modes: (R − baseline_g)·scale
    shifted, residual = _residuals(r, groups, lengths if mode == "opo" else None, verl_singleton)
    if mode in ("no_std", "opo", "reinforce_plus_plus_baseline"):
        return residual
    if mode == "rloo":
        G = groups.sizes.to(r.dtype)
        return residual * groups.expand(torch.where(G > 1, G / (G - 1).clamp(min=1), torch.ones_like(G)))
    if mode == "gpg":
        return residual * (r.numel() / torch.count_nonzero(r).clamp(min=1).to(r.dtype))
    if mode == "batch_std":
        return residual * _reciprocal(_batch_moments(r.reshape(-1), None, scaled)[1] + eps)
    std = _group_std(shifted, residual, groups, scaled)  # grpo
    if verl_singleton:
        std = torch.where(groups.sizes == 1, torch.ones_like(std), std)
    return residual * groups.expand(_reciprocal(std + eps))


# --- public API -----------------------------------------------------------------------------------------


def group_advantages(
    rewards: Tensor,
    *,
    group_size: Optional[int] = None,
    group_sizes: Union[Tensor, Sequence[int], None] = None,
    group_ids: Optional[Tensor] = None,
    mode: str = "grpo",
    eps: Optional[float] = None,
    singleton: str = "zero",
    response_lengths: Optional[Tensor] = None,
    baselines: Optional[Tensor] = None,
    check_inputs: bool = True,
    backend: Optional[str] = None,
) -> Tensor:
    """Group-relative advantages of per-completion rewards (docs/math.md §2).

    The rewards are split into consecutive groups (the completions of one prompt): runs of ``group_size``,
    or of the lengths in ``group_sizes``; or into the groups of equal ``group_ids``, whose members may sit
    anywhere in the batch (a second grouping level, e.g. GiGPO's anchor states: docs/math.md §9). With μ_g,
    σ_g the mean and unbiased std of group g, ``grpo`` gives A_i = (R_i − μ_g)/(σ_g + ε); the formula of
    every mode and the TRL / verl setting it reproduces are tabled in docs/api/group_advantages.md ("Modes"),
    its conventions under "Conventions" there: a group of equal rewards gives exactly 0 in every grouped mode
    (never NaN), a zero denominator (ε = 0 only) gives 0, medians are lower medians, statistics are exact to
    a few ulps at any reward magnitude, and ``singleton`` picks TRL's (A = 0) or verl's (mean 0, std 1) rule
    for a group of one.

    Args:
        rewards: [B] float16, bfloat16, float32 or float64, finite.
        group_size: G for groups of equal size (B must be a multiple of G).
        group_sizes: [num_groups] integer tensor (any device) or sequence of ints, each >= 1, summing to B.
        group_ids: [B] integer tensor on the rewards' device: completions with equal ids form a group,
            wherever they sit (any values). Every mode works on these groups as on consecutive ones; it costs a
            sort and one host read (the number of groups).
            Exactly one of ``group_size``, ``group_sizes`` and ``group_ids`` must be given, except for the modes
            without groups (``reinforce_plus_plus``, ``remax``), where all are optional and unused.
        mode: one of ``ALL_MODES`` (their formulas: docs/api/group_advantages.md).
        eps: ε >= 0. Added to the denominator σ in ``grpo``, ``batch_std``, ``median_mad`` and ``grpo_passk``
            (default 1e-6, verl's epsilon) and to the variance under the square root in the
            ``reinforce_plus_plus`` modes (default 1e-8, verl's masked_whiten); unused by the other modes.
        singleton: ``"zero"`` or ``"verl"``, the advantage of a group of one (see above).
        response_lengths: [B] token counts n_i of the completions (``response_mask.sum(-1)``; integer or
            floating, >= 0, on the rewards' device); required by ``opo`` and the ``reinforce_plus_plus``
            modes, refused by the others. verl's whitening equals the token-level one for right-padded masks
            (no holes).
        baselines: [B] floating, the baseline reward b_i of each completion; required by ``remax`` only.
        check_inputs: run the checks that read device values (rewards, baselines and response_lengths finite,
            response_lengths >= 0, a ``group_sizes`` tensor's values; one host sync each). With False the call
            never synchronises with the host (CUDA graphs; ``torch.compile(fullgraph=True)`` on the torch
            backend) and bad values give unspecified results instead of an error, never an access outside the
            batch; the checks that need no device read always run (docs/api/group_advantages.md).
        backend: "triton", "torch" or "reference"; default from ``RLLOSS_BACKEND`` or the device.
            ``reference`` always reads the sizes on the host. ``mc_grpo`` runs the torch backend under
            "triton" (the kernels have no count of non-zero advantages).

    Returns:
        Advantages [B], float32 (float64 for float64 rewards), detached: no gradient flows to the rewards.

    Raises:
        TypeError, ValueError: for a bad argument, on the host before anything runs (each case:
            docs/api/group_advantages.md); ValueError also for an unusable backend.

    Example:
        >>> r = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0])
        >>> group_advantages(r, group_size=3)
        tensor([ 1.1547, -0.5773, -0.5773,  0.0000,  0.0000,  0.0000])
    """
    _checks.boolean("check_inputs", check_inputs)
    rewards = _check_rewards(rewards, check_inputs).detach()
    mode = _checks.choice("mode", mode, ALL_MODES)
    grouped = mode not in _UNGROUPED_MODES
    group_size, sizes, group_ids = check_grouping(rewards, group_size, group_sizes, group_ids, grouped, check_inputs)
    sizes_on_host = sizes is not None and sizes.device.type == "cpu" and (
        check_inputs or not isinstance(group_sizes, Tensor))
    eps = _check_eps(eps, mode)
    _check_singleton(singleton, mode)
    lengths = _check_response_lengths(response_lengths, mode, rewards, check_inputs)
    baselines = _check_baselines(baselines, mode, rewards, check_inputs)
    name = resolve_backend(backend, rewards.device)
    impl = _backend.implementation(_IMPLEMENTATIONS, name)
    out_dtype = _checks.compute_dtype(rewards.dtype)

    if rewards.shape[0] == 0:
        return torch.empty((0,), dtype=out_dtype, device=rewards.device)
    if group_ids is not None and _backend.is_reference(name):
        return reference.group_advantages(rewards, None, group_ids=group_ids, mode=mode, eps=eps, singleton=singleton,
                                          response_lengths=lengths, baselines=baselines).to(out_dtype)
    if group_ids is None:
        return impl(rewards, group_size, sizes, sizes_on_host, mode, eps, singleton, lengths, baselines).to(out_dtype)
    # The batch sorted by id (stably) is a run of consecutive groups; the advantages go back to the original order.
    order = torch.argsort(group_ids, stable=True)
    sizes = torch.unique_consecutive(group_ids[order], return_counts=True)[1]  # one host read (their number)
    if check_inputs:  # read on the host, as a checked group_sizes tensor, so the blocks fit the largest group
        sizes = sizes.cpu()
    lengths, baselines = (None if x is None else x[order] for x in (lengths, baselines))
    sorted_advantages = impl(rewards[order], None, sizes, check_inputs, mode, eps, singleton, lengths, baselines)
    return torch.empty_like(sorted_advantages).index_copy_(0, order, sorted_advantages).to(out_dtype)


# One signature for every backend: checked rewards [B] (B > 0), the grouping (group_size or [G] sizes, and whether
# those sizes can be read on the host without a sync), and the checked mode options.


def _reference_advantages(rewards, group_size, sizes, sizes_on_host, mode, eps, singleton, lengths, baselines):
    per_group = None
    if mode not in _UNGROUPED_MODES:
        per_group = [group_size] * (rewards.shape[0] // group_size) if group_size is not None else sizes.tolist()
    return reference.group_advantages(rewards, per_group, mode=mode, eps=eps, singleton=singleton,
                                      response_lengths=lengths, baselines=baselines)


def _torch_advantages(rewards, group_size, sizes, sizes_on_host, mode, eps, singleton, lengths, baselines):
    # float64 for all statistics (MPS has no float64: float32 there, kept overflow-free by the scaling)
    r = rewards.to(torch.float32 if rewards.device.type == "mps" else torch.float64)
    if mode == "remax":
        return r - baselines.to(r.dtype)
    # Whether the squares of residuals can leave the compute dtype's range: float16/bfloat16/float32 rewards
    # differ by at most ~7e38, whose square (~5e77) and the square of the smallest float32 subnormal (~2e-90)
    # are normal float64 numbers; float64 rewards (or float32 compute, on MPS) need the scaling.
    scaled = rewards.dtype == torch.float64 or r.dtype != torch.float64
    if mode == "reinforce_plus_plus":
        return _whiten(r, lengths, eps, scaled)
    groups = _Groups(rewards.shape[0], group_size, sizes, rewards.device)
    advantages = _group_mode_advantages(groups.rows(r), groups, mode, eps, singleton == "verl", lengths, scaled)
    advantages = advantages.reshape(-1)
    if mode == "reinforce_plus_plus_baseline":
        return _whiten(advantages, lengths, eps, scaled)
    return advantages


def _kernel_advantages(rewards, group_size, sizes, sizes_on_host, mode, eps, singleton, lengths, baselines):
    if mode == "mc_grpo":  # the kernels have no count of non-zero advantages
        return _torch_advantages(rewards, group_size, sizes, sizes_on_host, mode, eps, singleton, lengths, baselines)
    offsets = max_size = None  # the modes without groups need neither
    if mode not in _UNGROUPED_MODES and group_size is not None:
        max_size = group_size
        offsets = torch.arange(0, rewards.shape[0] + 1, group_size, dtype=torch.int64, device=rewards.device)
    elif mode not in _UNGROUPED_MODES:
        max_size = int(sizes.max()) if sizes_on_host else None  # never a device read
        sizes = _to_device(sizes, rewards.device)
        offsets = torch.cat([sizes.new_zeros(1), torch.cumsum(sizes, 0)])
    return _backend.kernels("advantages").group_advantages(
        rewards.contiguous(), offsets, mode=mode, eps=eps, max_group_size=max_size,
        verl_singleton=singleton == "verl", lengths=lengths, baselines=baselines,
    )


_IMPLEMENTATIONS = dict(reference=_reference_advantages, torch=_torch_advantages, kernel=_kernel_advantages)
