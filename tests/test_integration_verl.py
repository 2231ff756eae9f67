"""rlloss inside verl 0.9.1, each result checked against verl's own installed code.

* The registered policy losses ``rlloss_<mode>`` against verl's ``<mode>`` (``get_policy_loss_fn``): loss value,
  gradient w.r.t. log_prob and the metrics, for every loss and every ``loss_agg_mode`` with and without verl's
  global batch info (dp = 2, uneven ranks), an empty response and verl's rollout importance weights (some 0).
  clip_cov draws its tokens with ``torch.randperm`` on torch's default generator in both: torch is seeded alike
  before each call.
* The whole actor loss of ``loss_config_from_verl`` against verl's ``ppo_loss`` (policy term, every KL type,
  entropy bonus) on verl's own no-padding TensorDict.
* The registered advantage estimators ``rlloss_<estimator>`` against verl's (``get_adv_estimator_fn``), with
  uneven, interleaved groups and a group of one.
* The patched FSDP actor engine against the stock one (tiny random Llama, CPU): the same ``forward_step`` loss,
  log-probs, entropy and parameter gradients, without calling the lm_head; refused options raise naming them.

verl cannot be installed with its dependencies next to transformers 5 (it pins transformers < 5.11): the test
command installs it with ``--no-deps`` and the ``verl`` extra holds what its imports need. A missing verl is an
error here, not a skip.
"""
import functools
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch

try:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from verl.trainer.config import AlgoConfig
        from verl.trainer.ppo import core_algos
        from verl.utils import tensordict_utils as tu
        from verl.workers.config import FSDPActorConfig
        from verl.workers.config.actor import PolicyLossConfig
        from verl.workers.engine.fsdp import transformer_impl
        from verl.workers.utils.losses import ppo_loss
        from verl.workers.utils.padding import left_right_2_no_padding
        import verl.utils.torch_functional as verl_F
        from tensordict import TensorDict
except ImportError as error:
    raise ImportError('tests/test_integration_verl.py needs verl 0.9.1: pip install --no-deps "verl==0.9.1" and '
                      'pip install -e ".[test]" (see the README\'s test command)') from error

import transformers  # noqa: E402

import rlloss.integrations.verl as rv  # noqa: E402
from rlloss import policy_loss  # noqa: E402

MODES = tuple(rv.VERL_POLICY_LOSSES)
CLIP_METRICS = {"actor/pg_clipfrac", "actor/ppo_kl", "actor/pg_clipfrac_lower"}
# The verl metrics each registered loss logs: those whose meaning rlloss shares.
LOGGED = {"vanilla": CLIP_METRICS, "gspo": CLIP_METRICS, "sapo": {"actor/ppo_kl"}, "cispo": {"actor/ppo_kl"},
          "gpg": set(), "geo_mean": {"actor/ppo_kl"}, "clip_cov": {"actor/ppo_kl"}, "kl_cov": set(),
          "dppo_tv": {"actor/ppo_kl"}, "dppo_kl": {"actor/ppo_kl"}, "dro": {"actor/ppo_kl"}}
# verl policy_loss options per mode: clip_cov and kl_cov select several tokens of these small batches (verl's
# defaults select one at most, clip_cov among covariances in (1, 5) that these batches seldom have).
POLICY_OPTIONS = {"clip_cov": dict(clip_cov_ratio=0.2, clip_cov_lb=-0.5, clip_cov_ub=0.5),
                  "kl_cov": dict(kl_cov_ratio=0.2, ppo_kl_coef=0.3), "dro": dict(dro_beta=0.3)}
AGGREGATIONS = ("token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")
KL_TYPES = ("low_var_kl", "k3", "kl", "k1", "abs", "mse", "k2", "low_var_kl+", "k3+", "kl+", "k1+", "abs+", "mse+")
RTOL64, ATOL64 = 1e-9, 1e-12


def actor_config(mode="vanilla", agg="token-mean", policy=None, **fields):
    policy = POLICY_OPTIONS.get(mode, {}) if policy is None else policy
    return FSDPActorConfig(strategy="fsdp", rollout_n=2, ppo_micro_batch_size_per_gpu=2, loss_agg_mode=agg,
                           clip_ratio_low=0.2, clip_ratio_high=0.28, clip_ratio_c=2.5, tau_pos=1.3, tau_neg=1.1,
                           policy_loss=PolicyLossConfig(loss_mode=mode, **policy), **fields)


