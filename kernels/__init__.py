"""Triton device code of rlloss, installed as ``rlloss.kernels``. Imports nothing from the API layer.

One module per operation, named like its API module in ``rlloss/``, plus ``tables`` (the mode and statistic
tables, no Triton). Importing this package imports no Triton: the op modules load on first use
(``from rlloss.kernels import policy`` or ``rlloss.kernels.policy``), so ``import rlloss`` and the torch
backend work where Triton cannot be imported.

Float scalar parameters of the kernels are annotated ``tl.float32``: a launch passing a Python int cannot turn
one into an integer (or, equal to 1, a constexpr) specialisation, and tests/compile_kernels.py reads their type
from the annotation.
"""
import importlib

from . import tables

_OPS = ("logprobs", "advantages", "policy", "credit", "prefix_attention")

__all__ = ["INTERPRETED", "tables", *_OPS]


def __getattr__(name):
    if name in _OPS:
        return importlib.import_module(f"{__name__}.{name}")
    if name == "INTERPRETED":
        # Triton decides at decoration time whether a kernel is compiled or run by its interpreter
        # (TRITON_INTERPRET=1); the backend selector needs to know which one this process got.
        logprobs = importlib.import_module(f"{__name__}.logprobs")
        value = type(logprobs._stats_kernel).__name__ == "InterpretedFunction"
        globals()["INTERPRETED"] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
