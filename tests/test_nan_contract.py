"""The NaN contract of DESIGN.md (Numerics), the same on every backend.

NaN in a counted input reaches the loss and that token's gradient; NaN or inf in a masked or ignored position,
in ref_logprobs with β = 0 or in the entropy with entropy_coef = 0 never matters (the loss and every gradient
are bitwise those of the clean inputs); β = 0 with K = inf is still the loss without a reference; a masked
vocabulary (−inf logits) is exact; log-probs are exact at any logit offset.

What "that token's gradient" means follows from the aggregation: with a token-level ratio each token's
gradient reads its own inputs only (the aggregation weight c_t = m_t/D depends on the mask alone), so exactly
the poisoned token's gradient is NaN and every other one is bitwise the clean one. A sequence-level ratio
(GSPO) reaches every counted token of the row through s_i, so the row's counted gradients are all NaN, its
masked ones still exactly 0, and the other rows clean. The loss is linear in the entropy, so d(loss)/dH =
−c_H·c_t and d(loss)/dℓ never read H: NaN entropy makes the loss NaN and leaves every gradient the clean one.
Through FusedPolicyLoss a NaN token poisons its own hidden row and, through dW = dzᵀ·h and db = Σ dz, all of
the weight and bias gradients.
"""
import dataclasses
import functools
import math
from typing import Dict, NamedTuple, Optional

import pytest
import torch
from conftest import KERNEL_BACKEND

import rlloss
from rlloss import FusedPolicyLoss, LossConfig, policy_loss, reference

POLICY_BACKENDS = ["torch", "reference", KERNEL_BACKEND]
BACKENDS = ["torch", KERNEL_BACKEND]  # FusedPolicyLoss and the precision checks
B, T = 3, 21          # T is not a multiple of any block size
AT = (0, 2)           # the counted token that gets NaN
MASKED = [(0, 4), (0, 9), (0, 17), (1, 20), (2, 15), (2, 16), (2, 17), (2, 18), (2, 19), (2, 20)]
NAN, INF = math.nan, math.inf


def _replace(config: LossConfig, **fields) -> LossConfig:
    return dataclasses.replace(config, **fields)


def _mask() -> torch.Tensor:
    mask = torch.ones(B, T, dtype=torch.bool)
    for b, t in MASKED:
        mask[b, t] = False
    return mask


def _all_but(row_wide: bool) -> torch.Tensor:
    """The positions whose gradient must stay the clean one: all but AT (all but AT's row if row_wide)."""
    keep = torch.ones(B, T, dtype=torch.bool)
    keep[AT[0] if row_wide else AT] = False
    return keep


@functools.lru_cache(maxsize=None)
def _clean_inputs() -> Dict[str, torch.Tensor]:
    """Fresh float32 inputs: moderately off-policy, per-token advantages bounded away from 0."""
    g = torch.Generator().manual_seed(20240611)
    logp = -torch.rand(B, T, generator=g) * 3 - 0.05
    sign = torch.where(torch.rand(B, T, generator=g) < 0.5, -1.0, 1.0)
    return dict(
        logprobs=logp,
        old_logprobs=logp + 0.3 * torch.randn(B, T, generator=g),
        advantages=sign * (0.2 + torch.rand(B, T, generator=g)),
        ref_logprobs=logp + 0.5 * torch.randn(B, T, generator=g),
        entropy=torch.rand(B, T, generator=g) * 2,
    )


CONFIGS = {
    # token-level ratios: every token's gradient is its own
    "dapo_k3": LossConfig.preset("dapo", beta=0.04, entropy_coef=0.01),
    "verl_grpo": LossConfig.preset("verl_grpo", beta=0.1, entropy_coef=0.01),  # ratio clamp, dual clip, clamped k3
    "ppo_delta_k3plus": LossConfig(delta=1.5, beta=0.04, kl_estimator="k3+", entropy_coef=0.01,
                                   aggregation="seq_mean_token_sum"),
    "cispo_abs": LossConfig.preset("cispo", beta=0.04, kl_estimator="abs", entropy_coef=0.01),
    "sapo_k2_weighted": LossConfig.preset("sapo", beta=0.04, kl_estimator="k2", kl_ratio_weighted=True,
                                          entropy_coef=0.01),
    # sequence-level ratio: the row shares s_i
    "gspo": LossConfig.preset("gspo", beta=0.04, entropy_coef=0.01),
    # peer variants whose gradient is local (verl's DPPO and DRO) and GMPO, whose row shares its ratio
    "verl_dppo_tv": LossConfig.preset("verl_dppo_tv", beta=0.1, entropy_coef=0.01),
    "verl_dppo_kl": LossConfig.preset("verl_dppo_kl", beta=0.1, entropy_coef=0.01),
    "verl_dro": LossConfig.preset("verl_dro", dro_beta=0.5, beta=0.1, entropy_coef=0.01),
    "verl_geo_mean": LossConfig.preset("verl_geo_mean", beta=0.1, entropy_coef=0.01),
    # VESPO's φ reads the row's ratio (detached): NaN in ℓ or ℓ° reaches the whole row
    "vespo": LossConfig.preset("vespo", beta=0.04, entropy_coef=0.01),
}
NAN_INPUTS = ["logprobs", "old_logprobs", "advantages", "ref_logprobs", "entropy"]


