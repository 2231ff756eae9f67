"""Policy losses of the GRPO family (docs/math.md §3–§6): ratios, clipped / CISPO / SAPO / GPG surrogates, KL to a
reference, entropy bonus, rollout (sampler) correction and aggregation to a scalar, with the TRL-style metrics.

The per-token math is written here once, as values (docs/design/guide.md): the torch backend takes its gradients by
autograd on the O(B·T) per-token loss and ``rlloss.reference`` runs it in float64; the Triton kernel, with its
hand-derived gradients, is ``rlloss.kernels.policy``.
"""
from __future__ import annotations

import contextlib
import math
from typing import Dict, List, NamedTuple, Optional, Tuple, Union

import torch
from torch import Tensor

from . import _checks
from . import reference
from ._backend import TORCH, accepted_dtypes, check_name, is_reference, kernels, resolve_backend, uses_kernels
from ._compat import warn_deprecated
from .config import NON_LOCAL_LOSS_MODES, LossConfig
from .credit import credit_advantage
from .kernels.tables import (KERNEL_KL_ESTIMATORS, KERNEL_LOSS_MODES, STAT_NAMES, VERL_KL_VALUE_CLAMP,
                             VERL_LOG_RATIO_CLAMP)
from .logprobs import (EMPTY, LinearOptions, VocabShard, compute_dtype, check_linear_inputs, check_options,
                       prepare_linear, run_pass)

__all__ = ["FusedPolicyLoss", "PolicyLossOutput", "fused_policy_loss", "policy_loss", "policy_loss_and_grads",
           "aggregation_normaliser", "metric_names", "check_credit_inputs", "check_clip_range"]

# Columns of the per-row statistics both backends produce: STAT_NAMES, the kernels' table.
_S = {name: i for i, name in enumerate(STAT_NAMES)}


class PolicyLossOutput(NamedTuple):
    """Result of :func:`policy_loss` and :func:`fused_policy_loss`.

    loss:    0-d tensor, float32 (float64 for float64 log-probs), differentiable w.r.t. logprobs and entropy.
    metrics: dict of detached 0-d tensors (see :func:`metric_names` and docs/api/policy_loss.md).
    """

    loss: Tensor
    metrics: Dict[str, Tensor]


# --- shared bookkeeping -----------------------------------------------------------------------------------


def metric_names(config: LossConfig, has_ref: bool, has_entropy: bool, has_rollout: bool) -> Tuple[str, ...]:
    """Names of the metrics :func:`policy_loss` returns for these inputs, in order."""
    names = ["clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean", "clip_ratio/dual_mean",
             "ratio/mean", "ppo_kl"]
    if has_ref:
        names.append("kl")
    if has_entropy:
        names.append("entropy")
    if has_rollout:
        names += ["sampling/sampling_logp_difference/mean", "sampling/sampling_logp_difference/max"]
        if config.rollout_correction is not None:
            names += ["sampling/importance_sampling_ratio/min", "sampling/importance_sampling_ratio/mean",
                      "sampling/importance_sampling_ratio/max"]
    return tuple(names)


def clip_metric_bounds(config: LossConfig, eps_low=None, eps_high=None):
    """(lower, upper) bounds of the ratio used by the clip-fraction metrics: [1 − ε_lo, 1 + ε_hi], except
    CISPO (TRL) whose only bound is the absolute cap ε_hi. ε from ``eps_low`` / ``eps_high`` (per-token tensors
    of the call's clip ranges) when given, else from the config."""
    eps_low = config.epsilon_low if eps_low is None else eps_low
    eps_high = config.epsilon_high if eps_high is None else eps_high
    if config.loss_mode == "cispo_trl":
        return -math.inf, eps_high
    return 1.0 - eps_low, 1.0 + eps_high


def _positive_count(name: str, value, device: torch.device, check_values: bool = True) -> Tensor:
    """A global count given as an int or a 0-d tensor, checked finite and > 0 (for a tensor only when
    ``check_values``: that check reads the device), as a float64 0-d tensor on ``device``."""
    if isinstance(value, Tensor):
        if value.numel() != 1 or value.ndim > 1:
            raise ValueError(f"{name} must be an int or a 0-d tensor, got a tensor of shape {tuple(value.shape)}")
        if value.dtype == torch.bool or value.is_complex():
            raise TypeError(f"{name} must be a real number, got dtype {value.dtype}")
        count = value.reshape(()).to(device=device, dtype=torch.float64)
        if check_values and not bool(torch.isfinite(count) & (count > 0)):  # one host sync
            raise ValueError(f"{name} must be a finite number > 0, got {count.item()}")
        return count
    value = _checks.positive_finite(name, value, "an int or a 0-d tensor")
    return torch.tensor(value, dtype=torch.float64, device=device)


def _term_normaliser(agg: str, config: LossConfig, live: Tensor, num_items_in_batch, num_sequences_in_batch,
                     check_values: bool) -> Tensor:
    device = live.device
    if agg == "token_mean_local" or (agg == "token_mean" and num_items_in_batch is None):
        return live.sum().to(torch.float64).clamp(min=1.0)
    if agg == "token_mean":
        return _positive_count("num_items_in_batch", num_items_in_batch, device, check_values)
    if agg == "token_sum":  # verl: Σ m·L · dp_size
        return torch.tensor(1.0 / config.dp_size, dtype=torch.float64, device=device)
    if num_sequences_in_batch is None:
        sequences = torch.tensor(float(max(live.shape[0], 1)), dtype=torch.float64, device=device)
    else:
        sequences = _positive_count("num_sequences_in_batch", num_sequences_in_batch, device, check_values)
    if agg == "seq_mean_token_sum_norm":
        return sequences * float(config.max_completion_length)
    return sequences


def aggregation_normaliser(
    config: LossConfig,
    live: Tensor,
    num_items_in_batch: Union[int, Tensor, None] = None,
    num_sequences_in_batch: Union[int, Tensor, None] = None,
    check_values: bool = True,
) -> Tensor:
    """The denominators D of the aggregation (docs/math.md §6) of the policy, KL and entropy terms
    (``config.term_aggregations``), as a float64 [3] tensor on ``live``'s device.

    token_mean: N = ``num_items_in_batch`` (global) or the local Σ mask, at least 1; token_mean_local: the local
    Σ mask, at least 1; seq_mean_token_mean and seq_mean_token_sum: B = ``num_sequences_in_batch`` or the local
    batch size; seq_mean_token_sum_norm: B·L_norm; token_sum: 1 / ``config.dp_size``. Each term is then
    Σ_i Σ_t m·L (/ max(n_i, 1) for seq_mean_token_mean) / D.
    """
    found = {agg: _term_normaliser(agg, config, live, num_items_in_batch, num_sequences_in_batch, check_values)
             for agg in dict.fromkeys(config.term_aggregations)}
    return torch.stack([found[agg] for agg in config.term_aggregations])


# The metrics that are a mean over the counted tokens of one statistic column.
_TOKEN_MEANS = {"clip_ratio/low_mean": "clip_low", "clip_ratio/high_mean": "clip_high",
                "clip_ratio/dual_mean": "clip_dual", "ratio/mean": "ratio", "ppo_kl": "ppo_kl", "kl": "kl",
                "entropy": "entropy", "sampling/sampling_logp_difference/mean": "logp_diff_sum"}


def _metrics_from_stats(stats: Tensor, names: Tuple[str, ...]) -> Dict[str, Tensor]:
    """Reduce per-row statistics [B, NUM_STATS] to the named metrics (deterministic sums over rows)."""
    total = stats.sum(0)
    tokens = total[_S["tokens"]].clamp(min=1.0)
    zero = torch.zeros((), dtype=stats.dtype, device=stats.device)

    def metric(name):
        if name in _TOKEN_MEANS:
            return total[_S[_TOKEN_MEANS[name]]] / tokens
        if name == "clip_ratio/region_mean":
            return (total[_S["clip_low"]] + total[_S["clip_high"]]) / tokens
        if name == "sampling/importance_sampling_ratio/mean":
            return total[_S["is_sum"]] / total[_S["is_count"]].clamp(min=1.0)
        if not stats.shape[0]:
            return zero
        if name == "sampling/sampling_logp_difference/max":
            return stats[:, _S["logp_diff_max"]].max()
        some = total[_S["is_count"]] > 0  # the importance-weight extremes: 0 without a counted weight
        if name.endswith("min"):
            return torch.where(some, stats[:, _S["is_min"]].min(), zero)
        return torch.where(some, stats[:, _S["is_max"]].max(), zero)

    return {name: metric(name).detach() for name in names}


# --- the per-token math (docs/math.md §3–§6): its one torch copy; kernels/policy.py is the kernel's ---------------
#
# Written as values only. The torch backend takes the per-token gradients by autograd on the O(B·T) per-token loss
# (:func:`_vjp`, also inside a torch.library op) and rlloss.reference runs the same functions in float64 under
# autograd, differentiating straight into the caller's log-probs and entropy. Wherever the
# kernel's derivative multiplies by a 0/1 slope (a clamp, the absolute value, GMPO's sign clip, a straight-through
# KL estimator) the value goes through :func:`_straight_through`, so that 0·NaN stays NaN (the NaN contract) where
# autograd's own clamp, abs and minimum would drop it.


def _straight_through(value: Tensor, x: Tensor, slope: Tensor) -> Tensor:
    """``value`` (computed from x), whose derivative w.r.t. x is ``slope``, multiplied in: an upstream NaN stays NaN
    where the slope is 0 (autograd's clamp and where select 0 instead). An infinite x passes no gradient."""
    step = torch.where(x.isinf(), torch.zeros((), dtype=x.dtype, device=x.device), x - x.detach())
    return value.detach() + slope.detach() * step


def _clip(x: Tensor, lo=None, hi=None) -> Tensor:
    """clamp(x, lo, hi) with the gradient 1 on the closed interval and 0 outside; NaN counts as inside (it
    propagates). ``lo`` / ``hi``: numbers, tensors or None (no bound)."""
    value, inside = x, torch.ones_like(x)
    if lo is not None:
        value, inside = torch.clamp(value, min=lo), inside * ~(x < lo)
    if hi is not None:
        value, inside = torch.clamp(value, max=hi), inside * ~(x > hi)
    return _straight_through(value, x, inside)


def _abs(x: Tensor) -> Tensor:
    """|x| with the gradient sign(x), NaN at NaN (autograd's abs gives 0 there)."""
    return _straight_through(x.abs(), x, torch.where(x.isnan(), x, torch.sign(x)))


