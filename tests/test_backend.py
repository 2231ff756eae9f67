"""Tests of rlloss._backend.resolve_backend: automatic choice, RLLOSS_BACKEND, explicit argument, errors."""
from __future__ import annotations

import pytest
import torch

from conftest import HAS_CUDA
from rlloss import _backend
from rlloss._backend import BACKENDS, ENV_VAR, resolve_backend

CPU, META, CUDA = torch.device("cpu"), torch.device("meta"), torch.device("cuda")


@pytest.fixture(autouse=True)
def _no_env(monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)


def test_names():
    assert ENV_VAR == "RLLOSS_BACKEND"
    assert set(BACKENDS) == {"triton", "interpret", "torch", "reference"}


def test_this_process_has_triton_and_matching_interpreter_mode():
    assert _backend.triton_import_error() is None
    assert _backend.kernels_interpreted() is (not HAS_CUDA)  # conftest sets TRITON_INTERPRET=1 without CUDA


# --- automatic choice -----------------------------------------------------------------------------------


@pytest.mark.parametrize("device", [CPU, META])
def test_auto_off_cuda_is_torch(device):
    assert resolve_backend(None, device) == "torch"


def test_auto_on_cuda_is_triton():
    # Only the device type matters for the automatic choice; no CUDA tensor is needed to ask.
    assert resolve_backend(None, CUDA) == "triton"


def test_auto_on_cuda_without_triton_falls_back_to_torch(monkeypatch):
    monkeypatch.setattr(_backend, "triton_import_error", lambda: "ImportError: no module named triton")
    assert resolve_backend(None, CUDA) == "torch"


def test_empty_env_var_means_auto(monkeypatch):
    monkeypatch.setenv(ENV_VAR, "")
    assert resolve_backend(None, CPU) == "torch"


# --- precedence -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("env", ["reference", "torch"])
def test_env_var_beats_auto(monkeypatch, env):
    monkeypatch.setenv(ENV_VAR, env)
    assert resolve_backend(None, CPU) == env
    assert resolve_backend(None, CUDA) == env  # even where the automatic choice would be triton


def test_env_var_interpret_on_cpu(monkeypatch):
    monkeypatch.setenv(ENV_VAR, "interpret")
    if _backend.kernels_interpreted():
        assert resolve_backend(None, CPU) == "interpret"
    else:
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
            resolve_backend(None, CPU)


@pytest.mark.parametrize("env", ["reference", "torch", "not-a-backend", "triton"])
@pytest.mark.parametrize("explicit", ["torch", "reference"])
def test_explicit_argument_beats_env_var(monkeypatch, env, explicit):
    monkeypatch.setenv(ENV_VAR, env)
    assert resolve_backend(explicit, CPU) == explicit


@pytest.mark.parametrize("name", ["torch", "reference"])
@pytest.mark.parametrize("device", [CPU, META, CUDA])
def test_explicit_portable_backends_run_anywhere(name, device):
    assert resolve_backend(name, device) == name


# --- errors ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["cuda", "Torch", "TRITON", "", "interpreter"])
def test_unknown_explicit_name(name):
    with pytest.raises(ValueError, match=rf"backend={name!r} is not a backend; expected one of"):
        resolve_backend(name, CPU)


@pytest.mark.parametrize("value", ["cuda", "Torch", "interpreter"])
def test_unknown_env_value(monkeypatch, value):
    monkeypatch.setenv(ENV_VAR, value)
    with pytest.raises(ValueError, match=rf"RLLOSS_BACKEND={value!r} is not a backend"):
        resolve_backend(None, CPU)


@pytest.mark.parametrize("device", [CPU, META])
def test_triton_needs_cuda_tensors(device):
    with pytest.raises(ValueError, match=rf"backend='triton' needs CUDA tensors, got tensors on {device.type}"):
        resolve_backend("triton", device)


def test_triton_from_env_on_cpu(monkeypatch):
    monkeypatch.setenv(ENV_VAR, "triton")
    with pytest.raises(ValueError, match=r"RLLOSS_BACKEND='triton' needs CUDA tensors"):
        resolve_backend(None, CPU)


@pytest.mark.parametrize("device", [META, CUDA])
def test_interpret_needs_cpu_tensors(device):
    with pytest.raises(ValueError, match=r"backend='interpret' runs on CPU tensors"):
        resolve_backend("interpret", device)


@pytest.mark.skipif(HAS_CUDA, reason="kernels are compiled, not interpreted, on a CUDA machine")
def test_interpret_on_cpu_and_triton_refused_when_interpreted():
    assert resolve_backend("interpret", CPU) == "interpret"
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1 was set"):
        resolve_backend("triton", CUDA)


def test_interpret_refused_when_kernels_are_compiled(monkeypatch):
    monkeypatch.setattr(_backend, "kernels_interpreted", lambda: False)
    with pytest.raises(RuntimeError, match=r"backend='interpret' needs TRITON_INTERPRET=1"):
        resolve_backend("interpret", CPU)


@pytest.mark.parametrize("name", ["triton", "interpret"])
def test_kernel_backends_need_triton(monkeypatch, name):
    monkeypatch.setattr(_backend, "triton_import_error", lambda: "ImportError: no module named triton")
    with pytest.raises(RuntimeError, match=rf"backend={name!r} needs Triton, which failed to import"):
        resolve_backend(name, CUDA if name == "triton" else CPU)


@pytest.mark.gpu
def test_triton_on_cuda():
    assert resolve_backend("triton", CUDA) == "triton"
    assert resolve_backend(None, torch.empty(1, device="cuda").device) == "triton"