def batch(lengths, T=7, seed=0, dtype=torch.float64):
    """verl's padded response tensors: ratios spread past the clip range, A per token (0 outside the mask)."""
    g = torch.Generator().manual_seed(seed)
    B = len(lengths)
    mask = torch.arange(T)[None] < torch.tensor(lengths)[:, None]
    old = -torch.rand(B, T, generator=g, dtype=dtype) * 2 - 0.1
    logp = (old + 0.7 * torch.randn(B, T, generator=g, dtype=dtype)).clamp(max=-1e-3)
    adv = torch.randn(B, 1, generator=g, dtype=dtype).expand(B, T) * mask
    old[:, 0] = torch.where(adv[:, 0] < 0, logp[:, 0] - 1.2, old[:, 0])  # ρ = 3.3 > c for A < 0: the dual clip
    ref = logp + 0.3 * torch.randn(B, T, generator=g, dtype=dtype)
    entropy = torch.rand(B, T, generator=g, dtype=dtype) * 3
    return dict(old=old, logp=logp, adv=adv, mask=mask, ref=ref, entropy=entropy)


def set_global_info(config, info):
    config.global_batch_info.clear()
    config.global_batch_info.update(info)


def call_policy(name, config, b, agg, weights=None, seed=0):
    logp = b["logp"].clone().requires_grad_(True)
    torch.manual_seed(seed)  # clip_cov's random tokens: the same draw in verl and rlloss
    loss, metrics = core_algos.get_policy_loss_fn(name)(
        old_log_prob=b["old"], log_prob=logp, advantages=b["adv"], response_mask=b["mask"], loss_agg_mode=agg,
        config=config, rollout_is_weights=weights)
    loss.backward()
    return loss.detach(), logp.grad, metrics


def assert_close(actual, expected, rtol=RTOL64, atol=ATOL64):
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol)


def check_policy_parity(mode, agg, config, b, weights=None, seed=0):
    loss, grad, metrics = call_policy(mode, config, b, agg, weights, seed)
    loss_r, grad_r, metrics_r = call_policy(rv.PREFIX + mode, config, b, agg, weights, seed)
    assert torch.isfinite(loss) and grad.abs().sum() > 0
    assert_close(loss_r, loss)
    assert_close(grad_r, grad)
    assert set(metrics_r) <= set(metrics)
    for name, value in metrics_r.items():
        assert value == pytest.approx(metrics[name], rel=1e-6, abs=1e-9), name  # verl counts in float32
    return metrics_r


def test_registered_names():
    for mode in MODES:
        assert core_algos.get_policy_loss_fn(rv.PREFIX + mode).__name__ == rv.PREFIX + mode
    for estimator in rv.VERL_ADVANTAGE_ESTIMATORS:
        assert core_algos.get_adv_estimator_fn(rv.PREFIX + estimator).__name__ == rv.PREFIX + estimator
    assert not set(rv.NOT_IN_RLLOSS) & set(rv.VERL_POLICY_LOSSES)
    assert set(rv.NOT_IN_RLLOSS) | set(rv.VERL_POLICY_LOSSES) <= set(core_algos.POLICY_LOSS_REGISTRY)


