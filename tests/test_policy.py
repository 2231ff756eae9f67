"""policy_loss (docs/math.md §3–§6): every preset and a covering set of option combinations against the float64
reference (value, d/dlogprobs, d/dentropy, metrics) on the torch and kernel backends; the TRL and verl
documented formulas written out directly; gradient-accumulation invariance; properties; input errors."""
import math

import pytest
import torch
from conftest import HAS_CUDA, KERNEL_BACKEND
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import rlloss
from rlloss import LossConfig, policy_loss
from rlloss.config import AGGREGATIONS, IS_LEVELS, KL_ESTIMATORS, LOSS_MODES, PRESETS, ROLLOUT_CORRECTIONS

BACKENDS = ["torch", KERNEL_BACKEND]
DEVICE = "cuda" if HAS_CUDA else "cpu"
B, T = 4, 37  # T is not a multiple of any block size


@pytest.fixture(autouse=True)
def _small_blocks(monkeypatch):
    """Make the kernel walk each row in several blocks (T = 37 → 3 blocks of 16)."""
    if rlloss._backend.triton_import_error() is None:
        from rlloss.kernels import policy as kernels

        monkeypatch.setattr(kernels, "MAX_BLOCK_T", 16)


# --- inputs and calls ----------------------------------------------------------------------------------


def _inputs(b=B, t=T, *, per_token=False, scale=0.3, ref_scale=0.5, rollout_scale=0.15, empty_row=True):
    """Fresh float64 inputs on the CPU: moderately off-policy, one empty sequence, ~20 % masked tokens."""
    logp = -torch.rand(b, t, dtype=torch.float64) * 3 - 0.01
    mask = torch.rand(b, t) < 0.8
    if empty_row and b > 1:
        mask[1] = False
    return dict(
        logprobs=logp,
        old_logprobs=logp + scale * torch.randn(b, t, dtype=torch.float64),
        advantages=torch.randn(b, t, dtype=torch.float64) if per_token else torch.randn(b, dtype=torch.float64),
        mask=mask,
        ref_logprobs=logp + ref_scale * torch.randn(b, t, dtype=torch.float64),
        entropy=torch.rand(b, t, dtype=torch.float64) * 2,
        rollout_logprobs=logp + scale * torch.randn(b, t, dtype=torch.float64)
        + rollout_scale * torch.randn(b, t, dtype=torch.float64),
        pos_logprobs=logp + torch.randn(b, t, dtype=torch.float64),  # teacher log-probs (docs/math.md §7)
        neg_logprobs=logp + torch.randn(b, t, dtype=torch.float64),
    )


def _poisoned(x, mask, value):
    """A copy with every masked token replaced by ``value`` (NaN / ±inf): none of it may reach an output."""
    if x.ndim == 1:
        return x.clone()
    return torch.where(mask, x, torch.full_like(x, value))


POISON = dict(logprobs=math.nan, old_logprobs=math.inf, advantages=math.nan, ref_logprobs=-math.inf,
              entropy=math.nan, rollout_logprobs=math.nan, pos_logprobs=math.nan, neg_logprobs=-math.inf)


def _run(backend, config, inp, dtype, *, poison=True, use=("old", "ref", "entropy", "rollout"), **kwargs):
    """(loss, grad_logprobs, grad_entropy, metrics) as float64 CPU tensors; inputs cast to ``dtype`` first."""
    mask = inp["mask"].to(DEVICE)
    args = {}
    for key, x in inp.items():
        if key == "mask":
            continue
        x = x.to(dtype).to(DEVICE)
        args[key] = _poisoned(x, mask, POISON[key]) if poison else x.clone()
    logp = args["logprobs"].requires_grad_(True)
    ent = args["entropy"].requires_grad_(True) if "entropy" in use else None
    out = policy_loss(
        logp, args["old_logprobs"] if "old" in use else None, args["advantages"], mask, config=config,
        ref_logprobs=args["ref_logprobs"] if "ref" in use else None, entropy=ent,
        rollout_logprobs=args["rollout_logprobs"] if "rollout" in use else None,
        pos_logprobs=args["pos_logprobs"] if config.credit else None,
        neg_logprobs=args["neg_logprobs"] if config.credit == "cepo" else None, backend=backend, **kwargs,
    )
    assert out.loss.ndim == 0 and not out.loss.isnan()
    assert all(v.ndim == 0 and not v.requires_grad for v in out.metrics.values())
    out.loss.backward()
    g_logp = logp.grad if logp.grad is not None else torch.zeros_like(logp)
    g_ent = None
    if ent is not None:
        g_ent = ent.grad if ent.grad is not None else torch.zeros_like(ent)
    cpu = lambda x: x.detach().double().cpu()  # noqa: E731
    return (cpu(out.loss), cpu(g_logp), cpu(g_ent) if g_ent is not None else None,
            {k: cpu(v) for k, v in out.metrics.items()})


def _rounded(inp, dtype):
    """The inputs as the backend under test sees them, back in float64, so branch choices agree."""
    return {k: (v.to(dtype).double() if v.is_floating_point() else v) for k, v in inp.items()}


def _close(actual, expected, dtype, what):
    tol = {torch.float64: 1e-10, torch.float32: 4e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}[dtype]
    scale = max(expected.abs().max().item(), 1e-3) if expected.numel() else 1.0
    torch.testing.assert_close(actual, expected, rtol=tol, atol=tol * scale, msg=lambda m: f"{what}: {m}")


def _check_against_reference(backend, config, inp, dtype=None, **kwargs):
    dtype = dtype or (torch.float64 if backend == "torch" else torch.float32)
    torch.manual_seed(0)  # clip_cov draws its tokens from the default generator: the same draw on both sides
    out = _run(backend, config, inp, dtype, **kwargs)
    torch.manual_seed(0)
    ref = _run("reference", config, _rounded(inp, dtype), torch.float64, **kwargs)
    _close(out[0], ref[0], dtype, "loss")
    _close(out[1], ref[1], dtype, "d/dlogprobs")
    if ref[2] is not None:
        _close(out[2], ref[2], dtype, "d/dentropy")
    assert list(out[3]) == list(ref[3])
    for key in ref[3]:
        _close(out[3][key], ref[3][key], dtype, key)
    mask = inp["mask"]
    assert (out[1][~mask] == 0).all() and torch.isfinite(out[1]).all()
    if out[2] is not None:
        assert (out[2][~mask] == 0).all()
    return out, ref


def _backend_dtype(backend):
    return torch.float64 if backend == "torch" else torch.float32


