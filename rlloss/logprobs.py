"""Token log-probs and entropy (MATH.md §1): from hidden states and the lm_head weight without ever holding
[tokens × vocab] logits, or from logits a trainer already holds in one streaming pass.

Layout of this module: the per-token statistics and their exact merge (shared by every backend), the
chunked ``torch`` backend, the autograd functions, and the public API. The Triton kernels live in
``rlloss.kernels.logprobs``; the naive oracle in ``rlloss.reference``.
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Tuple

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from . import _checks
from ._backend import resolve_backend
from . import reference

__all__ = ["TokenLogprobs", "token_logprobs", "logprobs_from_logits", "merge_stats"]

# Elements of one [tokens, vocab] tile of the torch backend (float32: 16 MiB).
TORCH_TILE_ELEMENTS = 1 << 22
TORCH_VOCAB_CHUNK = 8192


class TokenLogprobs(NamedTuple):
    """Per-token results of :func:`token_logprobs` / :func:`logprobs_from_logits`.

    logprobs: log p(target) with the targets' shape, float32 (float64 for float64 inputs); 0 where ignored.
    entropy:  entropy of the token distribution, same shape and dtype, or None unless it was asked for.
    """

    logprobs: Tensor
    entropy: Optional[Tensor]


# --- statistics (MATH.md §1, online form shifted by the max) --------------------------------------------


def tile_stats(z: Tensor, local_targets: Tensor) -> Tensor:
    """Statistics [4, n] (M, A, C, z_y) of one logit tile z [n, v]; ``local_targets`` index into the tile,
    out-of-tile targets contribute z_y = 0. C is shifted by the max: C = Σ (z − M)·e^{z−M}."""
    m = z.amax(dim=1)
    shift = z - m[:, None]
    e = shift.exp()
    inside = (local_targets >= 0) & (local_targets < z.shape[1])
    zy = z.gather(1, local_targets.clamp(0, z.shape[1] - 1)[:, None]).squeeze(1)
    return torch.stack([m, e.sum(1), (shift * e).sum(1), torch.where(inside, zy, torch.zeros_like(zy))])


def merge_stats(stats: Tensor) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Merge partial statistics over vocabulary splits exactly.

    Args:
        stats: [4, S, N] planes (M, A, C, z_y) of S disjoint vocabulary splits (kernel programs, torch
            chunks or tensor-parallel ranks), C shifted by its own split's M.
    Returns:
        (lse, mean_logit, entropy, target_logit), each [N]: lse = M + log A, Σ p·z = M + C/A,
        H = log A − C/A (no cancellation between large terms), z_y.
    """
    m, a, c, zy = stats.unbind(0)
    top = m.amax(dim=0)
    scale = torch.exp(m - top)
    total = (a * scale).sum(0)
    shifted = (scale * (c + (m - top) * a)).sum(0)
    ratio = shifted / total
    log_total = total.log()
    return top + log_total, top + ratio, log_total - ratio, zy.sum(0)


def _finalize(stats: Tensor, live: Tensor):
    """(logprobs, entropy, lse, mean_logit) from merged statistics; not-live tokens give exactly 0."""
    lse, mean_logit, entropy, target_logit = merge_stats(stats)
    zero = torch.zeros((), dtype=lse.dtype, device=lse.device)
    logprobs = torch.where(live, target_logit - lse, zero)
    return logprobs, torch.where(live, entropy, zero), lse, mean_logit


# --- torch backend: the kernels' algorithm in chunked PyTorch ------------------------------------------


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _torch_logits(h: Tensor, w: Tensor, b: Optional[Tensor], inv_temperature: float, softcap: Optional[float]):
    """(z, tanh(x/c) or None) for a tile, in the compute dtype of h."""
    x = h @ w.to(h.dtype).T
    if b is not None:
        x = x + b.to(h.dtype)
    t = None
    if softcap is not None:
        t = torch.tanh(x / softcap)
        x = softcap * t
    return x * inv_temperature, t


