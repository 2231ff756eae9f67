"""Triton kernels for group-relative advantages (docs/math.md §2; algorithms and costs in
docs/api/group_advantages.md, "Conventions" and "Backends and cost").

One program per group: groups are consecutive runs of the rewards delimited by ``offsets`` [num_groups + 1],
of any size and any mix of sizes, and a program loops over its group in blocks of BLOCK rewards. The mean
modes shift every reward by the group's first one (a constant group gives exactly 0, and a large shared
offset costs no precision) and accumulate in float64 with scaled squares (_centre, _group_std); the order
modes count over [BLOCK, BLOCK] tiles, O(G²) and exact for ties (_count_below); the batch-wide statistics
come from a one-program moments kernel, the whitening and remax's R − b from elementwise kernels.

Floating-point scalars (ε, σ_batch, GPG's α, the batch mean) travel in a small float64 tensor, because float
kernel arguments and bare float literals are float32 in compiled Triton.

Group offsets are clamped to [0, B] in the kernel: with ``check_inputs=False`` nothing guarantees on the host
that the sizes tile the batch, and bad sizes must give wrong numbers, never an out-of-bounds access.

This module imports nothing from rlloss: it takes tensors and returns tensors.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

ORDER_MODES = ("median", "median_mad", "rank_gaussian")
# Modes whose group pass reads the completions' token counts, and modes whitened over the batch afterwards.
WEIGHTED_MODES = ("opo",)
WHITENED_MODES = ("reinforce_plus_plus", "reinforce_plus_plus_baseline")

# Slots of the float64 scalar tensor handed to the kernels.
EPS_SLOT = tl.constexpr(0)
BATCH_STD_SLOT = tl.constexpr(1)  # σ_batch (batch_std), or the token-weighted std being whitened away
ALPHA_SLOT = tl.constexpr(2)  # GPG's α = B / max(#{R ≠ 0}, 1)
BATCH_MEAN_SLOT = tl.constexpr(3)  # the token-weighted mean of (value − first value) being whitened away
NUM_SLOTS = 4

# Block caps: 1-D passes stream up to MEAN_BLOCK_MAX rewards per step; the counting modes compare a
# [BLOCK, BLOCK] tile of pairs per step.
MEAN_BLOCK_MAX = 1024
ORDER_BLOCK_MAX_CUDA = 64
ORDER_BLOCK_MAX_INTERPRETER = 128  # fewer, larger steps: the interpreter pays per step, not per element
BATCH_BLOCK = 1024


# --- inverse normal CDF ---------------------------------------------------------------------------------


@triton.jit
def _horner(x, c0: tl.constexpr, c1: tl.constexpr, c2: tl.constexpr, c3: tl.constexpr, c4: tl.constexpr,
            c5: tl.constexpr, c6: tl.constexpr, c7: tl.constexpr):
    """c0 + c1·x + … + c7·x⁷, each coefficient made at x's precision (a bare literal would be float32)."""
    acc = tl.full((), c7, x.dtype)
    acc = acc * x + tl.full((), c6, x.dtype)
    acc = acc * x + tl.full((), c5, x.dtype)
    acc = acc * x + tl.full((), c4, x.dtype)
    acc = acc * x + tl.full((), c3, x.dtype)
    acc = acc * x + tl.full((), c2, x.dtype)
    acc = acc * x + tl.full((), c1, x.dtype)
    return acc * x + tl.full((), c0, x.dtype)


