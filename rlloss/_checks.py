"""Host-side input checks shared by every op: each error names the argument, what was expected and what
was given, and is raised before anything is launched."""
from __future__ import annotations

import math
from typing import Iterable, Optional, Sequence

import torch
from torch import Tensor

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# Target id of padding (PyTorch's cross-entropy default), in PaddedBatch's and SharedPrefixBatch's targets.
IGNORE_INDEX = -100


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype statistics, losses and accumulators use for inputs of ``dtype``: float64 or float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _names(dtypes: Iterable[torch.dtype]) -> str:
    return ", ".join(dtype_name(d) for d in dtypes)


def instance(name: str, value: object, cls: type, what: str):
    if not isinstance(value, cls):
        raise TypeError(f"{name} must be {what}, got {type(value).__name__}")
    return value


def tensor(name: str, x: object) -> Tensor:
    return instance(name, x, Tensor, "a torch.Tensor")


def dtype_in(name: str, x: Tensor, allowed: Sequence[torch.dtype]) -> None:
    if x.dtype not in allowed:
        raise TypeError(f"{name} must have dtype in ({_names(allowed)}), got {dtype_name(x.dtype)}")


def floating(name: str, x: object) -> Tensor:
    """``x`` checked to be a tensor of a floating dtype."""
    x = tensor(name, x)
    dtype_in(name, x, FLOAT_DTYPES)
    return x


def ndim(name: str, x: Tensor, expected: int, shape_doc: str) -> None:
    if x.ndim != expected:
        raise ValueError(f"{name} must be {expected}-D {shape_doc}, got shape {tuple(x.shape)}")


def shape(name: str, x: Tensor, expected: Sequence[int], shape_doc: str, note: str = "") -> None:
    """``x`` exactly of shape ``expected``, documented as ``shape_doc`` (e.g. "[B, T]") in the error."""
    if tuple(x.shape) != tuple(expected):
        raise ValueError(f"{name} must be {shape_doc} = {tuple(expected)}{note}, got {tuple(x.shape)}")


def leading(name: str, x: Tensor, lead: Sequence[int], shape_doc: str) -> None:
    """``x`` of shape ``[*lead, ...]``, documented as ``shape_doc`` (e.g. "[B, T, ...]") in the error."""
    if tuple(x.shape[:len(lead)]) != tuple(lead):
        raise ValueError(f"{name} must be {shape_doc} = [{', '.join(map(str, lead))}, ...], got shape "
                         f"{tuple(x.shape)}")


def same_shape(name: str, x: Tensor, shape: torch.Size, like: str, shape_doc: str = "") -> None:
    """``x`` exactly of ``shape``, the shape of the argument ``like`` names in the possessive ("rewards'")."""
    if x.shape != shape:
        doc = f" ({shape_doc})" if shape_doc else ""
        raise ValueError(f"{name} must have {like} shape {tuple(shape)}{doc}, got {tuple(x.shape)}")


def same_device(**tensors: Optional[Tensor]) -> None:
    present = {k: v for k, v in tensors.items() if v is not None}
    devices = {v.device for v in present.values()}
    if len(devices) > 1:
        where = ", ".join(f"{k} on {v.device}" for k, v in present.items())
        raise ValueError(f"all tensors must be on one device, got {where}")


def is_number(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def is_list(x: object) -> bool:
    """A list, tuple or other sequence; not a str, bytes or tensor."""
    return isinstance(x, Sequence) and not isinstance(x, (str, bytes, Tensor))


def number(name: str, value: object, kind: str = "a number", finite: bool = False) -> float:
    """``value``, an int or a float (never a bool), as a float; with ``finite``, checked finite too."""
    if not is_number(value):
        raise TypeError(f"{name} must be {kind}, got {type(value).__name__}")
    if finite and not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return float(value)


def positive_finite(name: str, value: float, kind: str = "a float") -> float:
    value = number(name, value, kind)
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value}")
    return value


def device(value: object) -> torch.device:
    """``value`` as a torch.device: a torch.device or a device string such as 'cuda:0'."""
    try:
        return torch.device(value)
    except (TypeError, RuntimeError):
        error = ValueError if isinstance(value, str) else TypeError
        raise error(f"device must be a torch.device or a device string such as 'cuda:0', got {value!r}") from None


def integer(name: str, value: object, minimum: Optional[int] = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def integer_dtype(name: str, x: Tensor) -> None:
    if x.dtype == torch.bool or x.dtype.is_floating_point or x.is_complex():
        raise TypeError(f"{name} must hold integers, got dtype {dtype_name(x.dtype)}")


def targets_in_range(targets: Tensor, vocab_size: int, ignore_index: Optional[int]) -> None:
    """Every target in [0, V) or equal to ignore_index (None: no exception) — one host sync."""
    bad = (targets < 0) | (targets >= vocab_size)
    if ignore_index is not None:
        bad &= targets != ignore_index
    if targets.numel() and bool(bad.any()):
        first = targets[bad][0].item()
        allowed = f" or equal ignore_index={ignore_index}" if ignore_index is not None else " where they count"
        raise ValueError(f"targets must lie in [0, {vocab_size}){allowed}; {int(bad.sum())} do not, e.g. {first}")


def token_ids(name: str, x: Tensor) -> None:
    """Every id of ``x`` (1-D) >= 0: they index an embedding; -100 and the like are padding. One host sync."""
    negative = x < 0
    if bool(negative.any()):
        position = int(negative.nonzero()[0, 0])
        raise ValueError(f"{name} must hold token ids >= 0 (no padding or ignore_index values), got "
                         f"{int(x[position])} at position {position}")


def advantages(x: object, shape: torch.Size) -> Tensor:
    """The advantages: a floating tensor, [B] (one per sequence) or [B, T] = ``shape``."""
    x = floating("advantages", x)
    if x.shape != shape[:1] and x.shape != shape:
        raise ValueError(f"advantages must be [B] = ({shape[0]},) or [B, T] = {tuple(shape)}, got {tuple(x.shape)}")
    return x


def float_like(name: str, x: object, shape: torch.Size, like: str) -> Tensor:
    """A floating tensor of exactly ``shape`` (the shape of the argument named ``like``)."""
    x = floating(name, x)
    same_shape(name, x, shape, f"{like}'s", "[B, T]")
    return x


def choice(name: str, value: object, allowed: Sequence) -> object:
    """``value``, one of ``allowed`` (strings, and None where allowed names it)."""
    if not isinstance(value, (str, type(None))) or value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
    return value


def boolean(name: str, value: object) -> bool:
    return instance(name, value, bool, "a bool")


def mask(x: object, shape: torch.Size, check_values: bool = True) -> Tensor:
    """The [B, T] loss mask as bool: bool, or a real tensor of 0/1 (checked with one host read when
    ``check_values``), of exactly ``shape`` (the log-probs' shape)."""
    x = tensor("mask", x)
    same_shape("mask", x, shape, "logprobs'", "[B, T]")
    if x.dtype == torch.bool:
        return x
    if x.is_complex():
        raise TypeError(f"mask must be bool or a real 0/1 tensor, got dtype {x.dtype}")
    if not check_values:
        return x != 0
    bad = (x != 0) & (x != 1)
    if x.numel() and bool(bad.any()):  # one host sync
        raise ValueError(f"mask must hold only 0 and 1 (or be bool), got e.g. {x[bad][0].item()}")
    return x != 0
