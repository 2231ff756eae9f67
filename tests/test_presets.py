"""Every LossConfig preset equals its peer's current default loss (issue #10 item 3).

The peer formulas below are transcribed from the peers' own code, read from the released wheels
(``pip download trl==1.16.0 verl==0.9.1 --no-deps``; neither is installed here, both need packages this
environment lacks):

- TRL 1.16.0, ``trl/trainer/grpo_trainer.py`` ``GRPOTrainer._compute_loss`` with ``GRPOConfig`` defaults
  (``epsilon_high`` = ``epsilon`` = 0.2, ``use_bias_correction_kl=True``, k3 KL, entropy bonus the token mean of H
  over the local mask whatever the loss type), one process, no gradient accumulation (the divisors
  ``current_gradient_accumulation_steps`` and ``num_processes`` are 1), no vLLM correction, no entropy mask.
- verl 0.9.1, ``verl/trainer/ppo/core_algos.py`` (``agg_loss``, ``compute_policy_loss_vanilla`` / ``_gspo`` /
  ``_sapo`` / ``_cispo`` / ``_gpg``, ``kl_penalty``) and ``verl/workers/utils/losses.py`` (policy loss
  − entropy_coeff · agg_loss(entropy, loss_agg_mode) + kl_loss_coef · agg_loss(kl, loss_agg_mode)), with
  ``ActorConfig`` defaults (clip_ratio 0.2, clip_ratio_c 3, loss_agg_mode token-mean, kl_loss_type low_var_kl).

Each test compares value and gradients (w.r.t. log-probs and entropy) on random inputs with β ≠ 0 and
entropy_coef ≠ 0, on the torch and reference backends.
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from rlloss import FusedPolicyLoss, LossConfig, policy_loss
from rlloss.config import PRESETS

B, T = 5, 9
BACKENDS = ("torch", "reference")
BETA, ENT = 0.04, 0.01


def _inputs(seed=0, per_token=False):
    g = torch.Generator().manual_seed(seed)
    lp = -torch.rand(B, T, generator=g, dtype=torch.float64) * 2 - 0.05
    mask = torch.rand(B, T, generator=g) < 0.75
    mask[:, 0] = True  # no empty sequence: verl's seq-means count the non-empty ones, TRL's all B
    mask[1, 5:] = False
    adv_shape = (B, T) if per_token else (B,)
    return dict(
        lp=lp,
        old=lp + 0.25 * torch.randn(B, T, generator=g, dtype=torch.float64),
        ref=lp + 0.4 * torch.randn(B, T, generator=g, dtype=torch.float64),
        ent=torch.rand(B, T, generator=g, dtype=torch.float64) * 2,
        adv=torch.randn(adv_shape, generator=g, dtype=torch.float64),
        mask=mask,
    )


def _grads(loss, lp, ent):
    g_lp, g_ent = torch.autograd.grad(loss, (lp, ent), allow_unused=True)
    return g_lp if g_lp is not None else torch.zeros_like(lp), g_ent if g_ent is not None else torch.zeros_like(ent)


def _rlloss(config, x, backend, **kwargs):
    lp, ent = x["lp"].clone().requires_grad_(), x["ent"].clone().requires_grad_()
    out = policy_loss(lp, x["old"], x["adv"], x["mask"], config=config, ref_logprobs=x["ref"], entropy=ent,
                      backend=backend, **kwargs)
    return (out.loss, *_grads(out.loss, lp, ent))


def _peer(fn, x, **kwargs):
    lp, ent = x["lp"].clone().requires_grad_(), x["ent"].clone().requires_grad_()
    loss = fn(lp, x["old"], x["adv"], x["mask"].to(lp.dtype), x["ref"], ent, **kwargs)
    return (loss, *_grads(loss, lp, ent))


def _assert_same(actual, expected):
    for a, e, what in zip(actual, expected, ("loss", "d/dlogprobs", "d/dentropy")):
        torch.testing.assert_close(a.double(), e, rtol=1e-7, atol=1e-10, msg=lambda m: f"{what}: {m}")


# --- TRL 1.16.0 GRPOTrainer._compute_loss -----------------------------------------------------------------


def trl_loss(per_token_logps, old_per_token_logps, advantages, mask, ref_per_token_logps, entropies, *, loss_type,
             beta=BETA, entropy_coef=ENT, epsilon=0.2, epsilon_high=None, importance_sampling_level="token",
             max_completion_length=None, num_items_in_batch=None, delta=None, sapo_temperature_pos=1.0,
             sapo_temperature_neg=1.05, use_bias_correction_kl=True):
    epsilon_low = epsilon
    epsilon_high = epsilon_high if epsilon_high is not None else epsilon
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(1)
    log_ratio = per_token_logps - old_per_token_logps
    if importance_sampling_level == "token":
        log_importance_weights = log_ratio
    else:
        log_importance_weights = (log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)
        log_importance_weights = log_importance_weights.unsqueeze(-1)
    coef_1 = torch.exp(log_importance_weights)
    if beta != 0.0:
        per_token_kl = torch.exp(ref_per_token_logps - per_token_logps) - (ref_per_token_logps - per_token_logps) - 1
        if use_bias_correction_kl:
            per_token_kl = per_token_kl * coef_1
    if loss_type == "cispo":
        clamped_ratios = torch.clamp(coef_1, max=epsilon_high).detach()
        per_token_loss = -clamped_ratios * advantages * per_token_logps
    elif loss_type in ["grpo", "bnpo", "dr_grpo", "dapo"]:
        coef_2 = torch.clamp(coef_1, 1 - epsilon_low, 1 + epsilon_high)
        if delta is not None:
            coef_1 = torch.clamp(coef_1, max=delta)
        per_token_loss = -torch.min(coef_1 * advantages, coef_2 * advantages)
    elif loss_type == "sapo":
        # TRL passes Python floats, which torch.where makes float32 (1.05 → 1.0499999523); float64 here
        temperatures = torch.where(advantages > 0, torch.tensor(sapo_temperature_pos, dtype=advantages.dtype),
                                   torch.tensor(sapo_temperature_neg, dtype=advantages.dtype))
        per_token_loss = -torch.sigmoid(temperatures * (coef_1 - 1)) * 4 / temperatures * advantages
    if beta != 0.0:
        per_token_loss = per_token_loss + beta * per_token_kl
    if loss_type in ["grpo", "sapo"]:
        loss = ((per_token_loss * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    elif loss_type == "bnpo":
        loss = (per_token_loss * mask).sum() / mask.sum().clamp(min=1.0)
    elif loss_type == "dr_grpo":
        loss = (per_token_loss * mask).sum() / (per_token_loss.size(0) * max_completion_length)
    else:  # cispo, dapo: num_items_in_batch / num_processes (· GA / steps_per_generation = 1 here)
        loss = (per_token_loss * mask).sum() / torch.as_tensor(num_items_in_batch, dtype=mask.dtype).clamp(min=1.0)
    if entropy_coef != 0.0:
        entropy_loss = (entropies * mask).sum() / mask.sum().clamp(min=1.0)
        loss = loss - entropy_coef * entropy_loss
    return loss


# preset -> (TRL GRPOConfig arguments beyond its defaults, rlloss overrides, policy_loss keyword arguments)
TRL_CASES = {
    "grpo": (dict(loss_type="grpo"), {}, {}),
    "dapo": (dict(loss_type="dapo", num_items_in_batch=50), {}, dict(num_items_in_batch=50)),
    "dapo_paper": (dict(loss_type="dapo", epsilon_high=0.28, num_items_in_batch=50), {},
                   dict(num_items_in_batch=50)),
    "dr_grpo": (dict(loss_type="dr_grpo", max_completion_length=16), dict(max_completion_length=16), {}),
    "bnpo": (dict(loss_type="bnpo"), {}, {}),
    "gspo": (dict(loss_type="grpo", importance_sampling_level="sequence", epsilon=3e-4, epsilon_high=4e-4), {}, {}),
    "cispo": (dict(loss_type="cispo", epsilon_high=5.0, num_items_in_batch=50), {}, dict(num_items_in_batch=50)),
    "sapo": (dict(loss_type="sapo"), {}, {}),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", sorted(TRL_CASES))
def test_trl_preset_equals_trl_default(name, backend):
    trl_args, overrides, kwargs = TRL_CASES[name]
    x = _inputs(seed=len(name))
    expected = _peer(trl_loss, x, **trl_args)
    config = LossConfig.preset(name, beta=BETA, entropy_coef=ENT, **overrides)
    _assert_same(_rlloss(config, x, backend, **kwargs), expected)


def test_dapo_preset_is_trl_default_clip():
    """TRL's loss_type="dapo" with default settings clips at ε_hi = ε = 0.2; the paper's 0.28 is dapo_paper."""
    assert LossConfig.preset("dapo").epsilon_high == 0.2
    assert LossConfig.preset("dapo_paper").epsilon_high == 0.28
    assert LossConfig.preset("dapo", epsilon_high=0.28) == LossConfig.preset("dapo_paper")


# --- verl 0.9.1 core_algos + workers/utils/losses -----------------------------------------------------------


def verl_agg_loss(loss_mat, loss_mask, loss_agg_mode, dp_size=1, batch_num_tokens=None, global_batch_size=None,
                  loss_scale_factor=None):
    def masked_sum(x, m):
        return (x * m).sum()

    if loss_agg_mode == "token-mean":
        if batch_num_tokens is None:
            batch_num_tokens = loss_mask.sum()
        return masked_sum(loss_mat, loss_mask) / batch_num_tokens * dp_size
    if loss_agg_mode == "token-sum":
        return masked_sum(loss_mat, loss_mask) * dp_size
    if loss_agg_mode in ["seq-mean-token-sum", "seq-mean-token-sum-norm"]:
        seq_losses = torch.sum(loss_mat * loss_mask, dim=-1)
        seq_mask = (torch.sum(loss_mask, dim=-1) > 0).to(loss_mat.dtype)
        if global_batch_size is None:
            global_batch_size = seq_mask.sum()
        loss = masked_sum(seq_losses, seq_mask) / global_batch_size * dp_size
        if loss_agg_mode == "seq-mean-token-sum-norm":
            loss = loss / (loss_scale_factor if loss_scale_factor is not None else loss_mask.shape[-1])
        return loss
    assert loss_agg_mode == "seq-mean-token-mean"
    seq_mask = torch.sum(loss_mask, dim=-1)
    seq_losses = torch.sum(loss_mat * loss_mask, dim=-1) / (seq_mask + 1e-8)
    seq_mask = (seq_mask > 0).to(loss_mat.dtype)
    if global_batch_size is None:
        global_batch_size = seq_mask.sum()
    return masked_sum(seq_losses, seq_mask) / global_batch_size * dp_size


def verl_kl_penalty(logprob, ref_logprob, kl_penalty):
    base = kl_penalty[:-1] if kl_penalty.endswith("+") else kl_penalty
    if base in ("kl", "k1"):
        forward = logprob - ref_logprob
    elif base == "abs":
        forward = (logprob - ref_logprob).abs()
    elif base in ("mse", "k2"):
        forward = 0.5 * (logprob - ref_logprob).square()
    else:  # low_var_kl, k3
        kl = torch.clamp(ref_logprob - logprob, min=-20, max=20)
        forward = torch.clamp(torch.exp(kl) - kl - 1, min=-10, max=10)
    if not kl_penalty.endswith("+") or kl_penalty in ("mse", "k2"):
        return forward
    backward = 0.5 * (logprob - ref_logprob).square()
    return backward - backward.detach() + forward.detach()


def verl_loss(log_prob, old_log_prob, advantages, response_mask, ref_log_prob, entropy, *, loss_mode="vanilla",
              loss_agg_mode="token-mean", clip_ratio_low=0.2, clip_ratio_high=0.2, clip_ratio_c=3.0, tau_pos=1.0,
              tau_neg=1.05, entropy_coeff=ENT, kl_loss_coef=BETA, kl_loss_type="low_var_kl", **global_batch_info):
    agg = lambda x, mode: verl_agg_loss(x, response_mask, mode, **global_batch_info)  # noqa: E731
    if loss_mode == "vanilla":
        ratio = torch.exp(torch.clamp(log_prob - old_log_prob, min=-20.0, max=20.0))
        pg_losses1 = -advantages * ratio
        pg_losses2 = -advantages * torch.clamp(ratio, 1 - clip_ratio_low, 1 + clip_ratio_high)
        clip_pg_losses1 = torch.maximum(pg_losses1, pg_losses2)
        clip_pg_losses2 = torch.min(-advantages * clip_ratio_c, clip_pg_losses1)
        pg_loss = agg(torch.where(advantages < 0, clip_pg_losses2, clip_pg_losses1), loss_agg_mode)
    elif loss_mode == "gspo":
        seq_lengths = torch.sum(response_mask, dim=-1).clamp(min=1)
        negative_approx_kl_seq = torch.sum((log_prob - old_log_prob) * response_mask, dim=-1) / seq_lengths
        log_seq = log_prob - log_prob.detach() + negative_approx_kl_seq.detach().unsqueeze(-1)
        ratio = torch.exp(torch.clamp(log_seq, max=10.0))
        pg_losses = torch.maximum(-advantages * ratio,
                                  -advantages * torch.clamp(ratio, 1 - clip_ratio_low, 1 + clip_ratio_high))
        pg_loss = agg(pg_losses, loss_agg_mode)
    elif loss_mode == "sapo":
        ratio = torch.exp(torch.clamp(log_prob - old_log_prob, min=-20.0, max=20.0))
        taus = torch.where(advantages > 0, torch.as_tensor(tau_pos, dtype=advantages.dtype),
                           torch.as_tensor(tau_neg, dtype=advantages.dtype))
        pg_losses = -torch.sigmoid(taus * (ratio - 1.0)) * (4.0 / taus) * advantages
        pg_loss = agg(pg_losses, "seq-mean-token-mean")  # forced, the policy term only
    elif loss_mode == "cispo":
        ratio = torch.exp(torch.clamp(log_prob - old_log_prob, min=-20.0, max=20.0))
        clipped = torch.clamp(ratio, 1 - clip_ratio_low, 1 + clip_ratio_high).detach()
        pg_loss = agg(-clipped * advantages * log_prob, loss_agg_mode)
    else:  # gpg
        pg_loss = agg(-log_prob * advantages, loss_agg_mode)
    policy = pg_loss - entropy_coeff * agg(entropy, loss_agg_mode)
    kld = verl_kl_penalty(log_prob, ref_log_prob, kl_loss_type)
    return policy + kl_loss_coef * agg(kld, loss_agg_mode)


VERL_CASES = {
    "verl_grpo": (dict(loss_mode="vanilla", kl_loss_coef=0.001), dict(entropy_coef=ENT)),  # its β is the recipe's
    "verl_dapo": (dict(loss_mode="vanilla", clip_ratio_high=0.28), dict(beta=BETA, entropy_coef=ENT)),
    "verl_gspo": (dict(loss_mode="gspo", clip_ratio_low=3e-4, clip_ratio_high=4e-4), dict(beta=BETA, entropy_coef=ENT)),
    "verl_cispo": (dict(loss_mode="cispo"), dict(beta=BETA, entropy_coef=ENT)),
    "verl_sapo": (dict(loss_mode="sapo"), dict(beta=BETA, entropy_coef=ENT)),
    "gpg": (dict(loss_mode="gpg"), dict(beta=BETA, entropy_coef=ENT)),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", sorted(VERL_CASES))
def test_verl_preset_equals_verl_default(name, backend):
    verl_args, overrides = VERL_CASES[name]
    x = _inputs(seed=len(name), per_token=True)
    _assert_same(_rlloss(LossConfig.preset(name, **overrides), x, backend), _peer(verl_loss, x, **verl_args))


# verl loss_agg_mode -> (rlloss aggregation, how rlloss takes verl's global_batch_info at dp_size = 2)
VERL_AGG = {
    "token-mean": ("token_mean", lambda n_tok, n_seq: dict(num_items_in_batch=n_tok / 2)),
    "seq-mean-token-mean": ("seq_mean_token_mean", lambda n_tok, n_seq: dict(num_sequences_in_batch=n_seq / 2)),
    "seq-mean-token-sum": ("seq_mean_token_sum", lambda n_tok, n_seq: dict(num_sequences_in_batch=n_seq / 2)),
    "seq-mean-token-sum-norm": ("seq_mean_token_sum_norm",
                                lambda n_tok, n_seq: dict(num_sequences_in_batch=n_seq / 2)),
    "token-sum": ("token_sum", lambda n_tok, n_seq: {}),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", sorted(VERL_AGG))
@pytest.mark.parametrize("loss_mode", ["vanilla", "sapo"])
def test_verl_aggregations_at_dp_size_2(mode, loss_mode, backend):
    """agg_loss at dp_size = 2 with the global counts: token-mean / seq-means take the global count divided by
    dp_size, seq-mean-token-sum-norm divides by the (global) batch size and then by loss_scale_factor (default:
    the padded response length T = max_completion_length), token-sum multiplies by LossConfig.dp_size."""
    x = _inputs(seed=7, per_token=True)
    n_tok, n_seq = 2 * int(x["mask"].sum()) + 3, 2 * B + 1  # the other rank's share
    info = dict(dp_size=2, batch_num_tokens=n_tok, global_batch_size=n_seq)
    expected = _peer(verl_loss, x, loss_mode=loss_mode, loss_agg_mode=mode, **info)
    aggregation, counts = VERL_AGG[mode]
    preset = "verl_grpo" if loss_mode == "vanilla" else "verl_sapo"
    fields = dict(aggregation=aggregation, dp_size=2, beta=BETA, entropy_coef=ENT, max_completion_length=T)
    if loss_mode == "sapo":  # the policy term stays seq-mean-token-mean; KL and entropy follow loss_agg_mode
        fields.update(aggregation="seq_mean_token_mean", kl_aggregation=aggregation, entropy_aggregation=aggregation)
        if mode.startswith("token"):  # the policy term's global sequence count
            counts = lambda n_tok, n_seq, c=counts: {**c(n_tok, n_seq), "num_sequences_in_batch": n_seq / 2}  # noqa
    _assert_same(_rlloss(LossConfig.preset(preset, **fields), x, backend, **counts(n_tok, n_seq)), expected)


VERL_KL_NAMES = ["kl", "k1", "abs", "mse", "k2", "low_var_kl", "k3", "k1+", "abs+", "k2+", "k3+", "low_var_kl+"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kl_loss_type", VERL_KL_NAMES)
def test_verl_kl_loss_types(kl_loss_type, backend):
    """Every verl kl_loss_type, passed as kl_estimator to a verl preset, is verl's kl_penalty (value and the
    straight-through k2 gradient of the "+" names)."""
    x = _inputs(seed=3, per_token=True)
    x["ref"][0, :2] = x["lp"][0, :2] + torch.tensor([24.0, -22.0], dtype=torch.float64)  # verl's clamps
    expected = _peer(verl_loss, x, kl_loss_type=kl_loss_type)
    config = LossConfig.preset("verl_grpo", beta=BETA, entropy_coef=ENT, kl_estimator=kl_loss_type)
    _assert_same(_rlloss(config, x, backend), expected)


def test_verl_kl_names_are_normalised():
    assert LossConfig(kl_estimator="low_var_kl") == LossConfig(kl_estimator="k3", kl_clamp=True)
    assert LossConfig(kl_estimator="low_var_kl+") == LossConfig(kl_estimator="k3+", kl_clamp=True)
    assert LossConfig(kl_estimator="mse").kl_estimator == "k2"
    assert LossConfig(kl_estimator="kl").kl_estimator == "k1"
    config = LossConfig.preset("verl_grpo", kl_estimator="low_var_kl")
    assert LossConfig.from_key(config.key) == config
    # a verl preset keeps verl's clamp when its estimator is overridden by verl's other spelling
    assert LossConfig.preset("verl_grpo", kl_estimator="k3").kl_clamp


def test_per_term_fields_are_checked():
    with pytest.raises(ValueError, match="kl_aggregation"):
        LossConfig(kl_aggregation="mean")
    with pytest.raises(ValueError, match="entropy_aggregation"):
        LossConfig(entropy_aggregation="token-mean")
    with pytest.raises(ValueError, match="dp_size"):
        LossConfig(dp_size=0)
    with pytest.raises(TypeError, match="dp_size"):
        LossConfig(dp_size=2.0)
    with pytest.raises(ValueError, match="max_completion_length"):
        LossConfig(kl_aggregation="seq_mean_token_sum_norm")


def test_fused_loss_with_per_term_aggregation():
    """The one-pass fused loss forms each token's gradient from the per-term coefficients: verl_sapo (policy
    seq-mean-token-mean, KL and entropy token-mean) and a TRL preset (entropy over the local mask) equal
    policy_loss composed with token_logprobs."""
    from rlloss import token_logprobs

    g = torch.Generator().manual_seed(11)
    D, V = 6, 13
    x = _inputs(seed=11)
    hidden = torch.randn(B, T, D, generator=g, dtype=torch.float64)
    weight = torch.randn(V, D, generator=g, dtype=torch.float64) * 0.5
    targets = torch.randint(0, V, (B, T), generator=g)
    for config in (LossConfig.preset("verl_sapo", beta=BETA, entropy_coef=ENT),
                   LossConfig.preset("dapo", beta=BETA, entropy_coef=ENT)):
        h1, w1 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        out = FusedPolicyLoss(config, backend="torch")(h1, w1, targets, x["mask"], x["adv"], old_logprobs=x["old"],
                                                       ref_logprobs=x["ref"], num_items_in_batch=40)
        out.loss.backward()
        h2, w2 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        lp = token_logprobs(h2, w2, targets, return_entropy=True, backend="torch")
        want = policy_loss(lp.logprobs, x["old"], x["adv"], x["mask"], config=config, ref_logprobs=x["ref"],
                           entropy=lp.entropy, num_items_in_batch=40, backend="reference")
        want.loss.backward()
        torch.testing.assert_close(out.loss, want.loss, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(h1.grad, h2.grad, rtol=1e-8, atol=1e-11)
        torch.testing.assert_close(w1.grad, w2.grad, rtol=1e-8, atol=1e-11)


@pytest.mark.parametrize("config", [
    LossConfig.preset("verl_sapo", beta=BETA, entropy_coef=ENT),
    LossConfig.preset("grpo", beta=BETA, entropy_coef=ENT),
    LossConfig.preset("verl_grpo", kl_estimator="k1+", entropy_coef=ENT),
], ids=["verl_sapo", "trl_grpo", "k1+"])
def test_kernel_backend_routes_what_it_lacks_to_torch(config):
    """Per-term aggregation and the k1+ / abs+ estimators are not in kernels/policy.py: policy_loss on a kernel
    backend computes them with the torch formulas (here through the interpreter's dispatch), never drops them."""
    pytest.importorskip("triton")
    from rlloss.policy import _kernel_supports

    assert not _kernel_supports(config)
    assert _kernel_supports(LossConfig.preset("grpo"))  # a term that is off does not count
    x = {k: (v.float() if v.is_floating_point() else v) for k, v in _inputs(seed=5).items()}
    actual = _rlloss(config, x, "triton")
    expected = _rlloss(config, {k: (v.double() if v.is_floating_point() else v) for k, v in x.items()}, "reference")
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a.double(), e, rtol=1e-5, atol=1e-6)


