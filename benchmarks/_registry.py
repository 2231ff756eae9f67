"""The suite registry: a suite is one module ``benchmarks/<name>.py`` that defines ``SUITE``.

Adding a suite (policy loss, advantages, shared-prefix attention, ...) means adding that one file; nothing
here or in ``__main__`` changes. Discovery skips modules whose names start with ``_`` (helpers) or ``test_``
(pytest-benchmark files), ``conftest`` and ``plots`` (``python -m benchmarks.plots``).
"""
from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass
from typing import Callable, Dict, List

from ._harness import RunContext, SuiteReport

_NOT_SUITE_PREFIXES = ("_", "test_")
# Modules of the package that are not suites: pytest's options and the plotting entry point.
_NOT_SUITE_NAMES = ("conftest", "plots")


@dataclass(frozen=True)
class Suite:
    """One benchmark suite.

    name: what ``--suite`` selects; also the stem of the files it writes.
    description: one line for ``--list``.
    run_cpu: the CPU default (small sizes: memory and equality), run on a machine without CUDA.
    run_gpu: the GPU comparison, run on a CUDA device.
    """

    name: str
    description: str
    run_cpu: Callable[[RunContext], SuiteReport]
    run_gpu: Callable[[RunContext], SuiteReport]

    def run(self, ctx: RunContext) -> SuiteReport:
        """Every case for ``ctx.device``: the GPU comparison on CUDA, else the CPU default."""
        return self.run_gpu(ctx) if ctx.device.type == "cuda" else self.run_cpu(ctx)


def _suite_modules() -> List[str]:
    from . import __path__ as package_path

    return sorted(
        info.name for info in pkgutil.iter_modules(package_path)
        if not info.name.startswith(_NOT_SUITE_PREFIXES) and info.name not in _NOT_SUITE_NAMES
    )


def available_suites() -> Dict[str, Suite]:
    """Every suite of the package by name, in alphabetical order."""
    suites = {}
    for module_name in _suite_modules():
        module = importlib.import_module(f"{__package__}.{module_name}")
        suite = getattr(module, "SUITE", None)
        if not isinstance(suite, Suite):
            raise TypeError(f"benchmarks/{module_name}.py must define SUITE = Suite(...), found {suite!r}")
        suites[suite.name] = suite
    return suites