@triton.jit
def _normal_tail_quantile(t):
    """z ≥ 0 with Φ(−z) = t, for t in (0, 1/2]: −Φ⁻¹(t).

    Wichura's algorithm AS 241 (PPND16, Applied Statistics 37(3), 1988): three rational approximations
    (central |t − ½| ≤ 0.425, tail with √(−log t) ≤ 5, far tail beyond), relative error about 1e-16, so the
    result is correct to the rounding of the compute dtype (float32 or float64).
    """
    q = t - 0.5
    r = tl.full((), 0.180625, t.dtype) - q * q
    central = -q * (
        _horner(r, 3.3871328727963666080e0, 1.3314166789178437745e2, 1.9715909503065514427e3,
                1.3731693765509461125e4, 4.5921953931549871457e4, 6.7265770927008700853e4,
                3.3430575583588128105e4, 2.5090809287301226727e3)
        / _horner(r, 1.0, 4.2313330701600911252e1, 6.8718700749205790830e2, 5.3941960214247511077e3,
                  2.1213794301586595867e4, 3.9307895800092710610e4, 2.8729085735721942674e4,
                  5.2264952788528545610e3)
    )
    s = tl.sqrt(-tl.log(t))
    u = s - 1.6
    near = (
        _horner(u, 1.42343711074968357734e0, 4.63033784615654529590e0, 5.76949722146069140550e0,
                3.64784832476320460504e0, 1.27045825245236838258e0, 2.41780725177450611770e-1,
                2.27238449892691845833e-2, 7.74545014278341407640e-4)
        / _horner(u, 1.0, 2.05319162663775882187e0, 1.67638483018380384940e0, 6.89767334985100004550e-1,
                  1.48103976427480074590e-1, 1.51986665636164571966e-2, 5.47593808499534494600e-4,
                  1.05075007164441684324e-9)
    )
    v = s - 5.0
    far = (
        _horner(v, 6.65790464350110377720e0, 5.46378491116411436990e0, 1.78482653991729133580e0,
                2.96560571828504891230e-1, 2.65321895265761230930e-2, 1.24266094738807843860e-3,
                2.71155556874348757815e-5, 2.01033439929228813265e-7)
        / _horner(v, 1.0, 5.99832206555887937690e-1, 1.36929880922735805310e-1, 1.48753612908506148525e-2,
                  7.86869131145613259100e-4, 1.84631831751005468180e-5, 1.42151175831644588870e-7,
                  2.04426310338993978564e-15)
    )
    return tl.where(q >= -0.425, central, tl.where(s <= 5.0, near, far))


# --- small helpers --------------------------------------------------------------------------------------


@triton.jit
def _reciprocal(denom):
    """1/denom, and 0 where denom is 0 (reachable only with ε = 0)."""
    return tl.where(denom > 0.0, 1.0 / tl.where(denom > 0.0, denom, 1.0), 0.0)


@triton.jit
def _hypot(a, b):
    """√(a² + b²) for a, b ≥ 0 without squaring either (no overflow or underflow)."""
    top = tl.maximum(a, b)
    unit = tl.where(top > 0.0, top, 1.0)
    return top * tl.sqrt((a / unit) * (a / unit) + (b / unit) * (b / unit))


# --- order-based modes: ranks by counting -----------------------------------------------------------------


@triton.jit
def _load_values(rewards_ptr, idx, mask, center, ABS_DEVIATION: tl.constexpr, COMPUTE: tl.constexpr):
    """Rewards at idx in the compute dtype (float32, float64 for float64 rewards: the order modes compare and
    subtract in it, exactly), or their absolute deviations |R − center|."""
    x = tl.load(rewards_ptr + idx, mask=mask, other=0.0).to(COMPUTE)
    if ABS_DEVIATION:
        x = tl.abs(x - center)
    return x


@triton.jit
def _count_below(rewards_ptr, begin, end, vi, center,
                 ABS_DEVIATION: tl.constexpr, BLOCK: tl.constexpr, COMPUTE: tl.constexpr):
    """(#{j: v_j < v_i}, #{j: v_j ≤ v_i}) over the group [begin, end) for a block of values vi [BLOCK]."""
    lanes = tl.arange(0, BLOCK)
    less = tl.zeros((BLOCK,), dtype=tl.int32)
    not_above = tl.zeros((BLOCK,), dtype=tl.int32)
    for j0 in range(begin, end, BLOCK):
        j = j0 + lanes
        mj = j < end
        vj = _load_values(rewards_ptr, j, mj, center, ABS_DEVIATION, COMPUTE)
        live = mj[None, :]
        less += tl.sum(tl.where(live & (vj[None, :] < vi[:, None]), 1, 0), axis=1)
        not_above += tl.sum(tl.where(live & (vj[None, :] <= vi[:, None]), 1, 0), axis=1)
    return less, not_above