# The peer loss variants' presets, checked against the peers' installed code in tests/test_peer_losses.py.
PEER_LOSS_PRESETS = ("luspo", "vespo", "verl_geo_mean", "verl_clip_cov", "verl_kl_cov", "verl_dppo_tv",
                     "verl_dppo_kl", "verl_dro")


def test_every_preset_row_names_its_peer_and_test():
    """docs/presets.md has one row per preset, saying which peer default it equals and which test checks it."""
    text = (Path(__file__).resolve().parents[1] / "docs" / "presets.md").read_text()
    for name in PRESETS:
        rows = [line for line in text.splitlines() if re.match(rf"\|\s*`{re.escape(name)}`\s*\|", line)]
        assert len(rows) == 1, name
        test_file = "test_peer_losses.py::" if name in PEER_LOSS_PRESETS else "test_presets.py::"
        assert test_file in rows[0], name
    assert set(TRL_CASES) | set(VERL_CASES) | set(PEER_LOSS_PRESETS) == set(PRESETS)


def _peer_variant_config(name):
    """A peer-variant preset with its KL and entropy terms on and options that make it select or reject here."""
    extra = {"verl_dro": dict(dro_beta=0.3), "verl_clip_cov": dict(clip_cov_ratio=0.2, clip_cov_lb=-1.0),
             "verl_kl_cov": dict(kl_cov_ratio=0.2)}.get(name, {})
    return LossConfig.preset(name, beta=BETA, entropy_coef=ENT, **extra)


