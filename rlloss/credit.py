"""Contrastive-teacher token credit (docs/math.md §7): CEPO and RLSD.

The per-token formula (torch twin of ``rlloss.kernels.credit.credit_advantage``, also called by the torch
backend of the policy loss), the public op :func:`contrastive_credit` and the λ schedule :class:`LinearDecay`.
The teacher contexts whose log-probs give ℓ⁺ and ℓ⁻ are laid out by :mod:`rlloss.teacher`. The same credit is
available inside the policy loss (``LossConfig(credit=...)``), so the fused path forms Â in its own kernel,
with no [B, T] pass.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
from torch import Tensor

from . import _checks
from . import reference
from ._backend import accepted_dtypes, implementation, kernels, resolve_backend
from ._compat import renamed_keywords, warn_deprecated
from .kernels.tables import CREDIT_MODES

__all__ = ["LinearDecay", "contrastive_credit", "credit_advantage", "check_credit_params", "check_credit_mode"]


# --- the per-token formula --------------------------------------------------------------------------------


def credit_advantage(adv: Tensor, delta: Tensor, lam: float, eps_w: float) -> Tensor:
    """Â = A·((1 − λ) + λ·w), w = exp(clip(sign(A)·Δ, log(1 − ε_w), log(1 + ε_w))), elementwise.

    The torch twin of the kernels' ``credit_advantage``: A = 0 gives exactly 0 whatever Δ holds, and the clip
    happens before exp, so |Δ| = 1e4 (or inf) gives the bound, never inf or NaN.
    """
    log_w = (torch.sign(adv) * delta).clamp(math.log1p(-eps_w), math.log1p(eps_w))
    scaled = adv * ((1.0 - lam) + lam * torch.exp(log_w))
    return torch.where(adv != 0, scaled, torch.zeros((), dtype=scaled.dtype, device=scaled.device))


def check_credit_params(credit_lambda: object, credit_eps_w: object, where: str = "") -> Tuple[float, float]:
    """λ ∈ [0, 1] and ε_w ∈ [0, 1) as floats (so the multiplier stays in [1 − λε_w, 1 + λε_w] ⊂ (0, 2)): the one
    check of both, for :func:`contrastive_credit` and ``LossConfig`` (``where="LossConfig."`` prefixes the names)."""
    credit_lambda = _checks.number(f"{where}credit_lambda", credit_lambda, finite=True)
    credit_eps_w = _checks.number(f"{where}credit_eps_w", credit_eps_w, finite=True)
    if not 0.0 <= credit_lambda <= 1.0:
        raise ValueError(f"{where}credit_lambda must lie in [0, 1], got {credit_lambda}")
    if not 0.0 <= credit_eps_w < 1.0:
        raise ValueError(f"{where}credit_eps_w must lie in [0, 1), got {credit_eps_w}")
    return credit_lambda, credit_eps_w


def check_credit_mode(credit: object, where: str = "") -> str:
    """``credit`` one of CREDIT_MODES ("cepo", "rlsd"): for :func:`contrastive_credit`, the teacher builder and
    ``LossConfig`` (whose None, no credit, it checks itself)."""
    return _checks.choice(f"{where}credit", credit, CREDIT_MODES)


# --- contrastive_credit -----------------------------------------------------------------------------------


@renamed_keywords(lam="credit_lambda", eps_w="credit_eps_w", mode="credit")
def contrastive_credit(
    advantages: Tensor,
    mask: Tensor,
    pos_logprobs: Tensor,
    *,
    neg_logprobs: Optional[Tensor] = None,
    base_logprobs: Optional[Tensor] = None,
    credit: str = "cepo",
    credit_lambda: float = 0.5,
    credit_eps_w: float = 0.2,
    backend: Optional[str] = None,
) -> Tensor:
    """Per-token advantages Â [B, T] from sequence (or token) advantages and teacher log-probs (docs/math.md §7).

    ``Â_t = A·((1 − λ) + λ·clip(exp(sign(A)·Δ_t), 1 − ε_w, 1 + ε_w))·m_t`` with Δ = ℓ⁺ − ℓ⁻ (``credit="cepo"``)
    or Δ = ℓ⁺ − ℓ° (``credit="rlsd"``). The clip is applied to s·Δ in log space, so no Δ overflows. sign(Â) =
    sign(A), the multiplier lies in [1 − λε_w, 1 + λε_w], and Δ = 0 (or λ = 0) gives Â = A·m: plain GRPO.
    Nothing here is differentiable: Δ is a stop-gradient, and the result is an advantage.

    Args:
        advantages: [B] per sequence (e.g. :func:`rlloss.group_advantages`) or [B, T] per token (the sign is
            then taken per token).
        mask: [B, T] bool or 0/1: the completion tokens that count; Â is exactly 0 elsewhere, whatever the
            other inputs hold there.
        pos_logprobs: [B, T] ℓ⁺, log-probs of each rollout's own tokens under the model shown r⁺.
        neg_logprobs: [B, T] ℓ⁻, the same shown r⁻; required for "cepo", not allowed for "rlsd".
        base_logprobs: [B, T] ℓ°, the policy's (old) log-probs; required for "rlsd", not allowed for "cepo".
        credit: "cepo" or "rlsd", as ``LossConfig.credit``.
        credit_lambda: λ ∈ [0, 1], the weight of the credit (see :class:`LinearDecay` for the usual schedule).
        credit_eps_w: ε_w ∈ [0, 1), the clip of the token weight.
        backend: "triton", "torch" or "reference"; default from ``RLLOSS_BACKEND`` or the device.

    The keywords are ``LossConfig``'s names; the old ``lam=``, ``eps_w=`` and ``mode=`` work for one release, with
    a DeprecationWarning.

    Returns:
        [B, T] float32 (float64 when an input is float64 on the ``torch`` / ``reference`` backends), detached.

    Raises:
        TypeError: non-tensors, non-floating dtypes, λ / ε_w not numbers.
        ValueError: wrong shapes, an unknown credit mode, the log-probs a mode needs missing (or the other
            mode's given), λ ∉ [0, 1], ε_w ∉ [0, 1), a non-0/1 mask, tensors on different devices.
    """

    mode = check_credit_mode(credit)
    lam, eps_w = check_credit_params(credit_lambda, credit_eps_w)
    mask = _checks.tensor("mask", mask)
    _checks.ndim("mask", mask, 2, "[B, T]")
    shape = mask.shape
    mask = _checks.mask(mask, shape)
    advantages = _checks.advantages(advantages, shape)
    pos_logprobs = _checks.float_like("pos_logprobs", pos_logprobs, shape, "mask")
    if mode == "cepo":
        if neg_logprobs is None:
            raise ValueError("credit='cepo' needs neg_logprobs (ℓ⁻, the teacher shown a wrong answer), got None")
        if base_logprobs is not None:
            raise ValueError("base_logprobs is the denominator of credit='rlsd'; credit='cepo' uses neg_logprobs")
        base = _checks.float_like("neg_logprobs", neg_logprobs, shape, "mask")
    else:
        if base_logprobs is None:
            raise ValueError("credit='rlsd' needs base_logprobs (ℓ°, the policy's own log-probs), got None")
        if neg_logprobs is not None:
            raise ValueError("neg_logprobs is for credit='cepo'; credit='rlsd' contrasts with base_logprobs")
        base = _checks.float_like("base_logprobs", base_logprobs, shape, "mask")
    _checks.same_device(advantages=advantages, mask=mask, pos_logprobs=pos_logprobs, neg_logprobs=neg_logprobs,
                        base_logprobs=base_logprobs)
    name = resolve_backend(backend, mask.device)
    for arg, x in (("advantages", advantages), ("pos_logprobs", pos_logprobs),
                   ("neg_logprobs" if mode == "cepo" else "base_logprobs", base)):
        _checks.dtype_in(arg, x, accepted_dtypes(name))
    advantages, pos_logprobs, base = advantages.detach(), pos_logprobs.detach(), base.detach()
    wide = any(x.dtype == torch.float64 for x in (advantages, pos_logprobs, base))
    out_dtype = torch.float64 if wide else torch.float32
    impl = implementation(_IMPLEMENTATIONS, name)
    return impl(advantages, mask, pos_logprobs, base, lam, eps_w, mode, out_dtype)


# One signature for every backend: checked, detached inputs (``base`` is ℓ⁻ for "cepo", ℓ° for "rlsd"), the
# checked λ, ε_w and mode, and the result's dtype.


def _reference_credit(advantages, mask, pos_logprobs, base, lam, eps_w, mode, out_dtype):
    kwargs = {"neg_logprobs": base} if mode == "cepo" else {"base_logprobs": base}
    return reference.contrastive_credit(advantages, mask, pos_logprobs, lam=lam, eps_w=eps_w, mode=mode,
                                        **kwargs).to(out_dtype)


def _torch_credit(advantages, mask, pos_logprobs, base, lam, eps_w, mode, out_dtype):
    B, T = mask.shape
    zero = torch.zeros((), dtype=out_dtype, device=mask.device)

    def load(x):  # masked tokens read as 0, whatever they hold
        return torch.where(mask, x.to(out_dtype), zero)

    adv = load(advantages[:, None].expand(B, T) if advantages.ndim == 1 else advantages)
    return credit_advantage(adv, load(pos_logprobs) - load(base), lam, eps_w)


def _kernel_credit(advantages, mask, pos_logprobs, base, lam, eps_w, mode, out_dtype):
    return kernels("credit").credit_rows(advantages, mask, pos_logprobs, base, lam=lam, eps_w=eps_w)


_IMPLEMENTATIONS = dict(reference=_reference_credit, torch=_torch_credit, kernel=_kernel_credit)


# --- the λ schedule ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LinearDecay:
    """λ(step): ``start`` at step 0, decreasing linearly to 0 at ``steps``, then 0 — the schedule of the CEPO
    reference code (start 0.5 over 25 steps).

    The loss config holds a number; a trainer sets it each optimizer step::

        decay = rlloss.LinearDecay(0.5, 25)
        config = config.replace(credit_lambda=decay(step))   # or contrastive_credit(..., credit_lambda=decay(step))

    Args:
        start: λ at step 0, in [0, 1].
        steps: number of steps to reach 0 (an int ≥ 0; 0 means λ = 0 from the start).
    """

    start: float
    steps: int

    def __post_init__(self) -> None:
        if not (math.isfinite(_checks.number("LinearDecay.start", self.start)) and 0.0 <= self.start <= 1.0):
            raise ValueError(f"LinearDecay.start must lie in [0, 1], got {self.start}")
        _checks.integer("LinearDecay.steps", self.steps, minimum=0)

    def __call__(self, step: int) -> float:
        """λ at optimizer step ``step`` (an int ≥ 0): start·(1 − step/steps) before ``steps``, then 0."""
        _checks.integer("step", step, minimum=0)
        if step >= self.steps:
            return 0.0
        return float(self.start) * (1.0 - step / self.steps)


# The teacher-input builder moved to rlloss.teacher; the old import path works for one release, with a warning.
_MOVED_TO_TEACHER = ("TeacherInputs", "PackedTeacherInputs", "build_teacher_inputs")


def __getattr__(name: str):
    if name in _MOVED_TO_TEACHER:
        warn_deprecated(f"rlloss.credit.{name} moved to rlloss.teacher.{name}")
        from . import teacher

        return getattr(teacher, name)
    raise AttributeError(f"module 'rlloss.credit' has no attribute {name!r}")
