"""The fast path of issue #9: FLOP accounting of the chunked algorithm, the registered torch ops (opcheck,
torch.compile(fullgraph=True) of a training step) and batch invariance.

FLOPs are counted with torch.utils.flop_counter.FlopCounterMode around the implementations the registered ops
run (``*_impl``): a custom op is one opaque call to the counter, so the GEMMs are counted where they are issued.
"""
from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import rlloss
from conftest import KERNEL_BACKEND
from rlloss import logprobs as lp
from rlloss import policy as pl

B, T, D, V = 3, 10, 16, 200
N = B * T


def _inputs(seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, D, generator=g).to(dtype)
    weight = (torch.randn(V, D, generator=g) * 0.3).to(dtype)
    targets = torch.randint(0, V, (B, T), generator=g)
    mask = torch.rand(B, T, generator=g) > 0.2
    mask[:, 0] = True
    adv = torch.randn(B, generator=g)
    old = -torch.rand(B, T, generator=g) * 3
    return hidden, weight, targets, mask, adv, old


def _flops(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def _options(backend, rows=7):
    """A scratch bound of `rows` tokens per chunk: several chunks, the last one short."""
    per_row = V * lp._scratch_bytes_per_logit(torch.float32, backend)
    return lp.LinearOptions(1.0, None, -100, backend, rows * per_row, False)


# --- FLOP accounting ------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["torch", KERNEL_BACKEND])
def test_token_logprobs_costs_eight_ndv(backend):
    """Forward: one GEMM per chunk (2·N·D·V); backward: one recompute and the two gradient GEMMs (6·N·D·V)."""
    hidden, weight, targets, *_ = _inputs()
    h, y = hidden.reshape(N, D), targets.reshape(N)
    opts = _options(backend)
    args = (h, weight, None, y, *opts)
    forward = _flops(lambda: lp.token_logprobs_impl(*args))
    _, _, shift, total, ratio = lp.token_logprobs_impl(*args)
    g = torch.randn(N)
    backward = _flops(lambda: lp.token_logprobs_backward_impl(g, g, h, weight, None, y, shift, total, ratio,
                                                              [True, True, False], *opts))
    assert forward == 2 * N * D * V
    assert backward == 6 * N * D * V


def _fused_flops(config, backend, old, rollout_weights=None):
    hidden, weight, targets, mask, adv, _ = _inputs()
    y = torch.where(mask, targets, torch.full_like(targets, -100)).reshape(N)
    normaliser = pl.aggregation_normaliser(config, mask)
    opts = _options(backend)
    args = (hidden.reshape(N, D), weight, None, y, old, adv, mask, None, None, None, None, rollout_weights, None, None,
            normaliser, config.key, [True, True, False], *opts)
    forward = _flops(lambda: pl.fused_policy_loss_impl(*args))
    out = pl.fused_policy_loss_impl(*args)
    if out[2].numel():  # one pass: the backward only scales the gradients formed in the forward
        return forward, 0
    shift, total, ratio, grad, _ = out[5:]
    backward = _flops(lambda: lp.token_logprobs_backward_impl(
        grad.reshape(-1), None, hidden.reshape(N, D), weight, None, y, shift, total, ratio, [True, True, False],
        *opts))
    return forward, backward


@pytest.mark.parametrize("backend", ["torch", KERNEL_BACKEND])
@pytest.mark.parametrize("preset", ["grpo", "dapo", "bnpo", "dr_grpo", "cispo", "verl_grpo", "verl_dppo_tv",
                                    "verl_dppo_kl", "verl_dro"])
def test_fused_policy_loss_costs_six_ndv(backend, preset):
    """Token-level losses: the gradients are formed in the forward pass, 6·N·D·V in all (the naive floor)."""
    overrides = {"dr_grpo": {"max_completion_length": T}, "verl_dro": {"dro_beta": 0.1}}.get(preset, {})
    config = rlloss.LossConfig.preset(preset, **overrides)
    forward, backward = _fused_flops(config, backend, _inputs()[5])
    assert (forward, backward) == (6 * N * D * V, 0)


@pytest.mark.parametrize("backend", ["torch", KERNEL_BACKEND])
def test_sequence_level_ratio_costs_eight_ndv(backend):
    """GSPO needs every token of a sequence before any gradient: statistics, then one recompute."""
    forward, backward = _fused_flops(rlloss.LossConfig.preset("gspo"), backend, _inputs()[5])
    assert (forward, backward) == (2 * N * D * V, 6 * N * D * V)


def test_precomputed_rollout_weights_keep_one_pass():
    """rollout_weights (the form verl's batch-normalised weights reach the op in) leave a token loss one pass."""
    forward, backward = _fused_flops(rlloss.LossConfig.preset("dapo"), "torch", _inputs()[5], torch.rand(B, T))
    assert (forward, backward) == (6 * N * D * V, 0)


@pytest.mark.parametrize("preset", ["verl_geo_mean", "verl_clip_cov", "verl_kl_cov", "vespo"])
def test_sequence_and_batch_coupled_modes_cost_eight_ndv(preset):
    """GMPO and VESPO (a sequence quantity) and clip_cov / kl_cov (a batch ranking) take the two-pass route."""
    forward, backward = _fused_flops(rlloss.LossConfig.preset(preset), "torch", _inputs()[5])
    assert (forward, backward) == (2 * N * D * V, 6 * N * D * V)


def test_public_calls_run_the_counted_implementations(monkeypatch):
    """The public functions reach the implementations counted above (through the registered ops)."""
    calls = []
    for module, name in ((lp, "run_pass"),):
        original = getattr(module, name)

        def spy(*args, _original=original, **kwargs):
            calls.append(kwargs.get("upstream") is not None)
            return _original(*args, **kwargs)

        monkeypatch.setattr(module, name, spy)
        monkeypatch.setattr(pl, name, spy)
    hidden, weight, targets, mask, adv, old = _inputs()
    hidden.requires_grad_(True)
    out = rlloss.FusedPolicyLoss(rlloss.LossConfig.preset("dapo"), backend="torch")(
        hidden, weight, targets, mask, adv, old_logprobs=old)
    out.loss.backward()
    assert calls == [True]  # one pass, gradients formed in it
    calls.clear()
    res = rlloss.token_logprobs(hidden, weight, targets, backend="torch")
    res.logprobs.sum().backward()
    assert calls == [False, True]  # statistics, then one recompute


# --- registered ops -------------------------------------------------------------------------------------


def test_opcheck_every_op():
    hidden, weight, targets, mask, adv, old = _inputs()
    h = hidden.reshape(N, D).requires_grad_(True)
    w = weight.clone().requires_grad_(True)
    y = torch.where(mask, targets, torch.full_like(targets, -100)).reshape(N)
    opts = tuple(_options("torch"))
    torch.library.opcheck(torch.ops.rlloss.token_logprobs.default, (h, w, None, y, *opts))
    _, _, shift, total, ratio = lp.token_logprobs_impl(h.detach(), weight, None, y, *opts)
    g = torch.randn(N)
    torch.library.opcheck(torch.ops.rlloss.token_logprobs_backward.default,
                          (g, None, h.detach(), weight, None, y, shift, total, ratio, [True, True, False], *opts))
    for preset, rollout_weights in (("dapo", None), ("gspo", None), ("vespo", torch.rand(B, T) + 0.5)):
        config = rlloss.LossConfig.preset(preset, beta=0.04)
        ref = old - 0.1
        normaliser = pl.aggregation_normaliser(config, mask)
        logp = (old + 0.05 * torch.randn(B, T)).requires_grad_(True)
        ent = torch.rand(B, T, requires_grad=True)
        torch.library.opcheck(torch.ops.rlloss.policy_loss.default,
                              (logp, ent, old, adv, mask, ref, None, None, None, rollout_weights, None, None,
                               normaliser, config.key, "torch"))
        torch.library.opcheck(torch.ops.rlloss.fused_policy_loss.default,
                              (h, w, None, y, old, adv, mask, ref, None, None, None, rollout_weights, None, None,
                               normaliser, config.key, [True, True, False], *opts))


def test_training_step_compiles_without_graph_breaks():
    """group_advantages → token_logprobs (old policy, no grad) → FusedPolicyLoss and policy_loss, compiled with
    fullgraph=True (a graph break raises) and with check_inputs=False; same values and gradients as eager."""
    torch._dynamo.reset()
    hidden, weight, targets, mask, _, _ = _inputs()
    rewards = torch.randn(B)
    config = rlloss.LossConfig.preset("dapo", beta=0.04)
    loss_fn = rlloss.FusedPolicyLoss(config, check_inputs=False, backend="torch")

    def step(hidden, weight, targets, mask, rewards):
        adv = rlloss.group_advantages(rewards, group_size=B, check_inputs=False, backend="torch")
        with torch.no_grad():
            old = rlloss.token_logprobs(hidden, weight, targets, check_inputs=False, backend="torch").logprobs
            ref = old - 0.1
        fused = loss_fn(hidden, weight, targets, mask, adv, old_logprobs=old, ref_logprobs=ref)
        out = rlloss.token_logprobs(hidden, weight, targets, return_entropy=True, check_inputs=False,
                                    backend="torch")
        plain = rlloss.policy_loss(out.logprobs, old, adv, mask, config=config, ref_logprobs=ref,
                                   entropy=out.entropy, check_inputs=False, backend="torch")
        return fused.loss + plain.loss, fused.metrics["clip_ratio/region_mean"]

    results = []
    for fn in (step, torch.compile(step, fullgraph=True)):
        h = hidden.clone().requires_grad_(True)
        w = weight.clone().requires_grad_(True)
        loss, metric = fn(h, w, targets, mask, rewards)
        loss.backward()
        results.append((loss.detach(), metric, h.grad, w.grad))
    for eager, compiled in zip(*results):
        torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-6)


