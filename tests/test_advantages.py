"""group_advantages (docs/math.md §2): every mode on the torch and kernel backends against the float64
reference, the exact-zero guarantees, exactness at any reward magnitude (issue #11), check_inputs=False
(no host read, torch.compile), the trainers' formulas — TRL's, and verl's estimators transcribed from
verl/trainer/ppo/core_algos.py — properties, and the input errors."""
from collections import defaultdict

import pytest
import torch
from conftest import HAS_CUDA, KERNEL_BACKEND
from hypothesis import given, settings
from hypothesis import strategies as st

import rlloss
from rlloss import reference
from rlloss.advantages import ALL_MODES, default_eps

BACKENDS = ["torch", KERNEL_BACKEND]
DEVICE = "cuda" if HAS_CUDA else "cpu"
ORDER_MODES = ("median", "median_mad", "rank_gaussian")
LENGTH_MODES = ("opo", "reinforce_plus_plus", "reinforce_plus_plus_baseline")
WHITENED_MODES = ("reinforce_plus_plus", "reinforce_plus_plus_baseline")
VERL_SINGLETON_MODES = ("grpo", "no_std", "rloo", "gpg", "opo", "reinforce_plus_plus_baseline")
# Modes in which a group of equal rewards gives exactly 0 (the whitened ones shift it by the batch mean).
ZERO_FOR_CONSTANT_GROUPS = tuple(m for m in ALL_MODES if m not in WHITENED_MODES + ("remax",))


def _rewards(n: int, dtype=torch.float32, ties: bool = True) -> torch.Tensor:
    """Fresh random rewards; with ties, a third of them come from a small set of repeated values."""
    r = torch.randn(n, dtype=torch.float64) * 2 + 0.5
    if ties:
        repeated = torch.rand(n) < 1 / 3
        r[repeated] = torch.randint(-2, 3, (int(repeated.sum()),), dtype=torch.float64) * 0.75
    return r.to(dtype).to(DEVICE)


def _extra(mode: str, n: int, dtype=torch.float32) -> dict:
    """The inputs a mode needs besides rewards and groups: token counts (some 0) or baselines."""
    if mode in LENGTH_MODES:
        return dict(response_lengths=torch.randint(0, 60, (n,)).to(DEVICE))
    if mode == "remax":
        return dict(baselines=_rewards(n, dtype))
    return {}


def _sizes_of(B: int, group_size=None, group_sizes=None):
    if group_size is not None:
        return [group_size] * (B // group_size)
    return [int(s) for s in group_sizes]


def _reference(rewards, mode, eps=None, group_size=None, group_sizes=None, shift=0.0, singleton="zero", **extra):
    extra = {k: v.cpu() for k, v in extra.items()}
    if "baselines" in extra:
        extra["baselines"] = extra["baselines"].double() - shift
    return reference.group_advantages(rewards.cpu().double() - shift,
                                      _sizes_of(rewards.numel(), group_size, group_sizes), mode=mode,
                                      eps=default_eps(mode) if eps is None else eps, singleton=singleton, **extra)


def _assert_matches_reference(out, rewards, mode, eps=None, group_size=None, group_sizes=None, shift=0.0,
                              **extra):
    ref = _reference(rewards, mode, eps, group_size, group_sizes, shift, **extra)
    expected_dtype = torch.float64 if rewards.dtype == torch.float64 else torch.float32
    assert out.dtype == expected_dtype and out.shape == rewards.shape and out.device == rewards.device
    assert torch.isfinite(out).all()
    tol = 1e-12 if rewards.dtype == torch.float64 else 2e-5
    scale = max(1.0, ref.abs().max().item()) if ref.numel() else 1.0
    torch.testing.assert_close(out.cpu().double(), ref, rtol=tol, atol=tol * scale)


# --- against the reference ------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ALL_MODES)
def test_fixed_group_size(mode, backend):
    rewards, extra = _rewards(8 * 6), _extra(mode, 8 * 6)
    out = rlloss.group_advantages(rewards, group_size=6, mode=mode, backend=backend, **extra)
    _assert_matches_reference(out, rewards, mode, group_size=6, **extra)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ALL_MODES)
def test_variable_group_sizes(mode, backend):
    sizes = [5, 1, 2, 17, 8, 1, 3, 33, 4]
    rewards, extra = _rewards(sum(sizes)), _extra(mode, sum(sizes))
    out = rlloss.group_advantages(rewards, group_sizes=sizes, mode=mode, eps=1e-4, backend=backend, **extra)
    _assert_matches_reference(out, rewards, mode, eps=1e-4, group_sizes=sizes, **extra)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("mode", ALL_MODES)
def test_dtypes(mode, dtype, backend):
    sizes = [4, 9, 1, 6]
    rewards, extra = _rewards(sum(sizes), dtype), _extra(mode, sum(sizes), dtype)
    out = rlloss.group_advantages(rewards, group_sizes=torch.tensor(sizes), mode=mode, backend=backend, **extra)
    _assert_matches_reference(out, rewards, mode, group_sizes=sizes, **extra)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ALL_MODES)
def test_large_groups_loop_over_blocks(mode, backend):
    # Wider than one block of the counting modes (128 under the interpreter) and, for the mean modes, than
    # one 1-D block (1024); mixed with small groups.
    sizes = [300, 129, 1] if mode in ORDER_MODES else [300, 2500, 7]
    rewards, extra = _rewards(sum(sizes)), _extra(mode, sum(sizes))
    out = rlloss.group_advantages(rewards, group_sizes=sizes, mode=mode, backend=backend, **extra)
    _assert_matches_reference(out, rewards, mode, group_sizes=sizes, **extra)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ALL_MODES)
@pytest.mark.parametrize("dtype, offset, spread", [(torch.float32, 1e6, 10.0), (torch.float32, 0.0, 1e8),
                                                    (torch.float64, 1e12, 1e-2)])
