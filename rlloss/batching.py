"""From a trainer's padded batch (TRL's left-padded prompts next to right-padded completions) to the inputs of
the fused loss: :class:`PaddedBatch` slices the hidden states that predict completion tokens, positions
P − 1 … P + C − 2, so the lm_head never sees a prompt position (docs/examples.md, "rlloss.PaddedBatch").
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict

import torch
from torch import Tensor

from . import _checks

__all__ = ["PaddedBatch"]


def _ids(name: str, x: object) -> Tensor:
    x = _checks.tensor(name, x)
    _checks.ndim(name, x, 2, "[B, length]")
    if x.dtype != torch.int64:
        raise TypeError(f"{name} must be int64 token ids, got dtype {_checks.dtype_name(x.dtype)}")
    return x


def _mask(name: str, x: object, ids_name: str, ids: Tensor) -> Tensor:
    x = _checks.tensor(name, x)
    _checks.same_shape(name, x, ids.shape, f"{ids_name}'s")
    if x.dtype == torch.bool:
        return x
    if x.is_floating_point() or x.is_complex():
        raise TypeError(f"{name} must be bool or an integer 0/1 tensor, got dtype {_checks.dtype_name(x.dtype)}")
    if bool(((x != 0) & (x != 1)).any()):  # one host sync
        raise ValueError(f"{name} must hold only 0 and 1, got values {sorted(set(x.unique().tolist()))[:6]}")
    return x.bool()


@dataclass(frozen=True)
class PaddedBatch:
    """A padded ``[prompt | completion]`` batch, TRL's layout, and the gathers the fused loss needs.

    Build with :meth:`from_trl`. Fields (all on the inputs' device; P, C the padded prompt and completion
    lengths):

    - ``input_ids``: ``[B, P + C]`` int64, ``cat(prompt_ids, completion_ids)``.
    - ``attention_mask``: ``[B, P + C]`` int64, ``cat(prompt_mask, completion_mask)`` as TRL passes it.
    - ``position_ids``: ``[B, P + C]`` int64, ``cumsum(attention_mask) − 1`` clamped at 0: the positions
      ``model.generate`` gave the tokens while sampling, so the training forward matches the sampler's exactly
      (TRL's default ``0 … P + C − 1`` gives rotary models the same attention only up to rounding).
    - ``targets``: ``[B, C]`` int64, the completion ids with ``-100`` where ``completion_mask`` is 0.
    - ``mask``: ``[B, C]`` bool, ``completion_mask``.
    - ``prompt_length``: P.
    """

    input_ids: Tensor
    attention_mask: Tensor
    position_ids: Tensor
    targets: Tensor
    mask: Tensor
    prompt_length: int

    @classmethod
    def from_trl(cls, prompt_ids: Tensor, prompt_mask: Tensor, completion_ids: Tensor,
                 completion_mask: Tensor) -> "PaddedBatch":
        """Build the batch from TRL's four tensors.

        Args:
            prompt_ids: ``[B, P]`` int64, left-padded (real tokens at the right end of each row), P ≥ 1.
            prompt_mask: ``[B, P]`` bool or 0/1 integers; the last column must be all 1 (left padding, every
                prompt at least one token), since position P − 1 predicts the first completion token.
            completion_ids: ``[B, C]`` int64, C ≥ 1; any value where ``completion_mask`` is 0 (pad ids).
            completion_mask: ``[B, C]`` bool or 0/1 integers: the completion tokens that count (right padding
                after EOS; holes, e.g. masked tool output, are fine).

        Raises:
            TypeError: an argument is not a tensor, ids not int64, a mask floating.
            ValueError: not 2-D, mismatched batch sizes or mask shapes, a mask value other than 0/1, P or C = 0,
                a prompt whose last column is padding (right-padded or empty prompt), tensors on different
                devices.
        """
        prompt_ids = _ids("prompt_ids", prompt_ids)
        completion_ids = _ids("completion_ids", completion_ids)
        _checks.same_device(prompt_ids=prompt_ids, prompt_mask=_checks.tensor("prompt_mask", prompt_mask),
                            completion_ids=completion_ids,
                            completion_mask=_checks.tensor("completion_mask", completion_mask))
        if prompt_ids.shape[0] != completion_ids.shape[0]:
            raise ValueError(f"prompt_ids and completion_ids must have the same batch size B, got "
                             f"{prompt_ids.shape[0]} and {completion_ids.shape[0]}")
        if prompt_ids.shape[1] == 0:
            raise ValueError("prompt_ids has no columns (P = 0); each prompt needs at least one token")
        if completion_ids.shape[1] == 0:
            raise ValueError("completion_ids has no columns (C = 0); nothing to score")
        prompt_mask = _mask("prompt_mask", prompt_mask, "prompt_ids", prompt_ids)
        completion_mask = _mask("completion_mask", completion_mask, "completion_ids", completion_ids)
        if prompt_ids.shape[0] and not bool(prompt_mask[:, -1].all()):  # one host sync
            rows = (~prompt_mask[:, -1]).nonzero().flatten().tolist()
            raise ValueError(f"prompt_mask[:, -1] must be all 1 (left-padded prompts of at least one token, as "
                             f"TRL pads them); rows {rows[:8]} end in padding")
        attention_mask = torch.cat([prompt_mask, completion_mask], dim=1).long()
        position_ids = (attention_mask.cumsum(1) - 1).clamp(min=0)
        targets = completion_ids.masked_fill(~completion_mask, _checks.IGNORE_INDEX)
        return cls(input_ids=torch.cat([prompt_ids, completion_ids], dim=1), attention_mask=attention_mask,
                   position_ids=position_ids, targets=targets, mask=completion_mask,
                   prompt_length=prompt_ids.shape[1])

    @property
    def completion_length(self) -> int:
        """C, the padded completion length."""
        return self.targets.shape[1]

    def model_inputs(self) -> Dict[str, Tensor]:
        """``{"input_ids", "attention_mask", "position_ids"}``: ``model(**batch.model_inputs())``."""
        return {"input_ids": self.input_ids, "attention_mask": self.attention_mask, "position_ids": self.position_ids}

    def gather_hidden(self, hidden: Tensor) -> Tensor:
        """The hidden states that predict the completion tokens.

        Args:
            hidden: ``[B, P + C, ...]`` per-position outputs of the model on :meth:`model_inputs` (the last
                hidden states ``[B, P + C, D]``, any floating dtype; or anything else laid out per position).

        Returns:
            ``[B, C, ...]``, positions P − 1 … P + C − 2: row j predicts completion token j. A view (a slice),
            differentiable. Feed it with ``targets`` and ``mask`` to :class:`rlloss.FusedPolicyLoss` or
            :func:`rlloss.token_logprobs`.

        Raises:
            TypeError: hidden is not a tensor. ValueError: hidden is not ``[B, P + C, ...]`` or on another device.
        """
        hidden = _checks.tensor("hidden", hidden)
        B, T = self.input_ids.shape
        _checks.leading("hidden", hidden, (B, T), "[B, P + C, ...]")
        if hidden.device != self.input_ids.device:
            raise ValueError(f"hidden is on {hidden.device}, the batch on {self.input_ids.device}")
        P = self.prompt_length
        return hidden[:, P - 1: T - 1]
