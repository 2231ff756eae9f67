"""Property tests (hypothesis, issue #11): every public op on the ``torch`` backend in float32 against the
``reference`` backend in float64, over random shapes (length-1 and fully masked rows included), masks, every
loss preset, extreme logits (scale up to 1e3, large offsets), temperatures and all-equal reward groups.

Tolerances are not hand-picked per op: for each output,

    ‖torch32 − ref64‖∞ ≤ 4·‖naive32 − ref64‖∞ + ULPS·eps32·scale

where naive32 is the oracle's formula evaluated in float32 on the same (float32-representable) inputs — the
``reference`` backend on float32 inputs, or, for advantages and credit, whose oracle always computes in float64,
the same formula written out here — and ``scale`` is, elementwise, the first-order float32 rounding of that
output in units of eps32 (derived in the docstrings of softmax_rounding, linear_rounding, policy_rounding,
attention_rounding and the advantage / credit tests). The torch algorithm may thus be as far from the truth as
four naive float32 computations plus a few of its own roundings: a 1e-5 relative error in any output fails.
Ignored / masked positions are checked to be exactly 0, switched-off inputs to leave results bit-identical.

Profiles (tests/conftest.py): "ci" (default, 25 derandomized examples per property) and "long"
(``--hypothesis-profile=long`` or RLLOSS_HYPOTHESIS_PROFILE=long, 1000 random examples). No property sets
max_examples itself, so the profile decides.
"""
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import rlloss
from rlloss import LossConfig, reference
from rlloss.config import PRESETS

F32, F64 = torch.float32, torch.float64
EPS32 = torch.finfo(F32).eps
ULPS = 8  # "a few ulps" of the scale, for outputs where the naive float32 formula happens to round well
NAN = math.nan

seeds = st.integers(0, 2**31 - 1)
# Logit magnitudes from tiny to extreme and offsets far from 0 (log-probs are shift invariant).
logit_scales = st.sampled_from([1e-3, 0.1, 1.0, 4.0, 30.0, 1e3])
logit_offsets = st.sampled_from([0.0, -7.5, 100.0, -1e3, 1e4])
temperatures = st.sampled_from([0.25, 0.7, 1.0, 3.0])
# Row patterns of a [B, T] mask: all counted, none counted (a fully masked row), or random.
row_patterns = st.sampled_from(["all", "none", "random"])


def assert_close(what, actual, naive, ref, scale):
    """|actual − ref| ≤ 4·‖naive − ref‖∞ + ULPS·eps32·scale elementwise (see the module docstring); ``scale``
    is a number or a tensor of ref's shape, in units of one rounding."""
    actual, naive, ref = (x.detach().to(F64) for x in (actual, naive, ref))
    assert actual.shape == ref.shape, (what, actual.shape, ref.shape)
    assert torch.isfinite(actual).all(), f"{what}: non-finite output {actual}"
    if ref.numel() == 0:
        return
    naive_err = (naive - ref).abs().max().item()
    scale = torch.as_tensor(scale, dtype=F64).expand(ref.shape)
    tol = 4 * naive_err + ULPS * EPS32 * scale
    excess = (actual - ref).abs() - tol
    worst = int(excess.flatten().argmax())
    err = (actual - ref).abs().flatten()[worst].item()
    assert excess.flatten()[worst] <= 0, (
        f"{what}: |torch32 - ref64| = {err:.3g} at flat index {worst} > tol {tol.flatten()[worst].item():.3g} "
        f"(4 x naive32 error {naive_err:.3g} + {ULPS} ulps x scale {scale.flatten()[worst].item():.3g}); "
        f"|ref| max {ref.abs().max().item():.3g}")


def softmax_rounding(z, z_err, targets, live, g_lp, g_ent, g_lp_err=None, g_ent_err=None):
    """First-order float32 rounding, in units of eps32, of a softmax head (docs/math.md §1) and its gradient.

    z [N, V]: the float64 logits as used (after the soft-cap and the temperature); z_err [N, V]: their own
    rounding; targets, live, g_lp, g_ent [N]: targets, counted rows and the upstream gradients of the
    log-prob and the entropy. Each p_v = exp(z_v − lse) carries a relative rounding
    K_v = 1 + |z_v| + z_err_v + |lse| + V (its exponent, the lse and the V-term sums), whence:

    - lse: |lse| + Σ p·(|z − M| + z_err) + V; log p_y = z_y − lse: that + |z_y| + z_err_y + 1;
    - H = log A − C/A (C = Σ (z − M)·e^{z−M}): the lse's + Σ p·|z − M|·(|z − M| + z_err + 2) + |C/A|·(…);
    - dz = g_ℓ·(1[v=y] − p) − g_H·p·(z − μ): p·K·(|g_ℓ| + |g_H|·|z − μ|) + |g_H|·p·(|z| + z_err + |μ| + 1) + |dz|.

    ``g_lp_err`` / ``g_ent_err`` [N]: the rounding the upstream gradients already carry (the fused path),
    passed on through 1[v=y] + p and p·|z − μ|. Returns (lp_err [N], ent_err [N], dz [N, V], dz_err [N, V]);
    0 on rows that are not live.
    """
    zero = torch.zeros((), dtype=F64)
    z = torch.where(live[:, None], z.to(F64), zero)
    z_err = torch.where(live[:, None], z_err.to(F64), zero)
    g_lp = torch.where(live, g_lp.to(F64), zero)[:, None]
    g_ent = torch.where(live, g_ent.to(F64), zero)[:, None]
    V = z.shape[1]
    lse = torch.logsumexp(z, 1, keepdim=True)
    p = torch.exp(z - lse)
    mu = (p * z).sum(1, keepdim=True)
    gap = (z - z.amax(1, keepdim=True)).abs()
    y = torch.where(live, targets, 0)[:, None]
    onehot = torch.zeros_like(z).scatter_(1, y, 1.0)
    lse_err = lse.abs() + (p * (gap + z_err)).sum(1, keepdim=True) + V
    lp_err = lse_err + z.gather(1, y).abs() + z_err.gather(1, y) + 1
    ratio = (p * gap).sum(1, keepdim=True)  # |C/A|
    ent_err = lse_err + (p * gap * (gap + z_err + 2)).sum(1, keepdim=True) + ratio * (lse_err - lse.abs())
    K = 1 + z.abs() + z_err + lse.abs() + V
    dz = g_lp * (onehot - p) - g_ent * p * (z - mu)
    dz_err = (p * K * (g_lp.abs() + g_ent.abs() * (z - mu).abs())
              + g_ent.abs() * p * (z.abs() + z_err + mu.abs() + 1) + dz.abs() + g_lp.abs() * onehot)
    if g_lp_err is not None:
        dz_err = dz_err + g_lp_err.to(F64)[:, None] * (onehot + p) + g_ent_err.to(F64)[:, None] * p * (z - mu).abs()
    rows = live.to(F64)
    return lp_err.squeeze(1) * rows, ent_err.squeeze(1) * rows, dz, dz_err * rows[:, None]