@triton.jit
def _order_statistic(rewards_ptr, begin, end, k, center,
                     ABS_DEVIATION: tl.constexpr, BLOCK: tl.constexpr, COMPUTE: tl.constexpr):
    """The value at 0-based sorted position k of the group's values (rewards, or |R − center|)."""
    lanes = tl.arange(0, BLOCK)
    found = tl.full((BLOCK,), float("-inf"), dtype=COMPUTE)
    for i0 in range(begin, end, BLOCK):
        i = i0 + lanes
        mi = i < end
        vi = _load_values(rewards_ptr, i, mi, center, ABS_DEVIATION, COMPUTE)
        less, not_above = _count_below(rewards_ptr, begin, end, vi, center, ABS_DEVIATION, BLOCK, COMPUTE)
        holds_k = mi & (less <= k) & (k < not_above)  # every such i has the same value
        found = tl.maximum(found, tl.where(holds_k, vi, float("-inf")))
    return tl.max(found, axis=0)


@triton.jit
def _median_modes(rewards_ptr, out_ptr, begin, end, eps,
                  SCALE_BY_MAD: tl.constexpr, BLOCK: tl.constexpr, COMPUTE: tl.constexpr):
    """median: A = R − med_g; median_mad: A = (R − med_g)/(MAD_g + ε), MAD_g = med_g |R − med_g|.

    Medians are lower medians (sorted position ⌊(G − 1)/2⌋), as torch.median returns them.
    """
    lanes = tl.arange(0, BLOCK)
    k = (end - begin - 1) // 2
    zero = tl.full((), 0.0, COMPUTE)
    median = _order_statistic(rewards_ptr, begin, end, k, zero, False, BLOCK, COMPUTE)
    scale = tl.full((), 1.0, tl.float64)
    if SCALE_BY_MAD:
        mad = _order_statistic(rewards_ptr, begin, end, k, median, True, BLOCK, COMPUTE)
        scale = _reciprocal(mad.to(tl.float64) + eps)
    for i0 in range(begin, end, BLOCK):
        i = i0 + lanes
        mask = i < end
        x = tl.load(rewards_ptr + i, mask=mask, other=0.0).to(COMPUTE)
        tl.store(out_ptr + i, (x - median) * scale, mask=mask)


@triton.jit
def _rank_gaussian(rewards_ptr, out_ptr, begin, end, BLOCK: tl.constexpr, COMPUTE: tl.constexpr):
    """A = Φ⁻¹((rank − ½)/G), ranks 1-based with ties sharing their mean rank.

    With L = #{R_j < R_i} and U = #{R_j ≤ R_i}, 2·rank − 1 = L + U =: m, an integer, and
    (rank − ½)/G = m/(2G). The mirror reward has m' = 2G − m, so evaluating the tail quantile at
    min(m, 2G − m)/(2G) and attaching the sign of m − G makes A exactly antisymmetric, and exactly 0 for
    an all-equal group (m = G).
    """
    lanes = tl.arange(0, BLOCK)
    size = end - begin
    zero = tl.full((), 0.0, COMPUTE)
    for i0 in range(begin, end, BLOCK):
        i = i0 + lanes
        mi = i < end
        vi = _load_values(rewards_ptr, i, mi, zero, False, COMPUTE)
        less, not_above = _count_below(rewards_ptr, begin, end, vi, zero, False, BLOCK, COMPUTE)
        m = less + not_above
        tail = tl.minimum(m, 2 * size - m).to(COMPUTE) / (2 * size).to(COMPUTE)
        magnitude = _normal_tail_quantile(tl.where(mi, tail, 0.5))
        tl.store(out_ptr + i, tl.where(m > size, magnitude, -magnitude), mask=mi)


# --- mean-based modes: float64 sums, scaled squares --------------------------------------------------------


