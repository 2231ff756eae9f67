"""Shared-prefix attention inside Hugging Face transformers models (transformers ≥ 4.56).

:func:`enable_shared_prefix` registers an attention function with transformers' ``AttentionInterface`` and
switches the model to it; the packed layout then travels as a keyword argument of the model call::

    batch = rlloss.SharedPrefixBatch.pack(prompt_ids, completion_ids)
    enable_shared_prefix(model)
    hidden = model.model(**batch.model_inputs()).last_hidden_state   # input_ids, position_ids, shared_prefix

Only calls that carry the layout run shared-prefix attention; any other call (``model.generate``, an ordinary
padded batch) runs the implementation the model had before, with its own masks. How the layout reaches the
attention function (transformers forwards the model call's ``**kwargs`` to it), the per-model switch and the
masks: docs/api/shared_prefix_batch.md, "rlloss.integrations.transformers".
"""
from __future__ import annotations

import contextlib
import contextvars
import sys
import weakref
from typing import Any, Dict, Iterator, NamedTuple, Optional, Tuple

import torch
from torch import Tensor

from .. import _checks
from .._backend import check_name
from ..prefix_attention import SharedPrefixLayout, shared_prefix_attention
from ..prefix_batch import SharedPrefixBatch

__all__ = ["enable_shared_prefix", "disable_shared_prefix", "shared_prefix", "shared_prefix_enabled",
           "packing_pays", "attention_implementation_name", "MIN_TRANSFORMERS_VERSION"]

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


def _fact(layout: SharedPrefixLayout, key: tuple, compute) -> Any:
    """``compute()``, once per layout (in the layout's own cache, which its copies on other devices share)."""
    if key not in layout._cache:
        layout._cache[key] = compute()
    return layout._cache[key]


# --- the attention function ----------------------------------------------------------------------------


def _layout_from(kwargs: Dict[str, Any]) -> Optional[SharedPrefixLayout]:
    layout = kwargs.get(LAYOUT_KWARG)
    if layout is None:
        return None
    if isinstance(layout, SharedPrefixBatch):
        layout = layout.layout
    return _checks.instance(f"{LAYOUT_KWARG}=", layout, SharedPrefixLayout,
                            "a rlloss.SharedPrefixLayout or SharedPrefixBatch")


def _check_call(module: torch.nn.Module, query: Tensor, key: Tensor, attention_mask: Optional[Tensor],
                dropout: float, layout: SharedPrefixLayout, kwargs: Dict[str, Any]) -> None:
    where = type(module).__name__
    if query.ndim != 4 or query.shape[0] != 1:
        raise ValueError(f"shared-prefix attention takes one packed sequence (batch size 1), {where} got query "
                         f"of shape {tuple(query.shape)}; pack every group into one row with "
                         "rlloss.SharedPrefixBatch.pack")
    T = query.shape[2]
    if key.shape[2] != T:
        raise ValueError(f"{where} got {T} queries but {key.shape[2]} keys: a KV cache is not supported with "
                         f"shared-prefix attention; call with use_cache=False (generation, without `{LAYOUT_KWARG}=`, "
                         "runs the model's own attention)")
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
    if window is not None:  # against the longest root-to-segment sequence (a prompt plus its longest completion)
        longest = _fact(layout, ("longest",), lambda: max(map(sum, zip(layout._context_lengths(), layout.lengths))))
        if longest > window:
            raise ValueError(f"{where} uses a sliding window of {window} tokens but a packed sequence (prompt + "
                             f"completion) has {longest}; shared-prefix attention has no sliding-window mask, so "
                             "it is exact only while every sequence fits in the window")
    positions = kwargs.get("position_ids")
    if getattr(module, "layer_idx", None) == 0 and isinstance(positions, Tensor):
        # Once per forward (first layer): a missing position_ids (the model then counts 0..T-1) would silently
        # shift every completion's rotary positions.
        expected = _fact(layout, ("positions", str(positions.device)),
                         lambda: layout.position_ids().to(positions.device))
        if positions.numel() != expected.numel() or not torch.equal(positions.reshape(-1), expected):
            raise ValueError("position_ids do not match the layout: pass position_ids=layout.position_ids()[None] "
                             "(SharedPrefixBatch.model_inputs() does), where each completion restarts at its "
                             "prompt's length")