def _torch_dlogits(z, t, local_targets, live, lse, mean_logit, g_logp, g_ent, inv_temperature):
    """dz through /T and the soft-cap for a tile (MATH.md §1), zero on rows that are not live.

    Consumes ``z`` and ``t`` (updated in place): at most two tiles are alive at once.
    """
    zero = torch.zeros((), dtype=z.dtype, device=z.device)
    # Per-row factors, zero on rows that are not live (their logits are finite: their hidden rows are zeros).
    row_scale = torch.where(live, torch.full_like(lse, inv_temperature), zero)[:, None]
    p = torch.sub(z, lse[:, None]).exp_()
    if g_ent is not None:  # −g_H·p·(z − Σp·z)
        dz = z.sub_(mean_logit[:, None]).mul_(p).mul_(torch.where(live, -g_ent, zero)[:, None])
        if g_logp is not None:
            dz.addcmul_(p, torch.where(live, g_logp, zero)[:, None], value=-1)
    else:
        dz = p.mul_(torch.where(live, -g_logp, zero)[:, None])
    if g_logp is not None:  # + g_ℓ·1[v = y]
        inside = (local_targets >= 0) & (local_targets < z.shape[1]) & live
        rows = inside.nonzero().squeeze(1)
        dz[rows, local_targets[rows]] += g_logp[rows].to(dz.dtype)
    dz.mul_(row_scale)
    if t is not None:
        dz.mul_(t.mul_(t).neg_().add_(1))
    return dz