def _policy_term(config: LossConfig, rho: Tensor, logp: Tensor, adv: Tensor, old: Tensor,
                 coupled: Optional[Tensor] = None, eps_low=None, eps_high=None) -> Tuple[Tensor, Tensor]:
    """(P, dual-clip active) of docs/math.md §4, differentiable in ``rho`` and ``logp``; sg(·) is ``.detach()``.
    ``old`` is ℓ° (sg(ℓ) on-policy); ``coupled`` the per-token factor a mode takes from the whole sequence or batch
    (:func:`_coupled_terms`): clip_cov / kl_cov 1 on the selected tokens, vespo φ(w_i). geo_mean arrives with ρ =
    its sequence ratio and A = the sequence mean Ā. ``eps_low`` / ``eps_high``: per-token clip ranges replacing
    the config's (ppo_clip and cispo_*, see :func:`check_clip_range`)."""
    eps_low = config.epsilon_low if eps_low is None else eps_low
    eps_high = config.epsilon_high if eps_high is None else eps_high
    dual = torch.zeros_like(rho, dtype=torch.bool)
    mode = config.loss_mode
    if mode in ("geo_mean", "kl_cov"):  # −A·ρ (+ kl_cov_coef·|ℓ − ℓ°| on the selected tokens)
        P = -adv * rho
        if mode == "kl_cov":
            P = P + config.kl_cov_coef * coupled * _abs(logp - old)
        return P, dual
    if mode in ("dppo_tv", "dppo_kl"):  # −A·sg(min(ρ, c))·ℓ inside the divergence trust region
        p, p_old = torch.exp(logp.detach()), torch.exp(old)
        if mode == "dppo_tv":
            outside = torch.where(adv > 0, p - p_old > config.epsilon_high, p - p_old < -config.epsilon_low)
        else:
            binary_kl = (p_old * (old - logp.detach())
                         + (1.0 - p_old) * torch.log((1.0 - p_old + 1e-8) / (1.0 - p + 1e-8)))
            outside = torch.where(adv > 0, (binary_kl > config.epsilon_high) & (p > p_old),
                                  (binary_kl > config.epsilon_low) & (p < p_old))
        # NaN counts as inside: it propagates
        weight = torch.where(outside, torch.zeros_like(rho), -adv * rho.clamp(max=config.dppo_ratio_cap))
        return weight.detach() * logp, dual
    if mode == "dro":  # −(A·ℓ − ½·β_dro·(ℓ − ℓ°)²)
        u = logp - old
        return -(adv * logp - 0.5 * config.dro_beta * u * u), dual
    if mode == "vespo":  # −sg(φ)·A·ℓ
        return -coupled * adv * logp, dual
    if mode in ("ppo_clip", "clip_cov"):
        unclipped = rho if config.delta is None else _clip(rho, hi=config.delta)
        surr1, surr2 = unclipped * adv, _clip(rho, 1.0 - eps_low, 1.0 + eps_high) * adv
        P = -torch.where(surr1 <= surr2, surr1, surr2)
        if config.dual_clip is not None:
            cap = -config.dual_clip * adv
            dual = (adv < 0) & (P > cap)
            P = torch.where(dual, cap, P)
        if mode == "clip_cov":  # the selected tokens' loss and gradient dropped
            P = P * (1.0 - coupled)
        return P, dual
    if mode in ("cispo_trl", "cispo_verl"):  # −sg(clip(ρ))·A·ℓ
        weight = rho.clamp(max=eps_high) if mode == "cispo_trl" else rho.clamp(1.0 - eps_low, 1.0 + eps_high)
        return -weight.detach() * adv * logp, dual
    if mode == "gpg":
        return -adv * logp, dual
    # sapo
    tau = torch.where(adv > 0, torch.full_like(rho, config.sapo_tau_pos), torch.full_like(rho, config.sapo_tau_neg))
    return -(4.0 / tau) * torch.sigmoid(tau * (rho - 1.0)) * adv, dual


def k3_value(x: Tensor) -> Tensor:
    """e^x − x − 1 without cancellation: its Taylor series x²·Σ_{k≥2} x^{k−2}/k! for |x| < 1/2 (to k = 17:
    truncation below 1e-19 relative, exact in float64), the direct form elsewhere; differentiable (the series'
    input is 0 where it is not taken, so no overflow there reaches a gradient). kernels/policy.py evaluates the
    series to float32 precision."""
    small = x.abs() < 0.5
    xs = torch.where(small, x, torch.zeros((), dtype=x.dtype, device=x.device))
    series = torch.full_like(x, 1.0 / math.factorial(_K3_TERMS))
    for k in range(_K3_TERMS - 1, 1, -1):
        series = series * xs + 1.0 / math.factorial(k)
    return torch.where(small, xs * xs * series, torch.exp(x) - x - 1.0)


_K3_TERMS = 17


def _kl_term(config: LossConfig, x: Tensor) -> Tensor:
    """KL_t for x = ℓʳ − ℓ (docs/math.md §4), differentiable in x."""
    est = config.kl_estimator
    if est in ("k1", "k1+"):
        K = -x
    elif est in ("abs", "abs+"):
        K = _abs(x)
    elif est == "k2":
        K = 0.5 * x * x
    elif config.kl_clamp:  # verl: x clamped to ±20 before exp, the value to ±10
        K = _clip(k3_value(_clip(x, -VERL_LOG_RATIO_CLAMP, VERL_LOG_RATIO_CLAMP)),
                  -VERL_KL_VALUE_CLAMP, VERL_KL_VALUE_CLAMP)
    else:
        K = k3_value(x)
    if est.endswith("+"):  # verl: the estimator's value, the gradient of k2 (straight-through)
        K = _straight_through(K, x, x)
    return K


def _rollout_weight(config: LossConfig, w: Tensor) -> Tensor:
    c_min = 0.0 if config.rollout_threshold_low is None else config.rollout_threshold_low
    c_max = config.rollout_threshold_high
    if config.rollout_correction.endswith("truncate"):
        return w.clamp(c_min, c_max)
    return torch.where((w >= c_min) & (w <= c_max), w, torch.zeros_like(w))


def _rollout_weights(config: LossConfig, live: Tensor, old: Tensor, rollout: Tensor) -> Tensor:
    """[B, T] weights of ``config.rollout_correction`` from ℓ° and ℓˢ (docs/math.md §5): per token, or the sequence
    weight w_i on every token of row i."""
    d = torch.where(live, old - rollout, torch.zeros((), dtype=old.dtype, device=old.device))
    if config.rollout_correction.startswith("token"):
        return _rollout_weight(config, torch.exp(d))
    return _rollout_weight(config, torch.exp(d.sum(1)))[:, None].expand(live.shape)


# verl's guards: a divergence statistic's log-ratio clamp (rollout_corr_helper.SAFETY_BOUND), the 1e-8 in its
# masked means, TRL's lower clamp of VESPO's log w (log 1e-8) and verl's 1e-10 in GMPO's log of the weights.
_RS_LOG_RATIO_BOUND = 20.0
_MEAN_EPS = 1e-8
_VESPO_LOG_W_MIN = math.log(1e-8)
_GEO_WEIGHT_EPS = 1e-10


def _batch_normalised(config: LossConfig, w: Tensor, live: Tensor) -> Tensor:
    """w divided by its mean over the counted tokens (token level) or the non-empty sequences (sequence level),
    when that mean exceeds 1e-8 (verl ``rollout_is_batch_normalize``; verl's means add 1e-8 to the count, a
    relative 1e-8/N that this exact mean leaves out)."""
    mf = live.to(w.dtype)
    w = w * mf
    if config.rollout_correction.startswith("token"):
        mean = w.sum() / mf.sum().clamp(min=1.0)
    else:
        rows = mf.sum(1)
        nonempty = (rows > 0).to(w.dtype)
        mean = (w.sum(1) / rows.clamp(min=1.0) * nonempty).sum() / nonempty.sum().clamp(min=1.0)
    return torch.where(mean > _MEAN_EPS, w / mean, w)


def _rejection_keep(config: LossConfig, live: Tensor, old: Tensor, rollout: Tensor) -> Tensor:
    """[B, T] bool: the tokens that pass every ``config.rollout_rs`` criterion (verl's rejection sampling) on
    d = clamp(ℓ° − ℓˢ, ±20): k1 = −d within [log lower, log upper], k2 = d²/2 and k3 = eᵈ − 1 − d at most the
    bound, per token or as the sequence's sum, mean or max."""
    if live.shape[1] == 0:
        return live
    zero = torch.zeros((), dtype=old.dtype, device=old.device)
    d = torch.where(live, old - rollout, zero).clamp(-_RS_LOG_RATIO_BOUND, _RS_LOG_RATIO_BOUND)
    mf = live.to(old.dtype)
    keep = torch.ones_like(live)
    for option, lower, upper in config.rollout_rs_bounds:
        stat = {"k1": -d, "k2": 0.5 * d * d, "k3": torch.expm1(d) - d}[option[-2:]]
        if option.startswith("seq_sum"):
            stat = (stat * mf).sum(1, keepdim=True)
        elif option.startswith("seq_mean"):
            stat = (stat * mf).sum(1, keepdim=True) / (mf.sum(1, keepdim=True) + _MEAN_EPS)
        elif option.startswith("seq_max"):
            top = torch.where(live, stat, -math.inf).amax(1, keepdim=True)
            stat = torch.where(top == -math.inf, zero, top)
        if lower is None:
            keep = keep & (stat <= upper)
        else:
            keep = keep & (stat >= math.log(lower)) & (stat <= math.log(upper))
    return keep


def apply_rollout_rs_and_normalise(config: LossConfig, mask: Tensor, old: Optional[Tensor], rollout: Optional[Tensor],
                                   rollout_weights: Optional[Tensor]) -> Tuple[Tensor, Optional[Tensor]]:
    """(mask, rollout_weights) after verl's batch normalisation of the rollout weights and its rejection sampling,
    which act on the whole call before the loss, in verl's order: the weights of ``config.rollout_correction`` are
    formed over the given mask and normalised (``config.rollout_is_batch_normalize``), then the tokens
    ``config.rollout_rs`` rejects leave the mask of every term and of the aggregation. ``old`` is ℓ° (sg(ℓ)
    on-policy). Without either option, nothing changes (the weights are formed inside the loss)."""
    if not (config.rollout_is_batch_normalize or config.rollout_rs is not None):
        return mask, rollout_weights
    cd = compute_dtype(old.dtype)
    old, rollout = old.to(cd), rollout.to(cd)
    if config.rollout_correction is not None:
        rollout_weights = _rollout_weights(config, mask, old, rollout)
        if config.rollout_is_batch_normalize:
            rollout_weights = _batch_normalised(config, rollout_weights, mask)
    if config.rollout_rs is not None:
        mask = mask & _rejection_keep(config, mask, old, rollout)
    return mask, rollout_weights