def _generator(seed):
    return torch.Generator().manual_seed(seed)


def _randn(gen, *shape, scale=1.0, offset=0.0):
    """float32 values (so the float64 reference sees exactly the same inputs)."""
    return (torch.randn(*shape, generator=gen, dtype=F64) * scale + offset).to(F32)


def _mask(gen, patterns, T):
    rows = []
    for pattern in patterns:
        if pattern == "all":
            rows.append(torch.ones(T, dtype=torch.bool))
        elif pattern == "none":
            rows.append(torch.zeros(T, dtype=torch.bool))
        else:
            rows.append(torch.rand(T, generator=gen) < 0.6)
    return torch.stack(rows)


@st.composite
def _shapes(draw, max_b=3, max_t=6):
    """(B, T, row patterns): sizes 1 included, every row pattern possible."""
    B = draw(st.integers(1, max_b))
    T = draw(st.integers(1, max_t))
    return B, T, draw(st.lists(row_patterns, min_size=B, max_size=B))


def _leaves(*tensors, dtype):
    return [None if x is None else x.detach().to(dtype).requires_grad_() for x in tensors]


def _grads(loss, leaves):
    """Gradients of ``loss`` w.r.t. each leaf (None for a None leaf; zeros for a leaf the loss ignores)."""
    grads = iter(torch.autograd.grad(loss, [x for x in leaves if x is not None], allow_unused=True))
    out = []
    for x in leaves:
        g = None if x is None else next(grads)
        out.append(torch.zeros_like(x) if x is not None and g is None else g)
    return out


def _zero_where_ignored(what, values, ignored):
    """Ignored / masked positions give exactly 0, whatever garbage their inputs hold."""
    if values is not None and ignored.any():
        assert (values.detach()[ignored] == 0).all(), f"{what} is not exactly 0 at ignored positions"


# --- log-probs from logits (docs/math.md §1) --------------------------------------------------------------------


@given(shape=_shapes(), v=st.integers(1, 48), seed=seeds, scale=logit_scales, offset=logit_offsets,
       temperature=temperatures)
def test_logprobs_from_logits(shape, v, seed, scale, offset, temperature):
    B, T, patterns = shape
    gen = _generator(seed)
    live = _mask(gen, patterns, T)
    logits = _randn(gen, B, T, v, scale=scale, offset=offset)
    targets = torch.randint(0, v, (B, T), generator=gen)
    targets[~live] = -100
    logits[~live] = NAN  # ignored rows: their garbage never matters
    g_lp, g_ent = _randn(gen, B, T), _randn(gen, B, T)

    outputs = {}
    for name, dtype, backend in (("torch", F32, "torch"), ("naive", F32, "reference"), ("ref", F64, "reference")):
        (x,) = _leaves(logits, dtype=dtype)
        out = rlloss.logprobs_from_logits(x, targets, temperature=temperature, return_entropy=True,
                                          backend=backend)
        loss = (out.logprobs * g_lp.to(dtype)).sum() + (out.entropy * g_ent.to(dtype)).sum()
        outputs[name] = (out.logprobs, out.entropy, *_grads(loss, [x]))
    z = logits.double().reshape(-1, v) / temperature
    lp_err, ent_err, _, dz_err = softmax_rounding(z, 2 * z.abs(), targets.reshape(-1), live.reshape(-1),
                                                  g_lp.reshape(-1), g_ent.reshape(-1))
    scales = (lp_err.view(B, T), ent_err.view(B, T), dz_err.view(B, T, v) / temperature)  # z = logits·(1/T)
    for what, actual, naive, ref, s in zip(("logprobs", "entropy", "dlogits"), *outputs.values(), scales):
        assert_close(what, actual, naive, ref, s)
    lp, ent, dlogits = outputs["torch"]
    _zero_where_ignored("logprobs", lp, ~live)
    _zero_where_ignored("entropy", ent, ~live)
    _zero_where_ignored("dlogits", dlogits, ~live)
    assert (ent >= 0).all() and (lp <= 0).all()


# --- log-probs from hidden states and the lm_head (docs/math.md §1) ---------------------------------------------


def linear_rounding(hidden, weight, bias, live, temperature, softcap):
    """(h, z, z_err, dz/dx) of z = cap(h·Wᵀ + b)/T on the live rows [N, D] → [N, V], float64 (h with the
    rows that are not live zeroed): the length-D dot
    products round to (D + 1)·(|h|·|W|ᵀ + |b|) (γ_{D+1}), the cap c·tanh(x/c) passes that on times 1 − t²
    and adds two roundings of c·t, the temperature one of z."""
    h = torch.where(live[:, None], hidden.to(F64), torch.zeros((), dtype=F64))
    w = weight.to(F64)
    b = bias.to(F64) if bias is not None else torch.zeros(w.shape[0], dtype=F64)
    x = h @ w.T + b
    x_err = (h.shape[1] + 1) * (h.abs() @ w.abs().T + b.abs()) + x.abs()
    if softcap is None:
        slope = torch.ones_like(x)
        capped, cap_err = x, x_err
    else:
        t = torch.tanh(x / softcap)
        slope = 1 - t * t
        capped, cap_err = softcap * t, x_err * slope + 2 * (softcap * t).abs()
    z = capped / temperature
    return h, z, cap_err / temperature + z.abs(), slope / temperature