PEER_VARIANTS = {name: _peer_variant_config(name) for name in PEER_LOSS_PRESETS}
PEER_VARIANTS.update({
    "verl_geo_mean_token_mask": PEER_VARIANTS["verl_geo_mean"].replace(rollout_correction="token_mask",
                                                                      rollout_threshold_low=0.8),
    "vespo_token_truncate": PEER_VARIANTS["vespo"].replace(rollout_correction="token_truncate",
                                                           rollout_threshold_high=1.2),
    "verl_grpo_batch_normalized_rs": LossConfig.preset(
        "verl_grpo", beta=BETA, entropy_coef=ENT, rollout_correction="sequence_truncate", rollout_threshold_high=3.0,
        rollout_is_batch_normalize=True, rollout_rs="token_k1,seq_max_k3", rollout_rs_threshold="0.8_1.25,0.1"),
})


def _fused_inputs(dtype):
    g = torch.Generator().manual_seed(12)
    D, V = 6, 13
    x = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in _inputs(seed=12).items()}
    x["rollout"] = (x["old"] + 0.2 * torch.randn(B, T, generator=g, dtype=torch.float64).to(dtype))
    return (x, torch.randn(B, T, D, generator=g, dtype=torch.float64).to(dtype),
            (torch.randn(V, D, generator=g, dtype=torch.float64) * 0.5).to(dtype), torch.randint(0, V, (B, T), generator=g))