@triton.jit
def _centre(rewards_ptr, lengths_ptr, begin, end,
            WEIGHTED: tl.constexpr, VERL_SINGLETON: tl.constexpr, BLOCK: tl.constexpr):
    """(pivot, centre, largest, counted) of the group [begin, end), in float64.

    The baseline is pivot + centre: pivot the group's first reward, centre the mean of R − pivot (weighted
    by the completions' token counts n when WEIGHTED: OPO's Σ n R / Σ n), and largest is max |R − pivot|,
    the scale of the squares. counted is false for a group without any token (Σ n = 0), whose advantages are
    0. VERL_SINGLETON: a group of one has baseline 0 (verl's mean 0), counted or not.
    """
    lanes = tl.arange(0, BLOCK)
    size = end - begin
    pivot = tl.load(rewards_ptr + begin, mask=size > 0, other=0.0).to(tl.float64)
    if VERL_SINGLETON:
        pivot = tl.where(size == 1, 0.0, pivot)
    total = tl.zeros((BLOCK,), dtype=tl.float64)
    weight = tl.zeros((BLOCK,), dtype=tl.float64)
    largest = tl.zeros((BLOCK,), dtype=tl.float64)
    for i0 in range(begin, end, BLOCK):
        i = i0 + lanes
        mask = i < end
        shifted = tl.where(mask, tl.load(rewards_ptr + i, mask=mask, other=0.0).to(tl.float64) - pivot, 0.0)
        if WEIGHTED:
            n = tl.load(lengths_ptr + i, mask=mask, other=0).to(tl.float64)
            total += n * shifted
            weight += n
        else:
            total += shifted
        largest = tl.maximum(largest, tl.abs(shifted))
    if WEIGHTED:
        denom = tl.sum(weight, axis=0)
    else:
        denom = tl.maximum(size, 1).to(tl.float64)
    counted = denom > 0.0
    centre = tl.sum(total, axis=0) / tl.where(counted, denom, 1.0)
    if VERL_SINGLETON:
        centre = tl.where(size == 1, 0.0, centre)
        counted = counted | (size == 1)
    return pivot, centre, tl.max(largest, axis=0), counted


@triton.jit
def _group_std(rewards_ptr, begin, end, pivot, centre, largest, BLOCK: tl.constexpr):
    """Unbiased std of the group: largest·√(Σ ((R − pivot − centre)/largest)² / (G − 1)), 0 for G = 1.

    Each residual is divided by largest before squaring, so its square lies in [0, 4]: no overflow for huge
    rewards and no underflow to 0 for tiny ones, whatever their magnitude.
    """
    lanes = tl.arange(0, BLOCK)
    unit = tl.where(largest > 0.0, largest, 1.0)
    squares = tl.zeros((BLOCK,), dtype=tl.float64)
    for i0 in range(begin, end, BLOCK):
        i = i0 + lanes
        mask = i < end
        x = tl.load(rewards_ptr + i, mask=mask, other=0.0).to(tl.float64)
        residual = tl.where(mask, (x - pivot - centre) / unit, 0.0)
        squares += residual * residual
    bessel = tl.maximum(end - begin - 1, 1).to(tl.float64)
    return largest * tl.sqrt(tl.sum(squares, axis=0) / bessel)


@triton.jit
def _mean_modes(rewards_ptr, lengths_ptr, out_ptr, begin, end, eps, batch_std, alpha,
                MODE: tl.constexpr, VERL_SINGLETON: tl.constexpr, BLOCK: tl.constexpr):
    """A = (R − baseline_g)·scale: grpo, no_std, batch_std, rloo, gpg, opo, and the residuals that
    reinforce_plus_plus_baseline whitens next (written in float64 to a scratch buffer)."""
    lanes = tl.arange(0, BLOCK)
    size = end - begin
    pivot, centre, largest, counted = _centre(rewards_ptr, lengths_ptr, begin, end, MODE == "opo", VERL_SINGLETON,
                                              BLOCK)
    scale = tl.full((), 1.0, tl.float64)
    if MODE == "opo":
        scale = tl.where(counted, 1.0, 0.0).to(tl.float64)
    elif MODE == "grpo":
        std = _group_std(rewards_ptr, begin, end, pivot, centre, largest, BLOCK)
        if VERL_SINGLETON:
            std = tl.where(size == 1, 1.0, std)  # verl: std 1 for a group of one
        scale = _reciprocal(std + eps)
    elif MODE == "batch_std":
        scale = _reciprocal(batch_std + eps)
    elif MODE == "rloo":
        scale = tl.where(size > 1, size.to(tl.float64) / tl.maximum(size - 1, 1).to(tl.float64), 1.0)
    elif MODE == "gpg":
        scale = alpha
    for i0 in range(begin, end, BLOCK):
        i = i0 + lanes
        mask = i < end
        x = tl.load(rewards_ptr + i, mask=mask, other=0.0).to(tl.float64)
        tl.store(out_ptr + i, (x - pivot - centre) * scale, mask=mask)


