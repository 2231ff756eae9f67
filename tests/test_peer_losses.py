"""The peer loss variants equal their peers' own installed code (issue #10, item 3).

- verl 0.9.1: ``core_algos.get_policy_loss_fn(name)`` for geo_mean, clip_cov, kl_cov, dppo_tv, dppo_kl and dro,
  composed with verl's own ``agg_loss`` and ``kl_penalty`` as ``workers/utils/losses.py`` composes them (policy
  − entropy_coeff·agg(H) + kl_loss_coef·agg(KL), KL and entropy by ``loss_agg_mode``), with ``ActorConfig``
  defaults; ``rollout_corr_helper.compute_rollout_correction_and_rejection_mask`` for the batch-normalised rollout
  weights and every rejection-sampling option (its weights and its shrunken response mask fed to the loss).
- TRL 1.16.0: ``GRPOTrainer._compute_loss`` itself, run on a stand-in trainer object that holds a real
  ``GRPOConfig`` and returns given log-probs and entropies, for ``loss_type="luspo"`` and ``"vespo"`` and for
  the trainer's precomputed ``importance_sampling_ratio`` (vLLM correction), which rlloss takes as
  ``rollout_weights``.

Values and gradients (w.r.t. log-probs and entropy) are compared in float64, on the torch and reference backends.
"""
from __future__ import annotations

import collections
import types

import pytest
import torch

from rlloss import LossConfig, policy_loss

verl_core = pytest.importorskip("verl.trainer.ppo.core_algos")
verl_rollout = pytest.importorskip("verl.trainer.ppo.rollout_corr_helper")
verl_actor = pytest.importorskip("verl.workers.config.actor")
trl = pytest.importorskip("trl")

B, T = 6, 11
BACKENDS = ("torch", "reference")
BETA, ENT = 0.04, 0.01


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    lp = -torch.rand(B, T, generator=g, dtype=torch.float64) * 2 - 0.05
    mask = torch.rand(B, T, generator=g) < 0.8
    mask[:, 0] = True  # no empty sequence: verl's seq-means count the non-empty ones, rlloss's all B
    mask[2, 6:] = False
    old = lp + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64)
    return dict(
        lp=lp, old=old, mask=mask,
        ref=lp + 0.4 * torch.randn(B, T, generator=g, dtype=torch.float64),
        ent=torch.rand(B, T, generator=g, dtype=torch.float64) * 2,
        adv=torch.randn(B, generator=g, dtype=torch.float64),
        rollout=old + 0.15 * torch.randn(B, T, generator=g, dtype=torch.float64),
    )


def _grads(loss, lp, ent):
    g_lp, g_ent = torch.autograd.grad(loss, (lp, ent), allow_unused=True)
    return (loss, g_lp if g_lp is not None else torch.zeros_like(lp),
            g_ent if g_ent is not None else torch.zeros_like(ent))


