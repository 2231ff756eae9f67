"""Tests of rlloss._backend: resolve_backend (automatic choice, RLLOSS_BACKEND, explicit argument, errors, the
deprecated alias "interpret"), the predicates, implementation tables and per-backend attributes."""
from __future__ import annotations

import warnings

import pytest
import torch

import rlloss
from conftest import HAS_CUDA
from rlloss import _backend
from rlloss._backend import BACKENDS, ENV_VAR, resolve_backend

CPU, META, CUDA = torch.device("cpu"), torch.device("meta"), torch.device("cuda")


@pytest.fixture(autouse=True)
def _no_env(monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)


def test_names():
    assert ENV_VAR == "RLLOSS_BACKEND"
    assert BACKENDS == ("triton", "torch", "reference")
    assert _backend.DEPRECATED_ALIASES == {"interpret": "triton"}


def test_this_process_has_triton_and_matching_interpreter_mode():
    assert _backend.triton_import_error() is None
    assert _backend.kernels_interpreted() is (not HAS_CUDA)  # conftest sets TRITON_INTERPRET=1 without CUDA
    import rlloss.kernels

    assert _backend.kernels_interpreted() is rlloss.kernels.INTERPRETED  # a property of the kernels module


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


def test_env_var_triton_on_cpu_runs_the_interpreted_kernels(monkeypatch):
    monkeypatch.setenv(ENV_VAR, "triton")
    monkeypatch.setattr(_backend, "kernels_interpreted", lambda: True)
    assert resolve_backend(None, CPU) == "triton"


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


def test_triton_needs_cuda_tensors_on_other_devices():
    with pytest.raises(ValueError, match=r"backend='triton' needs CUDA tensors \(or CPU tensors under Triton's "
                                         r"interpreter\), got tensors on meta"):
        resolve_backend("triton", META)


def test_triton_on_cpu_needs_the_interpreter_build(monkeypatch):
    monkeypatch.setattr(_backend, "kernels_interpreted", lambda: False)
    with pytest.raises(ValueError, match=r"backend='triton' needs CUDA tensors, got tensors on cpu .*"
                                         r"TRITON_INTERPRET=1 set before rlloss is imported"):
        resolve_backend("triton", CPU)
    monkeypatch.setenv(ENV_VAR, "triton")
    with pytest.raises(ValueError, match=r"RLLOSS_BACKEND='triton' needs CUDA tensors"):
        resolve_backend(None, CPU)


def test_interpreted_kernels_refuse_cuda_tensors(monkeypatch):
    monkeypatch.setattr(_backend, "kernels_interpreted", lambda: True)
    assert resolve_backend("triton", CPU) == "triton"
    with pytest.raises(RuntimeError, match=r"backend='triton' cannot run CUDA tensors here: TRITON_INTERPRET=1 "
                                           r"was set"):
        resolve_backend("triton", CUDA)


@pytest.mark.skipif(HAS_CUDA, reason="kernels are compiled, not interpreted, on a CUDA machine")
def test_triton_runs_cpu_tensors_in_this_interpreted_process():
    assert resolve_backend("triton", CPU) == "triton"
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1 was set"):
        resolve_backend("triton", CUDA)


def test_triton_needs_triton(monkeypatch):
    monkeypatch.setattr(_backend, "triton_import_error", lambda: "ImportError: no module named triton")
    for device in (CUDA, CPU):
        with pytest.raises(RuntimeError, match=r"backend='triton' needs Triton, which failed to import"):
            resolve_backend("triton", device)


# --- the deprecated alias "interpret" ---------------------------------------------------------------------


@pytest.fixture
def _fresh_warnings(monkeypatch):
    monkeypatch.setattr(_backend, "_warned_aliases", set())


@pytest.mark.usefixtures("_fresh_warnings")
def test_interpret_is_a_deprecated_alias_of_triton_warned_once(monkeypatch):
    monkeypatch.setattr(_backend, "kernels_interpreted", lambda: True)
    with pytest.warns(DeprecationWarning, match=r"backend='interpret' is deprecated .*; use backend='triton'"):
        assert resolve_backend("interpret", CPU) == "triton"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the second use is silent
        assert resolve_backend("interpret", CPU) == "triton"