def _coupled_terms(config: LossConfig, logp: Tensor, tokens: "TokenInputs", rho: Tensor):
    """The per-token factor a mode takes from the whole batch or sequence at the current log-probs, and the
    tokens with the rollout weights it consumes removed: clip_cov's and kl_cov's selections (1 on the selected
    tokens) and VESPO's φ(w_i) with the token rollout weights folded into w_i (docs/math.md §4)."""
    mode, live, adv = config.loss_mode, tokens.live, tokens.adv
    logp, rho = logp.detach(), rho.detach()  # the factor is a stop-gradient
    old = logp if tokens.old is None else tokens.old
    mf = live.to(logp.dtype)
    selected = torch.zeros_like(logp)
    if mode == "clip_cov":
        lo, hi = 1.0 - config.epsilon_low, 1.0 + config.epsilon_high
        clipped = live & (-adv * rho.clamp(lo, hi) > -adv * rho)
        count = mf.sum()
        cov = (adv - (adv * mf).sum() / (count + _MEAN_EPS)) * (logp - (logp * mf).sum() / (count + _MEAN_EPS))
        candidates = torch.nonzero(live & ~clipped & (cov > config.clip_cov_lb) & (cov < config.clip_cov_ub))
        if len(candidates):  # verl: a random clip_num of them, torch.randperm on the default generator
            clip_num = max(int(config.clip_cov_ratio * count.item()), 1)
            chosen = candidates[torch.randperm(len(candidates))[:clip_num].to(candidates.device)]
            selected[chosen[:, 0], chosen[:, 1]] = 1.0
        return selected, tokens
    if mode == "kl_cov":
        a, lp = adv[live], logp[live]
        if a.numel():  # verl: the top max(1, ⌊N·ratio⌋) tokens by covariance
            cov = (a - a.mean()) * (lp - lp.mean())
            top = torch.topk(cov, max(1, int(a.numel() * config.kl_cov_ratio))).indices
            flat = torch.zeros(a.numel(), dtype=logp.dtype, device=logp.device)
            flat[top] = 1.0
            selected[live] = flat
        return selected, tokens
    # vespo: log w_i = clamp(Σ_t m·clamp(ℓ − ℓ°, ±20) + Σ_t m·clamp(log w_t, log 1e-8, 20), log 1e-8, 20)
    log_w = (torch.where(live, logp - old, 0.0).clamp(-20.0, 20.0) * mf).sum(1)
    weights = tokens.rollout_weight(config, old)
    if weights is not None:
        log_w = log_w + (torch.log(weights).clamp(_VESPO_LOG_W_MIN, 20.0) * mf).sum(1)
    log_w = log_w.clamp(_VESPO_LOG_W_MIN, 20.0)[:, None]
    nonneg = adv >= 0
    k = torch.where(nonneg, torch.full_like(adv, config.vespo_k_pos), torch.full_like(adv, config.vespo_k_neg))
    lam = torch.where(nonneg, torch.full_like(adv, config.vespo_lambda_pos),
                      torch.full_like(adv, config.vespo_lambda_neg)).clamp(min=1e-4)
    phi = torch.exp(lam + k * log_w - lam * torch.exp(log_w))
    phi = torch.where(phi.isinf(), torch.zeros_like(phi), phi)  # TRL's guard; a NaN input stays NaN (NaN contract)
    return phi, tokens._replace(rollout=None, weight=None)


def _geo_mean_ratio(config: LossConfig, logp: Tensor, tokens: "TokenInputs", n_safe: Tensor):
    """GMPO (verl ``geo_mean``): (s_i [B], differentiable in ℓ; tokens with A → Ā_i and the rollout weights → their
    geometric mean over the sequence). s_i = exp(Σ_t m·ũ_t / n_i), ũ = sign(A)·min(sign(A)·u, sign(A)·clip(u, −ε_lo,
    ε_hi)) with u = ℓ − ℓ° (clamped by log_ratio_min/max when set); dũ/du is 1 where neither clip binds, else 0."""
    live, adv = tokens.live, tokens.adv
    mf = live.to(logp.dtype)
    lo = -math.inf if config.log_ratio_min is None else config.log_ratio_min
    hi = math.inf if config.log_ratio_max is None else config.log_ratio_max
    old = logp.detach() if tokens.old is None else tokens.old
    u = logp - old
    u_r = u.clamp(lo, hi)
    sign = torch.sign(adv)
    u_min = sign * torch.minimum(sign * u_r, sign * u_r.clamp(-config.epsilon_low, config.epsilon_high))
    free = ~((u < lo) | (u > hi) | (sign == 0) | ((sign > 0) & (u_r > config.epsilon_high))
             | ((sign < 0) & (u_r < -config.epsilon_low)))
    s = torch.exp((_straight_through(u_min, u, free.to(u.dtype)) * mf).sum(1) / n_safe)
    adv_mean = ((adv * mf).sum(1) / n_safe)[:, None] * mf
    weights = tokens.rollout_weight(config, old)
    if weights is not None:  # verl: exp(Σ_t m·log(w_t + 1e-10) / n_i)
        geo = torch.exp((torch.log(weights + _GEO_WEIGHT_EPS) * mf).sum(1) / n_safe)
        weights = geo[:, None].expand(live.shape)
    return s, tokens._replace(adv=adv_mean, rollout=None, weight=weights)


class TokenInputs(NamedTuple):
    """The per-token inputs of the policy math that do not depend on the current log-probs, prepared once
    (:func:`prepare_tokens`), in the compute dtype, zero where not counted. Any shape ([B, T], or a flat
    slice of it for one chunk of the fused loss)."""

    live: Tensor
    old: Optional[Tensor]          # ℓ°; None on-policy (ℓ° = sg(ℓ))
    adv: Tensor                    # A (before the credit)
    pos: Optional[Tensor]          # ℓ⁺ when config.credit is set
    neg: Optional[Tensor]          # ℓ⁻ for credit = "cepo"
    ref: Optional[Tensor]          # ℓʳ (with β = 0 it only feeds the kl metric)
    rollout: Optional[Tensor]      # ℓˢ when a token-level rollout correction needs it
    weight: Optional[Tensor]       # the sequence-level rollout weight w_i per token, when precomputed
    coef: Tensor                   # aggregation weight c = m/D (/ max(n_i, 1) for seq_mean_token_mean)
    coef_kl: Tensor                # the KL term's (config.kl_aggregation); ``coef`` itself when the same
    coef_ent: Tensor               # the entropy term's (config.entropy_aggregation); ``coef`` when the same
    eps_low: Optional[Tensor] = None   # per-token ε_lo / ε_hi of the call's clip ranges (else the config's)
    eps_high: Optional[Tensor] = None
    select: Optional[Tensor] = None    # bool: the tokens the policy term keeps (config.token_select, off-policy mask)

    def rows(self, begin: int, end: int) -> "TokenInputs":
        """The flat tokens [begin, end) of a [B, T] preparation (a chunk of the fused loss)."""
        return TokenInputs(*(t.reshape(-1)[begin:end] if isinstance(t, Tensor) else t for t in self))

    def rollout_weight(self, config: LossConfig, old: Tensor) -> Optional[Tensor]:
        """The detached rollout weights (docs/math.md §5): precomputed, or formed from ℓˢ at ℓ° = ``old``."""
        return self.weight if self.rollout is None else _rollout_weights(config, self.live, old, self.rollout)


def _load(x: Optional[Tensor], live: Tensor, cd: torch.dtype) -> Optional[Tensor]:
    """A [B] or [B, T] input as [B, T] in the compute dtype, exactly 0 where not counted (NaN and inf included)."""
    if x is None:
        return None
    x = x[:, None] if x.ndim == 1 else x
    return torch.where(live, x.to(cd), torch.zeros((), dtype=cd, device=x.device))


def prepare_tokens(config: LossConfig, live: Tensor, old_logprobs, advantages, ref_logprobs, rollout_logprobs,
                   normaliser: Tensor, pos_logprobs, neg_logprobs, cd: torch.dtype,
                   rollout_weights: Optional[Tensor] = None,
                   clip_range: Tuple[Optional[Tensor], Optional[Tensor]] = (None, None)) -> Tuple[TokenInputs, Tensor]:
    """(TokenInputs over [B, T], n_i = max(Σ_t m, 1) per row). Given ``rollout_weights`` (precomputed, detached)
    are the rollout weights, in place of any formed from ``rollout_logprobs``; ``clip_range`` the call's
    (ε_lo, ε_hi) tensors."""
    B = live.shape[0]
    mf = live.to(cd)
    n_safe = mf.sum(1).clamp(min=1.0)
    old = _load(old_logprobs, live, cd)
    adv = _load(advantages, live, cd)
    ref = _load(ref_logprobs, live, cd)
    rollout = weight = None
    if rollout_logprobs is not None and config.rollout_correction is not None:
        rollout = _load(rollout_logprobs, live, cd)
        if config.rollout_correction.startswith("sequence") and old is not None:
            weight = _rollout_weights(config, live, old, rollout)
            rollout = None
    if rollout_weights is not None:
        weight, rollout = _load(rollout_weights, live, cd), None
    norms = normaliser.reshape(-1).to(cd).expand(3)  # a single D (older callers) serves every term
    coefs = {}

    def coef_of(term: int) -> Tensor:
        agg = config.term_aggregations[term]
        if agg not in coefs:
            row_weight = (1.0 / norms[term]).expand(B)
            if agg == "seq_mean_token_mean":
                row_weight = row_weight / n_safe
            coefs[agg] = mf * row_weight[:, None]
        return coefs[agg]

    coef = coef_of(0)
    tokens = TokenInputs(live, old, adv, _load(pos_logprobs, live, cd), _load(neg_logprobs, live, cd), ref,
                         rollout, weight, coef, coef_of(1) if config.beta != 0.0 else coef,
                         coef_of(2) if config.entropy_coef != 0.0 else coef,
                         _load(clip_range[0], live, cd), _load(clip_range[1], live, cd))
    return tokens, n_safe


class TokenTerms(NamedTuple):
    """Per-token pieces of the loss (docs/math.md §3–§6) for given log-probs; see :func:`token_terms`."""

    loss: Tensor        # c·w·P + c_kl·β·KL − c_ent·c_H·H, differentiable in ℓ and H
    adv: Tensor         # the advantage used (after the credit)
    dual: Tensor        # dual-clip active
    kl: Optional[Tensor]      # KL_t (·ρ when kl_ratio_weighted), unweighted: the metric


def token_terms(config: LossConfig, logp: Tensor, tokens: TokenInputs, rho: Tensor,
                coupled: Optional[Tensor] = None, entropy: Optional[Tensor] = None) -> TokenTerms:
    """The per-token policy, rollout, KL and entropy terms at ratio ``rho``, weighted by their aggregation
    coefficients — elementwise, so the same function serves a whole [B, T] batch and one chunk of flat tokens of
    the fused loss (the one place these formulas live in torch; kernels/policy.py is the kernel's copy).
    ``coupled``: the batch- or sequence-wide factor of clip_cov, kl_cov and vespo (:func:`_coupled_terms`)."""
    old = logp.detach() if tokens.old is None else tokens.old
    adv = _used_advantage(config, logp, tokens)
    P, dual = _policy_term(config, rho, logp, adv, old, coupled, tokens.eps_low, tokens.eps_high)
    w = tokens.rollout_weight(config, old)
    loss = P if w is None else w * P
    if tokens.select is not None:  # selection (docs/math.md §9): dropped tokens lose the policy term exactly
        loss = torch.where(tokens.select, loss, 0.0)
    loss = tokens.coef * loss
    K = None
    if tokens.ref is not None:  # + β·KL_t, times ρ when kl_ratio_weighted
        K = _kl_term(config, tokens.ref - logp)
        if config.kl_ratio_weighted:
            K = K * rho
        if config.beta != 0.0:  # switched off: the kl metric only, never the loss or its gradient
            loss = loss + tokens.coef_kl * (config.beta * K)
    if entropy is not None and config.entropy_coef != 0.0:  # − c_H·H_t (a zero coefficient never reads H)
        loss = loss - config.entropy_coef * tokens.coef_ent * entropy
    return TokenTerms(loss, adv, dual, K)


def _used_advantage(config: LossConfig, logp: Tensor, tokens: TokenInputs) -> Tensor:
    """The advantage the surrogate uses: A, or the credit Â of docs/math.md §7 (Â = A·((1−λ) + λ·w), Δ = ℓ⁺ − ℓ⁻
    or ℓ⁺ − ℓ°, no gradient)."""
    if config.credit is None:
        return tokens.adv
    base = tokens.neg if config.credit == "cepo" else (logp.detach() if tokens.old is None else tokens.old)
    return credit_advantage(tokens.adv, tokens.pos - base, config.credit_lambda, config.credit_eps_w)


