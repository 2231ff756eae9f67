"""Contrastive-teacher token credit (docs/math.md §7): ``contrastive_credit`` against the float64 reference on the
torch and kernel backends, its properties, ``LinearDecay``, the credit formed inside ``policy_loss`` /
``FusedPolicyLoss`` against the unfused composition, ``build_teacher_inputs`` on hand-made groups, the
forward-only teacher pass, and a tiny random transformers model end to end."""
import math

import pytest
import torch
from conftest import KERNEL_BACKEND
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import rlloss
from rlloss import FusedPolicyLoss, LinearDecay, LossConfig, contrastive_credit, policy_loss, reference
from rlloss.teacher import build_teacher_inputs

BACKENDS = [("torch", torch.float64), (KERNEL_BACKEND, torch.float32)]
B, T = 4, 37  # T is not a multiple of any block size


def _inputs(b=B, t=T, *, per_token=False, spread=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    logp = -torch.rand(b, t, generator=g, dtype=torch.float64) * 3 - 0.01
    mask = torch.rand(b, t, generator=g) < 0.8
    if b > 1:
        mask[1, t // 2:] = False
    adv_shape = (b, t) if per_token else (b,)
    adv = torch.randn(adv_shape, generator=g, dtype=torch.float64)
    adv[0] = 0.0  # a zero advantage: Â must be exactly 0 there
    return dict(
        logprobs=logp,
        old_logprobs=logp + 0.2 * torch.randn(b, t, generator=g, dtype=torch.float64),
        advantages=adv,
        mask=mask,
        pos_logprobs=logp + spread * torch.randn(b, t, generator=g, dtype=torch.float64),
        neg_logprobs=logp + spread * torch.randn(b, t, generator=g, dtype=torch.float64),
    )


def _poison(x, mask, value=math.nan):
    return torch.where(mask, x, torch.full_like(x, value)) if x.ndim == 2 else x.clone()


def _credit(inp, mode, backend, dtype, *, lam=0.5, eps_w=0.2, poison=True):
    mask = inp["mask"]
    cast = {k: inp[k].to(dtype) for k in ("advantages", "pos_logprobs", "neg_logprobs", "old_logprobs")}
    if poison:
        cast = {k: _poison(v, mask) for k, v in cast.items()}
    other = {"neg_logprobs": cast["neg_logprobs"]} if mode == "cepo" else {"base_logprobs": cast["old_logprobs"]}
    return contrastive_credit(cast["advantages"], mask, cast["pos_logprobs"], credit=mode, credit_lambda=lam,
                              credit_eps_w=eps_w,
                              backend=backend, **other)


def _reference_credit(inp, mode, dtype, **kw):
    rounded = {k: inp[k].to(dtype).double() for k in ("advantages", "pos_logprobs", "neg_logprobs", "old_logprobs")}
    other = {"neg_logprobs": rounded["neg_logprobs"]} if mode == "cepo" else {"base_logprobs": rounded["old_logprobs"]}
    return reference.contrastive_credit(rounded["advantages"], inp["mask"], rounded["pos_logprobs"], mode=mode,
                                        **other, **kw)


def _tol(dtype):
    return dict(rtol=1e-12, atol=1e-14) if dtype == torch.float64 else dict(rtol=2e-6, atol=1e-7)


# --- contrastive_credit against the reference ---------------------------------------------------------------


@pytest.mark.parametrize("backend,dtype", BACKENDS)
@pytest.mark.parametrize("mode", ["cepo", "rlsd"])
@pytest.mark.parametrize("per_token", [False, True], ids=["adv_seq", "adv_token"])
def test_credit_matches_reference(mode, per_token, backend, dtype):
    inp = _inputs(per_token=per_token, seed=1)
    out = _credit(inp, mode, backend, dtype, lam=0.7, eps_w=0.3)
    expected = _reference_credit(inp, mode, dtype, lam=0.7, eps_w=0.3)
    assert out.shape == (B, T) and out.dtype == dtype and not out.requires_grad
    torch.testing.assert_close(out.double(), expected, **_tol(dtype))
    assert (out[~inp["mask"]] == 0).all() and (out[0] == 0).all()  # masked tokens and A = 0 (row 0)
    # both clip bounds are active somewhere, so the clip is exercised
    w_active = (expected != 0)
    multiplier = expected[w_active] / _reference_credit(inp, mode, dtype, lam=0.0)[w_active]
    assert multiplier.max() == pytest.approx(1 + 0.7 * 0.3) and multiplier.min() == pytest.approx(1 - 0.7 * 0.3)


@pytest.mark.parametrize("backend,dtype", BACKENDS)
def test_credit_low_precision_inputs_and_empty(backend, dtype):
    inp = _inputs(seed=2)
    half = {k: (v.half() if v.is_floating_point() else v) for k, v in inp.items()}
    out = _credit(half, "cepo", backend, torch.float16)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), _reference_credit(half, "cepo", torch.float16), rtol=1e-6, atol=1e-7)
    for shape in ((0, 5), (3, 0)):
        empty = contrastive_credit(torch.zeros(shape[0]), torch.ones(shape, dtype=torch.bool), torch.zeros(shape),
                                   neg_logprobs=torch.zeros(shape), backend=backend)
        assert empty.shape == shape


def test_credit_reference_backend_through_the_api():
    inp = _inputs(seed=3)
    out = _credit(inp, "rlsd", "reference", torch.float64)
    torch.testing.assert_close(out, _reference_credit(inp, "rlsd", torch.float64))