# --- every preset and a covering set of options, against the reference ------------------------------------

PRESET_CASES = [(name, {"dr_grpo": {"max_completion_length": 50}, "verl_dro": {"dro_beta": 0.2}}.get(name, {}))
                for name in PRESETS]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name,extra", PRESET_CASES, ids=[c[0] for c in PRESET_CASES])
def test_preset_matches_reference(name, extra, backend):
    # GSPO's ε = 3e-4 clips nearly everything at this off-policy scale; a smaller scale exercises both sides.
    scale = 3e-3 if "gspo" in name else 0.3
    config = LossConfig.preset(name, **extra)
    inp = _inputs(per_token=name in ("dapo", "verl_grpo", "cispo", "verl_sapo"), scale=scale)
    _check_against_reference(backend, config, inp)


COMBOS = {
    "delta": dict(delta=1.15),
    "dual_clip": dict(dual_clip=1.3),
    "delta_dual_clip": dict(delta=1.2, dual_clip=1.5, epsilon_high=0.1),
    "kl_k1": dict(beta=0.1, kl_estimator="k1"),
    "kl_abs": dict(beta=0.1, kl_estimator="abs"),
    "kl_k2_weighted": dict(beta=0.1, kl_estimator="k2", kl_ratio_weighted=True),
    "kl_k3_weighted": dict(beta=0.2, kl_estimator="k3", kl_ratio_weighted=True),
    "kl_k3plus": dict(beta=0.1, kl_estimator="k3+"),
    "kl_k3_clamp": dict(beta=0.1, kl_estimator="k3", kl_clamp=True),
    "entropy": dict(entropy_coef=0.05),
    "sequence": dict(importance_sampling_level="sequence"),
    "sequence_dual_kl_weighted": dict(importance_sampling_level="sequence", dual_clip=1.05, beta=0.1,
                                      kl_ratio_weighted=True, kl_estimator="k3+"),
    "sequence_token_kl_weighted": dict(importance_sampling_level="sequence_token", beta=0.1, kl_ratio_weighted=True),
    "sequence_sapo": dict(loss_mode="sapo", importance_sampling_level="sequence", aggregation="seq_mean_token_sum"),
    "sequence_cispo_trl": dict(loss_mode="cispo_trl", epsilon_high=1.02, importance_sampling_level="sequence"),
    "sequence_token_cispo_verl": dict(loss_mode="cispo_verl", importance_sampling_level="sequence_token"),
    "log_ratio_clamp": dict(log_ratio_min=-0.2, log_ratio_max=0.25),
    "log_ratio_clamp_sequence": dict(importance_sampling_level="sequence", log_ratio_min=-0.04, log_ratio_max=0.04),
    "log_ratio_clamp_sequence_token": dict(importance_sampling_level="sequence_token", log_ratio_max=0.0),
    "log_ratio_clamp_sapo": dict(loss_mode="sapo", log_ratio_min=-0.2, log_ratio_max=0.2),
    "rollout_token_truncate": dict(rollout_correction="token_truncate", rollout_threshold_low=0.8,
                                   rollout_threshold_high=1.25),
    "rollout_token_mask": dict(rollout_correction="token_mask", rollout_threshold_low=0.8, rollout_threshold_high=1.25),
    "rollout_sequence_truncate": dict(rollout_correction="sequence_truncate", rollout_threshold_high=1.5),
    "rollout_sequence_mask": dict(rollout_correction="sequence_mask", rollout_threshold_low=0.4,
                                  rollout_threshold_high=2.5),
    "agg_seq_mean_token_sum": dict(aggregation="seq_mean_token_sum"),
    "agg_token_sum": dict(aggregation="token_sum", beta=0.05),
    "agg_sum_norm": dict(aggregation="seq_mean_token_sum_norm", max_completion_length=64),
    "cispo_trl_tight_cap": dict(loss_mode="cispo_trl", epsilon_high=1.1, entropy_coef=0.02),
    "cispo_verl_kl": dict(loss_mode="cispo_verl", beta=0.05, kl_estimator="k2"),
    "gpg_all_terms": dict(loss_mode="gpg", beta=0.05, entropy_coef=0.01, rollout_correction="token_truncate",
                          aggregation="seq_mean_token_mean"),
    "sapo_all_terms": dict(loss_mode="sapo", sapo_tau_pos=2.0, sapo_tau_neg=0.5, beta=0.05, kl_estimator="abs",
                           entropy_coef=0.03, rollout_correction="sequence_mask", rollout_threshold_high=3.0),
    "credit_cepo": dict(credit="cepo"),
    "credit_cepo_dual_clip_kl": dict(credit="cepo", credit_lambda=1.0, credit_eps_w=0.5, dual_clip=3.0, beta=0.05),
    "credit_rlsd": dict(credit="rlsd", credit_lambda=0.3, entropy_coef=0.01),
    "credit_rlsd_sequence_cispo": dict(credit="rlsd", loss_mode="cispo_verl", importance_sampling_level="sequence",
                                       rollout_correction="token_truncate"),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("per_token", [False, True], ids=["adv_seq", "adv_token"])
@pytest.mark.parametrize("combo", list(COMBOS))
def test_options_match_reference(combo, per_token, backend):
    inp = _inputs(per_token=per_token)
    _check_against_reference(backend, LossConfig(**COMBOS[combo]), inp)


@pytest.mark.parametrize("backend", BACKENDS)
def test_kl_clamps_are_hit(backend):
    """verl's k3 guards: x beyond ±20 and values beyond 10 occur, and match the reference."""
    inp = _inputs(ref_scale=6.0)
    inp["ref_logprobs"][0, :4] = inp["logprobs"][0, :4] + torch.tensor([25.0, -25.0, 21.0, -30.0],
                                                                          dtype=torch.float64)
    for est in ("k3", "k3+"):
        config = LossConfig(beta=0.1, kl_estimator=est, kl_clamp=True)
        out, _ = _check_against_reference(backend, config, inp)


@pytest.mark.parametrize("backend", BACKENDS)
def test_float32_torch_and_default_block(backend, monkeypatch):
    """float32 on the torch backend, and the kernel with its default (single) block per row."""
    if backend != "torch":
        from rlloss.kernels import policy as kernels

        monkeypatch.setattr(kernels, "MAX_BLOCK_T", 1024)
    inp = _inputs(t=70, per_token=True)
    config = LossConfig.preset("verl_grpo", entropy_coef=0.01, rollout_correction="token_mask")
    _check_against_reference(backend, config, inp, dtype=torch.float32)


def test_reference_backend_through_the_api():
    inp = _inputs()
    loss, g, ge, metrics = _run("reference", LossConfig.preset("grpo", entropy_coef=0.1), inp, torch.float64)
    assert torch.isfinite(loss) and (g[~inp["mask"]] == 0).all() and (ge[~inp["mask"]] == 0).all()


def test_stat_layout_matches_kernel():
    if rlloss._backend.triton_import_error() is not None:
        pytest.skip("triton unavailable")
    from rlloss import policy
    from rlloss.kernels import policy as kernels

    assert kernels.STAT_NAMES == policy.STAT_NAMES


# --- random configurations (hypothesis) -------------------------------------------------------------------


@st.composite
def _configs(draw):
    mode = draw(st.sampled_from(LOSS_MODES))
    fields = dict(
        loss_mode=mode,
        epsilon_low=draw(st.sampled_from([0.0, 0.1, 0.2, 0.5])),
        epsilon_high=draw(st.sampled_from([0.1, 0.28, 1.5, 5.0])),
        importance_sampling_level=draw(st.sampled_from(IS_LEVELS)),
        beta=draw(st.sampled_from([0.0, 0.04])),
        kl_estimator=draw(st.sampled_from(KL_ESTIMATORS)),
        kl_ratio_weighted=draw(st.booleans()),
        kl_clamp=draw(st.booleans()),
        entropy_coef=draw(st.sampled_from([0.0, 0.01])),
        aggregation=draw(st.sampled_from(AGGREGATIONS)),
        max_completion_length=draw(st.sampled_from([None, 40])),
        rollout_correction=draw(st.sampled_from((None,) + ROLLOUT_CORRECTIONS)),
        rollout_threshold_high=draw(st.sampled_from([1.2, 3.0])),
    )
    if fields["aggregation"] == "seq_mean_token_sum_norm":
        fields["max_completion_length"] = 40
    if mode == "ppo_clip":
        fields["delta"] = draw(st.sampled_from([None, 1.4]))
        fields["dual_clip"] = draw(st.sampled_from([None, 1.5, 3.0]))
    if draw(st.booleans()):
        fields["log_ratio_min"], fields["log_ratio_max"] = -0.3, 0.3
    fields["credit"] = draw(st.sampled_from([None, "cepo", "rlsd"]))
    fields["credit_lambda"] = draw(st.sampled_from([0.0, 0.5, 1.0]))
    if mode in ("geo_mean", "vespo"):  # they form their own sequence ratio
        fields["importance_sampling_level"] = "token"
        if mode == "geo_mean":
            fields["credit"] = None
        elif (fields["rollout_correction"] or "").startswith("sequence"):
            fields["rollout_correction"] = "token_" + fields["rollout_correction"].split("_")[1]
    if mode == "dro":
        fields["dro_beta"] = draw(st.sampled_from([0.1, 1.0]))
    fields["clip_cov_ratio"] = fields["kl_cov_ratio"] = draw(st.sampled_from([0.0002, 0.3]))
    fields["clip_cov_lb"] = draw(st.sampled_from([-1.0, 1.0]))
    if fields["rollout_correction"] is not None:
        fields["rollout_is_batch_normalize"] = draw(st.booleans())
    rs = draw(st.sampled_from([None, ("token_k2", 0.02), ("seq_mean_k1,seq_max_k3", "0.8_1.25,0.05")]))
    if rs is not None:
        fields["rollout_rs"], fields["rollout_rs_threshold"] = rs
    return LossConfig(**fields)


@st.composite
def _cases(draw):
    b, t = draw(st.integers(1, 4)), draw(st.integers(1, 40))
    torch.manual_seed(draw(st.integers(0, 2**31 - 1)))
    inp = _inputs(b, t, per_token=draw(st.booleans()), empty_row=draw(st.booleans()))
    return draw(_configs()), inp


def _assert_metric_ranges(metrics):
    for key, value in metrics.items():
        if key.startswith("clip_ratio/"):
            assert 0.0 <= value.item() <= 1.0, (key, value)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_cases())