def test_big_reward_magnitudes(mode, backend, dtype, offset, spread):
    sizes = [7, 16, 2]
    # gpg's α counts the non-zero rewards, which a shift changes unless none is 0 before or after it.
    rewards = (offset + spread * _rewards(sum(sizes), torch.float64, ties=mode != "gpg")).to(dtype)
    extra = _extra(mode, sum(sizes))
    if mode == "remax":
        extra["baselines"] = (offset + spread * _rewards(sum(sizes), torch.float64)).to(dtype)
    out = rlloss.group_advantages(rewards, group_sizes=sizes, mode=mode, backend=backend, **extra)
    # Every mode but gpg is translation invariant; the reference's naive float64 mean cannot resolve a spread
    # of 1e-2 on top of 1e12, so it gets the rewards with the offset taken off (an exact subtraction).
    _assert_matches_reference(out, rewards, mode, group_sizes=sizes, shift=offset, **extra)


@pytest.mark.parametrize("backend", ["reference", *BACKENDS])
@pytest.mark.parametrize("mode", ZERO_FOR_CONSTANT_GROUPS)
def test_constant_groups_give_exactly_zero(mode, backend):
    # Values whose naive float mean is not the value itself (0.1·3 / 3 ≠ 0.1), a large offset, and a
    # constant group long enough to span several blocks.
    constant = [(0.1, 3), (1e6 + 0.3, 5), (-7.25, 1), (0.7, 300), (1 / 3, 11)]
    parts, sizes = [], []
    for value, size in constant:
        parts.append(torch.full((size,), value))
        sizes.append(size)
    parts.append(_rewards(6, ties=False).cpu())  # one ordinary group
    sizes.append(6)
    rewards = torch.cat(parts).to(DEVICE)
    extra = _extra(mode, rewards.numel())
    for eps in (1e-6, 0.0):
        out = rlloss.group_advantages(rewards, group_sizes=sizes, mode=mode, eps=eps, backend=backend, **extra)
        n_constant = sum(s for _, s in constant)
        assert torch.all(out[:n_constant] == 0), out[:n_constant].abs().max()
        assert torch.isfinite(out).all()
        assert torch.any(out[n_constant:] != 0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", [m for m in ALL_MODES if m not in ("reinforce_plus_plus", "remax")])
def test_singletons_and_single_reward(mode, backend):
    rewards = _rewards(5, ties=False)
    extra = _extra(mode, 5)
    out = rlloss.group_advantages(rewards, group_size=1, mode=mode, backend=backend, **extra)
    assert torch.all(out == 0)
    extra = {k: v[:1] for k, v in extra.items()}
    one = rlloss.group_advantages(rewards[:1], group_sizes=[1], mode=mode, backend=backend, **extra)
    assert one.shape == (1,) and one.item() == 0


@pytest.mark.parametrize("backend", ["reference", *BACKENDS])
def test_empty_batch(backend):
    for kwargs in (dict(group_size=4), dict(group_sizes=[])):
        out = rlloss.group_advantages(torch.empty(0, device=DEVICE), backend=backend, **kwargs)
        assert out.shape == (0,) and out.dtype == torch.float32


# --- conventions ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["reference", *BACKENDS])
def test_rank_gaussian_ties_share_their_mean_rank(backend):
    rewards = torch.tensor([3.0, 2.0, 1.0, 2.0, 5.0, 5.0, 5.0], device=DEVICE)
    out = rlloss.group_advantages(rewards, group_sizes=[4, 3], mode="rank_gaussian", backend=backend)
    # Group 1: ranks 4, 2.5, 1, 2.5 of G = 4; group 2: all equal.
    p = torch.tensor([3.5, 2.0, 0.5, 2.0], dtype=torch.float64) / 4
    expected = torch.cat([torch.special.ndtri(p), torch.zeros(3, dtype=torch.float64)])
    torch.testing.assert_close(out.cpu().double(), expected, rtol=1e-6, atol=1e-7)
    assert out[1] == out[3] and out[1] == 0


@pytest.mark.parametrize("backend", ["reference", *BACKENDS])
def test_median_is_the_lower_median(backend):
    rewards = torch.tensor([4.0, 1.0, 3.0, 2.0, 10.0, 0.0], device=DEVICE)
    out = rlloss.group_advantages(rewards, group_sizes=[4, 2], mode="median", backend=backend)
    torch.testing.assert_close(out.cpu(), torch.tensor([2.0, -1.0, 1.0, 0.0, 10.0, 0.0]))
    med = rewards[:4].median()  # torch.median: the lower of the two middle values
    assert med == 2.0 and torch.equal(out[:4], rewards[:4] - med)
    mad = rlloss.group_advantages(rewards, group_sizes=[4, 2], mode="median_mad", eps=0.5, backend=backend)
    # |R − 2| = 2, 1, 1, 0 → lower median 1; second group: med 0, |R| = 10, 0 → MAD 0.
    torch.testing.assert_close(mad.cpu(), torch.tensor([2 / 1.5, -1 / 1.5, 1 / 1.5, 0.0, 10 / 0.5, 0.0]))


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_denominator_gives_zero(backend):
    # With eps = 0 a median_mad group whose MAD is 0 has no scale: its advantages are 0, not inf.
    rewards = torch.tensor([0.0, 0.0, 0.0, 1.0, 2.0, 4.0], device=DEVICE)
    out = rlloss.group_advantages(rewards, group_size=3, mode="median_mad", eps=0.0, backend=backend)
    assert torch.all(out[:3] == 0) and torch.equal(out[3:].cpu(), torch.tensor([-1.0, 0.0, 2.0]))  # MAD = 1
    out = rlloss.group_advantages(rewards, group_sizes=[4, 2], mode="median_mad", eps=0.0, backend=backend)
    assert torch.all(out[:4] == 0) and torch.isfinite(out).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ALL_MODES)
def test_every_output_is_written(mode, backend, monkeypatch):
    # Poison every fresh float buffer with NaN: an element the backend forgot to write shows up.
    empty, empty_like = torch.empty, torch.empty_like

    def poisoned(make):
        def make_poisoned(*args, **kwargs):
            out = make(*args, **kwargs)
            return out.fill_(float("nan")) if out.is_floating_point() else out
        return make_poisoned

    monkeypatch.setattr(torch, "empty", poisoned(empty))
    monkeypatch.setattr(torch, "empty_like", poisoned(empty_like))
    sizes = [3, 1, 4, 2]
    rewards = _rewards(sum(sizes))
    out = rlloss.group_advantages(rewards, group_sizes=sizes, mode=mode, backend=backend,
                                  **_extra(mode, sum(sizes)))
    assert torch.isfinite(out).all()