def _attention(
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
    ([1, T, Hq, d], no attention weights). Registered under every rlloss name: the backend and options are the
    module's own (its model's `_Enabled` record), since two models sharing one config share its name."""
    layout = _layout_from(kwargs)
    enabled = getattr(module, _ENABLED, None)
    if layout is None:
        previous = enabled.previous if enabled is not None else _config_previous(module)
        return _original_attention(module, previous)(module, query, key, value, attention_mask,
                                                     scaling=scaling, dropout=dropout, **kwargs)
    if enabled is None:
        raise ValueError(
            f"{type(module).__name__} got `{LAYOUT_KWARG}=` but shared-prefix attention is not enabled on its "
            "model: its config names the rlloss attention because it is shared with a model where it is "
            "enabled. Call enable_shared_prefix(model) on this model too (the switch is per model)")
    _check_call(module, query, key, attention_mask, dropout, layout, kwargs)
    q, k, v = (x[0].transpose(0, 1) for x in (query, key, value))  # [T, H, d] views
    out = shared_prefix_attention(q, k, v, layout, scale=scaling, backend=enabled.backend,
                                  deterministic=enabled.deterministic)
    return out.unsqueeze(0), None


def _original_attention(module: torch.nn.Module, previous: str):
    """The attention function of implementation ``previous`` for ``module`` (its modeling file's eager one for
    "eager"), as the module's own forward would look it up."""
    functions = _transformers().AttentionInterface._global_mapping
    if previous in functions and previous != "eager":
        return functions[previous]
    eager = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
    if previous == "eager" and eager is not None:
        return eager
    raise ValueError(f"{type(module).__name__} was called without `{LAYOUT_KWARG}=`, so it should run its original "
                     f"attention implementation {previous!r}, which transformers does not know")


def _mask(*args, config=None, **kwargs):
    """Mask function registered under the rlloss names: no mask for a call that carries a layout (the layout is
    the whole mask; no [T, T] tensor is built), else the original implementation's mask."""
    calls = _LAYOUT_CALLS.get()
    if calls and calls[-1]:
        return None
    previous = _config_previous(None, config)
    original = _transformers().AttentionMaskInterface._global_mapping.get(previous)
    return None if original is None else original(*args, config=config, **kwargs)


_REGISTERED: Dict[Optional[str], str] = {}


def _register(backend: Optional[str]) -> str:
    if backend not in _REGISTERED:
        name = attention_implementation_name(backend)
        transformers = _transformers()
        transformers.AttentionInterface.register(name, _attention)
        transformers.AttentionMaskInterface.register(name, _mask)
        _REGISTERED[backend] = name
    return _REGISTERED[backend]


# --- per-model state ------------------------------------------------------------------------------------


class _Enabled(NamedTuple):
    """Set as ``_rlloss_shared_prefix`` on every submodule of an enabled model (so it survives deepcopy)."""

    backend: Optional[str]
    previous: str  # the implementation the config had before rlloss took it
    deterministic: bool = True


_ENABLED = "_rlloss_shared_prefix"
# Per model call being run by the hooks of an enabled model (innermost last): whether it carries a layout.
_LAYOUT_CALLS: "contextvars.ContextVar[Tuple[bool, ...]]" = contextvars.ContextVar("rlloss_layout_calls",
                                                                                   default=())


class _ConfigState(NamedTuple):
    """A config object that names the rlloss attention: what it named before, and the enabled models using it
    (two models may share one config object; the config is restored when the last of them is disabled)."""

    config: "weakref.ref"
    previous: str
    models: "weakref.WeakSet[torch.nn.Module]"


_CONFIGS: Dict[int, _ConfigState] = {}  # by id(config): configs are unhashable; entries die with their config


def _config_state(config, previous: Optional[str] = None) -> Optional[_ConfigState]:
    state = _CONFIGS.get(id(config))
    if state is not None and state.config() is not config:  # a dead config's id reused
        state = None
    if state is None and previous is not None:
        state = _CONFIGS[id(config)] = _ConfigState(weakref.ref(config), previous, weakref.WeakSet())
        weakref.finalize(config, _CONFIGS.pop, id(config), None)
    return state


def _config_previous(module: Optional[torch.nn.Module], config=None) -> str:
    config = module.config if config is None else config
    state = _config_state(config)
    if state is None:
        raise ValueError(f"the config of {type(module).__name__ if module is not None else 'this model'} names the "
                         "rlloss shared-prefix attention, but no model enabled it (a copied config?): call "
                         "enable_shared_prefix(model), or model.set_attn_implementation('sdpa')")
    return state.previous