def test_registered_by_verls_external_modules():
    """`import verl` with VERL_USE_EXTERNAL_MODULES imports this integration, which registers everything, and
    RLLOSS_VERL_PATCH_ENGINE=1 patches the engine class (a fresh process, as a verl worker)."""
    code = ("import verl\n"
            "from verl.trainer.ppo import core_algos\n"
            "from verl.workers.engine.fsdp import transformer_impl\n"
            "core_algos.get_policy_loss_fn('rlloss_gspo'); core_algos.get_adv_estimator_fn('rlloss_rloo')\n"
            "assert transformer_impl.FSDPEngineWithLMHead.forward_step._rlloss\n")
    env = {**os.environ, "VERL_USE_EXTERNAL_MODULES": "rlloss.integrations.verl", "RLLOSS_VERL_PATCH_ENGINE": "1"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.mark.parametrize("agg", AGGREGATIONS)
@pytest.mark.parametrize("mode", MODES)
def test_policy_loss_parity_local(mode, agg):
    """dp = 1 and no global counts: verl counts the micro-batch's tokens and its non-empty sequences."""
    config = actor_config(mode, agg)
    b = batch([7, 3, 0, 5, 1, 6], seed=1)
    metrics = check_policy_parity(mode, agg, config, b)
    assert set(metrics) == LOGGED[mode]
    if mode == "vanilla":  # both clips are exercised
        assert metrics["actor/pg_clipfrac"] > 0 and metrics["actor/pg_clipfrac_lower"] > 0


@pytest.mark.parametrize("agg", AGGREGATIONS)
@pytest.mark.parametrize("mode", MODES)
def test_policy_loss_parity_dp2(mode, agg):
    """Two data-parallel ranks with uneven local batches, each given verl's global batch info."""
    ranks = [batch([7, 3, 0, 5], seed=2), batch([2, 6, 4], seed=3)]
    info = dict(dp_size=2, batch_num_tokens=int(sum(b["mask"].sum() for b in ranks)), global_batch_size=7,
                loss_scale_factor=9 if agg == "seq-mean-token-sum-norm" else None)
    config = actor_config(mode, agg, loss_scale_factor=info["loss_scale_factor"])
    for b in ranks:
        set_global_info(config, info)
        check_policy_parity(mode, agg, config, b)


@pytest.mark.parametrize("mode", MODES)
def test_policy_loss_parity_rollout_weights(mode):
    """verl's rollout IS weights (some rejected, w = 0) multiply the policy term (geo_mean: their geometric mean
    per sequence): rlloss's rollout_weights, the clip metrics unchanged."""
    config = actor_config(mode, "seq-mean-token-mean")
    b = batch([7, 3, 0, 5, 1, 6], seed=4)
    weights = torch.rand(b["mask"].shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64) * 2
    weights[weights > 1.6] = 0.0
    metrics = check_policy_parity(mode, "seq-mean-token-mean", config, b, weights)
    assert set(metrics) == LOGGED[mode]
    plain, _, _ = call_policy(mode, config, b, "seq-mean-token-mean")
    assert not torch.isclose(plain, call_policy(mode, config, b, "seq-mean-token-mean", weights)[0])


def test_cov_selections_are_exercised():
    """The clip_cov and kl_cov cases above select tokens (verl's own numbers), and clip_cov's draw depends on
    the seed: the shared seed is what makes the parity hold."""
    b = batch([7, 3, 0, 5, 1, 6], seed=1)
    config = actor_config("clip_cov")
    _, _, metrics = call_policy("clip_cov", config, b, "token-mean")
    assert metrics["actor/pg_clipfrac"] > 0  # verl's fraction of dropped tokens
    draws = [call_policy("clip_cov", config, b, "token-mean", seed=s)[1] for s in range(6)]
    assert any(not torch.equal(draws[0], d) for d in draws[1:])
    plain = actor_config("kl_cov", policy=dict(kl_cov_ratio=0.2, ppo_kl_coef=0.0))
    assert not torch.isclose(call_policy("kl_cov", actor_config("kl_cov"), b, "token-mean")[0],
                             call_policy("kl_cov", plain, b, "token-mean")[0])


def test_policy_loss_verl_defaults():
    """verl's own defaults of the new options (PolicyLossConfig's clip_cov / kl_cov / ppo_kl_coef, ActorConfig's
    clip_ratio and clip_ratio_c): loss_config_from_verl reads them, none hard-coded by the test."""
    b = batch([7, 3, 0, 5, 1, 6], seed=12)
    for mode in ("clip_cov", "kl_cov", "dppo_tv", "dppo_kl", "geo_mean"):
        config = FSDPActorConfig(strategy="fsdp", rollout_n=2, ppo_micro_batch_size_per_gpu=2,
                                 policy_loss=PolicyLossConfig(loss_mode=mode))
        check_policy_parity(mode, "token-mean", config, b)
    loss_config = rv.loss_config_from_verl(actor_config("dppo_kl"))
    assert loss_config.dppo_ratio_cap == 2.5 and loss_config.epsilon_high == 0.28
    loss_config = rv.loss_config_from_verl(actor_config("kl_cov"))
    assert loss_config.kl_cov_coef == 0.3 and loss_config.kl_cov_ratio == 0.2


def test_policy_loss_parity_float32():
    config = actor_config("vanilla", "token-mean")
    b = batch([7, 3, 0, 5, 1, 6], seed=6, dtype=torch.float32)
    loss, grad, _ = call_policy("vanilla", config, b, "token-mean")
    loss_r, grad_r, _ = call_policy("rlloss_vanilla", config, b, "token-mean")
    assert loss_r.dtype == torch.float32 and grad_r.dtype == torch.float32
    assert_close(loss_r, loss, rtol=1e-6, atol=1e-7)
    assert_close(grad_r, grad, rtol=1e-6, atol=1e-8)


def ppo_loss_data(b, info):
    """verl's no-padding TensorDict for ``ppo_loss``: full sequences (prompt + response), log-probs shifted."""
    B, T = b["mask"].shape
    prompt_lens = torch.tensor([3, 1, 4, 2, 5, 2][:B])
    P = int(prompt_lens.max())
    prompt_mask = torch.arange(P)[None] >= P - prompt_lens[:, None]
    attention = torch.cat([prompt_mask, b["mask"]], 1).long()
    td = TensorDict(dict(prompts=torch.ones(B, P, dtype=torch.long), responses=torch.ones(B, T, dtype=torch.long),
                         attention_mask=attention, response_mask=b["mask"].long(), old_log_probs=b["old"],
                         advantages=b["adv"], ref_log_prob=b["ref"]), batch_size=[B])
    tu.assign_non_tensor(td, max_response_len=T, **info)
    return td, prompt_lens


def nested_full(values, mask, prompt_lens):
    """[B, T] response values placed where verl's model output has them: position p_i − 1 + t of sequence i."""
    rows = []
    for i in range(values.shape[0]):
        n = int(mask[i].sum())
        rows.append(torch.cat([values.new_zeros(int(prompt_lens[i]) - 1), values[i, :n], values.new_zeros(1)]))
    return torch.nested.nested_tensor_from_jagged(torch.cat(rows), offsets=torch.tensor(
        [0] + [len(r) for r in rows]).cumsum(0))


@pytest.mark.parametrize("mode,agg,kl_type", [
    *[("vanilla", "token-mean", kl) for kl in KL_TYPES],
    *[("vanilla", agg, "low_var_kl") for agg in AGGREGATIONS],
    *[("sapo", agg, "k3") for agg in AGGREGATIONS],
    ("gspo", "seq-mean-token-sum-norm", "k1+"), ("cispo", "token-sum", "abs"), ("gpg", "seq-mean-token-sum", "mse"),
    ("geo_mean", "token-mean", "low_var_kl"), ("geo_mean", "token-sum", "k3"), ("clip_cov", "token-mean", "k3"),
    ("kl_cov", "seq-mean-token-mean", "k1"), ("dppo_tv", "token-sum", "low_var_kl"),
    ("dppo_kl", "seq-mean-token-sum", "k2"), ("dro", "token-mean", "low_var_kl"),
])
def test_actor_loss_parity_with_ppo_loss(mode, agg, kl_type):
    """verl's ppo_loss (its policy term + entropy bonus + KL, each aggregated by verl) equals rlloss.policy_loss
    with loss_config_from_verl and batch_counts_from_verl, value and gradients w.r.t. log-probs and entropy."""
    b = batch([7, 3, 5, 1, 6], seed=7)
    info = dict(dp_size=2, batch_num_tokens=int(b["mask"].sum()) + 11, global_batch_size=8)
    config = actor_config(mode, agg, use_kl_loss=True, kl_loss_coef=0.05, kl_loss_type=kl_type,
                          entropy_coeff=0.01, loss_scale_factor=None)
    data, prompt_lens = ppo_loss_data(b, info)
    logp = b["logp"].clone().requires_grad_(True)
    entropy = b["entropy"].clone().requires_grad_(True)
    torch.manual_seed(0)
    loss, _ = ppo_loss(config, {"log_probs": nested_full(logp, b["mask"], prompt_lens),
                                "entropy": nested_full(entropy, b["mask"], prompt_lens)}, data)
    loss.backward()

    loss_config = rv.loss_config_from_verl(config, response_length=b["mask"].shape[1])
    assert loss_config.beta == 0.05 and loss_config.entropy_coef == 0.01
    logp_r = b["logp"].clone().requires_grad_(True)
    entropy_r = b["entropy"].clone().requires_grad_(True)
    torch.manual_seed(0)
    out = policy_loss(logp_r, b["old"], b["adv"], b["mask"], config=loss_config, ref_logprobs=b["ref"],
                      entropy=entropy_r, **rv.batch_counts_from_verl(config, b["mask"]))
    out.loss.backward()
    assert_close(out.loss.detach(), loss.detach())
    assert_close(logp_r.grad, logp.grad)
    assert_close(entropy_r.grad, entropy.grad)


def test_loss_config_refuses_what_rlloss_lacks():
    assert rv.NOT_IN_RLLOSS == ("bypass_mode",)
    for name in rv.NOT_IN_RLLOSS:
        with pytest.raises(ValueError, match=name):
            rv.loss_config_from_verl(actor_config(name))
        with pytest.raises(ValueError, match=name):
            rv.loss_config_from_verl(actor_config(), loss_mode=rv.PREFIX + name)
    with pytest.raises(ValueError, match="policy_loss.dro_beta"):
        rv.loss_config_from_verl(actor_config("dro", policy={}))
    b = batch([3, 0, 2])
    with pytest.raises(ValueError, match="policy_loss.dro_beta"):
        core_algos.get_policy_loss_fn("rlloss_dro")(b["old"], b["logp"], b["adv"], b["mask"], "token-mean",
                                                    actor_config("dro", policy=dict(dro_beta=0.0)))
    # geo_mean averages over the 3 local rows; a seq-mean KL over the 2 non-empty ones: not one rlloss call.
    with pytest.raises(ValueError, match="geo_mean"):
        rv.batch_counts_from_verl(actor_config("geo_mean", "seq-mean-token-mean", use_kl_loss=True), b["mask"])
    counts = rv.batch_counts_from_verl(actor_config("geo_mean", "token-mean", use_kl_loss=True), b["mask"])
    assert counts["num_sequences_in_batch"] == 3
    with pytest.raises(ValueError, match="kl_loss_type='full'"):
        rv.loss_config_from_verl(actor_config(use_kl_loss=True, kl_loss_type="full"))
    with pytest.raises(ValueError, match="no_such_loss"):
        rv.loss_config_from_verl(actor_config("vanilla"), loss_mode="no_such_loss")
    config = actor_config()
    set_global_info(config, dict(dp_size=2, batch_num_tokens=None, global_batch_size=None))
    with pytest.raises(ValueError, match="dp_size > 1"):
        rv.batch_counts_from_verl(config, torch.ones(2, 3, dtype=torch.bool))
    b = batch([3, 2])
    with pytest.raises(ValueError, match="config=None"):
        core_algos.get_policy_loss_fn("rlloss_vanilla")(b["old"], b["logp"], b["adv"], b["mask"], "token-mean")


# --- advantage estimators ------------------------------------------------------------------------------------


def outcome_batch(seed=0, sizes=(3, 1, 4, 2, 4)):
    """Outcome rewards on each completion's last counted token, groups of uneven size interleaved in the batch
    (verl groups by uid, not by position)."""
    g = torch.Generator().manual_seed(seed)
    uids = np.array([f"p{k}" for k, n in enumerate(sizes) for _ in range(n)], dtype=object)
    perm = torch.randperm(len(uids), generator=g)
    uids = uids[perm.numpy()]
    B, T = len(uids), 6
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    mask = (torch.arange(T)[None] < lengths[:, None]).float()
    scores = torch.randint(0, 3, (B,), generator=g).float() * 0.5 - 0.3
    rewards = torch.zeros(B, T)
    rewards[torch.arange(B), lengths - 1] = scores
    return rewards, mask, uids


@pytest.mark.parametrize("estimator,norm", [*[(e, True) for e in rv.VERL_ADVANTAGE_ESTIMATORS],
                                            ("grpo", False), ("grpo_passk", False)])  # the flag's estimators
def test_advantage_parity(estimator, norm):
    sizes = (3, 2, 4, 2, 4) if estimator == "grpo_passk" else (3, 1, 4, 2, 4)  # verl's pass@k refuses groups of 1
    rewards, mask, uids = outcome_batch(seed=8, sizes=sizes)
    config = AlgoConfig(norm_adv_by_std_in_grpo=norm)
    kwargs = dict(token_level_rewards=rewards, response_mask=mask, index=uids, config=config)
    if estimator == "remax":
        kwargs["reward_baselines"] = torch.randn(len(uids), generator=torch.Generator().manual_seed(9))
    stock = core_algos.get_adv_estimator_fn(estimator)
    if estimator == "grpo":  # verl's trainer passes this flag to its own grpo directly
        expected = stock(norm_adv_by_std_in_grpo=norm, **{k: v.clone() if isinstance(v, torch.Tensor) else v
                                                           for k, v in kwargs.items()})
    else:
        expected = stock(**{k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()})
    actual = core_algos.get_adv_estimator_fn(rv.PREFIX + estimator)(**kwargs)
    assert expected[0].abs().sum() > 0
    for a, e in zip(actual, expected):
        assert a.dtype == e.dtype and a.shape == e.shape
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-6)


