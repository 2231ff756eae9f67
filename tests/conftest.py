"""Test set-up: without CUDA, kernel tests run through Triton's interpreter.

TRITON_INTERPRET must be set before Triton decorates the kernels, i.e. before rlloss is imported, so it is set
here at collection time. Kernel tests then use the ``triton`` backend: on CPU tensors through the interpreter,
on CUDA tensors compiled.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

# Hypothesis profiles. "ci" (the default) is reproducible and quick: the same examples on every run. "long"
# searches widely at random: `pytest --hypothesis-profile=long` or RLLOSS_HYPOTHESIS_PROFILE=long. A test's own
# @settings(max_examples=...) wins over the profile's, so property suites that should scale leave it unset.
settings.register_profile("ci", derandomize=True, max_examples=25, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("long", max_examples=1000, deadline=None, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("RLLOSS_HYPOTHESIS_PROFILE", "ci"))  # --hypothesis-profile overrides this

HAS_CUDA = torch.cuda.is_available()
# The backend that runs the Triton kernels (compiled on CUDA, interpreted on CPU tensors without CUDA).
KERNEL_BACKEND = "triton"
# Whether the kernels run under Triton's interpreter here (set above when there is no CUDA).
INTERPRETED = not HAS_CUDA


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