class Run(NamedTuple):
    loss: torch.Tensor
    grad: torch.Tensor          # d(loss)/d(logprobs)
    grad_ent: torch.Tensor      # d(loss)/d(entropy), zeros when none is formed
    metrics: Dict[str, torch.Tensor]


def _policy(backend: str, config: LossConfig, inputs: Dict[str, Optional[torch.Tensor]]) -> Run:
    logp = inputs["logprobs"].clone().requires_grad_()
    ent = inputs["entropy"].clone().requires_grad_()
    out = policy_loss(logp, inputs["old_logprobs"], inputs["advantages"], _mask(), config=config,
                      ref_logprobs=inputs["ref_logprobs"], entropy=ent, backend=backend)
    out.loss.backward()
    grad_ent = ent.grad if ent.grad is not None else torch.zeros(B, T)
    return Run(out.loss.detach(), logp.grad, grad_ent, {k: v.detach() for k, v in out.metrics.items()})


@functools.lru_cache(maxsize=None)
def _policy_case(backend: str, config_name: str, poisoned: Optional[str]) -> Run:
    """policy_loss with NaN at the counted token AT of input ``poisoned`` (None: the clean inputs)."""
    inputs = dict(_clean_inputs())
    if poisoned is not None:
        inputs[poisoned] = inputs[poisoned].clone()
        inputs[poisoned][AT] = NAN
    return _policy(backend, CONFIGS[config_name], inputs)


def _row_wide(config: LossConfig, poisoned: str) -> bool:
    """Whether NaN at AT reaches the whole row's gradient: a sequence-level ratio fed by the poisoned input
    (the KL term's gradient stays per token unless it is weighted by that ratio)."""
    if poisoned == "entropy":
        return False
    if config.loss_mode == "geo_mean":  # s_i and the mean advantage Ā_i are the row's
        return poisoned != "ref_logprobs"
    if config.loss_mode == "vespo":  # φ(w_i), w_i from the row's log-ratios
        return poisoned in ("logprobs", "old_logprobs")
    if config.importance_sampling_level != "sequence":
        return False
    return poisoned != "ref_logprobs" or config.kl_ratio_weighted


# --- (1) NaN in a counted input reaches the loss and that token's gradient -----------------------------


def _nan_cases():
    for backend in POLICY_BACKENDS:
        for config_name in CONFIGS:
            for poisoned in NAN_INPUTS:
                yield pytest.param(backend, config_name, poisoned, id=f"{backend}-{config_name}-{poisoned}")


@pytest.mark.parametrize("backend,config_name,poisoned", list(_nan_cases()))
def test_counted_nan_reaches_loss_and_its_gradient(backend, config_name, poisoned):
    clean = _policy_case(backend, config_name, None)
    dirty = _policy_case(backend, config_name, poisoned)
    mask = _mask()
    assert torch.isfinite(clean.loss) and torch.isfinite(clean.grad).all() and torch.isfinite(clean.grad_ent).all()
    assert dirty.loss.isnan(), f"NaN {poisoned} at a counted token gave the loss {dirty.loss.item()}"
    assert (dirty.grad[~mask] == 0).all() and (dirty.grad_ent[~mask] == 0).all(), "masked tokens"
    assert torch.equal(dirty.grad_ent, clean.grad_ent)  # −c_H·c_t never reads an input value
    if poisoned == "entropy":  # the loss is linear in H: no gradient reads it
        assert torch.equal(dirty.grad, clean.grad)
        return
    assert dirty.grad[AT].isnan(), f"NaN {poisoned} at a counted token gave the gradient {dirty.grad[AT].item()}"
    row_wide = _row_wide(CONFIGS[config_name], poisoned)
    if row_wide:
        assert dirty.grad[AT[0]][mask[AT[0]]].isnan().all()
    keep = _all_but(row_wide)
    assert torch.equal(dirty.grad[keep], clean.grad[keep])