def test_random_configs_torch(case):
    config, inp = case
    out, _ = _check_against_reference("torch", config, inp)
    _assert_metric_ranges(out[3])


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_cases())
def test_random_configs_kernel(case):
    config, inp = case
    # clip_cov / kl_cov rank token covariances; at ties (one advantage for the whole batch makes them all 0) float32
    # and the float64 reference break the tie apart. test_presets.py::test_peer_variants_agree_on_every_path holds
    # them to the reference in float32 on untied data.
    assume(config.loss_mode not in ("clip_cov", "kl_cov"))
    out, _ = _check_against_reference(KERNEL_BACKEND, config, inp)
    _assert_metric_ranges(out[3])


# --- the trainers' documented formulas, written out directly ----------------------------------------------


def _plain(inp, dtype, keys=("logprobs", "old_logprobs", "advantages", "ref_logprobs", "entropy",
                             "rollout_logprobs")):
    """Clean (unpoisoned) inputs in ``dtype`` on DEVICE; logprobs with requires_grad."""
    out = {k: inp[k].to(dtype).to(DEVICE) for k in keys}
    out["logprobs"].requires_grad_(True)
    out["mask"] = inp["mask"].to(DEVICE)
    return out


def _api(backend, config, p, **kwargs):
    logp = p["logprobs"].detach().clone().requires_grad_(True)
    out = policy_loss(logp, p.get("old_logprobs"), p["advantages"], p["mask"], config=config, backend=backend,
                      **kwargs)
    out.loss.backward()
    return out, logp.grad


def _assert_same(backend, actual_loss, actual_grad, expected_loss, logp):
    (expected_grad,) = torch.autograd.grad(expected_loss, logp)
    dtype = _backend_dtype(backend)
    _close(actual_loss.detach().double().cpu(), expected_loss.detach().double().cpu(), dtype, "loss")
    _close(actual_grad.double().cpu(), expected_grad.double().cpu(), dtype, "grad")


