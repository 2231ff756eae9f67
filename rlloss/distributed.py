"""Past one device (docs/distributed.md): the vocabulary-parallel log-probs and fused policy loss behind
``token_logprobs(..., process_group=)`` and ``FusedPolicyLoss(..., process_group=)``, and the data-parallel
normalisers of :func:`global_counts`.

Vocabulary parallelism runs the one chunked algorithm of ``rlloss.logprobs.run_pass`` on each rank's rows of the
lm_head, with a per-chunk hook (:class:`rlloss.logprobs.VocabShard`) that merges the ranks' partial statistics
(docs/math.md §1) with one all-gather before anything uses them. The registered single-device ops cannot carry a
process group, so the sharded path is a plain ``torch.autograd.Function`` here.
"""
from __future__ import annotations

from typing import List, NamedTuple, Optional, Sequence, Tuple, Union

import torch
import torch.distributed as dist
from torch import Tensor
from torch.autograd.function import once_differentiable

from . import _checks
from ._backend import is_reference
from .logprobs import LinearOptions, RowStats, VocabShard, merge_stats, run_pass

__all__ = ["GlobalCounts", "global_counts"]


def _all_gather(out: Tensor, part: Tensor, group) -> None:
    """All-gather ``part`` of every rank into ``out`` (concatenated along dim 0). torch ≥ 2.13 names
    all_gather_into_tensor all_gather_single (the old name warns)."""
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(out, part, group=group)


# --- vocabulary parallelism --------------------------------------------------------------------------------


class VocabLayout(NamedTuple):
    """Where this rank's shard of the lm_head sits: rows [start, start + rows) of a vocabulary of ``vocab``
    entries; ``largest`` is the largest shard (chunks are sized for it on every rank)."""

    start: int
    rows: int
    vocab: int
    largest: int


def vocab_layout(rows: int, group, device: torch.device, backend: str) -> VocabLayout:
    """The shards' layout from one all-gather of their sizes (p integers, one host sync): rank r of ``group``
    holds the rows that follow those of ranks 0..r−1, so no rank can be given a wrong offset. A process group
    needs torch.distributed initialised and is rejected on the reference backend (the naive oracle has no
    sharded form)."""
    if not dist.is_available() or not dist.is_initialized():
        raise ValueError("process_group was given but torch.distributed is not initialised; call "
                         "torch.distributed.init_process_group first, or pass process_group=None")
    if is_reference(backend):
        raise ValueError("process_group (a vocabulary-sharded lm_head) is not supported on the reference backend; "
                         "use backend='torch' or 'triton'")
    world = dist.get_world_size(group)
    sizes = torch.empty(world, dtype=torch.int64, device=device)
    _all_gather(sizes, torch.tensor([rows], dtype=torch.int64, device=device), group=group)
    sizes = sizes.tolist()
    rank = dist.get_rank(group)
    return VocabLayout(sum(sizes[:rank]), rows, sum(sizes), max(sizes))


def local_targets(targets: Tensor, layout: VocabLayout, ignore_index: int) -> Tensor:
    """Global target ids → this shard's ids: id − start inside the shard, an id outside [0, rows) that is not
    ``ignore_index`` elsewhere (see :class:`rlloss.logprobs.VocabShard`), ``ignore_index`` kept."""
    local = targets - layout.start
    outside = torch.full_like(local, -1 if ignore_index != -1 else -2)
    local = torch.where((local >= 0) & (local < layout.rows), local, outside)
    return torch.where(targets == ignore_index, targets, local)


def vocab_shard(group, layout: VocabLayout) -> VocabShard:
    """The per-chunk hook of ``run_pass`` for this rank: all-gather the packed [4, n] partial statistics
    (M, A, C, z_y; z_y = 0 where the target lies elsewhere) and merge them exactly (docs/math.md §1)."""
    world = dist.get_world_size(group)

    def merge(local: RowStats, owned: Tensor) -> RowStats:
        target = torch.where(owned, local.target + local.shift, torch.zeros_like(local.target))
        packed = torch.stack((local.shift, local.total, local.ratio * local.total, target))
        gathered = packed.new_empty((world * 4, packed.shape[1]))
        _all_gather(gathered, packed, group=group)
        return merge_stats(gathered.view(world, 4, -1).transpose(0, 1))

    return VocabShard(layout.largest, merge)