# Whether packing a batch is worth it (measured rule): see SharedPrefixBatch.packing_pays.
packing_pays = SharedPrefixBatch.packing_pays


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


def _before_call(module, args, kwargs):
    """Forward pre-hook of an enabled model (and its inner models): records whether this call carries a layout
    (for the mask function), and catches two silent mistakes — a padding mask passed with a layout (transformers
    would drop it) and a packed stream passed without one (it would run as ordinary causal attention)."""
    record = getattr(module, _ENABLED, None)
    if record is not None:  # a deepcopy of an enabled model has its own config: register it on first use
        state = _config_state(module.config, record.previous)
        if shared_prefix_enabled(module):
            state.models.add(module)
    has_layout = kwargs.get(LAYOUT_KWARG) is not None
    _LAYOUT_CALLS.set(_LAYOUT_CALLS.get() + (has_layout,))  # popped by _after_call, which runs even on errors
    current = getattr(getattr(module, "config", None), "_attn_implementation", None)
    if has_layout and record is not None and current not in _REGISTERED.values():
        raise ValueError(f"{type(module).__name__} got `{LAYOUT_KWARG}=` but its attention implementation is now "
                         f"{current!r} (set after enable_shared_prefix), which would ignore the layout: call "
                         "enable_shared_prefix(model) again")
    if has_layout and kwargs.get("attention_mask") is not None:
        raise ValueError("pass no attention_mask with shared_prefix=: the layout is the whole mask (a packed "
                         "SharedPrefixBatch has no padding)")
    positions = kwargs.get("position_ids")
    if (not has_layout and kwargs.get("attention_mask") is None and isinstance(positions, Tensor)
            and positions.ndim == 2 and positions.shape[-1] > 1 and len(_LAYOUT_CALLS.get()) == 1
            and bool((positions[:, 1:] <= positions[:, :-1]).any())):
        raise ValueError(
            f"{type(module).__name__} has shared-prefix attention enabled and got position_ids that restart "
            f"(a packed stream) but no `{LAYOUT_KWARG}=`: pass model(input_ids=..., position_ids=..., "
            f"{LAYOUT_KWARG}=layout) (e.g. model(**batch.model_inputs())). Calls without a layout run the "
            "model's original attention (generation, ordinary batches), which would attend across completions")
    return None


def _after_call(module, args, output):
    calls = _LAYOUT_CALLS.get()
    if calls:
        _LAYOUT_CALLS.set(calls[:-1])
    return None


def _remove_hooks(model: torch.nn.Module, hooks) -> None:
    """Remove the hooks of :func:`enable_shared_prefix` by id (works on a deepcopy of the model too, whose
    handles would point at the original's hook dicts)."""
    for name, hook_ids in hooks:
        try:
            module = model.get_submodule(name)
        except AttributeError:
            continue
        for table in ("_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_forward_hooks",
                      "_forward_hooks_with_kwargs", "_forward_hooks_always_called"):
            for hook_id in hook_ids:
                getattr(module, table, {}).pop(hook_id, None)


def _mark(model: torch.nn.Module, record: Optional[_Enabled]) -> None:
    for module in model.modules():
        if record is None:
            module.__dict__.pop(_ENABLED, None)
        else:
            module.__dict__[_ENABLED] = record


def shared_prefix_enabled(model: torch.nn.Module) -> bool:
    """Whether :func:`enable_shared_prefix` is in effect on ``model`` (not on another model sharing its config)."""
    return getattr(model, _PREVIOUS, None) is not None