@given(shape=_shapes(), v=st.integers(1, 40), d=st.integers(1, 12), seed=seeds, scale=logit_scales,
       temperature=temperatures, softcap=st.sampled_from([None, 0.5, 30.0]), use_bias=st.booleans())
def test_token_logprobs(shape, v, d, seed, scale, temperature, softcap, use_bias):
    B, T, patterns = shape
    gen = _generator(seed)
    live = _mask(gen, patterns, T)
    hidden = _randn(gen, B, T, d, scale=scale / math.sqrt(d))
    weight = _randn(gen, v, d)
    bias = _randn(gen, v, scale=scale, offset=0.5 * scale) if use_bias else None
    targets = torch.randint(0, v, (B, T), generator=gen)
    targets[~live] = -100
    hidden[~live] = NAN
    g_lp, g_ent = _randn(gen, B, T), _randn(gen, B, T)

    outputs = {}
    for name, dtype, backend in (("torch", F32, "torch"), ("naive", F32, "reference"), ("ref", F64, "reference")):
        h, w, b = _leaves(hidden, weight, bias, dtype=dtype)
        out = rlloss.token_logprobs(h, w, targets, bias=b, temperature=temperature, softcap=softcap,
                                    return_entropy=True, backend=backend)
        loss = (out.logprobs * g_lp.to(dtype)).sum() + (out.entropy * g_ent.to(dtype)).sum()
        outputs[name] = (out.logprobs, out.entropy, *_grads(loss, [h, w, b]))

    rows = live.reshape(-1)
    h, z, z_err, slope = linear_rounding(hidden.reshape(-1, d), weight, bias, rows, temperature, softcap)
    lp_err, ent_err, dz, dz_err = softmax_rounding(z, z_err, targets.reshape(-1), rows, g_lp.reshape(-1),
                                                   g_ent.reshape(-1))
    # dx = dz·dz/dx (1 − t² rounds to 2 ulps of 1), then the products with W (γ_V) and h (γ_N).
    dx, dx_err = dz * slope, (dz_err + 2 * dz.abs()) * slope
    W, N = weight.double().abs(), B * T
    scales = {
        "logprobs": lp_err.view(B, T), "entropy": ent_err.view(B, T),
        "dhidden": (dx_err @ W + v * dx.abs() @ W).view(B, T, d),
        "dweight": dx_err.T @ h.abs() + N * dx.abs().T @ h.abs(),
        "dbias": dx_err.sum(0) + N * dx.abs().sum(0),
    }
    for what, actual, naive, ref in zip(scales, *outputs.values()):
        if ref is not None:
            assert_close(what, actual, naive, ref, scales[what])
    lp, ent, dh, _, _ = outputs["torch"]
    _zero_where_ignored("logprobs", lp, ~live)
    _zero_where_ignored("dhidden", dh, ~live)
    assert (ent >= 0).all()


# --- group advantages (docs/math.md §2) -------------------------------------------------------------------------


