"""torch.distributed on CPU (gloo), 2 and 4 processes started here: the vocabulary-parallel log-probs and fused
loss, the data-parallel normalisers, DDP and FSDP2 (``fully_shard``), each against the single-process result and
the float64 reference.

One spawn per world size runs every case (process start-up dominates); each rank records a traceback per failing
case and the tests below report them case by case. Every rank builds the same full inputs from a fixed seed and
computes the single-process result itself; a rank then keeps its shard of the vocabulary, or its share of the
batch.
"""
from __future__ import annotations

import json
import os
import socket
import traceback
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils.flop_counter import FlopCounterMode

import rlloss
from rlloss import FusedPolicyLoss, LossConfig, global_counts, policy_loss, reference
from rlloss.config import AGGREGATIONS, PRESETS
from rlloss.distributed import GlobalCounts

B, T, D, V = 4, 6, 8, 53
# Uneven contiguous vocabulary shards per world size (rank r holds rows [bounds[r], bounds[r + 1])).
BOUNDS = {2: [0, 20, 53], 4: [0, 10, 31, 40, 53]}
# A scratch bound of a few tokens per chunk, so the passes (and their collectives) run over several chunks.
SCRATCH = 5 * V * 8
# The kernels run on CPU through Triton's interpreter when conftest set TRITON_INTERPRET (no CUDA here).
BACKENDS = ("torch", "triton") if os.environ.get("TRITON_INTERPRET") == "1" else ("torch",)

CASES = {}


def case(fn):
    CASES[fn.__name__] = fn
    return fn


def _inputs(dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, D, generator=g).to(dtype)
    weight = (torch.randn(V, D, generator=g) * 0.7).to(dtype)
    bias = (torch.randn(V, generator=g) * 0.3).to(dtype)
    targets = torch.randint(0, V, (B, T), generator=g)
    mask = torch.rand(B, T, generator=g) > 0.25
    mask[:, 0] = True
    mask[2, 3:] = False
    targets[1, 4] = -100
    tokens = dict(
        advantages=torch.randn(B, generator=g).to(dtype),
        old_logprobs=(-torch.rand(B, T, generator=g) * 4).to(dtype),
        ref_logprobs=(-torch.rand(B, T, generator=g) * 4).to(dtype),
    )
    return hidden, weight, bias, targets, mask, tokens