def test_advantage_refusals():
    rewards, mask, uids = outcome_batch(seed=10)
    with pytest.raises(ValueError, match="gamma"):
        core_algos.get_adv_estimator_fn("rlloss_reinforce_plus_plus")(
            token_level_rewards=rewards, response_mask=mask, config=AlgoConfig(gamma=0.9))
    process = rewards.clone()
    process[:, 0] += 0.1
    with pytest.raises(ValueError, match="outcome rewards"):
        core_algos.get_adv_estimator_fn("rlloss_reinforce_plus_plus")(
            token_level_rewards=process, response_mask=mask, config=AlgoConfig())
    with pytest.raises(ValueError, match="at least 2"):
        core_algos.get_adv_estimator_fn("rlloss_grpo_passk")(
            token_level_rewards=rewards, response_mask=mask, index=uids, config=AlgoConfig())
    with pytest.raises(ValueError, match="uid"):
        core_algos.get_adv_estimator_fn("rlloss_grpo")(token_level_rewards=rewards, response_mask=mask)


# --- the FSDP actor engine ------------------------------------------------------------------------------------

VOCAB = 64


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB,
                                      initializer_range=0.2, attention_dropout=0.0, pad_token_id=0)
    return transformers.LlamaForCausalLM(config)


@pytest.fixture(autouse=False)
def cpu_engine(monkeypatch):
    """verl's engine asks the accelerator platform for its device; on a CPU-only machine: the CPU."""
    monkeypatch.setattr(transformer_impl, "get_device_id", lambda: "cpu")
    monkeypatch.setattr(transformer_impl, "get_device_name", lambda: "cpu")


