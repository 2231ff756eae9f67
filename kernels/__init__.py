"""Triton device code of rlloss, installed as ``rlloss.kernels``. Imports nothing from the API layer.

One module per operation, named like its API module in ``rlloss/``.
"""
from . import logprobs
from . import advantages
from . import policy
from . import prefix_attention

# Triton decides at decoration time whether a kernel is compiled or run by its interpreter
# (TRITON_INTERPRET=1); the backend selector needs to know which one this process got.
INTERPRETED = type(logprobs._stats_kernel).__name__ == "InterpretedFunction"

__all__ = ["INTERPRETED", "logprobs"]