def _close(name, got, want, rtol, atol):
    torch.testing.assert_close(got.double(), want.double(), rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")


def _leaves(*tensors):
    return [t.detach().clone().requires_grad_() for t in tensors]


def _flops(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


# --- vocabulary parallelism ---------------------------------------------------------------------------------


def _logprobs_case(rank, world, backend):
    dtype = torch.float64 if backend == "torch" else torch.float32
    tol = dict(rtol=1e-10, atol=1e-10) if dtype == torch.float64 else dict(rtol=2e-5, atol=2e-5)
    hidden, weight, bias, targets, *_ = _inputs(dtype)
    lo, hi = BOUNDS[world][rank], BOUNDS[world][rank + 1]
    g = torch.Generator().manual_seed(1)
    g_logp, g_ent = torch.randn(B, T, generator=g, dtype=dtype), torch.randn(B, T, generator=g, dtype=dtype)
    options = dict(temperature=0.7, softcap=4.0, ignore_index=-100)

    h, w, b = _leaves(hidden, weight[lo:hi], bias[lo:hi])
    out = rlloss.token_logprobs(h, w, targets, bias=b, return_entropy=True, max_scratch_bytes=SCRATCH,
                                backend=backend, process_group=dist.group.WORLD, **options)
    ((out.logprobs * g_logp).sum() + (out.entropy * g_ent).sum()).backward()
    with torch.no_grad():  # forward only: no autograd node, the same values
        plain = rlloss.token_logprobs(hidden, weight[lo:hi], targets, bias=bias[lo:hi], return_entropy=True,
                                      max_scratch_bytes=SCRATCH, backend=backend, process_group=dist.group.WORLD,
                                      **options)

    hr, wr, br = _leaves(hidden.double(), weight.double(), bias.double())
    ref_logp, ref_ent = reference.token_logprobs(hr, wr, targets, bias=br, **options)
    ((ref_logp * g_logp.double()).sum() + (ref_ent * g_ent.double()).sum()).backward()
    hs, ws, bs = _leaves(hidden, weight, bias)
    single = rlloss.token_logprobs(hs, ws, targets, bias=bs, return_entropy=True, max_scratch_bytes=SCRATCH,
                                   backend=backend, **options)
    ((single.logprobs * g_logp).sum() + (single.entropy * g_ent).sum()).backward()

    for want, name in ((ref_logp, "reference"), (single.logprobs, "single-process")):
        _close(f"logprobs vs {name}", out.logprobs, want, **tol)
    _close("entropy vs reference", out.entropy, ref_ent, **tol)
    _close("entropy vs single-process", out.entropy, single.entropy, **tol)
    _close("forward-only logprobs", plain.logprobs, out.logprobs, rtol=0, atol=0)
    _close("forward-only entropy", plain.entropy, out.entropy, rtol=0, atol=0)
    _close("d hidden", h.grad, hr.grad, **tol)
    _close("d weight shard", w.grad, wr.grad[lo:hi], **tol)
    _close("d bias shard", b.grad, br.grad[lo:hi], **tol)
    _close("d hidden vs single-process", h.grad, hs.grad, **tol)
    _close("d weight shard vs single-process", w.grad, ws.grad[lo:hi], **tol)
    assert (out.logprobs[1, 4] == 0) and (h.grad[1, 4] == 0).all(), "an ignored token must give 0 and get 0"


@case
def logprobs_torch(rank, world):
    _logprobs_case(rank, world, "torch")


@case
def logprobs_kernels(rank, world):
    for backend in BACKENDS[1:]:
        _logprobs_case(rank, world, backend)


def _fused_case(rank, world, preset, backend="torch"):
    """FusedPolicyLoss on a vocabulary shard vs unsharded, vs the float64 reference, and its GEMM count:
    6·N·D·V_shard for a one-pass (token-level) loss, 8·N·D·V_shard for GSPO (one recompute)."""
    dtype = torch.float64 if backend == "torch" else torch.float32
    tol = dict(rtol=1e-9, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-6)
    hidden, weight, bias, targets, mask, tokens = _inputs(dtype)
    targets = torch.where(mask, targets.clamp(min=0), targets)
    lo, hi = BOUNDS[world][rank], BOUNDS[world][rank + 1]
    config = LossConfig.preset(preset, beta=0.05, entropy_coef=0.01, entropy_aggregation=None)
    kwargs = dict(bias=None, **tokens)

    h, w = _leaves(hidden, weight[lo:hi])
    sharded = FusedPolicyLoss(config, temperature=0.9, max_scratch_bytes=SCRATCH, backend=backend,
                              process_group=dist.group.WORLD)
    out = sharded(h, w, targets, mask, **kwargs)
    out.loss.backward()
    hs, ws = _leaves(hidden, weight)
    single = FusedPolicyLoss(config, temperature=0.9, max_scratch_bytes=SCRATCH, backend=backend)(
        hs, ws, targets, mask, **kwargs)
    single.loss.backward()
    hr, wr = _leaves(hidden.double(), weight.double())
    ref_logp, ref_ent = reference.token_logprobs(hr, wr, torch.where(mask, targets, -100), temperature=0.9)
    ref = reference.policy_loss(ref_logp, tokens["old_logprobs"].double(), tokens["advantages"].double(), mask,
                                config=config, ref_logprobs=tokens["ref_logprobs"].double(), entropy=ref_ent)
    ref[0].backward()

    _close("loss vs reference", out.loss, ref[0], **tol)
    _close("loss vs single-process", out.loss, single.loss, **tol)
    for key, value in single.metrics.items():
        _close(f"metric {key}", out.metrics[key], value, **tol)
    _close("d hidden vs reference", h.grad, hr.grad, **tol)
    _close("d weight shard vs reference", w.grad, wr.grad[lo:hi], **tol)
    _close("d hidden vs single-process", h.grad, hs.grad, **tol)
    _close("d weight shard vs single-process", w.grad, ws.grad[lo:hi], **tol)

    h, w = _leaves(hidden, weight[lo:hi])
    flops = _flops(lambda: sharded(h, w, targets, mask, **kwargs).loss.backward())
    passes = 3 if config.importance_sampling_level == "token" else 4
    assert flops == passes * 2 * B * T * D * (hi - lo), f"{preset}: {flops} FLOPs, expected {passes} GEMM passes"


@case
def fused_one_pass_dapo(rank, world):
    _fused_case(rank, world, "dapo")


@case
def fused_gspo(rank, world):
    _fused_case(rank, world, "gspo")


@case
def fused_kernels(rank, world):
    for backend in BACKENDS[1:]:
        _fused_case(rank, world, "verl_grpo", backend)


@case
def errors(rank, world):
    hidden, weight, _, targets, mask, tokens = _inputs()
    lo, hi = BOUNDS[world][rank], BOUNDS[world][rank + 1]
    with pytest.raises(ValueError, match="process_group.*reference backend"):
        rlloss.token_logprobs(hidden, weight[lo:hi], targets, backend="reference", process_group=dist.group.WORLD)
    bad = targets.clone()
    bad[0, 0] = V  # in no shard: checked against the whole vocabulary
    with pytest.raises(ValueError, match=rf"targets must lie in \[0, {V}\)"):
        rlloss.token_logprobs(hidden, weight[lo:hi], bad, process_group=dist.group.WORLD)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world,))
    sharded = distribute_tensor(weight[: V - V % world], mesh, [Shard(0)])
    with pytest.raises(TypeError, match="weight is a DTensor.*fully_shard.*to_local"):
        FusedPolicyLoss(LossConfig.preset("dapo"))(hidden, sharded, targets, mask, tokens["advantages"])


