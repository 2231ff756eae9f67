"""The mode and statistic tables of rlloss, and the numeric bounds that kernels and torch formulas share.

The kernels own these tables; the API layer (``rlloss.config``, ``rlloss.policy``, ``rlloss.credit``,
``rlloss.teacher``) imports them, so every tuple is written once. Each ``KERNEL_*`` tuple is the part of its
table that ``kernels/policy.py`` implements, in the order of the kernel's constexpr index (a kernel mode is
``KERNEL_*.index(name)``); the rest run on the torch formulas.

This module imports neither Triton nor torch: ``import rlloss`` and the torch backend use it where Triton
cannot be imported.
"""
from __future__ import annotations

# --- policy loss (docs/math.md §3–§6) -------------------------------------------------------------------

KERNEL_LOSS_MODES = ("ppo_clip", "cispo_trl", "cispo_verl", "gpg", "sapo")
LOSS_MODES = KERNEL_LOSS_MODES + ("geo_mean", "clip_cov", "kl_cov", "dppo_tv", "dppo_kl", "dro", "vespo")
KERNEL_KL_ESTIMATORS = ("k1", "abs", "k2", "k3", "k3+")
KL_ESTIMATORS = KERNEL_KL_ESTIMATORS + ("k1+", "abs+")  # verl's straight-through k1 / abs: torch only
IS_LEVELS = ("token", "sequence", "sequence_token")
# Contrastive-teacher credit (docs/math.md §7); the kernel's CREDIT index is into (None,) + CREDIT_MODES.
CREDIT_MODES = ("cepo", "rlsd")

# Column order of the per-row statistics of the policy loss, the kernel's and the torch backend's: each is a
# sum over the row's live tokens unless noted.
STAT_NAMES = (
    "loss",            # Σ_t c_t·L_t, the row's share of the scalar loss
    "tokens",          # n_i
    "clip_low",        # ρ < lower bound and A < 0
    "clip_high",       # ρ > upper bound and A > 0
    "clip_dual",       # the dual-clip cap −c·A is active (A < 0)
    "ratio",           # ρ
    "ppo_kl",          # ℓ° − ℓ
    "kl",              # the KL term as it enters the loss (times ρ when kl_ratio_weighted)
    "entropy",         # H
    "is_sum",          # rollout weight w: over live tokens, or w_i once per row for sequence modes
    "is_count",        # how many weights is_sum holds
    "is_min",          # min of w (+inf when none)
    "is_max",          # max of w (−inf when none)
    "logp_diff_sum",   # |ℓ° − ℓˢ|
    "logp_diff_max",   # max |ℓ° − ℓˢ| (0 when none)
)
NUM_STATS = len(STAT_NAMES)

# --- verl's numerical guards ------------------------------------------------------------------------------

# A log-ratio clamped before exp: core_algos' clamp(log π − log π°, −20, 20), and low_var_kl's clamp of
# x = ℓʳ − ℓ to ±20 before e^x − x − 1.
VERL_LOG_RATIO_CLAMP = 20.0
# low_var_kl's clamp of the k3 value to ±10.
VERL_KL_VALUE_CLAMP = 10.0

__all__ = ["LOSS_MODES", "KERNEL_LOSS_MODES", "KL_ESTIMATORS", "KERNEL_KL_ESTIMATORS", "IS_LEVELS",
           "CREDIT_MODES", "STAT_NAMES", "NUM_STATS", "VERL_LOG_RATIO_CLAMP", "VERL_KL_VALUE_CLAMP"]