def enable_shared_prefix(model: torch.nn.Module, *, backend: Optional[str] = None,
                         deterministic: bool = True) -> torch.nn.Module:
    """Switch a transformers causal LM to rlloss shared-prefix attention.

    A forward that passes the layout — ``model(input_ids=[1, T], position_ids=[1, T], shared_prefix=layout)``
    (``SharedPrefixBatch.model_inputs()`` builds these), batch size 1, no attention_mask — runs shared-prefix
    attention; any other call (``model.generate``, an ordinary padded batch) runs the implementation the model
    had before, and a packed stream passed without its layout raises. Calling it again changes the options.
    The switch is per model, even for models sharing one config object (docs/api/shared_prefix_batch.md,
    "No juggling around generation" and "Per model").

    Args:
        model: a decoder-only transformers ``PreTrainedModel`` whose attention modules go through
            ``AttentionInterface`` (Llama, Qwen2, Qwen3, Mistral and most modern decoders).
        backend: backend of :func:`rlloss.shared_prefix_attention` ("triton", "torch", "reference");
            default from ``RLLOSS_BACKEND`` or the device at each call.
        deterministic: passed to :func:`rlloss.shared_prefix_attention`; False lets the kernel backends
            accumulate dQ with atomics inside the dK/dV pass (fewer FLOPs, not bitwise reproducible).

    Returns:
        The model, changed in place.

    Raises:
        ImportError: transformers is missing or older than 4.56.
        TypeError: ``model`` is not a transformers model.
        ValueError: an unknown backend, or a model shared-prefix attention cannot serve (the message names
            what is missing).
    """
    _transformers()
    check_name(backend)
    deterministic = _checks.boolean("deterministic", deterministic)
    if not isinstance(model, torch.nn.Module) or not hasattr(getattr(model, "config", None),
                                                             "_attn_implementation"):
        raise TypeError(f"model must be a transformers PreTrainedModel, got {type(model).__name__}")
    reason = _unsupported_reason(model)
    if reason is not None:
        raise ValueError(f"shared-prefix attention cannot be enabled: {reason}")

    name = _register(backend)
    config = model.config
    state = _config_state(config)
    if state is None:
        previous = getattr(model, _PREVIOUS, None) or config._attn_implementation  # a deepcopy keeps _PREVIOUS
        if previous in _REGISTERED.values():
            raise ValueError(f"{type(model).__name__}'s config already names {previous!r} but no model enabled "
                             "it (a copied config?): set model.set_attn_implementation('sdpa') first")
        state = _config_state(config, previous)
    if config._attn_implementation != name:
        _set_implementation(model, name)
        if config._attn_implementation != name:
            raise ValueError(f"shared-prefix attention cannot be enabled: {type(model).__name__} refused "
                             f"attn_implementation={name!r} (its attention does not go through "
                             "transformers' AttentionInterface)")
    state.models.add(model)
    setattr(model, _PREVIOUS, state.previous)
    _mark(model, _Enabled(backend, state.previous, deterministic))
    if not getattr(model, _HOOK, None):  # on the model and its inner models (model.model(...) is a common call)
        models = [(n, m) for n, m in model.named_modules() if isinstance(m, _transformers().PreTrainedModel)]
        hooks = []
        for n, m in models or [("", model)]:
            before = m.register_forward_pre_hook(_before_call, with_kwargs=True)
            after = m.register_forward_hook(_after_call, always_call=True)
            hooks.append((n, (before.id, after.id)))
        setattr(model, _HOOK, hooks)
    return model


def disable_shared_prefix(model: torch.nn.Module) -> torch.nn.Module:
    """Turn :func:`enable_shared_prefix` off on ``model`` (a no-op where it is not enabled) and restore the
    attention implementation its config had before — unless another enabled model shares the config, which
    then keeps the rlloss name (this model's calls run the original attention either way). Returns the model."""
    previous = getattr(model, _PREVIOUS, None)
    if previous is None:
        return model
    _remove_hooks(model, getattr(model, _HOOK, None) or ())
    _mark(model, None)
    delattr(model, _PREVIOUS)
    setattr(model, _HOOK, None)
    state = _config_state(model.config)
    if state is not None:
        state.models.discard(model)
    if state is None or not any(shared_prefix_enabled(m) for m in state.models):
        _set_implementation(model, previous)
        _CONFIGS.pop(id(model.config), None)
    return model


@contextlib.contextmanager
def shared_prefix(model: torch.nn.Module, *, backend: Optional[str] = None,
                  deterministic: bool = True) -> Iterator[torch.nn.Module]:
    """``with shared_prefix(model): ...`` — :func:`enable_shared_prefix` for the block, then the state before it
    (disabled again, or the options it had if it was already enabled)."""
    before = getattr(model, _ENABLED, None) if shared_prefix_enabled(model) else None
    enable_shared_prefix(model, backend=backend, deterministic=deterministic)
    try:
        yield model
    finally:
        if before is None:
            disable_shared_prefix(model)
        else:
            enable_shared_prefix(model, backend=before.backend, deterministic=before.deterministic)


def _set_implementation(model: torch.nn.Module, name: str) -> None:
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(name)
    else:  # a bare module holding a config
        model.config._attn_implementation = name
