"""Naive oracles straight from docs/math.md, for tests and benchmarks only.

Every function here is plain differentiable PyTorch that materialises whatever it needs ([N, V] logits
included) and keeps the dtype it is given, so calling it on float64 inputs gives the float64 ground truth
that every backend is held against. Nothing here is tuned; clarity wins over speed.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
from torch import Tensor

from .kernels.tables import VERL_KL_VALUE_CLAMP, VERL_LOG_RATIO_CLAMP


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
    logits = torch.where(valid.unsqueeze(-1), logits, torch.zeros((), dtype=logits.dtype))
    logp = torch.log_softmax(logits, dim=-1)
    safe_targets = torch.where(valid, targets, torch.zeros_like(targets))
    token_logp = logp.gather(-1, safe_targets.unsqueeze(-1)).squeeze(-1)
    p = logp.exp()  # a −inf logit has p = 0 and contributes 0 (never 0·(−inf))
    entropy = -(p * torch.where(p == 0, torch.zeros((), dtype=logits.dtype), logp)).sum(-1)
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


# --- docs/math.md §2: group advantages ---------------------------------------------------------------------


def _lower_median(x: Tensor) -> Tensor:
    """The lower median: the element of sorted rank ⌊(n−1)/2⌋, as torch.median returns it."""
    return x.sort().values[(x.numel() - 1) // 2]


def _whiten(x: Tensor, n: Tensor, eps: float) -> Tensor:
    """(x − μ)/√(σ² + ε), μ and σ² (unbiased, N − 1) over N = Σ n tokens, x_i counted n_i times."""
    N = n.sum()
    mean = (n * x).sum() / N if N > 0 else torch.zeros((), dtype=x.dtype)
    var = (n * (x - mean).square()).sum() / (N - 1) if N > 1 else torch.zeros((), dtype=x.dtype)
    root = (var + eps).sqrt()
    return (x - mean) / root if root > 0 else torch.zeros_like(x)


def _group_advantage(r: Tensor, mode: str, eps: float, batch_std: Tensor, alpha: Tensor, n: Tensor,
                     singleton: str) -> Tensor:
    """Advantages of one group of float64 rewards ``r`` [G] (docs/math.md §2); n [G] the token counts."""
    G = r.numel()
    zeros = torch.zeros_like(r)
    if G == 1 and singleton == "verl":  # verl: mean 0 and std 1 for a group of one
        scale = {"grpo": 1 / (1 + eps), "gpg": alpha}.get(mode, 1.0)
        return r * scale
    if bool((r == r[0]).all()):  # zero variance (a singleton included): exactly 0 in every mode
        return zeros
    if mode in ("median", "median_mad", "mc_grpo"):
        centered = r - _lower_median(r)
        if mode == "median":
            return centered
        scale = _lower_median(centered.abs()) + eps
        A = centered / scale if scale > 0 else zeros
        if mode == "mc_grpo":  # non-zero advantages times G / #{|A| > 1e-6}, G counting the pivot
            nonzero = A.abs() > 1e-6
            A = torch.where(nonzero, A * G / max(int(nonzero.sum()), 1), A)
        return A
    if mode == "rank_gaussian":
        less = (r[None, :] < r[:, None]).sum(1).to(r.dtype)
        ties = (r[None, :] == r[:, None]).sum(1).to(r.dtype)
        rank = less + (ties + 1) / 2  # 1-based, ties share their mean rank
        return torch.special.ndtri((rank - 0.5) / G)
    if mode in ("grpo_passk", "grpo_passk_no_std"):
        top = r.sort(descending=True).values
        gap = top[0] - top[1]  # second largest with multiplicity: a tied best gives 0
        if mode == "grpo_passk":
            gap = gap / (r.std() + eps) if r.std() + eps > 0 else zeros[0]
        return torch.where(r == top[0], gap, zeros)
    if mode == "opo":  # a group without any token gets 0
        return r - (n * r).sum() / n.sum() if n.sum() > 0 else zeros
    centered = r - r.mean()
    if mode in ("no_std", "reinforce_plus_plus_baseline"):
        return centered
    if mode == "rloo":
        return centered * G / (G - 1)
    if mode == "gpg":
        return alpha * centered
    scale = (r.std() if mode == "grpo" else batch_std) + eps
    return centered / scale if scale > 0 else zeros


def group_advantages(rewards: Tensor, group_sizes, *, mode: str = "grpo", eps: float = 1e-6,
                     singleton: str = "zero", response_lengths: Optional[Tensor] = None,
                     baselines: Optional[Tensor] = None, group_ids: Optional[Tensor] = None) -> Tensor:
    """Group-relative advantages [B] of ``rewards`` [B] split into consecutive groups of ``group_sizes``, or
    into the groups of equal ``group_ids`` (then ``group_sizes`` is None; members need not be adjacent).

    A plain loop over the groups, computed and returned in float64 whatever the rewards' dtype (advantages
    carry no gradient). Modes as in docs/math.md §2: grpo, no_std, batch_std, rloo, median, median_mad
    ((R − median)/(MAD + ε)), rank_gaussian, and verl's gpg, grpo_passk, grpo_passk_no_std, opo,
    reinforce_plus_plus, reinforce_plus_plus_baseline and remax (``response_lengths`` [B] the token counts of
    opo and the reinforce_plus_plus modes, ``baselines`` [B] remax's baseline rewards; ``group_sizes`` may be
    None for reinforce_plus_plus and remax). Medians are lower medians (torch.median); σ is unbiased; a group
    whose rewards are all equal gives exactly 0 (before the whitening of reinforce_plus_plus_baseline); a zero
    denominator (only possible with ε = 0) gives 0; ``singleton="verl"`` gives a group of one mean 0 and std 1.
    ε is the API's explicit value: it sits under the square root (σ² + ε) in the reinforce_plus_plus modes.
    The naive mean cannot resolve a spread far below the rewards' common offset (1e-2 on 1e12); every mode
    is translation invariant, so hand such rewards over with the offset taken off.
    """
    r = rewards.detach().to(torch.float64)
    n = (torch.ones_like(r) if response_lengths is None
         else response_lengths.detach().to(device=r.device, dtype=torch.float64))
    if mode == "remax":
        return r - baselines.detach().to(device=r.device, dtype=torch.float64)
    if mode == "reinforce_plus_plus":
        return _whiten(r, n, eps)
    # TRL's scale_rewards="batch": the unbiased std of all rewards (0 for a single reward).
    batch_std = r.std() if r.numel() > 1 else torch.zeros((), dtype=torch.float64)
    alpha = r.numel() / max(int(torch.count_nonzero(r)), 1)  # GPG: B / #{R ≠ 0}
    out = torch.zeros_like(r)
    if group_ids is not None:
        members = [(group_ids == g).nonzero().flatten() for g in group_ids.unique()]
    else:
        bounds = [0] + torch.tensor([int(s) for s in group_sizes]).cumsum(0).tolist()
        members = [torch.arange(a, b) for a, b in zip(bounds[:-1], bounds[1:])]
    for group in members:
        out[group] = _group_advantage(r[group], mode, eps, batch_std, alpha, n[group], singleton)
    if mode == "reinforce_plus_plus_baseline":
        return _whiten(out, n, eps)
    return out


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


def _masked_mean(x: Tensor, m: Tensor) -> Tensor:
    return (x * m).sum() / m.sum().clamp(min=1.0)


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
    """(loss, metrics) of docs/math.md §3–§6 by plain autograd, in logprobs' dtype; ``config`` is a LossConfig.

    Differentiable w.r.t. logprobs and entropy; stop-gradients are ``.detach()``. Masked tokens are replaced
    by 0 before any arithmetic (torch.where), so their inputs never reach the loss or a gradient. With
    ``config.credit`` set, A is replaced by the §7 credit :func:`contrastive_credit` (RLSD's base: ℓ°).
    ``rollout_weights`` are precomputed rollout weights. The peer variants (docs/math.md §4, §5) are written out
    below as their peers define them: the rollout weights are formed over the given mask, then verl's rejection
    sampling shrinks the mask of every term; clip_cov draws its tokens with torch.randperm on the default
    generator, as verl.
    docs/math.md §9: ``epsilon_low`` / ``epsilon_high`` ([B] or [B, T]) replace the config's ε; the selection
    of ``config.token_select`` / ``off_policy_mask_threshold`` multiplies the policy term (and, for the token
    selection, the entropy bonus) by a 0/1 mask.
    """
    dt = logprobs.dtype
    m = mask if mask.dtype == torch.bool else mask != 0
    zero = torch.zeros((), dtype=dt, device=logprobs.device)
    B, T = logprobs.shape

    def clean(x):  # with the mask of the moment (rejection sampling shrinks it)
        return torch.where(m, x.to(dt), zero)

    # §5 rollout weights w [B, T] (a sequence weight repeated over its row), over the mask as given
    w_roll = w_seq = None
    if rollout_weights is not None:
        w_roll = clean(rollout_weights).detach()
    old_given = clean(logprobs).detach() if old_logprobs is None else clean(old_logprobs)
    if rollout_logprobs is not None and config.rollout_correction is not None:
        token_level = config.rollout_correction.startswith("token")
        d = clean(old_given - rollout_logprobs.to(dt))
        w = torch.exp(d) if token_level else torch.exp(d.sum(-1))
        c_min = 0.0 if config.rollout_threshold_low is None else config.rollout_threshold_low
        c_max = config.rollout_threshold_high
        if config.rollout_correction.endswith("truncate"):
            w = torch.clamp(w, c_min, c_max)
        else:
            w = torch.where((w >= c_min) & (w <= c_max), w, zero)
        if config.rollout_is_batch_normalize:  # verl: mean 1 over the tokens, or over the non-empty sequences
            mean = (w[m] if token_level else w[m.any(-1)]).mean() if m.any() else zero
            if mean > 1e-8:
                w = w / mean
        w_roll, w_seq = (w, None) if token_level else (w[:, None].expand(B, T), w)
    # verl's rejection sampling: the tokens (rows) outside any bound, each judged on the given mask, leave it
    given = m
    for option, lower, upper in config.rollout_rs_bounds:
        d = torch.where(given, old_given - rollout_logprobs.to(dt), zero).clamp(-20.0, 20.0)
        k = {"k1": -d, "k2": d ** 2 / 2, "k3": torch.exp(d) - 1 - d}[option[-2:]]
        for i in range(B):
            row = k[i][given[i]]
            if option.startswith("token"):
                stats = k[i]
            elif option.startswith("seq_sum"):
                stats = row.sum().expand(T)
            elif option.startswith("seq_mean"):
                stats = (row.mean() if row.numel() else zero).expand(T)
            else:
                stats = (row.max() if row.numel() else zero).expand(T)
            if lower is None:
                ok = stats <= upper
            else:
                ok = (stats >= math.log(lower)) & (stats <= math.log(upper))
            m = m.clone()
            m[i] = m[i] & ok
    mf = m.to(dt)

    lp = clean(logprobs)
    old = lp.detach() if old_logprobs is None else clean(old_logprobs)
    A = clean(advantages[:, None].expand(B, T) if advantages.ndim == 1 else advantages)
    if config.credit is not None:  # §7: Â replaces A
        base = {"neg_logprobs": neg_logprobs} if config.credit == "cepo" else {"base_logprobs": old}
        A = contrastive_credit(A, m, pos_logprobs, lam=config.credit_lambda, eps_w=config.credit_eps_w,
                               mode=config.credit, **base).to(dt)
    n = mf.sum(-1)

    # §3 ratios; the optional clamp of the log-ratio (verl) stops the gradient outside its range
    clamp = dict(min=config.log_ratio_min, max=config.log_ratio_max)
    has_clamp = clamp["min"] is not None or clamp["max"] is not None
    if config.importance_sampling_level == "token":
        log_w = lp - old
    else:
        log_s = ((lp - old) * mf).sum(-1) / n.clamp(min=1.0)
        if config.importance_sampling_level == "sequence":
            log_w = log_s[:, None].expand(B, T)
        else:  # GSPO-token: log ρ_t = ℓ_t − sg(ℓ_t) + sg(log s_i)
            log_w = lp - lp.detach() + log_s.detach()[:, None]
    if has_clamp:
        log_w = torch.clamp(log_w, **clamp)
    rho = torch.exp(log_w)

    # §4 policy term; §9: per-sequence or per-token clip ranges replace the config's
    def per_token(x, default):
        if x is None:
            return default
        return (x[:, None].expand(B, T) if x.ndim == 1 else x).to(dt)

    eps_lo, eps_hi = per_token(epsilon_low, config.epsilon_low), per_token(epsilon_high, config.epsilon_high)
    dual_active = torch.zeros_like(m)
    w_applied = False  # whether the policy term took the rollout weights in itself
    A_used = A
    if config.loss_mode == "geo_mean":  # GMPO: one ratio per sequence from the sign-clipped log-ratios
        u = lp - old
        if has_clamp:
            u = torch.clamp(u, **clamp)
        sgn = torch.sign(A)
        u_min = sgn * torch.minimum(sgn * u, sgn * torch.clamp(u, -eps_lo, eps_hi))
        rho = torch.exp((u_min * mf).sum(-1) / n.clamp(min=1.0))[:, None].expand(B, T)
        A_seq = ((A * mf).sum(-1) / n.clamp(min=1.0))[:, None]
        L = -A_seq * rho
        A_used = A_seq.expand(B, T)  # the metrics' sign of A: the advantage the term uses
        if w_roll is not None:
            L = L * torch.exp((torch.log(w_roll + 1e-10) * mf).sum(-1) / n.clamp(min=1.0))[:, None]
            w_applied = True
    elif config.loss_mode == "clip_cov":
        pg1, pg2 = -A * rho, -A * torch.clamp(rho, 1.0 - eps_lo, 1.0 + eps_hi)
        a_mean = (A * mf).sum() / (mf.sum() + 1e-8)
        lp_mean = (lp.detach() * mf).sum() / (mf.sum() + 1e-8)
        cov = (A - a_mean) * (lp.detach() - lp_mean)
        candidates = [(i, t) for i in range(B) for t in range(T)
                      if m[i, t] and not pg2[i, t] > pg1[i, t] and config.clip_cov_lb < cov[i, t] < config.clip_cov_ub]
        keep = torch.ones_like(lp)
        if candidates:
            count = max(int(config.clip_cov_ratio * int(m.sum())), 1)
            for j in torch.randperm(len(candidates))[:count].tolist():
                keep[candidates[j]] = 0.0
        L = torch.maximum(pg1, pg2) * keep
    elif config.loss_mode == "kl_cov":
        L = -A * rho
        positions = [(i, t) for i in range(B) for t in range(T) if m[i, t]]
        if positions:
            a = torch.stack([A[p] for p in positions]).detach()
            x = torch.stack([lp[p] for p in positions]).detach()
            cov = (a - a.mean()) * (x - x.mean())
            for j in torch.topk(cov, max(1, int(len(positions) * config.kl_cov_ratio))).indices.tolist():
                i, t = positions[j]
                L = L.index_put((torch.tensor([i]), torch.tensor([t])), L[i, t] + config.kl_cov_coef * (lp[i, t] - old[i, t]).abs())
    elif config.loss_mode in ("dppo_tv", "dppo_kl"):
        p, p_old = torch.exp(lp).detach(), torch.exp(old).detach()
        if config.loss_mode == "dppo_tv":
            out_pos, out_neg = p - p_old > eps_hi, p - p_old < -eps_lo
        else:
            bkl = p_old * (old - lp.detach()) + (1 - p_old) * torch.log((1 - p_old + 1e-8) / (1 - p + 1e-8))
            out_pos, out_neg = (bkl > eps_hi) & (p > p_old), (bkl > eps_lo) & (p < p_old)
        ok = (~torch.where(A > 0, out_pos, out_neg)).to(dt)  # NaN counts as inside (the NaN contract)
        L = -A * torch.clamp(rho, max=config.dppo_ratio_cap).detach() * lp * ok
    elif config.loss_mode == "dro":
        L = -(lp * A - 0.5 * config.dro_beta * (lp - old) ** 2)
    elif config.loss_mode == "vespo":  # TRL: φ(w) of the sequence ratio w, token rollout weights folded in
        log_w = (torch.clamp(lp - old, -20.0, 20.0) * mf).sum(-1, True)
        if w_roll is not None:
            log_w = log_w + (torch.clamp(torch.log(w_roll), math.log(1e-8), 20.0) * mf).sum(-1, True)
            w_applied = True
        log_w = torch.clamp(log_w, math.log(1e-8), 20.0).detach()
        k = torch.where(A >= 0, torch.full_like(A, config.vespo_k_pos), torch.full_like(A, config.vespo_k_neg))
        lam = torch.where(A >= 0, torch.full_like(A, config.vespo_lambda_pos),
                          torch.full_like(A, config.vespo_lambda_neg)).clamp(min=1e-4)
        phi = torch.exp(lam + k * log_w - lam * torch.exp(log_w))
        phi = torch.where(torch.isinf(phi), torch.zeros_like(phi), phi)  # TRL zeroes ±inf (and NaN: see math §4)
        L = -phi * A * lp
    elif config.loss_mode == "ppo_clip":
        unclipped = rho if config.delta is None else torch.clamp(rho, max=config.delta)
        clipped = torch.clamp(rho, 1.0 - eps_lo, 1.0 + eps_hi)
        L = -torch.minimum(unclipped * A, clipped * A)
        if config.dual_clip is not None:
            cap = -config.dual_clip * A
            dual_active = (A < 0) & (L > cap)
            L = torch.where(A < 0, torch.minimum(L, cap), L)
    elif config.loss_mode == "cispo_trl":
        L = -torch.clamp(rho, max=eps_hi).detach() * A * lp
    elif config.loss_mode == "cispo_verl":
        L = -torch.clamp(rho, 1.0 - eps_lo, 1.0 + eps_hi).detach() * A * lp
    elif config.loss_mode == "gpg":
        L = -A * lp
    else:  # sapo
        tau = torch.where(A > 0, torch.full_like(A, config.sapo_tau_pos), torch.full_like(A, config.sapo_tau_neg))
        L = -(4.0 / tau) * torch.sigmoid(tau * (rho - 1.0)) * A

    # §9 selection: a 0/1 mask on the policy term (TRL: before the importance weight and the KL)
    keep_entropy = None
    if config.token_select is not None:
        H = clean(entropy).detach()
        score = H if config.token_select == "entropy" else A.detach().abs() * H
        if m.any():
            threshold = torch.quantile(score[m], 1.0 - config.token_select_fraction)
            keep_entropy = m & (score >= threshold)
        else:
            keep_entropy = torch.zeros_like(m)
        L = torch.where(keep_entropy, L, zero)
    if config.off_policy_mask_threshold is not None:
        sampling = old if rollout_logprobs is None else clean(rollout_logprobs)
        kl = torch.nan_to_num(sampling.detach() - lp.detach(), nan=0.0) * mf
        mean_kl = kl.sum(-1) / n.clamp(min=1.0)
        raw_A = clean(advantages[:, None].expand(B, T) if advantages.ndim == 1 else advantages)
        L = torch.where((raw_A >= 0) | (mean_kl[:, None] <= config.off_policy_mask_threshold), L, zero)

    # §5 rollout correction: a detached weight on the policy term
    metrics = {}
    if rollout_logprobs is not None:
        d = clean(old - rollout_logprobs.to(dt)).detach()
        metrics["sampling/sampling_logp_difference/mean"] = _masked_mean(d.abs(), mf)
        metrics["sampling/sampling_logp_difference/max"] = d.abs().max() if d.numel() else zero
        if config.rollout_correction is not None:  # a row without a counted token reports the weight of d = 0
            if w_seq is not None:
                one = torch.ones((), dtype=dt)
                empty = torch.clamp(one, c_min, c_max) if config.rollout_correction.endswith("truncate") else \
                    torch.where((one >= c_min) & (one <= c_max), one, zero)
                w_seq = torch.where(m.any(-1), w_seq, empty)
            values = w_roll[m] if w_seq is None else w_seq
            some = values.numel() > 0
            metrics["sampling/importance_sampling_ratio/min"] = values.min() if some else zero
            metrics["sampling/importance_sampling_ratio/mean"] = values.mean() if some else zero
            metrics["sampling/importance_sampling_ratio/max"] = values.max() if some else zero
    if w_roll is not None and not w_applied:
        L = L * w_roll

    # §4 KL to the reference, added after the rollout weight; x = ℓʳ − ℓ
    if ref_logprobs is not None:
        x = clean(ref_logprobs) - lp
        est = config.kl_estimator
        if est in ("k1", "k1+"):
            kl = -x
        elif est in ("abs", "abs+"):
            kl = x.abs()
        elif est == "k2":
            kl = 0.5 * x ** 2
        else:
            if config.kl_clamp:
                xc = torch.clamp(x, -VERL_LOG_RATIO_CLAMP, VERL_LOG_RATIO_CLAMP)
                kl = torch.clamp(torch.exp(xc) - xc - 1.0, -VERL_KL_VALUE_CLAMP, VERL_KL_VALUE_CLAMP)
            else:
                kl = torch.exp(x) - x - 1.0
        if est.endswith("+"):  # the estimator's value, the gradient of k2 (verl's straight-through)
            k2 = 0.5 * x ** 2
            kl = k2 - k2.detach() + kl.detach()
        if config.kl_ratio_weighted:
            kl = kl * rho
        metrics["kl"] = _masked_mean(kl.detach(), mf)
    if entropy is not None:
        metrics["entropy"] = _masked_mean(clean(entropy).detach(), mf)

    # §6 aggregation, term by term (config.term_aggregations: policy, KL, entropy)
    sequences = B if num_sequences_in_batch is None else num_sequences_in_batch

    def aggregate(X, agg):
        seq_sums = (X * mf).sum(-1)
        if agg == "seq_mean_token_mean":
            return (seq_sums / n.clamp(min=1.0)).sum() / sequences
        if agg == "token_mean_local" or (agg == "token_mean" and num_items_in_batch is None):
            return seq_sums.sum() / torch.clamp(mf.sum(), min=1.0)
        if agg == "token_mean":
            return seq_sums.sum() / torch.clamp(torch.as_tensor(num_items_in_batch, dtype=dt), min=1.0)
        if agg == "seq_mean_token_sum":
            return seq_sums.sum() / sequences
        if agg == "seq_mean_token_sum_norm":
            return seq_sums.sum() / (sequences * config.max_completion_length)
        return seq_sums.sum() * config.dp_size  # token_sum (verl: times the data-parallel size)

    agg_policy, agg_kl, agg_entropy = config.term_aggregations
    loss = aggregate(L, agg_policy)
    if ref_logprobs is not None and config.beta != 0.0:  # switched off: the metric only
        loss = loss + config.beta * aggregate(kl, agg_kl)
    if entropy is not None and config.entropy_coef != 0.0:
        if keep_entropy is None:
            loss = loss - config.entropy_coef * aggregate(clean(entropy), agg_entropy)
        elif agg_entropy == "token_mean_local":  # TRL: the mean over the kept tokens
            kept = keep_entropy.to(dt)
            loss = loss - config.entropy_coef * (clean(entropy) * kept).sum() / kept.sum().clamp(min=1.0)
        else:
            loss = loss - config.entropy_coef * aggregate(clean(entropy) * keep_entropy.to(dt), agg_entropy)

    # metrics: masked token means (TRL names where TRL has them)
    rho_d, A_d = rho.detach(), A_used.detach()
    if config.loss_mode == "cispo_trl":
        lower, upper = float("-inf"), eps_hi
    else:
        lower, upper = 1.0 - eps_lo, 1.0 + eps_hi
    low = ((rho_d < lower) & (A_d < 0)).to(dt)
    high = ((rho_d > upper) & (A_d > 0)).to(dt)
    out = {
        "clip_ratio/low_mean": _masked_mean(low, mf),
        "clip_ratio/high_mean": _masked_mean(high, mf),
        "clip_ratio/region_mean": _masked_mean(low + high, mf),
        "clip_ratio/dual_mean": _masked_mean(dual_active.detach().to(dt), mf),
        "ratio/mean": _masked_mean(rho_d, mf),
        "ppo_kl": _masked_mean((old - lp).detach(), mf),
    }
    for key in ("kl", "entropy", "sampling/sampling_logp_difference/mean", "sampling/sampling_logp_difference/max",
                "sampling/importance_sampling_ratio/min", "sampling/importance_sampling_ratio/mean",
                "sampling/importance_sampling_ratio/max"):
        if key in metrics:
            out[key] = metrics[key].detach()
    return loss, out


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
    """Â [B, T] in float64, detached: the formula of docs/math.md §7 as written.

    Δ = ℓ⁺ − ℓ⁻ ("cepo") or ℓ⁺ − ℓ° ("rlsd", ℓ° = ``base_logprobs``); s = sign(A);
    w = clip(exp(s·Δ), 1 − ε_w, 1 + ε_w); Â = A·((1 − λ) + λ·w)·m. ``advantages`` is [B] or [B, T]. The clip
    is taken after exp (exp overflows to inf and clips to 1 + ε_w, which is still exact); masked tokens are
    zeroed before any arithmetic.
    """
    m = mask if mask.dtype == torch.bool else mask != 0
    B, T = m.shape
    f64 = torch.float64
    zero = torch.zeros((), dtype=f64, device=m.device)

    def clean(x):
        return torch.where(m, x.detach().to(f64), zero)

    A = clean(advantages[:, None].expand(B, T) if advantages.ndim == 1 else advantages)
    other = neg_logprobs if mode == "cepo" else base_logprobs
    delta = clean(pos_logprobs) - clean(other)
    w = torch.clamp(torch.exp(torch.sign(A) * delta), 1.0 - eps_w, 1.0 + eps_w)
    return A * ((1.0 - lam) + lam * w) * m.to(f64)