@pytest.mark.usefixtures("_fresh_warnings")
def test_interpret_from_env_var_names_the_env_var(monkeypatch):
    monkeypatch.setattr(_backend, "kernels_interpreted", lambda: True)
    monkeypatch.setenv(ENV_VAR, "interpret")
    with pytest.warns(DeprecationWarning, match=r"RLLOSS_BACKEND='interpret' is deprecated .*RLLOSS_BACKEND='triton'"):
        assert resolve_backend(None, CPU) == "triton"


@pytest.mark.usefixtures("_fresh_warnings")
def test_interpret_keeps_the_errors_of_triton(monkeypatch):
    monkeypatch.setattr(_backend, "kernels_interpreted", lambda: False)
    with pytest.warns(DeprecationWarning), pytest.raises(ValueError, match=r"backend='triton' needs CUDA tensors"):
        resolve_backend("interpret", CPU)
    monkeypatch.setattr(_backend, "kernels_interpreted", lambda: True)
    with pytest.raises(RuntimeError, match=r"TRITON_INTERPRET=1 was set"):
        resolve_backend("interpret", CUDA)


@pytest.mark.skipif(HAS_CUDA, reason="the alias runs the interpreted kernels on CPU tensors")
@pytest.mark.usefixtures("_fresh_warnings")
def test_interpret_still_runs_an_op():
    adv, mask = torch.tensor([1.0, -1.0]), torch.ones(2, 3, dtype=torch.bool)
    pos, neg = torch.randn(2, 3), torch.randn(2, 3)
    with pytest.warns(DeprecationWarning, match="use backend='triton'"):
        got = rlloss.contrastive_credit(adv, mask, pos, neg_logprobs=neg, credit_lambda=0.5, credit_eps_w=0.2, backend="interpret")
    want = rlloss.contrastive_credit(adv, mask, pos, neg_logprobs=neg, credit_lambda=0.5, credit_eps_w=0.2, backend="triton")
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    rlloss.FusedPolicyLoss(rlloss.LossConfig.preset("dapo"), backend="interpret")  # the constructor accepts it


@pytest.mark.parametrize("name", [None, "triton", "torch", "reference", "interpret"])
def test_check_name_accepts_backends_and_aliases(name):
    _backend.check_name(name)


def test_check_name_rejects_unknown_names():
    with pytest.raises(ValueError, match=r"backend='cuda' is not a backend; expected one of .* or None"):
        _backend.check_name("cuda")


# --- implementation tables and per-backend attributes ------------------------------------------------------


def test_predicates():
    assert [_backend.uses_kernels(b) for b in BACKENDS] == [True, False, False]
    assert [_backend.is_torch(b) for b in BACKENDS] == [False, True, False]
    assert [_backend.is_reference(b) for b in BACKENDS] == [False, False, True]


def test_implementation_table():
    table = dict(reference="r", torch="t", kernel="k")
    assert [_backend.implementation(table, b) for b in BACKENDS] == ["k", "t", "r"]
    no_kernel = dict(reference="r", torch="t")
    assert _backend.implementation(no_kernel, "triton") == "t"  # an op without a kernel runs torch
    with pytest.raises(KeyError, match="implementation table keys"):
        _backend.implementation(dict(reference="r", torch="t", cuda="c"), "torch")


def test_accepted_dtypes_are_a_backend_attribute():
    assert torch.float64 not in _backend.accepted_dtypes("triton")
    assert torch.float64 in _backend.accepted_dtypes("torch")
    assert torch.float64 in _backend.accepted_dtypes("reference")


def test_kernels_is_the_kernels_module_of_an_op():
    import rlloss.kernels.logprobs

    assert _backend.kernels("logprobs") is rlloss.kernels.logprobs


@pytest.mark.gpu
def test_triton_on_cuda():
    assert resolve_backend("triton", CUDA) == "triton"
    assert resolve_backend(None, torch.empty(1, device="cuda").device) == "triton"