def _upper_quantile_mask(score: Tensor, live: Tensor, fraction: float) -> Tensor:
    """live & (score ≥ the (1 − fraction)-quantile of score over the live tokens), the quantile interpolated
    linearly between order statistics as torch.quantile does (a sort: no size limit). One host read."""
    values = score[live].sort().values
    n = values.numel()
    if n == 0:
        return torch.zeros_like(live)
    h = (1.0 - fraction) * (n - 1)
    below = math.floor(h)
    above = min(below + 1, n - 1)
    threshold = values[below] + (h - below) * (values[above] - values[below])
    return live & (score >= threshold)


def selection_masks(config: LossConfig, logp: Tensor, entropy: Optional[Tensor], tokens: TokenInputs,
                    sampling: Optional[Tensor]) -> Tuple[Optional[Tensor], Optional[Tensor]]:
    """(policy keep-mask, entropy keep-mask) of docs/math.md §9 over [B, T], or None where nothing is dropped.

    token_select keeps the live tokens whose score (H, or |Â|·H) reaches the (1 − q)-quantile over all live
    tokens; the off-policy mask keeps a row's tokens where A ≥ 0 or mean_t(ℓˢ − sg(ℓ)) ≤ δ (NaN differences
    count as 0), ℓˢ = ``sampling`` (rollout log-probs, 0 where not counted) else ℓ°. The policy term keeps
    both; the entropy bonus only the first (TRL)."""
    live = tokens.live
    keep_entropy = None
    if config.token_select is not None:
        score = entropy
        if config.token_select == "adv_entropy":
            score = _used_advantage(config, logp, tokens).abs() * entropy
        keep_entropy = _upper_quantile_mask(score, live, config.token_select_fraction)
    keep = keep_entropy
    if config.off_policy_mask_threshold is not None:
        reference_logp = sampling if sampling is not None else (logp if tokens.old is None else tokens.old)
        kl = torch.where(live, torch.nan_to_num(reference_logp - logp, nan=0.0), 0.0)
        mean_kl = kl.sum(1) / live.sum(1).clamp(min=1).to(logp.dtype)
        in_policy = (tokens.adv >= 0) | (mean_kl <= config.off_policy_mask_threshold)[:, None]
        keep = in_policy if keep is None else keep & in_policy
    return keep, keep_entropy


def token_ratio(config: LossConfig, logp: Tensor, tokens: TokenInputs) -> Tensor:
    """ρ_t = exp(clip(ℓ_t − ℓ°_t)) of the token-level ratio (docs/math.md §3), differentiable in ℓ."""
    u = logp - (logp.detach() if tokens.old is None else tokens.old)
    return torch.exp(_clip(u, config.log_ratio_min, config.log_ratio_max))


def _sequence_ratio(config: LossConfig, logp: Tensor, tokens: TokenInputs, n_safe: Tensor) -> Tensor:
    """[B, T] ratio of the sequence levels (docs/math.md §3): s_i = exp(clip(Σ_t m·(ℓ − ℓ°) / n_i)) on every token,
    its gradient reaching every token of the row ("sequence"), or only the token's own, log ρ_t = ℓ_t − sg(ℓ_t)
    + sg(log s_i) ("sequence_token")."""
    u = logp - (logp.detach() if tokens.old is None else tokens.old)
    log_s = ((u * tokens.live.to(u.dtype)).sum(1) / n_safe)[:, None]
    if config.importance_sampling_level == "sequence_token":
        log_s = logp - logp.detach() + log_s.detach()
    return torch.exp(_clip(log_s.expand(logp.shape), config.log_ratio_min, config.log_ratio_max))


@contextlib.contextmanager
def _autograd_on():
    """Plain autograd, also inside a torch.library op, whose implementation runs with the autograd dispatch keys
    excluded: they are let back in for the block (torch's dispatch TLS, as torch.func re-enters autograd itself;
    torch.func's wrapped tensors would trip opcheck's schema check and torch.compile)."""
    keys = torch._C.DispatchKey
    excluded = (torch._C._dispatch_tls_local_exclude_set().remove(keys.AutogradFunctionality)
                .remove(keys.ADInplaceOrView))
    with torch._C._ForceDispatchKeyGuard(torch._C._dispatch_tls_local_include_set(), excluded), torch.enable_grad():
        yield


def _normal(x):
    """x, with any tensor made in torch.inference_mode (in a tuple too) copied to a normal one that autograd may
    save; call outside inference mode."""
    if isinstance(x, Tensor):
        return x.clone() if x.is_inference() else x
    if isinstance(x, tuple):
        items = [_normal(item) for item in x]
        return type(x)(*items) if hasattr(x, "_fields") else tuple(items)
    return x


def _outside_inference_mode(fn):
    """``fn`` run outside torch.inference_mode on normal copies of its tensor arguments when called inside it
    (autograd cannot record on inference tensors), else as it is."""
    def run(*args):
        if not torch.is_inference_mode_enabled():
            return fn(*args)
        with torch.inference_mode(False):
            return fn(*(_normal(arg) for arg in args))

    return run


def _vjp(fn, *inputs: Tensor):
    """(fn's first output, detached; its other outputs; d(Σ first output)/d(each input)): per-token gradients of
    the value formulas by autograd, on the O(B·T) per-token loss only."""
    with _autograd_on():
        leaves = [x.detach().requires_grad_() for x in inputs]
        out, aux = fn(*leaves)
        grads = torch.autograd.grad(out, leaves, torch.ones_like(out), allow_unused=True)
    return out.detach(), aux, tuple(torch.zeros_like(x) if g is None else g for x, g in zip(inputs, grads))


@_outside_inference_mode
def token_gradients(config: LossConfig, logp: Tensor, entropy: Optional[Tensor], tokens: TokenInputs,
                    write_grad_entropy: bool) -> Tuple[Tensor, Optional[Tensor]]:
    """(d(loss)/dℓ_t, d(loss)/dH_t) of a token-level loss for any set of tokens: what the one-pass fused
    loss asks for each chunk. Not for sequence-level ratios (their gradient needs the whole sequence)."""
    def loss(lp, ent=None):
        return token_terms(config, lp, tokens, token_ratio(config, lp, tokens), entropy=ent).loss, ()

    grads = _vjp(loss, logp, entropy)[2] if write_grad_entropy else _vjp(loss, logp)[2]
    return grads[0], (grads[1] if write_grad_entropy else None)


def _loss_rows(logprobs, entropy, old_logprobs, advantages, live, ref_logprobs, rollout_logprobs, config, normaliser,
               pos_logprobs=None, neg_logprobs=None, rollout_weights=None,
               clip_range=(None, None)) -> Tuple[Tensor, Tensor]:
    """(per-token loss [B, T], differentiable in ``logprobs`` and ``entropy``; stats [B, NUM_STATS]) of the whole
    [B, T] batch in the compute dtype, from the inputs of :func:`policy_loss_and_grads`: the selections, the
    sequence-level and coupled factors, then :func:`token_terms`."""
    cd = compute_dtype(logprobs.dtype)
    tokens, n_safe = prepare_tokens(config, live, old_logprobs, advantages, ref_logprobs, rollout_logprobs,
                                    normaliser, pos_logprobs, neg_logprobs, cd, rollout_weights, clip_range)
    logp, entropy, rollout = (_load(x, live, cd) for x in (logprobs, entropy, rollout_logprobs))
    B, T = logp.shape
    zero = torch.zeros((), dtype=cd, device=logp.device)
    mf = live.to(cd)
    if config.selects:
        keep, keep_entropy = selection_masks(config, logp.detach(), entropy, tokens, rollout)
        tokens = tokens._replace(select=keep)
        if keep_entropy is not None and config.entropy_coef != 0.0:  # the bonus acts on the kept tokens (TRL)
            coef_ent = tokens.coef_ent * keep_entropy
            if config.term_aggregations[2] == "token_mean_local":
                coef_ent = keep_entropy.to(cd) / keep_entropy.sum().clamp(min=1).to(cd)
            tokens = tokens._replace(coef_ent=coef_ent)
    old = logp.detach() if tokens.old is None else tokens.old
    is_weight = tokens.rollout_weight(config, old)
    if tokens.rollout is not None and config.rollout_correction.startswith("sequence"):
        tokens = tokens._replace(weight=is_weight, rollout=None)  # on-policy: ℓ° = sg(ℓ), known only now
    coupled = None
    if config.loss_mode == "geo_mean":  # the sequence ratio s_i, through the tokens its clip leaves free
        s, tokens = _geo_mean_ratio(config, logp, tokens, n_safe)
        rho = s[:, None].expand(B, T)
    elif config.importance_sampling_level == "token":
        rho = token_ratio(config, logp, tokens)
    else:
        rho = _sequence_ratio(config, logp, tokens, n_safe)
    if config.loss_mode in ("clip_cov", "kl_cov", "vespo"):
        coupled, tokens = _coupled_terms(config, logp, tokens, rho)
    terms = token_terms(config, logp, tokens, rho, coupled, entropy)

    stats = torch.zeros((B, len(STAT_NAMES)), dtype=cd, device=logp.device)
    if rollout is not None:  # divergence metrics (docs/math.md §5)
        d = torch.where(live, old - rollout, zero).abs()
        stats[:, _S["logp_diff_sum"]] = d.sum(1)
        stats[:, _S["logp_diff_max"]] = d.amax(1) if T else 0.0
        if config.rollout_correction is not None:
            if config.rollout_correction.startswith("token"):
                stats[:, _S["is_sum"]] = (is_weight * mf).sum(1)
                stats[:, _S["is_count"]] = mf.sum(1)
                stats[:, _S["is_min"]] = torch.where(live, is_weight, math.inf).amin(1) if T else math.inf
                stats[:, _S["is_max"]] = torch.where(live, is_weight, -math.inf).amax(1) if T else -math.inf
            else:
                # a row without a counted token reports the weight of d = 0, as the kernel does
                empty_row = _rollout_weight(config, torch.ones(B, dtype=cd, device=live.device))
                w_row = (torch.where(live.any(1), torch.where(live, is_weight, -math.inf).amax(1), empty_row) if T
                         else empty_row)
                stats[:, _S["is_count"]] = 1.0
                for key in ("is_sum", "is_min", "is_max"):
                    stats[:, _S[key]] = w_row
    if terms.kl is not None:
        stats[:, _S["kl"]] = (terms.kl.detach() * mf).sum(1)
    if entropy is not None:
        stats[:, _S["entropy"]] = entropy.detach().sum(1)
    low, high = clip_metric_bounds(config, tokens.eps_low, tokens.eps_high)
    rho, adv = rho.detach(), terms.adv.detach()
    stats[:, _S["loss"]] = terms.loss.detach().sum(1)
    stats[:, _S["tokens"]] = mf.sum(1)
    stats[:, _S["clip_low"]] = (live & (rho < low) & (adv < 0)).to(cd).sum(1)
    stats[:, _S["clip_high"]] = (live & (rho > high) & (adv > 0)).to(cd).sum(1)
    stats[:, _S["clip_dual"]] = (live & terms.dual).to(cd).sum(1)
    stats[:, _S["ratio"]] = (rho * mf).sum(1)
    stats[:, _S["ppo_kl"]] = (old - logp.detach()).sum(1)
    return terms.loss, stats