# --- properties ------------------------------------------------------------------------------------------


@st.composite
def _credit_cases(draw):
    b, t = draw(st.integers(1, 5)), draw(st.integers(1, 40))
    seed = draw(st.integers(0, 2**31 - 1))
    inp = _inputs(b, t, per_token=draw(st.booleans()), spread=draw(st.sampled_from([0.01, 1.0, 30.0])), seed=seed)
    lam = draw(st.sampled_from([0.0, 0.25, 0.5, 1.0]))
    eps_w = draw(st.sampled_from([0.0, 0.2, 0.5, 0.9]))
    return inp, draw(st.sampled_from(["cepo", "rlsd"])), lam, eps_w


def _check_properties(inp, mode, lam, eps_w, backend, dtype):
    out = _credit(inp, mode, backend, dtype, lam=lam, eps_w=eps_w).double()
    mask = inp["mask"]
    adv = inp["advantages"].to(dtype).double()
    A = torch.where(mask, adv[:, None].expand_as(mask) if adv.ndim == 1 else adv, torch.zeros((), dtype=torch.float64))
    assert torch.isfinite(out).all()
    assert torch.equal(torch.sign(out), torch.sign(A))  # sign(Â) = sign(A), 0 where masked or A = 0
    live = A != 0
    multiplier = out[live] / A[live]
    slack = 1e-12 if dtype == torch.float64 else 1e-6
    assert (multiplier >= 1 - lam * eps_w - slack).all() and (multiplier <= 1 + lam * eps_w + slack).all()
    torch.testing.assert_close(out, _reference_credit(inp, mode, dtype, lam=lam, eps_w=eps_w), **_tol(dtype))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_credit_cases())
def test_properties_torch(case):
    _check_properties(*case, "torch", torch.float64)


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_credit_cases())
def test_properties_kernel(case):
    _check_properties(*case, KERNEL_BACKEND, torch.float32)


@pytest.mark.parametrize("backend,dtype", BACKENDS)
@pytest.mark.parametrize("mode", ["cepo", "rlsd"])
def test_zero_delta_or_zero_lambda_is_plain_grpo(mode, backend, dtype):
    inp = _inputs(seed=4)
    plain = torch.where(inp["mask"], inp["advantages"][:, None].to(dtype), torch.zeros((), dtype=dtype))
    flat = dict(inp, pos_logprobs=inp["old_logprobs"], neg_logprobs=inp["old_logprobs"])  # Δ = 0
    torch.testing.assert_close(_credit(flat, mode, backend, dtype).to(dtype), plain, rtol=0, atol=0)
    torch.testing.assert_close(_credit(inp, mode, backend, dtype, lam=0.0).to(dtype), plain, rtol=0, atol=0)


@pytest.mark.parametrize("backend,dtype", BACKENDS)
def test_huge_delta_stays_finite(backend, dtype):
    """|Δ| = 1e4 (and ±inf) hits the clip bound instead of overflowing exp."""
    inp = _inputs(seed=5)
    inp["advantages"] = torch.tensor([2.0, -1.5, 0.0, 0.5], dtype=torch.float64)
    inp["pos_logprobs"] = inp["neg_logprobs"] + 1e4 * torch.tensor([1.0, 1.0, 1.0, -1.0], dtype=torch.float64)[:, None]
    inp["pos_logprobs"][3, :3] = -math.inf
    out = _credit(inp, "cepo", backend, dtype, lam=0.5, eps_w=0.2).double()
    assert torch.isfinite(out).all()
    m = inp["mask"]
    # A > 0, Δ ≫ 0: 1 + λε; A < 0, Δ ≫ 0: s·Δ ≪ 0 → 1 − λε; A = 0: 0; A > 0, Δ ≪ 0: 1 − λε
    expected = torch.tensor([2.0 * 1.1, -1.5 * 0.9, 0.0, 0.5 * 0.9], dtype=torch.float64)[:, None] * m
    torch.testing.assert_close(out, expected, **_tol(dtype))


# --- λ schedule, config, errors -------------------------------------------------------------------------


def test_linear_decay():
    decay = LinearDecay(0.5, 25)
    assert decay(0) == 0.5 and decay(5) == pytest.approx(0.4) and decay(24) == pytest.approx(0.02)
    assert decay(25) == 0.0 and decay(1000) == 0.0
    assert all(decay(s) >= decay(s + 1) for s in range(30))
    assert LinearDecay(1.0, 0)(0) == 0.0
    config = LossConfig.preset("dapo", credit="cepo")
    assert config.replace(credit_lambda=decay(10)).credit_lambda == pytest.approx(0.3)
    for args, error in [((1.5, 10), ValueError), ((0.5, -1), ValueError), ((0.5, 2.5), TypeError),
                        (("0.5", 10), TypeError)]:
        with pytest.raises(error):
            LinearDecay(*args)
    with pytest.raises(ValueError, match="step"):
        decay(-1)
    with pytest.raises(TypeError, match="step"):
        decay(1.0)


@pytest.mark.parametrize("fields,error,match", [
    (dict(credit="ppo"), ValueError, "credit"),
    (dict(credit="cepo", credit_lambda=1.5), ValueError, "credit_lambda"),
    (dict(credit_lambda=-0.1), ValueError, "credit_lambda"),
    (dict(credit_eps_w=1.0), ValueError, "credit_eps_w"),
    (dict(credit_eps_w=-0.2), ValueError, "credit_eps_w"),
    (dict(credit_lambda="0.5"), TypeError, "credit_lambda"),
    (dict(credit_eps_w=math.nan), ValueError, "credit_eps_w"),
])
def test_config_errors(fields, error, match):
    with pytest.raises(error, match=match):
        LossConfig(**fields)