def test_result_is_detached():
    rewards = torch.randn(8, requires_grad=True)
    out = rlloss.group_advantages(rewards, group_size=4)
    assert not out.requires_grad and out.grad_fn is None


def test_group_sizes_forms_agree():
    rewards = _rewards(10)
    a = rlloss.group_advantages(rewards, group_sizes=[3, 7], backend="torch")
    b = rlloss.group_advantages(rewards, group_sizes=torch.tensor([3, 7], dtype=torch.int32), backend="torch")
    c = rlloss.group_advantages(rewards, group_sizes=(3, 7), backend="torch")
    assert torch.equal(a, b) and torch.equal(a, c)
    fixed = rlloss.group_advantages(rewards, group_size=5, backend="torch")
    assert torch.equal(fixed, rlloss.group_advantages(rewards, group_sizes=[5, 5], backend="torch"))


# --- exact at any reward magnitude (issue #11) -----------------------------------------------------------

# Modes whose advantages scale with the rewards when ε = 0; the others are then scale-free.
LINEAR_MODES = ("no_std", "rloo", "median", "gpg", "grpo_passk_no_std", "opo", "remax")
FLOAT32_ULP = 2.0 ** -23


@pytest.mark.parametrize("backend", ["reference", *BACKENDS])
def test_issue_11_huge_float32_rewards(backend):
    # The squares of 1e20 overflow float32: before the fix every advantage came out 0.
    rewards = torch.tensor([1e20, -1e20, 0.0], device=DEVICE)
    out = rlloss.group_advantages(rewards, group_size=3, backend=backend)
    assert torch.equal(out.cpu(), torch.tensor([1.0, -1.0, 0.0]))
    # The squares of 1e-30 underflow: with ε = 0 the advantages used to be 0 instead of ±1.
    tiny = torch.tensor([1e-30, -1e-30, 0.0], device=DEVICE)
    out = rlloss.group_advantages(tiny, group_size=3, eps=0.0, backend=backend)
    assert torch.equal(out.cpu(), torch.tensor([1.0, -1.0, 0.0]))


# Modes whose statistics mix the magnitudes of different groups (one tiny group beside a huge one is then
# legitimately rounded to 0), so each scale needs a call of its own.
BATCH_COUPLED_MODES = ("batch_std", "reinforce_plus_plus", "reinforce_plus_plus_baseline")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ALL_MODES)
def test_float32_rewards_from_1e_minus_30_to_1e30_are_exact(mode, backend):
    # Statistics accumulated in float64 of residuals scaled by the group's largest one: every float32 scale
    # gives the float64 reference to 4 ulps (elementwise; 2 ulps of the scale's largest advantage near 0).
    # The other modes get every scale at once, each in groups of its own.
    sizes = [5, 1, 2, 9]
    exponents = list(range(-30, 31, 10))
    n = sum(sizes)
    base, base_baselines = _rewards(n, torch.float64).cpu(), _rewards(n, torch.float64).cpu()
    calls = [[e] for e in exponents] if mode in BATCH_COUPLED_MODES else [exponents]
    for call in calls:
        rewards = torch.cat([base * 10.0 ** e for e in call]).float().to(DEVICE)
        extra = _extra(mode, rewards.numel())
        if mode == "remax":
            extra["baselines"] = torch.cat([base_baselines * 10.0 ** e for e in call]).float().to(DEVICE)
        for eps in (None, 0.0):
            out = rlloss.group_advantages(rewards, group_sizes=sizes * len(call), mode=mode, eps=eps,
                                          backend=backend, **extra)
            ref = _reference(rewards, mode, eps, group_sizes=sizes * len(call), **extra)
            for k, exponent in enumerate(call):
                got, want = out[k * n : (k + 1) * n].cpu().double(), ref[k * n : (k + 1) * n]
                torch.testing.assert_close(got, want, rtol=4 * FLOAT32_ULP,
                                           atol=2 * FLOAT32_ULP * want.abs().max().item(),
                                           msg=lambda m: f"scale 1e{exponent}, eps={eps}: {m}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ALL_MODES)
def test_float64_rewards_beyond_the_range_of_their_squares(mode, backend):
    # (1e200)² overflows float64 and (1e-200)² underflows it, yet with ε = 0 the scale-free modes give the
    # unit-scale advantages and the linear ones those times the scale.
    sizes = [4, 1, 7, 3]
    B = sum(sizes)
    rewards, extra = _rewards(B, torch.float64), _extra(mode, B, torch.float64)
    unit = rlloss.group_advantages(rewards, group_sizes=sizes, mode=mode, eps=0.0, backend=backend, **extra)
    for scale in (1e-200, 1e200):
        scaled = {k: v * scale if v.is_floating_point() else v for k, v in extra.items()}
        out = rlloss.group_advantages(rewards * scale, group_sizes=sizes, mode=mode, eps=0.0, backend=backend,
                                      **scaled)
        expected = unit * scale if mode in LINEAR_MODES else unit
        assert torch.isfinite(out).all()
        torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12 * expected.abs().max().item())


# --- singletons: zero (default) or verl's mean 0, std 1 ---------------------------------------------------


@pytest.mark.parametrize("backend", ["reference", *BACKENDS])
@pytest.mark.parametrize("mode", VERL_SINGLETON_MODES)
def test_singleton_rules(mode, backend):
    sizes = [3, 1, 4, 1, 2]
    B = sum(sizes)
    rewards, extra = _rewards(B, ties=False), _extra(mode, B)
    rewards[0] = 0.0  # a reward of 0 counts against GPG's α
    alone = torch.tensor([3, 8], device=DEVICE)
    zero = rlloss.group_advantages(rewards, group_sizes=sizes, mode=mode, backend=backend, **extra)
    verl = rlloss.group_advantages(rewards, group_sizes=sizes, mode=mode, singleton="verl", backend=backend,
                                   **extra)
    _assert_matches_reference(verl, rewards, mode, group_sizes=sizes, singleton="verl", **extra)
    if mode == "reinforce_plus_plus_baseline":  # the batch whitening couples every completion
        return
    assert torch.all(zero[alone] == 0)
    others = torch.ones(B, dtype=torch.bool, device=DEVICE)
    others[alone] = False
    assert torch.equal(zero[others], verl[others])
    scale = {"grpo": 1 / (1 + 1e-6), "gpg": B / (B - 1)}.get(mode, 1.0)
    torch.testing.assert_close(verl[alone], rewards[alone] * scale)