@triton.jit
def _passk(rewards_ptr, out_ptr, begin, end, eps, NORMALISE: tl.constexpr, BLOCK: tl.constexpr,
           COMPUTE: tl.constexpr):
    """grpo_passk: the group's best completion gets (R_max − R_second)[/(σ_g + ε)], every other one 0.

    R_second is the second largest with multiplicity, so a tied maximum gives 0 everywhere; a group of one
    has no second and gives 0. The maxima are found in the compute dtype (comparisons are exact), their
    difference taken in float64.
    """
    lanes = tl.arange(0, BLOCK)
    size = end - begin
    scale = tl.full((), 1.0, tl.float64)
    if NORMALISE:
        pivot, centre, largest, _ = _centre(rewards_ptr, rewards_ptr, begin, end, False, False, BLOCK)
        scale = _reciprocal(_group_std(rewards_ptr, begin, end, pivot, centre, largest, BLOCK) + eps)
    best = tl.full((BLOCK,), float("-inf"), dtype=COMPUTE)
    for i0 in range(begin, end, BLOCK):
        i = i0 + lanes
        mask = i < end
        x = tl.load(rewards_ptr + i, mask=mask, other=0.0).to(COMPUTE)
        best = tl.maximum(best, tl.where(mask, x, float("-inf")))
    top = tl.max(best, axis=0)
    copies = tl.zeros((BLOCK,), dtype=tl.int32)
    below = tl.full((BLOCK,), float("-inf"), dtype=COMPUTE)
    for i0 in range(begin, end, BLOCK):
        i = i0 + lanes
        mask = i < end
        x = tl.load(rewards_ptr + i, mask=mask, other=0.0).to(COMPUTE)
        copies += tl.where(mask & (x == top), 1, 0)
        below = tl.maximum(below, tl.where(mask & (x < top), x, float("-inf")))
    second = tl.where(tl.sum(copies, axis=0) > 1, top, tl.max(below, axis=0))
    gap = tl.where(size > 1, top.to(tl.float64) - second.to(tl.float64), 0.0) * scale
    for i0 in range(begin, end, BLOCK):
        i = i0 + lanes
        mask = i < end
        x = tl.load(rewards_ptr + i, mask=mask, other=0.0).to(COMPUTE)
        tl.store(out_ptr + i, tl.where(x == top, gap, 0.0), mask=mask)


@triton.jit
def _group_advantages_kernel(rewards_ptr, lengths_ptr, out_ptr, offsets_ptr, scalars_ptr, B,
                             MODE: tl.constexpr, VERL_SINGLETON: tl.constexpr, BLOCK: tl.constexpr,
                             COMPUTE: tl.constexpr):
    group = tl.program_id(0)
    begin = tl.minimum(tl.maximum(tl.load(offsets_ptr + group), 0), B)
    end = tl.minimum(tl.maximum(tl.load(offsets_ptr + group + 1), begin), B)
    eps = tl.load(scalars_ptr + EPS_SLOT)
    if MODE == "rank_gaussian":
        _rank_gaussian(rewards_ptr, out_ptr, begin, end, BLOCK, COMPUTE)
    elif MODE == "median" or MODE == "median_mad":
        _median_modes(rewards_ptr, out_ptr, begin, end, eps, MODE == "median_mad", BLOCK, COMPUTE)
    elif MODE == "grpo_passk" or MODE == "grpo_passk_no_std":
        _passk(rewards_ptr, out_ptr, begin, end, eps, MODE == "grpo_passk", BLOCK, COMPUTE)
    else:
        batch_std = tl.load(scalars_ptr + BATCH_STD_SLOT)
        alpha = tl.load(scalars_ptr + ALPHA_SLOT)
        _mean_modes(rewards_ptr, lengths_ptr, out_ptr, begin, end, eps, batch_std, alpha, MODE, VERL_SINGLETON,
                    BLOCK)


