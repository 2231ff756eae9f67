"""The GRPO family's extension points and methods (docs/math.md §9) against float64 oracles: per-token
advantages and clip ranges given as tensors on every path, the token selection (entropy, |A|·H) and the
off-policy sequence mask (with TRL's own mask helpers), advantages over arbitrary group ids, MC-GRPO end to end,
D³S's sample selection, GiGPO and the pairwise decomposed advantage."""
import itertools

import pytest
import torch

import rlloss
from rlloss import FusedPolicyLoss, LossConfig, reference
from rlloss.advantages import ADVANTAGE_MODES, default_eps

from conftest import KERNEL_BACKEND

B, T, D, V = 4, 9, 8, 40


def _batch(seed=0, per_token_adv=False):
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(B, T, generator=g) > 0.2
    mask[2, 5:] = False
    f = dict(dtype=torch.float64)
    batch = dict(
        hidden=torch.randn(B, T, D, generator=g, **f), weight=0.5 * torch.randn(V, D, generator=g, **f),
        targets=torch.randint(0, V, (B, T), generator=g), mask=mask,
        advantages=torch.randn((B, T) if per_token_adv else (B,), generator=g, **f),
        old_logprobs=None, ref_logprobs=None, rollout_logprobs=None,
    )
    logp, _ = reference.token_logprobs(batch["hidden"], batch["weight"], torch.where(mask, batch["targets"], -100))
    # old / rollout near the current log-probs, so that some ratios are clipped and some sequences are off-policy
    batch["old_logprobs"] = logp + 0.3 * torch.randn(B, T, generator=g, **f)
    batch["ref_logprobs"] = logp + 0.2 * torch.randn(B, T, generator=g, **f)
    batch["rollout_logprobs"] = logp + 0.4 * torch.randn(B, T, generator=g, **f)
    return batch


def _oracle(config, batch, **kw):
    """The float64 reference composition by autograd: loss and d(loss)/d(hidden, weight)."""
    h = batch["hidden"].clone().requires_grad_()
    w = batch["weight"].clone().requires_grad_()
    logp, ent = reference.token_logprobs(h, w, torch.where(batch["mask"], batch["targets"], -100))
    loss, _ = reference.policy_loss(logp, batch["old_logprobs"], batch["advantages"], batch["mask"], config=config,
                                    ref_logprobs=batch["ref_logprobs"], entropy=ent,
                                    rollout_logprobs=batch["rollout_logprobs"], **kw)
    gh, gw = torch.autograd.grad(loss, (h, w))
    return loss.detach(), gh, gw


def _fused(config, batch, backend, dtype=torch.float64, **kw):
    h = batch["hidden"].to(dtype).requires_grad_()
    w = batch["weight"].to(dtype).requires_grad_()
    cast = {k: None if batch[k] is None else batch[k].to(dtype)
            for k in ("advantages", "old_logprobs", "ref_logprobs", "rollout_logprobs")}
    kw = {k: v.to(dtype) if isinstance(v, torch.Tensor) else v for k, v in kw.items()}
    out = FusedPolicyLoss(config, backend=backend)(h, w, batch["targets"], batch["mask"], cast.pop("advantages"),
                                                   **cast, **kw)
    gh, gw = torch.autograd.grad(out.loss, (h, w))
    return out.loss.detach().double(), gh.double(), gw.double()


def _unfused(config, batch, backend, dtype=torch.float64, **kw):
    """policy_loss on the exact log-probs and entropy, chained to hidden / weight by autograd."""
    h = batch["hidden"].clone().requires_grad_()
    w = batch["weight"].clone().requires_grad_()
    logp, ent = reference.token_logprobs(h, w, torch.where(batch["mask"], batch["targets"], -100))
    cast = {k: None if batch[k] is None else batch[k].to(dtype)
            for k in ("advantages", "old_logprobs", "ref_logprobs", "rollout_logprobs")}
    kw = {k: v.to(dtype) if isinstance(v, torch.Tensor) else v for k, v in kw.items()}
    out = rlloss.policy_loss(logp.to(dtype), cast.pop("old_logprobs"), cast.pop("advantages"), batch["mask"],
                             config=config, entropy=ent.to(dtype), backend=backend, **cast, **kw)
    gh, gw = torch.autograd.grad(out.loss, (h, w))
    return out.loss.detach().double(), gh, gw


PATHS = {
    "torch": (_unfused, "torch", torch.float64, dict(rtol=1e-9, atol=1e-12)),
    "kernel": (_unfused, KERNEL_BACKEND, torch.float32, dict(rtol=2e-5, atol=2e-6)),
    "fused_torch": (_fused, "torch", torch.float64, dict(rtol=1e-9, atol=1e-12)),
    "fused_kernel": (_fused, KERNEL_BACKEND, torch.float32, dict(rtol=2e-4, atol=2e-5)),
}