# --- data parallelism -------------------------------------------------------------------------------------


def _split(world, rank):
    """This rank's sequences as two micro-batches (DDP and FSDP2 need the same number of steps on every rank):
    shuffled rows, uneven shares (rank 0 gets two of world + 1 parts), uneven micro-batches (1 row, the rest)."""
    rows = torch.randperm(2 * B * world, generator=torch.Generator().manual_seed(3))
    shares = torch.tensor_split(rows, world + 1)
    mine = torch.cat([shares[rank], shares[world]]) if rank == 0 else shares[rank]
    return list(torch.tensor_split(mine, [1]))


def _dp_configs(world):
    """Every preset (verl_dro with its required dro_beta) but those whose loss ranks the tokens of the batch it
    is given (clip_cov, kl_cov: verl selects per micro-batch too, so their loss depends on the split by
    design), and every aggregation mode."""
    required = {"verl_dro": dict(dro_beta=0.3)}
    configs = {}
    for name in PRESETS:
        config = LossConfig.preset(name, max_completion_length=T, **required.get(name, {}))
        if config.loss_mode not in ("clip_cov", "kl_cov"):
            configs[name] = config
    base = LossConfig.preset("grpo", beta=0.02, entropy_coef=0.01, entropy_aggregation=None,
                             max_completion_length=T)
    for agg in AGGREGATIONS:
        configs[f"aggregation={agg}"] = base.replace(aggregation=agg)
    return configs


def _grad(leaf):
    """A leaf's gradient flattened; zeros where it got none (no entropy term)."""
    return (leaf.grad if leaf.grad is not None else torch.zeros_like(leaf)).reshape(-1)


@case
def data_parallel_normalisers(rank, world):
    """Σ over micro-batches, mean over ranks (DDP) of loss and gradients with global_counts = the
    single-process loss of the whole batch, for every preset and every aggregation mode (token_sum with
    verl's dp_size = world size)."""
    n = 2 * B * world
    g = torch.Generator().manual_seed(4)
    logp = -torch.rand(n, T, generator=g, dtype=torch.float64) * 3
    entropy = torch.rand(n, T, generator=g, dtype=torch.float64) * 2
    tokens = dict(old_logprobs=logp + 0.1 * torch.randn(n, T, generator=g, dtype=torch.float64),
                  ref_logprobs=logp + 0.2 * torch.randn(n, T, generator=g, dtype=torch.float64))
    advantages = torch.randn(n, generator=g, dtype=torch.float64)
    mask = torch.rand(n, T, generator=g) > 0.3
    mask[:, 0] = True
    mask[1] = False  # a sequence with no counted token
    micro = _split(world, rank)
    counts = global_counts([mask[rows] for rows in micro])
    failures = []
    for name, config in _dp_configs(world).items():
        single_config = config
        if "token_sum" in config.term_aggregations:
            config = config.replace(dp_size=world)
        lp, ent = _leaves(logp, entropy)
        full = policy_loss(lp, tokens["old_logprobs"], advantages, mask, config=single_config, entropy=ent,
                           ref_logprobs=tokens["ref_logprobs"])
        full.loss.backward()
        lp_dp, ent_dp = _leaves(logp, entropy)
        total = torch.zeros((), dtype=torch.float64)
        for rows in micro:
            out = policy_loss(lp_dp[rows], tokens["old_logprobs"][rows], advantages[rows], mask[rows],
                              config=config, entropy=ent_dp[rows], ref_logprobs=tokens["ref_logprobs"][rows],
                              num_items_in_batch=counts.num_items_in_batch,
                              num_sequences_in_batch=counts.num_sequences_in_batch)
            out.loss.backward()
            total = total + out.loss.detach()
        reduced = torch.cat([total.reshape(1), *(_grad(t) for t in (lp_dp, ent_dp))])
        dist.all_reduce(reduced)  # DDP's gradient average (each rank's grads are 0 outside its rows)
        reduced /= world
        want = torch.cat([full.loss.reshape(1).detach(), *(_grad(t) for t in (lp, ent))])
        if not torch.allclose(reduced, want, rtol=1e-10, atol=1e-13):
            failures.append(f"{name}: max difference {(reduced - want).abs().max().item():.3g}")
    assert not failures, "; ".join(failures)