@pytest.mark.parametrize("mode", ["median", "batch_std", "rank_gaussian", "grpo_passk", "remax"])
def test_singleton_verl_is_refused_where_verl_has_no_such_rule(mode):
    with pytest.raises(ValueError, match="singleton='verl' applies to"):
        rlloss.group_advantages(_rewards(4), group_size=2, mode=mode, singleton="verl", **_extra(mode, 4))


@pytest.mark.parametrize("backend", ["reference", *BACKENDS])
def test_opo_weighs_by_token_count_and_a_group_without_tokens_gives_zero(backend):
    rewards = _rewards(7, ties=False)
    lengths = torch.tensor([0, 0, 0, 5, 0, 9, 2], device=DEVICE)
    out = rlloss.group_advantages(rewards, group_sizes=[3, 4], mode="opo", response_lengths=lengths,
                                  backend=backend)
    assert torch.all(out[:3] == 0)  # verl would divide 0 by 0 here
    r, n = rewards[3:].double(), lengths[3:].double()
    torch.testing.assert_close(out[3:].double(), r - (n * r).sum() / n.sum())  # n = 0 weighs nothing


@pytest.mark.parametrize("backend", ["reference", *BACKENDS])
@pytest.mark.parametrize("mode", ["reinforce_plus_plus", "remax"])
def test_modes_without_groups(mode, backend):
    rewards, extra = _rewards(9), _extra(mode, 9)
    out = rlloss.group_advantages(rewards, mode=mode, backend=backend, **extra)
    _assert_matches_reference(out, rewards, mode, group_size=9, **extra)
    grouped = rlloss.group_advantages(rewards, group_sizes=[2, 7], mode=mode, backend=backend, **extra)
    assert torch.equal(out, grouped)  # groups, when given, are checked and unused


