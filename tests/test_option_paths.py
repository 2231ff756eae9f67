"""Every LossConfig field × every path: each non-default value either matches the float64 reference (value and
gradients) or raises an error that names the option — never a silent bypass.

Paths: ``policy_loss`` on the reference, torch and kernel (interpreter on CPU) backends; ``FusedPolicyLoss`` on
its one-pass route and forced onto its two-pass route (statistics, then a recompute). The fields are read from
``dataclasses.fields(LossConfig)``: a new field without an entry in ``NON_DEFAULT`` fails
``test_every_field_has_cases``.
"""
import dataclasses

import pytest
import torch

import rlloss
from rlloss import FusedPolicyLoss, LossConfig, reference
from rlloss import policy as pl

from conftest import KERNEL_BACKEND

B, T, D, V = 3, 7, 8, 32

# Non-default values of each field, each with the companion settings that make it matter (β for a KL option,
# c_H for an entropy option, a rollout correction for its thresholds …).
NON_DEFAULT = {
    "loss_mode": [dict(loss_mode="cispo_trl", epsilon_high=2.0), dict(loss_mode="cispo_verl"),
                  dict(loss_mode="gpg"), dict(loss_mode="sapo"), dict(loss_mode="geo_mean"),
                  dict(loss_mode="clip_cov", clip_cov_ratio=1.0, clip_cov_lb=-10.0),  # every candidate: no draw
                  dict(loss_mode="kl_cov", kl_cov_ratio=0.3), dict(loss_mode="dppo_tv"), dict(loss_mode="dppo_kl"),
                  dict(loss_mode="dro", dro_beta=0.5), dict(loss_mode="vespo")],
    "epsilon_low": [dict(epsilon_low=0.05)],
    "epsilon_high": [dict(epsilon_high=0.28)],
    "delta": [dict(delta=1.1)],
    "dual_clip": [dict(dual_clip=2.0)],
    "sapo_tau_pos": [dict(loss_mode="sapo", sapo_tau_pos=2.0)],
    "sapo_tau_neg": [dict(loss_mode="sapo", sapo_tau_neg=0.5)],
    "importance_sampling_level": [dict(importance_sampling_level="sequence"),
                                  dict(importance_sampling_level="sequence_token")],
    "log_ratio_min": [dict(log_ratio_min=-0.1)],
    "log_ratio_max": [dict(log_ratio_max=0.1)],
    "beta": [dict(beta=0.1)],
    "kl_estimator": [dict(beta=0.1, kl_estimator=e) for e in ("k2", "k1+", "abs+")],
    "kl_ratio_weighted": [dict(beta=0.1, kl_ratio_weighted=True)],
    "kl_clamp": [dict(beta=0.1, kl_clamp=True)],
    "entropy_coef": [dict(entropy_coef=0.05)],
    "rollout_correction": [dict(rollout_correction=c) for c in ("token_mask", "sequence_truncate")],
    "rollout_threshold_low": [dict(rollout_correction="token_mask", rollout_threshold_low=0.8)],
    "rollout_threshold_high": [dict(rollout_correction="token_truncate", rollout_threshold_high=1.1)],
    "aggregation": [dict(aggregation="seq_mean_token_mean"),
                    dict(aggregation="seq_mean_token_sum_norm", max_completion_length=10)],
    "max_completion_length": [dict(aggregation="seq_mean_token_sum_norm", max_completion_length=20)],
    "kl_aggregation": [dict(beta=0.1, kl_aggregation="seq_mean_token_mean")],
    "entropy_aggregation": [dict(entropy_coef=0.05, entropy_aggregation="token_mean_local")],
    "dp_size": [dict(aggregation="token_sum", dp_size=2)],
    "credit": [dict(credit="cepo"), dict(credit="rlsd")],
    "credit_lambda": [dict(credit="cepo", credit_lambda=0.9)],
    "credit_eps_w": [dict(credit="rlsd", credit_eps_w=0.5)],
    "token_select": [dict(token_select="entropy", token_select_fraction=0.5),
                     dict(token_select="adv_entropy", token_select_fraction=0.5)],
    "token_select_fraction": [dict(token_select="entropy", token_select_fraction=0.3, entropy_coef=0.05)],
    "off_policy_mask_threshold": [dict(off_policy_mask_threshold=0.02)],
    # clip_cov draws among its candidates at random (as verl): a ratio of 1 takes them all, so every path agrees
    "clip_cov_ratio": [dict(loss_mode="clip_cov", clip_cov_ratio=1.0, clip_cov_lb=-10.0)],
    "clip_cov_lb": [dict(loss_mode="clip_cov", clip_cov_ratio=1.0, clip_cov_lb=-10.0)],
    "clip_cov_ub": [dict(loss_mode="clip_cov", clip_cov_ratio=1.0, clip_cov_lb=-10.0, clip_cov_ub=0.01)],
    "kl_cov_ratio": [dict(loss_mode="kl_cov", kl_cov_ratio=0.5)],
    "kl_cov_coef": [dict(loss_mode="kl_cov", kl_cov_ratio=0.3, kl_cov_coef=1.0)],
    "dppo_ratio_cap": [dict(loss_mode="dppo_tv", dppo_ratio_cap=1.05), dict(loss_mode="dppo_kl", dppo_ratio_cap=1.05)],
    "dro_beta": [dict(loss_mode="dro", dro_beta=2.0)],
    "vespo_k_pos": [dict(loss_mode="vespo", vespo_k_pos=1.0)],
    "vespo_lambda_pos": [dict(loss_mode="vespo", vespo_lambda_pos=1.5)],
    "vespo_k_neg": [dict(loss_mode="vespo", vespo_k_neg=1.0)],
    "vespo_lambda_neg": [dict(loss_mode="vespo", vespo_lambda_neg=1.5)],
    "rollout_is_batch_normalize": [dict(rollout_correction=c, rollout_is_batch_normalize=True)
                                   for c in ("token_truncate", "sequence_truncate")],
    "rollout_rs": [dict(rollout_rs="token_k1", rollout_rs_threshold="0.9_1.1"),
                   dict(rollout_rs="seq_mean_k3", rollout_rs_threshold=0.01)],
    "rollout_rs_threshold": [dict(rollout_rs="token_k2", rollout_rs_threshold=0.005)],
}

