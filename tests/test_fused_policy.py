"""FusedPolicyLoss (hidden states → policy loss in one call) against the float64 reference composition
``reference.token_logprobs`` → ``reference.policy_loss``: value, every metric, and the gradients w.r.t.
hidden, weight and bias, on the torch backend (float64) and the kernels (interpreter on CPU, float32)."""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import rlloss
from rlloss import FusedPolicyLoss, LossConfig
from rlloss import reference

from conftest import KERNEL_BACKEND

B, T, D, V = 3, 37, 24, 300  # T and V are not multiples of any block


def _batch(dtype, *, per_token_adv=False, bias=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, D, generator=g, dtype=torch.float64).to(dtype)
    weight = (0.3 * torch.randn(V, D, generator=g, dtype=torch.float64)).to(dtype)
    targets = torch.randint(0, V, (B, T), generator=g)
    mask = torch.rand(B, T, generator=g) > 0.25
    mask[1, 20:] = False
    adv_shape = (B, T) if per_token_adv else (B,)
    batch = dict(
        hidden=hidden,
        weight=weight,
        targets=targets,
        mask=mask,
        advantages=torch.randn(adv_shape, generator=g, dtype=torch.float64).to(dtype),
        old_logprobs=(torch.randn(B, T, generator=g, dtype=torch.float64) * 0.2 - 5.8).to(dtype),
        ref_logprobs=(torch.randn(B, T, generator=g, dtype=torch.float64) * 0.2 - 5.8).to(dtype),
        rollout_logprobs=(torch.randn(B, T, generator=g, dtype=torch.float64) * 0.2 - 5.8).to(dtype),
        bias=(0.1 * torch.randn(V, generator=g, dtype=torch.float64)).to(dtype) if bias else None,
    )
    # Outside the mask: garbage that must never be read.
    batch["targets"][~mask] = -5
    batch["hidden"][~mask] = float("nan")
    return batch


def _run(module, batch, **kw):
    leaves = {k: batch[k].clone().requires_grad_() for k in ("hidden", "weight")}
    if batch["bias"] is not None:
        leaves["bias"] = batch["bias"].clone().requires_grad_()
    extra = {k: batch[k] for k in ("old_logprobs", "ref_logprobs", "rollout_logprobs")}
    out = module(leaves["hidden"], leaves["weight"], batch["targets"], batch["mask"], batch["advantages"],
                 bias=leaves.get("bias"), **extra, **kw)
    out.loss.backward()
    return out, {k: v.grad for k, v in leaves.items()}


def _oracle(config, batch, *, temperature=1.0, softcap=None, **kw):
    """The unfused float64 composition, through autograd."""
    f64 = {k: (v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v) for k, v in batch.items()}
    leaves = {k: f64[k].clone().requires_grad_() for k in ("hidden", "weight")}
    if f64["bias"] is not None:
        leaves["bias"] = f64["bias"].clone().requires_grad_()
    targets = torch.where(batch["mask"], batch["targets"], -100)
    logprobs, entropy = reference.token_logprobs(leaves["hidden"], leaves["weight"], targets, bias=leaves.get("bias"),
                                                 temperature=temperature, softcap=softcap)
    loss, metrics = reference.policy_loss(
        logprobs, f64["old_logprobs"], f64["advantages"], batch["mask"], config=config,
        ref_logprobs=f64["ref_logprobs"], entropy=entropy, rollout_logprobs=f64["rollout_logprobs"], **kw
    )
    loss.backward()
    return loss, metrics, {k: v.grad for k, v in leaves.items()}


def _tolerances(backend):
    return dict(rtol=1e-9, atol=1e-11) if backend == "torch" else dict(rtol=2e-5, atol=2e-6)


def _assert_matches(out, grads, loss, metrics, ref_grads, backend):
    tol = _tolerances(backend)
    torch.testing.assert_close(out.loss.double(), loss, **tol)
    assert set(out.metrics) == set(metrics)
    for name, value in metrics.items():
        torch.testing.assert_close(out.metrics[name].double(), value, **tol, msg=name)
    for name, grad in ref_grads.items():
        assert torch.isfinite(grads[name]).all(), name
        scale = grad.abs().max().clamp(min=1e-30)
        torch.testing.assert_close(grads[name].double() / scale, grad / scale, **tol, msg=name)


