"""Triton kernel for the policy loss (docs/math.md §3–§6): value, per-token gradients and metric partial sums in
one launch, one program per sequence.

Each program owns one row (sequence) i and walks its T tokens in blocks of BLOCK_T:

    pass 1  row reductions, only when needed: n_i = Σ m, Σ m·(ℓ − ℓ°) for the GSPO ratio s_i and
            Σ m·(ℓ° − ℓˢ) for a sequence-level rollout weight;
    pass 2  per token: the advantage (times the contrastive-teacher credit of docs/math.md §7 when on), ratio ρ,
            policy term, rollout weight, KL and entropy terms, the aggregation weight
            c_it = m_it/D (/ max(n_i, 1) for seq_mean_token_mean), the loss contribution c·L and the gradients
            d(loss)/dℓ and d(loss)/dH written to [B, T] buffers; per-row partial sums of the loss and of every
            metric written to a [B, NUM_STATS] buffer;
    pass 3  only for the pure sequence ratio (GSPO), whose gradient reaches every token through s_i:
            dℓ_t += (m_t/n_i)·s_i·Σ_t' c_t'·∂L_t'/∂ρ.

The global normaliser D (token_mean's N, the seq-means' B, B·L_norm) is read from a device scalar, so the
gradients come out already scaled and the caller's final loss is a plain sum over rows: deterministic, no
atomics. Masked tokens are never loaded (they read as 0), so whatever they hold never reaches an output, and
their gradient is exactly 0.

NaN contract (as the torch twin in rlloss/policy.py): NaN in a counted input reaches the loss, that token's
gradient and the metrics it feeds. So every min/max/clamp here propagates NaN (Triton's default drops it), the
gradient of a clamp is cut with the *outside* predicate ((x < lo) | (x > hi), false for NaN), and a switched-off
term (β = 0, entropy_coef = 0) is selected away, never multiplied by 0 (0·inf and 0·NaN are NaN).

This module imports nothing from rlloss: it takes tensors and returns tensors.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import triton
import triton.language as tl

from .credit import _row_major, credit_advantage, log_weight_bounds
from .tables import (CREDIT_MODES, IS_LEVELS, KERNEL_KL_ESTIMATORS, KERNEL_LOSS_MODES, NUM_STATS, STAT_NAMES,  # noqa: F401
                     VERL_KL_VALUE_CLAMP, VERL_LOG_RATIO_CLAMP)

# The kernel's modes are indices into the tables' KERNEL_* tuples (credit: into (None,) + CREDIT_MODES).
_CREDIT = (None,) + CREDIT_MODES
# verl's low_var_kl bounds as constexpr globals, the form a @triton.jit function reads a module constant in.
_KL_X_CLAMP = tl.constexpr(VERL_LOG_RATIO_CLAMP)
_KL_VALUE_CLAMP = tl.constexpr(VERL_KL_VALUE_CLAMP)

# Largest block of tokens one program holds at once (tests lower it to exercise the block loop).
MAX_BLOCK_T = 1024
MIN_BLOCK_T = 16


@triton.jit
def _min(a, b):
    return tl.minimum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _max(a, b):
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _clamp(x, lo, hi):
    return _min(_max(x, lo), hi)


@triton.jit
def _min_over(x):
    """Minimum of a block, NaN if any entry is NaN (tl.min drops NaN), as torch.amin."""
    return tl.reduce(x, 0, _min)


@triton.jit
def _max_over(x):
    return tl.reduce(x, 0, _max)


@triton.jit
def _policy_term(rho, logp, adv, eps_low, eps_high, delta, dual_c, tau_pos, tau_neg,
                 LOSS_MODE: tl.constexpr, HAS_DELTA: tl.constexpr, HAS_DUAL: tl.constexpr):
    """Per-token policy term P (docs/math.md §4) of one block and its derivatives.

    Returns (P, ∂P/∂ρ, ∂P/∂ℓ through ℓ itself, dual-clip active). Clamps pass the gradient on the closed
    interval, as torch.clamp does; NaN counts as inside, so it reaches the gradient.
    """
    zero = tl.zeros_like(rho)
    dual = zero != 0.0
    d_rho = zero
    d_logp = zero
    if LOSS_MODE == 0:  # ppo_clip: −min(ρ̃·A, clip(ρ, 1−ε_lo, 1+ε_hi)·A), ρ̃ = min(ρ, δ)
        unclipped = rho
        d_unclipped = zero + 1.0
        if HAS_DELTA:
            unclipped = _min(rho, delta)
            d_unclipped = tl.where(rho > delta, 0.0, 1.0)
        lo = 1.0 - eps_low
        hi = 1.0 + eps_high
        clipped = _clamp(rho, lo, hi)
        d_clipped = tl.where((rho < lo) | (rho > hi), 0.0, 1.0)
        surr1 = unclipped * adv
        surr2 = clipped * adv
        take1 = surr1 <= surr2
        P = -tl.where(take1, surr1, surr2)
        d_rho = -adv * tl.where(take1, d_unclipped, d_clipped)
        if HAS_DUAL:  # verl dual clip: for A < 0 the loss is capped at −c·A
            cap = -dual_c * adv
            dual = (adv < 0.0) & (P > cap)
            P = tl.where(dual, cap, P)
            d_rho = tl.where(dual, 0.0, d_rho)
    elif LOSS_MODE <= 3:  # −sg(w)·A·ℓ: cispo (TRL) w = min(ρ, ε_hi), cispo (verl) clip(ρ, 1−ε_lo, 1+ε_hi), gpg 1
        weight = zero + 1.0
        if LOSS_MODE == 1:
            weight = _min(rho, eps_high)
        elif LOSS_MODE == 2:
            weight = _clamp(rho, 1.0 - eps_low, 1.0 + eps_high)
        d_logp = -weight * adv
        P = d_logp * logp
    else:  # sapo: −(4/τ)·σ(τ(ρ−1))·A, τ = τ_pos if A > 0 else τ_neg
        tau = tl.where(adv > 0.0, tau_pos, tau_neg)
        gate = 1.0 / (1.0 + tl.exp(-tau * (rho - 1.0)))
        P = -(4.0 / tau) * gate * adv
        d_rho = -4.0 * gate * (1.0 - gate) * adv
    return P, d_rho, d_logp, dual


@triton.jit
def _k3_value(x, e):
    """e^x − x − 1 without cancellation, as rlloss.policy.k3_value: its Taylor series for |x| < 1/2 (error
    below x⁹/9!, a float32 ulp; e − x − 1 loses ~1e-4 relative at x ~ 1e-2 in float32), the direct form
    elsewhere (NaN takes the direct form and stays NaN)."""
    series = x * x * (0.5 + x * ((1.0 / 6.0) + x * ((1.0 / 24.0) + x * ((1.0 / 120.0) + x * (
        (1.0 / 720.0) + x * ((1.0 / 5040.0) + x / 40320.0))))))
    return tl.where(tl.abs(x) < 0.5, series, e - x - 1.0)


@triton.jit
def _kl_term(x, KL_ESTIMATOR: tl.constexpr, KL_CLAMP: tl.constexpr):
    """(KL_t, ∂KL_t/∂ℓ) for x = ℓʳ − ℓ (docs/math.md §4): k1, abs, k2, k3, k3+ (value of k3, gradient of k2)."""
    if KL_ESTIMATOR == 0:
        K = -x
        dK = tl.zeros_like(x) + 1.0
    elif KL_ESTIMATOR == 1:
        K = tl.abs(x)
        dK = tl.where(x > 0.0, -1.0, tl.where(x < 0.0, 1.0, 0.0 * x))  # −sign(x): NaN stays NaN
    elif KL_ESTIMATOR == 2:
        K = 0.5 * x * x
        dK = -x
    else:
        if KL_CLAMP:  # verl: x clamped to ±20 before exp, the value to ±10
            xc = _clamp(x, -_KL_X_CLAMP, _KL_X_CLAMP)
            e = tl.exp(xc)
            K = _k3_value(xc, e)
            dK = tl.where((x < -_KL_X_CLAMP) | (x > _KL_X_CLAMP), 0.0, 1.0 - e)
            dK = tl.where((K < -_KL_VALUE_CLAMP) | (K > _KL_VALUE_CLAMP), 0.0, dK)
            K = _clamp(K, -_KL_VALUE_CLAMP, _KL_VALUE_CLAMP)
        else:
            e = tl.exp(x)
            K = _k3_value(x, e)
            dK = 1.0 - e
        if KL_ESTIMATOR == 4:  # k3+: straight-through, gradient of k2
            dK = -x
    return K, dK


@triton.jit
def _rollout_weight(w, rollout_min, rollout_max, TRUNCATE: tl.constexpr):
    """Truncate: clamp(w, C_min, C_max); mask: w where C_min ≤ w ≤ C_max, else 0 (w may be inf)."""
    if TRUNCATE:
        w = _clamp(w, rollout_min, rollout_max)
    else:
        w = tl.where((w >= rollout_min) & (w <= rollout_max), w, 0.0)
    return w


@triton.jit
def _row_block(live_row, logp_row, old_row, t, T, HAS_OLD: tl.constexpr):
    """(in bounds, live, ℓ, ℓ°) at the tokens t of one row; ℓ° is ℓ without old log-probs (on-policy)."""
    inb = t < T
    live = inb & (tl.load(live_row + t, mask=inb, other=0) != 0)
    logp = tl.load(logp_row + t, mask=live, other=0.0).to(tl.float32)
    old = logp
    if HAS_OLD:
        old = tl.load(old_row + t, mask=live, other=0.0).to(tl.float32)
    return inb, live, logp, old


@triton.jit
def _policy_loss_kernel(
    logp_ptr, old_ptr, adv_ptr, live_ptr, ref_ptr, roll_ptr, ent_ptr, pos_ptr, neg_ptr,
    grad_logp_ptr, grad_ent_ptr, stats_ptr, norm_ptr,
    T, stride_logp, stride_old, stride_adv, stride_live, stride_ref, stride_roll, stride_ent, stride_pos,
    stride_neg,
    eps_low: tl.float32, eps_high: tl.float32, delta: tl.float32, dual_c: tl.float32, tau_pos: tl.float32,
    tau_neg: tl.float32, log_ratio_min: tl.float32, log_ratio_max: tl.float32, beta: tl.float32,
    entropy_coef: tl.float32, rollout_min: tl.float32, rollout_max: tl.float32, clip_metric_low: tl.float32,
    clip_metric_high: tl.float32, credit_lambda: tl.float32, log_w_low: tl.float32, log_w_high: tl.float32,
    LOSS_MODE: tl.constexpr, CREDIT: tl.constexpr, IS_LEVEL: tl.constexpr, HAS_OLD: tl.constexpr, ADV_PER_TOKEN: tl.constexpr,
    HAS_DELTA: tl.constexpr, HAS_DUAL: tl.constexpr, HAS_REF: tl.constexpr, KL_ESTIMATOR: tl.constexpr,
    KL_WEIGHTED: tl.constexpr, KL_CLAMP: tl.constexpr, HAS_ENTROPY: tl.constexpr, WRITE_GRAD_ENT: tl.constexpr,
    HAS_ROLLOUT: tl.constexpr, TOKEN_ROLLOUT: tl.constexpr, SEQ_ROLLOUT: tl.constexpr, TRUNCATE: tl.constexpr,
    PER_SEQUENCE_MEAN: tl.constexpr, ROW_PASS: tl.constexpr, N_STATS: tl.constexpr, BLOCK_T: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_T)
    logp_row = logp_ptr + row * stride_logp
    old_row = old_ptr + row * stride_old
    adv_row = adv_ptr + row * stride_adv
    live_row = live_ptr + row * stride_live
    ref_row = ref_ptr + row * stride_ref
    roll_row = roll_ptr + row * stride_roll
    ent_row = ent_ptr + row * stride_ent
    pos_row = pos_ptr + row * stride_pos
    neg_row = neg_ptr + row * stride_neg
    grad_row = grad_logp_ptr + row * T
    grad_ent_row = grad_ent_ptr + row * T

    # pass 1: n_i, Σ m·(ℓ − ℓ°) and Σ m·(ℓ° − ℓˢ)
    n_acc = tl.zeros((BLOCK_T,), dtype=tl.float32)
    u_acc = tl.zeros((BLOCK_T,), dtype=tl.float32)
    d_acc = tl.zeros((BLOCK_T,), dtype=tl.float32)
    if ROW_PASS:
        for t0 in range(0, T, BLOCK_T):
            t = t0 + offs
            inb, live, logp, old = _row_block(live_row, logp_row, old_row, t, T, HAS_OLD)
            n_acc += tl.where(live, 1.0, 0.0)
            u_acc += logp - old
            if SEQ_ROLLOUT:
                d_acc += old - tl.load(roll_row + t, mask=live, other=0.0).to(tl.float32)
    n_safe = tl.maximum(tl.sum(n_acc, axis=0), 1.0)

    # per-row scalars: GSPO ratio s_i = exp(clamp(Σ m(ℓ−ℓ°)/n_i)), sequence rollout weight, aggregation weight
    log_s = tl.sum(u_acc, axis=0) / n_safe
    s = tl.exp(_clamp(log_s, log_ratio_min, log_ratio_max))
    ds = tl.where((log_s < log_ratio_min) | (log_s > log_ratio_max), 0.0, s)
    w_row = tl.exp(tl.sum(d_acc, axis=0))
    if SEQ_ROLLOUT:
        w_row = _rollout_weight(w_row, rollout_min, rollout_max, TRUNCATE)
    row_weight = 1.0 / tl.load(norm_ptr).to(tl.float32)
    if PER_SEQUENCE_MEAN:
        row_weight = row_weight / n_safe
    adv_scalar = 0.0
    if not ADV_PER_TOKEN:
        adv_scalar = tl.load(adv_row).to(tl.float32)

    # pass 2: per-token loss, gradients and metric sums
    zeros = tl.zeros((BLOCK_T,), dtype=tl.float32)
    loss_acc = zeros
    tok_acc = zeros
    low_acc = zeros
    high_acc = zeros
    dual_acc = zeros
    ratio_acc = zeros
    pkl_acc = zeros
    kl_acc = zeros
    ent_acc = zeros
    is_acc = zeros
    is_cnt = zeros
    is_min = zeros + float("inf")
    is_max = zeros - float("inf")
    ld_acc = zeros
    ld_max = zeros
    seq_acc = zeros  # Σ c·∂L/∂ρ, for the pure sequence ratio
    for t0 in range(0, T, BLOCK_T):
        t = t0 + offs
        inb, live, logp, old = _row_block(live_row, logp_row, old_row, t, T, HAS_OLD)
        if ADV_PER_TOKEN:
            adv = tl.load(adv_row + t, mask=live, other=0.0).to(tl.float32)
        else:
            adv = tl.where(live, adv_scalar, 0.0)
        if CREDIT != 0:  # docs/math.md §7: Â = A·((1−λ) + λ·w), Δ = ℓ⁺ − ℓ⁻ (CEPO) or ℓ⁺ − ℓ° (RLSD), no gradient
            pos = tl.load(pos_row + t, mask=live, other=0.0).to(tl.float32)
            if CREDIT == 1:
                base = tl.load(neg_row + t, mask=live, other=0.0).to(tl.float32)
            else:
                base = old
            adv = credit_advantage(adv, pos - base, credit_lambda, log_w_low, log_w_high)
        u = logp - old

        # ratio ρ and dρ/dℓ_t along the token's own path (docs/math.md §3)
        if IS_LEVEL == 0:
            rho = tl.exp(_clamp(u, log_ratio_min, log_ratio_max))
            d_rho = tl.where((u < log_ratio_min) | (u > log_ratio_max), 0.0, rho)
        else:  # s_i; for "sequence_token" log ρ_t = ℓ_t − sg(ℓ_t) + sg(log s_i) gives dρ_t/dℓ_t = s_i
            rho = zeros + s
            d_rho = zeros + ds

        P, dP_drho, dP_dlogp, dual = _policy_term(
            rho, logp, adv, eps_low, eps_high, delta, dual_c, tau_pos, tau_neg, LOSS_MODE, HAS_DELTA, HAS_DUAL
        )

        # rollout correction (docs/math.md §5): a detached weight on the policy term only
        w = zeros + 1.0
        if HAS_ROLLOUT:
            d = tl.where(live, old - tl.load(roll_row + t, mask=live, other=0.0).to(tl.float32), 0.0)
            ld_acc += tl.abs(d)
            ld_max = _max(ld_max, tl.abs(d))
            if TOKEN_ROLLOUT:
                w = _rollout_weight(tl.exp(d), rollout_min, rollout_max, TRUNCATE)
                is_acc += tl.where(live, w, 0.0)
                is_cnt += tl.where(live, 1.0, 0.0)
                is_min = _min(is_min, tl.where(live, w, float("inf")))
                is_max = _max(is_max, tl.where(live, w, -float("inf")))
        if SEQ_ROLLOUT:
            w = zeros + w_row
        loss_t = w * P
        direct = w * dP_dlogp
        via_ratio = w * dP_drho

        if HAS_REF:  # + β·KL_t (times ρ when kl_ratio_weighted); β = 0 feeds the kl metric only
            ref = tl.load(ref_row + t, mask=live, other=0.0).to(tl.float32)
            K, dK = _kl_term(ref - logp, KL_ESTIMATOR, KL_CLAMP)
            kl_on = beta != 0.0
            if KL_WEIGHTED:
                direct += tl.where(kl_on, beta * dK * rho, 0.0)
                via_ratio += tl.where(kl_on, beta * K, 0.0)
                K = K * rho
            else:
                direct += tl.where(kl_on, beta * dK, 0.0)
            loss_t += tl.where(kl_on, beta * K, 0.0)
            kl_acc += tl.where(live, K, 0.0)
        if HAS_ENTROPY:  # − c_H·H_t; a zero coefficient never reads the entropy into the loss
            ent = tl.load(ent_row + t, mask=live, other=0.0).to(tl.float32)
            loss_t -= tl.where(entropy_coef != 0.0, entropy_coef * ent, 0.0)
            ent_acc += ent

        # masked tokens are selected away, not multiplied by c = 0: a NaN/inf sequence ratio or rollout weight
        # of the row (from a counted token) must not reach them
        coef = tl.where(live, row_weight, 0.0)
        loss_acc += tl.where(live, coef * loss_t, 0.0)
        if IS_LEVEL == 1:
            grad = coef * direct
            seq_acc += tl.where(live, coef * via_ratio, 0.0)
        else:
            grad = coef * (direct + via_ratio * d_rho)
        tl.store(grad_row + t, tl.where(live, grad, 0.0), mask=inb)
        if WRITE_GRAD_ENT:
            tl.store(grad_ent_row + t, -entropy_coef * coef, mask=inb)

        tok_acc += tl.where(live, 1.0, 0.0)
        low_acc += tl.where(live & (rho < clip_metric_low) & (adv < 0.0), 1.0, 0.0)
        high_acc += tl.where(live & (rho > clip_metric_high) & (adv > 0.0), 1.0, 0.0)
        dual_acc += tl.where(live & dual, 1.0, 0.0)
        ratio_acc += tl.where(live, rho, 0.0)
        pkl_acc -= u

    # pass 3 (pure sequence ratio): every token of the row gets (m_t/n_i)·s_i·Σ c·∂L/∂ρ
    if IS_LEVEL == 1:
        tl.debug_barrier()  # pass 3 re-reads the gradients pass 2 wrote
        seq_grad = tl.sum(seq_acc, axis=0) * ds / n_safe
        for t0 in range(0, T, BLOCK_T):
            t = t0 + offs
            inb = t < T
            live = inb & (tl.load(live_row + t, mask=inb, other=0) != 0)
            grad = tl.load(grad_row + t, mask=inb, other=0.0)
            tl.store(grad_row + t, grad + tl.where(live, seq_grad, 0.0), mask=inb)

    if SEQ_ROLLOUT:
        is_acc = tl.where(offs == 0, w_row, 0.0)
        is_cnt = tl.where(offs == 0, 1.0, 0.0)
        is_min = zeros + w_row
        is_max = zeros + w_row
    out = stats_ptr + row * N_STATS  # columns in STAT_NAMES order
    tl.store(out + 0, tl.sum(loss_acc, axis=0))
    tl.store(out + 1, tl.sum(tok_acc, axis=0))
    tl.store(out + 2, tl.sum(low_acc, axis=0))
    tl.store(out + 3, tl.sum(high_acc, axis=0))
    tl.store(out + 4, tl.sum(dual_acc, axis=0))
    tl.store(out + 5, tl.sum(ratio_acc, axis=0))
    tl.store(out + 6, tl.sum(pkl_acc, axis=0))
    tl.store(out + 7, tl.sum(kl_acc, axis=0))
    tl.store(out + 8, tl.sum(ent_acc, axis=0))
    tl.store(out + 9, tl.sum(is_acc, axis=0))
    tl.store(out + 10, tl.sum(is_cnt, axis=0))
    tl.store(out + 11, _min_over(is_min))
    tl.store(out + 12, _max_over(is_max))
    tl.store(out + 13, tl.sum(ld_acc, axis=0))
    tl.store(out + 14, _max_over(ld_max))


def _bound(x: Optional[float], default: float) -> float:
    return default if x is None else float(x)


def kernel_constexprs(config, *, has_old: bool, adv_per_token: bool, has_ref: bool, has_entropy: bool,
                      has_rollout: bool, block_t: int) -> dict:
    """The constexprs of ``_policy_loss_kernel`` for one launch of :func:`policy_loss_rows` (the config's modes
    and which inputs are given); tests/compile_kernels.py compiles its variants from the same mapping."""
    rollout = config.rollout_correction
    token_rollout = rollout in ("token_truncate", "token_mask")
    seq_rollout = rollout in ("sequence_truncate", "sequence_mask")
    per_sequence_mean = config.aggregation == "seq_mean_token_mean"
    return dict(
        LOSS_MODE=KERNEL_LOSS_MODES.index(config.loss_mode), CREDIT=_CREDIT.index(config.credit),
        IS_LEVEL=IS_LEVELS.index(config.importance_sampling_level), HAS_OLD=bool(has_old),
        ADV_PER_TOKEN=bool(adv_per_token), HAS_DELTA=config.delta is not None, HAS_DUAL=config.dual_clip is not None,
        HAS_REF=bool(has_ref), KL_ESTIMATOR=KERNEL_KL_ESTIMATORS.index(config.kl_estimator),
        KL_WEIGHTED=bool(config.kl_ratio_weighted), KL_CLAMP=bool(config.kl_clamp), HAS_ENTROPY=bool(has_entropy),
        WRITE_GRAD_ENT=bool(has_entropy) and config.entropy_coef != 0.0, HAS_ROLLOUT=bool(has_rollout),
        TOKEN_ROLLOUT=token_rollout, SEQ_ROLLOUT=seq_rollout,
        TRUNCATE=rollout is not None and rollout.endswith("truncate"), PER_SEQUENCE_MEAN=per_sequence_mean,
        ROW_PASS=config.importance_sampling_level != "token" or seq_rollout or per_sequence_mean,
        N_STATS=NUM_STATS, BLOCK_T=block_t,
    )


def policy_loss_rows(
    config,
    logprobs: torch.Tensor,
    old_logprobs: Optional[torch.Tensor],
    advantages: torch.Tensor,
    live: torch.Tensor,
    ref_logprobs: Optional[torch.Tensor],
    rollout_logprobs: Optional[torch.Tensor],
    entropy: Optional[torch.Tensor],
    normaliser: torch.Tensor,
    clip_metric_low: float,
    clip_metric_high: float,
    pos_logprobs: Optional[torch.Tensor] = None,
    neg_logprobs: Optional[torch.Tensor] = None,
):
    """(stats [B, NUM_STATS], d(loss)/dℓ [B, T], d(loss)/dH [B, T] or None), all float32.

    config: any object with rlloss.LossConfig's attributes (the kernel's modes of kernels/tables.py, one
    aggregation). logprobs, old_logprobs, ref_logprobs, rollout_logprobs, entropy: [B, T] (any float dtype, any
    row stride; None where absent). advantages: [B] or [B, T]. live: [B, T] bool. normaliser: 1-element tensor
    holding the aggregation denominator D. clip_metric_low / high: the ratio bounds of the clip-fraction metrics.
    ``config.credit``: None, "cepo" (reads pos_logprobs and neg_logprobs) or "rlsd" (reads pos_logprobs; the
    base is old_logprobs, or logprobs when that is None). d(loss)/dH is written when entropy is given and
    ``config.entropy_coef`` ≠ 0. The loss is ``stats[:, 0].sum()``.
    """
    c = config
    write_grad_entropy = entropy is not None and c.entropy_coef != 0.0
    B, T = logprobs.shape
    device = logprobs.device
    stats = torch.empty((B, NUM_STATS), dtype=torch.float32, device=device)
    grad_logp = torch.empty((B, T), dtype=torch.float32, device=device)
    grad_ent = torch.empty((B, T), dtype=torch.float32, device=device) if write_grad_entropy else grad_logp
    if B == 0:
        return stats, grad_logp, (grad_ent if write_grad_entropy else None)
    logprobs, adv, live_u8 = _row_major(logprobs), _row_major(advantages), _row_major(live).view(torch.uint8)
    old, ref, roll, ent, pos, neg = (logprobs if x is None else _row_major(x) for x in (  # absent: never read
        old_logprobs, ref_logprobs, rollout_logprobs, entropy, pos_logprobs, neg_logprobs))
    log_w_low, log_w_high = log_weight_bounds(c.credit_eps_w)
    norm = normaliser.reshape(1).to(torch.float32)
    block = max(MIN_BLOCK_T, min(triton.next_power_of_2(max(T, 1)), MAX_BLOCK_T))
    _policy_loss_kernel[(B,)](
        logprobs, old, adv, live_u8, ref, roll, ent, pos, neg, grad_logp, grad_ent, stats, norm,
        T, logprobs.stride(0), old.stride(0), adv.stride(0),
        live_u8.stride(0), ref.stride(0), roll.stride(0), ent.stride(0), pos.stride(0), neg.stride(0),
        float(c.epsilon_low), float(c.epsilon_high), _bound(c.delta, 1.0), _bound(c.dual_clip, 1.0),
        float(c.sapo_tau_pos), float(c.sapo_tau_neg), _bound(c.log_ratio_min, -math.inf),
        _bound(c.log_ratio_max, math.inf), float(c.beta), float(c.entropy_coef), _bound(c.rollout_threshold_low, 0.0),
        float(c.rollout_threshold_high), float(clip_metric_low), float(clip_metric_high), float(c.credit_lambda),
        log_w_low, log_w_high,
        **kernel_constexprs(c, has_old=old_logprobs is not None, adv_per_token=advantages.ndim == 2,
                            has_ref=ref_logprobs is not None, has_entropy=entropy is not None,
                            has_rollout=rollout_logprobs is not None, block_t=block),
        num_warps=4,
    )
    return stats, grad_logp, (grad_ent if write_grad_entropy else None)