PATHS = ["reference", "torch", "kernel", "fused_one_pass", "fused_two_pass"]


def test_every_field_has_cases():
    missing = [f.name for f in dataclasses.fields(LossConfig) if f.name not in NON_DEFAULT]
    assert not missing, (f"LossConfig field(s) {missing} have no entry in NON_DEFAULT of "
                         "tests/test_option_paths.py: add one (non-default values, with the settings that make them "
                         "matter) so that every path is checked against the reference for them")
    unknown = set(NON_DEFAULT) - {f.name for f in dataclasses.fields(LossConfig)}
    assert not unknown, f"NON_DEFAULT names fields LossConfig does not have: {sorted(unknown)}"


def _cases():
    for name, values in NON_DEFAULT.items():
        for i, overrides in enumerate(values):
            yield pytest.param(name, overrides, id=f"{name}-{i}")


def _inputs(config):
    g = torch.Generator().manual_seed(0)
    f64 = dict(dtype=torch.float64)
    mask = torch.rand(B, T, generator=g) > 0.2
    mask[1, 4:] = False
    hidden = torch.randn(B, T, D, generator=g, **f64)
    weight = 0.5 * torch.randn(V, D, generator=g, **f64)
    targets = torch.where(mask, torch.randint(0, V, (B, T), generator=g), -100)
    logp, _ = reference.token_logprobs(hidden, weight, targets)
    near = lambda s: logp + s * torch.randn(B, T, generator=g, **f64)  # noqa: E731
    inputs = dict(advantages=torch.randn(B, generator=g, **f64), old_logprobs=near(0.2), ref_logprobs=near(0.3),
                  rollout_logprobs=near(0.1))
    if config.credit is not None:
        inputs["pos_logprobs"] = near(0.3)
    if config.credit == "cepo":
        inputs["neg_logprobs"] = near(0.3)
    return hidden, weight, targets, mask, inputs


def _expected(config, hidden, weight, targets, mask, inputs):
    """Float64 reference by autograd: loss, d/d(logprobs), d/d(entropy), d/d(hidden), d/d(weight)."""
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    logp, ent = reference.token_logprobs(h, w, targets)
    logp.retain_grad()
    ent.retain_grad()
    loss, _ = reference.policy_loss(logp, inputs["old_logprobs"], inputs["advantages"], mask, config=config,
                                    entropy=ent, **{k: v for k, v in inputs.items()
                                                    if k not in ("old_logprobs", "advantages")})
    loss.backward()
    zeros = torch.zeros_like(logp)
    return (loss.detach(), zeros if logp.grad is None else logp.grad, zeros if ent.grad is None else ent.grad,
            h.grad, w.grad)


