"""Shared-prefix attention inside Hugging Face transformers models (transformers ≥ 4.56).

:func:`enable_shared_prefix` registers an attention function with transformers' ``AttentionInterface`` and
switches the model to it; the packed layout then travels as a keyword argument of the model call::

    batch = rlloss.SharedPrefixBatch.pack(prompt_ids, completion_ids)
    enable_shared_prefix(model)
    hidden = model.model(**batch.model_inputs()).last_hidden_state   # input_ids, position_ids, shared_prefix

How the layout reaches the attention function: the causal-LM wrapper, the decoder, every decoder layer and
every attention module forward their ``**kwargs`` unchanged to the attention function, so
``model(..., shared_prefix=layout)`` arrives there as ``kwargs["shared_prefix"]`` (checked for Llama, Qwen2,
Qwen3 and Mistral on transformers 4.56.2, 5.17 and 5.23, with and without gradient checkpointing).

Masks: transformers builds an attention mask only for implementations registered with its
``AttentionMaskInterface``; for any other name ``_preprocess_mask_arguments`` returns ``None`` before its
packed-sequence detection (4.56 through 5.23). So no mask function is registered: the attention function
receives ``attention_mask=None`` and the layout is the whole mask. A mask that still arrives (a user's 4-D
mask) is an error rather than being ignored.
"""
from __future__ import annotations

import weakref
from typing import Any, Dict, Optional, Tuple

import torch
from torch import Tensor

from .._backend import BACKENDS
from ..prefix_attention import SharedPrefixLayout, shared_prefix_attention
from ..prefix_batch import SharedPrefixBatch

__all__ = ["enable_shared_prefix", "disable_shared_prefix", "attention_implementation_name",
           "MIN_TRANSFORMERS_VERSION"]

MIN_TRANSFORMERS_VERSION = "4.56"
# The model-call keyword that carries the layout.
LAYOUT_KWARG = "shared_prefix"
# Layer kinds whose mixing goes through the attention function (sliding layers are checked per call).
_ATTENTION_LAYER_TYPES = ("full_attention", "sliding_attention")
# Attention-function keywords that change the attention's math; shared-prefix attention has none of them.
_UNSUPPORTED_KWARGS = {
    "softcap": "attention logit soft-capping",
    "s_aux": "attention sinks",
    "sinks": "attention sinks",
    "position_bias": "an additive position bias",
    "head_mask": "a head mask",
}
# Attributes set on an enabled model.
_PREVIOUS = "_rlloss_previous_attn_implementation"
_HOOK = "_rlloss_shared_prefix_hook"


def attention_implementation_name(backend: Optional[str] = None) -> str:
    """The ``attn_implementation`` name under which the attention function for ``backend`` is registered."""
    return "rlloss_shared_prefix" if backend is None else f"rlloss_shared_prefix_{backend}"


def _transformers():
    try:
        import transformers
    except ImportError as exc:
        raise ImportError("rlloss.integrations.transformers needs the transformers package "
                          f"(>= {MIN_TRANSFORMERS_VERSION}): pip install 'transformers>={MIN_TRANSFORMERS_VERSION}'"
                          ) from exc
    from packaging.version import Version

    if Version(transformers.__version__).release[:2] < Version(MIN_TRANSFORMERS_VERSION).release[:2]:
        raise ImportError(f"shared-prefix attention needs transformers >= {MIN_TRANSFORMERS_VERSION} (its "
                          f"AttentionInterface and keyword forwarding), found {transformers.__version__}")
    return transformers


# --- per-layout facts, computed once per layout --------------------------------------------------------

_LAYOUT_FACTS: "weakref.WeakKeyDictionary[SharedPrefixLayout, Dict[str, Any]]" = weakref.WeakKeyDictionary()


def _longest_sequence(layout: SharedPrefixLayout) -> int:
    """Tokens of the longest root-to-segment sequence (a prompt plus its longest completion)."""
    facts = _LAYOUT_FACTS.setdefault(layout, {})
    if "longest" not in facts:
        facts["longest"] = max(sum(layout.lengths[a] for a in layout.ancestors(s)) + layout.lengths[s]
                               for s in range(layout.num_segments))
    return facts["longest"]


def _expected_positions(layout: SharedPrefixLayout, device: torch.device) -> Tensor:
    facts = _LAYOUT_FACTS.setdefault(layout, {})
    key = ("positions", str(device))
    if key not in facts:
        facts[key] = layout.position_ids().to(device)
    return facts[key]


# --- the attention function ----------------------------------------------------------------------------