def test_config_defaults():
    config = LossConfig()
    assert (config.credit, config.credit_lambda, config.credit_eps_w) == (None, 0.5, 0.2)
    assert LossConfig.preset("verl_dapo", credit="rlsd").credit == "rlsd"


def _credit_call(**overrides):
    inp = _inputs()
    args = dict(advantages=inp["advantages"], mask=inp["mask"], pos_logprobs=inp["pos_logprobs"],
                neg_logprobs=inp["neg_logprobs"], backend="torch")
    args.update(overrides)
    return contrastive_credit(args.pop("advantages"), args.pop("mask"), args.pop("pos_logprobs"), **args)


@pytest.mark.parametrize("overrides,error,match", [
    (dict(credit="grpo"), ValueError, "credit"),
    (dict(neg_logprobs=None), ValueError, "neg_logprobs"),
    (dict(base_logprobs=torch.zeros(B, T)), ValueError, "base_logprobs"),
    (dict(credit="rlsd"), ValueError, "base_logprobs"),
    (dict(credit="rlsd", base_logprobs=torch.zeros(B, T)), ValueError, "neg_logprobs"),
    (dict(pos_logprobs=torch.zeros(B, T + 1)), ValueError, "pos_logprobs"),
    (dict(pos_logprobs=torch.zeros(B, T, dtype=torch.int64)), TypeError, "pos_logprobs"),
    (dict(advantages=torch.zeros(B + 1)), ValueError, "advantages"),
    (dict(mask=torch.ones(B * T)), ValueError, "mask"),
    (dict(mask=torch.full((B, T), 0.5)), ValueError, "mask"),
    (dict(credit_lambda=1.5), ValueError, "credit_lambda"),
    (dict(credit_lambda=True), TypeError, "credit_lambda"),
    (dict(credit_eps_w=1.0), ValueError, "credit_eps_w"),
    (dict(backend="cuda"), ValueError, "backend"),
])
def test_credit_errors(overrides, error, match):
    with pytest.raises(error, match=match):
        _credit_call(**overrides)


def test_kernel_backend_rejects_float64():
    inp = _inputs()
    with pytest.raises(TypeError, match="advantages"):
        contrastive_credit(inp["advantages"], inp["mask"], inp["pos_logprobs"].float(),
                           neg_logprobs=inp["neg_logprobs"].float(), backend=KERNEL_BACKEND)


@pytest.mark.parametrize("credit,given,match", [
    ("cepo", dict(), "pos_logprobs"),
    ("cepo", dict(pos=True), "neg_logprobs"),
    ("rlsd", dict(pos=True, neg=True), "neg_logprobs"),
    (None, dict(pos=True), "config.credit is None"),
    (None, dict(neg=True), "config.credit is None"),
])
def test_loss_errors_for_missing_or_stray_teacher_inputs(credit, given, match):
    inp = _inputs()
    teacher = dict(pos_logprobs=inp["pos_logprobs"] if given.get("pos") else None,
                   neg_logprobs=inp["neg_logprobs"] if given.get("neg") else None)
    config = LossConfig(credit=credit)
    with pytest.raises(ValueError, match=match):
        policy_loss(inp["logprobs"], inp["old_logprobs"], inp["advantages"], inp["mask"], config=config,
                    backend="torch", **teacher)
    hidden, weight = torch.randn(B, T, 8), torch.randn(16, 8)
    with pytest.raises(ValueError, match=match):
        FusedPolicyLoss(config, backend="torch")(hidden, weight, torch.zeros(B, T, dtype=torch.int64), inp["mask"],
                                                 inp["advantages"].float(), **teacher)


# --- the credit inside the loss == the loss of the credit -------------------------------------------------


LOSS_CONFIGS = [
    ("dapo", dict(credit="cepo")),
    ("verl_dapo", dict(credit="cepo", credit_lambda=0.8, credit_eps_w=0.3)),
    ("grpo", dict(credit="rlsd", entropy_coef=0.01)),
    ("gspo", dict(credit="rlsd")),
]


def _unfused_credit_args(config, inp, old):
    if config.credit == "cepo":
        return dict(neg_logprobs=inp["neg_logprobs"])
    return dict(base_logprobs=old, credit="rlsd")