@pytest.mark.parametrize("backend", BACKENDS)
def test_per_sequence_nan_advantage_reaches_its_row(backend):
    """A [B] advantage that is NaN poisons every counted token of its row, and only those."""
    inputs = dict(_clean_inputs())
    adv = inputs["advantages"][:, 0].clone()
    adv[AT[0]] = NAN
    run = _policy(backend, CONFIGS["dapo_k3"], {**inputs, "advantages": adv})
    mask = _mask()
    assert run.loss.isnan()
    assert run.grad[AT[0]][mask[AT[0]]].isnan().all() and (run.grad[AT[0]][~mask[AT[0]]] == 0).all()
    assert torch.isfinite(run.grad[_all_but(True)]).all()


# --- (4) every backend agrees on which outputs are NaN ------------------------------------------------


def _agree_cases():
    for config_name in CONFIGS:
        for poisoned in NAN_INPUTS:
            yield pytest.param(config_name, poisoned, id=f"{config_name}-{poisoned}")


@pytest.mark.parametrize("config_name,poisoned", list(_agree_cases()))
def test_backends_agree_on_nan_outputs(config_name, poisoned):
    """Loss, both gradients and every metric: the same NaN pattern on torch, reference and the kernel."""
    runs = {b: _policy_case(b, config_name, poisoned) for b in POLICY_BACKENDS}
    want = runs["torch"]
    for backend, run in runs.items():
        assert bool(run.loss.isnan()) == bool(want.loss.isnan()), backend
        assert torch.equal(run.grad.isnan(), want.grad.isnan()), (backend, run.grad.isnan().nonzero().tolist(),
                                                                   want.grad.isnan().nonzero().tolist())
        assert torch.equal(run.grad_ent.isnan(), want.grad_ent.isnan()), backend
        for name in set(run.metrics) & set(want.metrics):
            assert bool(run.metrics[name].isnan()) == bool(want.metrics[name].isnan()), (backend, name)


# --- (2), (3) what never matters: masked positions, β = 0, entropy_coef = 0 ---------------------------

SWITCHED_OFF_CONFIGS = ["dapo_k3", "verl_grpo", "sapo_k2_weighted", "gspo", "verl_dppo_kl", "verl_dro",
                        "verl_geo_mean"]


@functools.lru_cache(maxsize=None)
def _switched_off_clean(backend: str, config_name: str) -> Run:
    """β = 0 and entropy_coef = 0, no ref_logprobs, finite entropy."""
    config = _replace(CONFIGS[config_name], beta=0.0, entropy_coef=0.0)
    return _policy(backend, config, {**_clean_inputs(), "ref_logprobs": None})