@_outside_inference_mode
def _torch_rows(write_grad_entropy: bool, with_grads: bool, logprobs: Tensor, entropy: Optional[Tensor], *inputs):
    """(stats [B, NUM_STATS], d(loss)/dℓ [B, T], d(loss)/dH [B, T] or None) of :func:`_loss_rows`, the gradients
    in the dtypes of ℓ and H (exactly 0 where not counted: a NaN shared by the row, s_i, never reaches a masked
    token); without ``with_grads`` the gradients are None and no autograd runs."""
    if not with_grads:
        with torch.no_grad():
            return _loss_rows(logprobs, entropy, *inputs)[1], None, None

    def loss(lp, h=entropy):
        return _loss_rows(lp, h, *inputs)

    _, stats, grads = _vjp(loss, logprobs, entropy) if write_grad_entropy else _vjp(loss, logprobs)
    return stats, grads[0], (grads[1] if write_grad_entropy else None)


# --- value and gradients in one pass -------------------------------------------------------------------


def _kernel_supports(config: LossConfig) -> bool:
    """Whether kernels/policy.py implements ``config`` (else :func:`policy_loss_and_grads` uses torch): one
    aggregation coefficient per token, the estimators and loss modes of its tables, no selection options."""
    return (config.uniform_aggregation and config.kl_estimator in KERNEL_KL_ESTIMATORS
            and config.loss_mode in KERNEL_LOSS_MODES and not config.selects)


def policy_loss_and_grads(
    logprobs: Tensor,
    entropy: Optional[Tensor],
    old_logprobs: Optional[Tensor],
    advantages: Tensor,
    mask: Tensor,
    ref_logprobs: Optional[Tensor],
    rollout_logprobs: Optional[Tensor],
    config: LossConfig,
    normaliser: Tensor,
    backend: str,
    pos_logprobs: Optional[Tensor] = None,
    neg_logprobs: Optional[Tensor] = None,
    rollout_weights: Optional[Tensor] = None,
    clip_range: Tuple[Optional[Tensor], Optional[Tensor]] = (None, None),
    with_grads: bool = True,
) -> Tuple[Tensor, Dict[str, Tensor], Optional[Tensor], Optional[Tensor]]:
    """The policy loss, its metrics and its gradients w.r.t. the log-probs and entropy, computed together.

    Inputs are taken as already checked (see :func:`policy_loss`): [B, T] tensors except advantages ([B] or
    [B, T]); ``mask`` bool; ``normaliser`` the [3] aggregation denominators from :func:`aggregation_normaliser`
    (a 0-d D serves every term); ``backend`` "torch" or "triton"; ``pos_logprobs`` / ``neg_logprobs`` the teacher
    log-probs of ``config.credit`` (see :func:`check_credit_inputs`); ``rollout_weights`` the precomputed rollout
    weights; ``clip_range`` the call's (ε_lo, ε_hi) tensors, [B] or [B, T], or (None, None) (see
    :func:`check_clip_range`). The gradients are the kernel's, or (torch) autograd's on the per-token loss
    alone: nothing here joins the caller's autograd graph. ``with_grads=False`` (the one-pass fused loss, whose
    chunks formed them) skips the torch gradients and returns None for both.

    Returns:
        (loss, metrics, grad_logprobs, grad_entropy): the 0-d loss (float32, float64 for float64 log-probs on the
        torch backend), the metric dict of :func:`metric_names`, d(loss)/d(logprobs) [B, T] in logprobs' dtype,
        and d(loss)/d(entropy) [B, T] in entropy's dtype, or None when entropy is None or entropy_coef is 0.
        Multiply both gradients by the upstream gradient of the loss.
    """
    write_grad_entropy = entropy is not None and config.entropy_coef != 0.0
    # What the kernel lacks (_kernel_supports, precomputed rollout weights, clip ranges given as tensors) runs the
    # torch formulas on the same device instead: never an option silently dropped.
    if (not uses_kernels(backend) or logprobs.numel() == 0 or not _kernel_supports(config)
            or rollout_weights is not None or clip_range[0] is not None):
        stats, grad, grad_ent = _torch_rows(write_grad_entropy, with_grads, logprobs, entropy, old_logprobs,
                                            advantages, mask, ref_logprobs, rollout_logprobs, config, normaliser,
                                            pos_logprobs, neg_logprobs, rollout_weights, clip_range)
    else:
        stats, grad, grad_ent = kernels("policy").policy_loss_rows(
            config, logprobs, old_logprobs, advantages, mask, ref_logprobs, rollout_logprobs, entropy,
            normaliser.reshape(-1)[:1], *clip_metric_bounds(config), pos_logprobs, neg_logprobs)
    names = metric_names(config, ref_logprobs is not None, entropy is not None, rollout_logprobs is not None)
    metrics = _metrics_from_stats(stats, names)
    loss = stats[:, _S["loss"]].sum()
    grad = grad.to(logprobs.dtype) if grad is not None else None
    grad_ent = grad_ent.to(entropy.dtype) if grad_ent is not None else None
    return loss, metrics, grad, grad_ent


# --- autograd -----------------------------------------------------------------------------------------


# Both losses are torch.library custom ops with fake (meta) implementations and registered autograd, so that
# torch.compile(fullgraph=True) sees one node each and CUDA graphs can capture them. The config travels as its
# JSON key; absent optional results travel as empty tensors (an op cannot return None).


def _packed(metrics: Dict[str, Tensor], loss: Tensor) -> Tensor:
    """The metrics as one tensor in metric_names order (an op output; never differentiated)."""
    if not metrics:
        return loss.new_empty(EMPTY)
    return torch.stack([m.to(loss.dtype) for m in metrics.values()])


def _fake_outputs(x: Tensor, config: LossConfig, has_ref: bool, has_entropy: bool, has_rollout: bool):
    cd = compute_dtype(x.dtype)
    n_metrics = len(metric_names(config, has_ref, has_entropy, has_rollout))
    return x.new_empty((), dtype=cd), x.new_empty((n_metrics,), dtype=cd)


def policy_loss_impl(logprobs: Tensor, entropy: Optional[Tensor], old_logprobs: Optional[Tensor],
                     advantages: Tensor, mask: Tensor, ref_logprobs: Optional[Tensor],
                     rollout_logprobs: Optional[Tensor], pos_logprobs: Optional[Tensor],
                     neg_logprobs: Optional[Tensor], rollout_weights: Optional[Tensor],
                     epsilon_low: Optional[Tensor], epsilon_high: Optional[Tensor], normaliser: Tensor,
                     config: str, backend: str) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """(loss, packed metrics, d(loss)/dℓ, d(loss)/dH or empty) of :func:`policy_loss_and_grads`."""
    cfg = LossConfig.from_key(config)
    loss, metrics, grad, grad_ent = policy_loss_and_grads(
        logprobs, entropy, old_logprobs, advantages, mask, ref_logprobs, rollout_logprobs, cfg, normaliser, backend,
        pos_logprobs, neg_logprobs, rollout_weights, (epsilon_low, epsilon_high))
    return loss, _packed(metrics, loss), grad, grad_ent if grad_ent is not None else logprobs.new_empty(EMPTY)


_policy_loss_op = torch.library.custom_op("rlloss::policy_loss", policy_loss_impl, mutates_args=())


@_policy_loss_op.register_fake
def _(logprobs, entropy, old_logprobs, advantages, mask, ref_logprobs, rollout_logprobs, pos_logprobs, neg_logprobs,
      rollout_weights, epsilon_low, epsilon_high, normaliser, config, backend):
    cfg = LossConfig.from_key(config)
    loss, packed = _fake_outputs(logprobs, cfg, ref_logprobs is not None, entropy is not None,
                                 rollout_logprobs is not None)
    writes_ent = entropy is not None and cfg.entropy_coef != 0.0
    return loss, packed, torch.empty_like(logprobs), torch.empty_like(entropy) if writes_ent else logprobs.new_empty(EMPTY)


def _policy_loss_setup(ctx, inputs, output):
    ctx.mark_non_differentiable(*output[1:])
    ctx.save_for_backward(output[2], output[3])
    ctx.has_grad_ent = output[3].numel() > 0  # empty without entropy or with entropy_coef = 0
    ctx.set_materialize_grads(False)


def _policy_loss_backward(ctx, g_loss, *_):
    needs = (ctx.needs_input_grad[0], ctx.needs_input_grad[1] and ctx.has_grad_ent)
    return tuple(g * g_loss.to(g.dtype) if n and g_loss is not None else None
                 for g, n in zip(ctx.saved_tensors, needs)) + (None,) * 13


_policy_loss_op.register_autograd(_policy_loss_backward, setup_context=_policy_loss_setup)


# --- public API ---------------------------------------------------------------------------------------


def _optional_logprobs(name: str, x, shape, config: LossConfig, *needed_when: Tuple[str, str]) -> Optional[Tensor]:
    """``x`` checked as [B, T] = ``shape`` floating like logprobs, or None, which is an error while a config field
    of ``needed_when`` ((field, why) pairs) is set (neither None nor 0)."""
    if x is not None:
        return _checks.float_like(name, x, shape, "logprobs")
    for field, why in needed_when:
        value = getattr(config, field)
        if value is not None and value != 0.0:
            raise ValueError(f"{name} is required when config.{field} = {value!r}{why}, got None")
    return None


def _check_loss_inputs(shape, config: LossConfig, check_values: bool, old_logprobs, advantages, mask, ref_logprobs,
                       rollout_logprobs, pos_logprobs, neg_logprobs, rollout_weights, epsilon_low, epsilon_high,
                       **others: Optional[Tensor]) -> Dict[str, Optional[Tensor]]:
    """The per-token inputs of :func:`policy_loss` and :func:`fused_policy_loss` over [B, T] = ``shape`` checked
    against ``config`` (host side), as a dict in the order both ops take them (the mask bool; the teacher log-probs,
    rollout weights and clip ranges detached). ``others`` (the caller's own tensors) join the device check.

    ``rollout_weights`` are final weights: they exclude ``config.rollout_correction`` (which forms weights from
    ``rollout_logprobs``); ``config.rollout_rs`` needs ``rollout_logprobs``."""
    B = shape[0]
    old_logprobs = _optional_logprobs("old_logprobs", old_logprobs, shape, config)
    advantages = _checks.advantages(advantages, shape)
    mask = _checks.mask(mask, shape, check_values)
    ref_logprobs = _optional_logprobs("ref_logprobs", ref_logprobs, shape, config, ("beta", " ≠ 0"))
    rollout_logprobs = _optional_logprobs("rollout_logprobs", rollout_logprobs, shape, config,
                                          ("rollout_correction", ""), ("rollout_rs", ""))
    pos_logprobs, neg_logprobs = check_credit_inputs(shape, pos_logprobs, neg_logprobs, config)
    if rollout_weights is not None:
        if config.rollout_correction is not None:
            raise ValueError(f"rollout_weights and config.rollout_correction = {config.rollout_correction!r} were "
                             "both given: the weights are either precomputed (rollout_weights) or formed from "
                             "rollout_logprobs (rollout_correction), not both")
        rollout_weights = _checks.float_like("rollout_weights", rollout_weights, shape, "logprobs").detach()
    epsilon_low, epsilon_high = check_clip_range(shape, epsilon_low, epsilon_high, config, check_values)
    inputs = dict(old_logprobs=old_logprobs, advantages=advantages, mask=mask, ref_logprobs=ref_logprobs,
                  rollout_logprobs=rollout_logprobs, pos_logprobs=pos_logprobs, neg_logprobs=neg_logprobs,
                  rollout_weights=rollout_weights, epsilon_low=epsilon_low, epsilon_high=epsilon_high)
    _checks.same_device(**others, **inputs)
    return inputs