def _layout_from(kwargs: Dict[str, Any]) -> SharedPrefixLayout:
    layout = kwargs.get(LAYOUT_KWARG)
    if layout is None:
        raise ValueError(
            f"the model runs rlloss shared-prefix attention but was called without `{LAYOUT_KWARG}=`: pass "
            f"model(input_ids=..., position_ids=..., {LAYOUT_KWARG}=layout) (e.g. "
            "model(**SharedPrefixBatch.pack(...).model_inputs())), or call "
            "rlloss.integrations.transformers.disable_shared_prefix(model) for ordinary batches and generation"
        )
    if isinstance(layout, SharedPrefixBatch):
        layout = layout.layout
    if not isinstance(layout, SharedPrefixLayout):
        raise TypeError(f"{LAYOUT_KWARG}= must be a rlloss.SharedPrefixLayout or SharedPrefixBatch, got "
                        f"{type(layout).__name__}")
    return layout


def _check_call(module: torch.nn.Module, query: Tensor, key: Tensor, attention_mask: Optional[Tensor],
                dropout: float, layout: SharedPrefixLayout, kwargs: Dict[str, Any]) -> None:
    where = type(module).__name__
    if query.ndim != 4 or query.shape[0] != 1:
        raise ValueError(f"shared-prefix attention takes one packed sequence (batch size 1), {where} got query "
                         f"of shape {tuple(query.shape)}; pack every group into one row with "
                         "rlloss.SharedPrefixBatch.pack")
    T = query.shape[2]
    if key.shape[2] != T:
        raise ValueError(f"{where} got {T} queries but {key.shape[2]} keys: a KV cache (generation) is not "
                         "supported with shared-prefix attention; call with use_cache=False, or "
                         "disable_shared_prefix(model) to generate")
    if T != layout.total_tokens:
        raise ValueError(f"the layout describes {layout.total_tokens} packed tokens but the model got {T}")
    if attention_mask is not None:
        raise ValueError(f"{where} received an attention mask; with shared-prefix attention the layout is the "
                         "whole mask: call the model without attention_mask")
    if dropout:
        raise ValueError(f"attention dropout ({dropout}) is not supported by shared-prefix attention; set "
                         "config.attention_dropout = 0 or call model.eval()")
    if kwargs.get("is_causal") is False or getattr(module, "is_causal", True) is False:
        raise ValueError(f"{where} is not causal; shared-prefix attention is causal attention only")
    for name, what in _UNSUPPORTED_KWARGS.items():
        if kwargs.get(name) is not None:
            raise ValueError(f"{where} uses {what} (`{name}`), which shared-prefix attention does not support")
    window = kwargs.get("sliding_window")
    if window is not None and _longest_sequence(layout) > window:
        raise ValueError(f"{where} uses a sliding window of {window} tokens but a packed sequence (prompt + "
                         f"completion) has {_longest_sequence(layout)}; shared-prefix attention has no "
                         "sliding-window mask, so it is exact only while every sequence fits in the window")
    positions = kwargs.get("position_ids")
    if getattr(module, "layer_idx", None) == 0 and isinstance(positions, Tensor):
        # Once per forward (first layer): a missing position_ids (the model then counts 0..T-1) would silently
        # shift every completion's rotary positions.
        expected = _expected_positions(layout, positions.device)
        if positions.numel() != expected.numel() or not torch.equal(positions.reshape(-1), expected):
            raise ValueError("position_ids do not match the layout: pass position_ids=layout.position_ids()[None] "
                             "(SharedPrefixBatch.model_inputs() does), where each completion restarts at its "
                             "prompt's length")


def _make_attention(backend: Optional[str]):
    def shared_prefix_attention_forward(
        module: torch.nn.Module,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        attention_mask: Optional[Tensor],
        scaling: Optional[float] = None,
        dropout: float = 0.0,
        **kwargs,
    ) -> Tuple[Tensor, None]:
        """transformers' attention-function contract: query [1, Hq, T, d], key/value [1, Hkv, T, d] →
        ([1, T, Hq, d], no attention weights)."""
        layout = _layout_from(kwargs)
        _check_call(module, query, key, attention_mask, dropout, layout, kwargs)
        q, k, v = (x[0].transpose(0, 1) for x in (query, key, value))  # [T, H, d] views
        out = shared_prefix_attention(q, k, v, layout, scale=scaling, backend=backend)
        return out.unsqueeze(0), None

    shared_prefix_attention_forward.__qualname__ = f"shared_prefix_attention_forward[{backend}]"
    return shared_prefix_attention_forward


_REGISTERED: Dict[Optional[str], str] = {}


def _register(backend: Optional[str]) -> str:
    if backend not in _REGISTERED:
        name = attention_implementation_name(backend)
        _transformers().AttentionInterface.register(name, _make_attention(backend))
        _REGISTERED[backend] = name
    return _REGISTERED[backend]


# --- enabling it on a model ----------------------------------------------------------------------------