def _garbage_in_masked(x: torch.Tensor) -> torch.Tensor:
    """NaN, +inf and −inf in turn at the masked tokens."""
    junk = torch.tensor([NAN, INF, -INF]).repeat(B * T // 3 + 1)[: B * T].view(B, T)
    return torch.where(_mask(), x, junk)


def _switched_off_cases():
    for backend in POLICY_BACKENDS:
        for config_name in SWITCHED_OFF_CONFIGS:
            for case in ["masked_garbage", "beta0_coef0_nan", "beta0_ref_plus_100"]:
                yield pytest.param(backend, config_name, case, id=f"{backend}-{config_name}-{case}")


@pytest.mark.parametrize("backend,config_name,case", list(_switched_off_cases()))
def test_masked_and_switched_off_inputs_never_matter(backend, config_name, case):
    """The loss and both gradients are bitwise those of the clean inputs: NaN/±inf at every masked token of
    every input; NaN ref_logprobs with β = 0 and NaN entropy with entropy_coef = 0 (against no ref_logprobs);
    ref_logprobs 100 nats above the log-probs (k3: K = inf in float32) with β = 0 (against no ref_logprobs)."""
    inputs = _clean_inputs()
    if case == "masked_garbage":
        want = _policy_case(backend, config_name, None)
        got = _policy(backend, CONFIGS[config_name], {k: _garbage_in_masked(v) for k, v in inputs.items()})
    else:
        want = _switched_off_clean(backend, config_name)
        config = _replace(CONFIGS[config_name], beta=0.0, entropy_coef=0.0)
        if case == "beta0_coef0_nan":
            dirty = {**inputs, "ref_logprobs": torch.full((B, T), NAN), "entropy": torch.full((B, T), NAN)}
        else:
            dirty = {**inputs, "ref_logprobs": inputs["logprobs"] + 100.0}
        got = _policy(backend, config, dirty)
    assert torch.isfinite(got.loss), f"{case}: the loss is {got.loss.item()}"
    assert torch.equal(got.loss, want.loss)
    assert torch.equal(got.grad, want.grad) and torch.equal(got.grad_ent, want.grad_ent)
    for name, value in want.metrics.items():
        if case == "masked_garbage" or name != "entropy":  # the entropy metric reports the NaN entropy
            assert torch.equal(got.metrics[name], value), name
    if case == "beta0_ref_plus_100":  # the kl metric still reports the divergence (inf for plain k3)
        assert got.metrics["kl"] >= 10.0


# --- k3 = e^x − x − 1 without cancellation (the kernel's copy of rlloss.policy.k3_value) -------------------


@pytest.mark.parametrize("kl_clamp", [False, True], ids=["k3", "k3_verl_clamp"])
def test_k3_small_x_has_no_cancellation(kl_clamp):
    """For |x| ~ 1e-3..1e-1 float32 e − x − 1 loses ~1e-4 relative; the series keeps the kernel's kl metric and
    loss within float32 rounding of the float64 torch backend."""
    inputs = dict(_clean_inputs())
    g = torch.Generator().manual_seed(29)
    scale = 10.0 ** (-1 - 2 * torch.rand(B, T, generator=g))  # |x| from 1e-3 to 1e-1
    inputs["ref_logprobs"] = inputs["logprobs"] + scale * torch.randn(B, T, generator=g)
    config = LossConfig.preset("dapo", beta=0.5, kl_clamp=kl_clamp)
    got = _policy(KERNEL_BACKEND, config, inputs)
    want = _policy("torch", config, {k: v.double() for k, v in inputs.items()})
    torch.testing.assert_close(got.metrics["kl"].double(), want.metrics["kl"], rtol=2e-6, atol=0)
    torch.testing.assert_close(got.loss.double(), want.loss, rtol=2e-6, atol=1e-9)


# --- FusedPolicyLoss -----------------------------------------------------------------------------------

D, V = 8, 24
FUSED_CONFIGS = ["dapo_k3", "gspo", "verl_dppo_tv", "verl_geo_mean"]



@functools.lru_cache(maxsize=None)
def _fused_inputs():
    g = torch.Generator().manual_seed(7)
    hidden = torch.randn(B, T, D, generator=g)
    weight = torch.randn(V, D, generator=g) * 0.5
    bias = torch.randn(V, generator=g) * 0.1
    targets = torch.randint(0, V, (B, T), generator=g)
    with torch.no_grad():
        logp = reference.token_logprobs(hidden, weight, targets, bias=bias)[0]
    sign = torch.where(torch.rand(B, T, generator=g) < 0.5, -1.0, 1.0)
    return dict(hidden=hidden, weight=weight, bias=bias, targets=targets,
                old_logprobs=logp + 0.3 * torch.randn(B, T, generator=g),
                advantages=sign * (0.2 + torch.rand(B, T, generator=g)),
                ref_logprobs=logp + 0.5 * torch.randn(B, T, generator=g))


class FusedRun(NamedTuple):
    loss: torch.Tensor
    hidden: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor


def _fused(backend, config, inputs) -> FusedRun:
    h, w, b = (inputs[k].clone().requires_grad_() for k in ("hidden", "weight", "bias"))
    out = FusedPolicyLoss(config, backend=backend)(
        h, w, inputs["targets"], _mask(), inputs["advantages"], bias=b, old_logprobs=inputs["old_logprobs"],
        ref_logprobs=inputs["ref_logprobs"])
    out.loss.backward()
    return FusedRun(out.loss.detach(), h.grad, w.grad, b.grad)


@functools.lru_cache(maxsize=None)
def _fused_clean(backend, config_name, switched_off=False) -> FusedRun:
    if switched_off:
        config = _replace(CONFIGS[config_name], beta=0.0, entropy_coef=0.0)
        return _fused(backend, config, {**_fused_inputs(), "ref_logprobs": None})
    return _fused(backend, CONFIGS[config_name], _fused_inputs())


def _fused_nan_cases():
    for backend in BACKENDS:
        for config_name in FUSED_CONFIGS:
            for poisoned in ["hidden", "old_logprobs", "advantages", "ref_logprobs"]:
                marks = []
                yield pytest.param(backend, config_name, poisoned, id=f"{backend}-{config_name}-{poisoned}",
                                   marks=marks)


@pytest.mark.parametrize("backend,config_name,poisoned", list(_fused_nan_cases()))
def test_fused_counted_nan(backend, config_name, poisoned):
    """NaN at a counted token: NaN loss, NaN gradient of that token's hidden row (of its sequence's counted
    rows for GSPO), every other hidden row the clean gradient, and NaN dW and db (sums over the tokens)."""
    config = CONFIGS[config_name]
    inputs = _fused_inputs()
    clean = _fused_clean(backend, config_name)
    x = inputs[poisoned].clone()
    x[AT] = NAN
    dirty = _fused(backend, config, {**inputs, poisoned: x})
    mask = _mask()
    assert torch.isfinite(clean.loss) and all(torch.isfinite(g).all() for g in clean[1:])
    assert dirty.loss.isnan(), f"NaN {poisoned} at a counted token gave the loss {dirty.loss.item()}"
    assert dirty.hidden[AT].isnan().all()
    row_wide = _row_wide(config, "logprobs" if poisoned == "hidden" else poisoned)
    if row_wide:
        assert dirty.hidden[AT[0]][mask[AT[0]]].isnan().all()
    keep = _all_but(row_wide) & mask
    assert torch.equal(dirty.hidden[keep], clean.hidden[keep])
    assert (dirty.hidden[~mask] == 0).all()
    assert dirty.weight.isnan().all() and dirty.bias.isnan().all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("config_name", FUSED_CONFIGS)
@pytest.mark.parametrize("case", ["masked_garbage", "beta0_ref_nan", "beta0_ref_plus_100"])
def test_fused_masked_and_switched_off_inputs_never_matter(backend, config_name, case):
    """Bitwise the clean loss and gradients: NaN/±inf hidden rows, old/advantages/ref and out-of-range targets
    at the masked tokens; NaN or +100-nat ref_logprobs with β = 0 (against no ref_logprobs)."""
    inputs = _fused_inputs()
    mask = _mask()
    if case == "masked_garbage":
        want = _fused_clean(backend, config_name)
        dirty = {k: (_garbage_in_masked(v) if k in ("old_logprobs", "advantages", "ref_logprobs") else v)
                 for k, v in inputs.items()}
        junk_rows = _garbage_in_masked(torch.zeros(B, T))[..., None]
        dirty["hidden"] = torch.where(mask[..., None], inputs["hidden"], junk_rows)
        dirty["targets"] = torch.where(mask, inputs["targets"], V + 5)  # out of range where not counted
        got = _fused(backend, CONFIGS[config_name], dirty)
    else:
        want = _fused_clean(backend, config_name, switched_off=True)
        ref = torch.full((B, T), NAN) if case == "beta0_ref_nan" else inputs["old_logprobs"] + 100.0
        config = _replace(CONFIGS[config_name], beta=0.0, entropy_coef=0.0)
        got = _fused(backend, config, {**inputs, "ref_logprobs": ref})
    assert torch.isfinite(got.loss), f"{case}: the loss is {got.loss.item()}"
    for name in FusedRun._fields:
        assert torch.equal(getattr(got, name), getattr(want, name)), name
    assert (got.hidden[~mask] == 0).all()


# --- log-probs: NaN in a counted row, garbage in ignored rows ------------------------------------------

LOGPROB_BACKENDS = ["torch", "reference", KERNEL_BACKEND]
N_ROWS, VOCAB, HID = 9, 40, 8
NAN_ROW, IGNORED = 3, [1, 6]


def _logits_run(backend, logits, targets):
    z = logits.clone().requires_grad_()
    out = rlloss.logprobs_from_logits(z, targets, return_entropy=True, backend=backend, check_inputs=False)
    (out.logprobs.sum() + 0.5 * out.entropy.sum()).backward()
    return out.logprobs.detach(), out.entropy.detach(), z.grad


def _linear_run(backend, hidden, weight, bias, targets):
    h, w, b = (x.clone().requires_grad_() for x in (hidden, weight, bias))
    out = rlloss.token_logprobs(h, w, targets, bias=b, return_entropy=True, backend=backend, check_inputs=False)
    (out.logprobs.sum() + 0.5 * out.entropy.sum()).backward()
    return out.logprobs.detach(), out.entropy.detach(), h.grad, w.grad, b.grad


def _rows_inputs():
    g = torch.Generator().manual_seed(3)
    return dict(logits=torch.randn(N_ROWS, VOCAB, generator=g) * 2,
                hidden=torch.randn(N_ROWS, HID, generator=g),
                weight=torch.randn(VOCAB, HID, generator=g) * 0.5,
                bias=torch.randn(VOCAB, generator=g) * 0.1,
                targets=torch.randint(0, VOCAB, (N_ROWS,), generator=g))


def _logprob_nan_backends():
    return [pytest.param(b) for b in
            LOGPROB_BACKENDS]


@pytest.mark.parametrize("backend", _logprob_nan_backends())
def test_logprobs_from_logits_counted_nan(backend):
    """A NaN logit in a counted row: that row's log-prob, entropy and logit gradient are NaN, the rest clean."""
    inp = _rows_inputs()
    z, y = inp["logits"], inp["targets"]
    clean = _logits_run(backend, z, y)
    bad = z.clone()
    bad[NAN_ROW, 5] = NAN
    lp, ent, grad = _logits_run(backend, bad, y)
    others = torch.arange(N_ROWS) != NAN_ROW
    assert lp[NAN_ROW].isnan() and ent[NAN_ROW].isnan() and grad[NAN_ROW].isnan().all()
    for a, c in zip((lp, ent, grad), clean):
        assert torch.equal(a[others], c[others])


@pytest.mark.parametrize("backend", LOGPROB_BACKENDS)
def test_logprobs_from_logits_ignored_garbage(backend):
    """NaN / ±inf rows whose target is ignore_index: everything as clean, exactly zero gradient there."""
    inp = _rows_inputs()
    z, y = inp["logits"], inp["targets"].clone()
    y[IGNORED] = -100
    clean = _logits_run(backend, z, y)
    junk = z.clone()
    junk[IGNORED[0]] = NAN
    junk[IGNORED[1]] = torch.where(torch.arange(VOCAB) % 2 == 0, INF, -INF)
    got = _logits_run(backend, junk, y)
    for a, c in zip(got, clean):
        assert torch.equal(a, c)
    assert (got[2][IGNORED] == 0).all()


@pytest.mark.parametrize("backend", _logprob_nan_backends())
def test_token_logprobs_counted_nan(backend):
    """A NaN hidden entry of a counted token: its log-prob, entropy and hidden gradient are NaN, the other
    rows clean; dW and db sum over every token, so they are NaN throughout."""
    inp = _rows_inputs()
    h, W, b, y = inp["hidden"], inp["weight"], inp["bias"], inp["targets"]
    clean = _linear_run(backend, h, W, b, y)
    bad = h.clone()
    bad[NAN_ROW, 2] = NAN
    lp, ent, gh, gw, gb = _linear_run(backend, bad, W, b, y)
    others = torch.arange(N_ROWS) != NAN_ROW
    assert lp[NAN_ROW].isnan() and ent[NAN_ROW].isnan() and gh[NAN_ROW].isnan().all()
    for a, c in zip((lp, ent, gh), clean):
        assert torch.equal(a[others], c[others])
    assert gw.isnan().all() and gb.isnan().all()


@pytest.mark.parametrize("backend", LOGPROB_BACKENDS)
def test_token_logprobs_ignored_garbage(backend):
    inp = _rows_inputs()
    h, W, b, y = inp["hidden"], inp["weight"], inp["bias"], inp["targets"].clone()
    y[IGNORED] = -100
    clean = _linear_run(backend, h, W, b, y)
    junk = h.clone()
    junk[IGNORED[0]] = NAN
    junk[IGNORED[1]] = INF
    got = _linear_run(backend, junk, W, b, y)
    for a, c in zip(got, clean):
        assert torch.equal(a, c)
    assert (got[2][IGNORED] == 0).all()


# --- contrastive_credit -------------------------------------------------------------------------------



def _credit_cases():
    for backend in POLICY_BACKENDS:
        for poisoned in ["advantages", "pos_logprobs", "neg_logprobs"]:
            marks = []
            yield pytest.param(backend, poisoned, id=f"{backend}-{poisoned}", marks=marks)


@pytest.mark.parametrize("backend,poisoned", list(_credit_cases()))
def test_contrastive_credit_nan(backend, poisoned):
    inputs = dict(_clean_inputs())
    g = torch.Generator().manual_seed(11)
    pos = inputs["logprobs"] + torch.randn(B, T, generator=g)
    neg = inputs["logprobs"] + torch.randn(B, T, generator=g)
    args = dict(advantages=inputs["advantages"], pos_logprobs=pos, neg_logprobs=neg)
    mask = _mask()

    def credit(a):
        return rlloss.contrastive_credit(a["advantages"], mask, a["pos_logprobs"], neg_logprobs=a["neg_logprobs"],
                                         credit="cepo", credit_lambda=0.5, credit_eps_w=0.2,
                                         backend=backend)

    clean = credit(args)
    # masked garbage never matters
    junk = {k: torch.where(mask, v, torch.full_like(v, NAN)) for k, v in args.items()}
    assert torch.equal(credit(junk), clean)
    x = args[poisoned].clone()
    x[AT] = NAN
    out = credit({**args, poisoned: x})
    assert out[AT].isnan(), f"NaN {poisoned} at a counted token gave Â = {out[AT].item()}"
    keep = _all_but(False)
    assert torch.equal(out[keep], clean[keep])


# --- (5) a masked vocabulary (−inf logits) is exact ---------------------------------------------------



def _masked_vocab_inputs():
    g = torch.Generator().manual_seed(5)
    logits = (torch.randn(N_ROWS, VOCAB, generator=g) * 2).float()
    blocked = torch.randint(0, VOCAB, (N_ROWS,), generator=g)
    logits[torch.arange(N_ROWS), blocked] = -INF  # one −inf logit in every row
    targets = torch.randint(0, VOCAB, (N_ROWS,), generator=g)
    targets = torch.where(targets == blocked, (targets + 1) % VOCAB, targets)
    return logits, targets, blocked


def _dropped_vocab_truth(logits, targets):
    """Float64 truth without the reference: each row's −inf entry removed (probability exactly 0)."""
    z = logits.double().clone().requires_grad_()
    finite = torch.isfinite(z.detach())
    lp_rows, ent_rows = [], []
    for i in range(z.shape[0]):
        zi = z[i][finite[i]]
        idx = int(finite[i][: targets[i]].sum())
        ls = torch.log_softmax(zi, -1)
        lp_rows.append(ls[idx])
        ent_rows.append(-(ls.exp() * ls).sum())
    lp, ent = torch.stack(lp_rows), torch.stack(ent_rows)
    (lp.sum() + 0.5 * ent.sum()).backward()
    return lp.detach(), ent.detach(), z.grad


def _assert_close_to(got, want, what):
    for name, a, b in zip(("logprobs", "entropy", "grad"), got, want):
        assert torch.isfinite(a).all(), (what, name)
        torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=2e-6, msg=f"{what}: {name}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_masked_vocabulary_logits_exact(backend):
    logits, targets, blocked = _masked_vocab_inputs()
    got = _logits_run(backend, logits, targets)
    _assert_close_to(got, _dropped_vocab_truth(logits, targets), "vs the vocabulary without the -inf entry")
    assert (got[2][torch.arange(N_ROWS), blocked] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_masked_vocabulary_logits_match_reference(backend):
    logits, targets, _ = _masked_vocab_inputs()
    got = _logits_run(backend, logits, targets)
    want = _logits_run("reference", logits.double(), targets)
    _assert_close_to(got, want, "vs rlloss.reference in float64")


def _masked_bias_inputs():
    inp = _rows_inputs()
    bias = inp["bias"].clone()
    bias[7] = -INF
    targets = torch.where(inp["targets"] == 7, torch.full_like(inp["targets"], 8), inp["targets"])
    return inp["hidden"], inp["weight"], bias, targets


def _linear_truth(hidden, weight, bias, targets):
    """Float64 truth of token_logprobs with a −inf bias entry: that vocabulary row dropped."""
    h, w, b = (x.double().clone().requires_grad_() for x in (hidden, weight, bias))
    keep = torch.isfinite(b.detach())
    z = h @ w[keep].T + b[keep]
    new_targets = keep.cumsum(0)[targets] - 1
    ls = torch.log_softmax(z, -1)
    lp = ls.gather(-1, new_targets[:, None])[:, 0]
    ent = -(ls.exp() * ls).sum(-1)
    (lp.sum() + 0.5 * ent.sum()).backward()
    gb = b.grad.clone()
    return lp.detach(), ent.detach(), h.grad, w.grad, gb


def _assert_linear_close(got, want, what):
    for name, a, b in zip(("logprobs", "entropy", "d_hidden", "d_weight", "d_bias"), got, want):
        assert torch.isfinite(a).all(), (what, name)
        torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=2e-6, msg=f"{what}: {name}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_masked_vocabulary_bias_exact(backend):
    hidden, weight, bias, targets = _masked_bias_inputs()
    got = _linear_run(backend, hidden, weight, bias, targets)
    _assert_linear_close(got, _linear_truth(hidden, weight, bias, targets), "vs the vocabulary without the -inf row")
    assert (got[3][7] == 0).all() and got[4][7] == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_masked_vocabulary_bias_matches_reference(backend):
    hidden, weight, bias, targets = _masked_bias_inputs()
    got = _linear_run(backend, hidden, weight, bias, targets)
    want = _linear_run("reference", hidden.double(), weight.double(), bias.double(), targets)
    _assert_linear_close(got, want, "vs rlloss.reference in float64")


# --- (6) exact at any logit offset --------------------------------------------------------------------

OFFSETS = [0.0, 1e2, 1e3, 1e4]


def _naive_float32(z, targets):
    """torch.log_softmax in float32 and the entropy and gradient built on it: the tolerance yardstick."""
    z = z.clone().requires_grad_()
    ls = torch.log_softmax(z, -1)
    lp = ls.gather(-1, targets[:, None])[:, 0]
    ent = -(ls.exp() * ls).sum(-1)
    (lp.sum() + 0.5 * ent.sum()).backward()
    return lp.detach(), ent.detach(), z.grad


def _tolerances(naive, truth):
    """4·|naive − truth| + 1e-6 per output (max over the batch)."""
    return [4 * (a.double() - b).abs().max().item() + 1e-6 for a, b in zip(naive, truth)]


def _assert_within(got, truth, tols, what):
    for name, a, b, tol in zip(("logprobs", "entropy", "grad"), got, truth, tols):
        err = (a.double() - b).abs().max().item()
        assert err <= tol, f"{what}: {name} off by {err:.3g} > {tol:.3g}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("offset", OFFSETS)
def test_logit_offset_logprobs_from_logits(backend, offset):
    g = torch.Generator().manual_seed(13)
    z = (torch.randn(N_ROWS, VOCAB, generator=g, dtype=torch.float64) * 2 + offset).float()  # as stored
    y = torch.randint(0, VOCAB, (N_ROWS,), generator=g)
    truth = _logits_run("reference", z.double(), y)  # float64 on the same rounded logits
    tols = _tolerances(_naive_float32(z, y), truth)
    _assert_within(_logits_run(backend, z, y), truth, tols, f"offset {offset:g}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("offset", OFFSETS)
def test_logit_offset_token_logprobs_via_bias(backend, offset):
    """The offset enters through the bias. Hidden and weight hold multiples of 1/8 in [−1, 1], so h·Wᵀ is a
    multiple of 1/64 below 8 in magnitude and h·Wᵀ + b is exact in float32 up to |b| = 1e4 (ulp 2⁻¹⁰): the
    float64 reference sees the very logits the backend forms."""
    g = torch.Generator().manual_seed(17)
    hidden = torch.randint(-8, 9, (N_ROWS, HID), generator=g).float() / 8
    weight = torch.randint(-8, 9, (VOCAB, HID), generator=g).float() / 8
    bias = torch.randint(-64, 65, (VOCAB,), generator=g).float() / 32 + offset
    y = torch.randint(0, VOCAB, (N_ROWS,), generator=g)
    z = hidden @ weight.T + bias
    assert torch.equal(z.double(), hidden.double() @ weight.double().T + bias.double())  # exact logits
    truth_z = _logits_run("reference", z.double(), y)
    tols = _tolerances(_naive_float32(z, y), truth_z)
    lp, ent, gh, gw, gb = _linear_run(backend, hidden, weight, bias, y)
    want = _linear_run("reference", hidden.double(), weight.double(), bias.double(), y)
    # d/dbias is the logit gradient summed over rows: the logits' yardstick times the number of rows
    _assert_within((lp, ent, gb), (want[0], want[1], want[4]), tols[:2] + [tols[2] * N_ROWS], f"offset {offset:g}")
    # d/dhidden = dz·W and d/dweight = dzᵀ·h with entries of magnitude ≤ 1: at most the sum of |dz| errors
    for name, a, b, width in (("d_hidden", gh, want[2], VOCAB), ("d_weight", gw, want[3], N_ROWS)):
        err = (a.double() - b).abs().max().item()
        assert err <= tols[2] * width, f"offset {offset:g}: {name} off by {err:.3g}"