@case
def tensor_and_data_parallel(rank, world):
    """A 2-D layout: tensor-parallel groups of world/2 ranks (vocabulary shards; a group of one at world 2)
    inside 2 data-parallel replicas. FusedPolicyLoss with the TP group and global_counts over the DP group:
    the DP-averaged weight-shard gradient and the hidden gradient equal the single-process ones."""
    tp_size = world // 2
    tp_groups = [dist.new_group(list(range(start, start + tp_size))) for start in range(0, world, tp_size)]
    dp_groups = [dist.new_group(list(range(tp_rank, world, tp_size))) for tp_rank in range(tp_size)]
    tp_rank, dp_rank = rank % tp_size, rank // tp_size
    tp_group, dp_group = tp_groups[dp_rank], dp_groups[tp_rank]
    bounds = [0, V] if tp_size == 1 else BOUNDS[tp_size]
    lo, hi = bounds[tp_rank], bounds[tp_rank + 1]
    hidden, weight, _, targets, mask, tokens = _inputs()
    targets = torch.where(mask, targets.clamp(min=0), targets)
    rows = [slice(0, 1), slice(1, B)][dp_rank]  # uneven replicas
    config = LossConfig.preset("dapo", beta=0.05, entropy_coef=0.01, entropy_aggregation=None)
    kwargs = dict(tokens)

    hs, ws = _leaves(hidden, weight)
    FusedPolicyLoss(config, temperature=0.9)(hs, ws, targets, mask, **kwargs).loss.backward()

    h, w = _leaves(hidden[rows], weight[lo:hi])
    counts = global_counts(mask[rows], group=dp_group)
    mine = {key: value[rows] for key, value in kwargs.items()}
    out = FusedPolicyLoss(config, temperature=0.9, process_group=tp_group)(
        h, w, targets[rows], mask[rows], num_items_in_batch=counts.num_items_in_batch,
        num_sequences_in_batch=counts.num_sequences_in_batch, **mine)
    out.loss.backward()
    dist.all_reduce(w.grad, group=dp_group)  # DDP's average over the replicas
    w.grad /= 2
    _close("d weight shard (DP-averaged)", w.grad, ws.grad[lo:hi], rtol=1e-9, atol=1e-12)
    _close("d hidden (one replica's rows, before DDP's 1/2)", h.grad / 2, hs.grad[rows], rtol=1e-9, atol=1e-12)


class _Policy(torch.nn.Module):
    """A tiny policy whose forward runs the loss, as a training loop under DDP or FSDP2 does."""

    def __init__(self, config):
        super().__init__()
        g = torch.Generator().manual_seed(5)
        self.body = torch.nn.Linear(D, D, dtype=torch.float64)
        self.lm_head = torch.nn.Linear(D, V, bias=False, dtype=torch.float64)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.5)
        self.loss = FusedPolicyLoss(config, max_scratch_bytes=SCRATCH)

    def forward(self, x, targets, mask, advantages, old_logprobs, counts):
        hidden = torch.tanh(self.body(x))
        return self.loss(hidden, self.lm_head.weight, targets, mask, advantages, old_logprobs=old_logprobs,
                         num_items_in_batch=counts.num_items_in_batch,
                         num_sequences_in_batch=counts.num_sequences_in_batch).loss