def _recompute(ctx, g_logp, g_ent, needs) -> Tuple[Optional[Tensor], ...]:
    """(dh, dW, db), the needed ones, of one recompute pass from the saved (hidden, weight, bias, targets, M, A,
    C/A) with the global statistics; dh summed over the ranks (Megatron's column-parallel input region), dW and
    db this shard's own."""
    hidden, weight, bias, targets, shift, total, ratio = ctx.saved_tensors[:7]
    result = run_pass(hidden, weight, bias, targets, ctx.options, stats=RowStats(shift, total, ratio, shift),
                      upstream=(g_logp, g_ent), needs=tuple(needs), shard=ctx.shard)
    if result.grad_input is not None:
        dist.all_reduce(result.grad_input, group=ctx.group)
    return result.grad_input, result.grad_weight, result.grad_bias


class _VocabParallelLogprobs(torch.autograd.Function):
    """(logprobs, entropy) [N] from hidden [N, D] and this rank's shard of the lm_head."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, options, shard, group):
        result = run_pass(hidden, weight, bias, targets, options, shard=shard)
        ctx.save_for_backward(hidden, weight, bias, targets, *result.stats[:3])
        ctx.options, ctx.shard, ctx.group = options, shard, group
        ctx.set_materialize_grads(False)
        return result.logprobs, result.entropy

    @staticmethod
    @once_differentiable
    def backward(ctx, g_logp, g_ent):
        if g_logp is None and g_ent is None:
            return (None,) * 7
        return (*_recompute(ctx, g_logp, g_ent, ctx.needs_input_grad[:3]), None, None, None, None)


def vocab_parallel_logprobs(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], targets: Tensor,
                            options: LinearOptions, group, check_range: bool) -> Tuple[Tensor, Tensor]:
    """(logprobs, entropy) [N] of ``token_logprobs(..., process_group=group)`` from hidden [N, D], this rank's
    weight rows and global targets [N]."""
    layout = vocab_layout(weight.shape[0], group, hidden.device, options.backend)
    if check_range:
        _checks.targets_in_range(targets, layout.vocab, options.ignore_index)
    shard = vocab_shard(group, layout)
    ids = local_targets(targets, layout, options.ignore_index)
    return _VocabParallelLogprobs.apply(hidden, weight, bias, ids, options, shard, group)  # no node without grads


class _VocabParallelFusedLoss(torch.autograd.Function):
    """(loss, packed metrics) of the fused policy loss on this rank's shard of the lm_head: ``fused_pass`` with
    the statistics merged per chunk, so the one-pass losses stay one pass."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, inputs, normaliser, config, needs, options, shard, group):
        from .policy import fused_pass, save_fused

        out = fused_pass(hidden, weight, bias, targets, *inputs.values(), normaliser, config, needs, options, shard)
        save_fused(ctx, (hidden, weight, bias, targets), out, needs)
        ctx.options, ctx.shard, ctx.group = options, shard, group
        ctx.mark_non_differentiable(out[1])
        return out[0], out[1]

    @staticmethod
    @once_differentiable
    def backward(ctx, g_loss, _):
        from .policy import fused_grads

        grads = fused_grads(ctx, g_loss, lambda g_logp, g_ent: _recompute(ctx, g_logp, g_ent, ctx.needs))
        if ctx.fused and grads[0] is not None:  # formed in the forward: sum dh over the ranks
            dist.all_reduce(grads[0], group=ctx.group)
        return (*grads, *(None,) * 8)