def _run(path, config, hidden, weight, targets, mask, inputs, monkeypatch):
    if path in ("reference", "torch", "kernel"):
        backend = KERNEL_BACKEND if path == "kernel" else path
        dtype = torch.float32 if path == "kernel" else torch.float64
        logp, ent = reference.token_logprobs(hidden, weight, targets)
        logp = logp.detach().to(dtype).requires_grad_()
        ent = ent.detach().to(dtype).requires_grad_()
        cast = {k: v.to(dtype) for k, v in inputs.items()}
        out = rlloss.policy_loss(logp, cast.pop("old_logprobs"), cast.pop("advantages"), mask, config=config,
                                 entropy=ent, backend=backend, **cast)
        gl, ge = torch.autograd.grad(out.loss, (logp, ent), allow_unused=True)
        ge = torch.zeros_like(ent) if ge is None else ge
        return dtype, out.loss.detach(), gl, ge
    if path == "fused_two_pass":
        monkeypatch.setattr(pl, "one_pass", lambda *args: False)
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    cast = dict(inputs)
    out = FusedPolicyLoss(config, backend="torch")(h, w, torch.where(mask, targets, 0), mask,
                                                    cast.pop("advantages"), **cast)
    gh, gw = torch.autograd.grad(out.loss, (h, w))
    return torch.float64, out.loss.detach(), gh, gw


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("field, overrides", list(_cases()))
def test_field_on_path(field, overrides, path, monkeypatch):
    config = LossConfig(**overrides)
    assert getattr(config, field) != getattr(LossConfig(), field), f"{overrides} leaves {field} at its default"
    hidden, weight, targets, mask, inputs = _inputs(config)
    try:
        dtype, loss, *grads = _run(path, config, hidden, weight, targets, mask, inputs, monkeypatch)
    except (ValueError, TypeError, NotImplementedError) as error:  # allowed only when it names the option
        assert field in str(error), f"{path} raised an error that does not name {field}: {error}"
        return
    expected = _expected(config, hidden, weight, targets, mask, inputs)
    tol = dict(rtol=1e-9, atol=1e-12) if dtype == torch.float64 else dict(rtol=2e-5, atol=2e-6)
    expected_grads = expected[3:] if path.startswith("fused") else expected[1:3]
    torch.testing.assert_close(loss.double(), expected[0], **tol)
    for actual, wanted in zip(grads, expected_grads):
        torch.testing.assert_close(actual.double(), wanted, **tol)


CALL_OPTIONS = {
    "per_token_advantages": lambda: dict(advantages=torch.randn(B, T, dtype=torch.float64)),
    "clip_ranges": lambda: dict(epsilon_low=torch.tensor([0.05, 0.3, 0.1], dtype=torch.float64),
                                epsilon_high=0.05 + 0.3 * torch.rand(B, T, dtype=torch.float64)),
    "rollout_weights": lambda: dict(rollout_weights=0.5 + torch.rand(B, T, dtype=torch.float64)),
}


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("option", list(CALL_OPTIONS))
def test_call_option_on_path(option, path, monkeypatch):
    """The call arguments of the extension points (not config fields) on every path, under a config that uses
    them (KL, dual clip)."""
    config = LossConfig(beta=0.05, dual_clip=3.0)
    hidden, weight, targets, mask, inputs = _inputs(config)
    inputs.update(CALL_OPTIONS[option]())
    dtype, loss, *grads = _run(path, config, hidden, weight, targets, mask, inputs, monkeypatch)
    expected = _expected(config, hidden, weight, targets, mask, inputs)
    tol = dict(rtol=1e-9, atol=1e-12) if dtype == torch.float64 else dict(rtol=2e-5, atol=2e-6)
    torch.testing.assert_close(loss.double(), expected[0], **tol)
    for actual, wanted in zip(grads, expected[3:] if path.startswith("fused") else expected[1:3]):
        torch.testing.assert_close(actual.double(), wanted, **tol)