@pytest.mark.parametrize("backend,dtype", BACKENDS)
@pytest.mark.parametrize("on_policy", [False, True], ids=["off_policy", "on_policy"])
@pytest.mark.parametrize("name,fields", LOSS_CONFIGS, ids=[f"{n}-{f['credit']}" for n, f in LOSS_CONFIGS])
def test_policy_loss_credit_equals_loss_of_credit(name, fields, on_policy, backend, dtype):
    """policy_loss(config.credit) == policy_loss(advantages=contrastive_credit(...)), value and gradient; for
    RLSD on-policy the base is sg(ℓ)."""
    config = LossConfig.preset(name, **fields)
    inp = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in _inputs(seed=6).items()}
    if name == "gspo":
        inp["old_logprobs"] = inp["logprobs"] + 1e-4 * torch.randn_like(inp["logprobs"])
    old = None if on_policy else inp["old_logprobs"]
    entropy = torch.rand(B, T, dtype=dtype) if config.entropy_coef else None

    fused_logp = inp["logprobs"].clone().requires_grad_()
    fused = policy_loss(fused_logp, old, inp["advantages"], inp["mask"], config=config, entropy=entropy,
                        pos_logprobs=inp["pos_logprobs"],
                        neg_logprobs=inp["neg_logprobs"] if config.credit == "cepo" else None, backend=backend)
    fused.loss.backward()

    credit = contrastive_credit(inp["advantages"], inp["mask"], inp["pos_logprobs"], credit_lambda=config.credit_lambda,
                                credit_eps_w=config.credit_eps_w, backend=backend,
                                **_unfused_credit_args(config, inp, inp["logprobs"] if old is None else old))
    plain_logp = inp["logprobs"].clone().requires_grad_()
    plain = policy_loss(plain_logp, old, credit.to(dtype), inp["mask"], config=config.replace(credit=None),
                        entropy=entropy, backend=backend)
    plain.loss.backward()
    tol = _tol(dtype) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(fused.loss, plain.loss, **tol)
    torch.testing.assert_close(fused_logp.grad, plain_logp.grad, **tol)
    assert list(fused.metrics) == list(plain.metrics)
    for key in plain.metrics:
        torch.testing.assert_close(fused.metrics[key], plain.metrics[key], **tol)

    # and the float64 reference (autograd through the §3–§7 formulas)
    ref_logp = inp["logprobs"].double().clone().requires_grad_()
    ref_loss, _ = reference.policy_loss(
        ref_logp, None if old is None else old.double(), inp["advantages"].double(), inp["mask"], config=config,
        entropy=None if entropy is None else entropy.double(), pos_logprobs=inp["pos_logprobs"].double(),
        neg_logprobs=inp["neg_logprobs"].double())
    ref_loss.backward()
    tol = _tol(dtype) if dtype == torch.float64 else dict(rtol=4e-5, atol=4e-6)
    torch.testing.assert_close(fused.loss.double(), ref_loss.detach(), **tol)
    torch.testing.assert_close(fused_logp.grad.double(), ref_logp.grad, **tol)


def test_credit_changes_the_loss():
    """The credit is really applied: a λ > 0 with Δ ≠ 0 changes the loss and its gradient."""
    inp = _inputs(seed=7)
    logp = inp["logprobs"].requires_grad_()
    with_credit = policy_loss(logp, inp["old_logprobs"], inp["advantages"], inp["mask"],
                              config=LossConfig(credit="cepo", credit_lambda=1.0), pos_logprobs=inp["pos_logprobs"],
                              neg_logprobs=inp["neg_logprobs"], backend="torch").loss
    without = policy_loss(logp, inp["old_logprobs"], inp["advantages"], inp["mask"], config=LossConfig(),
                          backend="torch").loss
    assert abs(float(with_credit.detach() - without.detach())) > 1e-4


D, V = 24, 300


def _fused_batch(dtype, seed):
    g = torch.Generator().manual_seed(seed)
    inp = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in _inputs(seed=seed).items()}
    hidden = torch.randn(B, T, D, generator=g, dtype=torch.float64).to(dtype)
    weight = (0.3 * torch.randn(V, D, generator=g, dtype=torch.float64)).to(dtype)
    targets = torch.randint(0, V, (B, T), generator=g)
    targets[~inp["mask"]] = -5  # never read
    hidden[~inp["mask"]] = math.nan
    return inp, hidden, weight, targets


