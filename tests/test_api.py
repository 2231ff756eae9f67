"""The public signatures (issue #15): fused_policy_loss is policy_loss's order with (hidden, weight, targets) for
logprobs, FusedPolicyLoss a thin module over it that keeps its own forward order, temperature and soft-cap live
together, the credit functions take LossConfig's names, and every renamed keyword still works for one release
with exactly one DeprecationWarning and the same result."""
import inspect
import warnings

import pytest
import torch

import rlloss
from rlloss import FusedPolicyLoss, LossConfig, contrastive_credit, fused_policy_loss, policy_loss, token_logprobs
from rlloss import _compat
from rlloss import credit as credit_module
from rlloss.teacher import build_teacher_inputs

B, T, D, V = 3, 7, 8, 29  # T and V not multiples of any block


def _batch(seed=0, per_token_adv=False):
    g = torch.Generator().manual_seed(seed)
    f64 = dict(generator=g, dtype=torch.float64)
    mask = torch.rand(B, T, generator=g) > 0.3
    mask[0, 0] = True
    targets = torch.randint(0, V, (B, T), generator=g)
    targets[~mask] = -7  # never read
    return dict(
        hidden=torch.randn(B, T, D, **f64), weight=0.3 * torch.randn(V, D, **f64), bias=0.1 * torch.randn(V, **f64),
        targets=targets, mask=mask,
        advantages=torch.randn((B, T) if per_token_adv else (B,), **f64),
        old_logprobs=-3.0 + 0.2 * torch.randn(B, T, **f64), ref_logprobs=-3.0 + 0.2 * torch.randn(B, T, **f64),
    )


def _leaves(batch):
    return [batch[k].clone().requires_grad_() for k in ("hidden", "weight", "bias")]


def _grads(loss, leaves):
    return torch.autograd.grad(loss, leaves)


CONFIGS = {
    "dapo": LossConfig.preset("dapo"),
    "grpo_kl_entropy": LossConfig.preset("grpo", beta=0.04, entropy_coef=0.01),
    "gspo": LossConfig.preset("gspo"),  # the two-pass route
}