def check_credit_inputs(shape, pos_logprobs, neg_logprobs, config):
    """Check the teacher log-probs of ``config.credit`` (docs/math.md §7) over [B, T] = ``shape`` (host side).

    "cepo" needs ``pos_logprobs`` and ``neg_logprobs``; "rlsd" needs ``pos_logprobs`` only (its base is
    old_logprobs, or sg(ℓ) on-policy); without a credit mode neither may be given. Returns (pos, neg), detached.
    """
    mode = config.credit
    if mode is None:
        for name, x in (("pos_logprobs", pos_logprobs), ("neg_logprobs", neg_logprobs)):
            if x is not None:
                raise ValueError(f"{name} was given but config.credit is None; set LossConfig(credit='cepo' or "
                                 "'rlsd') to use the contrastive-teacher credit")
        return None, None
    if pos_logprobs is None:
        raise ValueError(f"pos_logprobs (ℓ⁺, the teacher shown the correct answer) is required when "
                         f"config.credit = {mode!r}, got None")
    pos_logprobs = _checks.float_like("pos_logprobs", pos_logprobs, shape, "logprobs").detach()
    if mode == "cepo":
        if neg_logprobs is None:
            raise ValueError("neg_logprobs (ℓ⁻, the teacher shown a wrong answer) is required when "
                             "config.credit = 'cepo', got None")
        neg_logprobs = _checks.float_like("neg_logprobs", neg_logprobs, shape, "logprobs").detach()
    elif neg_logprobs is not None:
        raise ValueError("neg_logprobs is not used when config.credit = 'rlsd' (its base is old_logprobs, or "
                         "sg(logprobs) on-policy); use credit='cepo' to contrast with a wrong answer")
    return pos_logprobs, neg_logprobs


# The loss modes whose surrogate clips each token's ratio by [1 − ε_lo, 1 + ε_hi] (or ε_hi): the ones that take
# per-sequence or per-token clip ranges.
CLIP_RANGE_MODES = ("ppo_clip", "cispo_trl", "cispo_verl")


def check_clip_range(shape, epsilon_low, epsilon_high, config: LossConfig, check_values: bool = True):
    """Check the call's clip ranges (docs/math.md §9) over [B, T] = ``shape`` (host side).

    Each of ``epsilon_low`` / ``epsilon_high`` is None or a floating tensor of shape [B], [B, 1] or [B, T] (per
    sequence, e.g. per group, or per token). When one is given, the other defaults to the config's value. With
    ``check_values``, ε_lo must lie in [0, 1] and ε_hi be ≥ 0 (> 0 for ``cispo_trl``) everywhere (one host
    read). Returns (ε_lo, ε_hi) as detached [B] or [B, T] tensors, or (None, None).
    """
    if epsilon_low is None and epsilon_high is None:
        return None, None
    if config.loss_mode not in CLIP_RANGE_MODES:
        raise ValueError(f"epsilon_low / epsilon_high tensors need a loss mode with a per-token clip range "
                         f"{CLIP_RANGE_MODES}, got config.loss_mode = {config.loss_mode!r}")
    B = shape[0]
    checked = {}
    for name, x in (("epsilon_low", epsilon_low), ("epsilon_high", epsilon_high)):
        if x is not None:
            x = _checks.tensor(name, x)
            _checks.dtype_in(name, x, _checks.FLOAT_DTYPES)
            x = x[:, 0] if x.shape == (B, 1) else x
            if x.shape != (B,) and x.shape != shape:
                raise ValueError(f"{name} must be [B] = ({B},), [B, 1] or [B, T] = {tuple(shape)} (a clip range "
                                 f"per sequence or per token), got {tuple(x.shape)}")
            checked[name] = x.detach()
    device = next(iter(checked.values())).device
    lo, hi = (checked[name] if name in checked else
              torch.full((B,), getattr(config, name), dtype=torch.float32, device=device)
              for name in ("epsilon_low", "epsilon_high"))
    if check_values:
        high_ok = hi > 0 if config.loss_mode == "cispo_trl" else hi >= 0
        for x, ok, rule in ((lo, (lo >= 0) & (lo <= 1), "epsilon_low must lie in [0, 1] everywhere"),
                            (hi, high_ok, "epsilon_high must be >= 0 everywhere (> 0 for loss_mode='cispo_trl')")):
            if x.numel() and not bool(ok.all()):  # one host sync
                raise ValueError(f"{rule}, got e.g. {x[~ok].flatten()[0].item()}")
    return lo, hi


def policy_loss(
    logprobs: Tensor,
    old_logprobs: Optional[Tensor],
    advantages: Tensor,
    mask: Tensor,
    *,
    config: LossConfig,
    ref_logprobs: Optional[Tensor] = None,
    entropy: Optional[Tensor] = None,
    rollout_logprobs: Optional[Tensor] = None,
    num_items_in_batch: Union[int, Tensor, None] = None,
    num_sequences_in_batch: Union[int, Tensor, None] = None,
    pos_logprobs: Optional[Tensor] = None,
    neg_logprobs: Optional[Tensor] = None,
    epsilon_low: Optional[Tensor] = None,
    epsilon_high: Optional[Tensor] = None,
    rollout_weights: Optional[Tensor] = None,
    check_inputs: bool = True,
    backend: Optional[str] = None,
) -> PolicyLossOutput:
    """The policy loss of the GRPO family (docs/math.md §3–§6) as one scalar, with TRL-style metrics.

    Per token: L_t = w_t·P_t + β·KL_t − c_H·H_t, where P is the surrogate of ``config.loss_mode`` on the ratio
    of ``config.importance_sampling_level``, w the detached rollout weight, KL the chosen estimator against
    ``ref_logprobs``; then aggregated by ``config.aggregation``. Differentiable w.r.t. ``logprobs`` and
    ``entropy``; gradients are computed with the value (by the kernel, or by autograd on the per-token loss). From
    hidden states and the lm_head weight, :func:`fused_policy_loss` takes the same arguments in the same order
    (``logprobs`` → ``hidden, weight, targets``). TRL's and verl's names for these arguments: docs/api/policy_loss.md.

    Args:
        logprobs: [B, T] log-probs of the sampled tokens under the current policy (float32; float64 too on the
            ``torch`` and ``reference`` backends; float16/bfloat16 on the kernel backends).
        old_logprobs: [B, T] log-probs under the policy that sampled the batch (ℓ°), or None for on-policy
            (ℓ° = sg(ℓ), ratio 1 with the gradient of ρ).
        advantages: [B] per sequence or [B, T] per token.
        mask: [B, T] bool or 0/1 number: the completion tokens that count. Masked tokens contribute exactly 0
            and get exactly zero gradient whatever their inputs hold (inf and NaN included).
        config: a :class:`LossConfig` (e.g. ``LossConfig.preset("dapo")``).
        ref_logprobs: [B, T] reference-model log-probs; required when ``config.beta`` ≠ 0.
        entropy: [B, T] token entropies; required when ``config.entropy_coef`` ≠ 0; differentiable.
        rollout_logprobs: [B, T] log-probs from the inference engine (ℓˢ); required when
            ``config.rollout_correction`` is set (without it, only its divergence metrics are reported).
        num_items_in_batch: global token count N for ``token_mean`` (int or 0-d tensor, > 0); None = local
            Σ mask. Under DDP gradient averaging pass N_global / world_size, as TRL does.
        num_sequences_in_batch: global sequence count B for the ``seq_mean_*`` aggregations; None = local B.
        pos_logprobs: [B, T] teacher log-probs ℓ⁺ (the model shown the correct answer); required when
            ``config.credit`` is set, which then replaces A by Â of docs/math.md §7 inside the loss.
        neg_logprobs: [B, T] teacher log-probs ℓ⁻ (shown a wrong answer); required for ``credit="cepo"``.
            With ``credit="rlsd"`` the base is ``old_logprobs``, or sg(ℓ) when that is None.
        epsilon_low, epsilon_high: clip ranges per sequence ([B] or [B, 1], e.g. one per group) or per token
            ([B, T]), floating, replacing ``config.epsilon_low`` / ``epsilon_high`` in the surrogate and the
            clip metrics (docs/math.md §9: ETR's elastic trust regions); one given alone keeps the config's
            other. For the loss modes with a per-token clip range (ppo_clip, cispo_trl, cispo_verl); computed by
            the torch formulas on every backend (the Triton kernel has scalar ε).
        rollout_weights: [B, T] precomputed, detached rollout weights w (a trainer's importance-sampling weights,
            e.g. TRL's ``importance_sampling_ratio`` or verl's ``rollout_is_weights``) multiplying the policy term
            (vespo folds them into its sequence ratio, geo_mean takes their geometric mean per sequence, as the
            peers do). An alternative to ``config.rollout_correction``: giving both is an error.
        check_inputs: run the checks that read device values (a non-bool mask holds only 0/1, tensor counts
            finite and > 0, clip ranges in range). With False the call never synchronises with the host (except
            clip_cov and kl_cov, whose selections are host-side as in verl, and the selection options of
            docs/math.md §9, which read a quantile).
        backend: "triton", "torch" or "reference"; default from ``RLLOSS_BACKEND`` or the device. On "triton",
            what the kernel does not implement (per-term aggregations, "k1+" / "abs+", the verl and TRL loss
            variants, ``rollout_weights``, the selection options, clip ranges as tensors: docs/api/policy_loss.md,
            "Lower level") runs the torch formulas on the same device instead.

    Returns:
        :class:`PolicyLossOutput` (loss, metrics).

    Raises:
        TypeError: non-tensor arguments, non-floating dtypes, a config that is not a LossConfig.
        ValueError: wrong shapes, a missing ref_logprobs / entropy / rollout_logprobs / pos_logprobs /
            neg_logprobs the config needs (or teacher log-probs given without ``config.credit``), a non-0/1
            mask, non-positive global counts, tensors on different devices, an unusable backend.
    """
    _checks.instance("config", config, LossConfig, "a rlloss.LossConfig")
    _checks.boolean("check_inputs", check_inputs)
    logprobs = _checks.tensor("logprobs", logprobs)
    _checks.ndim("logprobs", logprobs, 2, "[B, T]")
    shape = logprobs.shape
    entropy = _optional_logprobs("entropy", entropy, shape, config, ("entropy_coef", " ≠ 0"),
                                 ("token_select", " (its score needs H)"))
    inputs = _check_loss_inputs(shape, config, check_inputs, old_logprobs, advantages, mask, ref_logprobs,
                                rollout_logprobs, pos_logprobs, neg_logprobs, rollout_weights, epsilon_low,
                                epsilon_high, logprobs=logprobs, entropy=entropy)
    name = resolve_backend(backend, logprobs.device)
    _checks.dtype_in("logprobs", logprobs, accepted_dtypes(name))

    if is_reference(name):
        return _reference_policy_loss(logprobs, entropy, inputs, config, num_items_in_batch, num_sequences_in_batch)

    old = logprobs.detach() if old_logprobs is None else inputs["old_logprobs"]
    inputs["mask"], inputs["rollout_weights"] = apply_rollout_rs_and_normalise(
        config, inputs["mask"], old, inputs["rollout_logprobs"], inputs["rollout_weights"])
    normaliser = aggregation_normaliser(config, inputs["mask"], num_items_in_batch, num_sequences_in_batch,
                                        check_inputs)
    loss, packed, _, _ = _policy_loss_op(logprobs, entropy, *inputs.values(), normaliser, config.key, name)
    names = metric_names(config, ref_logprobs is not None, entropy is not None, rollout_logprobs is not None)
    return PolicyLossOutput(loss, dict(zip(names, packed.unbind(0))))