@pytest.mark.parametrize("backend,dtype", BACKENDS)
@pytest.mark.parametrize("name,fields", LOSS_CONFIGS[:3], ids=[f"{n}-{f['credit']}" for n, f in LOSS_CONFIGS[:3]])
def test_fused_policy_loss_credit_equals_unfused(name, fields, backend, dtype):
    """FusedPolicyLoss with the credit == policy_loss(token_logprobs(...), advantages=contrastive_credit(...)),
    gradients w.r.t. hidden and weight included."""
    config = LossConfig.preset(name, **fields)
    inp, hidden0, weight0, targets = _fused_batch(dtype, seed=8)
    teacher = dict(pos_logprobs=inp["pos_logprobs"],
                   neg_logprobs=inp["neg_logprobs"] if config.credit == "cepo" else None)

    hidden, weight = hidden0.clone().requires_grad_(), weight0.clone().requires_grad_()
    fused = FusedPolicyLoss(config, backend=backend)(hidden, weight, targets, inp["mask"], inp["advantages"],
                                                     old_logprobs=inp["old_logprobs"], **teacher)
    fused.loss.backward()

    credit = contrastive_credit(inp["advantages"], inp["mask"], inp["pos_logprobs"], credit_lambda=config.credit_lambda,
                                credit_eps_w=config.credit_eps_w, backend=backend,
                                **_unfused_credit_args(config, inp, inp["old_logprobs"]))
    h2, w2 = hidden0.clone().requires_grad_(), weight0.clone().requires_grad_()
    lp = rlloss.token_logprobs(h2, w2, torch.where(inp["mask"], targets, -100), return_entropy=True, backend=backend)
    plain = policy_loss(lp.logprobs, inp["old_logprobs"], credit.to(dtype), inp["mask"],
                        config=config.replace(credit=None), entropy=lp.entropy, backend=backend)
    plain.loss.backward()
    tol = dict(rtol=1e-10, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(fused.loss, plain.loss, **tol)
    torch.testing.assert_close(hidden.grad.nan_to_num(0.0), h2.grad.nan_to_num(0.0), **tol)
    torch.testing.assert_close(weight.grad, w2.grad, **tol)
    assert (hidden.grad[~inp["mask"]] == 0).all()


def test_fused_reference_backend_with_credit():
    config = LossConfig.preset("dapo", credit="cepo")
    inp, hidden, weight, targets = _fused_batch(torch.float64, seed=9)
    out = {}
    for backend in ("reference", "torch"):
        h = hidden.clone().requires_grad_()
        loss = FusedPolicyLoss(config, backend=backend)(h, weight, targets, inp["mask"], inp["advantages"],
                                                        old_logprobs=inp["old_logprobs"],
                                                        pos_logprobs=inp["pos_logprobs"],
                                                        neg_logprobs=inp["neg_logprobs"]).loss
        loss.backward()
        out[backend] = (loss.detach(), h.grad.nan_to_num(0.0))
    torch.testing.assert_close(out["torch"][0], out["reference"][0], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(out["torch"][1], out["reference"][1], rtol=1e-9, atol=1e-12)


# --- build_teacher_inputs ---------------------------------------------------------------------------------


def _ids(*values):
    return torch.tensor(values, dtype=torch.int64)


def _check_layout(ti, prompts, completions, group_of, answers_of, prefix=(), suffix=()):
    """Every row is [prompt | prefix | answer | suffix | completion], right-padded, and position p of
    logprob_positions holds the token just before the completion token it predicts."""
    R, L = ti.input_ids.shape
    assert ti.attention_mask.shape == ti.position_ids.shape == (R, L)
    assert torch.equal(ti.position_ids, torch.arange(L).expand(R, L))
    for k in range(R):
        i = int(ti.rollout[k])
        answer = answers_of(i, bool(ti.positive[k]))
        context = torch.cat([prompts[group_of[i]], _ids(*prefix), answer, _ids(*suffix), completions[i]])
        n = context.numel()
        assert torch.equal(ti.input_ids[k, :n], context)
        assert (ti.attention_mask[k, :n] == 1).all() and (ti.attention_mask[k, n:] == 0).all()
        c = completions[i].numel()
        assert torch.equal(ti.targets[k, :c], completions[i]) and (ti.targets[k, c:] == ti.ignore_index).all()
        start = n - c
        assert torch.equal(ti.logprob_positions[k, :c], torch.arange(start - 1, start - 1 + c))
        assert torch.equal(ti.input_ids[k, ti.logprob_positions[k, :c] + 1], completions[i])


def test_builder_mixed_group_with_ties_and_variable_lengths():
    prompts = [_ids(11, 12, 13), _ids(14)]
    completions = [_ids(20, 21), _ids(22), _ids(23, 24, 25), _ids(26, 27), _ids(30, 31, 32, 33), _ids(34)]
    rewards = [1.0, 0.0, 0.2, 0.0, 0.9, 0.3]
    answers = [_ids(50), _ids(51, 52)]
    wrong = [_ids(50), _ids(60), _ids(61, 62), _ids(63), _ids(51, 52), _ids(64, 65, 66)]
    ti = build_teacher_inputs(prompts, completions, rewards, [4, 2], answers, wrong,
                              answer_prefix_ids=_ids(7), answer_suffix_ids=_ids(8, 9))
    # group 0: rejected 1 (0.0), 2 (0.2), 3 (0.0): lowest 0.0, tie → first in batch order: rollout 1
    # group 1: rejected 5 (0.3)
    assert ti.negative_source.tolist() == [1, 5]
    assert ti.rollout.tolist() == [0, 1, 2, 3, 4, 5] * 2
    assert ti.positive.tolist() == [True] * 6 + [False] * 6
    assert not ti.skipped.any() and not ti.rlsd.any() and ti.num_rows == 12
    assert ti.targets.shape == (12, 4)
    group_of = [0, 0, 0, 0, 1, 1]
    negative = {0: _ids(60), 1: _ids(64, 65, 66)}
    _check_layout(ti, prompts, completions, group_of,
                  lambda i, pos: answers[group_of[i]] if pos else negative[group_of[i]], prefix=(7,), suffix=(8, 9))
    assert ti.input_ids.shape[1] == 1 + 1 + 3 + 2 + 4  # the longest context: rollout 4 with r⁻ of group 1
    assert torch.equal(ti.input_ids[0], _ids(11, 12, 13, 7, 50, 8, 9, 20, 21, 0, 0))


def test_builder_all_correct_all_wrong_and_fallbacks():
    prompts = [_ids(1, 2), _ids(3), _ids(4, 5), _ids(6)]
    completions = [_ids(10 + i, 40 + i) for i in range(9)]
    rewards = [1.0, 1.0,        # group 0: all correct, equal: A = 0 → skipped
               1.0, 0.8, 0.6,   # group 1: all accepted, different: no rejected rollout → fallback
               0.0, 0.0,        # group 2: all wrong, equal → skipped
               0.1, 0.4]        # group 3: all wrong, different: r⁻ = rollout 7's answer
    answers = [_ids(90), _ids(91), _ids(92), _ids(93)]
    wrong = [None, None, _ids(91), None, _ids(70), _ids(71), _ids(72), _ids(73), _ids(74)]
    sizes = [2, 3, 2, 2]
    ti = build_teacher_inputs(prompts, completions, rewards, sizes, answers, wrong)
    assert ti.skipped.tolist() == [True] * 7 + [False] * 2
    assert ti.negative_source.tolist() == [-1, -1, -1, 7]
    assert ti.rollout.tolist() == [7, 8, 7, 8] and ti.positive.tolist() == [True, True, False, False]

    ti = build_teacher_inputs(prompts, completions, rewards, sizes, answers, wrong, fallback="rlsd")
    assert ti.skipped.tolist() == [True, True, False, False, False, True, True, False, False]
    assert ti.rlsd.tolist() == [False, False, True, True, True, False, False, False, False]
    assert ti.rollout.tolist() == [2, 3, 4, 7, 8, 7, 8]
    group_of = [0, 0, 1, 1, 1, 2, 2, 3, 3]
    _check_layout(ti, prompts, completions, group_of, lambda i, pos: answers[group_of[i]] if pos else _ids(73))

    # pure RLSD: positive rows only, wrong answers unused
    ti = build_teacher_inputs(prompts, completions, rewards, sizes, answers, None, credit="rlsd")
    assert ti.positive.all() and ti.rollout.tolist() == [2, 3, 4, 7, 8]
    assert ti.rlsd.tolist() == (~ti.skipped).tolist()


def test_builder_candidates_need_a_usable_wrong_answer():
    """The lowest-scoring rejected rollout without an answer (None, empty, or r⁺ itself) is passed over."""
    prompts = [_ids(1)]
    completions = [_ids(10), _ids(11), _ids(12), _ids(13), _ids(14)]
    rewards = [1.0, 0.0, 0.0, 0.1, 0.2]
    wrong = [_ids(5), None, _ids(9), torch.zeros(0, dtype=torch.int64), _ids(6)]
    ti = build_teacher_inputs(prompts, completions, rewards, [5], [_ids(9)], wrong)
    assert ti.negative_source.tolist() == [4]  # 1: None, 2: equals r⁺, 3: empty
    neg_rows = ti.input_ids[~ti.positive]
    assert (neg_rows[:, 1] == 6).all()
    # with a threshold of 0.15, rollout 4 (0.2) is not rejected: no usable wrong answer → fallback (grpo)
    ti = build_teacher_inputs(prompts, completions, rewards, [5], [_ids(9)], wrong, reject_below=0.15)
    assert ti.skipped.all() and ti.num_rows == 0 and ti.negative_source.tolist() == [-1]


def test_builder_advantages_skip_rollouts_and_split():
    prompts = [_ids(1, 2)]
    completions = [_ids(10, 11, 12), _ids(13), _ids(14, 15)]
    rewards = [1.0, 0.5, 0.0]
    advantages = torch.tensor([1.0, 0.0, -1.0])
    ti = build_teacher_inputs(prompts, completions, rewards, [3], [_ids(9)], [None, None, _ids(8)],
                              advantages=advantages, completion_length=5)
    assert ti.skipped.tolist() == [False, True, False] and ti.rollout.tolist() == [0, 2, 0, 2]
    assert ti.targets.shape == (4, 5)
    logprobs = -torch.rand(4, 5)
    pos, neg = ti.split(logprobs)
    assert pos.shape == neg.shape == (3, 5)
    assert torch.equal(pos[0], logprobs[0]) and torch.equal(pos[2], logprobs[1])
    assert torch.equal(neg[0], logprobs[2]) and torch.equal(neg[2], logprobs[3])
    assert (pos[1] == 0).all() and (neg[1] == 0).all()
    with pytest.raises(ValueError, match="logprobs"):
        ti.split(logprobs[:3])

    ti = build_teacher_inputs(prompts, completions, rewards, [3], [_ids(9)], None, credit="rlsd")
    base = -torch.rand(3, 3)
    with pytest.raises(ValueError, match="base_logprobs"):
        ti.split(torch.zeros(3, 3))
    pos, neg = ti.split(-torch.rand(3, 3), base_logprobs=base)
    assert torch.equal(neg, base)


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(group_sizes=[2]), ValueError, "group_sizes"),
    (dict(prompt_ids=[_ids(1)] * 2), ValueError, "prompt_ids"),
    (dict(completion_ids=[_ids(1), _ids(2).int(), _ids(3)]), TypeError, "completion_ids"),
    (dict(answer_ids=[torch.zeros(0, dtype=torch.int64)]), ValueError, "answer_ids"),
    (dict(wrong_answer_ids=None), ValueError, "wrong_answer_ids"),
    (dict(wrong_answer_ids=[None, None]), ValueError, "wrong_answer_ids"),
    (dict(rewards=[1.0, math.nan, 0.0]), ValueError, "rewards"),
    (dict(credit="ppo"), ValueError, "credit"),
    (dict(fallback="skip"), ValueError, "fallback"),
    (dict(completion_length=1), ValueError, "completion_length"),
    (dict(advantages=torch.zeros(2)), ValueError, "advantages"),
    (dict(answer_prefix_ids=[1]), TypeError, "answer_prefix_ids"),
])
def test_builder_errors(kwargs, error, match):
    args = dict(prompt_ids=[_ids(1)], completion_ids=[_ids(1), _ids(2), _ids(3, 4)], rewards=[1.0, 0.0, 0.0],
                group_sizes=[3], answer_ids=[_ids(5)], wrong_answer_ids=[None, _ids(6), None])
    args.update(kwargs)
    with pytest.raises(error, match=match):
        build_teacher_inputs(**args)


