"""group_advantages (MATH.md §2): every mode on the torch and kernel backends against the float64 reference,
the exact-zero guarantees, the trainers' documented formulas, properties, and the input errors."""
import math

import pytest
import torch
from conftest import HAS_CUDA, KERNEL_BACKEND
from hypothesis import given, settings
from hypothesis import strategies as st

import rlloss
from rlloss import reference
from rlloss.advantages import ADVANTAGE_MODES

BACKENDS = ["torch", KERNEL_BACKEND]
DEVICE = "cuda" if HAS_CUDA else "cpu"
MEAN_MODES = ("grpo", "no_std", "batch_std", "rloo")
ORDER_MODES = ("median", "median_mad", "rank_gaussian")


def _rewards(n: int, dtype=torch.float32, ties: bool = True) -> torch.Tensor:
    """Fresh random rewards; with ties, a third of them come from a small set of repeated values."""
    r = torch.randn(n, dtype=torch.float64) * 2 + 0.5
    if ties:
        repeated = torch.rand(n) < 1 / 3
        r[repeated] = torch.randint(-2, 3, (int(repeated.sum()),), dtype=torch.float64) * 0.75
    return r.to(dtype).to(DEVICE)


def _sizes_of(B: int, group_size=None, group_sizes=None):
    if group_size is not None:
        return [group_size] * (B // group_size)
    return [int(s) for s in group_sizes]


def _assert_matches_reference(out, rewards, mode, eps=1e-6, group_size=None, group_sizes=None, shift=0.0):
    ref = reference.group_advantages(rewards.cpu().double() - shift,
                                     _sizes_of(rewards.numel(), group_size, group_sizes), mode=mode, eps=eps)
    expected_dtype = torch.float64 if rewards.dtype == torch.float64 else torch.float32
    assert out.dtype == expected_dtype and out.shape == rewards.shape and out.device == rewards.device
    assert torch.isfinite(out).all()
    tol = 1e-12 if rewards.dtype == torch.float64 else 2e-5
    scale = max(1.0, ref.abs().max().item()) if ref.numel() else 1.0
    torch.testing.assert_close(out.cpu().double(), ref, rtol=tol, atol=tol * scale)


# --- against the reference ------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ADVANTAGE_MODES)
def test_fixed_group_size(mode, backend):
    rewards = _rewards(8 * 6)
    out = rlloss.group_advantages(rewards, group_size=6, mode=mode, backend=backend)
    _assert_matches_reference(out, rewards, mode, group_size=6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ADVANTAGE_MODES)
def test_variable_group_sizes(mode, backend):
    sizes = [5, 1, 2, 17, 8, 1, 3, 33, 4]
    rewards = _rewards(sum(sizes))
    out = rlloss.group_advantages(rewards, group_sizes=sizes, mode=mode, eps=1e-4, backend=backend)
    _assert_matches_reference(out, rewards, mode, eps=1e-4, group_sizes=sizes)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("mode", ADVANTAGE_MODES)
def test_dtypes(mode, dtype, backend):
    sizes = [4, 9, 1, 6]
    rewards = _rewards(sum(sizes), dtype)
    out = rlloss.group_advantages(rewards, group_sizes=torch.tensor(sizes), mode=mode, backend=backend)
    _assert_matches_reference(out, rewards, mode, group_sizes=sizes)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ADVANTAGE_MODES)
def test_large_groups_loop_over_blocks(mode, backend):
    # Wider than one block of the counting modes (128 under the interpreter) and, for the mean modes, than
    # one 1-D block (1024); mixed with small groups.
    sizes = [300, 129, 1] if mode in ORDER_MODES else [300, 2500, 7]
    rewards = _rewards(sum(sizes))
    out = rlloss.group_advantages(rewards, group_sizes=sizes, mode=mode, backend=backend)
    _assert_matches_reference(out, rewards, mode, group_sizes=sizes)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ADVANTAGE_MODES)
@pytest.mark.parametrize("dtype, offset, spread", [(torch.float32, 1e6, 10.0), (torch.float32, 0.0, 1e8),
                                                    (torch.float64, 1e12, 1e-2)])
def test_big_reward_magnitudes(mode, backend, dtype, offset, spread):
    sizes = [7, 16, 2]
    rewards = (offset + spread * _rewards(sum(sizes), torch.float64)).to(dtype)
    out = rlloss.group_advantages(rewards, group_sizes=sizes, mode=mode, backend=backend)
    # Every mode is translation invariant; the reference's naive float64 mean cannot resolve a spread of
    # 1e-2 on top of 1e12, so it gets the rewards with the offset taken off (an exact subtraction).
    _assert_matches_reference(out, rewards, mode, group_sizes=sizes, shift=offset)