def _backends():
    return [("torch", torch.float64), (KERNEL_BACKEND, torch.float32)]


PRESETS = ["grpo", "dapo", "dr_grpo", "bnpo", "gspo", "cispo", "sapo", "gpg", "verl_grpo", "verl_gspo",
           "verl_cispo"]


def _preset(name, **overrides):
    if name == "dr_grpo":
        overrides.setdefault("max_completion_length", T)
    return LossConfig.preset(name, **overrides)


@pytest.mark.parametrize("backend,dtype", _backends())
@pytest.mark.parametrize("preset", PRESETS)
def test_presets_match_reference(preset, backend, dtype):
    config = _preset(preset)
    batch = _batch(dtype)
    out, grads = _run(FusedPolicyLoss(config, backend=backend), batch)
    loss, metrics, ref_grads = _oracle(config, batch)
    _assert_matches(out, grads, loss, metrics, ref_grads, backend)


OPTIONS = [
    dict(beta=0.04, kl_estimator="k3"),
    dict(beta=0.1, kl_estimator="k2", entropy_coef=0.01),
    dict(beta=0.05, kl_estimator="k3+", kl_ratio_weighted=True),
    dict(entropy_coef=-0.02),
    dict(rollout_correction="token_truncate", rollout_threshold_high=2.0),
    dict(rollout_correction="sequence_mask", rollout_threshold_low=0.5, rollout_threshold_high=2.0),
    dict(importance_sampling_level="sequence_token"),
    dict(dual_clip=3.0, aggregation="seq_mean_token_mean"),
]


@pytest.mark.parametrize("backend,dtype", _backends())
@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
def test_options_match_reference(options, backend, dtype):
    config = LossConfig.preset("dapo", **options)
    batch = _batch(dtype, seed=1)
    out, grads = _run(FusedPolicyLoss(config, backend=backend), batch)
    loss, metrics, ref_grads = _oracle(config, batch)
    _assert_matches(out, grads, loss, metrics, ref_grads, backend)


@pytest.mark.parametrize("backend,dtype", _backends())
def test_bias_temperature_softcap_per_token_advantages(backend, dtype):
    config = LossConfig.preset("grpo", beta=0.02, entropy_coef=0.01)
    batch = _batch(dtype, per_token_adv=True, bias=True, seed=2)
    out, grads = _run(FusedPolicyLoss(config, temperature=0.7, softcap=4.0, backend=backend), batch)
    loss, metrics, ref_grads = _oracle(config, batch, temperature=0.7, softcap=4.0)
    assert set(grads) == {"hidden", "weight", "bias"}
    _assert_matches(out, grads, loss, metrics, ref_grads, backend)


@pytest.mark.parametrize("backend,dtype", _backends())
def test_masked_positions_get_exactly_zero_gradient(backend, dtype):
    batch = _batch(dtype, seed=3)
    out, grads = _run(FusedPolicyLoss(LossConfig.preset("dapo", entropy_coef=0.01), backend=backend), batch)
    assert torch.isfinite(out.loss)
    assert torch.all(grads["hidden"][~batch["mask"]] == 0)
    assert torch.all(grads["hidden"][batch["mask"]].abs().sum(-1) > 0)