@pytest.mark.parametrize("name", sorted(PEER_VARIANTS))
def test_peer_variants_agree_on_every_path(name):
    """The peer loss variants on every path: policy_loss on torch (float64) and on the kernel backend (float32,
    routed to the torch formulas), FusedPolicyLoss on torch and the kernel backend (one pass or two), all equal
    the reference of token_logprobs then policy_loss, in value and gradients w.r.t. the hidden states and the
    lm_head (clip_cov's random draw seeded alike for each call)."""
    from rlloss import token_logprobs
    from conftest import KERNEL_BACKEND

    config = PEER_VARIANTS[name]

    def run(path, dtype):
        x, hidden, weight, targets = _fused_inputs(dtype)
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        kwargs = dict(old_logprobs=x["old"], ref_logprobs=x["ref"], rollout_logprobs=x["rollout"])
        torch.manual_seed(5)
        if path.startswith("fused"):
            out = FusedPolicyLoss(config, backend=path.split(":")[1])(h, w, targets, x["mask"], x["adv"], **kwargs)
        else:
            backend = path.split(":")[1]
            lp = token_logprobs(h, w, targets, return_entropy=True, backend="reference" if backend == "reference"
                                else "torch")
            out = policy_loss(lp.logprobs, x["old"], x["adv"], x["mask"], config=config, ref_logprobs=x["ref"],
                              entropy=lp.entropy, rollout_logprobs=x["rollout"], backend=backend)
        out.loss.backward()
        return out.loss.detach().double(), h.grad.double(), w.grad.double()

    expected = run("policy:reference", torch.float64)
    # float64: 1e-7, the 1e-8 guard of verl's masked means (kept by the torch path) against the reference's means
    for path, dtype, tol in (("policy:torch", torch.float64, 1e-7), ("fused:torch", torch.float64, 1e-7),
                             (f"policy:{KERNEL_BACKEND}", torch.float32, 2e-5),
                             (f"fused:{KERNEL_BACKEND}", torch.float32, 2e-5)):
        for a, e, what in zip(run(path, dtype), expected, ("loss", "d/dhidden", "d/dweight")):
            torch.testing.assert_close(a, e, rtol=tol, atol=tol * 1e-1, msg=lambda m: f"{path} {what}: {m}")