# --- the teacher pass: forward only --------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["torch", KERNEL_BACKEND])
def test_teacher_logprobs_are_forward_only(backend):
    """token_logprobs under no_grad (or on inputs that need no gradient) builds no autograd node and saves
    nothing, although the lm_head weight is a Parameter: the teacher pass is one model forward + the streaming
    kernel, and nothing of it outlives the call but the [N] log-probs."""
    weight = torch.nn.Parameter(torch.randn(V, D))
    hidden = torch.randn(B, T, D, requires_grad=True)
    targets = torch.randint(0, V, (B, T))
    packed = []

    def pack(x):
        packed.append(x.shape)
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        with torch.no_grad():
            out = rlloss.token_logprobs(hidden, weight, targets, return_entropy=True, backend=backend)
        detached = rlloss.token_logprobs(hidden.detach(), weight.detach(), targets, backend=backend)
        assert packed == []
        assert out.logprobs.grad_fn is None and not out.logprobs.requires_grad and out.entropy.grad_fn is None
        assert detached.logprobs.grad_fn is None
        graph = rlloss.token_logprobs(hidden, weight, targets, backend=backend)  # the training pass saves
        assert graph.logprobs.grad_fn is not None and len(packed) > 0
    torch.testing.assert_close(out.logprobs, graph.logprobs.detach())


