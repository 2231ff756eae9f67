"""Backend choice shared by every op (see docs/backends.md).

``triton``     the Triton kernels of ``rlloss.kernels``: compiled, on CUDA tensors; or run by Triton's interpreter,
               on CPU tensors, when the kernels module was built interpreted (``TRITON_INTERPRET=1`` set before
               rlloss is imported, ``rlloss.kernels.INTERPRETED``): slow, for tests on machines without a GPU.
``torch``      the same algorithm in chunked PyTorch: any device, the default off CUDA.
``reference``  the naive formulas of ``rlloss.reference``: the oracle, float64-capable.

``interpret`` is a deprecated alias of ``triton`` (whether the kernels are interpreted is a property of the
process, not of a call); it warns once and will be removed in the next release.

An explicit ``backend=`` argument wins over the ``RLLOSS_BACKEND`` environment variable, which wins over the
automatic choice from the inputs' device.

This is the one module that compares backend names: op modules give :func:`implementation` their table or ask
the predicates below.
"""
from __future__ import annotations

import importlib
import os
import warnings
from typing import Mapping, Optional, Tuple, TypeVar

import torch

from . import _checks

TRITON, TORCH, REFERENCE = "triton", "torch", "reference"
BACKENDS = (TRITON, TORCH, REFERENCE)
DEPRECATED_ALIASES = {"interpret": TRITON}  # old name -> its replacement, accepted for one release
ENV_VAR = "RLLOSS_BACKEND"

_warned_aliases: set = set()


def triton_import_error() -> Optional[str]:
    """Why the Triton kernels cannot be imported here, or None when they can."""
    try:
        from .kernels import logprobs  # noqa: F401  (rlloss.kernels itself loads no Triton)
    except ImportError as exc:  # no triton wheel for this platform
        return f"{type(exc).__name__}: {exc}"
    return None


def kernels_interpreted() -> bool:
    """True when the kernels were built under Triton's interpreter (TRITON_INTERPRET=1 at import)."""
    from . import kernels

    return kernels.INTERPRETED


def check_name(backend: Optional[str]) -> None:
    """Reject a ``backend=`` that names no backend (None, the automatic choice, and deprecated aliases pass)."""
    if backend is not None and backend not in BACKENDS and backend not in DEPRECATED_ALIASES:
        raise ValueError(f"backend={backend!r} is not a backend; expected one of {BACKENDS} or None")


def _replace_alias(name: str, source: str) -> str:
    new = DEPRECATED_ALIASES[name]
    if name not in _warned_aliases:
        _warned_aliases.add(name)
        warnings.warn(f"{source}{name!r} is deprecated and will be removed in the next release; use {source}{new!r} "
                      f"(the Triton kernels run interpreted on CPU tensors whenever TRITON_INTERPRET=1 was set "
                      f"before rlloss was imported)", DeprecationWarning, stacklevel=3)
    return new


def resolve_backend(backend: Optional[str], device: torch.device) -> str:
    """Pick the backend for inputs on ``device`` and check that it can run there: one of :data:`BACKENDS`.

    Raises:
        ValueError: unknown backend name, or a backend that cannot run on ``device``.
        RuntimeError: the Triton kernels cannot be used in this process.
    """
    name = backend if backend is not None else os.environ.get(ENV_VAR) or None
    source = "backend=" if backend is not None else f"{ENV_VAR}="
    if name is None:
        return TRITON if device.type == "cuda" and triton_import_error() is None else TORCH
    if name in DEPRECATED_ALIASES:
        name = _replace_alias(name, source)
    if name not in BACKENDS:
        raise ValueError(f"{source}{name!r} is not a backend; expected one of {BACKENDS}")
    if name == TRITON:
        err = triton_import_error()
        if err is not None:
            raise RuntimeError(f"{source}{name!r} needs Triton, which failed to import ({err})")
        interpreted = kernels_interpreted()
        if device.type == "cuda" and interpreted:
            raise RuntimeError(
                f"{source}'triton' cannot run CUDA tensors here: TRITON_INTERPRET=1 was set when rlloss was "
                "imported, so the kernels were built for Triton's interpreter, which runs CPU tensors")
        if device.type == "cpu" and not interpreted:
            raise ValueError(
                f"{source}'triton' needs CUDA tensors, got tensors on cpu (the kernels run CPU tensors only "
                "under Triton's interpreter: TRITON_INTERPRET=1 set before rlloss is imported)")
        if device.type not in ("cuda", "cpu"):
            raise ValueError(f"{source}'triton' needs CUDA tensors (or CPU tensors under Triton's interpreter), "
                             f"got tensors on {device}")
    return name


def accepted_dtypes(name: str) -> Tuple[torch.dtype, ...]:
    """The floating dtypes backend ``name`` computes in: the kernels have no float64."""
    return _checks.KERNEL_DTYPES if uses_kernels(name) else _checks.FLOAT_DTYPES


# --- the one place backend names are compared -------------------------------------------------------------

T = TypeVar("T")
IMPL_KEYS = (REFERENCE, TORCH, "kernel")


def uses_kernels(name: str) -> bool:
    """True for the backend that runs the Triton kernels (compiled or interpreted)."""
    return name == TRITON


def is_reference(name: str) -> bool:
    return name == REFERENCE


def is_torch(name: str) -> bool:
    return name == TORCH


def implementation(table: Mapping[str, T], name: str) -> T:
    """The entry of an op's implementation table for backend ``name``.

    ``table`` maps "reference", "torch" and "kernel" (the ``triton`` backend, compiled or interpreted) to one
    callable each, all with the op's one signature; an op without a kernel leaves "kernel" out and the ``triton``
    backend runs its "torch" entry.
    """
    unknown = set(table) - set(IMPL_KEYS)
    if unknown:
        raise KeyError(f"implementation table keys must be among {IMPL_KEYS}, got {sorted(unknown)}")
    key = "kernel" if uses_kernels(name) else name
    if key == "kernel" and key not in table:
        key = TORCH
    return table[key]


def kernels(op: str):
    """The Triton device code of one op, ``rlloss.kernels.<op>`` (imported on first use)."""
    return importlib.import_module(f"{__package__}.kernels.{op}")