@pytest.mark.parametrize("backend", BACKENDS)
def test_trl_dapo_with_global_num_items(backend):
    """TRL loss_type="dapo" with the DAPO paper's clip-higher (preset "dapo_paper"):
    (per_token_loss * mask).sum() / num_items_in_batch, ε = 0.2 / 0.28."""
    p = _plain(_inputs(), _backend_dtype(backend))
    lp, old, A, m = p["logprobs"], p["old_logprobs"], p["advantages"][:, None], p["mask"].to(p["logprobs"].dtype)
    coef_1 = torch.exp(lp - old)
    coef_2 = torch.clamp(coef_1, 1 - 0.2, 1 + 0.28)
    per_token_loss = -torch.min(coef_1 * A, coef_2 * A)
    num_items = 3 * int(m.sum())  # as if two more ranks / micro-batches held the rest
    expected = (per_token_loss * m).sum() / num_items
    out, grad = _api(backend, LossConfig.preset("dapo_paper"), p, num_items_in_batch=torch.tensor(num_items))
    _assert_same(backend, out.loss, grad, expected, lp)
    is_low = (coef_1 < 0.8) & (A < 0)
    is_high = (coef_1 > 1.28) & (A > 0)
    for key, flag in (("low", is_low), ("high", is_high), ("region", is_low | is_high)):
        want = ((flag * m).sum() / m.sum()).item()
        assert out.metrics[f"clip_ratio/{key}_mean"].item() == pytest.approx(want, abs=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_trl_dr_grpo(backend):
    """TRL loss_type="dr_grpo": (per_token_loss * mask).sum() / (B * max_completion_length), with k3 KL
    (use_bias_correction_kl=False here: the preset's TRL default weights the KL by the ratio, tested in
    tests/test_presets.py)."""
    p = _plain(_inputs(), _backend_dtype(backend))
    lp, old, ref, A = p["logprobs"], p["old_logprobs"], p["ref_logprobs"], p["advantages"][:, None]
    m = p["mask"].to(lp.dtype)
    coef_1 = torch.exp(lp - old)
    per_token_loss = -torch.min(coef_1 * A, torch.clamp(coef_1, 0.8, 1.2) * A)
    per_token_kl = torch.exp(ref - lp) - (ref - lp) - 1
    per_token_loss = per_token_loss + 0.04 * per_token_kl
    expected = (per_token_loss * m).sum() / (per_token_loss.size(0) * 256)
    out, grad = _api(backend, LossConfig.preset("dr_grpo", max_completion_length=256, beta=0.04,
                                                 kl_ratio_weighted=False), p, ref_logprobs=ref)
    _assert_same(backend, out.loss, grad, expected, lp)
    assert out.metrics["kl"].item() == pytest.approx(((per_token_kl * m).sum() / m.sum()).item(), rel=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_trl_grpo_with_an_empty_sequence(backend):
    """TRL loss_type="grpo": mean over all B of Σ m·L / clamp(n_i, 1); an empty sequence gives 0, not NaN."""
    inp = _inputs()
    assert not inp["mask"][1].any()
    p = _plain(inp, _backend_dtype(backend))
    lp, old, A = p["logprobs"], p["old_logprobs"], p["advantages"][:, None]
    m = p["mask"].to(lp.dtype)
    coef_1 = torch.exp(lp - old)
    per_token_loss = -torch.min(coef_1 * A, torch.clamp(coef_1, 0.8, 1.2) * A)
    expected = ((per_token_loss * m).sum(-1) / m.sum(-1).clamp(min=1.0)).mean()
    out, grad = _api(backend, LossConfig.preset("grpo"), p)
    assert torch.isfinite(out.loss) and torch.isfinite(grad).all()
    _assert_same(backend, out.loss, grad, expected, lp)
    assert (grad[1] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_trl_gspo_sequence_ratio(backend):
    """TRL importance_sampling_level="sequence": log w_i = Σ m·(ℓ − ℓ°) / clamp(n_i, 1), coef_1 of shape (B, 1),
    the gradient flowing through the sequence ratio to every token."""
    p = _plain(_inputs(scale=3e-3), _backend_dtype(backend))
    lp, old, A = p["logprobs"], p["old_logprobs"], p["advantages"][:, None]
    m = p["mask"].to(lp.dtype)
    log_w = (((lp - old) * m).sum(-1) / m.sum(-1).clamp(min=1.0)).unsqueeze(-1)
    coef_1 = torch.exp(log_w)
    coef_2 = torch.clamp(coef_1, 1 - 3e-4, 1 + 4e-4)
    per_token_loss = -torch.min(coef_1 * A, coef_2 * A)
    expected = ((per_token_loss * m).sum(-1) / m.sum(-1).clamp(min=1.0)).mean()
    out, grad = _api(backend, LossConfig.preset("gspo"), p)
    _assert_same(backend, out.loss, grad, expected, lp)


@pytest.mark.parametrize("backend", BACKENDS)
def test_trl_cispo(backend):
    """TRL loss_type="cispo": −clamp(coef_1, max=epsilon_high).detach() · A · ℓ, normalised like dapo."""
    p = _plain(_inputs(scale=1.0), _backend_dtype(backend))
    lp, old, A = p["logprobs"], p["old_logprobs"], p["advantages"][:, None]
    m = p["mask"].to(lp.dtype)
    coef_1 = torch.exp(lp - old)
    per_token_loss = -torch.clamp(coef_1, max=1.5).detach() * A * lp
    expected = (per_token_loss * m).sum() / 100
    out, grad = _api(backend, LossConfig.preset("cispo", epsilon_high=1.5), p, num_items_in_batch=100)
    _assert_same(backend, out.loss, grad, expected, lp)
    want = (((coef_1 > 1.5) & (A > 0)) * m).sum() / m.sum()
    assert out.metrics["clip_ratio/high_mean"].item() == pytest.approx(want.item(), abs=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_trl_sapo(backend):
    """TRL loss_type="sapo": −sigmoid(τ(ρ − 1))·4/τ·A, τ_pos for A > 0, τ_neg otherwise; grpo aggregation."""
    p = _plain(_inputs(per_token=True, scale=0.6), _backend_dtype(backend))
    lp, old, A = p["logprobs"], p["old_logprobs"], p["advantages"]
    m = p["mask"].to(lp.dtype)
    coef_1 = torch.exp(lp - old)
    tau = torch.where(A > 0, torch.full_like(A, 1.0), torch.full_like(A, 1.05))
    per_token_loss = -torch.sigmoid(tau * (coef_1 - 1)) * 4 / tau * A
    expected = ((per_token_loss * m).sum(-1) / m.sum(-1).clamp(min=1.0)).mean()
    out, grad = _api(backend, LossConfig.preset("sapo"), p)
    _assert_same(backend, out.loss, grad, expected, lp)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["token_truncate", "sequence_mask"])
def test_trl_vllm_importance_sampling(mode, backend):
    """TRL vllm_importance_sampling_mode: d = (ℓ° − ℓˢ)·mask, summed per sequence for sequence_*; truncate
    clamps to [min, max], mask zeroes the ratio outside; the ratio multiplies the policy term, then + β·KL."""
    p = _plain(_inputs(per_token=True), _backend_dtype(backend))
    lp, old, A, ref, samp = p["logprobs"], p["old_logprobs"], p["advantages"], p["ref_logprobs"], p["rollout_logprobs"]
    m = p["mask"].to(lp.dtype)
    diff = (old - samp) * m
    if mode == "sequence_mask":
        ratio = torch.exp(diff.sum(-1, keepdim=True))
        ratio = ratio.masked_fill((ratio < 0.5) | (ratio > 3.0), 0.0)
        config = LossConfig.preset("bnpo", rollout_correction=mode, rollout_threshold_low=0.5,
                                   rollout_threshold_high=3.0, beta=0.04, kl_ratio_weighted=False)
    else:
        ratio = torch.clamp(torch.exp(diff), max=2.0)
        config = LossConfig.preset("bnpo", rollout_correction=mode, rollout_threshold_high=2.0, beta=0.04,
                                   kl_ratio_weighted=False)
    coef_1 = torch.exp(lp - old)
    per_token_loss = -torch.min(coef_1 * A, torch.clamp(coef_1, 0.8, 1.2) * A) * ratio
    per_token_loss = per_token_loss + 0.04 * (torch.exp(ref - lp) - (ref - lp) - 1)
    expected = (per_token_loss * m).sum() / m.sum().clamp(min=1.0)
    out, grad = _api(backend, config, p, ref_logprobs=ref, rollout_logprobs=samp)
    _assert_same(backend, out.loss, grad, expected, lp)
    flat = ratio.flatten() if mode == "sequence_mask" else ratio[p["mask"]]
    assert out.metrics["sampling/importance_sampling_ratio/mean"].item() == pytest.approx(flat.mean().item(),
                                                                                          rel=1e-5)
    assert out.metrics["sampling/importance_sampling_ratio/max"].item() == pytest.approx(flat.max().item(), rel=1e-6)
    delta = (old - samp).abs()[p["mask"]]
    assert out.metrics["sampling/sampling_logp_difference/max"].item() == pytest.approx(delta.max().item(), rel=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_trl_bias_corrected_kl(backend):
    """TRL use_bias_correction_kl: per_token_kl · coef_1, coef_1 carrying its gradient."""
    p = _plain(_inputs(), _backend_dtype(backend))
    lp, old, A, ref = p["logprobs"], p["old_logprobs"], p["advantages"][:, None], p["ref_logprobs"]
    m = p["mask"].to(lp.dtype)
    coef_1 = torch.exp(lp - old)
    per_token_kl = (torch.exp(ref - lp) - (ref - lp) - 1) * coef_1
    per_token_loss = -torch.min(coef_1 * A, torch.clamp(coef_1, 0.8, 1.2) * A) + 0.1 * per_token_kl
    expected = (per_token_loss * m).sum() / m.sum()
    out, grad = _api(backend, LossConfig.preset("bnpo", beta=0.1, kl_ratio_weighted=True), p, ref_logprobs=ref)
    _assert_same(backend, out.loss, grad, expected, lp)


def _verl_agg(loss_mat, mask, mode):
    if mode == "token-mean":
        return (loss_mat * mask).sum() / mask.sum()
    seq = (loss_mat * mask).sum(-1) / mask.sum(-1)
    return seq.mean()


@pytest.mark.parametrize("backend", BACKENDS)
def test_verl_vanilla_dual_clip(backend):
    """verl compute_policy_loss_vanilla: log-ratio clamped to ±20, clipped surrogate, then for A < 0
    min(L, −A·clip_ratio_c); pg_clipfrac_lower = mean((L > −A·c)·(A < 0))."""
    inp = _inputs(per_token=True, scale=0.8, empty_row=False)
    inp["logprobs"][0, 0] = inp["old_logprobs"][0, 0] + 25.0  # beyond the ±20 guard
    p = _plain(inp, _backend_dtype(backend))
    lp, old, A = p["logprobs"], p["old_logprobs"], p["advantages"]
    m = p["mask"].to(lp.dtype)
    negative_approx_kl = torch.clamp(lp - old, min=-20.0, max=20.0)
    ratio = torch.exp(negative_approx_kl)
    pg_losses1 = -A * ratio
    pg_losses2 = -A * torch.clamp(ratio, 1 - 0.2, 1 + 0.28)
    clip_pg_losses1 = torch.maximum(pg_losses1, pg_losses2)
    pg_losses3 = -A * 3.0
    clip_pg_losses2 = torch.min(pg_losses3, clip_pg_losses1)
    pg_losses = torch.where(A < 0, clip_pg_losses2, clip_pg_losses1)
    expected = _verl_agg(pg_losses, m, "token-mean")
    out, grad = _api(backend, LossConfig.preset("verl_dapo"), p)
    _assert_same(backend, out.loss, grad, expected, lp)
    lower = ((torch.gt(clip_pg_losses1, pg_losses3) * (A < 0)) * m).sum() / m.sum()
    assert lower.item() > 0
    assert out.metrics["clip_ratio/dual_mean"].item() == pytest.approx(lower.item(), abs=1e-6)
    ppo_kl = ((-(lp - old)) * m).sum() / m.sum()
    assert out.metrics["ppo_kl"].item() == pytest.approx(ppo_kl.item(), rel=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_verl_cispo(backend):
    """verl CISPO: −clamp(ratio, 1 − lo, 1 + hi).detach() · A · ℓ with the log-ratio clamped to ±20."""
    p = _plain(_inputs(per_token=True, scale=0.8), _backend_dtype(backend))
    lp, old, A = p["logprobs"], p["old_logprobs"], p["advantages"]
    m = p["mask"].to(lp.dtype)
    ratio = torch.exp(torch.clamp(lp - old, -20.0, 20.0))
    pg_losses = -torch.clamp(ratio, 1 - 0.2, 1 + 0.2).detach() * A * lp
    expected = _verl_agg(pg_losses, m, "token-mean")
    out, grad = _api(backend, LossConfig.preset("verl_cispo"), p)
    _assert_same(backend, out.loss, grad, expected, lp)


@pytest.mark.parametrize("backend", BACKENDS)
def test_verl_gspo_token_form(backend):
    """verl compute_policy_loss_gspo: log s_{i,t} = ℓ − sg(ℓ) + sg(log s_i), clamped at max 10; verl's default
    loss_agg_mode token-mean."""
    inp = _inputs(per_token=True, scale=3e-3, empty_row=False)
    inp["old_logprobs"][2] = inp["logprobs"][2] - 12.0  # log s_i = 12 > 10: clamped, no gradient through it
    p = _plain(inp, _backend_dtype(backend))
    lp, old, A = p["logprobs"], p["old_logprobs"], p["advantages"]
    m = p["mask"].to(lp.dtype)
    seq_lengths = m.sum(-1).clamp(min=1)
    negative_approx_kl_seq = ((lp - old) * m).sum(-1) / seq_lengths
    log_ratio = torch.clamp(lp - lp.detach() + negative_approx_kl_seq.detach().unsqueeze(-1), max=10.0)
    ratio = torch.exp(log_ratio)
    pg_losses = torch.maximum(-A * ratio, -A * torch.clamp(ratio, 1 - 3e-4, 1 + 4e-4))
    expected = _verl_agg(pg_losses, m, "token-mean")
    out, grad = _api(backend, LossConfig.preset("verl_gspo"), p)
    _assert_same(backend, out.loss, grad, expected, lp)
    assert (grad[2] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_verl_low_var_kl_and_k3_plus(backend):
    """verl kl_penalty: low_var_kl = clamp(e^x − x − 1, ±10) with x = clamp(ℓʳ − ℓ, ±20); "k3+" takes the
    k2 gradient straight through; kl_loss = agg_loss(kl, mask, token-mean) · kl_loss_coef."""
    inp = _inputs(ref_scale=4.0)
    inp["ref_logprobs"][0, :2] = inp["logprobs"][0, :2] + torch.tensor([24.0, -22.0], dtype=torch.float64)
    p = _plain(inp, _backend_dtype(backend))
    lp, ref, A = p["logprobs"], p["ref_logprobs"], torch.zeros_like(p["advantages"])
    m = p["mask"].to(lp.dtype)
    kl = torch.clamp(ref - lp, min=-20, max=20)
    low_var_kl = torch.clamp(torch.exp(kl) - kl - 1, min=-10, max=10)
    k2 = 0.5 * (lp - ref).square()
    for est, kld in (("k3", low_var_kl), ("k3+", k2 - k2.detach() + low_var_kl.detach())):
        expected = _verl_agg(kld, m, "token-mean") * 0.001
        config = LossConfig.preset("verl_grpo", kl_estimator=est)
        out, grad = _api(backend, config, dict(p, advantages=A), ref_logprobs=ref)
        _assert_same(backend, out.loss, grad, expected, lp)


@pytest.mark.parametrize("backend", BACKENDS)
def test_verl_sapo_and_gpg(backend):
    p = _plain(_inputs(per_token=True, scale=0.5), _backend_dtype(backend))
    lp, old, A = p["logprobs"], p["old_logprobs"], p["advantages"]
    m = p["mask"].to(lp.dtype)
    ratio = torch.exp(torch.clamp(lp - old, -20.0, 20.0))
    taus = torch.where(A > 0, torch.full_like(A, 1.0), torch.full_like(A, 1.05))
    gates = torch.sigmoid(taus * (ratio - 1.0)) * (4.0 / taus)
    seq = ((-gates * A) * m).sum(-1) / m.sum(-1).clamp(min=1)
    out, grad = _api(backend, LossConfig.preset("verl_sapo"), p)
    _assert_same(backend, out.loss, grad, seq.mean(), lp)
    out, grad = _api(backend, LossConfig.preset("gpg"), p)
    _assert_same(backend, out.loss, grad, ((-lp * A) * m).sum() / m.sum(), lp)


# --- gradient accumulation ----------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("aggregation", ["token_mean", "seq_mean_token_mean", "seq_mean_token_sum",
                                         "seq_mean_token_sum_norm", "token_sum"])
def test_gradient_accumulation_invariance(aggregation, backend):
    """Two micro-batches with the global normaliser, summed, equal the whole batch (value and gradient)."""
    inp = _inputs(b=4, per_token=True)
    config = LossConfig(aggregation=aggregation, max_completion_length=50, beta=0.05, entropy_coef=0.01,
                        importance_sampling_level="sequence")
    dtype = _backend_dtype(backend)
    counts = dict(num_items_in_batch=int(inp["mask"].sum()), num_sequences_in_batch=4)
    whole = _run(backend, config, inp, dtype, **counts)
    parts = [_run(backend, config, {k: v[rows] for k, v in inp.items()}, dtype, **counts)
             for rows in (slice(0, 1), slice(1, 4))]
    _close(parts[0][0] + parts[1][0], whole[0], dtype, "loss")
    _close(torch.cat([parts[0][1], parts[1][1]]), whole[1], dtype, "d/dlogprobs")
    _close(torch.cat([parts[0][2], parts[1][2]]), whole[2], dtype, "d/dentropy")


# --- properties -------------------------------------------------------------------------------------------------


# kl_cov and dro add an advantage-free penalty on the log-ratio (docs/math.md §4), so A = 0 does not zero them;
# geo_mean and vespo form their own sequence ratio and take importance_sampling_level="token" only.
ZERO_ADVANTAGE_CASES = [(mode, level) for mode in LOSS_MODES if mode not in ("kl_cov", "dro") for level in IS_LEVELS
                        if level == "token" or mode not in ("geo_mean", "vespo")]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode,level", ZERO_ADVANTAGE_CASES)
def test_zero_advantages_give_zero_gradient(mode, level, backend):
    inp = _inputs(per_token=True)
    inp["advantages"].zero_()
    config = LossConfig(loss_mode=mode, importance_sampling_level=level, rollout_correction="token_truncate")
    loss, grad, _, _ = _run(backend, config, inp, _backend_dtype(backend))
    assert loss.item() == 0.0 and (grad == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["grpo", "dapo", "gspo", "verl_gspo", "cispo", "verl_cispo", "verl_dapo"])
def test_ratio_one_clips_nothing(name, backend):
    inp = _inputs(per_token=True)
    inp["old_logprobs"] = inp["logprobs"].clone()
    dtype = _backend_dtype(backend)
    config = LossConfig.preset(name)
    with_old = _run(backend, config, inp, dtype)
    on_policy = _run(backend, config, inp, dtype, use=("ref", "entropy"))  # old_logprobs=None: ℓ° = sg(ℓ)
    for out in (with_old, on_policy):
        metrics = out[3]
        for key in ("low", "high", "region", "dual"):
            assert metrics[f"clip_ratio/{key}_mean"].item() == 0.0
        assert metrics["ratio/mean"].item() == pytest.approx(1.0, abs=1e-6)
        assert metrics["ppo_kl"].item() == 0.0
    _close(on_policy[0], with_old[0], dtype, "loss")
    _close(on_policy[1], with_old[1], dtype, "d/dlogprobs")


@pytest.mark.parametrize("backend", BACKENDS)
def test_gspo_token_form_equals_sequence_form(backend):
    """With one advantage per sequence and seq-mean-token-mean, GSPO and GSPO-token have the same gradient."""
    inp = _inputs(scale=3e-3)
    dtype = _backend_dtype(backend)
    seq = _run(backend, LossConfig.preset("gspo"), inp, dtype)
    tok = _run(backend, LossConfig.preset("gspo", importance_sampling_level="sequence_token"), inp, dtype)
    _close(tok[0], seq[0], dtype, "loss")
    _close(tok[1], seq[1], dtype, "d/dlogprobs")


@pytest.mark.parametrize("backend", BACKENDS)
def test_poisoned_masked_tokens(backend):
    """NaN / ±inf in every input at masked tokens changes nothing and gets exactly zero gradient."""
    inp = _inputs(per_token=True)
    config = LossConfig.preset("verl_grpo", entropy_coef=0.01, rollout_correction="sequence_truncate",
                               importance_sampling_level="sequence")
    dtype = _backend_dtype(backend)
    clean = _run(backend, config, inp, dtype, poison=False)
    dirty = _run(backend, config, inp, dtype, poison=True)
    assert torch.equal(clean[0], dirty[0]) and torch.equal(clean[1], dirty[1]) and torch.equal(clean[2], dirty[2])
    assert (dirty[1][~inp["mask"]] == 0).all() and (dirty[2][~inp["mask"]] == 0).all()
    for key in clean[3]:
        assert torch.equal(clean[3][key], dirty[3][key]), key


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(0, 5), (3, 0), (2, 7)], ids=["no_rows", "no_tokens", "all_masked"])
def test_empty_inputs(shape, backend):
    inp = _inputs(*shape)
    inp["mask"][:] = False
    for name in ("grpo", "dapo", "gspo"):
        out = _run(backend, LossConfig.preset(name), inp, _backend_dtype(backend))
        assert out[0].item() == 0.0 and (out[1] == 0).all()
        assert all(torch.isfinite(v) for v in out[3].values())


def test_float_mask_and_1d_count_tensor():
    inp = _inputs()
    config = LossConfig.preset("dapo")
    as_bool = _run("torch", config, inp, torch.float64, num_items_in_batch=torch.tensor(57.0))
    inp["mask"] = inp["mask"].double()
    as_float = _run("torch", config, dict(inp, mask=inp["mask"]), torch.float64, poison=False,
                    num_items_in_batch=torch.tensor([57]))
    _close(as_float[0], as_bool[0], torch.float64, "loss")


def test_gradient_scales_with_upstream():
    inp = _inputs()
    logp = inp["logprobs"].clone().requires_grad_(True)
    out = policy_loss(logp, inp["old_logprobs"], inp["advantages"], inp["mask"], config=LossConfig(), backend="torch")
    (3.0 * out.loss).backward()
    g3 = logp.grad.clone()
    logp.grad = None
    policy_loss(logp, inp["old_logprobs"], inp["advantages"], inp["mask"], config=LossConfig(),
                backend="torch").loss.backward()
    torch.testing.assert_close(g3, 3.0 * logp.grad)


def test_policy_loss_and_grads_is_the_same_function():
    from rlloss.policy import aggregation_normaliser, policy_loss_and_grads

    inp = _inputs(per_token=True)
    config = LossConfig.preset("verl_grpo", entropy_coef=0.02)
    norm = aggregation_normaliser(config, inp["mask"])
    loss, metrics, g, ge = policy_loss_and_grads(inp["logprobs"], inp["entropy"], inp["old_logprobs"],
                                                 inp["advantages"], inp["mask"], inp["ref_logprobs"], None, config,
                                                 norm, "torch")
    api = _run("torch", config, inp, torch.float64, poison=False, use=("old", "ref", "entropy"))
    assert torch.equal(loss, api[0]) and torch.equal(g, api[1]) and torch.equal(ge, api[2])
    assert list(metrics) == list(api[3])


# --- config and input errors ----------------------------------------------------------------------------


@pytest.mark.parametrize("fields,match", [
    (dict(loss_mode="ppo"), "loss_mode"),
    (dict(kl_estimator="k4"), "kl_estimator"),
    (dict(importance_sampling_level="seq"), "importance_sampling_level"),
    (dict(aggregation="mean"), "aggregation"),
    (dict(rollout_correction="truncate"), "rollout_correction"),
    (dict(aggregation="seq_mean_token_sum_norm"), "max_completion_length"),
    (dict(max_completion_length=0), "max_completion_length"),
    (dict(epsilon_low=1.5), "epsilon_low"),
    (dict(epsilon_high=-0.1), "epsilon_high"),
    (dict(loss_mode="cispo_trl", epsilon_high=0.0), "epsilon_high"),
    (dict(delta=0.9), "delta"),
    (dict(dual_clip=1.0), "dual_clip"),
    (dict(loss_mode="sapo", dual_clip=3.0), "dual_clip"),
    (dict(loss_mode="gpg", delta=2.0), "delta"),
    (dict(beta=-1.0), "beta"),
    (dict(beta=math.inf), "beta"),
    (dict(sapo_tau_neg=0.0), "sapo_tau_neg"),
    (dict(log_ratio_min=1.0, log_ratio_max=-1.0), "log_ratio_min"),
    (dict(rollout_threshold_high=0.0), "rollout_threshold_high"),
    (dict(rollout_threshold_low=3.0, rollout_threshold_high=2.0), "rollout_threshold_low"),
    (dict(credit="contrastive"), "credit"),
    (dict(credit_lambda=1.5), "credit_lambda"),
    (dict(credit_eps_w=1.0), "credit_eps_w"),
])
def test_config_errors(fields, match):
    with pytest.raises(ValueError, match=match):
        LossConfig(**fields)


def test_config_type_errors_and_presets():
    with pytest.raises(TypeError, match="kl_clamp"):
        LossConfig(kl_clamp=1)
    with pytest.raises(TypeError, match="max_completion_length"):
        LossConfig(max_completion_length=10.0)
    with pytest.raises(TypeError, match="beta"):
        LossConfig(beta="0.1")
    with pytest.raises(ValueError, match="preset"):
        LossConfig.preset("ppo2")
    with pytest.raises(ValueError, match="unknown LossConfig field"):
        LossConfig.preset("grpo", eps=0.1)
    with pytest.raises(ValueError, match="max_completion_length"):
        LossConfig.preset("dr_grpo")
    assert LossConfig.preset("dapo").epsilon_high == 0.2  # TRL's default; the paper's 0.28 is "dapo_paper"
    assert LossConfig.preset("dapo_paper").epsilon_high == 0.28
    assert LossConfig.preset("dapo", epsilon_high=0.3).epsilon_high == 0.3
    with pytest.raises(Exception):
        LossConfig().beta = 1.0  # frozen


def _call(**overrides):
    inp = _inputs()
    args = dict(logprobs=inp["logprobs"], old_logprobs=inp["old_logprobs"], advantages=inp["advantages"],
                mask=inp["mask"], config=LossConfig(), backend="torch")
    args.update(overrides)
    return policy_loss(args.pop("logprobs"), args.pop("old_logprobs"), args.pop("advantages"), args.pop("mask"),
                       **args)


@pytest.mark.parametrize("overrides,error,match", [
    (dict(logprobs=[[0.0]]), TypeError, "logprobs"),
    (dict(logprobs=torch.zeros(B * T, dtype=torch.float64)), ValueError, "logprobs"),
    (dict(logprobs=torch.zeros(B, T, dtype=torch.int64)), TypeError, "logprobs"),
    (dict(old_logprobs=torch.zeros(B, T + 1, dtype=torch.float64)), ValueError, "old_logprobs"),
    (dict(advantages=torch.zeros(B + 1)), ValueError, "advantages"),
    (dict(advantages=torch.zeros(B, dtype=torch.int64)), TypeError, "advantages"),
    (dict(mask=torch.ones(B, T + 1, dtype=torch.bool)), ValueError, "mask"),
    (dict(mask=torch.full((B, T), 0.5)), ValueError, "mask"),
    (dict(config=dict(beta=0.1)), TypeError, "config"),
    (dict(config=LossConfig(beta=0.1)), ValueError, "ref_logprobs"),
    (dict(config=LossConfig(entropy_coef=0.1)), ValueError, "entropy"),
    (dict(config=LossConfig(rollout_correction="token_mask")), ValueError, "rollout_logprobs"),
    (dict(ref_logprobs=torch.zeros(B, 1, dtype=torch.float64), config=LossConfig(beta=0.1)), ValueError,
     "ref_logprobs"),
    (dict(entropy=torch.zeros(1, T, dtype=torch.float64)), ValueError, "entropy"),
    (dict(rollout_logprobs=torch.zeros(B, T, dtype=torch.int32)), TypeError, "rollout_logprobs"),
    (dict(num_items_in_batch=0), ValueError, "num_items_in_batch"),
    (dict(num_items_in_batch=torch.tensor(-3)), ValueError, "num_items_in_batch"),
    (dict(num_items_in_batch="10"), TypeError, "num_items_in_batch"),
    (dict(num_sequences_in_batch=0, config=LossConfig(aggregation="seq_mean_token_mean")), ValueError,
     "num_sequences_in_batch"),
    (dict(backend="cuda"), ValueError, "backend"),
    (dict(config=LossConfig(credit="cepo")), ValueError, "pos_logprobs"),
    (dict(config=LossConfig(credit="cepo"), pos_logprobs=torch.zeros(B, T, dtype=torch.float64)), ValueError,
     "neg_logprobs"),
    (dict(config=LossConfig(credit="rlsd"), pos_logprobs=torch.zeros(B, T + 1, dtype=torch.float64)), ValueError,
     "pos_logprobs"),
    (dict(pos_logprobs=torch.zeros(B, T, dtype=torch.float64)), ValueError, "config.credit"),
])
def test_input_errors(overrides, error, match):
    with pytest.raises(error, match=match):
        _call(**overrides)


def test_kernel_backend_rejects_float64():
    inp = _inputs()
    with pytest.raises(TypeError, match="logprobs"):
        policy_loss(inp["logprobs"].to(DEVICE), None, inp["advantages"].to(DEVICE), inp["mask"].to(DEVICE),
                    config=LossConfig(), backend=KERNEL_BACKEND)


@pytest.mark.parametrize("name", ["dapo", "gspo"])
def test_torch_backend_runs_under_inference_mode(name):
    """The torch backend takes its per-token gradients by autograd, which cannot record on inference tensors: under
    torch.inference_mode (an evaluation loop) policy_loss and FusedPolicyLoss still give the no_grad values."""
    inp = _inputs()
    config = LossConfig.preset(name, beta=0.04)
    args = (inp["logprobs"], inp["old_logprobs"], inp["advantages"], inp["mask"])
    g = torch.Generator().manual_seed(5)
    hidden, weight = torch.randn(B, T, 6, generator=g), torch.nn.Parameter(torch.randn(11, 6, generator=g))
    targets = torch.randint(0, 11, (B, T), generator=g)
    fused = rlloss.FusedPolicyLoss(config, backend="torch")
    results = []
    for mode in (torch.no_grad, torch.inference_mode):
        with mode():
            plain = policy_loss(*args, config=config, ref_logprobs=inp["ref_logprobs"], backend="torch").loss
            whole = fused(hidden, weight, targets, inp["mask"], inp["advantages"].float(),
                          old_logprobs=inp["old_logprobs"].float(), ref_logprobs=inp["ref_logprobs"].float()).loss
            results.append((plain.clone(), whole.clone()))
    torch.testing.assert_close(results[1], results[0], rtol=0, atol=0)


# --- GPU: realistic sizes --------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["grpo", "dapo", "gspo", "verl_grpo", "cispo", "sapo"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_realistic_sizes(name, dtype):
    torch.manual_seed(0)
    inp = _inputs(b=64, t=2049, per_token=name == "verl_grpo", scale=3e-3 if name == "gspo" else 0.3)
    config = LossConfig.preset(name, entropy_coef=0.01, rollout_correction="token_truncate")
    out = _run("triton", config, inp, dtype)
    ref = _run("reference", config, _rounded(inp, dtype), torch.float64)
    for a, b, what in ((out[0], ref[0], "loss"), (out[1], ref[1], "d/dlogprobs"), (out[2], ref[2], "d/dentropy")):
        _close(a, b, torch.float32 if what == "loss" else dtype, what)