def _row_chunk(width: int) -> int:
    return max(1, TORCH_TILE_ELEMENTS // width)


def _torch_live_rows(hidden: Tensor, live: Tensor, cd: torch.dtype) -> Tensor:
    return torch.where(live[:, None], hidden.to(cd), torch.zeros((), dtype=cd, device=hidden.device))


def _torch_linear_stats(hidden, weight, bias, targets, live, inv_temperature, softcap) -> Tensor:
    N, V = hidden.shape[0], weight.shape[0]
    cd = _compute_dtype(hidden.dtype)
    vchunk = min(V, TORCH_VOCAB_CHUNK)
    starts = range(0, V, vchunk)
    stats = torch.empty((4, len(starts), N), dtype=cd, device=hidden.device)
    step = _row_chunk(vchunk)
    for n0 in range(0, N, step):
        h = _torch_live_rows(hidden[n0 : n0 + step], live[n0 : n0 + step], cd)
        for k, v0 in enumerate(starts):
            b = bias[v0 : v0 + vchunk] if bias is not None else None
            z, _ = _torch_logits(h, weight[v0 : v0 + vchunk], b, inv_temperature, softcap)
            stats[:, k, n0 : n0 + step] = tile_stats(z, targets[n0 : n0 + step] - v0)
    return stats


def _torch_linear_backward(hidden, weight, bias, targets, live, lse, mean_logit, g_logp, g_ent,
                           inv_temperature, softcap, needs):
    N, V = hidden.shape[0], weight.shape[0]
    cd = _compute_dtype(hidden.dtype)
    dh = torch.zeros(hidden.shape, dtype=cd, device=hidden.device) if needs[0] else None
    dw = torch.zeros(weight.shape, dtype=cd, device=hidden.device) if needs[1] else None
    db = torch.zeros((V,), dtype=cd, device=hidden.device) if needs[2] else None
    vchunk = min(V, TORCH_VOCAB_CHUNK)
    step = _row_chunk(vchunk)
    for n0 in range(0, N, step):
        rows = slice(n0, n0 + step)
        h = _torch_live_rows(hidden[rows], live[rows], cd)
        gl = g_logp[rows] if g_logp is not None else None
        ge = g_ent[rows] if g_ent is not None else None
        for v0 in range(0, V, vchunk):
            cols = slice(v0, v0 + vchunk)
            w = weight[cols].to(cd)
            z, t = _torch_logits(h, w, bias[cols] if bias is not None else None, inv_temperature, softcap)
            dx = _torch_dlogits(z, t, targets[rows] - v0, live[rows], lse[rows], mean_logit[rows], gl, ge,
                                inv_temperature)
            if dh is not None:
                dh[rows] += dx @ w
            if dw is not None:
                dw[cols] += dx.T @ h
            if db is not None:
                db[cols] += dx.sum(0)
    return dh, dw, db


def _torch_logits_stats(logits, targets, live, inv_temperature) -> Tensor:
    N, V = logits.shape
    cd = _compute_dtype(logits.dtype)
    stats = torch.empty((4, 1, N), dtype=cd, device=logits.device)
    step = _row_chunk(V)
    for n0 in range(0, N, step):
        rows = slice(n0, n0 + step)
        z = _torch_live_rows(logits[rows], live[rows], cd) * inv_temperature
        stats[:, 0, rows] = tile_stats(z, targets[rows])
    return stats


def _torch_logits_backward(logits, targets, live, lse, mean_logit, g_logp, g_ent, inv_temperature, out):
    N, V = logits.shape
    cd = _compute_dtype(logits.dtype)
    step = _row_chunk(V)
    for n0 in range(0, N, step):
        rows = slice(n0, n0 + step)
        z = _torch_live_rows(logits[rows], live[rows], cd) * inv_temperature
        gl = g_logp[rows] if g_logp is not None else None
        ge = g_ent[rows] if g_ent is not None else None
        out[rows] = _torch_dlogits(z, None, targets[rows], live[rows], lse[rows], mean_logit[rows], gl, ge,
                                   inv_temperature)
    return out


# --- autograd -----------------------------------------------------------------------------------------


def _kernels():
    from .kernels import logprobs as kernels

    return kernels


class LinearSaved(NamedTuple):
    """What the backward of the hidden-state path needs: the inputs (no copies) and two floats per token."""

    hidden: Tensor
    weight: Tensor
    bias: Optional[Tensor]
    targets: Tensor
    lse: Tensor
    mean_logit: Tensor


def linear_forward(hidden, weight, bias, targets, *, temperature, softcap, ignore_index, backend):
    """(logprobs, entropy, saved) for hidden [N, D], weight [V, D], targets [N], outside autograd.

    Shared by the autograd function below and by fused losses that feed their own upstream gradients
    into :func:`linear_backward` (no second autograd graph).
    """
    live = targets != ignore_index
    if hidden.shape[0] == 0:
        stats = torch.zeros((4, 1, 0), dtype=_compute_dtype(hidden.dtype), device=hidden.device)
    elif backend == "torch":
        stats = _torch_linear_stats(hidden, weight, bias, targets, live, 1.0 / temperature, softcap)
    else:
        stats = _kernels().linear_stats(hidden, weight, bias, targets, ignore_index=ignore_index,
                                        temperature=temperature, softcap=softcap)
    logprobs, entropy, lse, mean_logit = _finalize(stats, live)
    return logprobs, entropy, LinearSaved(hidden, weight, bias, targets, lse, mean_logit)


def linear_backward(saved: LinearSaved, g_logp, g_ent, needs, *, temperature, softcap, ignore_index, backend):
    """(dhidden, dweight, dbias) in the inputs' dtypes for upstream gradients of the log-probs and the
    entropy (None = zero); ``needs`` says which of the three are wanted (the others come back None)."""
    hidden, weight, bias, targets, lse, mean_logit = saved
    needs = (needs[0], needs[1], bias is not None and needs[2])
    if (g_logp is None and g_ent is None) or hidden.shape[0] == 0:
        zeros = (torch.zeros_like(hidden), torch.zeros_like(weight),
                 torch.zeros_like(bias) if bias is not None else None)
        return tuple(z if n else None for z, n in zip(zeros, needs))
    g_logp = g_logp.contiguous() if g_logp is not None else None
    g_ent = g_ent.contiguous() if g_ent is not None else None
    if backend == "torch":
        dh, dw, db = _torch_linear_backward(hidden, weight, bias, targets, targets != ignore_index, lse,
                                            mean_logit, g_logp, g_ent, 1.0 / temperature, softcap, needs)
    else:
        dh, dw, db = _kernels().linear_backward(
            hidden, weight, bias, targets, lse, mean_logit, g_logp, g_ent, ignore_index=ignore_index,
            temperature=temperature, softcap=softcap, need_hidden=needs[0], need_weight=needs[1],
            need_bias=needs[2],
        )
    return (dh.to(hidden.dtype) if dh is not None else None,
            dw.to(weight.dtype) if dw is not None else None,
            db.to(bias.dtype) if db is not None else None)


class _LinearLogprobs(torch.autograd.Function):
    """(logprobs, entropy) [N] from hidden [N, D], weight [V, D], bias [V] | None, targets [N]."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, temperature, softcap, ignore_index, backend):
        options = dict(temperature=temperature, softcap=softcap, ignore_index=ignore_index, backend=backend)
        logprobs, entropy, saved = linear_forward(hidden, weight, bias, targets, **options)
        ctx.save_for_backward(*saved)
        ctx.options = options
        ctx.set_materialize_grads(False)
        return logprobs, entropy

    @staticmethod
    @once_differentiable
    def backward(ctx, g_logp, g_ent):
        saved = LinearSaved(*ctx.saved_tensors)
        grads = linear_backward(saved, g_logp, g_ent, ctx.needs_input_grad[:3], **ctx.options)
        return (*grads, None, None, None, None, None)


class _LogitsLogprobs(torch.autograd.Function):
    """(logprobs, entropy) [N] from logits [N, V] and targets [N]."""

    @staticmethod
    def forward(ctx, logits, targets, temperature, ignore_index, backend, inplace_backward):
        live = targets != ignore_index
        if logits.shape[0] == 0:
            stats = torch.zeros((4, 1, 0), dtype=_compute_dtype(logits.dtype), device=logits.device)
        elif backend == "torch":
            stats = _torch_logits_stats(logits, targets, live, 1.0 / temperature)
        else:
            stats = _kernels().logits_stats(logits, targets, ignore_index=ignore_index, temperature=temperature)
        logprobs, entropy, lse, mean_logit = _finalize(stats, live)
        ctx.save_for_backward(logits, targets, lse, mean_logit)
        ctx.config = (temperature, ignore_index, backend, inplace_backward)
        ctx.set_materialize_grads(False)
        return logprobs, entropy

    @staticmethod
    @once_differentiable
    def backward(ctx, g_logp, g_ent):
        logits, targets, lse, mean_logit = ctx.saved_tensors
        temperature, ignore_index, backend, inplace_backward = ctx.config
        out = logits if inplace_backward else torch.empty_like(logits)
        if g_logp is None and g_ent is None:
            return out.zero_(), None, None, None, None, None
        g_logp = g_logp.contiguous() if g_logp is not None else None
        g_ent = g_ent.contiguous() if g_ent is not None else None
        if logits.shape[0] == 0:
            return out, None, None, None, None, None
        if backend == "torch":
            _torch_logits_backward(logits, targets, targets != ignore_index, lse, mean_logit, g_logp, g_ent,
                                   1.0 / temperature, out)
        else:
            _kernels().logits_backward(logits, targets, lse, mean_logit, g_logp, g_ent,
                                       ignore_index=ignore_index, temperature=temperature, out=out)
        return out, None, None, None, None, None


# --- public API ---------------------------------------------------------------------------------------


def _output_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check_targets(targets: object, lead_shape: torch.Size, lead_name: str) -> Tensor:
    targets = _checks.tensor("targets", targets)
    if targets.dtype != torch.int64:
        raise TypeError(f"targets must be int64 token ids, got {str(targets.dtype).replace('torch.', '')}")
    if targets.shape != lead_shape:
        raise ValueError(
            f"targets must have {lead_name}'s leading shape {tuple(lead_shape)}, got {tuple(targets.shape)}"
        )
    return targets


def _check_float_dtype(name: str, x: Tensor, backend: str) -> None:
    allowed = _checks.KERNEL_DTYPES if backend in ("triton", "interpret") else _checks.FLOAT_DTYPES
    _checks.dtype_in(name, x, allowed)


def _needs_graph(*tensors: Optional[Tensor]) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _rows(x: Tensor, width: int) -> Tensor:
    """[..., width] → [n, width] with unit stride along width (copies only when it must)."""
    x = x.reshape(-1, width)
    return x if x.stride(1) == 1 or x.shape[0] == 0 else x.contiguous()


class LinearInputs(NamedTuple):
    """Checked inputs of the hidden-state path (see :func:`check_linear_inputs`)."""

    hidden: Tensor
    weight: Tensor
    targets: Tensor
    bias: Optional[Tensor]
    temperature: float
    softcap: Optional[float]
    ignore_index: int
    backend: str


def check_linear_inputs(hidden, weight, targets, bias, temperature, softcap, ignore_index, backend, *,
                        check_range: bool = True) -> LinearInputs:
    """Check the arguments of :func:`token_logprobs` (host side, before any launch) and resolve the backend.

    ``check_range=False`` skips the one check that syncs with the device (targets within [0, V)) for callers
    that have checked the targets themselves.
    """
    hidden = _checks.tensor("hidden", hidden)
    weight = _checks.tensor("weight", weight)
    if hidden.ndim < 1:
        raise ValueError("hidden must be [..., D], got a 0-D tensor")
    _checks.ndim("weight", weight, 2, "[V, D]")
    targets = _check_targets(targets, hidden.shape[:-1], "hidden")
    if bias is not None:
        bias = _checks.tensor("bias", bias)
        _checks.ndim("bias", bias, 1, "[V]")
    _checks.same_device(hidden=hidden, weight=weight, targets=targets, bias=bias)
    name = resolve_backend(backend, hidden.device)
    _check_float_dtype("hidden", hidden, name)
    if weight.dtype != hidden.dtype:
        raise TypeError(f"weight must have hidden's dtype {hidden.dtype}, got {weight.dtype}")
    V, D = weight.shape
    if V == 0:
        raise ValueError("weight must have at least one vocabulary row, got V = 0")
    if D == 0:
        raise ValueError("weight must have a hidden size D of at least 1, got D = 0")
    if hidden.shape[-1] != D:
        raise ValueError(f"hidden's last dim must equal weight's D = {D}, got hidden shape {tuple(hidden.shape)}")
    if bias is not None:
        _checks.dtype_in("bias", bias, _checks.FLOAT_DTYPES)
        if bias.shape[0] != V:
            raise ValueError(f"bias must be [V] with V = {V}, got shape {tuple(bias.shape)}")
    temperature = _checks.positive_finite("temperature", temperature)
    if softcap is not None:
        softcap = _checks.positive_finite("softcap", softcap)
    ignore_index = _checks.integer("ignore_index", ignore_index)
    if check_range:
        _checks.targets_in_range(targets, V, ignore_index)
    return LinearInputs(hidden, weight, targets, bias, temperature, softcap, ignore_index, name)


def token_logprobs(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    *,
    bias: Optional[Tensor] = None,
    temperature: float = 1.0,
    softcap: Optional[float] = None,
    return_entropy: bool = False,
    ignore_index: int = -100,
    backend: Optional[str] = None,
) -> TokenLogprobs:
    """Log-prob of each target token (and the entropy of each token's distribution) straight from the final
    hidden states and the lm_head weight, never materialising [tokens × vocab] logits.

    With z = cap(h·Wᵀ + b)/T, cap(x) = c·tanh(x/c) when ``softcap`` is c (MATH.md §1):
    ``logprobs = z_y − logsumexp(z)`` and ``entropy = logsumexp(z) − Σ_v softmax(z)_v·z_v``.

    Args:
        hidden: [..., D] float16, bfloat16 or float32 (float64 too on the ``torch``/``reference`` backends).
        weight: [V, D], same dtype as hidden.
        targets: [...] int64 with hidden's leading shape; values in [0, V) or ``ignore_index``.
        bias: optional [V] floating bias of the lm_head.
        temperature: T > 0 dividing the logits (after the soft-cap).
        softcap: c > 0 for Gemma-style logit soft-capping, or None.
        return_entropy: also return the entropy (otherwise ``entropy`` is None).
        ignore_index: target value whose tokens give 0 and receive exactly zero gradient, even when their
            hidden rows hold inf or NaN.
        backend: "triton", "interpret", "torch" or "reference"; default from ``RLLOSS_BACKEND`` or the
            device (``triton`` on CUDA, ``torch`` elsewhere). See docs/backends.md.

    Returns:
        :class:`TokenLogprobs` whose tensors have targets' shape, float32 (float64 for float64 inputs).
        Both are differentiable w.r.t. hidden, weight and bias for any upstream gradients. When no input
        requires a gradient (or under ``torch.no_grad()``) the call is forward-only: no autograd node is
        built and nothing is saved — the cheap path for teacher and old-policy log-probs.

    Raises:
        TypeError: non-tensor arguments, non-floating or mismatched dtypes, targets not int64.
        ValueError: wrong ranks or shapes, V = 0, targets out of range, tensors on different devices,
            temperature or softcap not finite and > 0, an unusable backend.

    Example:
        >>> h, W = torch.randn(2, 5, 16), torch.randn(100, 16)
        >>> y = torch.randint(0, 100, (2, 5))
        >>> out = token_logprobs(h, W, y, return_entropy=True)
        >>> out.logprobs.shape, out.entropy.shape
        (torch.Size([2, 5]), torch.Size([2, 5]))
    """
    hidden, weight, targets, bias, temperature, softcap, ignore_index, name = check_linear_inputs(
        hidden, weight, targets, bias, temperature, softcap, ignore_index, backend
    )
    D = weight.shape[1]
    if name == "reference":
        logprobs, entropy = reference.token_logprobs(hidden, weight, targets, bias=bias, temperature=temperature,
                                                     softcap=softcap, ignore_index=ignore_index)
        out_dtype = _output_dtype(hidden.dtype)
        logprobs, entropy = logprobs.to(out_dtype), entropy.to(out_dtype)
    else:
        w = weight if weight.stride(1) == 1 else weight.contiguous()
        b = bias.contiguous() if bias is not None else None  # the kernels index bias with unit stride
        args = (_rows(hidden, D), w, b, targets.reshape(-1))
        if _needs_graph(hidden, weight, bias):
            logprobs, entropy = _LinearLogprobs.apply(*args, temperature, softcap, ignore_index, name)
        else:  # forward only (e.g. teacher or old-policy passes): no autograd node, nothing kept alive
            logprobs, entropy, _ = linear_forward(*args, temperature=temperature, softcap=softcap,
                                                  ignore_index=ignore_index, backend=name)
        logprobs, entropy = logprobs.view(targets.shape), entropy.view(targets.shape)
    return TokenLogprobs(logprobs, entropy if return_entropy else None)


def logprobs_from_logits(
    logits: Tensor,
    targets: Tensor,
    *,
    temperature: float = 1.0,
    return_entropy: bool = False,
    ignore_index: int = -100,
    inplace_backward: bool = False,
    backend: Optional[str] = None,
) -> TokenLogprobs:
    """Log-prob of each target and the entropy from logits a trainer already holds, in one streaming pass
    (no float32 copy of the logits, no log-softmax tensor).

    ``logprobs = z_y − logsumexp(z)``, ``entropy = logsumexp(z) − Σ_v softmax(z)_v·z_v`` with z = logits/T
    (MATH.md §1).

    Args:
        logits: [..., V] float16, bfloat16 or float32 (float64 too on the ``torch``/``reference`` backends).
        targets: [...] int64 with logits' leading shape; values in [0, V) or ``ignore_index``.
        temperature: T > 0 dividing the logits.
        return_entropy: also return the entropy (otherwise ``entropy`` is None).
        ignore_index: target value whose rows give 0 and receive exactly zero gradient.
        inplace_backward: the backward writes d(loss)/d(logits) into the logits' own buffer instead of
            allocating another [..., V] tensor. The logits must then not be read after the backward (not by
            another loss either); ignored on the ``reference`` backend.
        backend: as for :func:`token_logprobs`.

    Returns:
        :class:`TokenLogprobs` with targets' shape, float32 (float64 for float64 logits).

    Example:
        >>> logits = torch.randn(3, 7, 50, requires_grad=True)
        >>> y = torch.randint(0, 50, (3, 7))
        >>> logprobs_from_logits(logits, y).logprobs.sum().backward()
    """
    logits = _checks.tensor("logits", logits)
    if logits.ndim < 1:
        raise ValueError("logits must be [..., V], got a 0-D tensor")
    targets = _check_targets(targets, logits.shape[:-1], "logits")
    _checks.same_device(logits=logits, targets=targets)
    name = resolve_backend(backend, logits.device)
    _check_float_dtype("logits", logits, name)
    V = logits.shape[-1]
    if V == 0:
        raise ValueError("logits must have a vocabulary dimension of at least 1, got V = 0")
    temperature = _checks.positive_finite("temperature", temperature)
    ignore_index = _checks.integer("ignore_index", ignore_index)
    _checks.targets_in_range(targets, V, ignore_index)

    if name == "reference":
        logprobs, entropy = reference.logprobs_from_logits(logits / temperature, targets, ignore_index=ignore_index)
        out_dtype = _output_dtype(logits.dtype)
        logprobs, entropy = logprobs.to(out_dtype), entropy.to(out_dtype)
    else:
        logprobs, entropy = _LogitsLogprobs.apply(
            _rows(logits, V), targets.reshape(-1), temperature, ignore_index, name, bool(inplace_backward)
        )
        logprobs, entropy = logprobs.view(targets.shape), entropy.view(targets.shape)
    return TokenLogprobs(logprobs, entropy if return_entropy else None)