# --- check_inputs=False: no host read, torch.compile -------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ALL_MODES)
def test_check_inputs_false_reads_nothing_on_the_host(mode, backend, monkeypatch):
    sizes = torch.tensor([5, 1, 2, 17, 3], device=DEVICE)
    rewards, extra = _rewards(28), _extra(mode, 28)
    checked = rlloss.group_advantages(rewards, group_sizes=sizes, mode=mode, backend=backend, **extra)

    def host_read(*args, **kwargs):
        raise AssertionError("group_advantages(check_inputs=False) read a tensor value on the host")

    for name in ("item", "tolist", "__bool__", "__int__", "__float__"):
        monkeypatch.setattr(torch.Tensor, name, host_read)
    unchecked = rlloss.group_advantages(rewards, group_sizes=sizes, mode=mode, check_inputs=False,
                                        backend=backend, **extra)
    fixed = rlloss.group_advantages(rewards, group_size=4, mode=mode, check_inputs=False, backend=backend,
                                    **extra)
    monkeypatch.undo()
    # The kernels may then use another block size, so another summation order: equal to rounding.
    torch.testing.assert_close(unchecked, checked, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(fixed, rlloss.group_advantages(rewards, group_size=4, mode=mode, backend=backend,
                                                              **extra), rtol=1e-6, atol=1e-6)


def _every_mode(rewards, sizes, lengths, baselines):
    """Every mode in one function, as a trainer step would call it: a single graph for torch.compile."""
    out = []
    for mode in ALL_MODES:
        extra = dict(response_lengths=lengths) if mode in LENGTH_MODES else {}
        if mode == "remax":
            extra = dict(baselines=baselines)
        singleton = "verl" if mode in VERL_SINGLETON_MODES else "zero"
        out.append(rlloss.group_advantages(rewards, group_sizes=sizes, mode=mode, singleton=singleton,
                                           check_inputs=False, **extra))
    out.append(rlloss.group_advantages(rewards, group_size=4, mode="grpo", check_inputs=False))
    return out


@pytest.mark.skipif(HAS_CUDA, reason="traces the CPU default (torch backend)")
def test_check_inputs_false_compiles_without_graph_breaks():
    # fullgraph=True raises at the first graph break; the counting backend shows the single graph, and
    # dynamo's own counters show no break. backend="eager"-like: no code generation, so the test is fast.
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    graphs = []

    def count_graphs(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module.forward

    inputs = (_rewards(28), torch.tensor([5, 1, 2, 17, 3]), torch.randint(0, 60, (28,)), _rewards(28))
    compiled = torch.compile(_every_mode, fullgraph=True, backend=count_graphs)
    for got, want in zip(compiled(*inputs), _every_mode(*inputs)):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert len(graphs) == 1
    assert not torch._dynamo.utils.counters["graph_break"], dict(torch._dynamo.utils.counters["graph_break"])
    torch._dynamo.reset()


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the interpreter's numpy
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad_sizes", [[4, 9], [2, 2], [3, -2, 5], [0, 6]])
def test_unchecked_bad_group_sizes_stay_inside_the_batch(backend, bad_sizes):
    # check_inputs=False trusts the sizes; wrong ones give unspecified values, never an access outside
    # the batch (the kernels clamp the group bounds; the torch backend clamps the group ends).
    rewards = _rewards(6)
    for mode in ("grpo", "median_mad", "grpo_passk", "opo"):
        out = rlloss.group_advantages(rewards, group_sizes=torch.tensor(bad_sizes, device=DEVICE), mode=mode,
                                      check_inputs=False, backend=backend, **_extra(mode, 6))
        assert out.shape == (6,)


def test_check_inputs_false_skips_only_the_value_checks():
    bad = torch.tensor([1.0, float("nan"), 0.0, 2.0])
    out = rlloss.group_advantages(bad, group_size=2, check_inputs=False)  # NaN in, NaN out: no error
    assert out.shape == (4,)
    with pytest.raises(ValueError, match="rewards must be finite"):
        rlloss.group_advantages(bad, group_size=2)
    with pytest.raises(ValueError, match="multiple of group_size"):  # needs no device read: always checked
        rlloss.group_advantages(bad, group_size=3, check_inputs=False)
    with pytest.raises(ValueError, match="group_sizes must sum to .* B = 4"):
        rlloss.group_advantages(bad, group_sizes=[1, 2], check_inputs=False)
    with pytest.raises(ValueError, match="got no groups"):
        rlloss.group_advantages(bad, group_sizes=torch.tensor([], dtype=torch.int64), check_inputs=False)
    with pytest.raises(ValueError, match="response_lengths must have rewards' shape"):
        rlloss.group_advantages(bad, group_size=2, mode="opo", response_lengths=torch.ones(3), check_inputs=False)
    with pytest.raises(TypeError, match="check_inputs must be a bool"):
        rlloss.group_advantages(bad, group_size=2, check_inputs=0)


# --- the trainers' documented formulas ----------------------------------------------------------------


def _trl(rewards, G, scale_rewards):
    """TRL GRPOTrainer._generate_and_score_completions: group mean, then scale_rewards, ε = 1e-4."""
    mean = rewards.view(-1, G).mean(dim=1).repeat_interleave(G, dim=0)
    advantages = rewards - mean
    if scale_rewards == "group":
        std = rewards.view(-1, G).std(dim=1).repeat_interleave(G, dim=0)
    elif scale_rewards == "batch":
        std = rewards.std().expand_as(rewards)
    else:
        return advantages
    return advantages / (std + 1e-4)


def _mc_grpo(rewards, G, mad_eps=1e-3):
    """MC-GRPO: A = (R − median)/(MAD + 1e-3) with torch.median (lower median)."""
    grouped = rewards.view(-1, G)
    median = grouped.median(dim=1).values[:, None]
    mad = (grouped - median).abs().median(dim=1).values[:, None]
    return ((grouped - median) / (mad + mad_eps)).reshape(-1)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scale_rewards, mode", [("group", "grpo"), ("batch", "batch_std"), ("none", "no_std")])
def test_trl_scale_rewards(scale_rewards, mode, backend):
    rewards = _rewards(6 * 8)
    rewards[:8] = 1.0  # an all-correct group
    expected = _trl(rewards.cpu(), 8, scale_rewards)
    out = rlloss.group_advantages(rewards, group_size=8, mode=mode, eps=1e-4, backend=backend)
    torch.testing.assert_close(out.cpu(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_mc_grpo_median_mad(backend):
    rewards = _rewards(5 * 6)
    expected = _mc_grpo(rewards.cpu(), 6)
    out = rlloss.group_advantages(rewards, group_size=6, mode="median_mad", eps=1e-3, backend=backend)
    torch.testing.assert_close(out.cpu(), expected, rtol=1e-5, atol=1e-5)


# --- verl's estimators, transcribed from verl/trainer/ppo/core_algos.py --------------------------------
# Float64 copies of verl's code (read at volcengine/verl 0.8.0.dev, the newest snapshot reachable here;
# the functions below are unchanged in form since 0.4), on verl's own inputs: token_level_rewards [B, T]
# with each completion's reward on its last response token, the right-padded response_mask, and the group
# ids `index`. rlloss gets the same rewards as [B], the token counts, and consecutive groups; its [B]
# advantages broadcast over the mask must equal verl's [B, T] advantages.


def _verl_inputs(rewards, lengths):
    B, T = rewards.numel(), int(lengths.max())
    response_mask = (torch.arange(T)[None, :] < lengths[:, None]).to(torch.float64)
    token_level_rewards = torch.zeros(B, T, dtype=torch.float64)
    token_level_rewards[torch.arange(B), lengths - 1] = rewards
    return token_level_rewards, response_mask


def _verl_masked_mean(values, mask):
    """verl.utils.torch_functional.masked_mean (with masked_sum)."""
    return (torch.where(mask.bool(), values, 0.0) * mask).sum() / (mask.sum() + 1e-8)


def _verl_masked_whiten(values, mask):
    """verl.utils.torch_functional.masked_whiten (shift_mean=True), with masked_var(unbiased=True)."""
    mean = _verl_masked_mean(values, mask)
    variance = _verl_masked_mean((values - mean) ** 2, mask)
    mask_sum = mask.sum()
    variance = variance * (mask_sum / (mask_sum - 1))
    return (values - mean) * torch.rsqrt(variance + 1e-8)


def _verl_group_mean_std(scores, index):
    """The group loop of compute_grpo_outcome_advantage / compute_gpg_outcome_advantage: a group of one
    gets mean 0 and std 1."""
    id2score, id2mean, id2std = defaultdict(list), {}, {}
    for i in range(scores.shape[0]):
        id2score[index[i]].append(scores[i])
    for idx in id2score:
        if len(id2score[idx]) == 1:
            id2mean[idx], id2std[idx] = torch.tensor(0.0), torch.tensor(1.0)
        else:
            id2mean[idx] = torch.mean(torch.stack(id2score[idx]))
            id2std[idx] = torch.std(torch.stack(id2score[idx]))
    return id2score, id2mean, id2std


def _verl_grpo(token_level_rewards, response_mask, index, epsilon=1e-6, norm_adv_by_std_in_grpo=True):
    """compute_grpo_outcome_advantage."""
    scores = token_level_rewards.sum(dim=-1)
    _, id2mean, id2std = _verl_group_mean_std(scores, index)
    for i in range(scores.shape[0]):
        if norm_adv_by_std_in_grpo:
            scores[i] = (scores[i] - id2mean[index[i]]) / (id2std[index[i]] + epsilon)
        else:
            scores[i] = scores[i] - id2mean[index[i]]
    return scores.unsqueeze(-1) * response_mask


def _verl_gpg(token_level_rewards, response_mask, index, epsilon=1e-6, f_norm=1.0, alpha=1.0):
    """compute_gpg_outcome_advantage (α recomputed from the batch, as verl does)."""
    scores = token_level_rewards.sum(dim=-1)
    bsz = scores.shape[0]
    m = torch.count_nonzero(scores)
    alpha = bsz / m.clamp(min=1)
    _, id2mean, _ = _verl_group_mean_std(scores, index)
    for i in range(bsz):
        scores[i] = alpha * (scores[i] - id2mean[index[i]]) / f_norm
    return scores.unsqueeze(-1) * response_mask


def _verl_grpo_passk(token_level_rewards, response_mask, index, epsilon=1e-6, norm_adv_by_std_in_grpo=True):
    """compute_grpo_passk_outcome_advantage (norm_adv_by_std_in_grpo comes from its config)."""
    scores = token_level_rewards.sum(dim=-1)
    advantages = torch.zeros_like(scores)
    id2scores, id2indices = defaultdict(list), defaultdict(list)
    for i in range(scores.shape[0]):
        id2scores[index[i]].append(scores[i])
        id2indices[index[i]].append(i)
    for idx in id2scores:
        rewards = torch.stack(id2scores[idx])
        if rewards.numel() < 2:
            raise ValueError(f"Pass@k requires at least 2 samples per group. Got {rewards.numel()}")
        topk, topk_idx = torch.topk(rewards, 2)
        r_max, r_second_max = topk[0], topk[1]
        i_max = id2indices[idx][topk_idx[0].item()]
        advantage = r_max - r_second_max
        if norm_adv_by_std_in_grpo:
            advantage = advantage / (torch.std(rewards) + epsilon)
        advantages[i_max] = advantage
    return advantages.unsqueeze(-1) * response_mask


def _verl_rloo(token_level_rewards, response_mask, index, epsilon=1e-6):
    """compute_rloo_outcome_advantage (a group of one keeps its reward)."""
    scores = token_level_rewards.sum(dim=-1)
    id2score, id2mean, _ = _verl_group_mean_std(scores, index)
    for i in range(scores.shape[0]):
        response_num = len(id2score[index[i]])
        if response_num > 1:
            scores[i] = scores[i] * response_num / (response_num - 1) - id2mean[index[i]] * response_num / (
                response_num - 1)
    return scores.unsqueeze(-1) * response_mask


def _verl_opo(token_level_rewards, response_mask, index, epsilon=1e-6):
    """compute_opo_outcome_advantage: the length-weighted group baseline (0 for a group of one)."""
    response_length = response_mask.sum(dim=-1)
    scores = token_level_rewards.sum(dim=-1)
    id2score, id2len, id2bsl = defaultdict(list), defaultdict(list), {}
    for i in range(scores.shape[0]):
        id2score[index[i]].append(scores[i])
        id2len[index[i]].append(response_length[i])
    for idx in id2score:
        if len(id2score[idx]) == 1:
            id2bsl[idx] = torch.tensor(0.0)
        else:
            score_tensor, len_tensor = torch.stack(id2score[idx]), torch.stack(id2len[idx])
            id2bsl[idx] = (len_tensor * score_tensor).sum() / len_tensor.sum()
    for i in range(scores.shape[0]):
        scores[i] = scores[i] - id2bsl[index[i]]
    return scores.unsqueeze(-1) * response_mask


def _verl_reinforce_plus_plus(token_level_rewards, response_mask, gamma=1.0):
    """compute_reinforce_plus_plus_outcome_advantage: discounted returns, whitened over the masked tokens."""
    returns = torch.zeros_like(token_level_rewards)
    running_return = 0
    for t in reversed(range(token_level_rewards.shape[1])):
        running_return = token_level_rewards[:, t] + gamma * running_return
        returns[:, t] = running_return
        running_return = running_return * response_mask[:, t]
    return _verl_masked_whiten(returns, response_mask) * response_mask


def _verl_reinforce_plus_plus_baseline(token_level_rewards, response_mask, index, epsilon=1e-6):
    """compute_reinforce_plus_plus_baseline_outcome_advantage (mean 0 for a group of one)."""
    response_length = token_level_rewards.shape[-1]
    scores = token_level_rewards.sum(dim=-1)
    _, id2mean, _ = _verl_group_mean_std(scores, index)
    for i in range(scores.shape[0]):
        scores[i] = scores[i] - id2mean[index[i]]
    scores = scores.unsqueeze(-1).tile([1, response_length]) * response_mask
    return _verl_masked_whiten(scores, response_mask) * response_mask


def _verl_remax(token_level_rewards, reward_baselines, response_mask):
    """compute_remax_outcome_advantage."""
    returns = (token_level_rewards * response_mask).flip(dims=[-1]).cumsum(dim=-1).flip(dims=[-1])
    return returns - reward_baselines.unsqueeze(-1) * response_mask


# verl estimator → (rlloss mode, verl call on (token_level_rewards, response_mask, index, baselines)).
VERL_ESTIMATORS = {
    "grpo": ("grpo", lambda t, m, i, b: _verl_grpo(t, m, i)),
    "grpo/norm_adv_by_std_in_grpo=False": ("no_std", lambda t, m, i, b: _verl_grpo(t, m, i,
                                                                                    norm_adv_by_std_in_grpo=False)),
    "rloo": ("rloo", lambda t, m, i, b: _verl_rloo(t, m, i)),
    "gpg": ("gpg", lambda t, m, i, b: _verl_gpg(t, m, i)),
    "grpo_passk": ("grpo_passk", lambda t, m, i, b: _verl_grpo_passk(t, m, i)),
    "grpo_passk/norm_adv_by_std_in_grpo=False": ("grpo_passk_no_std", lambda t, m, i, b: _verl_grpo_passk(
        t, m, i, norm_adv_by_std_in_grpo=False)),
    "opo": ("opo", lambda t, m, i, b: _verl_opo(t, m, i)),
    "reinforce_plus_plus": ("reinforce_plus_plus", lambda t, m, i, b: _verl_reinforce_plus_plus(t, m)),
    "reinforce_plus_plus_baseline": ("reinforce_plus_plus_baseline",
                                     lambda t, m, i, b: _verl_reinforce_plus_plus_baseline(t, m, i)),
    "remax": ("remax", lambda t, m, i, b: _verl_remax(t, b, m)),
}


@pytest.mark.parametrize("backend", ["reference", *BACKENDS])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("estimator", list(VERL_ESTIMATORS))
def test_verl_estimator_parity(estimator, dtype, backend):
    mode, verl = VERL_ESTIMATORS[estimator]
    # Uneven groups, groups of one (not for pass@k, which verl refuses), an all-equal group, binary rewards
    # with a tied best, a few rewards of exactly 0 (GPG's α counts them).
    sizes = [4, 2, 6, 3, 5] if mode.startswith("grpo_passk") else [4, 1, 6, 2, 5, 1, 3]
    B = sum(sizes)
    rewards = _rewards(B, torch.float64).cpu()
    equal = sum(sizes[: sizes.index(2)])
    rewards[equal : equal + 2] = 0.5  # an all-equal group
    rewards[-sizes[-1] :] = torch.tensor([1.0, 0.0, 1.0] + [0.0] * (sizes[-1] - 3))  # binary, a tied best
    rewards = rewards.to(dtype).double()  # the values rlloss sees, exactly
    lengths = torch.randint(1, 40, (B,))
    baselines = _rewards(B, torch.float64).cpu().to(dtype).double()
    token_level_rewards, response_mask = _verl_inputs(rewards, lengths)
    index = [f"uid-{g}" for g, size in enumerate(sizes) for _ in range(size)]
    expected = verl(token_level_rewards.clone(), response_mask, index, baselines)

    extra = {}
    if mode in LENGTH_MODES:
        extra["response_lengths"] = lengths.to(DEVICE)
    if mode == "remax":
        extra["baselines"] = baselines.to(dtype).to(DEVICE)
    singleton = "verl" if mode in VERL_SINGLETON_MODES else "zero"
    out = rlloss.group_advantages(rewards.to(dtype).to(DEVICE), group_sizes=sizes, mode=mode, singleton=singleton,
                                  backend=backend, **extra)
    # verl's masked_mean divides by Σ mask + 1e-8: a relative 1e-8/N from the exact whitening.
    tol = 1e-7 if dtype == torch.float64 else 4 * FLOAT32_ULP
    torch.testing.assert_close(out.cpu().double()[:, None] * response_mask, expected, rtol=tol, atol=tol)


def test_verl_grpo_singletons_are_the_only_difference_of_the_default():
    # Without singleton="verl", grpo matches verl's grpo everywhere except on groups of one (0 vs R/(1 + ε)).
    sizes = [4, 1, 3]
    rewards = _rewards(8, torch.float64).cpu()
    token_level_rewards, response_mask = _verl_inputs(rewards, torch.full((8,), 3))
    expected = _verl_grpo(token_level_rewards, response_mask, [0] * 4 + [1] + [2] * 3)[:, 0]
    out = rlloss.group_advantages(rewards, group_sizes=sizes, mode="grpo", backend="torch")
    torch.testing.assert_close(out[[0, 1, 2, 3, 5, 6, 7]], expected[[0, 1, 2, 3, 5, 6, 7]])
    # verl's std of a group of one is torch.tensor(1.0), float32: its 1 + ε is rounded to float32.
    assert out[4] == 0 and torch.isclose(expected[4], rewards[4] / (1 + 1e-6), rtol=1e-7, atol=0)


# --- properties -----------------------------------------------------------------------------------------

_group_lists = st.lists(st.integers(1, 12), min_size=1, max_size=6)
_values = st.one_of(st.floats(-1e3, 1e3, allow_nan=False, width=32), st.sampled_from([0.0, 1.0, 0.5, -2.0]))


@st.composite
def _batches(draw):
    sizes = draw(_group_lists)
    values = draw(st.lists(_values, min_size=sum(sizes), max_size=sum(sizes)))
    return sizes, torch.tensor(values, dtype=torch.float32, device=DEVICE)


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=16, deadline=None)
@given(batch=_batches(), mode=st.sampled_from(ALL_MODES), singleton=st.sampled_from(["zero", "verl"]),
       lengths=st.lists(st.integers(0, 50), min_size=60, max_size=60))
def test_property_matches_reference_and_is_finite(backend, batch, mode, singleton, lengths):
    sizes, rewards = batch
    singleton = singleton if mode in VERL_SINGLETON_MODES else "zero"
    extra = {}
    if mode in LENGTH_MODES:
        extra["response_lengths"] = torch.tensor(lengths[: rewards.numel()], device=DEVICE)
    if mode == "remax":
        extra["baselines"] = rewards.flip(0)
    out = rlloss.group_advantages(rewards, group_sizes=sizes, mode=mode, singleton=singleton, backend=backend,
                                  **extra)
    _assert_matches_reference(out, rewards, mode, group_sizes=sizes, singleton=singleton, **extra)


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=10, deadline=None)
@given(batch=_batches(), mode=st.sampled_from(["grpo", "no_std", "rloo", "batch_std"]))
def test_property_groups_are_centred(backend, batch, mode):
    sizes, rewards = batch
    out = rlloss.group_advantages(rewards, group_sizes=sizes, mode=mode, backend=backend).double()
    begin = 0
    for size in sizes:
        group = out[begin : begin + size]
        assert abs(group.sum().item()) <= 1e-5 * size * max(1.0, group.abs().max().item())
        begin += size


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=10, deadline=None)
@given(batch=_batches())
def test_property_rank_gaussian_is_antisymmetric(backend, batch):
    sizes, rewards = batch
    out = rlloss.group_advantages(rewards, group_sizes=sizes, mode="rank_gaussian", backend=backend)
    mirrored = rlloss.group_advantages(-rewards, group_sizes=sizes, mode="rank_gaussian", backend=backend)
    assert torch.equal(mirrored, -out)
    assert out.abs().max().item() <= -torch.special.ndtri(torch.tensor(0.5 / max(sizes))).item() + 1e-5


# --- errors ---------------------------------------------------------------------------------------------

_R = torch.randn(6)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(), ValueError, "exactly one of group_size, group_sizes and group_ids.*got none"),
    (dict(group_size=3, group_sizes=[3, 3]), ValueError, "exactly one.*both"),
    (dict(group_size=4), ValueError, "multiple of group_size"),
    (dict(group_size=0), ValueError, "group_size must be >= 1"),
    (dict(group_size=2.0), TypeError, "group_size must be an int"),
    (dict(group_sizes=[2, 3]), ValueError, "group_sizes must sum to .* B = 6"),
    (dict(group_sizes=[3, 0, 3]), ValueError, "group_sizes must all be >= 1.*index 1"),
    (dict(group_sizes=[7, -1]), ValueError, "group_sizes must all be >= 1"),
    (dict(group_sizes=torch.tensor([3.0, 3.0])), TypeError, "group_sizes must hold integers"),
    (dict(group_sizes=[3, 3.0]), TypeError, "group_sizes must hold ints"),
    (dict(group_sizes=torch.tensor([[3, 3]])), ValueError, "group_sizes must be 1-D"),
    (dict(group_sizes=6), TypeError, "group_sizes must be"),
    (dict(group_size=3, mode="gaussian"), ValueError, "mode must be one of"),
    (dict(group_size=3, eps=-1e-6), ValueError, "eps must be a finite number >= 0"),
    (dict(group_size=3, eps=float("nan")), ValueError, "eps must be"),
    (dict(group_size=3, eps="1e-6"), TypeError, "eps must be a float"),
    (dict(group_size=3, backend="cuda"), ValueError, "not a backend"),
    (dict(group_size=3, singleton="first"), ValueError, "singleton must be one of"),
    (dict(group_size=3, mode="median", singleton="verl"), ValueError, "singleton='verl' applies to"),
    (dict(group_size=3, check_inputs=1), TypeError, "check_inputs must be a bool"),
    (dict(group_size=3, mode="opo"), ValueError, "mode='opo' needs response_lengths"),
    (dict(mode="reinforce_plus_plus"), ValueError, "needs response_lengths"),
    (dict(group_size=3, response_lengths=torch.ones(6)), ValueError, "response_lengths is used only by"),
    (dict(group_size=3, mode="opo", response_lengths=torch.ones(5)), ValueError,
     "response_lengths must have rewards' shape"),
    (dict(group_size=3, mode="opo", response_lengths=torch.ones(6, dtype=torch.bool)), TypeError,
     "response_lengths must hold integers or floats"),
    (dict(group_size=3, mode="opo", response_lengths=[1] * 6), TypeError, "response_lengths must be a torch"),
    (dict(group_size=3, mode="opo", response_lengths=-torch.ones(6)), ValueError,
     "response_lengths must be >= 0"),
    (dict(group_size=3, mode="opo", response_lengths=torch.full((6,), float("inf"))), ValueError,
     "response_lengths must be finite"),
    (dict(mode="remax"), ValueError, "mode='remax' needs baselines"),
    (dict(group_size=3, baselines=torch.zeros(6)), ValueError, "baselines is used only by mode 'remax'"),
    (dict(mode="remax", baselines=torch.zeros(6, dtype=torch.int64)), TypeError, "baselines must have dtype"),
    (dict(mode="remax", baselines=torch.zeros(3)), ValueError, "baselines must have rewards' shape"),
    (dict(mode="remax", baselines=torch.tensor([0.0] * 5 + [float("nan")])), ValueError,
     "baselines must be finite; 1 of 6"),
    (dict(mode="remax", baselines=torch.zeros(6), group_size=3, group_sizes=[3, 3]), ValueError,
     "exactly one.*both"),
    (dict(mode="remax", baselines=torch.zeros(6), group_size=4), ValueError, "multiple of group_size"),
])
def test_argument_errors(kwargs, error, match):
    with pytest.raises(error, match=match):
        rlloss.group_advantages(_R, **kwargs)