def _lower_median(x):
    return x.sort().values[(x.numel() - 1) // 2]


def _naive_advantages(rewards, sizes, mode, eps):
    """docs/math.md §2 written plainly (as rlloss.reference does, which always computes in float64), evaluated in
    the rewards' own dtype: the naive float32 computation of the case."""
    batch_std = rewards.std() if rewards.numel() > 1 else torch.zeros((), dtype=rewards.dtype)
    out, begin = [], 0
    for G in sizes:
        r = rewards[begin: begin + G]
        begin += G
        if bool((r == r[0]).all()):
            out.append(torch.zeros_like(r))
            continue
        if mode == "rank_gaussian":
            rank = (r[None, :] < r[:, None]).sum(1) + ((r[None, :] == r[:, None]).sum(1) + 1) / 2
            out.append(torch.special.ndtri((rank.to(r.dtype) - 0.5) / G))
            continue
        centered = r - (_lower_median(r) if mode.startswith("median") else r.mean())
        denom = {"grpo": r.std() + eps, "batch_std": batch_std + eps, "rloo": (G - 1) / G,
                 "median_mad": _lower_median(centered.abs()) + eps}.get(mode, 1.0)
        out.append(centered / denom if denom > 0 else torch.zeros_like(r))
    return torch.cat(out)


def _advantage_scale(rewards, sizes, mode, eps, ref):
    """Per group, the centred rewards round to eps·max|R − R_0| (both backends centre around a group member)
    and are divided by the group's denominator (σ_g, σ_batch or MAD, + ε), itself relatively that accurate;
    rank_gaussian depends on comparisons only: its scale is |A|."""
    r = rewards.double()
    scale, begin = ref.abs().max().item() if ref.numel() else 0.0, 0
    for size in sizes:
        g = r[begin: begin + size]
        spread = (g - g[0]).abs().max().item() * (2 + size / max(size - 1, 1))
        if mode == "grpo":
            denom = (g.std().item() if size > 1 else 0.0) + eps
        elif mode == "batch_std":
            denom = (r.std().item() if r.numel() > 1 else 0.0) + eps
        elif mode == "median_mad":
            denom = _lower_median((g - _lower_median(g)).abs()).item() + eps
        else:
            denom = 1.0
        if mode != "rank_gaussian" and denom > 0:
            scale = max(scale, spread / denom * (1 + ref[begin: begin + size].abs().max().item()))
        begin += size
    return scale


@st.composite
def _reward_batches(draw):
    """Groups of 1–6 rewards: continuous, tied (a few distinct values) or all equal, on a random offset."""
    sizes = draw(st.lists(st.integers(1, 6), min_size=1, max_size=5))
    gen = _generator(draw(seeds))
    offset = draw(st.sampled_from([0.0, 1.0, -300.0, 1e4]))
    spread = draw(st.sampled_from([1e-3, 1.0, 50.0]))
    groups = []
    for size in sizes:
        kind = draw(st.sampled_from(["continuous", "tied", "equal"]))
        if kind == "continuous":
            groups.append(torch.randn(size, generator=gen, dtype=F64) * spread)
        elif kind == "tied":
            groups.append(torch.randint(0, 3, (size,), generator=gen).to(F64) * spread)
        else:
            groups.append(torch.full((size,), torch.randn((), generator=gen, dtype=F64).item() * spread))
    return sizes, (torch.cat(groups) + offset).to(F32)


# The modes of docs/math.md §2 that take nothing but the rewards (others need extra per-completion inputs).
ADVANTAGE_MODES = [m for m in ("grpo", "no_std", "batch_std", "rloo", "median", "median_mad", "rank_gaussian")
                   if m in rlloss.advantages.ADVANTAGE_MODES]


@given(batch=_reward_batches(), mode=st.sampled_from(ADVANTAGE_MODES),
       eps=st.sampled_from([0.0, 1e-6, 1e-4]), equal_sizes=st.booleans())
def test_group_advantages(batch, mode, eps, equal_sizes):
    sizes, rewards = batch
    kwargs = dict(group_sizes=sizes)
    if equal_sizes:  # the same batch as groups of one size (the other code path)
        sizes = [sizes[0]] * (rewards.numel() // sizes[0])
        rewards = rewards[: sum(sizes)]
        kwargs = dict(group_size=sizes[0])
    out = rlloss.group_advantages(rewards, mode=mode, eps=eps, backend="torch", **kwargs)
    ref = rlloss.group_advantages(rewards.double(), mode=mode, eps=eps, backend="reference", **kwargs)
    naive = _naive_advantages(rewards, sizes, mode, eps)
    assert out.dtype == F32
    assert_close(f"advantages ({mode})", out, naive, ref, _advantage_scale(rewards, sizes, mode, eps, ref))
    begin = 0
    for size in sizes:  # a group of equal rewards (a singleton included) gives exactly 0, never noise
        group = rewards[begin: begin + size]
        if bool((group == group[0]).all()):
            assert (out[begin: begin + size] == 0).all(), f"equal rewards {group.tolist()} gave {out.tolist()}"
        begin += size


# --- policy loss (docs/math.md §3–§6), every preset -------------------------------------------------------------


PRESET_NAMES = sorted(PRESETS)
# The float32 rounding model below (policy_rounding) knows the loss modes ppo_clip, cispo_*, gpg and sapo. The peer
# variants (geo_mean, clip_cov, kl_cov, dppo_*, dro, vespo) are held to the float64 reference at fixed tolerances
# instead: tests/test_policy.py (random configs, every preset) and
# tests/test_presets.py::test_peer_variants_agree_on_every_path (float32 kernel backend, FusedPolicyLoss).
ROUNDING_MODEL_PRESETS = [name for name in PRESET_NAMES
                          if PRESETS[name]["loss_mode"] in ("ppo_clip", "cispo_trl", "cispo_verl", "gpg", "sapo")]


@st.composite
def _configs(draw, names=tuple(PRESET_NAMES)):
    """A preset (one of ``names``) with optional KL, entropy, rollout correction and credit on top."""
    name = draw(st.sampled_from(names))
    extra = {"max_completion_length": draw(st.integers(1, 8))}  # L_norm of dr_grpo; unused elsewhere
    if draw(st.booleans()):
        extra["beta"] = draw(st.sampled_from([0.0, 0.04, 1.0]))
        extra["kl_estimator"] = draw(st.sampled_from(rlloss.config.KL_ESTIMATORS))
    if draw(st.booleans()):
        extra["entropy_coef"] = draw(st.sampled_from([0.01, -0.3]))
    if draw(st.booleans()):
        extra["rollout_correction"] = draw(st.sampled_from(rlloss.config.ROLLOUT_CORRECTIONS))
    if draw(st.booleans()):
        extra["credit"] = draw(st.sampled_from(rlloss.config.CREDIT_MODES))
    mode = PRESETS[name]["loss_mode"]
    if mode == "dro":
        extra["dro_beta"] = 0.5
    if mode == "geo_mean":  # its advantage is the sequence mean: no credit
        extra.pop("credit", None)
    if mode == "vespo" and extra.get("rollout_correction", "").startswith("sequence"):  # token weights only
        extra["rollout_correction"] = extra["rollout_correction"].replace("sequence", "token")
    return LossConfig.preset(name, **extra)


def _aggregation_weights(config, mask, num_items):
    """c_t of the loss Σ_t c_t·L_t (docs/math.md §6), float64 [B, T]."""
    m = mask.double()
    B = mask.shape[0]
    n = m.sum(1, keepdim=True).clamp(min=1)
    agg = config.aggregation
    if agg == "token_mean":
        return m / (num_items if num_items is not None else m.sum().clamp(min=1))
    if agg == "seq_mean_token_mean":
        return m / (n * B)
    if agg == "seq_mean_token_sum":
        return m / B
    if agg == "seq_mean_token_sum_norm":
        return m / (B * config.max_completion_length)
    return m


def policy_rounding(config, inp, live, num_items, g_full, g_policy, lp_err=None, ent_err=None):
    """First-order float32 rounding, in units of eps32, of the policy loss (docs/math.md §3–§7) and of its
    gradients w.r.t. the log-probs and the entropy: (loss_err, dlogprobs_err [B, T], dentropy_err [B, T]).
    ``g_full`` / ``g_policy``: the float64 d(loss)/d(logprobs) of the config and of its policy term alone
    (β = c_H = 0), whose relative rounding is the policy term's (clipped tokens have none).

    ``lp_err`` / ``ent_err`` [B, T]: the rounding the log-probs and entropies already carry (the fused path).
    Per token: u = ℓ − ℓ° rounds to |ℓ| + |ℓ°| (+ lp_err), a relative error of ρ = e^u (for sequence ratios
    summed over the row); Â = A·((1 − λ) + λw) to |A|·(1 + 2(|ℓ⁺| + |base|)); the policy term P (≤ |Â|·ρ̄, ρ̄ the
    ratio or its clip bound, ·|ℓ| for CISPO/GPG, ·4/τ for SAPO) to P·(its factors' errors); the rollout weight
    (≤ C_max) to 1 + |ℓ°| + |ℓˢ|; KL(x), x = ℓʳ − ℓ, to (e^x + |x| + 1)·(1 + |ℓʳ| + |ℓ|); c_H·H to
    |c_H|·(|H| + ent_err). M_t sums these; the loss Σ c_t·L_t adds the (B + T)-term sums' rounding. The
    gradient is the policy part's times its relative rounding R_t, plus the KL part's absolute one (x's
    rounding times |d²KL/dx²|); GSPO's sequence ratio with per-token advantages adds a row's Σ c·P·R / n
    (terms of both signs meet in the row sum).
    """
    zero = torch.zeros((), dtype=F64)
    m = live

    def load(key):
        x = inp[key].double()
        if x.ndim == 1:
            x = x[:, None].expand(m.shape)
        return torch.where(m, x, zero)

    lp = load("logprobs")
    lp_err = zero if lp_err is None else torch.where(m, lp_err.double(), zero)
    on_policy = inp.get("old_logprobs") is None
    old = lp if on_policy else load("old_logprobs")
    mag = lp.abs() + old.abs() + lp_err
    u = lp - old
    lo = -math.inf if config.log_ratio_min is None else config.log_ratio_min
    hi = math.inf if config.log_ratio_max is None else config.log_ratio_max
    n = m.double().sum(1, keepdim=True).clamp(min=1)
    if config.importance_sampling_level == "token":
        rho, r = torch.exp(u.clamp(lo, hi)), 1 + mag + u.abs()
    else:
        rho = torch.exp(((u.sum(1, keepdim=True) / n).clamp(lo, hi))).expand(m.shape)
        r = (1 + mag + u.abs()).sum(1, keepdim=True).expand(m.shape) + n
    A = load("advantages").abs()
    if config.credit is not None:
        base = load("neg_logprobs") if config.credit == "cepo" else old
        A_err = A * (1 + 2 * (load("pos_logprobs").abs() + base.abs() + lp_err))
        A = 2 * A
    else:
        A_err = torch.zeros_like(A)
    bound = config.epsilon_high if config.loss_mode == "cispo_trl" else 1 + config.epsilon_high
    rho_bar = torch.maximum(rho, torch.full_like(rho, max(bound, config.delta or 0.0)))
    lf = 1 + lp.abs() if config.loss_mode in ("cispo_trl", "cispo_verl", "gpg") else torch.ones_like(lp)
    sapo = 4 / min(config.sapo_tau_pos, config.sapo_tau_neg) if config.loss_mode == "sapo" else 1.0
    P_mag = A * rho_bar * lf * sapo
    R = r + mag + 2 + torch.where(A > 0, A_err / A.clamp(min=1e-300), zero)  # relative rounding of P
    if config.rollout_correction is not None:
        r_w = 1 + old.abs() + load("rollout_logprobs").abs()
        if config.rollout_correction.startswith("sequence"):
            r_w = r_w.sum(1, keepdim=True).expand(m.shape)
        R = R + r_w
        P_mag = config.rollout_threshold_high * P_mag
    L_mag, M = P_mag, P_mag * R
    kl_grad = zero
    if inp.get("ref_logprobs") is not None:
        x = load("ref_logprobs") - lp
        kl_mag = x.exp() + x.abs() + 1
        kl_err = kl_mag * (2 + load("ref_logprobs").abs() + lp.abs() + lp_err)
        if config.kl_ratio_weighted:
            kl_err, kl_mag = (kl_err + kl_mag * r) * rho_bar, kl_mag * rho_bar
        L_mag, M = L_mag + abs(config.beta) * kl_mag, M + abs(config.beta) * kl_err
        kl_grad = abs(config.beta) * kl_err
    ent_err = zero if ent_err is None else torch.where(m, ent_err.double(), zero)
    if inp.get("entropy") is not None:
        H = load("entropy").abs()
        L_mag, M = L_mag + abs(config.entropy_coef) * H, M + abs(config.entropy_coef) * (H + ent_err + 1)
    c = _aggregation_weights(config, m, num_items)
    B, T = m.shape
    cM, cL = torch.where(m, c * M, zero), torch.where(m, c * L_mag, zero)
    loss_err = (cM + (B + T + 2) * cL).sum().item()
    d_lp = g_policy.abs() * R + c * kl_grad + 2 * g_full.abs()
    if config.importance_sampling_level == "sequence" and inp["advantages"].ndim == 2:
        d_lp = d_lp + (c * P_mag * R).sum(1, keepdim=True) / n
    d_lp = torch.where(m, d_lp, zero)
    d_ent = torch.where(m, 2 * abs(config.entropy_coef) * c, zero)
    return loss_err, d_lp, d_ent


def _reference_policy_grads(config, logprobs, entropy, advantages, live, others, num_items=None):
    """float64 d(loss)/d(logprobs) of ``config`` and of its policy term alone (β = c_H = 0), on the reference."""
    grads = []
    for cfg in (config, config.replace(beta=0.0, entropy_coef=0.0)):
        lp = logprobs.detach().double().requires_grad_()
        out = rlloss.policy_loss(lp, advantages=advantages.double(), mask=live, config=cfg,
                                 entropy=None if entropy is None else entropy.double(), num_items_in_batch=num_items,
                                 backend="reference", **{k: (None if x is None else x.double()) for k, x in others.items()})
        (g,) = torch.autograd.grad(out.loss, lp)
        grads.append(g)
    return grads


def _policy_inputs(gen, B, T, live, config, spread, lp=None):
    """float32 [B, T] inputs (masked tokens poisoned with NaN/inf) and which of them the config needs; the
    other log-probs lie near ``lp`` (default: fresh ones in [-3, 0))."""
    if lp is None:
        lp = -(torch.rand(B, T, generator=gen, dtype=F64) * 3 + 0.01).to(F32)
    lp = torch.where(live, lp, torch.zeros(()))
    near = lambda s: (lp.double() + s * torch.randn(B, T, generator=gen, dtype=F64)).to(F32)  # noqa: E731
    inp = dict(logprobs=lp, old_logprobs=near(spread), advantages=_randn(gen, B),
               ref_logprobs=near(0.5), entropy=(torch.rand(B, T, generator=gen) * 3).to(F32),
               rollout_logprobs=near(spread), pos_logprobs=near(1.0), neg_logprobs=near(1.0))
    if config.beta == 0 and torch.rand((), generator=gen) < 0.5:
        inp["ref_logprobs"] = None
    if config.rollout_correction is None:
        inp["rollout_logprobs"] = None
    if config.credit is None:
        inp["pos_logprobs"] = inp["neg_logprobs"] = None
    elif config.credit == "rlsd":
        inp["neg_logprobs"] = None
    for key, x in inp.items():
        if x is not None and x.ndim == 2:
            inp[key] = torch.where(live, x, torch.full_like(x, NAN if key != "old_logprobs" else math.inf))
    return inp


@pytest.mark.parametrize("preset", ROUNDING_MODEL_PRESETS)
@given(data=st.data(), shape=_shapes(max_b=4, max_t=7), seed=seeds, spread=st.sampled_from([0.0, 0.1, 1.0]),
       on_policy=st.booleans(), per_token_adv=st.booleans(), num_items=st.sampled_from([None, 5]))
def test_policy_loss(preset, data, shape, seed, spread, on_policy, per_token_adv, num_items):
    config = data.draw(_configs([preset]), label="config")
    B, T, patterns = shape
    gen = _generator(seed)
    live = _mask(gen, patterns, T)
    inp = _policy_inputs(gen, B, T, live, config, spread)
    if on_policy:
        inp["old_logprobs"] = None
    if per_token_adv:
        inp["advantages"] = _randn(gen, B, T)
    if config.aggregation != "token_mean":
        num_items = None

    outputs = {}
    for name, dtype, backend in (("torch", F32, "torch"), ("naive", F32, "reference"), ("ref", F64, "reference")):
        lp, ent = _leaves(inp["logprobs"], inp["entropy"], dtype=dtype)
        cast = {k: (None if v is None else v.to(dtype)) for k, v in inp.items()}
        out = rlloss.policy_loss(lp, cast["old_logprobs"], cast["advantages"], live, config=config,
                                 ref_logprobs=cast["ref_logprobs"], entropy=ent,
                                 rollout_logprobs=cast["rollout_logprobs"], pos_logprobs=cast["pos_logprobs"],
                                 neg_logprobs=cast["neg_logprobs"], num_items_in_batch=num_items, backend=backend)
        outputs[name] = (out.loss, *_grads(out.loss, [lp, ent]))
    others = {k: inp[k] for k in ("old_logprobs", "ref_logprobs", "rollout_logprobs", "pos_logprobs", "neg_logprobs")}
    grads = _reference_policy_grads(config, inp["logprobs"], inp["entropy"], inp["advantages"], live, others, num_items)
    scales = policy_rounding(config, inp, live, num_items, *grads)
    for what, actual, naive, ref, scale in zip(("loss", "dlogprobs", "dentropy"), *outputs.values(), scales):
        assert_close(f"{what} ({config})", actual, naive, ref, scale)
    _, dlp, dent = outputs["torch"]
    _zero_where_ignored("dlogprobs", dlp, ~live)
    _zero_where_ignored("dentropy", dent, ~live)


@given(shape=_shapes(max_b=3, max_t=6), config=_configs(), seed=seeds,
       ref_garbage=st.sampled_from([NAN, math.inf, -math.inf, 150.0, -1e4]),
       entropy_garbage=st.sampled_from([NAN, math.inf, -math.inf]))
def test_switched_off_inputs_never_matter(shape, config, seed, ref_garbage, entropy_garbage):
    """β = 0 and c_H = 0 switch the KL and the entropy off: whatever ref_logprobs and entropy hold on counted
    tokens (NaN, ±inf, or log-probs so far apart that e^x overflows float32), the loss and the gradient are
    those of a call without them (DESIGN.md, NaN contract)."""
    config = config.replace(beta=0.0, entropy_coef=0.0)
    B, T, patterns = shape
    gen = _generator(seed)
    live = _mask(gen, patterns, T)
    inp = _policy_inputs(gen, B, T, live, config, 0.1)
    spoiled = torch.rand(B, T, generator=gen) < 0.5
    ref = torch.where(spoiled, torch.full((B, T), ref_garbage), inp["logprobs"])
    entropy = torch.where(spoiled, torch.full((B, T), entropy_garbage), inp["entropy"])
    others = {k: inp[k] for k in ("old_logprobs", "rollout_logprobs", "pos_logprobs", "neg_logprobs")}
    results = []
    for extra in ({}, dict(ref_logprobs=ref, entropy=entropy)):
        lp = inp["logprobs"].clone().requires_grad_()
        out = rlloss.policy_loss(lp, advantages=inp["advantages"], mask=live, config=config, backend="torch",
                                 **others, **extra)
        results.append((out.loss, *torch.autograd.grad(out.loss, lp)))
    for what, with_garbage, without in zip(("loss", "dlogprobs"), results[1], results[0]):
        assert torch.equal(with_garbage, without), f"{what}: {with_garbage} != {without} ({config})"


# --- the fused hidden-states → loss path -------------------------------------------------------------------


@given(shape=_shapes(max_b=3, max_t=5), config=_configs(), v=st.integers(1, 24), d=st.integers(1, 8), seed=seeds,
       scale=st.sampled_from([0.1, 1.0, 10.0]), temperature=temperatures, softcap=st.sampled_from([None, 5.0]))
def test_fused_policy_loss(shape, config, v, d, seed, scale, temperature, softcap):
    B, T, patterns = shape
    gen = _generator(seed)
    live = _mask(gen, patterns, T)
    hidden = _randn(gen, B, T, d, scale=scale / math.sqrt(d))
    weight = _randn(gen, v, d)
    targets = torch.randint(0, v, (B, T), generator=gen)
    # The old, reference, rollout and teacher log-probs lie near the policy's own (as in training).
    rows, counted = live.reshape(-1), torch.where(live, targets, -100)
    own = reference.token_logprobs(hidden.reshape(-1, d).double(), weight.double(), counted.reshape(-1),
                                   temperature=temperature, softcap=softcap)[0].view(B, T).to(F32)
    inp = _policy_inputs(gen, B, T, live, config, 0.1, lp=own)
    targets[~live] = v + 7  # never read where the mask is 0
    hidden[~live] = NAN
    policy_kw = {k: inp[k] for k in ("old_logprobs", "ref_logprobs", "rollout_logprobs", "pos_logprobs",
                                     "neg_logprobs")}

    outputs = {}
    for name, dtype, backend in (("torch", F32, "torch"), ("naive", F32, "reference"), ("ref", F64, "reference")):
        h, w = _leaves(hidden, weight, dtype=dtype)
        cast = {k: (None if x is None else x.to(dtype)) for k, x in policy_kw.items()}
        out = rlloss.FusedPolicyLoss(config, temperature=temperature, softcap=softcap, backend=backend)(
            h, w, targets, live, inp["advantages"].to(dtype), **cast)
        outputs[name] = (out.loss, *_grads(out.loss, [h, w]))

    # The float64 log-probs, entropies and d(loss)/d(them) the fused path forms, and their rounding.
    h64, z, z_err, slope = linear_rounding(hidden.reshape(-1, d), weight, None, rows, temperature, softcap)
    lp64, ent64 = (x.view(B, T).detach().requires_grad_() for x in reference.token_logprobs(
        h64, weight.double(), counted.reshape(-1), temperature=temperature, softcap=softcap))
    inner = rlloss.policy_loss(lp64, advantages=inp["advantages"].double(), mask=live, config=config,
                               entropy=ent64, backend="reference",
                               **{k: (None if x is None else x.double()) for k, x in policy_kw.items()})
    g_lp, g_ent = torch.autograd.grad(inner.loss, [lp64, ent64], allow_unused=True)
    g_ent = torch.zeros_like(ent64) if g_ent is None else g_ent
    zeros = torch.zeros(B * T, dtype=F64)
    lp_err, ent_err, _, _ = softmax_rounding(z, z_err, counted.reshape(-1), rows, zeros, zeros)
    grads = _reference_policy_grads(config, lp64, ent64, inp["advantages"], live, policy_kw)
    loss_err, dlp_err, dent_err = policy_rounding(config, {**inp, "logprobs": lp64.detach(), "entropy": ent64.detach()},
                                                  live, None, *grads, lp_err.view(B, T), ent_err.view(B, T))
    _, _, dz, dz_err = softmax_rounding(z, z_err, counted.reshape(-1), rows, g_lp.reshape(-1), g_ent.reshape(-1),
                                        dlp_err.reshape(-1), dent_err.reshape(-1))
    dx, dx_err = dz * slope, (dz_err + 2 * dz.abs()) * slope
    W, N = weight.double().abs(), B * T
    scales = (loss_err, (dx_err @ W + v * dx.abs() @ W).view(B, T, d), dx_err.T @ h64.abs() + N * dx.abs().T @ h64.abs())
    for what, actual, naive, ref, s in zip(("loss", "dhidden", "dweight"), *outputs.values(), scales):
        assert_close(f"{what} ({config})", actual, naive, ref, s)
    _zero_where_ignored("dhidden", outputs["torch"][1], ~live)


# --- contrastive credit (docs/math.md §7) -----------------------------------------------------------------------


@given(shape=_shapes(max_b=4, max_t=8), seed=seeds, mode=st.sampled_from(["cepo", "rlsd"]),
       lam=st.sampled_from([0.0, 0.5, 1.0]), eps_w=st.sampled_from([0.0, 0.2, 0.9]),
       spread=st.sampled_from([1e-3, 1.0, 1e3]), per_token=st.booleans(), zero_adv=st.booleans())
def test_contrastive_credit(shape, seed, mode, lam, eps_w, spread, per_token, zero_adv):
    B, T, patterns = shape
    gen = _generator(seed)
    live = _mask(gen, patterns, T)
    adv = _randn(gen, B, T) if per_token else _randn(gen, B)
    if zero_adv:
        adv[0] = 0.0
    pos = _randn(gen, B, T, scale=spread, offset=-2.0)
    other = _randn(gen, B, T, scale=spread, offset=-2.0)
    poisoned = [torch.where(live, x, torch.full_like(x, NAN)) for x in (pos, other)]
    key = "neg_logprobs" if mode == "cepo" else "base_logprobs"
    kw = dict(credit=mode, credit_lambda=lam, credit_eps_w=eps_w)
    out = rlloss.contrastive_credit(adv, live, poisoned[0], backend="torch", **{key: poisoned[1]}, **kw)
    ref = rlloss.contrastive_credit(adv.double(), live, poisoned[0].double(), backend="reference",
                                    **{key: poisoned[1].double()}, **kw)
    # The formula as the oracle writes it, in float32: Â = A·((1 − λ) + λ·clip(e^{sign(A)·Δ}, 1 ± ε_w))·m.
    a = adv[:, None].expand(B, T) if adv.ndim == 1 else adv
    w = torch.exp(torch.sign(a) * (pos - other)).clamp(1 - eps_w, 1 + eps_w)
    naive = torch.where(live, a * ((1 - lam) + lam * w), torch.zeros(()))
    # Δ rounds to eps·(|ℓ⁺| + |ℓ⁻|); the clip keeps e^x within [1 − ε_w, 1 + ε_w], so Â moves by |A|·λ·that.
    scale = (a.abs() * (1 + pos.abs() + other.abs())).max().item()
    assert out.dtype == F32
    assert_close(f"credit ({mode})", out, naive, ref, scale)
    _zero_where_ignored("credit", out, ~live)
    _zero_where_ignored("credit", out, (a == 0).expand(B, T))
    assert (torch.sign(out) == torch.sign(torch.where(live, a, torch.zeros(())))).all()


# --- shared-prefix attention (docs/math.md §8) ------------------------------------------------------------------


@st.composite
def _forests(draw):
    """A random forest of 1–7 segments of 1–5 tokens in stream order (each parent precedes its children)."""
    S = draw(st.integers(1, 7))
    lengths = draw(st.lists(st.integers(1, 5), min_size=S, max_size=S))
    parents = [-1] + [draw(st.integers(-1, i - 1)) for i in range(1, S)]
    return rlloss.SharedPrefixLayout.from_tree(lengths, parents)


@given(layout=_forests(), heads=st.sampled_from([(1, 1), (2, 1), (4, 2)]), d=st.integers(1, 16), seed=seeds,
       scale=st.sampled_from([0.1, 1.0, 8.0]), softmax_scale=st.sampled_from([None, 0.05, 2.0]))
def test_shared_prefix_attention(layout, heads, d, seed, scale, softmax_scale):
    Hq, Hkv = heads
    n = layout.total_tokens
    gen = _generator(seed)
    q, k, v = _randn(gen, n, Hq, d, scale=scale), _randn(gen, n, Hkv, d, scale=scale), _randn(gen, n, Hkv, d)
    do = _randn(gen, n, Hq, d)
    outputs = {}
    for name, dtype, backend in (("torch", F32, "torch"), ("naive", F32, "reference"), ("ref", F64, "reference")):
        leaves = _leaves(q, k, v, dtype=dtype)
        out = rlloss.shared_prefix_attention(*leaves, layout, scale=softmax_scale, backend=backend)
        outputs[name] = (out, *torch.autograd.grad(out, leaves, do.to(dtype)))
    scales = attention_rounding(q, k, v, do, layout, 1 / math.sqrt(d) if softmax_scale is None else softmax_scale)
    for what, actual, naive, ref, sc in zip(("out", "dq", "dk", "dv"), *outputs.values(), scales):
        assert_close(what, actual, naive, ref, sc)


def attention_rounding(q, k, v, do, layout, s):
    """First-order float32 rounding, in units of eps32, of masked attention and its gradients (docs/math.md §8),
    from the dense float64 problem: a score S = s·q·k rounds to (d + 1)·s·|q|·|k|, a weight P = exp(S − lse)
    relatively to K = 1 + that + |S| + |lse| + T; O = P·v, dv = Pᵀ·do, dP = do·vᵀ (γ_d), δ = Σ P·dP,
    dS = P·(dP − δ), dq = s·dS·k and dk = s·dSᵀ·q (γ_T); the grouped heads' dk, dv summed over the group."""
    q, k, v, do = (x.double() for x in (q, k, v, do))
    Hq, Hkv, d = q.shape[1], k.shape[1], q.shape[2]
    group = Hq // Hkv
    kq, vq = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    allowed = layout.dense_mask()
    zero = torch.zeros((), dtype=F64)
    S = s * torch.einsum("qhd,khd->hqk", q, kq)
    lse = torch.logsumexp(S.masked_fill(~allowed, -math.inf), -1, keepdim=True)
    P = torch.where(allowed, torch.exp(S - lse), zero)
    n = q.shape[0]
    K = torch.where(allowed, 1 + (d + 1) * s * torch.einsum("qhd,khd->hqk", q.abs(), kq.abs()) + S.abs()
                    + lse.abs() + n, zero)
    dP = torch.einsum("qhd,khd->hqk", do, vq)
    dP_err = (d + 1) * torch.einsum("qhd,khd->hqk", do.abs(), vq.abs())
    delta = (P * dP).sum(-1, keepdim=True)
    delta_err = (P * (K * dP.abs() + dP_err)).sum(-1, keepdim=True)
    dS = P * (dP - delta)
    dS_err = P * (K * (dP - delta).abs() + dP_err + delta_err) + (n + 1) * dS.abs()

    def per_kv_head(x):  # [T, Hq, d] → [T, Hkv, d]: the sum over each group of query heads
        return x.view(n, Hkv, group, d).sum(2)

    out_err = torch.einsum("hqk,khd->qhd", P * K, vq.abs())
    dq_err = s * torch.einsum("hqk,khd->qhd", dS_err, kq.abs())
    dk_err = per_kv_head(s * torch.einsum("hqk,qhd->khd", dS_err, q.abs()))
    dv_err = per_kv_head(torch.einsum("hqk,qhd->khd", P * K, do.abs()))
    return out_err, dq_err, dk_err, dv_err


# --- the packed batch and its gather (host structures) -----------------------------------------------------


@given(groups=st.lists(st.tuples(st.integers(1, 5), st.lists(st.integers(1, 5), min_size=1, max_size=4)),
                       min_size=1, max_size=3), seed=seeds)
def test_shared_prefix_batch_gather(groups, seed):
    gen = _generator(seed)
    prompts = [torch.randint(0, 50, (p,), generator=gen) for p, _ in groups]
    completions = [[torch.randint(0, 50, (c,), generator=gen) for c in comps] for _, comps in groups]
    batch = rlloss.SharedPrefixBatch.pack(prompts, completions)
    assert batch.group_sizes == tuple(len(c) for _, c in groups)
    # Every completion token is predicted by the row before it in its own [prompt | completion] sequence.
    hidden = _randn(gen, batch.total_tokens, 3).requires_grad_()
    rows = batch.gather_hidden(hidden)
    layout = batch.layout
    segments = [s for s in range(layout.num_segments) if layout.parents[s] != -1]  # the completions, in order
    unpacked = [x for group in batch.unpack(rows) for x in group]
    for c, (s, ids) in enumerate(zip(segments, [c for comps in completions for c in comps])):
        start, n, parent = layout.starts[s], layout.lengths[s], layout.parents[s]
        predictors = [layout.starts[parent] + layout.lengths[parent] - 1] + list(range(start, start + n - 1))
        assert batch.predictor_index[c, :n].tolist() == predictors
        assert torch.equal(batch.input_ids[0, start: start + n], ids)
        assert torch.equal(unpacked[c], hidden.detach()[predictors])
    assert (rows.detach()[~batch.mask] == 0).all()
    # The backward is the scatter-add of the gathered rows (exactly: every row gets at most G terms).
    upstream = _randn(gen, *rows.shape)
    (grad,) = torch.autograd.grad(rows, hidden, upstream)
    expected = torch.zeros_like(hidden).index_add_(0, batch.predictor_index[batch.mask],
                                                   upstream[batch.mask].detach())
    torch.testing.assert_close(grad, expected, rtol=0, atol=4 * EPS32 * upstream.abs().max().item()
                               * max(len(c) for _, c in groups))