def _assert_same(actual, expected, rtol=1e-7, atol=1e-10):
    for a, e, what in zip(actual, expected, ("loss", "d/dlogprobs", "d/dentropy")):
        torch.testing.assert_close(a.double(), e.double(), rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")


def _rlloss(config, x, backend, seed=None, mask=None, **kwargs):
    lp, ent = x["lp"].clone().requires_grad_(), x["ent"].clone().requires_grad_()
    if seed is not None:
        torch.manual_seed(seed)
    out = policy_loss(lp, x["old"], x["adv"], x["mask"] if mask is None else mask, config=config,
                      ref_logprobs=x["ref"], entropy=ent, backend=backend, **kwargs)
    return _grads(out.loss, lp, ent)


# --- verl 0.9.1 -------------------------------------------------------------------------------------------


def _actor_config(loss_mode, **policy_loss):
    return verl_actor.ActorConfig(strategy="fsdp", rollout_n=1, ppo_micro_batch_size_per_gpu=1,
                                  policy_loss=verl_actor.PolicyLossConfig(loss_mode=loss_mode, **policy_loss))


def verl_total(x, loss_mode, seed=None, response_mask=None, rollout_is_weights=None, **policy_loss):
    """verl's actor loss: get_policy_loss_fn(loss_mode) − entropy_coeff·agg(H) + kl_loss_coef·agg(low_var_kl)."""
    config = _actor_config(loss_mode, **policy_loss)
    lp, ent = x["lp"].clone().requires_grad_(), x["ent"].clone().requires_grad_()
    mask = (x["mask"] if response_mask is None else response_mask).to(lp.dtype)
    adv = x["adv"][:, None].expand(B, T) * mask  # verl's advantages are per token, zero on padding
    if seed is not None:
        torch.manual_seed(seed)
    pg_loss, _ = verl_core.get_policy_loss_fn(loss_mode)(x["old"], lp, adv, mask, config.loss_agg_mode, config,
                                                         rollout_is_weights)
    agg = lambda v: verl_core.agg_loss(v, mask, config.loss_agg_mode, **config.global_batch_info)  # noqa: E731
    kl = verl_core.kl_penalty(lp, x["ref"], config.kl_loss_type)
    return _grads(pg_loss - ENT * agg(ent) + BETA * agg(kl), lp, ent)


# preset -> (verl loss_mode, verl policy_loss options, rlloss overrides of the same options)
VERL_CASES = {
    "verl_geo_mean": ("geo_mean", {}, {}),
    "verl_clip_cov": ("clip_cov", dict(clip_cov_ratio=0.1, clip_cov_lb=-0.5, clip_cov_ub=0.5),
                      dict(clip_cov_ratio=0.1, clip_cov_lb=-0.5, clip_cov_ub=0.5)),
    "verl_kl_cov": ("kl_cov", dict(kl_cov_ratio=0.1), dict(kl_cov_ratio=0.1)),
    "verl_dppo_tv": ("dppo_tv", {}, {}),
    "verl_dppo_kl": ("dppo_kl", {}, {}),
    "verl_dro": ("dro", dict(dro_beta=0.3), dict(dro_beta=0.3)),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", sorted(VERL_CASES))
def test_verl_policy_loss_equals_verl(name, backend):
    loss_mode, verl_options, overrides = VERL_CASES[name]
    x = _inputs(seed=len(name))
    config = LossConfig.preset(name, beta=BETA, entropy_coef=ENT, **overrides)
    _assert_same(_rlloss(config, x, backend, seed=7), verl_total(x, loss_mode, seed=7, **verl_options))


def test_verl_cov_selections_are_not_empty():
    """The cases above select tokens: the clip_cov / kl_cov losses differ from their unselected forms."""
    x = _inputs(seed=len("verl_clip_cov"))
    plain = verl_total(x, "clip_cov", seed=7, clip_cov_ratio=0.1, clip_cov_lb=9.0, clip_cov_ub=10.0)[0]
    assert not torch.isclose(verl_total(x, "clip_cov", seed=7, **VERL_CASES["verl_clip_cov"][1])[0], plain)
    x = _inputs(seed=len("verl_kl_cov"))
    config = LossConfig.preset("verl_kl_cov", beta=BETA, entropy_coef=ENT, kl_cov_ratio=0.1)
    assert not torch.isclose(_rlloss(config, x, "torch")[0], _rlloss(config.replace(kl_cov_coef=0.0), x, "torch")[0])


def test_verl_clip_cov_defaults_and_the_generator():
    """verl's default ratio (2e-4: one token here) and bounds; seeded alike, rlloss draws verl's token."""
    x = _inputs(seed=3)
    x["lp"] = x["old"] + 0.02 * torch.randn(B, T, dtype=torch.float64)  # within the clip range: candidates
    x["adv"] = 6 * x["adv"]
    config = LossConfig.preset("verl_clip_cov", beta=BETA, entropy_coef=ENT)
    for backend in BACKENDS:
        _assert_same(_rlloss(config, x, backend, seed=11), verl_total(x, "clip_cov", seed=11))
    unselected = config.replace(clip_cov_lb=9.0, clip_cov_ub=10.0)  # no candidate: nothing dropped
    assert not torch.isclose(_rlloss(config, x, "torch", seed=11)[0], _rlloss(unselected, x, "torch")[0])


@pytest.mark.parametrize("name", ["verl_geo_mean", "verl_dppo_tv", "verl_dro"])
def test_verl_policy_loss_with_rollout_is_weights(name):
    """verl's rollout_is_weights argument is rlloss's rollout_weights (geo_mean: their geometric mean)."""
    loss_mode, verl_options, overrides = VERL_CASES[name]
    x = _inputs(seed=5)
    w = torch.rand(B, T, dtype=torch.float64) * 1.5 + 0.2
    config = LossConfig.preset(name, beta=BETA, entropy_coef=ENT, **overrides)
    expected = verl_total(x, loss_mode, rollout_is_weights=w * x["mask"], **verl_options)
    for backend in BACKENDS:
        _assert_same(_rlloss(config, x, backend, rollout_weights=w), expected)


def _verl_corrected(x, rollout_is, threshold, batch_normalize, rollout_rs=None, rs_threshold=None):
    weights, mask, _ = verl_rollout.compute_rollout_correction_and_rejection_mask(
        x["old"], x["rollout"], x["mask"].to(torch.float64), rollout_is=rollout_is, rollout_is_threshold=threshold,
        rollout_is_batch_normalize=batch_normalize, rollout_rs=rollout_rs, rollout_rs_threshold=rs_threshold)
    w = None if weights is None else weights.batch["rollout_is_weights"]
    return verl_total(x, "vanilla", response_mask=mask, rollout_is_weights=w), mask


# verl (rollout_is, rollout_is_threshold) -> rlloss (rollout_correction, low, high)
IS_CASES = {
    "token_tis": (("token", 1.2), ("token_truncate", None, 1.2)),
    "sequence_tis": (("sequence", 1.5), ("sequence_truncate", None, 1.5)),
    "token_icepop": (("token", "0.8_1.25"), ("token_mask", 0.8, 1.25)),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", sorted(IS_CASES))
def test_verl_batch_normalized_rollout_weights(case, backend):
    (rollout_is, threshold), (correction, low, high) = IS_CASES[case]
    x = _inputs(seed=9)
    expected, _ = _verl_corrected(x, rollout_is, threshold, True)
    config = LossConfig.preset("verl_grpo", beta=BETA, entropy_coef=ENT, rollout_correction=correction,
                               rollout_threshold_low=low, rollout_threshold_high=high, rollout_is_batch_normalize=True)
    _assert_same(_rlloss(config, x, backend, rollout_logprobs=x["rollout"]), expected)


RS_CASES = {
    "token_k1": "0.9_1.1", "token_k2": 0.004, "token_k3": 0.004,
    "seq_sum_k1": "0.8_1.2", "seq_sum_k2": 0.1, "seq_sum_k3": 0.1,
    "seq_mean_k1": 1.04, "seq_mean_k2": 0.012, "seq_mean_k3": 0.012,
    "seq_max_k2": 0.032, "seq_max_k3": 0.032,
    "token_k1,seq_mean_k3": "0.85_1.15,0.01",
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("option", list(RS_CASES))
def test_verl_rejection_sampling(option, backend):
    """Every rollout_rs option, with token TIS weights: verl's shrunken mask in every term and normaliser."""
    x = _inputs(seed=13)
    expected, kept = _verl_corrected(x, "token", 2.0, False, option, RS_CASES[option])
    assert 0 < kept.sum() < x["mask"].sum()  # the threshold rejects some tokens, not all
    config = LossConfig.preset("verl_grpo", beta=BETA, entropy_coef=ENT, rollout_correction="token_truncate",
                               rollout_rs=option, rollout_rs_threshold=RS_CASES[option])
    _assert_same(_rlloss(config, x, backend, rollout_logprobs=x["rollout"]), expected)


@pytest.mark.parametrize("batch_normalize", [True, False], ids=["normalised", "plain"])
def test_verl_rejection_with_sequence_weights(batch_normalize):
    """Sequence weights are formed (and normalised) over the given mask, then the token rejection shrinks it
    (verl's order): a row that keeps some tokens keeps the weight of all of them."""
    x = _inputs(seed=17)
    expected, kept = _verl_corrected(x, "sequence", 3.0, batch_normalize, "token_k2", 0.004)
    partly = (kept.sum(-1) > 0) & (kept.sum(-1) < x["mask"].sum(-1))
    assert partly.any()  # some row loses some of its tokens, not all
    config = LossConfig.preset("verl_grpo", beta=BETA, entropy_coef=ENT, rollout_correction="sequence_truncate",
                               rollout_threshold_high=3.0, rollout_is_batch_normalize=batch_normalize,
                               rollout_rs="token_k2", rollout_rs_threshold=0.004)
    for backend in BACKENDS:
        _assert_same(_rlloss(config, x, backend, rollout_logprobs=x["rollout"]), expected)


# --- TRL 1.16.0 -------------------------------------------------------------------------------------------


class _Accelerator:
    num_processes = 1
    sync_gradients = True

    def gather(self, x):
        return x

    gather_for_metrics = gather

    def reduce(self, x, reduction="sum"):
        return x


def trl_loss(x, is_ratio=None, num_items_in_batch=None, **options):
    """TRL's own GRPOTrainer._compute_loss on a stand-in trainer that returns the given log-probs and entropies."""
    args = trl.GRPOConfig(output_dir="unused", report_to=[], use_cpu=True, bf16=False, beta=BETA,
                          entropy_coef=ENT, **options)
    lp, ent = x["lp"].clone().requires_grad_(), x["ent"].clone().requires_grad_()
    trainer = types.SimpleNamespace(
        args=args, loss_type=args.loss_type, beta=args.beta, epsilon_low=args.epsilon,
        epsilon_high=args.epsilon_high if args.epsilon_high is not None else args.epsilon,
        importance_sampling_level=args.importance_sampling_level, top_entropy_quantile=args.top_entropy_quantile,
        off_policy_mask_threshold=args.off_policy_mask_threshold, max_completion_length=args.max_completion_length,
        use_vllm=is_ratio is not None, vllm_importance_sampling_correction=is_ratio is not None,
        aux_loss_enabled=False, model=types.SimpleNamespace(training=True), current_gradient_accumulation_steps=1,
        accelerator=_Accelerator(), _entropy_bonus_enabled=True, use_adaptive_entropy=False,
        entropy_coef=args.entropy_coef, _metrics={"train": collections.defaultdict(list)},
        get_gamma_weights=trl.GRPOTrainer.get_gamma_weights,
        get_off_policy_mask=trl.GRPOTrainer.get_off_policy_mask,
        _get_per_token_logps_and_entropies=lambda *a, **k: (lp, ent, None),
    )
    completion = torch.zeros(B, T, dtype=torch.long)
    inputs = dict(prompt_ids=completion[:, :1], prompt_mask=torch.ones(B, 1, dtype=torch.long),
                  completion_ids=completion, completion_mask=x["mask"].long(), advantages=x["adv"],
                  old_per_token_logps=x["old"], ref_per_token_logps=x["ref"],
                  num_items_in_batch=torch.tensor(float(num_items_in_batch or x["mask"].sum())))
    if is_ratio is not None:
        inputs["importance_sampling_ratio"] = is_ratio
    return _grads(trl.GRPOTrainer._compute_loss(trainer, trainer.model, inputs), lp, ent)


# preset -> (GRPOConfig arguments, rlloss overrides, policy_loss keyword arguments)
TRL_CASES = {
    "luspo": (dict(loss_type="luspo", importance_sampling_level="sequence"), {}, {}),
    "luspo_token_level": (dict(loss_type="luspo"), dict(importance_sampling_level="token"), {}),
    "vespo": (dict(loss_type="vespo", num_items_in_batch=40), {}, dict(num_items_in_batch=40)),
    "vespo_custom": (dict(loss_type="vespo", vespo_k_pos=1.5, vespo_lambda_pos=2.5, vespo_k_neg=2.5,
                          vespo_lambda_neg=1.5),
                     dict(vespo_k_pos=1.5, vespo_lambda_pos=2.5, vespo_k_neg=2.5, vespo_lambda_neg=1.5), {}),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", sorted(TRL_CASES))
def test_trl_loss_type_equals_trl(case, backend):
    trl_args, overrides, kwargs = TRL_CASES[case]
    x = _inputs(seed=len(case))
    x["lp"] = x["old"] + 0.05 * torch.randn(B, T, dtype=torch.float64)  # w near 1: φ(w) is not vanishingly small
    expected = trl_loss(x, **{k: v for k, v in trl_args.items() if k != "num_items_in_batch"},
                        num_items_in_batch=trl_args.get("num_items_in_batch"))
    config = LossConfig.preset(case.split("_token")[0].split("_custom")[0], beta=BETA, entropy_coef=ENT, **overrides)
    _assert_same(_rlloss(config, x, backend, **kwargs), expected)


def _trl_is_ratio(x, mask_mode):
    """TRL's vLLM importance_sampling_ratio (token_truncate / token_mask) with some weights 0."""
    w = torch.exp((x["old"] - x["rollout"]) * x["mask"])
    if mask_mode:
        return w.masked_fill((w < 0.9) | (w > 1.1), 0.0)
    return w.clamp(max=1.1)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss_type", ["vespo", "dapo", "grpo"])
@pytest.mark.parametrize("mask_mode", [False, True], ids=["truncate", "mask"])
def test_trl_precomputed_importance_sampling_ratio(loss_type, mask_mode, backend):
    """TRL's importance_sampling_ratio passed as rollout_weights: a factor on the policy term, folded into
    VESPO's sequence ratio; and equal to rlloss forming it from rollout_logprobs."""
    x = _inputs(seed=21)
    x["lp"] = x["old"] + 0.05 * torch.randn(B, T, dtype=torch.float64)
    is_ratio = _trl_is_ratio(x, mask_mode)
    expected = trl_loss(x, is_ratio=is_ratio, loss_type=loss_type)
    config = LossConfig.preset(loss_type, beta=BETA, entropy_coef=ENT)
    _assert_same(_rlloss(config, x, backend, rollout_weights=is_ratio), expected)
    formed = config.replace(rollout_correction="token_mask" if mask_mode else "token_truncate",
                            rollout_threshold_low=0.9 if mask_mode else None, rollout_threshold_high=1.1)
    _assert_same(_rlloss(formed, x, backend, rollout_logprobs=x["rollout"]), expected)


def test_rollout_weights_and_rollout_correction_are_exclusive():
    x = _inputs()
    with pytest.raises(ValueError, match="rollout_weights and config.rollout_correction"):
        policy_loss(x["lp"], x["old"], x["adv"], x["mask"], config=LossConfig(rollout_correction="token_truncate"),
                    rollout_logprobs=x["rollout"], rollout_weights=torch.ones(B, T))