def _unsupported_reason(model: torch.nn.Module) -> Optional[str]:
    """Why the model's structure rules shared-prefix attention out, or None."""
    config = model.config
    name = type(model).__name__
    if getattr(config, "is_encoder_decoder", False):
        return f"{name} is an encoder-decoder model; shared-prefix attention is for decoder-only models"
    sub_configs = [key for key in getattr(config, "sub_configs", {}) or {} if getattr(config, key, None) is not None]
    if sub_configs:
        return (f"{name} is a composite model (sub-configs {sub_configs}); enable shared-prefix attention on its "
                "decoder-only language model instead")
    layer_types = getattr(config, "layer_types", None) or ()
    others = sorted({t for t in layer_types if t not in _ATTENTION_LAYER_TYPES})
    if others:
        return (f"{name} has layers of type {others}, whose token mixing does not go through the attention "
                f"function; only {list(_ATTENTION_LAYER_TYPES)} layers are supported")
    if getattr(config, "attention_chunk_size", None) is not None:
        return f"{name} uses chunked attention (attention_chunk_size), which shared-prefix attention lacks"
    can_set = getattr(type(model), "_can_set_attn_implementation", None)
    if callable(can_set) and not can_set():
        return (f"{name}'s attention modules do not go through transformers' AttentionInterface (its modeling "
                "file never looks the attention function up in ALL_ATTENTION_FUNCTIONS), so they cannot run "
                "shared-prefix attention")
    return None


def _reject_attention_mask(module, args, kwargs):
    """Forward pre-hook: transformers drops a 2-D attention_mask for attention functions without a mask
    function, so a padding mask passed with a layout would be silently ignored."""
    if kwargs.get(LAYOUT_KWARG) is not None and kwargs.get("attention_mask") is not None:
        raise ValueError("pass no attention_mask with shared_prefix=: the layout is the whole mask (a packed "
                         "SharedPrefixBatch has no padding)")
    return None


def enable_shared_prefix(model: torch.nn.Module, *, backend: Optional[str] = None) -> torch.nn.Module:
    """Switch a transformers causal LM to rlloss shared-prefix attention.

    After this call every forward must pass the layout: ``model(input_ids=[1, T], position_ids=[1, T],
    shared_prefix=layout)`` (``SharedPrefixBatch.model_inputs()`` builds these), with batch size 1 and no
    attention_mask. Calling it again changes the backend; :func:`disable_shared_prefix` restores the
    implementation the model had before the first call.

    Args:
        model: a decoder-only transformers ``PreTrainedModel`` whose attention modules go through
            ``AttentionInterface`` (Llama, Qwen2, Qwen3, Mistral and most modern decoders).
        backend: backend of :func:`rlloss.shared_prefix_attention` ("triton", "interpret", "torch",
            "reference"); default from ``RLLOSS_BACKEND`` or the device at each call.

    Returns:
        The model, changed in place.

    Raises:
        ImportError: transformers is missing or older than 4.56.
        TypeError: ``model`` is not a transformers model.
        ValueError: an unknown backend, or a model shared-prefix attention cannot serve (the message names
            what is missing).
    """
    _transformers()
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"backend must be None or one of {BACKENDS}, got {backend!r}")
    if not isinstance(model, torch.nn.Module) or not hasattr(getattr(model, "config", None),
                                                             "_attn_implementation"):
        raise TypeError(f"model must be a transformers PreTrainedModel, got {type(model).__name__}")
    reason = _unsupported_reason(model)
    if reason is not None:
        raise ValueError(f"shared-prefix attention cannot be enabled: {reason}")

    name = _register(backend)
    previous = getattr(model, _PREVIOUS, None)
    if previous is None:
        previous = model.config._attn_implementation
    if model.config._attn_implementation != name:
        _set_implementation(model, name)
        if model.config._attn_implementation != name:
            raise ValueError(f"shared-prefix attention cannot be enabled: {type(model).__name__} refused "
                             f"attn_implementation={name!r} (its attention does not go through "
                             "transformers' AttentionInterface)")
    setattr(model, _PREVIOUS, previous)
    if not getattr(model, _HOOK, None):  # on the model and its inner models (model.model(...) is a common call)
        models = [m for m in model.modules() if isinstance(m, _transformers().PreTrainedModel)] or [model]
        setattr(model, _HOOK, [m.register_forward_pre_hook(_reject_attention_mask, with_kwargs=True)
                               for m in models])
    return model


def disable_shared_prefix(model: torch.nn.Module) -> torch.nn.Module:
    """Restore the attention implementation the model had before :func:`enable_shared_prefix` (a no-op on a
    model where it is not enabled). Returns the model."""
    previous = getattr(model, _PREVIOUS, None)
    if previous is None:
        return model
    _set_implementation(model, previous)
    for hook in getattr(model, _HOOK, None) or ():
        hook.remove()
    delattr(model, _PREVIOUS)
    setattr(model, _HOOK, None)
    return model


def _set_implementation(model: torch.nn.Module, name: str) -> None:
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(name)
    else:  # a bare module holding a config
        model.config._attn_implementation = name
