"""Triton kernels for group-relative advantages (MATH.md §2).

One program per group: groups are consecutive runs of the rewards delimited by ``offsets`` [num_groups + 1],
of any size and any mix of sizes, and a program loops over its group in blocks of BLOCK rewards.

- Mean-based modes (grpo, no_std, batch_std, rloo) take two or three passes: the shifted sum, the sum of
  squared residuals (grpo only), then the advantages. Every reward is first shifted by the group's first
  reward, so a group of equal rewards has residuals of exactly 0 and gives exactly 0 (not rounding noise
  divided by ε), and large offsets shared by a group cost no precision.
- Order-based modes (median, median_mad, rank_gaussian) need each reward's place in the group's sorted
  order. A program finds it by counting over [BLOCK, BLOCK] tiles, O(G²) comparisons, exact for any size:
  reward i holds the sorted positions [#{j: R_j < R_i}, #{j: R_j ≤ R_i}); its mean rank (ties share theirs)
  is the middle of that range and the k-th order statistic is the reward whose range contains k.
- batch_std first runs a one-program kernel for the unbiased std of the whole batch.

Floating-point scalars (ε, σ_batch) travel in a small tensor at the compute precision, because float
kernel arguments and bare float literals are float32 in compiled Triton; rewards are read in their own
dtype and computed in float32 (float64 for float64 rewards).

This module imports nothing from rlloss: it takes tensors and returns tensors.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

ORDER_MODES = ("median", "median_mad", "rank_gaussian")

# Slots of the scalar tensor handed to the kernels.
EPS_SLOT = tl.constexpr(0)
BATCH_STD_SLOT = tl.constexpr(1)

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


# --- per-group passes -------------------------------------------------------------------------------------


@triton.jit
def _load_values(rewards_ptr, idx, mask, center, ABS_DEVIATION: tl.constexpr, COMPUTE: tl.constexpr):
    """Rewards at idx in the compute dtype, or their absolute deviations |R − center|."""
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
def _mean_modes(rewards_ptr, out_ptr, begin, end, eps, batch_std,
                MODE: tl.constexpr, BLOCK: tl.constexpr, COMPUTE: tl.constexpr):
    """grpo, no_std, batch_std, rloo: A = (R − μ_g)·scale, residuals taken from the group's first reward."""
    lanes = tl.arange(0, BLOCK)
    pivot = tl.load(rewards_ptr + begin).to(COMPUTE)
    total = tl.zeros((BLOCK,), dtype=COMPUTE)
    for i0 in range(begin, end, BLOCK):
        i = i0 + lanes
        mask = i < end
        x = tl.load(rewards_ptr + i, mask=mask, other=0.0).to(COMPUTE)
        total += tl.where(mask, x - pivot, 0.0)
    n = (end - begin).to(COMPUTE)
    mean = tl.sum(total, axis=0) / n  # mean of the shifted rewards: μ_g − pivot
    bessel = tl.maximum(n - 1.0, 1.0)  # a singleton's residual is 0: any finite scale gives 0
    scale = tl.full((), 1.0, COMPUTE)
    if MODE == "grpo":
        squares = tl.zeros((BLOCK,), dtype=COMPUTE)
        for i0 in range(begin, end, BLOCK):
            i = i0 + lanes
            mask = i < end
            x = tl.load(rewards_ptr + i, mask=mask, other=0.0).to(COMPUTE)
            residual = tl.where(mask, x - pivot - mean, 0.0)
            squares += residual * residual
        denom = tl.sqrt(tl.sum(squares, axis=0) / bessel) + eps
        scale = tl.where(denom > 0.0, 1.0 / tl.where(denom > 0.0, denom, 1.0), 0.0)
    elif MODE == "batch_std":
        denom = batch_std + eps
        scale = tl.where(denom > 0.0, 1.0 / tl.where(denom > 0.0, denom, 1.0), 0.0)
    elif MODE == "rloo":
        scale = n / bessel
    for i0 in range(begin, end, BLOCK):
        i = i0 + lanes
        mask = i < end
        x = tl.load(rewards_ptr + i, mask=mask, other=0.0).to(COMPUTE)
        tl.store(out_ptr + i, (x - pivot - mean) * scale, mask=mask)


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
    scale = tl.full((), 1.0, COMPUTE)
    if SCALE_BY_MAD:
        denom = _order_statistic(rewards_ptr, begin, end, k, median, True, BLOCK, COMPUTE) + eps
        scale = tl.where(denom > 0.0, 1.0 / tl.where(denom > 0.0, denom, 1.0), 0.0)
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