def make_engine(model, cls=None):
    """An FSDPEngineWithLMHead as verl's initialize() leaves it, on one CPU process without FSDP wrapping."""
    engine = object.__new__(cls or transformer_impl.FSDPEngineWithLMHead)
    engine.module = model
    engine.use_ulysses_sp = False
    engine.pad_to_length = False
    engine._autocast_dtype = torch.float32
    engine.engine_config = type("EngineConfig", (), dict(entropy_checkpointing=False,
                                                          entropy_from_logits_with_chunking=False))()
    engine.compute_entropy_from_logits = verl_F.entropy_from_logits
    engine.get_data_parallel_group = lambda: None
    return engine


def micro_batch(temperature=0.7, **flags):
    """A verl micro-batch: left-padded prompts, right-padded responses, turned into verl's no-padding layout by
    verl's own left_right_2_no_padding."""
    g = torch.Generator().manual_seed(11)
    B, P, R = 4, 5, 6
    prompt_lens, response_lens = torch.tensor([5, 3, 4, 2]), torch.tensor([6, 2, 4, 1])
    prompt_mask = (torch.arange(P)[None] >= P - prompt_lens[:, None]).long()
    response_mask = (torch.arange(R)[None] < response_lens[:, None]).long()
    prompts = torch.randint(1, VOCAB, (B, P), generator=g) * prompt_mask
    responses = torch.randint(1, VOCAB, (B, R), generator=g) * response_mask
    attention = torch.cat([prompt_mask, response_mask], 1)
    td = TensorDict(dict(prompts=prompts, responses=responses, input_ids=torch.cat([prompts, responses], 1),
                         attention_mask=attention, position_ids=(attention.cumsum(1) - 1).clamp(min=0),
                         response_mask=response_mask, old_log_probs=-torch.rand(B, R, generator=g) * 4,
                         advantages=torch.randn(B, 1, generator=g).expand(B, R).contiguous(),
                         ref_log_prob=-torch.rand(B, R, generator=g) * 4), batch_size=[B])
    td = left_right_2_no_padding(td)
    tu.assign_non_tensor(td, **{**dict(temperature=temperature, use_remove_padding=True, calculate_entropy=True,
                                       dp_size=2, batch_num_tokens=int(response_mask.sum()) + 5,
                                       global_batch_size=7), **flags})
    return td