# --- batch-wide statistics and elementwise passes ---------------------------------------------------------


@triton.jit
def _batch_moments_kernel(values_ptr, lengths_ptr, scalars_ptr, B, WEIGHTED: tl.constexpr, BLOCK: tl.constexpr):
    """One program: the mean μ of v − v₀ and the unbiased std of v over the batch, weighted by the token
    counts n when WEIGHTED (N = Σ n counted tokens, Bessel N − 1; verl's masked_whiten), else each value once
    (σ_batch; 0 when B = 1). Squares are of residuals divided by the largest counted |v − v₀|, as in a group."""
    lanes = tl.arange(0, BLOCK)
    pivot = tl.load(values_ptr).to(tl.float64)
    total = tl.zeros((BLOCK,), dtype=tl.float64)
    weight = tl.zeros((BLOCK,), dtype=tl.float64)
    largest = tl.zeros((BLOCK,), dtype=tl.float64)
    for i0 in range(0, B, BLOCK):
        i = i0 + lanes
        mask = i < B
        shifted = tl.where(mask, tl.load(values_ptr + i, mask=mask, other=0.0).to(tl.float64) - pivot, 0.0)
        if WEIGHTED:
            n = tl.load(lengths_ptr + i, mask=mask, other=0).to(tl.float64)
        else:
            n = tl.where(mask, 1.0, 0.0).to(tl.float64)  # counted, not cast: B = 1 may arrive as a constexpr
        total += n * shifted
        weight += n
        largest = tl.maximum(largest, tl.where(n > 0.0, tl.abs(shifted), 0.0))
    count = tl.sum(weight, axis=0)
    mean = tl.sum(total, axis=0) / tl.where(count > 0.0, count, 1.0)
    top = tl.max(largest, axis=0)
    unit = tl.where(top > 0.0, top, 1.0)
    squares = tl.zeros((BLOCK,), dtype=tl.float64)
    for i0 in range(0, B, BLOCK):
        i = i0 + lanes
        mask = i < B
        x = tl.load(values_ptr + i, mask=mask, other=0.0).to(tl.float64)
        if WEIGHTED:
            n = tl.load(lengths_ptr + i, mask=mask, other=0).to(tl.float64)
        else:
            n = tl.where(mask, 1.0, 0.0).to(tl.float64)
        residual = (x - pivot - mean) / unit
        squares += tl.where(n > 0.0, n * residual * residual, 0.0)
    bessel = tl.where(count > 1.0, count - 1.0, 1.0)
    tl.store(scalars_ptr + BATCH_MEAN_SLOT, mean)
    tl.store(scalars_ptr + BATCH_STD_SLOT, top * tl.sqrt(tl.sum(squares, axis=0) / bessel))


@triton.jit
def _whiten_kernel(values_ptr, out_ptr, scalars_ptr, B, BLOCK: tl.constexpr):
    """A = (v − v₀ − μ)/√(σ² + ε), μ and σ from _batch_moments_kernel (verl's masked_whiten)."""
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = i < B
    pivot = tl.load(values_ptr).to(tl.float64)
    mean = tl.load(scalars_ptr + BATCH_MEAN_SLOT)
    root = _hypot(tl.load(scalars_ptr + BATCH_STD_SLOT), tl.sqrt(tl.load(scalars_ptr + EPS_SLOT)))
    x = tl.load(values_ptr + i, mask=mask, other=0.0).to(tl.float64)
    tl.store(out_ptr + i, (x - pivot - mean) * _reciprocal(root), mask=mask)


@triton.jit
def _difference_kernel(rewards_ptr, baselines_ptr, out_ptr, B, BLOCK: tl.constexpr):
    """remax: A = R − b, subtracted in float64 (exact to the output's rounding)."""
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = i < B
    r = tl.load(rewards_ptr + i, mask=mask, other=0.0).to(tl.float64)
    b = tl.load(baselines_ptr + i, mask=mask, other=0.0).to(tl.float64)
    tl.store(out_ptr + i, r - b, mask=mask)