@pytest.mark.parametrize("backend,dtype", _backends())
def test_equals_unfused_same_backend(backend, dtype):
    """FusedPolicyLoss == policy_loss(token_logprobs(...)) on the same backend, gradients included."""
    config = LossConfig.preset("gspo", entropy_coef=0.01)
    batch = _batch(dtype, seed=4)
    out, grads = _run(FusedPolicyLoss(config, backend=backend), batch)

    hidden = batch["hidden"].clone().requires_grad_()
    weight = batch["weight"].clone().requires_grad_()
    targets = torch.where(batch["mask"], batch["targets"], -100)
    lp = rlloss.token_logprobs(hidden, weight, targets, return_entropy=True, backend=backend)
    unfused = rlloss.policy_loss(lp.logprobs, batch["old_logprobs"], batch["advantages"], batch["mask"],
                                 config=config, entropy=lp.entropy, backend=backend)
    unfused.loss.backward()
    torch.testing.assert_close(out.loss, unfused.loss, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(grads["hidden"], hidden.grad, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(grads["weight"], weight.grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("backend,dtype", _backends())
def test_gradient_accumulation_with_global_normaliser(backend, dtype):
    """Two micro-batches with the global token count sum to the loss and gradients of the whole batch."""
    config = LossConfig.preset("dapo")
    batch = _batch(dtype, seed=5)
    n_items = int(batch["mask"].sum())
    module = FusedPolicyLoss(config, backend=backend)
    whole, whole_grads = _run(module, batch, num_items_in_batch=n_items)

    weight = batch["weight"].clone().requires_grad_()
    total = 0.0
    hidden_grads = []
    for rows in (slice(0, 1), slice(1, B)):
        hidden = batch["hidden"][rows].clone().requires_grad_()
        part = module(hidden, weight, batch["targets"][rows], batch["mask"][rows], batch["advantages"][rows],
                      old_logprobs=batch["old_logprobs"][rows], num_items_in_batch=n_items)
        part.loss.backward()
        total = total + part.loss.detach()
        hidden_grads.append(hidden.grad)
    tol = dict(rtol=1e-5, atol=1e-7) if backend != "torch" else dict(rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(total, whole.loss.detach(), **tol)
    torch.testing.assert_close(weight.grad, whole_grads["weight"], **tol)
    torch.testing.assert_close(torch.cat(hidden_grads).nan_to_num(0.0), whole_grads["hidden"].nan_to_num(0.0), **tol)


def test_kernel_backward_is_deterministic():
    config = LossConfig.preset("dapo", entropy_coef=0.01)
    batch = _batch(torch.float32, seed=6)
    module = FusedPolicyLoss(config, backend=KERNEL_BACKEND)
    _, first = _run(module, batch)
    _, second = _run(module, batch)
    for name in first:
        assert torch.equal(first[name], second[name]), name


def test_reference_backend_is_the_oracle():
    config = LossConfig.preset("grpo")
    batch = _batch(torch.float64, seed=7)
    out, grads = _run(FusedPolicyLoss(config, backend="reference"), batch)
    loss, metrics, ref_grads = _oracle(config, batch)
    _assert_matches(out, grads, loss, metrics, ref_grads, "torch")


def test_reference_backend_checks_its_inputs_once(monkeypatch):
    """The reference forward goes from its own checks straight to the oracle, not through policy_loss's."""
    import rlloss.policy as policy

    calls = []
    for name in ("_check_loss_inputs", "check_credit_inputs", "check_clip_range"):
        def counted(*args, _f=getattr(policy, name), _name=name, **kwargs):
            calls.append(_name)
            return _f(*args, **kwargs)

        monkeypatch.setattr(policy, name, counted)
    _run(FusedPolicyLoss(LossConfig.preset("grpo"), backend="reference"), _batch(torch.float64, seed=7))
    assert sorted(calls) == sorted(["_check_loss_inputs", "check_credit_inputs", "check_clip_range"])


def test_zero_advantages_give_zero_gradient():
    batch = _batch(torch.float64, seed=8)
    batch["advantages"] = torch.zeros(B, dtype=torch.float64)
    _, grads = _run(FusedPolicyLoss(LossConfig.preset("dapo"), backend="torch"), batch)
    assert torch.all(grads["hidden"].nan_to_num(0.0) == 0) and torch.all(grads["weight"] == 0)


@settings(max_examples=10, deadline=None)
@given(
    preset=st.sampled_from(PRESETS),
    beta=st.sampled_from([0.0, 0.05]),
    entropy_coef=st.sampled_from([0.0, 0.01]),
    temperature=st.floats(0.5, 1.5),
    seed=st.integers(0, 2**16),
)
def test_random_configs_torch(preset, beta, entropy_coef, temperature, seed):
    config = _preset(preset, beta=beta, entropy_coef=entropy_coef)
    batch = _batch(torch.float64, seed=seed)
    out, grads = _run(FusedPolicyLoss(config, temperature=temperature, backend="torch"), batch)
    loss, metrics, ref_grads = _oracle(config, batch, temperature=temperature)
    _assert_matches(out, grads, loss, metrics, ref_grads, "torch")


# --- errors -------------------------------------------------------------------------------------------


def _call(**changes):
    batch = _batch(torch.float64, seed=9)
    batch.pop("rollout_logprobs")
    batch.pop("ref_logprobs")
    batch.pop("bias")
    batch.update(changes)
    config = batch.pop("config", LossConfig.preset("dapo"))
    module = FusedPolicyLoss(config, backend="torch")
    return module(batch.pop("hidden"), batch.pop("weight"), batch.pop("targets"), batch.pop("mask"),
                  batch.pop("advantages"), **batch)


def test_error_hidden_rank():
    with pytest.raises(ValueError, match="hidden must be 3-D"):
        _call(hidden=torch.randn(B * T, D, dtype=torch.float64))


def test_error_targets_shape():
    with pytest.raises(ValueError, match="targets must be"):
        _call(targets=torch.randint(0, V, (B, T + 1)))


def test_error_targets_dtype():
    with pytest.raises(TypeError, match="targets must be int64"):
        _call(targets=torch.randint(0, V, (B, T), dtype=torch.int32))


@pytest.mark.parametrize("bad", [-100, -1, V])
def test_error_counted_target_out_of_range(bad):
    targets = torch.randint(0, V, (B, T))
    mask = torch.ones(B, T, dtype=torch.bool)
    targets[0, 3] = bad
    with pytest.raises(ValueError, match=r"targets must lie in \[0, 300\) where they count"):
        _call(targets=targets, mask=mask)


def test_error_mask_shape():
    with pytest.raises(ValueError, match="mask must have"):
        _call(mask=torch.ones(B, T - 1, dtype=torch.bool))


def test_error_missing_ref_logprobs():
    with pytest.raises(ValueError, match="ref_logprobs is required"):
        _call(config=LossConfig.preset("dapo", beta=0.1))


def test_error_config_type():
    with pytest.raises(TypeError, match="config must be a rlloss.LossConfig"):
        FusedPolicyLoss({"loss_mode": "ppo_clip"})


def test_error_weight_dtype():
    with pytest.raises(TypeError, match="weight must have hidden's dtype"):
        _call(weight=torch.randn(V, D, dtype=torch.float32))


# --- GPU ----------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("preset", ["dapo", "gspo"])
def test_gpu_bf16_realistic(preset):
    """bf16 on the compiled kernels at a realistic size vs the float64 composition of the same rounded inputs."""
    torch.manual_seed(0)
    b, t, d, v = 4, 1024, 1024, 32000
    dev = "cuda"
    hidden = torch.randn(b, t, d, device=dev).bfloat16().requires_grad_()
    weight = (torch.randn(v, d, device=dev) * 0.02).bfloat16().requires_grad_()
    targets = torch.randint(0, v, (b, t), device=dev)
    mask = torch.rand(b, t, device=dev) > 0.1
    adv = torch.randn(b, device=dev)
    with torch.no_grad():
        old = rlloss.token_logprobs(hidden, weight, targets).logprobs + 0.05 * torch.randn(b, t, device=dev)
    config = LossConfig.preset(preset, entropy_coef=0.01)
    out = FusedPolicyLoss(config, backend="triton")(hidden, weight, targets, mask, adv, old_logprobs=old)
    out.loss.backward()
    h64 = hidden.detach().double().requires_grad_()
    w64 = weight.detach().double().requires_grad_()
    lp, ent = reference.token_logprobs(h64, w64, torch.where(mask, targets, -100))
    ref = reference.policy_loss(lp, old.double(), adv.double(), mask, config=config, entropy=ent)[0]
    ref.backward()
    assert math.isfinite(out.loss.item())
    torch.testing.assert_close(out.loss.double(), ref, rtol=2e-3, atol=2e-3)
    for got, want in ((hidden.grad, h64.grad), (weight.grad, w64.grad)):
        rel = (got.double() - want).norm() / want.norm()
        assert rel < 2e-2, rel