def vocab_parallel_fused_loss(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], targets: Tensor,
                              inputs: dict, normaliser: Tensor, config: str, needs: List[bool],
                              options: LinearOptions, group, layout: VocabLayout) -> Tuple[Tensor, Tensor]:
    """(loss, packed metrics) of ``FusedPolicyLoss(..., process_group=group)``: hidden [N, D], this rank's weight
    rows, global targets [N] (``options.ignore_index`` where not counted) and the checked [B, T] token inputs of
    ``rlloss.policy._check_loss_inputs``."""
    ids = local_targets(targets, layout, options.ignore_index)
    return _VocabParallelFusedLoss.apply(hidden, weight, bias, ids, inputs, normaliser, config, needs, options,
                                         vocab_shard(group, layout), group)


# --- data parallelism --------------------------------------------------------------------------------------


class GlobalCounts(NamedTuple):
    """What :func:`global_counts` returns: pass both to :func:`rlloss.policy_loss` / ``FusedPolicyLoss``.

    num_items_in_batch: counted tokens of the whole step, over every micro-batch and rank, divided by the
        group size (float64 0-d tensor, on the masks' device).
    num_sequences_in_batch: sequences of the whole step, likewise.
    """

    num_items_in_batch: Tensor
    num_sequences_in_batch: Tensor


def global_counts(mask: Union[Tensor, Sequence[Tensor]], group=None, *, average_gradients: bool = True) -> GlobalCounts:
    """The normalisers of one optimiser step under data parallelism: one all-reduce per step.

    Every rank passes the masks of all its micro-batches of the step (a [B, T] mask, or a list of them with any
    B and T). The token count Σ m and the sequence count B are summed over the micro-batches and over ``group``,
    so that each micro-batch's loss is its share of the loss of the whole step (docs/math.md §6):
    ``token_mean`` divides by the global token count and the ``seq_mean_*`` modes by the global number of
    sequences, whatever the split into ranks and micro-batches. Summing the micro-batches' gradients (gradient
    accumulation) and averaging over the ranks (DDP, FSDP) then gives the gradient of the single-process loss.

    Args:
        mask: this rank's [B, T] loss mask (bool or 0/1), or a sequence of the masks of its micro-batches.
        group: the data-parallel process group (None: the default group). Without an initialised
            torch.distributed the counts are this process's own (world size 1).
        average_gradients: the gradients are averaged over ``group`` (DDP and FSDP do), so the counts are
            divided by the group size, as TRL does with ``num_items_in_batch``; False when they are summed.
            ``token_sum`` (verl) has no count: set ``LossConfig.dp_size`` to the group size instead.

    Returns:
        :class:`GlobalCounts` (float64 0-d tensors); a count of 0 (no counted token anywhere) comes back as 1.

    Example:
        >>> masks = [torch.ones(2, 5, dtype=torch.bool), torch.ones(3, 4, dtype=torch.bool)]
        >>> global_counts(masks)
        GlobalCounts(num_items_in_batch=tensor(22., dtype=torch.float64), num_sequences_in_batch=tensor(5., dtype=torch.float64))
    """
    masks = [mask] if isinstance(mask, Tensor) else list(mask)
    if not masks:
        raise ValueError("mask must be a [B, T] tensor or a non-empty sequence of them, got an empty sequence")
    for i, m in enumerate(masks):
        name = "mask" if isinstance(mask, Tensor) else f"mask[{i}]"
        _checks.ndim(name, _checks.tensor(name, m), 2, "[B, T]")
        if m.is_complex():
            raise TypeError(f"{name} must be bool or a real 0/1 tensor, got dtype {m.dtype}")
    _checks.boolean("average_gradients", average_gradients)
    device = masks[0].device
    counts = torch.stack([
        sum((m != 0).sum(dtype=torch.float64).to(device) for m in masks),
        torch.tensor(float(sum(m.shape[0] for m in masks)), dtype=torch.float64, device=device),
    ])
    world = 1
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(counts, group=group)
        world = dist.get_world_size(group)
    counts = counts.clamp(min=1.0)
    if average_gradients:
        counts = counts / world
    return GlobalCounts(counts[0], counts[1])