# --- a tiny random transformers model end to end -------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_llama():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                      initializer_range=0.2)
    return transformers.LlamaForCausalLM(config).eval()


def _groups():
    """Three groups: mixed (CEPO), all accepted with different scores (no wrong answer), all equal (skipped)."""
    g = torch.Generator().manual_seed(3)

    def ids(n):
        return torch.randint(3, 128, (n,), generator=g)

    prompts = [ids(5), ids(3), ids(4)]
    sizes = [3, 2, 2]
    lengths = [6, 3, 5, 4, 7, 2, 3]
    completions = [ids(n) for n in lengths]
    rewards = torch.tensor([1.0, 0.0, 0.3, 1.0, 0.7, 0.0, 0.0])
    answers = [ids(2), ids(1), ids(3)]
    wrong = [None, ids(2), ids(1), None, None, ids(2), None]
    return prompts, completions, rewards, sizes, answers, wrong


def _policy_batch(prompts, completions, sizes):
    """[prompt | completion] per rollout, right-padded, and the positions predicting each completion token."""
    group_of = [g for g, n in enumerate(sizes) for _ in range(n)]
    rows = [torch.cat([prompts[group_of[i]], c]) for i, c in enumerate(completions)]
    L, T_ = max(r.numel() for r in rows), max(c.numel() for c in completions)
    input_ids = torch.zeros(len(rows), L, dtype=torch.int64)
    attention = torch.zeros(len(rows), L, dtype=torch.int64)
    positions = torch.zeros(len(rows), T_, dtype=torch.int64)
    targets = torch.zeros(len(rows), T_, dtype=torch.int64)
    mask = torch.zeros(len(rows), T_, dtype=torch.bool)
    for i, (row, c) in enumerate(zip(rows, completions)):
        input_ids[i, : row.numel()], attention[i, : row.numel()] = row, 1
        start = row.numel() - c.numel()
        positions[i, : c.numel()] = torch.arange(start - 1, row.numel() - 1)
        targets[i, : c.numel()], mask[i, : c.numel()] = c, True
    return input_ids, attention, positions, targets, mask


def _teacher_logprobs(model, teacher, backend):
    """The teacher pass: one forward of the decoder (no lm_head, no logits) + the streaming log-prob kernel."""
    with torch.no_grad():
        hidden = model.model(**teacher.model_inputs(), use_cache=False).last_hidden_state
        return rlloss.token_logprobs(teacher.gather_hidden(hidden), model.lm_head.weight, teacher.targets,
                                     backend=backend).logprobs


def test_teacher_pass_matches_separate_full_logits(tiny_llama):
    """Batched, right-padded teacher contexts read at logprob_positions == each context run alone through the
    full model (logits, log_softmax, gather); and the batched pass never calls the lm_head."""
    model = tiny_llama.double()
    prompts, completions, rewards, sizes, answers, wrong = _groups()
    teacher = build_teacher_inputs(prompts, completions, rewards, sizes, answers, wrong, fallback="rlsd")
    assert teacher.num_rows == 3 + 3 + 2  # CEPO group: 3 + 3 rows; fallback group: 2 positive rows; 1 skipped
    calls = []
    hook = model.lm_head.register_forward_hook(lambda *args: calls.append(1))
    try:
        batched = _teacher_logprobs(model, teacher, "torch")
    finally:
        hook.remove()
    assert calls == []
    for k in range(teacher.num_rows):
        n = int(teacher.attention_mask[k].sum())
        c = int((teacher.targets[k] != teacher.ignore_index).sum())
        with torch.no_grad():
            logits = model(input_ids=teacher.input_ids[k : k + 1, :n]).logits[0]
        expected = torch.log_softmax(logits[n - c - 1 : n - 1], -1).gather(1, teacher.targets[k, :c, None])[:, 0]
        torch.testing.assert_close(batched[k, :c], expected, rtol=1e-10, atol=1e-12)
        assert (batched[k, c:] == 0).all()
    model.float()