def _reference_policy_loss(logprobs, entropy, inputs, config, num_items_in_batch, num_sequences_in_batch):
    """:func:`policy_loss` on the reference backend, from checked inputs (:func:`_check_loss_inputs`)."""
    out_dtype = compute_dtype(logprobs.dtype)
    loss, metrics = reference.policy_loss(logprobs, config=config, entropy=entropy,
                                          num_items_in_batch=num_items_in_batch,
                                          num_sequences_in_batch=num_sequences_in_batch, **inputs)
    return PolicyLossOutput(loss.to(out_dtype), {k: v.to(out_dtype) for k, v in metrics.items()})


# --- hidden states to loss in one call ----------------------------------------------------------------


def one_pass(config: LossConfig, on_policy: bool, has_rollout: bool) -> bool:
    """Whether every token's loss gradient is local, so the fused loss can form dz in its forward (6·N·D·V
    FLOPs). Sequence-level ratios (GSPO), an on-policy sequence-level rollout weight, the loss modes of
    NON_LOCAL_LOSS_MODES (geo_mean, vespo: a sequence quantity; clip_cov, kl_cov: a batch ranking) and the
    selection options (docs/math.md §9: a quantile over the batch or each whole sequence's log-probs) need the
    log-probs of a whole sequence or batch first: statistics, then one recompute pass (8·N·D·V)."""
    if config.importance_sampling_level != "token" or config.loss_mode in NON_LOCAL_LOSS_MODES or config.selects:
        return False
    sequence_rollout = config.rollout_correction is not None and config.rollout_correction.startswith("sequence")
    return not (on_policy and has_rollout and sequence_rollout)


