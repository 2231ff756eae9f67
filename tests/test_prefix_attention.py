"""Tests of rlloss.shared_prefix_attention and SharedPrefixLayout (docs/math.md §8).

Oracles: the dense float64 masked attention of ``rlloss.reference`` and — the real equivalence — plain causal
attention (``torch.nn.functional.scaled_dot_product_attention``) run on every ``[prompt | completion]``
sequence separately. Backends: ``torch`` in float64 (tight tolerance, fast) and the Triton kernels
(``KERNEL_BACKEND``: the interpreter on CPU, compiled on CUDA) in float32 and once float16 at tiny sizes (the
interpreter is slow); bfloat16 and realistic sizes carry the ``gpu`` marker.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import rlloss
from conftest import INTERPRETED, KERNEL_BACKEND
from rlloss import SharedPrefixLayout, reference
from rlloss.kernels import prefix_attention as kernels

DEVICE = "cpu" if INTERPRETED else "cuda"
# Tolerances: absolute on outputs (|O| ≤ max |v| ~ 3), on gradients relative to the largest reference entry.
TOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}
GRAD_TOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}
# (output, gradient) bounds of the GPU tests at realistic sizes.
GPU_TOL = {torch.float16: (1e-2, 1e-2), torch.bfloat16: (5e-2, 5e-2)}
# A gradient can vanish (a lone token's dq is 0): relative errors are taken against at least this.
GRAD_FLOOR = 0.1

# (prompt_lengths, completion_lengths, Hq, Hkv, d): 1–3 groups, G = 1…5, odd P and S with P = 1 and S = 1,
# Hq/Hkv ∈ {1, 2, 4}, head dims on (16, 32, 64) and off (24, 40, 80: padded lanes) powers of two.
# Interpreter blocks are 32/16 tokens, so segments here span several tiles and end mid-tile.
KERNEL_CASES = [
    ([5], [[3]], 1, 1, 16),
    ([1], [[1, 1]], 2, 1, 16),
    ([37], [[20, 1, 33, 9, 17]], 4, 1, 24),
    ([1, 19], [[41, 1], [7, 13, 3]], 4, 2, 32),
    ([11, 3, 23], [[5], [1, 31], [17, 3, 1]], 2, 2, 40),
    ([33], [[31, 5]], 2, 1, 80),
]
# The torch backend is fast: more shapes, the head dims included.
TORCH_CASES = KERNEL_CASES + [
    ([65], [[64, 1, 63]], 4, 4, 64),
    ([7, 50], [[33, 2, 9, 1], [1]], 8, 2, 96),
    ([17], [[15, 16]], 2, 1, 128),
]


def _case_id(case):
    prompts, comps, hq, hkv, d = case
    return f"P{prompts}-S{comps}-H{hq}/{hkv}-d{d}".replace(" ", "")


@pytest.fixture(autouse=True)
def _no_backend_env(monkeypatch):
    monkeypatch.delenv("RLLOSS_BACKEND", raising=False)


@pytest.fixture
def poisoned(monkeypatch):
    """Every float tensor the kernels allocate starts as NaN, so an unwritten output row shows."""
    empty, empty_like = torch.empty, torch.empty_like

    def nan_filled(x):
        return x.fill_(float("nan")) if x.is_floating_point() else x

    monkeypatch.setattr(kernels.torch, "empty", lambda *a, **kw: nan_filled(empty(*a, **kw)))
    monkeypatch.setattr(kernels.torch, "empty_like", lambda *a, **kw: nan_filled(empty_like(*a, **kw)))


def _inputs(layout, hq, hkv, d, device="cpu", seed=0):
    """Float64 q [T, Hq, d], k, v [T, Hkv, d] and upstream dO [T, Hq, d] (fresh random, never zeros)."""
    gen = torch.Generator().manual_seed(seed)
    T = layout.total_tokens
    q, k, v, do = (torch.randn(T, h, d, generator=gen, dtype=torch.float64) for h in (hq, hkv, hkv, hq))
    return tuple(x.to(device) for x in (q, k, v, do))


def _run(q, k, v, do, layout, dtype, backend, scale=None, deterministic=True):
    """(O, dq, dk, dv) as float64 from fresh leaves cast to ``dtype``."""
    leaves = [x.detach().to(dtype).requires_grad_() for x in (q, k, v)]
    out = rlloss.shared_prefix_attention(*leaves, layout, scale=scale, backend=backend,
                                         deterministic=deterministic)
    assert out.dtype == dtype and out.shape == q.shape
    out.backward(do.to(dtype))
    return tuple(x.double() for x in (out.detach(), *(leaf.grad for leaf in leaves)))


def _dense_reference(q, k, v, do, layout, scale=None):
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    leaves = [x.detach().double().requires_grad_() for x in (q, k, v)]
    out = reference.shared_prefix_attention(*leaves, layout.dense_mask().to(q.device), scale=scale)
    out.backward(do.double())
    return (out.detach(), *(leaf.grad for leaf in leaves))


def _separate_runs(q, k, v, do, layout, scale=None):
    """Every root-to-leaf sequence of segments through plain causal attention on its own, in float64.

    A row shared by n sequences (a prompt's) gets 1/n of its upstream gradient in each, so the packed
    gradients must equal the sums over the runs; its output must be the same in every run.
    """
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    group = q.shape[1] // k.shape[1]
    has_child = set(p for p in layout.parents if p != -1)
    leaves = [s for s in range(layout.num_segments) if s not in has_child]
    rows_of = lambda s: torch.arange(layout.starts[s], layout.starts[s] + layout.lengths[s])  # noqa: E731
    shares = torch.zeros(layout.total_tokens, dtype=torch.float64)
    for leaf in leaves:
        for s in layout.ancestors(leaf) + [leaf]:
            shares[rows_of(s)] += 1
    out = torch.full_like(q, float("nan"), dtype=torch.float64)
    grads = [torch.zeros_like(x, dtype=torch.float64) for x in (q, k, v)]
    for leaf in leaves:
        rows = torch.cat([rows_of(s) for s in layout.ancestors(leaf) + [leaf]]).to(q.device)
        qs, ks, vs = (x[rows].detach().double().requires_grad_() for x in (q, k, v))
        o = F.scaled_dot_product_attention(
            qs.transpose(0, 1)[None], ks.repeat_interleave(group, 1).transpose(0, 1)[None],
            vs.repeat_interleave(group, 1).transpose(0, 1)[None], is_causal=True, scale=scale,
        )[0].transpose(0, 1)
        seen = out[rows]
        known = ~torch.isnan(seen)  # rows an earlier run produced already: the same output
        assert torch.allclose(seen[known], o.detach()[known], atol=1e-12)
        out[rows] = o.detach()
        o.backward(do[rows].double() / shares[rows].to(q.device)[:, None, None])
        for g, x in zip(grads, (qs, ks, vs)):
            g.index_add_(0, rows, x.grad)
    return (out, *grads)


def _assert_close(got, expected, dtype, what="", tol=None, grad_tol=None):
    names = ("out", "dq", "dk", "dv")
    tol = TOL[dtype] if tol is None else tol
    grad_tol = GRAD_TOL[dtype] if grad_tol is None else grad_tol
    for name, a, b in zip(names, got, expected):
        assert a.shape == b.shape, (what, name)
        assert torch.isfinite(a).all(), (what, name)
        err = (a - b).abs().max().item()
        if name == "out":
            assert err <= tol, (what, name, err)
        else:
            rel = err / max(b.abs().max().item(), GRAD_FLOOR)
            assert rel <= grad_tol, (what, name, rel)


# --- against the dense float64 reference ------------------------------------------------------------------


@pytest.mark.parametrize("deterministic", [True, False], ids=["dq-kernel", "fused-dq"])
@pytest.mark.parametrize("case", KERNEL_CASES, ids=_case_id)
def test_kernels_match_reference(case, deterministic, poisoned):
    prompts, comps, hq, hkv, d = case
    layout = SharedPrefixLayout.from_groups(prompts, comps, device=DEVICE)
    q, k, v, do = _inputs(layout, hq, hkv, d, DEVICE)
    got = _run(q, k, v, do, layout, torch.float32, KERNEL_BACKEND, deterministic=deterministic)
    _assert_close(got, _dense_reference(q, k, v, do, layout), torch.float32, _case_id(case))


def _only_config(monkeypatch, tuned, block_m, block_n):
    monkeypatch.setattr(tuned, "configs", [kernels._triton_config(block_m, block_n, 4, 1)])


@pytest.mark.skipif(not INTERPRETED, reason="interpreter block configs")
@pytest.mark.parametrize("deterministic", [True, False], ids=["dq-kernel", "fused-dq"])
@pytest.mark.parametrize("configs", [
    {"fwd": (16, 16), "dq": (64, 16), "dkdv": (16, 64)},
    {"fwd": (64, 32), "dq": (16, 16), "dkdv": (32, 32)},
], ids=["fwd16x16-dq64x16-dkdv16x64", "fwd64x32-dq16x16-dkdv32x32"])
def test_kernels_other_block_shapes(configs, deterministic, monkeypatch):
    """Query/key tiles of other sizes and ratios, as the autotuner may pick them on a GPU."""
    for tuned, kernel in ((kernels._fwd, "fwd"), (kernels._dq, "dq"), (kernels._dkdv, "dkdv"),
                          (kernels._dkdv_dq, "dkdv")):
        _only_config(monkeypatch, tuned, *configs[kernel])
    layout = SharedPrefixLayout.from_groups([70], [[33, 64, 1]])
    q, k, v, do = _inputs(layout, 2, 1, 16)
    got = _run(q, k, v, do, layout, torch.float32, KERNEL_BACKEND, deterministic=deterministic)
    _assert_close(got, _dense_reference(q, k, v, do, layout), torch.float32)


def test_kernel_candidate_configs():
    """Every autotuning candidate tiles the layout with a multiple of its loop's tile, uses 8 warps only where
    the dots are ≥ 64 wide, and the 16-bit lists hold the Triton tutorial's forward and backward settings."""
    for table in (kernels._CANDIDATES_16BIT, kernels._CANDIDATES_FP32, {
            name: (c,) for name, c in kernels._INTERPRETER_CANDIDATES.items()}):
        for kernel, candidates in table.items():
            for block_m, block_n, warps, _ in candidates:
                tiled, looped = (block_n, block_m) if kernel == "dkdv" else (block_m, block_n)
                assert tiled % looped == 0 and looped >= 16, (kernel, block_m, block_n)
                assert warps == 4 or looped >= 64, (kernel, block_m, block_n, warps)
    assert (128, 64) in {c[:2] for c in kernels._CANDIDATES_16BIT["fwd"]}
    assert (128, 32, 4, 5) in kernels._CANDIDATES_16BIT["dq"]
    assert (32, 128, 4, 5) in kernels._CANDIDATES_16BIT["dkdv"]
    if INTERPRETED:  # one config, so the autotuner never benchmarks under the interpreter
        assert all(len(tuned.configs) == 1 for tuned in (kernels._fwd, kernels._dq, kernels._dkdv,
                                                         kernels._dkdv_dq))


def test_kernels_float16_and_explicit_scale(poisoned):
    layout = SharedPrefixLayout.from_groups([21], [[18, 1, 30]], device=DEVICE)
    q, k, v, do = _inputs(layout, 4, 2, 32, DEVICE)
    got = _run(q, k, v, do, layout, torch.float16, KERNEL_BACKEND, scale=0.3)
    # The reference sees the float16-rounded inputs, so only the kernels' own rounding remains.
    rounded = [x.half().double() for x in (q, k, v)]
    _assert_close(got, _dense_reference(*rounded, do, layout, scale=0.3), torch.float16)


@pytest.mark.parametrize("case", TORCH_CASES, ids=_case_id)
def test_torch_backend_matches_reference(case):
    prompts, comps, hq, hkv, d = case
    layout = SharedPrefixLayout.from_groups(prompts, comps)
    q, k, v, do = _inputs(layout, hq, hkv, d)
    got = _run(q, k, v, do, layout, torch.float64, "torch")
    _assert_close(got, _dense_reference(q, k, v, do, layout), torch.float64, _case_id(case))


def test_reference_backend_is_the_oracle():
    layout = SharedPrefixLayout.from_groups([4], [[3, 2]])
    q, k, v, do = _inputs(layout, 2, 1, 16)
    got = _run(q, k, v, do, layout, torch.float64, "reference")
    _assert_close(got, _dense_reference(q, k, v, do, layout), torch.float64)


# --- the real equivalence: each [prompt | completion] on its own -----------------------------------------


@pytest.mark.parametrize("backend,dtype", [("torch", torch.float64), (KERNEL_BACKEND, torch.float32)])
def test_equals_separate_causal_runs(backend, dtype):
    layout = SharedPrefixLayout.from_groups([19, 1], [[13, 1, 24], [9, 17]], device=DEVICE)
    q, k, v, do = _inputs(layout, 4, 2, 32, DEVICE)
    got = _run(q, k, v, do, layout, dtype, backend)
    _assert_close(got, _separate_runs(q, k, v, do, layout), dtype, backend)


def _two_level_tree():
    # prompt 0 → turn 1 → turn 2, prompt 0 → turn 3 → turns 4 and 5; then a lone root 6 and a root 7 with
    # one child 8: lengths odd, several tiles long, one of length 1.
    return SharedPrefixLayout.from_tree([23, 9, 17, 1, 13, 6, 5, 3, 11], [-1, 0, 1, 0, 3, 3, -1, -1, 7],
                                        device=DEVICE)


@pytest.mark.parametrize("backend,dtype,deterministic", [
    ("torch", torch.float64, True), (KERNEL_BACKEND, torch.float32, True), (KERNEL_BACKEND, torch.float32, False)])
def test_tree_matches_reference_and_separate_runs(backend, dtype, deterministic):
    layout = _two_level_tree()
    q, k, v, do = _inputs(layout, 2, 1, 16, DEVICE)
    got = _run(q, k, v, do, layout, dtype, backend, deterministic=deterministic)
    _assert_close(got, _dense_reference(q, k, v, do, layout), dtype, "dense")
    _assert_close(got, _separate_runs(q, k, v, do, layout), dtype, "separate")


def test_kernel_backward_is_deterministic():
    layout = SharedPrefixLayout.from_groups([29], [[17, 20, 3]], device=DEVICE)
    q, k, v, do = _inputs(layout, 4, 1, 16, DEVICE)
    first = _run(q, k, v, do, layout, torch.float32, KERNEL_BACKEND)
    second = _run(q, k, v, do, layout, torch.float32, KERNEL_BACKEND)
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    # The fused dQ (and dK/dV, whose blocks the autotuner may choose differently) differ by rounding only.
    fused = _run(q, k, v, do, layout, torch.float32, KERNEL_BACKEND, deterministic=False)
    assert torch.equal(fused[0], first[0])
    assert all((a - b).abs().max() <= 1e-5 * b.abs().max() for a, b in zip(fused[1:], first[1:]))


def test_kernels_take_strided_inputs_and_gradients():
    """q as a [Hq, T, d] tensor seen as [T, Hq, d] (the layout of a model's attention), k and v slices of
    one fused kv tensor, and an upstream gradient with a zero stride."""
    layout = SharedPrefixLayout.from_groups([9], [[12, 5]], device=DEVICE)
    T, hq, hkv, d = layout.total_tokens, 2, 1, 16
    q = torch.randn(hq, T, d, device=DEVICE).transpose(0, 1).requires_grad_()
    kv = torch.randn(T, hkv, 2, d, device=DEVICE).requires_grad_()
    out = rlloss.shared_prefix_attention(q, kv[:, :, 0], kv[:, :, 1], layout, backend=KERNEL_BACKEND)
    out.sum().backward()
    leaves = [x.detach().double().requires_grad_() for x in (q, kv)]
    ref = reference.shared_prefix_attention(leaves[0], leaves[1][:, :, 0], leaves[1][:, :, 1],
                                            layout.dense_mask(), scale=d ** -0.5)
    ref.sum().backward()
    assert (out.double() - ref).abs().max() < 1e-5
    assert (q.grad.double() - leaves[0].grad).abs().max() < 1e-4
    assert (kv.grad.double() - leaves[1].grad).abs().max() < 1e-4


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_random_forests_torch_backend(data):
    n = data.draw(st.integers(1, 7), label="segments")
    lengths = data.draw(st.lists(st.integers(1, 12), min_size=n, max_size=n), label="lengths")
    parents = [data.draw(st.integers(-1, i - 1), label=f"parent{i}") for i in range(n)]
    hkv = data.draw(st.sampled_from([1, 2]), label="hkv")
    hq = hkv * data.draw(st.sampled_from([1, 2, 4]), label="group")
    layout = SharedPrefixLayout.from_tree(lengths, parents)
    q, k, v, do = _inputs(layout, hq, hkv, 8, seed=data.draw(st.integers(0, 1000), label="seed"))
    got = _run(q, k, v, do, layout, torch.float64, "torch")
    _assert_close(got, _dense_reference(q, k, v, do, layout), torch.float64)
    _assert_close(got, _separate_runs(q, k, v, do, layout), torch.float64)


@settings(max_examples=4, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_random_forests_kernels(data):
    n = data.draw(st.integers(1, 4), label="segments")
    lengths = data.draw(st.lists(st.integers(1, 20), min_size=n, max_size=n), label="lengths")
    parents = [data.draw(st.integers(-1, i - 1), label=f"parent{i}") for i in range(n)]
    layout = SharedPrefixLayout.from_tree(lengths, parents, device=DEVICE)
    q, k, v, do = _inputs(layout, 2, 1, data.draw(st.sampled_from([16, 20]), label="d"), DEVICE)
    got = _run(q, k, v, do, layout, torch.float32, KERNEL_BACKEND, deterministic=data.draw(st.booleans()))
    _assert_close(got, _dense_reference(q, k, v, do, layout), torch.float32)


# --- the torch backend's blocked path --------------------------------------------------------------------


def _per_segment_attention(q, k, v, layout, scale):
    """The torch backend's former formula, kept as a second oracle: per segment, its queries against
    [ancestor keys | own keys (causal)], one softmax per segment."""
    group = q.shape[1] // k.shape[1]
    pieces = []
    for s in range(layout.num_segments):
        begin, n = layout.starts[s], layout.lengths[s]
        visible = [slice(layout.starts[a], layout.starts[a] + layout.lengths[a]) for a in layout.ancestors(s)]
        visible.append(slice(begin, begin + n))
        keys = torch.cat([k[r] for r in visible]).repeat_interleave(group, dim=1)
        values = torch.cat([v[r] for r in visible]).repeat_interleave(group, dim=1)
        scores = torch.einsum("qhd,khd->hqk", q[begin: begin + n], keys) * scale
        prefix = keys.shape[0] - n
        allowed = torch.cat([torch.ones(n, prefix, dtype=torch.bool), torch.ones(n, n, dtype=torch.bool).tril()], 1)
        pieces.append(torch.einsum("hqk,khd->qhd", scores.masked_fill(~allowed, float("-inf")).softmax(-1), values))
    return torch.cat(pieces)


def _many_short_completions():
    """The GRPO toy's batch: 16 groups of a 32-token prompt and 8 completions of 3 tokens (144 segments)."""
    return SharedPrefixLayout.from_groups([32] * 16, [[3] * 8] * 16)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_torch_backend_many_short_completions(dtype):
    layout = _many_short_completions()
    assert layout.num_segments == 144
    q, k, v, do = _inputs(layout, 4, 2, 16)
    got = _run(q, k, v, do, layout, dtype, "torch")
    _assert_close(got, _dense_reference(q, k, v, do, layout), dtype)


def test_torch_backend_equals_the_per_segment_formula():
    """144 segments through the blocked path and through one softmax per segment, float64, with gradients."""
    layout = _many_short_completions()
    q, k, v, do = _inputs(layout, 4, 2, 16, seed=1)
    got = _run(q, k, v, do, layout, torch.float64, "torch")
    leaves = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    out = _per_segment_attention(*leaves, layout, 16 ** -0.5)
    out.backward(do)
    _assert_close(got, (out.detach(), *(x.grad for x in leaves)), torch.float64)


def _deep_trees():
    # A chain of 12 turns (lengths 1–9, some of 1 token); a tree whose root has a chain of 5 below one child
    # and siblings at every depth; a lone root of one token; a root whose children come after another root's.
    chain = ([5, 1, 9, 3, 1, 7, 2, 1, 8, 4, 6, 1], [-1] + list(range(11)))
    branching = ([17, 4, 1, 6, 3, 1, 2, 5, 1], [-1, 0, 1, 1, 3, 4, 5, 0, 7])
    interleaved = ([3, 1, 4, 2, 1, 5], [-1, -1, 0, 1, 2, 2])
    return [chain, branching, interleaved, ([1], [-1]), ([1, 1, 1], [-1, 0, 1])]


@pytest.mark.parametrize("tree", range(5), ids=["chain12", "branching", "interleaved-roots", "one-token",
                                               "three-single-tokens"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_torch_backend_deep_trees_and_single_tokens(tree, dtype):
    """Long ancestor chains, segments of one token, a stream of one token, roots without children and roots
    interleaved in the stream (the layout allows no empty segment and no group without a completion)."""
    lengths, parents = _deep_trees()[tree]
    layout = SharedPrefixLayout.from_tree(lengths, parents)
    q, k, v, do = _inputs(layout, 2, 1, 8, seed=tree)
    got = _run(q, k, v, do, layout, dtype, "torch")
    _assert_close(got, _dense_reference(q, k, v, do, layout), dtype, "dense")
    _assert_close(got, _separate_runs(q, k, v, do, layout), dtype, "separate")


@pytest.mark.parametrize("block", [16, 32, 64, 128, 256])
def test_torch_backend_every_block_size_and_bucketing(block):
    """Every query-block size the plan can pick, forced, on groups of very different sizes (so the blocks
    fall into several buckets of different key counts) and a stream that ends mid-block."""
    from rlloss.prefix_attention import _torch_attention, _torch_plan

    layout = SharedPrefixLayout.from_groups([150, 3, 40], [[1, 70, 9], [2, 1], [33, 5, 1, 12]])
    q, k, v, do = _inputs(layout, 4, 2, 16, seed=block)
    plan = _torch_plan(layout, (4, 2, 16), block)
    assert plan["block"] == block and layout.total_tokens % block != 0
    if block <= 32:
        assert len(plan["masks"]) > 1
    leaves = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    out = _torch_attention(*leaves, layout, 16 ** -0.5, block=block)
    out.backward(do)
    _assert_close((out.detach(), *(x.grad for x in leaves)), _dense_reference(q, k, v, do, layout),
                  torch.float64)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_torch_backend_half_inputs(dtype):
    """16-bit inputs are computed in float32 and returned in their dtype."""
    layout = SharedPrefixLayout.from_groups([21], [[18, 1, 30]])
    q, k, v, do = _inputs(layout, 4, 2, 32)
    got = _run(q, k, v, do, layout, dtype, "torch")
    rounded = [x.to(dtype).double() for x in (q, k, v)]
    _assert_close(got, _dense_reference(*rounded, do.to(dtype).double(), layout), dtype)


def test_torch_backend_backward_is_deterministic():
    layout = _many_short_completions()
    q, k, v, do = _inputs(layout, 4, 2, 16)
    first = _run(q, k, v, do, layout, torch.float32, "torch")
    second = _run(q, k, v, do, layout, torch.float32, "torch")
    assert all(torch.equal(a, b) for a, b in zip(first, second))


@pytest.mark.parametrize("busy", [True, False], ids=["busy", "idle"])
def test_torch_backend_runs_small_problems_on_one_thread(busy, monkeypatch):
    """On a busy machine a small problem runs its forward and its backward on one intra-op thread (each
    parallel region of a tiny op can wait a scheduler slice for its second thread) and restores the count;
    on an idle one it keeps torch's count."""
    from rlloss import prefix_attention as module

    monkeypatch.setattr(module.os, "cpu_count", lambda: 2)
    # Load 2.0, of which this process's own threads were 1.8 (idle) or 1.0 (busy: one other thread).
    monkeypatch.setattr(module.os, "getloadavg", lambda: (2.0, 0.0, 0.0))
    start_wall, start_cpu = module._CLOCKS_AT_IMPORT
    monkeypatch.setattr(module.time, "monotonic", lambda: start_wall + 10.0)
    monkeypatch.setattr(module, "_cpu_seconds", lambda: start_cpu + (10.0 if busy else 18.0))
    used = 1 if busy else 2

    seen = []
    blocked = module._blocked_attention

    def recording(*args):
        seen.append(("forward", torch.get_num_threads()))
        out = blocked(*args)
        if out.requires_grad:
            out.register_hook(lambda grad: seen.append(("backward", torch.get_num_threads())))
        return out

    monkeypatch.setattr(module, "_blocked_attention", recording)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        layout = SharedPrefixLayout.from_groups([16], [[8, 8, 8, 8]])  # 48 tokens
        q, k, v, do = _inputs(layout, 4, 2, 64)
        for grads in ((True, True, True), (True, False, False), (False, False, False)):
            seen.clear()
            leaves = [x.detach().clone().requires_grad_(g) for x, g in zip((q, k, v), grads)]
            out = rlloss.shared_prefix_attention(*leaves, layout, backend="torch")
            assert torch.get_num_threads() == 2
            if out.requires_grad:
                out.backward(do)
                assert torch.get_num_threads() == 2
            assert seen == [("forward", used)] + ([("backward", used)] if any(grads) else [])
            expected = _dense_reference(q, k, v, do, layout)
            assert (out.detach() - expected[0]).abs().max() < 1e-10
            for leaf, grad in zip(leaves, expected[1:]):
                assert leaf.grad is None if not leaf.requires_grad else (leaf.grad - grad).abs().max() < 1e-10
        with torch.no_grad():
            seen.clear()
            rlloss.shared_prefix_attention(q, k, v, layout, backend="torch")
            assert seen == [("forward", used)] and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)


# --- SharedPrefixLayout ------------------------------------------------------------------------------------


def test_layout_positions_and_mask():
    layout = SharedPrefixLayout.from_groups([3, 1], [[2, 1], [2]])
    assert layout.starts == (0, 3, 5, 6, 7) and layout.lengths == (3, 2, 1, 1, 2)
    assert layout.parents == (-1, 0, 0, -1, 3) and layout.total_tokens == 9
    assert layout.position_ids().tolist() == [0, 1, 2, 3, 4, 3, 0, 1, 2]
    expected = torch.tensor([
        # 0  1  2  3  4  5  6  7  8
        [1, 0, 0, 0, 0, 0, 0, 0, 0],  # prompt 0
        [1, 1, 0, 0, 0, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0, 0, 0, 0],
        [1, 1, 1, 1, 0, 0, 0, 0, 0],  # completion 0.0
        [1, 1, 1, 1, 1, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 1, 0, 0, 0],  # completion 0.1: prompt 0 and itself, not completion 0.0
        [0, 0, 0, 0, 0, 0, 1, 0, 0],  # prompt 1
        [0, 0, 0, 0, 0, 0, 1, 1, 0],  # completion 1.0
        [0, 0, 0, 0, 0, 0, 1, 1, 1],
    ], dtype=torch.bool)
    assert torch.equal(layout.dense_mask(), expected)


def test_tree_positions_and_mask():
    layout = SharedPrefixLayout.from_tree([2, 1, 2, 1], [-1, 0, 1, 0])
    assert layout.ancestors(2) == [0, 1] and layout.descendants(0) == [1, 2, 3]
    assert layout.position_ids().tolist() == [0, 1, 2, 3, 4, 2]
    mask = layout.dense_mask()
    assert mask[4].tolist() == [True, True, True, True, True, False]
    assert mask[5].tolist() == [True, True, False, False, False, True]


def test_layout_tables():
    layout = SharedPrefixLayout.from_groups([5], [[2, 4]])  # segments [0, 5), [5, 7), [7, 11)
    t = layout.tables(4)
    lists = {name: x.tolist() for name, x in t.items()}
    assert all(x.dtype == torch.int32 for x in t.values())
    assert lists["seg_start"] == [0, 5, 7] and lists["seg_len"] == [5, 2, 4]
    assert lists["block_segment"] == [0, 0, 1, 2] and lists["block_start"] == [0, 4, 5, 7]
    assert lists["anc_ptr"] == [0, 0, 1, 2] and lists["anc"] == [0, 0]
    assert lists["desc_ptr"] == [0, 2, 2, 2] and lists["desc"] == [1, 2]
    # Work of a query block (keys its last query sees): 4, 5, 5 + 2, 5 + 4. Of a key block (queries that
    # see it): 5 + 6, 1 + 6, 2, 4.
    assert lists["query_block_order"] == [3, 2, 1, 0]
    assert lists["key_block_order"] == [0, 1, 3, 2]
    assert layout.tables(4) is t and layout.tables(8) is not t
    moved = layout.to("cpu")
    assert moved.tables(4) is t  # the copy shares the cache
    # Both sizes in one set: the 8-token blocks [0, 5), [5, 7), [7, 11) follow the four 4-token ones.
    joined = layout.kernel_tables([8, 4])
    assert joined["num_blocks"] == {4: 4, 8: 3}
    assert joined["block_first"].tolist()[4] == 0 and joined["block_first"].tolist()[8] == 4
    assert joined["block_segment"].tolist() == [0, 0, 1, 2, 0, 1, 2]
    assert joined["block_start"].tolist() == [0, 4, 5, 7, 0, 5, 7]
    assert joined["query_block_order"].tolist()[:4] == [3, 2, 1, 0]
    assert sorted(joined["key_block_order"].tolist()[4:]) == [4, 5, 6]
    assert layout.kernel_tables((4, 8)) is joined


def test_layout_errors():
    with pytest.raises(ValueError, match="one entry per group"):
        SharedPrefixLayout.from_groups([3, 4], [[1]])
    with pytest.raises(ValueError, match="group 1 has no completions"):
        SharedPrefixLayout.from_groups([3, 4], [[1], []])
    with pytest.raises(ValueError, match="at least one token"):
        SharedPrefixLayout.from_groups([0], [[1]])
    with pytest.raises(ValueError, match="at least one token"):
        SharedPrefixLayout.from_groups([2], [[1, 0]])
    with pytest.raises(ValueError, match="one entry per segment"):
        SharedPrefixLayout.from_tree([2, 3], [-1])
    with pytest.raises(ValueError, match="at least one segment"):
        SharedPrefixLayout.from_tree([], [])
    with pytest.raises(ValueError, match=r"parents\[1\] must be -1 or an earlier segment"):
        SharedPrefixLayout.from_tree([2, 3], [-1, 1])
    with pytest.raises(ValueError, match=r"parents\[0\]"):
        SharedPrefixLayout.from_tree([2], [-2])


def test_attention_flops_and_cost_ratio():
    """FLOPs count the visible pairs exactly; against repeated prompts their ratio tends to docs/math.md §8's
    (P² + G·S(2P+S)) / (G(P+S)²)."""
    P, S, G, d, H = 7, 3, 2, 16, 4
    layout = SharedPrefixLayout.from_groups([P], [[S] * G])
    assert layout.attention_flops(d, H) == 4 * d * H * (P * (P + 1) // 2 + G * (S * P + S * (S + 1) // 2))
    assert layout.attention_flops(d, H) == 4 * d * H * int(layout.dense_mask().sum())
    for P, S, G in [(4096, 512, 16), (1024, 2048, 8), (16384, 256, 16)]:
        shared = SharedPrefixLayout.from_groups([P], [[S] * G]).attention_flops(d, H)
        repeated = SharedPrefixLayout.from_tree([P + S] * G, [-1] * G).attention_flops(d, H)
        formula = (P**2 + G * S * (2 * P + S)) / (G * (P + S) ** 2)
        assert abs(shared / repeated - formula) < 1e-3 * formula


# --- API errors --------------------------------------------------------------------------------------------


def test_api_errors():
    layout = SharedPrefixLayout.from_groups([3], [[2]])
    q, k, v = torch.randn(5, 4, 16), torch.randn(5, 2, 16), torch.randn(5, 2, 16)
    call = rlloss.shared_prefix_attention
    with pytest.raises(TypeError, match="q must be a torch.Tensor"):
        call(q.numpy(), k, v, layout)
    with pytest.raises(TypeError, match="layout must be a rlloss.SharedPrefixLayout"):
        call(q, k, v, [3, 2])
    with pytest.raises(ValueError, match=r"q must be 3-D \[T, Hq, d\]"):
        call(q[None], k, v, layout)
    with pytest.raises(ValueError, match=r"k must be 3-D"):
        call(q, k[0], v, layout)
    with pytest.raises(ValueError, match="layout.total_tokens = 5 rows, got 4"):
        call(q[:4], k[:4], v[:4], layout)
    with pytest.raises(ValueError, match="k and v must both be"):
        call(q, k, v[:, :1], layout)
    with pytest.raises(ValueError, match="k and v must both be"):
        call(q, k[..., :8], v[..., :8], layout)
    with pytest.raises(ValueError, match="multiple of k's heads Hkv = 3"):
        call(q, torch.randn(5, 3, 16), torch.randn(5, 3, 16), layout)
    with pytest.raises(TypeError, match="q must have dtype in"):
        call(q.int(), k.int(), v.int(), layout)
    with pytest.raises(TypeError, match="k and v must have q's dtype"):
        call(q, k.double(), v.double(), layout)
    with pytest.raises(ValueError, match="scale must be a finite number > 0"):
        call(q, k, v, layout, scale=-1.0)
    with pytest.raises(ValueError, match="not a backend"):
        call(q, k, v, layout, backend="cuda")
    with pytest.raises(TypeError, match="deterministic must be a bool, got int"):
        call(q, k, v, layout, deterministic=0)


@pytest.mark.skipif(not INTERPRETED, reason="the interpreter runs on CPU tensors")
def test_kernel_backend_errors():
    layout = SharedPrefixLayout.from_groups([3], [[2]])
    for d in (8, 15, 129, 256):
        q, k = torch.randn(5, 2, d), torch.randn(5, 1, d)
        with pytest.raises(ValueError, match=r"head dim d must be in \[16, 128\]"):
            rlloss.shared_prefix_attention(q, k, k, layout, backend=KERNEL_BACKEND)
        rlloss.shared_prefix_attention(q, k, k, layout, backend="torch")  # any d on torch
    q = torch.randn(5, 2, 16, dtype=torch.float64)
    with pytest.raises(TypeError, match="q must have dtype in"):
        rlloss.shared_prefix_attention(q, q[:, :1], q[:, :1], layout, backend=KERNEL_BACKEND)


def test_layout_moves_to_the_inputs_device():
    layout = SharedPrefixLayout.from_groups([3], [[2]], device="meta")
    q, k = torch.randn(5, 2, 16), torch.randn(5, 1, 16)
    out = rlloss.shared_prefix_attention(q, k, k, layout, backend="torch")
    assert out.shape == q.shape and torch.isfinite(out).all()


# --- GPU: realistic sizes, bfloat16 / float16 ---------------------------------------------------------------


def _gpu_case(dtype, d, hq=8, hkv=2, seed=0):
    layout = SharedPrefixLayout.from_groups([300, 517], [[128, 128, 128, 128, 77], [1, 260, 333]], device="cuda")
    q, k, v, do = _inputs(layout, hq, hkv, d, "cuda", seed)
    return layout, q, k, v, do


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,d,deterministic", [
    *((dtype, d, True) for dtype in (torch.bfloat16, torch.float16) for d in (64, 80, 96, 128)),
    (torch.bfloat16, 128, False), (torch.float16, 80, False)])
def test_gpu_matches_float64_reference(dtype, d, deterministic):
    layout, q, k, v, do = _gpu_case(dtype, d)
    got = _run(q, k, v, do, layout, dtype, "triton", deterministic=deterministic)
    rounded = [x.to(dtype).double() for x in (q, k, v)]
    # Realistic sizes: the probabilities and dS are rounded to the input dtype before their matmuls (as in
    # flash attention) and the prompt's dK/dV sum ~1000 rows, so the bounds are wider than at test sizes.
    tol, grad_tol = GPU_TOL[dtype]
    _assert_close(got, _dense_reference(*rounded, do, layout), dtype, f"{dtype} d={d}", tol, grad_tol)


@pytest.mark.gpu
@pytest.mark.parametrize("deterministic", [True, False], ids=["dq-kernel", "fused-dq"])
def test_gpu_float32_is_exact(deterministic):
    layout, q, k, v, do = _gpu_case(torch.float32, 128)
    got = _run(q, k, v, do, layout, torch.float32, "triton", deterministic=deterministic)
    _assert_close(got, _dense_reference(q, k, v, do, layout), torch.float32)


@pytest.mark.gpu
def test_gpu_bf16_error_no_worse_than_sdpa_on_repeated_prompts():
    """bf16 against the float64 truth, next to SDPA (flash) running each [prompt | completion] separately
    in bf16: the shared-prefix kernels may not lose more accuracy than the repeated-prompt baseline."""
    layout, q, k, v, do = _gpu_case(torch.bfloat16, 128)
    truth = _separate_runs(*(x.to(torch.bfloat16).double() for x in (q, k, v)), do, layout)
    ours = _run(q, k, v, do, layout, torch.bfloat16, "triton")
    group = q.shape[1] // k.shape[1]
    out = torch.zeros_like(truth[0])
    grads = [torch.zeros_like(x) for x in truth[1:]]
    shares = torch.zeros(layout.total_tokens, device="cuda", dtype=torch.float64)
    completions = [s for s in range(layout.num_segments) if layout.parents[s] != -1]
    def rows_of(s):
        return torch.arange(layout.starts[s], layout.starts[s] + layout.lengths[s], device="cuda")

    for s in completions:
        shares[torch.cat([rows_of(layout.parents[s]), rows_of(s)])] += 1
    for s in completions:
        rows = torch.cat([rows_of(layout.parents[s]), rows_of(s)])
        qs, ks, vs = (x[rows].to(torch.bfloat16).requires_grad_() for x in (q, k, v))
        heads_first = lambda x: x.transpose(0, 1)[None]  # noqa: E731
        o = F.scaled_dot_product_attention(heads_first(qs), heads_first(ks.repeat_interleave(group, 1)),
                                           heads_first(vs.repeat_interleave(group, 1)), is_causal=True)
        o = o[0].transpose(0, 1)
        o.backward((do[rows] / shares[rows][:, None, None]).to(torch.bfloat16))
        out[rows] = o.detach().double()
        for g, x in zip(grads, (qs, ks, vs)):
            g.index_add_(0, rows, x.grad.double())
    for name, a, b, t in zip(("out", "dq", "dk", "dv"), ours, (out, *grads), truth):
        ours_err, sdpa_err = (a - t).abs().max().item(), (b - t).abs().max().item()
        assert ours_err <= 2 * sdpa_err + 1e-3 * t.abs().max().item(), (name, ours_err, sdpa_err)


@pytest.mark.gpu
def test_gpu_offsets_past_int32():
    """T·Hq·d > 2³¹: the last group's rows lie past 2³¹ elements; groups are independent, so they must equal
    the kernels run on that group alone."""
    P, S, G, hq, d = 512, 256, 4, 8, 128
    groups = (2**31) // ((P + G * S) * hq * d) + 2
    layout = SharedPrefixLayout.from_groups([P] * groups, [[S] * G] * groups, device="cuda")
    T = layout.total_tokens
    assert T * hq * d > 2**31
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v, do = (torch.randn(T, hq, d, device="cuda", dtype=torch.bfloat16, generator=gen) for _ in range(4))
    leaves = [x.requires_grad_() for x in (q, k, v)]
    out = rlloss.shared_prefix_attention(*leaves, layout)
    out.backward(do)
    tail = slice(T - (P + G * S), T)
    alone = SharedPrefixLayout.from_groups([P], [[S] * G], device="cuda")
    small = [x[tail].detach().clone().requires_grad_() for x in (q, k, v)]
    out_alone = rlloss.shared_prefix_attention(*small, alone)
    out_alone.backward(do[tail])
    assert torch.equal(out[tail], out_alone)
    for big, little in zip(leaves, small):
        assert torch.equal(big.grad[tail], little.grad)