def test_rollout_weights_on_every_path():
    """Precomputed rollout weights (a [B, T] tensor, NaN where masked) through policy_loss and FusedPolicyLoss."""
    from conftest import KERNEL_BACKEND

    x, hidden, weight, targets = _fused_inputs(torch.float64)
    rollout_weights = torch.where(x["mask"], torch.rand(B, T, dtype=torch.float64) + 0.3, torch.nan)
    config = LossConfig.preset("dapo", beta=BETA)
    results = []
    for backend, dtype in (("reference", torch.float64), ("torch", torch.float64), (KERNEL_BACKEND, torch.float32)):
        h, w = hidden.to(dtype).clone().requires_grad_(), weight.to(dtype).clone().requires_grad_()
        out = FusedPolicyLoss(config, backend=backend)(h, w, targets, x["mask"], x["adv"].to(dtype),
                                                       old_logprobs=x["old"].to(dtype), ref_logprobs=x["ref"].to(dtype),
                                                       rollout_weights=rollout_weights.to(dtype))
        out.loss.backward()
        results.append((out.loss.double(), h.grad.double(), w.grad.double()))
    unweighted = FusedPolicyLoss(config, backend="torch")(hidden, weight, targets, x["mask"], x["adv"],
                                                          old_logprobs=x["old"], ref_logprobs=x["ref"]).loss
    assert not torch.isclose(unweighted, results[0][0])
    for got, tol in zip(results[1:], (1e-9, 2e-5)):
        for a, e in zip(got, results[0]):
            torch.testing.assert_close(a, e, rtol=tol, atol=tol * 1e-1)


@pytest.mark.parametrize("config", [
    LossConfig.preset("dapo", beta=BETA),  # TRL's ratio-weighted KL; the entropy term off: one coefficient
    LossConfig.preset("verl_grpo", aggregation="token_sum", dp_size=2, entropy_coef=ENT),
    LossConfig.preset("verl_sapo", beta=0.0),  # per-term fields set, but only the policy term is on
], ids=["trl_dapo_kl", "verl_token_sum_dp2", "verl_sapo_policy_only"])
def test_kernel_runs_presets_it_supports(config):
    """Configs the kernel implements run in kernels/policy.py (under the interpreter here) and equal the
    reference; dp_size reaches it through the normaliser."""
    pytest.importorskip("triton")
    from rlloss.policy import _kernel_supports

    assert _kernel_supports(config)
    x = {k: (v.float() if v.is_floating_point() else v) for k, v in _inputs(seed=6).items()}
    actual = _rlloss(config, x, "triton")
    expected = _rlloss(config, {k: (v.double() if v.is_floating_point() else v) for k, v in x.items()}, "reference")
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a.double(), e, rtol=1e-5, atol=1e-6)
