"""Backend choice shared by every op (see docs/backends.md).

``triton``     the compiled kernels, CUDA tensors only.
``interpret``  the same kernels under Triton's interpreter (CPU tensors, ``TRITON_INTERPRET=1`` set before
               rlloss is imported): slow, for tests on machines without a GPU.
``torch``      the same algorithm in chunked PyTorch: any device, the default off CUDA.
``reference``  the naive formulas of ``rlloss.reference``: the oracle, float64-capable.

An explicit ``backend=`` argument wins over the ``RLLOSS_BACKEND`` environment variable, which wins over the
automatic choice from the inputs' device.
"""
from __future__ import annotations

import importlib
import os
from typing import Mapping, Optional, Tuple, TypeVar

import torch

BACKENDS = ("triton", "interpret", "torch", "reference")
KERNEL_BACKENDS = ("triton", "interpret")  # the ones that run the Triton kernels
ENV_VAR = "RLLOSS_BACKEND"


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


def resolve_backend(backend: Optional[str], device: torch.device) -> str:
    """Pick the backend for inputs on ``device`` and check that it can run there.

    Raises:
        ValueError: unknown backend name, or a backend that cannot run on ``device``.
        RuntimeError: the Triton kernels cannot be used in this process.
    """
    name = backend if backend is not None else os.environ.get(ENV_VAR) or None
    source = "backend=" if backend is not None else f"{ENV_VAR}="
    if name is None:
        return "triton" if device.type == "cuda" and triton_import_error() is None else "torch"
    if name not in BACKENDS:
        raise ValueError(f"{source}{name!r} is not a backend; expected one of {BACKENDS}")
    if name in ("triton", "interpret"):
        err = triton_import_error()
        if err is not None:
            raise RuntimeError(f"{source}{name!r} needs Triton, which failed to import ({err})")
        interpreted = kernels_interpreted()
        if name == "triton":
            if device.type != "cuda":
                raise ValueError(f"{source}'triton' needs CUDA tensors, got tensors on {device}")
            if interpreted:
                raise RuntimeError(
                    f"{source}'triton' cannot run: TRITON_INTERPRET=1 was set when rlloss was imported, "
                    "so the kernels were built for the interpreter"
                )
        else:
            if device.type != "cpu":
                raise ValueError(f"{source}'interpret' runs on CPU tensors, got tensors on {device}")
            if not interpreted:
                raise RuntimeError(
                    f"{source}'interpret' needs TRITON_INTERPRET=1 in the environment before rlloss is "
                    "imported (Triton decides at import whether its kernels are interpreted)"
                )
    return name


def accepted_dtypes(name: str) -> Tuple[torch.dtype, ...]:
    """The floating dtypes backend ``name`` computes in: the kernel backends have no float64."""
    from . import _checks

    return _checks.KERNEL_DTYPES if name in KERNEL_BACKENDS else _checks.FLOAT_DTYPES


# --- the one place backend names are compared -------------------------------------------------------------
# Op modules never compare backend names themselves: they ask the predicates below, or give ``implementation``
# their table {"reference": ..., "torch": ..., "kernel": ...} and call what it returns.

T = TypeVar("T")
IMPL_KEYS = ("reference", "torch", "kernel")


def uses_kernels(name: str) -> bool:
    """True for the backends that run the Triton kernels (compiled or interpreted)."""
    return name in KERNEL_BACKENDS


def is_reference(name: str) -> bool:
    """True for the float64-capable naive oracle of ``rlloss.reference``."""
    return name == "reference"


def is_torch(name: str) -> bool:
    """True for the chunked PyTorch backend."""
    return name == "torch"


def implementation(table: Mapping[str, T], name: str) -> T:
    """The entry of an op's implementation table for backend ``name``.

    ``table`` maps "reference", "torch" and "kernel" (both kernel backends) to one callable each, all with the
    op's one signature; an op without a kernel leaves "kernel" out and its kernel backends run "torch".
    """
    unknown = set(table) - set(IMPL_KEYS)
    if unknown:
        raise KeyError(f"implementation table keys must be among {IMPL_KEYS}, got {sorted(unknown)}")
    key = "kernel" if uses_kernels(name) else name
    if key == "kernel" and key not in table:
        key = "torch"
    return table[key]


def kernels(op: str):
    """The Triton device code of one op, ``rlloss.kernels.<op>`` (imported on first use)."""
    return importlib.import_module(f"{__package__}.kernels.{op}")