def _check(config, batch, path, **kw):
    run, backend, dtype, tol = PATHS[path]
    expected = _oracle(config, batch, **kw)
    actual = run(config, batch, backend, dtype, **kw)
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e, **tol)


CLIP_CONFIGS = {
    "ppo": LossConfig(beta=0.05, kl_estimator="k3", entropy_coef=0.01),
    "ppo_dual_seq": LossConfig(dual_clip=3.0, aggregation="seq_mean_token_mean"),
    "cispo_trl": LossConfig(loss_mode="cispo_trl", epsilon_high=1.2),
    "cispo_verl": LossConfig(loss_mode="cispo_verl"),
}


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("name", list(CLIP_CONFIGS))
def test_clip_ranges_as_tensors(name, path):
    batch = _batch(1, per_token_adv=name == "ppo")
    g = torch.Generator().manual_seed(7)
    per_group = torch.tensor([0.05, 0.3, 0.1, 0.2], dtype=torch.float64)  # e.g. one ε per group of 2 … 4
    eps_high = (1.0 + torch.rand(B, T, generator=g, dtype=torch.float64) if name == "cispo_trl"
                else 0.05 + 0.3 * torch.rand(B, 1, generator=g, dtype=torch.float64))
    _check(CLIP_CONFIGS[name], batch, path, epsilon_low=per_group, epsilon_high=eps_high)


def test_clip_ranges_equal_to_the_config_change_nothing():
    batch = _batch(2)
    config = LossConfig(epsilon_low=0.1, epsilon_high=0.25)
    plain = _fused(config, batch, "torch")
    ranges = _fused(config, batch, "torch", epsilon_low=torch.full((B,), 0.1, dtype=torch.float64),
                    epsilon_high=torch.full((B, T), 0.25, dtype=torch.float64))
    for a, b in zip(plain, ranges):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=0)
    # and the one-pass route is kept (the gradients are formed in the forward)
    from rlloss import policy as pl
    assert pl.one_pass(config, False, False)


SELECT_CONFIGS = {
    "trl_entropy_quantile": LossConfig.preset("dapo", token_select="entropy", token_select_fraction=0.3),
    "entropy_bonus_local": LossConfig.preset("grpo", token_select="entropy", token_select_fraction=0.5,
                                              entropy_coef=0.05),
    "entropy_bonus_token_mean": LossConfig(token_select="entropy", token_select_fraction=0.5, entropy_coef=0.05,
                                           beta=0.1),
    "d3s_adv_entropy": LossConfig(token_select="adv_entropy", token_select_fraction=0.4, dual_clip=3.0),
    "off_policy_mask": LossConfig.preset("dapo", off_policy_mask_threshold=0.05, beta=0.04),
    "both": LossConfig(token_select="entropy", token_select_fraction=0.6, off_policy_mask_threshold=0.0,
                       credit="rlsd", rollout_correction="token_truncate"),
}


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("name", list(SELECT_CONFIGS))
def test_selection(name, path):
    config = SELECT_CONFIGS[name]
    batch = _batch(3, per_token_adv=name == "d3s_adv_entropy")
    kw = {}
    if config.credit is not None:
        kw["pos_logprobs"] = batch["old_logprobs"] + 0.1
    if name == "trl_entropy_quantile":
        batch["rollout_logprobs"] = None  # the off-policy mask then compares with old_logprobs
    _check(config, batch, path, **kw)


def test_selection_takes_the_two_pass_route_and_drops_tokens():
    from rlloss import policy as pl
    config = SELECT_CONFIGS["trl_entropy_quantile"]
    assert not pl.one_pass(config, False, False)
    batch = _batch(4)
    on, off = _fused(config, batch, "torch"), _fused(config.replace(token_select=None, token_select_fraction=1.0),
                                                     batch, "torch")
    assert not torch.allclose(on[0], off[0])


def _trl_entropy_mask(entropy, mask, quantile):
    """TRL's own GRPOTrainer.get_high_entropy_mask, with a single-process accelerator."""
    from types import SimpleNamespace

    from trl.trainer.grpo_trainer import GRPOTrainer

    accelerator = SimpleNamespace(pad_across_processes=lambda x, dim, pad_index: x, gather=lambda x: x)
    return GRPOTrainer.get_high_entropy_mask(SimpleNamespace(accelerator=accelerator), entropy, mask, 1 - quantile)