@pytest.mark.parametrize("backend", ["torch", "reference"])
@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("off_policy", [True, False], ids=["off_policy", "on_policy"])
def test_function_module_and_composition_agree(name, off_policy, backend):
    """fused_policy_loss == FusedPolicyLoss == policy_loss(token_logprobs(...)): value, metrics and the gradients
    w.r.t. hidden, weight and bias, with a temperature and a soft-cap."""
    config = CONFIGS[name]
    batch = _batch(seed=1, per_token_adv=name == "dapo")
    old = batch["old_logprobs"] if off_policy else None
    options = dict(temperature=0.7, softcap=5.0, backend=backend)
    extra = dict(ref_logprobs=batch["ref_logprobs"])

    leaves = _leaves(batch)
    fn = fused_policy_loss(leaves[0], leaves[1], batch["targets"], old, batch["advantages"], batch["mask"],
                           config=config, bias=leaves[2], **options, **extra)
    fn_grads = _grads(fn.loss, leaves)

    leaves = _leaves(batch)
    module = FusedPolicyLoss(config, **options)
    mod = module(leaves[0], leaves[1], batch["targets"], batch["mask"], batch["advantages"], bias=leaves[2],
                 old_logprobs=old, **extra)
    mod_grads = _grads(mod.loss, leaves)

    leaves = _leaves(batch)
    counted = torch.where(batch["mask"], batch["targets"], -100)
    lp = token_logprobs(leaves[0], leaves[1], counted, bias=leaves[2], return_entropy=True, **options)
    composed = policy_loss(lp.logprobs, old, batch["advantages"], batch["mask"], config=config, entropy=lp.entropy,
                           backend=backend, **extra)
    composed_grads = _grads(composed.loss, leaves)

    assert torch.equal(fn.loss, mod.loss)
    for a, b in zip(fn_grads, mod_grads):
        assert torch.equal(a, b)
    assert fn.metrics.keys() == mod.metrics.keys() == composed.metrics.keys()
    tol = dict(rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(fn.loss, composed.loss.to(fn.loss.dtype), **tol)
    for key in fn.metrics:
        torch.testing.assert_close(fn.metrics[key], composed.metrics[key].to(fn.metrics[key].dtype), **tol)
    for a, b in zip(fn_grads, composed_grads):
        torch.testing.assert_close(a, b, **tol)


def test_fused_policy_loss_takes_policy_loss_order():
    """The positional parameters of fused_policy_loss are policy_loss's with logprobs → (hidden, weight, targets),
    its keyword options include every keyword of policy_loss (but entropy, which it computes) and every option of
    FusedPolicyLoss; the module's forward keeps its own order."""
    fused = inspect.signature(fused_policy_loss).parameters
    plain = inspect.signature(policy_loss).parameters

    def positional(params):
        return [n for n, p in params.items() if p.kind == p.POSITIONAL_OR_KEYWORD]

    def keywords(params):
        return {n for n, p in params.items() if p.kind == p.KEYWORD_ONLY}

    assert positional(fused) == ["hidden", "weight", "targets"] + positional(plain)[1:]
    assert keywords(plain) - {"entropy"} <= keywords(fused)
    ctor = set(inspect.signature(FusedPolicyLoss.__init__).parameters) - {"self", "config"}
    assert ctor <= keywords(fused) and {"temperature", "softcap"} <= ctor
    assert positional(inspect.signature(FusedPolicyLoss.forward).parameters) == [
        "self", "hidden", "weight", "targets", "mask", "advantages"]


def test_module_forward_order_is_unchanged():
    """mask and advantages both [B, T]: the module's 4th and 5th arguments are mask and advantages, the function's
    5th and 6th advantages and mask (a swap would be silent, so both orders are pinned here)."""
    batch = _batch(seed=2, per_token_adv=True)
    config = CONFIGS["dapo"]
    mask, adv = batch["mask"].double(), batch["advantages"]  # a 0/1 float mask: the same dtype as advantages
    fn = fused_policy_loss(batch["hidden"], batch["weight"], batch["targets"], None, adv, mask, config=config,
                           backend="torch")
    mod = FusedPolicyLoss(config, backend="torch")(batch["hidden"], batch["weight"], batch["targets"], mask, adv)
    assert torch.equal(fn.loss, mod.loss)
    with pytest.raises(ValueError, match="mask must hold only 0 and 1"):  # advantages in the mask's place
        FusedPolicyLoss(config, backend="torch")(batch["hidden"], batch["weight"], batch["targets"], adv, mask)


def test_temperature_and_softcap_live_together():
    module = FusedPolicyLoss(LossConfig(), temperature=0.5, softcap=3.0)
    assert (module.temperature, module.softcap) == (0.5, 3.0)
    assert "temperature=0.5, softcap=3.0" in repr(module)
    fn_params = inspect.signature(fused_policy_loss).parameters
    assert fn_params["temperature"].kind == fn_params["softcap"].kind == inspect.Parameter.KEYWORD_ONLY
    with pytest.raises(ValueError, match="temperature must be a finite number > 0"):
        FusedPolicyLoss(LossConfig(), temperature=0.0)


def test_forward_temperature_is_deprecated_and_still_works():
    batch = _batch(seed=3)
    config = CONFIGS["grpo_kl_entropy"]
    args = (batch["hidden"], batch["weight"], batch["targets"], batch["mask"], batch["advantages"])
    kw = dict(old_logprobs=batch["old_logprobs"], ref_logprobs=batch["ref_logprobs"])
    want = FusedPolicyLoss(config, temperature=0.6, backend="torch")(*args, **kw)
    with pytest.warns(DeprecationWarning) as record:
        got = FusedPolicyLoss(config, temperature=2.0, backend="torch")(*args, temperature=0.6, **kw)
    assert len(record) == 1
    message = str(record[0].message)
    assert "FusedPolicyLoss(config, temperature=...)" in message and "next release" in message
    assert record[0].filename == __file__  # attributed to the caller, not to torch's Module.__call__
    assert torch.equal(got.loss, want.loss)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the new spelling warns nothing
        FusedPolicyLoss(config, temperature=0.6, backend="torch")(*args, **kw)


# --- credit names -------------------------------------------------------------------------------------------


def _credit_inputs(seed=4):
    g = torch.Generator().manual_seed(seed)
    return dict(advantages=torch.randn(B, generator=g), mask=torch.rand(B, T, generator=g) > 0.2,
                pos_logprobs=-torch.rand(B, T, generator=g), neg_logprobs=-torch.rand(B, T, generator=g))


def test_credit_takes_the_config_names():
    params = inspect.signature(contrastive_credit).parameters
    assert {"credit", "credit_lambda", "credit_eps_w"} <= set(params)
    assert not {"lam", "eps_w", "mode"} & set(params)
    defaults = LossConfig()
    assert params["credit_lambda"].default == defaults.credit_lambda
    assert params["credit_eps_w"].default == defaults.credit_eps_w
    assert "mode" not in inspect.signature(build_teacher_inputs).parameters


@pytest.mark.parametrize("old,new", [
    (dict(lam=0.3), dict(credit_lambda=0.3)),
    (dict(eps_w=0.1), dict(credit_eps_w=0.1)),
    (dict(mode="cepo"), dict(credit="cepo")),
    (dict(lam=0.9, eps_w=0.4, mode="cepo"), dict(credit_lambda=0.9, credit_eps_w=0.4, credit="cepo")),
])
def test_old_credit_keywords_warn_once_and_agree(old, new):
    inp = _credit_inputs()
    args = (inp["advantages"], inp["mask"], inp["pos_logprobs"])
    want = contrastive_credit(*args, neg_logprobs=inp["neg_logprobs"], backend="torch", **new)
    with pytest.warns(DeprecationWarning) as record:
        got = contrastive_credit(*args, neg_logprobs=inp["neg_logprobs"], backend="torch", **old)
    assert len(record) == 1
    message = str(record[0].message)
    for name in old:
        assert f"{name}= is now {credit_module.contrastive_credit.deprecated_keywords[name]}=" in message
    assert record[0].filename == __file__
    assert torch.equal(got, want)


def test_old_and_new_credit_keyword_together_is_an_error():
    inp = _credit_inputs()
    with pytest.raises(TypeError, match="both lam= .deprecated. and credit_lambda="):
        contrastive_credit(inp["advantages"], inp["mask"], inp["pos_logprobs"], neg_logprobs=inp["neg_logprobs"],
                           lam=0.5, credit_lambda=0.5)


def test_teacher_builder_mode_keyword_warns_once_and_agrees():
    prompts = [torch.tensor([1, 2, 3])]
    completions = [torch.tensor([4, 5]), torch.tensor([6])]
    args = (prompts, completions, [1.0, 0.0], [2], [torch.tensor([9])], None)
    want = build_teacher_inputs(*args, credit="rlsd")
    with pytest.warns(DeprecationWarning, match=r"mode= is now credit=") as record:
        got = build_teacher_inputs(*args, mode="rlsd")
    assert len(record) == 1
    assert torch.equal(got.input_ids, want.input_ids) and torch.equal(got.rlsd, want.rlsd)


def test_credit_parameters_are_checked_in_one_place(monkeypatch):
    """LossConfig and contrastive_credit both validate λ and ε_w through rlloss.credit.check_credit_params, and
    name the argument as the caller spells it."""
    calls = []
    original = credit_module.check_credit_params

    def spy(*args, **kwargs):
        calls.append(kwargs.get("where", ""))
        return original(*args, **kwargs)

    monkeypatch.setattr(credit_module, "check_credit_params", spy)
    LossConfig(credit="cepo", credit_lambda=0.2)
    inp = _credit_inputs()
    contrastive_credit(inp["advantages"], inp["mask"], inp["pos_logprobs"], neg_logprobs=inp["neg_logprobs"],
                       backend="torch")
    assert calls == ["LossConfig.", ""]
    monkeypatch.undo()
    with pytest.raises(ValueError, match=r"^LossConfig\.credit_lambda must lie in \[0, 1\]"):
        LossConfig(credit_lambda=1.5)
    with pytest.raises(ValueError, match=r"^credit_eps_w must lie in \[0, 1\)"):
        contrastive_credit(inp["advantages"], inp["mask"], inp["pos_logprobs"], neg_logprobs=inp["neg_logprobs"],
                           credit_eps_w=1.0)


# --- the shim helper ---------------------------------------------------------------------------------------


def test_renamed_keywords_helper():
    @_compat.renamed_keywords(old="new")
    def f(x, *, new=1):
        """doc"""
        return x + new

    assert f.__doc__ == "doc" and list(inspect.signature(f).parameters) == ["x", "new"]
    assert f.deprecated_keywords == {"old": "new"}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert f(1, new=2) == 3
    with pytest.warns(DeprecationWarning, match=r"f\(\): old= is now new=; the old name will be removed") as rec:
        assert f(1, old=2) == 3
    assert len(rec) == 1 and rec[0].filename == __file__
    with pytest.raises(TypeError, match="both old="):
        f(1, old=2, new=2)


def test_exports():
    assert rlloss.fused_policy_loss is fused_policy_loss
    assert "fused_policy_loss" in rlloss.__all__