@pytest.mark.parametrize("backend", ["reference", *BACKENDS])
@pytest.mark.parametrize("mode", ADVANTAGE_MODES)
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
    for eps in (1e-6, 0.0):
        out = rlloss.group_advantages(rewards, group_sizes=sizes, mode=mode, eps=eps, backend=backend)
        n_constant = sum(s for _, s in constant)
        assert torch.all(out[:n_constant] == 0), out[:n_constant].abs().max()
        assert torch.isfinite(out).all()
        assert torch.any(out[n_constant:] != 0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ADVANTAGE_MODES)
def test_singletons_and_single_reward(mode, backend):
    rewards = _rewards(5, ties=False)
    out = rlloss.group_advantages(rewards, group_size=1, mode=mode, backend=backend)
    assert torch.all(out == 0)
    one = rlloss.group_advantages(rewards[:1], group_sizes=[1], mode=mode, backend=backend)
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
@pytest.mark.parametrize("mode", ADVANTAGE_MODES)
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
    out = rlloss.group_advantages(rewards, group_sizes=sizes, mode=mode, backend=backend)
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


def _verl(rewards, index, estimator, epsilon=1e-6, norm_adv_by_std_in_grpo=True):
    """verl core_algos: compute_grpo_outcome_advantage / compute_rloo_outcome_advantage (groups > 1)."""
    scores = rewards.clone()
    groups = {}
    for i, uid in enumerate(index):
        groups.setdefault(uid, []).append(scores[i])
    mean = {uid: torch.mean(torch.stack(v)) for uid, v in groups.items()}
    std = {uid: torch.std(torch.stack(v)) for uid, v in groups.items()}
    for i, uid in enumerate(index):
        n = len(groups[uid])
        if estimator == "rloo":
            scores[i] = scores[i] * n / (n - 1) - mean[uid] * n / (n - 1)
        elif norm_adv_by_std_in_grpo:
            scores[i] = (scores[i] - mean[uid]) / (std[uid] + epsilon)
        else:
            scores[i] = scores[i] - mean[uid]
    return scores


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
@pytest.mark.parametrize("estimator, mode, norm", [("grpo", "grpo", True), ("grpo", "no_std", False),
                                                   ("rloo", "rloo", True)])
def test_verl_estimators(estimator, mode, norm, backend):
    sizes = [4, 2, 7, 5]
    rewards = _rewards(sum(sizes))
    index = [g for g, s in enumerate(sizes) for _ in range(s)]
    expected = _verl(rewards.cpu(), index, estimator, norm_adv_by_std_in_grpo=norm)
    out = rlloss.group_advantages(rewards, group_sizes=sizes, mode=mode, eps=1e-6, backend=backend)
    torch.testing.assert_close(out.cpu(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_mc_grpo_median_mad(backend):
    rewards = _rewards(5 * 6)
    expected = _mc_grpo(rewards.cpu(), 6)
    out = rlloss.group_advantages(rewards, group_size=6, mode="median_mad", eps=1e-3, backend=backend)
    torch.testing.assert_close(out.cpu(), expected, rtol=1e-5, atol=1e-5)


# --- properties -----------------------------------------------------------------------------------------

_group_lists = st.lists(st.integers(1, 12), min_size=1, max_size=6)
_values = st.one_of(st.floats(-1e3, 1e3, allow_nan=False, width=32), st.sampled_from([0.0, 1.0, 0.5, -2.0]))


@st.composite
def _batches(draw):
    sizes = draw(_group_lists)
    values = draw(st.lists(_values, min_size=sum(sizes), max_size=sum(sizes)))
    return sizes, torch.tensor(values, dtype=torch.float32, device=DEVICE)


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=12, deadline=None)
@given(batch=_batches(), mode=st.sampled_from(ADVANTAGE_MODES))
def test_property_matches_reference_and_is_finite(backend, batch, mode):
    sizes, rewards = batch
    out = rlloss.group_advantages(rewards, group_sizes=sizes, mode=mode, backend=backend)
    _assert_matches_reference(out, rewards, mode, group_sizes=sizes)


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
    (dict(), ValueError, "exactly one of group_size and group_sizes.*neither"),
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
@pytest.mark.parametrize("mode", ADVANTAGE_MODES)
def test_gpu_realistic_sizes(mode, dtype):
    sizes = torch.randint(1, 65, (1024,))
    rewards = _rewards(int(sizes.sum()), dtype)
    out = rlloss.group_advantages(rewards, group_sizes=sizes, mode=mode, backend="triton")
    _assert_matches_reference(out, rewards, mode, group_sizes=sizes.tolist())
    out = rlloss.group_advantages(rewards[: 512 * 16], group_size=16, mode=mode, backend="triton")
    _assert_matches_reference(out, rewards[: 512 * 16], mode, group_size=16)