@pytest.mark.parametrize("rollout", [False, True])
def test_trl_masks_and_loss(rollout):
    """TRL's mask helpers give the same tokens as rlloss's selection, and the TRL composition of its dapo loss
    (per-token clipped surrogate × masks, + β·KL, / num_items) equals policy_loss with the two options."""
    pytest.importorskip("trl")
    from trl.trainer.grpo_trainer import GRPOTrainer
    from rlloss import policy as pl

    batch = _batch(5)
    mask, adv = batch["mask"], batch["advantages"]
    logp, ent = reference.token_logprobs(batch["hidden"].float(), batch["weight"].float(),
                                         torch.where(mask, batch["targets"], -100))
    old = batch["old_logprobs"].float()
    sampling = batch["rollout_logprobs"].float() if rollout else None
    q, delta, beta = 0.4, 0.02, 0.04
    config = LossConfig.preset("dapo", token_select="entropy", token_select_fraction=q,
                               off_policy_mask_threshold=delta, beta=beta)
    m = mask.float()
    trl_entropy = _trl_entropy_mask(ent, m, q)
    trl_off = GRPOTrainer.get_off_policy_mask(adv.float()[:, None], logp, old if sampling is None else sampling,
                                              m, delta)
    tokens, _ = pl.prepare_tokens(config, mask, old, adv.float(), None, None, torch.ones(3), None, None,
                                  torch.float32)
    keep, keep_entropy = pl.selection_masks(config, torch.where(mask, logp, 0.0), torch.where(mask, ent, 0.0),
                                            tokens, None if sampling is None else torch.where(mask, sampling, 0.0))
    assert torch.equal(keep_entropy, trl_entropy)
    assert torch.equal(keep & mask, trl_entropy & (trl_off > 0) & mask)

    # TRL's _compute_loss for loss_type="dapo", token-level IS, with both masks and use_bias_correction_kl
    lp = logp.clone().requires_grad_()
    ref = batch["ref_logprobs"].float()
    coef_1 = torch.exp(lp - old)
    coef_2 = coef_1.clamp(1 - 0.2, 1 + 0.2)
    per_token = -torch.min(coef_1 * adv.float()[:, None], coef_2 * adv.float()[:, None])
    per_token = per_token * trl_off * trl_entropy
    kl = (torch.exp(ref - lp) - (ref - lp) - 1) * coef_1
    per_token = per_token + beta * kl
    num_items = m.sum()
    trl_loss = (per_token * m).sum() / num_items
    (trl_grad,) = torch.autograd.grad(trl_loss, lp)
    lp2 = logp.clone().requires_grad_()
    out = rlloss.policy_loss(lp2, old, adv.float(), mask, config=config, ref_logprobs=ref, entropy=ent,
                             rollout_logprobs=sampling, num_items_in_batch=num_items, backend="torch")
    (grad,) = torch.autograd.grad(out.loss, lp2)
    torch.testing.assert_close(out.loss, trl_loss, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(grad, trl_grad * m, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("path", ["kernel", "fused_kernel", "fused_torch"])
def test_per_token_advantages_on_every_path(path):
    _check(LossConfig(beta=0.02, kl_estimator="k3", dual_clip=3.0), _batch(6, per_token_adv=True), path)


# --- advantages over arbitrary group ids ----------------------------------------------------------------


@pytest.mark.parametrize("backend", ["torch", KERNEL_BACKEND, "reference"])
def test_group_ids_every_mode(backend):
    g = torch.Generator().manual_seed(0)
    rewards = torch.randn(13, generator=g, dtype=torch.float64)
    rewards[[2, 7]] = rewards[0].item()  # ties
    ids = torch.tensor([5, 1, 5, 2, 1, 5, 2, 5, 1, 9, 2, 1, 5])  # interleaved, one singleton (9)
    for mode in ADVANTAGE_MODES:
        actual = rlloss.group_advantages(rewards, group_ids=ids, mode=mode, backend=backend)
        expected = reference.group_advantages(rewards, None, group_ids=ids, mode=mode, eps=default_eps(mode))
        torch.testing.assert_close(actual, expected, rtol=1e-12, atol=1e-12, msg=mode)
    lengths = torch.randint(1, 9, (13,), generator=g)
    actual = rlloss.group_advantages(rewards, group_ids=ids, mode="opo", response_lengths=lengths, backend=backend)
    expected = reference.group_advantages(rewards, None, group_ids=ids, mode="opo", response_lengths=lengths)
    torch.testing.assert_close(actual, expected, rtol=1e-12, atol=1e-12)


def test_group_ids_equal_consecutive_groups_and_errors():
    rewards = torch.rand(12, dtype=torch.float64)
    by_size = rlloss.group_advantages(rewards, group_size=4)
    by_ids = rlloss.group_advantages(rewards, group_ids=torch.arange(12) // 4)
    torch.testing.assert_close(by_ids, by_size, rtol=0, atol=0)
    with pytest.raises(ValueError, match="exactly one of group_size, group_sizes and group_ids"):
        rlloss.group_advantages(rewards, group_size=4, group_ids=torch.arange(12))
    with pytest.raises(TypeError, match="group_ids must hold integers"):
        rlloss.group_advantages(rewards, group_ids=torch.zeros(12))
    with pytest.raises(ValueError, match="group_ids must have rewards' shape"):
        rlloss.group_advantages(rewards, group_ids=torch.zeros(11, dtype=torch.int64))


# --- MC-GRPO --------------------------------------------------------------------------------------------


def _mc_grpo_reference_pipeline(rewards, group):
    """MC-GRPO's published training step, transcribed from its description (docs/math.md §9): median of each
    G + 1 group by torch.median (value and index), MAD + 1e-3, the non-zero advantages of a group times
    (G + 1)/nnz, then the median rollout removed."""
    grouped = rewards.view(-1, group)
    med = grouped.median(dim=1)
    mad = (grouped - med.values[:, None]).abs().median(dim=1).values + 1e-3
    adv = (grouped - med.values[:, None]) / mad[:, None]
    nonzero = ~torch.isclose(adv, torch.zeros_like(adv), atol=1e-6)
    scale = group / nonzero.sum(1, keepdim=True).clamp(min=1).double()  # a Python float in the code
    adv = torch.where(nonzero, adv * scale, adv).view(-1)
    keep = torch.ones_like(rewards, dtype=torch.bool)
    keep[torch.arange(grouped.shape[0]) * group + med.indices] = False
    return adv, keep


def test_mc_grpo_end_to_end():
    g = torch.Generator().manual_seed(11)
    group, prompts = 5, 3  # G = 4 training rollouts + the pivot
    # partial credit, a unique median per group (with ties at the median the code's pivot is whichever index
    # torch.median reports; test_mc_grpo_varying_groups_and_ties pins rlloss's rule)
    rewards = torch.tensor([0.1, 0.9, 0.5, 0.3, 0.7,
                            1.0, 0.0, 0.2, 0.25, 0.6,
                            0.0, 0.05, 0.1, 1.0, 0.15], dtype=torch.float64)
    expected_adv, expected_keep = _mc_grpo_reference_pipeline(rewards, group)
    adv = rlloss.group_advantages(rewards, group_size=group, mode="mc_grpo")
    keep = rlloss.mc_grpo_keep_mask(rewards, group_size=group)
    torch.testing.assert_close(adv, expected_adv, rtol=1e-12, atol=1e-12)
    assert torch.equal(keep, expected_keep)

    # the loss on the kept rows: rlloss's fused loss against the float64 reference on the reference's rows
    n = group * prompts
    hidden = torch.randn(n, T, D, generator=g, dtype=torch.float64)
    weight = 0.5 * torch.randn(V, D, generator=g, dtype=torch.float64)
    targets = torch.randint(0, V, (n, T), generator=g)
    mask = torch.rand(n, T, generator=g) > 0.2
    config = LossConfig.preset("dapo")
    rows = expected_keep.nonzero().flatten()
    batch = dict(hidden=hidden[rows], weight=weight, targets=targets[rows], mask=mask[rows],
                 advantages=expected_adv[rows], old_logprobs=None, ref_logprobs=None, rollout_logprobs=None)
    expected = _oracle(config, batch)
    actual = _fused(config, dict(batch, hidden=hidden[keep], targets=targets[keep], mask=mask[keep],
                                 advantages=adv[keep]), "torch")
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-12)
    # the masked form gives the same token-mean loss
    masked = _fused(config, dict(batch, hidden=hidden, targets=targets, mask=mask & keep[:, None],
                                 advantages=adv), "torch")
    torch.testing.assert_close(masked[0], expected[0], rtol=1e-10, atol=1e-12)


def test_mc_grpo_varying_groups_and_ties():
    rewards = torch.tensor([1.0, 0.0, 1.0, 0.0, 1.0, 0.5, 0.5, 0.5, 2.0, 0.0, 1.0], dtype=torch.float64)
    sizes = [5, 3, 3]
    keep = rlloss.mc_grpo_keep_mask(rewards, group_sizes=sizes)
    assert keep.tolist() == [False, True, True, True, True, False, True, True, True, True, False]
    adv = rlloss.group_advantages(rewards, group_sizes=sizes, mode="mc_grpo")
    expected = reference.group_advantages(rewards, sizes, mode="mc_grpo", eps=1e-3)
    torch.testing.assert_close(adv, expected, rtol=1e-12, atol=1e-12)
    assert torch.all(adv[~keep] == 0)
    ids = torch.tensor([0, 1, 0, 1, 0, 2, 2, 2, 1, 1, 1])
    keep_ids = rlloss.mc_grpo_keep_mask(rewards, group_ids=ids)
    assert keep_ids.tolist() == [False, False, True, True, True, False, True, True, True, True, True]


# --- D³S, GiGPO, pairwise ---------------------------------------------------------------------------------


def test_d3s_sample_mask_maximises_the_variance():
    g = torch.Generator().manual_seed(3)
    adv = torch.randn(17, generator=g, dtype=torch.float64)
    sizes = [6, 7, 1, 3]
    for k in (1, 2, 3, 4):
        keep = rlloss.d3s_sample_mask(adv, k, group_sizes=sizes)
        begin = 0
        for size in sizes:
            members = list(range(begin, begin + size))
            chosen = [i for i in members if keep[i]]
            assert len(chosen) == min(k, size)
            best = max(adv[list(c)].var(unbiased=False).item() for c in itertools.combinations(members, len(chosen)))
            assert adv[chosen].var(unbiased=False).item() == pytest.approx(best, rel=1e-12, abs=1e-15)
            begin += size
    with pytest.raises(ValueError, match="keep must be >= 1"):
        rlloss.d3s_sample_mask(adv, 0, group_size=17)


@pytest.mark.parametrize("normalize_std", [False, True])
def test_gigpo_against_the_reference(normalize_std):
    g = torch.Generator().manual_seed(5)
    # 2 tasks × 3 episodes, 3 steps each; anchor states repeat across the episodes of a task
    episode_ids = torch.tensor([0] * 9 + [1] * 9 + [2])
    trajectory_ids = torch.tensor([t for t in range(6) for _ in range(3)] + [6])
    anchor_ids = torch.tensor([0, 1, 2, 0, 1, 3, 0, 4, 2, 0, 1, 1, 0, 2, 1, 5, 5, 5, 0])
    episode_reward = torch.tensor([1.0, 0.0, 1.0, 0.0, 0.0, 1.0, 3.0], dtype=torch.float64)[trajectory_ids]
    step_rewards = torch.rand(19, generator=g, dtype=torch.float64)
    returns = rlloss.discounted_returns(step_rewards, trajectory_ids, 0.95)
    manual = step_rewards[2] + 0.95 * 0.0
    assert returns[2].item() == pytest.approx(manual)
    assert returns[0].item() == pytest.approx(step_rewards[0] + 0.95 * step_rewards[1] + 0.95 ** 2 * step_rewards[2])
    actual = rlloss.gigpo_advantages(episode_reward, returns, episode_ids, anchor_ids, step_weight=0.7,
                                     normalize_std=normalize_std)
    expected = reference.gigpo_advantages(episode_reward, returns, episode_ids, anchor_ids, step_weight=0.7,
                                          normalize_std=normalize_std)
    torch.testing.assert_close(actual, expected, rtol=1e-10, atol=1e-12)


def test_pairwise_advantages():
    g = torch.Generator().manual_seed(8)
    rewards = torch.rand(10, generator=g, dtype=torch.float64)
    sizes = [4, 5, 1]
    torch.testing.assert_close(rlloss.pairwise_advantages(rewards, group_sizes=sizes),
                               rlloss.group_advantages(rewards, group_sizes=sizes, mode="rloo"),
                               rtol=1e-12, atol=1e-12)
    w = torch.rand(10, 10, generator=g, dtype=torch.float64)
    actual = rlloss.pairwise_advantages(rewards, w, group_sizes=sizes)
    group = [0] * 4 + [1] * 5 + [2]
    for i in range(10):
        others = [j for j in range(10) if group[j] == group[i] and j != i]
        expected = sum(w[i, j] * (rewards[i] - rewards[j]) for j in others) / max(len(others), 1)
        assert actual[i].item() == pytest.approx(float(expected), rel=1e-12, abs=1e-15)


@pytest.mark.parametrize("rule", ["progress", "scaling"])
def test_process_credit_example_runs(rule):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "examples" / "process_credit.py"
    spec = importlib.util.spec_from_file_location("example_process_credit", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    loss = module.main(["--rule", rule])  # asserts the fused loss equals the float64 reference
    assert loss == loss