# --- batch invariance ----------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["torch", KERNEL_BACKEND])
def test_batch_invariant_logprobs_are_bitwise_independent_of_the_batch(backend):
    """The same token gives the same bits whatever N, max_scratch_bytes and the other rows are."""
    g = torch.Generator().manual_seed(3)
    Vb, Db = 300, 24
    weight = torch.randn(Vb, Db, generator=g) * 0.3
    probe = torch.randn(5, Db, generator=g)
    probe_targets = torch.randint(0, Vb, (5,), generator=g)
    outs = []
    for n, scratch in ((0, 1 << 20), (3, 1 << 16), (300, 1 << 24), (517, 1 << 14)):
        others = torch.randn(n, Db, generator=g) * 3
        hidden = torch.cat([others[: n // 2], probe, others[n // 2:]])
        targets = torch.cat([torch.randint(0, Vb, (n // 2,), generator=g), probe_targets,
                             torch.randint(0, Vb, (n - n // 2,), generator=g)])
        out = rlloss.token_logprobs(hidden, weight, targets, return_entropy=True, batch_invariant=True,
                                    max_scratch_bytes=scratch, backend=backend)
        rows = slice(n // 2, n // 2 + 5)
        outs.append((out.logprobs[rows], out.entropy[rows]))
    for logprobs, entropy in outs[1:]:
        assert torch.equal(logprobs, outs[0][0]) and torch.equal(entropy, outs[0][1])
    ref = rlloss.token_logprobs(probe.double(), weight.double(), probe_targets, return_entropy=True,
                                backend="reference")
    torch.testing.assert_close(outs[0][0].double(), ref.logprobs, rtol=1e-5, atol=1e-5)


def test_batch_invariant_gradients_match_the_default():
    hidden, weight, targets, *_ = _inputs()
    grads = []
    for invariant in (False, True):
        h = hidden.clone().requires_grad_(True)
        out = rlloss.token_logprobs(h, weight, targets, return_entropy=True, batch_invariant=invariant,
                                    backend="torch")
        (out.logprobs.sum() + out.entropy.sum()).backward()
        grads.append(h.grad)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-6, atol=1e-6)


# --- options -----------------------------------------------------------------------------------------


def test_default_scratch_bound_holds_at_qwen_vocabulary():
    """256 MiB at V = 151936 with bfloat16 inputs on the kernels: float32 logits + bfloat16 gradient."""
    opts = lp.LinearOptions(1.0, None, -100, "triton")
    rows = lp.chunk_rows(10**6, 151936, torch.bfloat16, opts)
    assert rows * 151936 * (4 + 2) <= lp.DEFAULT_MAX_SCRATCH_BYTES < (rows + 1) * 151936 * (4 + 2)


@pytest.mark.parametrize("value,exc", [(0, ValueError), (-5, ValueError), (1.5, TypeError), (True, TypeError)])
def test_max_scratch_bytes_is_checked(value, exc):
    hidden, weight, targets, *_ = _inputs()
    with pytest.raises(exc, match="max_scratch_bytes"):
        rlloss.token_logprobs(hidden, weight, targets, max_scratch_bytes=value)
    with pytest.raises(exc, match="max_scratch_bytes"):
        rlloss.FusedPolicyLoss(rlloss.LossConfig.preset("dapo"), max_scratch_bytes=value)


def test_check_inputs_false_skips_the_device_reads(monkeypatch):
    """With check_inputs=False the checks that read device values are not run (they would sync)."""
    from rlloss import _checks

    def fail(*args, **kwargs):
        raise AssertionError("a device-reading check ran")

    monkeypatch.setattr(_checks, "targets_in_range", fail)
    hidden, weight, targets, mask, adv, old = _inputs()
    rlloss.token_logprobs(hidden, weight, targets, check_inputs=False)
    rlloss.FusedPolicyLoss(rlloss.LossConfig.preset("dapo"), check_inputs=False)(
        hidden, weight, targets, mask.float(), adv, old_logprobs=old, num_items_in_batch=torch.tensor(7.0))
    with pytest.raises(AssertionError, match="device-reading"):
        rlloss.token_logprobs(hidden, weight, targets)


# --- GPU: no host synchronisation, CUDA-graph capture ----------------------------------------------------


@pytest.mark.gpu
def test_gpu_no_sync_and_cuda_graph_capture():
    """With check_inputs=False a FusedPolicyLoss forward + backward neither synchronises (sync debug mode
    "error" raises on any synchronising call) nor breaks CUDA-graph capture; the replayed graph gives the
    eager gradients."""
    device = torch.device("cuda")
    hidden, weight, targets, mask, adv, old = (t.to(device) for t in _inputs(dtype=torch.bfloat16))
    loss_fn = rlloss.FusedPolicyLoss(rlloss.LossConfig.preset("dapo"), check_inputs=False)
    h = hidden.clone().requires_grad_(True)
    w = weight.clone().requires_grad_(True)
    n_items = mask.sum().to(torch.float32)  # a device tensor: no host read inside the step

    def step():
        out = loss_fn(h, w, targets, mask, adv, old_logprobs=old, num_items_in_batch=n_items)
        out.loss.backward()
        return out.loss

    step()  # warm-up: compiles the kernels, probes cuBLAS
    torch.cuda.synchronize()
    h.grad = w.grad = None
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    eager = (h.grad.clone(), w.grad.clone())
    h.grad = w.grad = None
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    h.grad = w.grad = None
    with torch.cuda.graph(graph):
        step()
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(h.grad, eager[0])
    torch.testing.assert_close(w.grad, eager[1])