@pytest.mark.parametrize("rewards, error, match", [
    (torch.tensor([1.0, float("nan"), 0.0]), ValueError, "rewards must be finite; 1 of 3"),
    (torch.tensor([1.0, float("inf"), -float("inf")]), ValueError, "rewards must be finite; 2 of 3"),
    (torch.randn(3, 1), ValueError, "rewards must be 1-D"),
    (torch.tensor(1.0), ValueError, "rewards must be 1-D"),
    (torch.tensor([1, 2, 3]), TypeError, "rewards must have dtype"),
    ([1.0, 2.0, 3.0], TypeError, "rewards must be a torch.Tensor"),
])
def test_reward_errors(rewards, error, match):
    with pytest.raises(error, match=match):
        rlloss.group_advantages(rewards, group_size=3)


# --- GPU: realistic sizes ------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mode", ALL_MODES)
def test_gpu_realistic_sizes(mode, dtype):
    sizes = torch.randint(1, 65, (1024,))
    rewards, extra = _rewards(int(sizes.sum()), dtype), _extra(mode, int(sizes.sum()), dtype)
    out = rlloss.group_advantages(rewards, group_sizes=sizes, mode=mode, backend="triton", **extra)
    _assert_matches_reference(out, rewards, mode, group_sizes=sizes.tolist(), **extra)
    n = 512 * 16
    extra = {k: v[:n] for k, v in extra.items()}
    out = rlloss.group_advantages(rewards[:n], group_size=16, mode=mode, backend="triton", **extra)
    _assert_matches_reference(out, rewards[:n], mode, group_size=16, **extra)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_gpu_check_inputs_false_never_synchronises(backend):
    sizes = torch.randint(1, 65, (256,), device="cuda")
    B = int(sizes.sum())
    rewards = _rewards(B)
    extras = {mode: _extra(mode, B) for mode in ALL_MODES}
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for mode in ALL_MODES:
            rlloss.group_advantages(rewards, group_sizes=sizes, mode=mode, check_inputs=False, backend=backend,
                                    **extras[mode])
            rlloss.group_advantages(rewards, group_sizes=[4] * (B // 4), mode=mode, check_inputs=False,
                                    backend=backend, **{k: v[: B // 4 * 4] for k, v in extras[mode].items()})
    finally:
        torch.cuda.set_sync_debug_mode("default")