@triton.jit
def _group_advantages_kernel(rewards_ptr, out_ptr, offsets_ptr, scalars_ptr,
                             MODE: tl.constexpr, BLOCK: tl.constexpr, COMPUTE: tl.constexpr):
    group = tl.program_id(0)
    begin = tl.load(offsets_ptr + group)
    end = tl.load(offsets_ptr + group + 1)
    eps = tl.load(scalars_ptr + EPS_SLOT)
    if MODE == "rank_gaussian":
        _rank_gaussian(rewards_ptr, out_ptr, begin, end, BLOCK, COMPUTE)
    elif MODE == "median":
        _median_modes(rewards_ptr, out_ptr, begin, end, eps, False, BLOCK, COMPUTE)
    elif MODE == "median_mad":
        _median_modes(rewards_ptr, out_ptr, begin, end, eps, True, BLOCK, COMPUTE)
    else:
        batch_std = tl.load(scalars_ptr + BATCH_STD_SLOT)
        _mean_modes(rewards_ptr, out_ptr, begin, end, eps, batch_std, MODE, BLOCK, COMPUTE)


@triton.jit
def _batch_std_kernel(rewards_ptr, scalars_ptr, B, BLOCK: tl.constexpr, COMPUTE: tl.constexpr):
    """σ_batch: the unbiased std of all B rewards (0 when B = 1), written to its slot of scalars_ptr."""
    lanes = tl.arange(0, BLOCK)
    pivot = tl.load(rewards_ptr).to(COMPUTE)
    total = tl.zeros((BLOCK,), dtype=COMPUTE)
    count = tl.zeros((BLOCK,), dtype=tl.int32)  # B is counted, not cast: B = 1 may arrive as a constexpr
    for i0 in range(0, B, BLOCK):
        i = i0 + lanes
        mask = i < B
        x = tl.load(rewards_ptr + i, mask=mask, other=0.0).to(COMPUTE)
        total += tl.where(mask, x - pivot, 0.0)
        count += mask.to(tl.int32)
    n = tl.sum(count, axis=0).to(COMPUTE)
    mean = tl.sum(total, axis=0) / n
    squares = tl.zeros((BLOCK,), dtype=COMPUTE)
    for i0 in range(0, B, BLOCK):
        i = i0 + lanes
        mask = i < B
        x = tl.load(rewards_ptr + i, mask=mask, other=0.0).to(COMPUTE)
        residual = tl.where(mask, x - pivot - mean, 0.0)
        squares += residual * residual
    std = tl.sqrt(tl.sum(squares, axis=0) / tl.maximum(n - 1.0, 1.0))
    tl.store(scalars_ptr + BATCH_STD_SLOT, std)


# --- launch helper ----------------------------------------------------------------------------------------


def _block(max_group_size: int, cap: int) -> int:
    return max(16, min(cap, triton.next_power_of_2(max(1, max_group_size))))


def group_advantages(
    rewards: torch.Tensor, offsets: torch.Tensor, *, mode: str, eps: float, max_group_size: int
) -> torch.Tensor:
    """Advantages [B] of ``rewards`` [B] (contiguous) split at ``offsets`` [num_groups + 1] (int64, same
    device, 0 = offsets[0] < offsets[1] < … < offsets[-1] = B).

    ``mode`` is one of grpo, no_std, batch_std, rloo, median, median_mad, rank_gaussian (MATH.md §2),
    checked by the caller, like every other argument. Returns float32 (float64 for float64 rewards).
    ``max_group_size`` only sizes the blocks.
    """
    compute = torch.float64 if rewards.dtype == torch.float64 else torch.float32
    tl_compute = tl.float64 if compute == torch.float64 else tl.float32
    B = rewards.shape[0]
    num_groups = offsets.shape[0] - 1
    out = torch.empty((B,), dtype=compute, device=rewards.device)
    if num_groups == 0:
        return out
    scalars = torch.zeros((2,), dtype=compute, device=rewards.device)
    scalars[EPS_SLOT.value] = eps
    if mode == "batch_std":
        _batch_std_kernel[(1,)](rewards, scalars, B, BLOCK=BATCH_BLOCK, COMPUTE=tl_compute)
    if mode in ORDER_MODES:
        cap = ORDER_BLOCK_MAX_CUDA if rewards.device.type == "cuda" else ORDER_BLOCK_MAX_INTERPRETER
    else:
        cap = MEAN_BLOCK_MAX
    _group_advantages_kernel[(num_groups,)](
        rewards, out, offsets, scalars, MODE=mode, BLOCK=_block(max_group_size, cap), COMPUTE=tl_compute,
        num_warps=4,
    )
    return out