@pytest.mark.parametrize("backend,dtype", BACKENDS)
def test_tiny_llama_end_to_end(tiny_llama, backend, dtype):
    """Teacher passes → credit → FusedPolicyLoss → backward: gradients reach every model parameter and equal
    the unfused path (token_logprobs → contrastive_credit → policy_loss)."""
    model = tiny_llama.to(dtype)
    prompts, completions, rewards, sizes, answers, wrong = _groups()
    advantages = rlloss.group_advantages(rewards.to(dtype), group_sizes=sizes)
    teacher = build_teacher_inputs(prompts, completions, rewards, sizes, answers, wrong, fallback="rlsd",
                                   advantages=advantages)
    input_ids, attention, positions, targets, mask = _policy_batch(prompts, completions, sizes)

    def policy_hidden():
        hidden = model.model(input_ids=input_ids, attention_mask=attention, use_cache=False).last_hidden_state
        return hidden.gather(1, positions[..., None].expand(-1, -1, hidden.shape[-1]))

    with torch.no_grad():  # the sampling policy's log-probs (on-policy: the same weights)
        old = rlloss.token_logprobs(policy_hidden(), model.lm_head.weight, torch.where(mask, targets, -100),
                                    backend=backend).logprobs.to(dtype)
    pos, neg = teacher.split(_teacher_logprobs(model, teacher, backend).to(dtype), base_logprobs=old)
    assert (pos[teacher.skipped] == 0).all() and torch.equal(neg[teacher.rlsd], old[teacher.rlsd])

    config = LossConfig.preset("verl_dapo", credit="cepo", credit_lambda=LinearDecay(0.5, 25)(3))
    model.zero_grad()
    out = FusedPolicyLoss(config, backend=backend)(policy_hidden(), model.lm_head.weight, targets, mask, advantages,
                                                   old_logprobs=old, pos_logprobs=pos, neg_logprobs=neg)
    out.loss.backward()
    fused_grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    for name, grad in fused_grads.items():
        assert torch.isfinite(grad).all(), name
        assert grad.abs().sum() > 0, name

    model.zero_grad()
    credit = contrastive_credit(advantages, mask, pos, neg_logprobs=neg, credit_lambda=config.credit_lambda,
                                credit_eps_w=config.credit_eps_w, backend=backend)
    logprobs = rlloss.token_logprobs(policy_hidden(), model.lm_head.weight, torch.where(mask, targets, -100),
                                     backend=backend).logprobs
    plain = policy_loss(logprobs, old, credit.to(dtype), mask, config=config.replace(credit=None), backend=backend)
    plain.loss.backward()
    tol = dict(rtol=1e-9, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(out.loss, plain.loss, **tol)
    for name, p in model.named_parameters():
        torch.testing.assert_close(fused_grads[name], p.grad, **tol, msg=name)
    # the credit mattered: with λ = 0 the gradient differs
    model.zero_grad()
    FusedPolicyLoss(config.replace(credit_lambda=0.0), backend=backend)(
        policy_hidden(), model.lm_head.weight, targets, mask, advantages, old_logprobs=old, pos_logprobs=pos,
        neg_logprobs=neg).loss.backward()
    assert not torch.allclose(model.lm_head.weight.grad, fused_grads["lm_head.weight"])
    model.float()


# --- GPU: realistic sizes ----------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("credit", ["cepo", "rlsd"])
def test_gpu_realistic_sizes(credit, dtype):
    inp = _inputs(64, 2049, seed=10)
    config = LossConfig.preset("verl_dapo", credit=credit)
    inp["advantages"] = inp["advantages"].float().double()
    cuda = {k: (v.to(torch.float32 if k == "advantages" else dtype) if v.is_floating_point() else v).cuda()
            for k, v in inp.items()}
    teacher = dict(pos_logprobs=cuda["pos_logprobs"], neg_logprobs=cuda["neg_logprobs"] if credit == "cepo" else None)
    logp = cuda["logprobs"].clone().requires_grad_()
    out = policy_loss(logp, cuda["old_logprobs"], cuda["advantages"], cuda["mask"], config=config, backend="triton",
                      **teacher)
    out.loss.backward()
    rounded = {k: (v.to(dtype).double() if v.is_floating_point() and k != "advantages" else v) for k, v in inp.items()}
    ref_logp = rounded["logprobs"].clone().requires_grad_()
    ref_loss, _ = reference.policy_loss(ref_logp, rounded["old_logprobs"], rounded["advantages"], inp["mask"],
                                        config=config, pos_logprobs=rounded["pos_logprobs"],
                                        neg_logprobs=rounded["neg_logprobs"])
    ref_loss.backward()
    torch.testing.assert_close(out.loss.double().cpu(), ref_loss.detach(), rtol=1e-4, atol=1e-6)
    scale = ref_logp.grad.abs().max()
    torch.testing.assert_close(logp.grad.double().cpu() / scale, ref_logp.grad / scale, rtol=0, atol=1e-2)
    if dtype == torch.float32:  # the standalone kernel on CUDA tensors
        mask = inp["mask"].cuda()
        args = {k: inp[k].float().cuda() for k in ("advantages", "pos_logprobs", "neg_logprobs", "old_logprobs")}
        other = {"neg_logprobs": args["neg_logprobs"]} if credit == "cepo" else {"base_logprobs": args["old_logprobs"]}
        got = contrastive_credit(args["advantages"], mask, args["pos_logprobs"], mode=credit, backend="triton", **other)
        torch.testing.assert_close(got.double().cpu(), _reference_credit(inp, credit, torch.float32), **_tol(torch.float32))