def fused_pass(
    hidden: Tensor, weight: Tensor, bias: Optional[Tensor], targets: Tensor, old_logprobs: Optional[Tensor],
    advantages: Tensor, mask: Tensor, ref_logprobs: Optional[Tensor], rollout_logprobs: Optional[Tensor],
    pos_logprobs: Optional[Tensor], neg_logprobs: Optional[Tensor], rollout_weights: Optional[Tensor],
    epsilon_low: Optional[Tensor], epsilon_high: Optional[Tensor], normaliser: Tensor, config: str,
    needs: List[bool], options: LinearOptions, shard: Optional[VocabShard] = None,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(loss, packed metrics, dh, dW, db, shift, total, ratio, d(loss)/dℓ, d(loss)/dH) from hidden [N, D].

    One pass when every token's gradient is local (see :func:`one_pass`): each chunk's statistics give its
    log-probs and entropy, :func:`token_gradients` their loss gradients, and the pass forms dz and both gradient
    products right away (dh, dW, db come back; the rest is empty) — the backward only scales them. Otherwise
    statistics only: (shift, total, ratio) and the [B, T] loss gradients come back for one recompute in the
    backward. The loss value and metrics come from the torch formulas (:func:`_torch_rows`) on the [B, T]
    log-probs in both cases, so value and gradients share their formulas. With ``shard`` (a vocabulary-sharded
    weight, ``rlloss.distributed``) dh, dW and db are this shard's parts: dh is summed over the shards by the caller.
    """
    cfg = LossConfig.from_key(config)
    shape = mask.shape
    fused = any(needs) and one_pass(cfg, old_logprobs is None, rollout_logprobs is not None)
    upstream = None
    if fused:
        tokens, _ = prepare_tokens(cfg, mask, old_logprobs, advantages, ref_logprobs, rollout_logprobs, normaliser,
                                   pos_logprobs, neg_logprobs, compute_dtype(hidden.dtype), rollout_weights,
                                   (epsilon_low, epsilon_high))
        write_grad_entropy = cfg.entropy_coef != 0.0

        def upstream(begin, end, logp, entropy):
            return token_gradients(cfg, logp, entropy, tokens.rows(begin, end), write_grad_entropy)

    result = run_pass(hidden, weight, bias, targets, options, upstream=upstream, needs=tuple(needs), shard=shard)
    loss, metrics, grad, grad_ent = policy_loss_and_grads(
        result.logprobs.view(shape), result.entropy.view(shape), old_logprobs, advantages, mask, ref_logprobs,
        rollout_logprobs, cfg, normaliser, TORCH, pos_logprobs, neg_logprobs, rollout_weights,
        (epsilon_low, epsilon_high), with_grads=not fused)  # one pass: the chunks formed them
    if fused:
        return _fused_outputs(hidden, loss, _packed(metrics, loss), grads=result[3:])
    return _fused_outputs(hidden, loss, _packed(metrics, loss), recompute=(*result.stats[:3], grad, grad_ent))


def _fused_outputs(hidden: Tensor, loss: Tensor, packed: Tensor, grads=(None,) * 3, recompute=(None,) * 5):
    """The fused op's outputs (loss, packed metrics, dh, dW, db, shift, total, ratio, d(loss)/dℓ, d(loss)/dH):
    the gradients of one pass, or what the recompute of the backward needs; each absent one empty."""
    return (loss, packed) + tuple(hidden.new_empty(EMPTY) if t is None else t for t in (*grads, *recompute))


def fused_policy_loss_impl(
    hidden: Tensor, weight: Tensor, bias: Optional[Tensor], targets: Tensor, old_logprobs: Optional[Tensor],
    advantages: Tensor, mask: Tensor, ref_logprobs: Optional[Tensor], rollout_logprobs: Optional[Tensor],
    pos_logprobs: Optional[Tensor], neg_logprobs: Optional[Tensor], rollout_weights: Optional[Tensor],
    epsilon_low: Optional[Tensor], epsilon_high: Optional[Tensor], normaliser: Tensor, config: str,
    needs: List[bool], temperature: float, softcap: Optional[float], ignore_index: int, backend: str,
    max_scratch_bytes: int, batch_invariant: bool,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The registered op: :func:`fused_pass` on one device."""
    options = LinearOptions(temperature, softcap, ignore_index, backend, max_scratch_bytes, batch_invariant)
    return fused_pass(hidden, weight, bias, targets, old_logprobs, advantages, mask, ref_logprobs, rollout_logprobs,
                      pos_logprobs, neg_logprobs, rollout_weights, epsilon_low, epsilon_high, normaliser, config,
                      needs, options)


_fused_policy_loss_op = torch.library.custom_op("rlloss::fused_policy_loss", fused_policy_loss_impl, mutates_args=())


@_fused_policy_loss_op.register_fake
def _(hidden, weight, bias, targets, old_logprobs, advantages, mask, ref_logprobs, rollout_logprobs, pos_logprobs,
      neg_logprobs, rollout_weights, epsilon_low, epsilon_high, normaliser, config, needs, *options):
    cfg = LossConfig.from_key(config)
    loss, packed = _fake_outputs(hidden, cfg, ref_logprobs is not None, True, rollout_logprobs is not None)
    if any(needs) and one_pass(cfg, old_logprobs is None, rollout_logprobs is not None):
        return _fused_outputs(hidden, loss, packed, grads=tuple(
            torch.empty_like(t) if n and t is not None else None for t, n in zip((hidden, weight, bias), needs)))
    cd = compute_dtype(hidden.dtype)
    stats = tuple(hidden.new_empty((hidden.shape[0],), dtype=cd) for _ in range(3))
    grad_ent = hidden.new_empty(mask.shape, dtype=cd) if cfg.entropy_coef != 0.0 else None
    return _fused_outputs(hidden, loss, packed, recompute=(*stats, hidden.new_empty(mask.shape, dtype=cd), grad_ent))


def save_fused(ctx, linear: tuple, output: tuple, needs) -> None:
    """Save for :func:`fused_grads` from the outputs of :func:`fused_pass`: the gradients of one pass, or
    ``linear`` (hidden, weight, bias, targets), the statistics and the loss gradients for the recompute."""
    ctx.needs = needs
    ctx.fused = any(output[k].shape != (0,) for k in (2, 3, 4))  # gradients formed in the pass (one pass)
    ctx.has_grad_ent = output[9].numel() > 0
    if ctx.fused:
        ctx.save_for_backward(*output[2:5])
    else:
        ctx.save_for_backward(*linear, *output[5:10])
    ctx.set_materialize_grads(False)


def fused_grads(ctx, g_loss, recompute) -> tuple:
    """(dh, dW, db) of the fused loss for the upstream ``g_loss``: the one-pass gradients scaled, or
    ``recompute(g_logp [N], g_ent [N] or None)`` from what :func:`save_fused` saved."""
    if g_loss is None or not any(ctx.needs):
        return (None,) * 3
    if ctx.fused:
        return tuple(g * g_loss.to(g.dtype) if n else None for g, n in zip(ctx.saved_tensors, ctx.needs))
    grad, grad_ent = ctx.saved_tensors[7:]
    g_logp = (grad * g_loss.to(grad.dtype)).reshape(-1)
    g_ent = (grad_ent * g_loss.to(grad_ent.dtype)).reshape(-1) if ctx.has_grad_ent else None
    return recompute(g_logp, g_ent)


def _fused_setup(ctx, inputs, output):
    ctx.mark_non_differentiable(*output[1:])
    ctx.options = inputs[17:]
    save_fused(ctx, inputs[:4], output, inputs[16])


def _fused_backward(ctx, g_loss, *_):
    def recompute(g_logp, g_ent):
        needs = [bool(n) for n in ctx.needs]
        grads = torch.ops.rlloss.token_logprobs_backward(g_logp, g_ent, *ctx.saved_tensors[:7], needs, *ctx.options)
        return tuple(g if n else None for g, n in zip(grads, needs))

    return (*fused_grads(ctx, g_loss, recompute), None) + (None,) * 19


_fused_policy_loss_op.register_autograd(_fused_backward, setup_context=_fused_setup)


def fused_policy_loss(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    old_logprobs: Optional[Tensor],
    advantages: Tensor,
    mask: Tensor,
    *,
    config: LossConfig,
    bias: Optional[Tensor] = None,
    ref_logprobs: Optional[Tensor] = None,
    rollout_logprobs: Optional[Tensor] = None,
    pos_logprobs: Optional[Tensor] = None,
    neg_logprobs: Optional[Tensor] = None,
    rollout_weights: Optional[Tensor] = None,
    epsilon_low: Optional[Tensor] = None,
    epsilon_high: Optional[Tensor] = None,
    temperature: float = 1.0,
    softcap: Optional[float] = None,
    num_items_in_batch: Union[int, Tensor, None] = None,
    num_sequences_in_batch: Union[int, Tensor, None] = None,
    max_scratch_bytes: Optional[int] = None,
    batch_invariant: bool = False,
    process_group=None,
    check_inputs: bool = True,
    backend: Optional[str] = None,
) -> PolicyLossOutput:
    """Hidden states to the scalar policy loss in one call: :func:`rlloss.token_logprobs` (log-probs and
    entropy straight from the lm_head, never [tokens × vocab] logits) fused with :func:`policy_loss`, whose
    argument order it keeps with ``logprobs`` replaced by (``hidden``, ``weight``, ``targets``).

    Token-level losses run forward and backward as one chunked pass (6·N·D·V FLOPs, as a naive implementation, at a
    bounded memory); those that need a whole sequence's or batch's log-probs first (GSPO, geo_mean, clip_cov,
    kl_cov, vespo, the selection options) take statistics, then one recompute (8·N·D·V): docs/design/logprobs.md.
    The value and gradients equal
    ``policy_loss(token_logprobs(hidden, weight, targets, ...).logprobs, old_logprobs, advantages, mask, ...)``.

    Args:
        hidden: [B, T, D] final hidden states at the positions that predict each completion token
            (float16, bfloat16, float32; float64 on the torch/reference backends).
        weight: [V, D] lm_head weight, hidden's dtype.
        targets: [B, T] int64 completion token ids; must lie in [0, V) where ``mask`` is 1 (anything
            elsewhere: those positions are never read).
        old_logprobs, advantages, mask, config: as in :func:`policy_loss`.
        bias: optional [V] lm_head bias.
        ref_logprobs, rollout_logprobs, num_items_in_batch, num_sequences_in_batch: as in :func:`policy_loss`.
        pos_logprobs, neg_logprobs: [B, T] teacher log-probs for ``config.credit`` (docs/math.md §7), as in
            :func:`policy_loss`: the credit Â is formed inside the loss from them.
        rollout_weights: [B, T] precomputed rollout weights, as in :func:`policy_loss`.
            ``config.rollout_is_batch_normalize`` and ``config.rollout_rs`` need ``old_logprobs`` here (on-policy
            they depend on the log-probs this call computes: use token_logprobs and policy_loss).
        epsilon_low, epsilon_high: clip ranges per sequence ([B], [B, 1]) or per token ([B, T]), as in
            :func:`policy_loss` (docs/math.md §9); they keep the one-pass route.
        temperature: T > 0 dividing the logits, as in :func:`token_logprobs`.
        softcap: optional logit soft-cap c > 0 (``c·tanh(x/c)`` before the temperature), as in token_logprobs.
        max_scratch_bytes: bound on the logit scratch of one chunk of tokens, as in token_logprobs (None: 256 MiB
            on CUDA, 64 MiB elsewhere).
        batch_invariant: each token's log-prob bitwise independent of the batch, as in token_logprobs.
        process_group: a ``torch.distributed`` group over which the lm_head is sharded by vocabulary rows, as in
            token_logprobs: ``weight`` (and ``bias``) are this rank's rows, everything else is the same on every
            rank; the statistics are merged per chunk, so the one-pass losses stay one pass, and the loss and the
            hidden states' gradient are the unsharded ones on every rank (docs/distributed.md).
        check_inputs: run the checks that read device values (targets in range, a non-bool mask holds only
            0/1, tensor counts finite and > 0). With False the call never synchronises with the host.
        backend: "triton", "torch" or "reference"; default from ``RLLOSS_BACKEND`` or the device.

    Returns:
        :class:`PolicyLossOutput` (loss, metrics); the metrics include the mean entropy (free here).
        The loss is differentiable w.r.t. hidden, weight and bias.

    Raises:
        TypeError, ValueError: as :func:`policy_loss` and :func:`token_logprobs`, naming the argument.

    Example:
        >>> out = fused_policy_loss(hidden, lm_head.weight, completion_ids, old_logprobs, advantages,
        ...                         completion_mask, config=LossConfig.preset("dapo"))
        >>> out.loss.backward()
    """
    _checks.instance("config", config, LossConfig, "a rlloss.LossConfig")
    check = _checks.boolean("check_inputs", check_inputs)
    hidden = _checks.tensor("hidden", hidden)
    _checks.ndim("hidden", hidden, 3, "[B, T, D]")
    targets = _checks.tensor("targets", targets)
    shape = hidden.shape[:2]
    _checks.shape("targets", targets, shape, "[B, T]")
    inputs = _check_loss_inputs(shape, config, check, old_logprobs, advantages, mask, ref_logprobs,
                                rollout_logprobs, pos_logprobs, neg_logprobs, rollout_weights, epsilon_low,
                                epsilon_high, hidden=hidden, targets=targets)
    if old_logprobs is None and (config.rollout_rs is not None or config.rollout_is_batch_normalize):
        option = "rollout_rs" if config.rollout_rs is not None else "rollout_is_batch_normalize"
        raise ValueError(f"fused_policy_loss needs old_logprobs with config.{option} (on-policy the rejection and "
                         "normalisation depend on the log-probs this call computes); use token_logprobs and "
                         "policy_loss, or pass old_logprobs")
    mask = inputs["mask"]
    linear = check_linear_inputs(hidden, weight, targets, bias, temperature=temperature, softcap=softcap,
                                 ignore_index=_checks.IGNORE_INDEX, backend=backend, max_scratch_bytes=max_scratch_bytes,
                                 batch_invariant=batch_invariant)
    V = linear.weight.shape[0]
    if process_group is not None:
        from . import distributed

        layout = distributed.vocab_layout(V, process_group, hidden.device, linear.options.backend)
        V = layout.vocab
    if check:  # targets where they count (one host sync)
        _checks.targets_in_range(torch.where(mask, linear.targets, 0), V, ignore_index=None)
    # Positions outside the mask become ignored tokens: their hidden rows are never read.
    kernel_targets = torch.where(mask, linear.targets, _checks.IGNORE_INDEX)
    linear = linear._replace(targets=kernel_targets)
    options = linear.options

    if is_reference(options.backend):
        logprobs, entropy = reference.token_logprobs(
            linear.hidden, linear.weight, kernel_targets, bias=linear.bias, temperature=options.temperature,
            softcap=options.softcap, ignore_index=_checks.IGNORE_INDEX,
        )
        return _reference_policy_loss(logprobs, entropy, inputs, config, num_items_in_batch, num_sequences_in_batch)

    hidden_rows, weight, bias, flat_targets = prepare_linear(linear)
    inputs["mask"], inputs["rollout_weights"] = apply_rollout_rs_and_normalise(
        config, mask, inputs["old_logprobs"], inputs["rollout_logprobs"], inputs["rollout_weights"])
    normaliser = aggregation_normaliser(config, inputs["mask"], num_items_in_batch, num_sequences_in_batch, check)
    needs = [torch.is_grad_enabled() and t is not None and t.requires_grad
             for t in (linear.hidden, linear.weight, linear.bias)]
    if process_group is not None:
        loss, packed = distributed.vocab_parallel_fused_loss(hidden_rows, weight, bias, flat_targets, inputs,
                                                             normaliser, config.key, needs, options, process_group,
                                                             layout)
    else:
        loss, packed, *_ = _fused_policy_loss_op(hidden_rows, weight, bias, flat_targets, *inputs.values(),
                                                 normaliser, config.key, needs, *options)
    names = metric_names(config, ref_logprobs is not None, True, rollout_logprobs is not None)
    return PolicyLossOutput(loss, dict(zip(names, packed.unbind(0))))


class FusedPolicyLoss(torch.nn.Module):
    """:func:`fused_policy_loss` as a module holding the config and the options of the logits: the loss of a
    trainer whose temperature, soft-cap, backend … are fixed, called each step with the batch.

    ``forward`` keeps its first release's argument order, (hidden, weight, targets, mask, advantages, *,
    old_logprobs=…), not :func:`policy_loss`'s (docs/api/fused_policy_loss.md).

    Args:
        config: the :class:`LossConfig` (e.g. ``LossConfig.preset("dapo")``).
        temperature: T > 0 dividing the logits, as in :func:`token_logprobs` (the sampling temperature).
        softcap: optional logit soft-cap c > 0 (``c·tanh(x/c)`` before the temperature), as in token_logprobs.
        max_scratch_bytes, batch_invariant, check_inputs, backend, process_group: as in :func:`fused_policy_loss`.

    Raises:
        TypeError: at construction, for a config that is not a LossConfig or a non-numeric temperature, softcap
            or max_scratch_bytes.
        ValueError: at construction, for a temperature or softcap that is not finite and > 0, a
            max_scratch_bytes ≤ 0, or an unknown backend name.

    Example:
        >>> loss_fn = FusedPolicyLoss(LossConfig.preset("dapo"), temperature=0.7)
        >>> out = loss_fn(hidden, lm_head.weight, completion_ids, completion_mask, advantages,
        ...               old_logprobs=old_logprobs)
        >>> out.loss.backward()
    """

    def __init__(self, config: LossConfig, *, temperature: float = 1.0, softcap: Optional[float] = None,
                 max_scratch_bytes: Optional[int] = None, batch_invariant: bool = False,
                 check_inputs: bool = True, backend: Optional[str] = None, process_group=None):
        super().__init__()
        _checks.instance("config", config, LossConfig, "a rlloss.LossConfig")
        options = check_options(temperature, softcap, _checks.IGNORE_INDEX, TORCH, max_scratch_bytes, batch_invariant)
        check_name(backend)
        _checks.boolean("check_inputs", check_inputs)
        self.config = config
        self.temperature = options.temperature
        self.softcap = options.softcap
        self.max_scratch_bytes = max_scratch_bytes
        self.batch_invariant = batch_invariant
        self.check_inputs = check_inputs
        self.backend = backend
        self.process_group = process_group

    def extra_repr(self) -> str:
        return (f"config={self.config!r}, temperature={self.temperature}, softcap={self.softcap}, "
                f"max_scratch_bytes={self.max_scratch_bytes}, batch_invariant={self.batch_invariant}, "
                f"check_inputs={self.check_inputs}, backend={self.backend!r}")

    def forward(
        self,
        hidden: Tensor,
        weight: Tensor,
        targets: Tensor,
        mask: Tensor,
        advantages: Tensor,
        *,
        bias: Optional[Tensor] = None,
        old_logprobs: Optional[Tensor] = None,
        ref_logprobs: Optional[Tensor] = None,
        rollout_logprobs: Optional[Tensor] = None,
        pos_logprobs: Optional[Tensor] = None,
        neg_logprobs: Optional[Tensor] = None,
        rollout_weights: Optional[Tensor] = None,
        num_items_in_batch: Union[int, Tensor, None] = None,
        num_sequences_in_batch: Union[int, Tensor, None] = None,
        epsilon_low: Optional[Tensor] = None,
        epsilon_high: Optional[Tensor] = None,
        temperature: Optional[float] = None,
    ) -> PolicyLossOutput:
        """:func:`fused_policy_loss` of these tensors with this module's config and options (see there for
        each argument). ``temperature=`` here is deprecated: it overrides the constructor's for this call, with
        a DeprecationWarning, for one release; pass it to the constructor (or call :func:`fused_policy_loss`)."""
        if temperature is None:
            temperature = self.temperature
        else:
            warn_deprecated("FusedPolicyLoss.forward(temperature=...) moved to the constructor, next to softcap: "
                            "FusedPolicyLoss(config, temperature=...), or call rlloss.fused_policy_loss",
                            stacklevel=5)  # the caller of Module.__call__
        return fused_policy_loss(
            hidden, weight, targets, old_logprobs, advantages, mask, config=self.config, bias=bias,
            ref_logprobs=ref_logprobs, rollout_logprobs=rollout_logprobs, pos_logprobs=pos_logprobs,
            neg_logprobs=neg_logprobs, rollout_weights=rollout_weights, epsilon_low=epsilon_low,
            epsilon_high=epsilon_high, temperature=temperature, softcap=self.softcap,
            num_items_in_batch=num_items_in_batch, num_sequences_in_batch=num_sequences_in_batch,
            max_scratch_bytes=self.max_scratch_bytes, batch_invariant=self.batch_invariant,
            process_group=self.process_group, check_inputs=self.check_inputs, backend=self.backend)