# --- launch helper ----------------------------------------------------------------------------------------


def _block(max_group_size: Optional[int], cap: int) -> int:
    """Block of a group program; without a known largest group (no host read of the sizes), the cap."""
    if max_group_size is None:
        return cap
    return max(16, min(cap, triton.next_power_of_2(max(1, max_group_size))))


def group_advantages(
    rewards: torch.Tensor, offsets: Optional[torch.Tensor], *, mode: str, eps: float,
    max_group_size: Optional[int], verl_singleton: bool = False, lengths: Optional[torch.Tensor] = None,
    baselines: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Advantages [B] of ``rewards`` [B] (contiguous) split at ``offsets`` [num_groups + 1] (int64, same
    device, 0 = offsets[0] ≤ … ≤ offsets[-1] = B; None for the modes without groups, reinforce_plus_plus and
    remax).

    ``mode`` is one of docs/math.md §2's modes, checked by the caller like every other argument.
    ``lengths`` [B] (integer or floating, contiguous) are the completions' token counts of opo and the
    reinforce_plus_plus modes; ``baselines`` [B] are remax's baseline rewards; ``verl_singleton`` gives a
    group of one verl's mean 0 and std 1. ``max_group_size`` only sizes the blocks (None: the cap, when the
    sizes were not read on the host). Returns float32 (float64 for float64 rewards). Never reads a device
    value on the host.
    """
    out_dtype = torch.float64 if rewards.dtype == torch.float64 else torch.float32
    tl_compute = tl.float64 if rewards.dtype == torch.float64 else tl.float32
    device = rewards.device
    B = rewards.shape[0]
    out = torch.empty((B,), dtype=out_dtype, device=device)
    if B == 0:
        return out
    scalars = torch.zeros((NUM_SLOTS,), dtype=torch.float64, device=device)
    scalars[EPS_SLOT.value] = eps
    elementwise = (triton.cdiv(B, BATCH_BLOCK),)
    if mode == "remax":
        _difference_kernel[elementwise](rewards, baselines, out, B, BLOCK=BATCH_BLOCK)
        return out
    if mode == "reinforce_plus_plus":
        _batch_moments_kernel[(1,)](rewards, lengths, scalars, B, WEIGHTED=True, BLOCK=BATCH_BLOCK)
        _whiten_kernel[elementwise](rewards, out, scalars, B, BLOCK=BATCH_BLOCK)
        return out
    num_groups = offsets.shape[0] - 1
    if num_groups == 0:
        return out
    if mode == "batch_std":
        _batch_moments_kernel[(1,)](rewards, rewards, scalars, B, WEIGHTED=False, BLOCK=BATCH_BLOCK)
    if mode == "gpg":  # α = B / max(#{R ≠ 0}, 1), on the device
        scalars[ALPHA_SLOT.value] = B / torch.count_nonzero(rewards).clamp(min=1).to(torch.float64)
    if mode in ORDER_MODES:
        cap = ORDER_BLOCK_MAX_CUDA if device.type == "cuda" else ORDER_BLOCK_MAX_INTERPRETER
    else:
        cap = MEAN_BLOCK_MAX
    # reinforce_plus_plus_baseline: the group residuals go to a float64 scratch, then are whitened.
    target = torch.empty((B,), dtype=torch.float64, device=device) if mode in WHITENED_MODES else out
    _group_advantages_kernel[(num_groups,)](
        rewards, lengths if mode in WEIGHTED_MODES else rewards, target, offsets, scalars, B,
        MODE=mode, VERL_SINGLETON=verl_singleton, BLOCK=_block(max_group_size, cap), COMPUTE=tl_compute,
        num_warps=4,
    )
    if mode in WHITENED_MODES:
        _batch_moments_kernel[(1,)](target, lengths, scalars, B, WEIGHTED=True, BLOCK=BATCH_BLOCK)
        _whiten_kernel[elementwise](target, out, scalars, B, BLOCK=BATCH_BLOCK)
    return out