def _wrapped_case(rank, world, wrap):
    """The fused loss inside a DDP- or FSDP2-wrapped module: gradients equal the single-process ones."""
    n = 2 * B * world
    g = torch.Generator().manual_seed(6)
    x = torch.randn(n, T, D, generator=g, dtype=torch.float64)
    targets = torch.randint(0, V, (n, T), generator=g)
    mask = torch.rand(n, T, generator=g) > 0.3
    advantages = torch.randn(n, generator=g, dtype=torch.float64)
    old = -torch.rand(n, T, generator=g, dtype=torch.float64) * 3
    micro = _split(world, rank)
    failures = []
    for preset in ("dapo", "grpo"):
        config = LossConfig.preset(preset)
        single = _Policy(config)
        whole = GlobalCounts(mask.sum(dtype=torch.float64), torch.tensor(float(n), dtype=torch.float64))
        single_loss = single(x, targets, mask, advantages, old, whole)
        single_loss.backward()
        model = wrap(_Policy(config))
        counts = global_counts([mask[rows] for rows in micro])
        total = 0.0
        for rows in micro:
            loss = model(x[rows], targets[rows], mask[rows], advantages[rows], old[rows], counts)
            loss.backward()
            total += loss.item()
        total = torch.tensor(total, dtype=torch.float64)
        dist.all_reduce(total)
        if not torch.allclose(total / world, single_loss.detach(), rtol=1e-10):
            failures.append(f"{preset} loss {total.item() / world} != {single_loss.item()}")
        for (name, p), ps in zip(model.named_parameters(), single.parameters()):
            grad = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
            if not torch.allclose(grad, ps.grad, rtol=1e-9, atol=1e-12):
                failures.append(f"{preset} d{name}: max difference {(grad - ps.grad).abs().max().item():.3g}")
    assert not failures, "; ".join(failures)


@case
def ddp(rank, world):
    _wrapped_case(rank, world, torch.nn.parallel.DistributedDataParallel)


@case
def fsdp2(rank, world):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (world,))
    _wrapped_case(rank, world, lambda model: fully_shard(model, mesh=mesh))

    model = fully_shard(_Policy(LossConfig.preset("dapo")), mesh=mesh)
    hidden, _, _, targets, mask, tokens = _inputs()
    with pytest.raises(TypeError, match="weight is a DTensor.*inside the forward"):
        model.loss(hidden, model.lm_head.weight, targets, mask, tokens["advantages"])


# --- the spawn ------------------------------------------------------------------------------------------------


def _worker(rank, world, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=120))
    outcomes = {}
    for name, fn in CASES.items():
        torch.manual_seed(0)
        try:
            fn(rank, world)
            outcomes[name] = ""
        except Exception:  # recorded per case and reported by test_case
            outcomes[name] = traceback.format_exc()
        dist.barrier()
    dist.destroy_process_group()
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(outcomes, f)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module", params=[2, 4], ids=lambda w: f"world{w}")
def outcomes(request, tmp_path_factory):
    world = request.param
    out_dir = tmp_path_factory.mktemp(f"world{world}")
    mp.spawn(_worker, args=(world, _free_port(), str(out_dir)), nprocs=world)
    return [json.loads((out_dir / f"rank{rank}.json").read_text()) for rank in range(world)]


@pytest.mark.parametrize("name", list(CASES))
def test_case(outcomes, name):
    failed = [f"rank {rank}:\n{per_rank[name]}" for rank, per_rank in enumerate(outcomes) if per_rank[name]]
    assert not failed, "\n".join(failed)


def test_process_group_needs_torch_distributed():
    hidden, weight, _, targets, *_ = _inputs()
    with pytest.raises(ValueError, match="torch.distributed is not initialised"):
        rlloss.token_logprobs(hidden, weight, targets, process_group=object())


def test_global_counts_without_torch_distributed():
    masks = [torch.tensor([[1, 0, 1], [0, 0, 0]]), torch.ones(3, 5, dtype=torch.bool)]
    counts = global_counts(masks)
    assert counts.num_items_in_batch.item() == 17 and counts.num_sequences_in_batch.item() == 5
    with pytest.raises(ValueError, match="mask must be"):
        global_counts([])