def run_step(engine, model, data, loss_mode, forward_only=False):
    config = actor_config(loss_mode, "token-mean", use_kl_loss=True, kl_loss_coef=0.05, entropy_coeff=0.01)
    model.zero_grad(set_to_none=True)
    loss, out = engine.forward_step(data, functools.partial(ppo_loss, config) if not forward_only else None,
                                    forward_only=forward_only)
    if not forward_only:
        loss.backward()
    grads = [p.grad.clone() for p in model.parameters()] if not forward_only else []
    metrics = {k: (v.aggregate() if hasattr(v, "aggregate") else v) for k, v in out["metrics"].items()}
    return loss.detach(), out["model_output"], metrics, grads


def count_head_calls(model):
    calls = []
    handle = model.get_output_embeddings().register_forward_hook(lambda *_: calls.append(1))
    return calls, handle


def compare_engines(model, data, loss_mode, **engine_fields):
    """One training micro-batch through verl's forward_step and ppo_loss: the stock engine with verl's loss and
    the patched engine with the registered rlloss loss give the same loss, log-probs, entropy, metrics and
    parameter gradients; the patched engine never calls the lm_head."""
    stock = make_engine(model)
    stock.__dict__.update(engine_fields)
    loss, outputs, metrics, grads = run_step(stock, model, data, loss_mode)
    engine = rv.patch_engine(make_engine(model))
    engine.__dict__.update(engine_fields)
    calls, handle = count_head_calls(model)
    try:
        loss_r, outputs_r, metrics_r, grads_r = run_step(engine, model, data, rv.PREFIX + loss_mode)
    finally:
        handle.remove()
    assert not calls
    torch.testing.assert_close(loss_r, loss, rtol=1e-5, atol=1e-6)
    for key in ("log_probs", "entropy"):
        torch.testing.assert_close(outputs_r[key].values(), outputs[key].values(), rtol=1e-5, atol=2e-6)
    assert set(metrics_r) <= set(metrics)
    for key, value in metrics_r.items():
        assert value == pytest.approx(metrics[key], rel=1e-4, abs=1e-6), key
    assert any(g.abs().sum() > 0 for g in grads)
    for g_r, g in zip(grads_r, grads):
        torch.testing.assert_close(g_r, g, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("loss_mode,temperature,pad_to_length", [
    ("vanilla", 0.7, False), ("gspo", 1.0, True), ("sapo", "per-sample", False)])
def test_patched_engine_equals_stock(cpu_engine, tiny_model, loss_mode, temperature, pad_to_length):
    if temperature == "per-sample":
        temperature = torch.tensor([0.7, 1.0, 1.3, 0.9])
    fields = dict(pad_to_length=True, pad_to_length_bucket=16) if pad_to_length else {}
    compare_engines(tiny_model, micro_batch(temperature), loss_mode, **fields)


def test_patched_engine_bf16_autocast(cpu_engine, tiny_model):
    """Under verl's bfloat16 autocast the stock log-probs are bfloat16 (logits in bfloat16); the patched ones are
    float32 from the same bfloat16 hidden states and lm_head: equal to bfloat16 precision."""
    data = micro_batch(0.7)
    stock = make_engine(tiny_model)
    stock._autocast_dtype = torch.bfloat16
    loss, outputs, _, grads = run_step(stock, tiny_model, data, "vanilla")
    engine = rv.patch_engine(make_engine(tiny_model))
    engine._autocast_dtype = torch.bfloat16
    loss_r, outputs_r, _, grads_r = run_step(engine, tiny_model, data, "rlloss_vanilla")
    assert outputs_r["log_probs"].values().dtype == torch.float32
    torch.testing.assert_close(loss_r, loss.float(), rtol=2e-2, atol=1e-3)
    for key in ("log_probs", "entropy"):
        torch.testing.assert_close(outputs_r[key].values(), outputs[key].values().float(), rtol=2e-2, atol=5e-2)
    for g_r, g in zip(grads_r, grads):
        assert (g_r - g).norm() <= 0.05 * g.norm() + 1e-6


def test_patched_engine_logit_softcap(cpu_engine):
    """Gemma 2's final logit soft-cap (applied before the temperature, as in its logits)."""
    torch.manual_seed(0)
    config = transformers.Gemma2Config(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, head_dim=8, vocab_size=VOCAB,
                                       initializer_range=0.5, final_logit_softcapping=3.0, pad_token_id=0)
    model = transformers.Gemma2ForCausalLM(config)
    compare_engines(model, micro_batch(0.7), "vanilla")
    with pytest.raises(ValueError, match="per-sample temperature"):
        rv.patch_engine(make_engine(model)).forward_step(micro_batch(torch.tensor([0.7, 1.0, 1.3, 0.9])), None,
                                                          forward_only=True)


def test_patched_engine_forward_only_and_class_patch(cpu_engine, tiny_model, monkeypatch):
    """The log-prob pass (no loss function), through the class-level patch; the stock forward still serves
    calls without rlloss's targets."""
    data = micro_batch(temperature=0.8)
    _, outputs, _, _ = run_step(make_engine(tiny_model), tiny_model, data, "vanilla", forward_only=True)
    monkeypatch.setattr(transformer_impl.FSDPEngineWithLMHead, "forward_step",
                        transformer_impl.FSDPEngineWithLMHead.forward_step)
    rv.patch_engine_class()
    calls, handle = count_head_calls(tiny_model)
    try:
        _, outputs_r, _, _ = run_step(make_engine(tiny_model), tiny_model, data, "vanilla", forward_only=True)
    finally:
        handle.remove()
    assert not calls
    for key in ("log_probs", "entropy"):
        torch.testing.assert_close(outputs_r[key].values(), outputs[key].values(), rtol=1e-5, atol=2e-6)


@pytest.mark.parametrize("option,match", [
    (dict(use_fused_kernels=True), "use_fused_kernels"),
    (dict(use_remove_padding=False), "use_remove_padding=False"),
    (dict(calculate_sum_pi_squared=True), "calculate_sum_pi_squared"),
    (dict(distillation_use_topk=True), "distillation_use_topk"),
    ("ulysses", "ulysses_sequence_parallel_size"),
])
def test_patched_engine_refusals(cpu_engine, tiny_model, option, match):
    engine = rv.patch_engine(make_engine(tiny_model))
    if option == "ulysses":
        engine.use_ulysses_sp, option = True, {}
    with pytest.raises(ValueError, match=match):
        engine.forward_step(micro_batch(**option), None, forward_only=True)


def test_patch_engine_refuses_other_engines(tiny_model):
    with pytest.raises(TypeError, match="FSDPEngineWithLMHead"):
        rv.patch_engine(make_engine(tiny_model, transformer_impl.FSDPEngineWithValueHead))
    with pytest.raises(TypeError, match="FSDPEngineWithLMHead"):
        rv.patch_engine(object())
