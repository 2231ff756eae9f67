"""Tests of rlloss.token_logprobs / rlloss.logprobs_from_logits (docs/math.md §1) against the float64 oracle.

Backends: ``torch`` in float64 (tight tolerance, many shapes: it is fast) and the Triton kernels
(``KERNEL_BACKEND``: the interpreter on CPU, compiled on CUDA) in float32/float16 on a covering subset of
shapes (the interpreter is slow). GPU-only tests at realistic sizes carry the ``gpu`` marker.
"""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import rlloss
import rlloss.logprobs as api
from conftest import INTERPRETED, KERNEL_BACKEND
from rlloss import reference
from rlloss.kernels import logprobs as kernels

GRAD_MODES = ("logprobs", "entropy", "both")
# N and V are multiples of no block size (kernel blocks are powers of two ≥ 16); D gives one partial D tile
# (8, 48 on the interpreter's 64-wide block) or several.
NS, VS, DS = (1, 37, 300), (1, 1000, 4099), (8, 48, 96)
# A covering subset for the slow interpreter: every N×V pair but the costliest (300×4099, left to the torch
# backend) and every value of each dimension, D spread so most N×D and V×D pairs occur too.
KERNEL_SHAPES = [
    (1, 1, 8), (1, 1000, 48), (1, 4099, 96),
    (37, 1, 96), (37, 1000, 8), (37, 4099, 48),
    (300, 1, 48), (300, 1000, 8),
]
# Tolerances (absolute on outputs; on gradients relative to the largest reference entry).
TOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 1e-4}
GRAD_TOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 3e-3}
# Tests run on the device of the kernel backend (the reference and torch backends run anywhere); the
# input-validation tests build their own CPU tensors.
DEVICE = "cpu" if INTERPRETED else "cuda"


# --- helpers ------------------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _no_backend_env(monkeypatch):
    """Tests that do not name a backend check the automatic choice, whatever the caller's environment."""
    monkeypatch.delenv("RLLOSS_BACKEND", raising=False)


def _inputs(lead, V, D, dtype=torch.float32, bias=True, logit_std=2.0, device=DEVICE):
    """Fresh random hidden [*lead, D], weight [V, D], bias [V] | None, targets [*lead]."""
    lead = tuple(lead) if isinstance(lead, (tuple, list)) else (lead,)
    hidden = torch.randn(*lead, D, device=device).to(dtype)
    weight = (torch.randn(V, D, device=device) * (logit_std / math.sqrt(D))).to(dtype)
    b = torch.randn(V, device=device).to(dtype) if bias else None
    targets = torch.randint(0, V, lead, device=device)
    return hidden, weight, b, targets


def _upstream(mode, shape, device=DEVICE):
    """Random upstream gradients of (logprobs, entropy); None for an output the loss does not use."""
    g_logp = torch.randn(shape, device=device) if mode in ("logprobs", "both") else None
    g_ent = torch.randn(shape, device=device) if mode in ("entropy", "both") else None
    return g_logp, g_ent


def _loss(logprobs, entropy, g_logp, g_ent):
    loss = 0
    if g_logp is not None:
        loss = loss + (logprobs * g_logp.to(logprobs.dtype)).sum()
    if g_ent is not None:
        loss = loss + (entropy * g_ent.to(entropy.dtype)).sum()
    return loss


def _leaf(x, requires_grad=True):
    """A fresh leaf copy of x; a tensor that already requires grad (e.g. a strided view of a leaf built by
    _strided) is used as it is, so its layout reaches the API unchanged (clone() would compact it)."""
    if x is None or (x.requires_grad and requires_grad):
        return x
    return x.detach().clone().requires_grad_(requires_grad)


def _strided(x, layout):
    """A non-contiguous view with x's values, of a fresh leaf that requires grad. Padding outside the view
    holds NaN, so a kernel that ignores the strides reads NaN and fails loudly."""
    x = x.detach()
    if layout == "transposed":  # [R, C] with unit stride along R
        return x.T.contiguous().requires_grad_().T
    if layout == "batch_transposed":  # [B, T, D] that no view can flatten
        return x.transpose(0, 1).contiguous().requires_grad_().transpose(0, 1)
    if layout == "column_slice":  # unit stride along the last dim, row stride last dim + 9
        base = torch.full((*x.shape[:-1], x.shape[-1] + 9), float("nan"), dtype=x.dtype, device=x.device)
        base[..., 5:5 + x.shape[-1]] = x
        return base.requires_grad_()[..., 5:5 + x.shape[-1]]
    if layout == "step":  # every other element of a 1-D buffer
        base = torch.full((2 * x.shape[0],), float("nan"), dtype=x.dtype, device=x.device)
        base[::2] = x
        return base.requires_grad_()[::2]
    raise AssertionError(layout)


def _grads(loss, tensors):
    wanted = [t for t in tensors if t is not None and t.requires_grad]
    got = iter(torch.autograd.grad(loss, wanted)) if wanted else iter(())
    return [next(got) if t is not None and t.requires_grad else None for t in tensors]


def run_api(hidden, weight, bias, targets, mode, g=None, requires=("hidden", "weight", "bias"), **kw):
    """(logprobs, entropy, [dhidden, dweight, dbias]) through rlloss.token_logprobs."""
    h = _leaf(hidden, "hidden" in requires)
    w = _leaf(weight, "weight" in requires)
    b = _leaf(bias, "bias" in requires)
    out = rlloss.token_logprobs(h, w, targets, bias=b, return_entropy=True, **kw)
    g_logp, g_ent = g if g is not None else _upstream(mode, targets.shape)
    grads = _grads(_loss(out.logprobs, out.entropy, g_logp, g_ent), [h, w, b])
    return out.logprobs, out.entropy, grads


def run_reference(hidden, weight, bias, targets, g, **kw):
    """The float64 oracle on the same (already rounded) inputs: (logprobs, entropy, [dh, dW, db])."""
    kw = {k: v for k, v in kw.items() if k not in ("max_scratch_bytes", "batch_invariant", "check_inputs")}
    h, w = _leaf(hidden.detach().double()), _leaf(weight.detach().double())
    b = _leaf(bias.detach().double()) if bias is not None else None
    logprobs, entropy = reference.token_logprobs(h, w, targets, bias=b, **kw)
    g_logp, g_ent = g
    loss = _loss(logprobs, entropy, g_logp, g_ent)
    return logprobs, entropy, _grads(loss, [h, w, b])


def assert_out_close(got, want, tol, name):
    assert got is not None
    torch.testing.assert_close(got.double(), want.double(), atol=tol, rtol=tol, msg=lambda m: f"{name}: {m}")


# Absolute floor of gradient tolerances: where every entry of a gradient is tiny because large terms cancel
# (e.g. the entropy gradient of two nearly tied logits), rounding of those terms still shows.
GRAD_FLOOR = {torch.float64: 1e-12, torch.float32: 1e-6, torch.float16: 1e-4, torch.bfloat16: 1e-3}


def assert_grad_close(got, want, tol, name):
    """Close up to tol relative to the largest entry of the reference gradient."""
    assert got is not None and want is not None, name
    assert got.shape == want.shape, (name, got.shape, want.shape)
    assert torch.isfinite(got).all(), f"{name} has non-finite entries"
    scale = want.abs().max().item() if want.numel() else 1.0
    atol = max(tol * scale, GRAD_FLOOR[got.dtype])
    torch.testing.assert_close(got.double(), want.double(), atol=atol, rtol=tol,
                               msg=lambda m: f"{name}: {m}")


def check_against_reference(hidden, weight, bias, targets, mode, backend, requires=("hidden", "weight", "bias"),
                            out_tol=None, grad_tol=None, **kw):
    out_tol = out_tol if out_tol is not None else TOL[hidden.dtype]
    grad_tol = grad_tol if grad_tol is not None else GRAD_TOL[hidden.dtype]
    g = _upstream(mode, targets.shape, targets.device)
    lp, ent, grads = run_api(hidden, weight, bias, targets, mode, g=g, requires=requires, backend=backend, **kw)
    rlp, rent, rgrads = run_reference(hidden, weight, bias, targets, g, **kw)
    out_dtype = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    assert lp.dtype == out_dtype and ent.dtype == out_dtype
    assert lp.shape == targets.shape and ent.shape == targets.shape
    assert_out_close(lp, rlp, out_tol, "logprobs")
    assert_out_close(ent, rent, out_tol, "entropy")
    for name, src, got, want in zip(("dhidden", "dweight", "dbias"), (hidden, weight, bias), grads, rgrads):
        key = name[1:]
        if src is None or key not in requires:
            assert got is None
            continue
        assert got.dtype == src.dtype, (name, got.dtype)
        assert_grad_close(got, want, grad_tol, name)
    return lp, ent, grads


def _poison(hidden, rows):
    """Write inf / -inf / NaN into the given rows of hidden (in place) and return it."""
    flat = hidden.view(-1, hidden.shape[-1])
    values = (float("inf"), float("-inf"), float("nan"))
    for i, r in enumerate(rows.tolist()):
        flat[r] = values[i % 3]
        flat[r, 0] = values[(i + 1) % 3]
    return hidden


BOTH_BACKENDS = ["torch", KERNEL_BACKEND]


def _dtype_for(backend):
    return torch.float64 if backend == "torch" else torch.float32


# --- forward and every gradient vs the reference ------------------------------------------------------


@pytest.mark.parametrize("mode", GRAD_MODES)
@pytest.mark.parametrize("N", NS)
@pytest.mark.parametrize("V", VS)
@pytest.mark.parametrize("D", DS)
def test_torch_backend_float64_matches_reference(N, V, D, mode):
    hidden, weight, bias, targets = _inputs(N, V, D, torch.float64)
    check_against_reference(hidden, weight, bias, targets, mode, "torch")


@pytest.mark.parametrize("N,V,D", KERNEL_SHAPES)
def test_kernel_backend_float32_matches_reference(N, V, D):
    use_bias = (N + V + D) % 2 == 0  # both with and without bias across the subset
    hidden, weight, bias, targets = _inputs(N, V, D, torch.float32, bias=use_bias)
    check_against_reference(hidden, weight, bias, targets, "both", KERNEL_BACKEND)


@pytest.mark.parametrize("mode", ["logprobs", "entropy"])
@pytest.mark.parametrize("backend", BOTH_BACKENDS)
def test_single_output_gradients(backend, mode):
    """Gradients from logprobs only and from entropy only (the kernels specialise on which is present)."""
    hidden, weight, bias, targets = _inputs(37, 1000, 48, _dtype_for(backend))
    check_against_reference(hidden, weight, bias, targets, mode, backend)


@pytest.mark.parametrize("requires", [("hidden",), ("weight",), ("bias",), ("weight", "bias"), ("hidden", "bias")])
@pytest.mark.parametrize("backend", BOTH_BACKENDS)
def test_subsets_of_inputs_require_grad(backend, requires):
    hidden, weight, bias, targets = _inputs(37, 300, 24, _dtype_for(backend))
    check_against_reference(hidden, weight, bias, targets, "both", backend, requires=requires)


@pytest.mark.parametrize("bias_dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("N,V,D", [(37, 1000, 48), (300, 1, 96)])
def test_kernel_backend_float16(N, V, D, bias_dtype):
    hidden, weight, bias, targets = _inputs(N, V, D, torch.float16)
    bias = bias.to(bias_dtype)
    check_against_reference(hidden, weight, bias, targets, "both", KERNEL_BACKEND)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_torch_backend_low_precision(dtype):
    hidden, weight, bias, targets = _inputs(37, 1000, 48, dtype)
    tol = {torch.float32: (1e-5, 1e-5), torch.float16: (1e-4, 3e-3), torch.bfloat16: (1e-4, 1e-2)}[dtype]
    check_against_reference(hidden, weight, bias, targets, "both", "torch", out_tol=tol[0], grad_tol=tol[1])


@pytest.mark.parametrize("backend,dtype", [("torch", torch.float64), (KERNEL_BACKEND, torch.float32),
                                           (KERNEL_BACKEND, torch.float16)])
@pytest.mark.parametrize("rows", [1, 7, 16])
def test_chunks_of_tokens(backend, dtype, rows):
    """A scratch bound of a few rows forces many chunks (one GEMM and one pass each); the last one is short.
    float16 on the kernels keeps the gradient in a separate 16-bit buffer for the gradient GEMMs."""
    V = 300
    per_row = V * api._scratch_bytes_per_logit(dtype, backend)
    hidden, weight, bias, targets = _inputs(77, V, 24, dtype)
    targets[::5] = -100
    check_against_reference(hidden, weight, bias, targets, "both", backend, temperature=0.8, softcap=4.0,
                            max_scratch_bytes=rows * per_row)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_reference_backend_through_api(dtype):
    hidden, weight, bias, targets = _inputs((3, 5), 50, 16, dtype)
    targets[0, 1] = -100
    out = rlloss.token_logprobs(hidden, weight, targets, bias=bias, return_entropy=True, backend="reference",
                                temperature=1.5)
    want = reference.token_logprobs(hidden.double(), weight.double(), targets, bias=bias.double(),
                                    temperature=1.5)
    assert out.logprobs.dtype == dtype and out.entropy.dtype == dtype
    assert out.logprobs.shape == (3, 5)
    tol = TOL[dtype]
    assert_out_close(out.logprobs, want[0], tol, "logprobs")
    assert_out_close(out.entropy, want[1], tol, "entropy")
    assert out.logprobs[0, 1] == 0 and out.entropy[0, 1] == 0
    check_against_reference(hidden, weight, bias, targets, "both", "reference", out_tol=tol,
                            grad_tol=GRAD_TOL[dtype])


def test_return_entropy_false():
    hidden, weight, bias, targets = _inputs(5, 40, 8)
    out = rlloss.token_logprobs(hidden, weight, targets, bias=bias)
    assert isinstance(out, rlloss.TokenLogprobs)
    assert out.entropy is None
    want = reference.token_logprobs(hidden.double(), weight.double(), targets, bias=bias.double())[0]
    assert_out_close(out.logprobs, want, 1e-5, "logprobs")


# --- shapes and layouts -------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BOTH_BACKENDS)
def test_leading_dims(backend):
    hidden, weight, bias, targets = _inputs((3, 7), 500, 24, _dtype_for(backend))
    targets[1, 2:5] = -100
    lp, ent, grads = check_against_reference(hidden, weight, bias, targets, "both", backend)
    assert lp.shape == (3, 7) and ent.shape == (3, 7)
    assert grads[0].shape == (3, 7, 24)


@pytest.mark.parametrize("backend", BOTH_BACKENDS)
def test_single_token_without_leading_dims(backend):
    """hidden [D] with a 0-D target gives 0-D outputs."""
    hidden, weight, bias, targets = _inputs((), 300, 16, _dtype_for(backend))
    assert hidden.shape == (16,) and targets.shape == ()
    lp, ent, grads = check_against_reference(hidden, weight, bias, targets, "both", backend)
    assert lp.shape == () and ent.shape == ()
    assert grads[0].shape == (16,)


@pytest.mark.parametrize(
    "which,layout,backend",
    [(w, lay, be) for w, lay in [("hidden", "transposed"), ("hidden", "column_slice"),
                                 ("hidden", "batch_transposed"), ("weight", "transposed"),
                                 ("weight", "column_slice")]
     for be in BOTH_BACKENDS]
    + [("bias", "step", be) for be in BOTH_BACKENDS],
)
def test_non_contiguous_inputs(which, layout, backend):
    """Strided views of hidden / weight / bias give the contiguous result; gradients come back in the
    views' shapes."""
    dtype = _dtype_for(backend)
    lead = (5, 9) if layout == "batch_transposed" else (45,)
    hidden, weight, bias, targets = _inputs(lead, 700, 24, dtype)
    targets.view(-1)[3] = -100
    views = {"hidden": hidden, "weight": weight, "bias": bias}
    views[which] = _strided(views[which], layout)
    assert not views[which].is_contiguous()
    check_against_reference(views["hidden"], views["weight"], views["bias"], targets, "both", backend)


# --- ignore_index ---------------------------------------------------------------------------------------


def assert_kept_rows_match_reference(lp, ent, grads, hidden, weight, bias, targets, g, keep):
    """The kept rows' outputs and hidden gradient, and the whole dW, db, equal the reference on those rows alone."""
    dtype = hidden.dtype
    rlp, rent, (rdh, rdw, rdb) = run_reference(hidden[keep], weight, bias, targets[keep], (g[0][keep], g[1][keep]))
    assert_out_close(lp[keep], rlp, TOL[dtype], "logprobs")
    assert_out_close(ent[keep], rent, TOL[dtype], "entropy")
    assert_grad_close(grads[0][keep], rdh, GRAD_TOL[dtype], "dhidden")
    assert_grad_close(grads[1], rdw, GRAD_TOL[dtype], "dweight")
    assert_grad_close(grads[2], rdb, GRAD_TOL[dtype], "dbias")


@pytest.mark.parametrize("ignore_index", [-100, -1, 5000])
@pytest.mark.parametrize("backend", BOTH_BACKENDS)
def test_ignored_tokens_poisoned(backend, ignore_index):
    """Ignored rows give exactly 0 and exactly zero gradient although their hidden rows hold inf/NaN, and
    contribute nothing to dW/db: the result equals the reference on the kept rows alone."""
    dtype = _dtype_for(backend)
    N, V, D = 40, 1000, 24
    hidden, weight, bias, targets = _inputs((N,), V, D, dtype)
    ignored = torch.zeros(N, dtype=torch.bool, device=DEVICE)
    ignored[torch.randperm(N, device=DEVICE)[:13]] = True
    ignored[0] = ignored[N - 1] = True
    targets[ignored] = ignore_index
    _poison(hidden, ignored.nonzero().squeeze(1))
    g = _upstream("both", (N,))
    lp, ent, (dh, dw, db) = run_api(hidden, weight, bias, targets, "both", g=g, backend=backend,
                                    ignore_index=ignore_index)
    assert (lp[ignored] == 0).all() and (ent[ignored] == 0).all()
    assert (dh[ignored] == 0).all()
    for t in (lp, ent, dh, dw, db):
        assert torch.isfinite(t).all()
    assert_kept_rows_match_reference(lp, ent, (dh, dw, db), hidden, weight, bias, targets, g, ~ignored)


@pytest.mark.parametrize("backend", BOTH_BACKENDS)
def test_all_tokens_ignored(backend):
    dtype = _dtype_for(backend)
    hidden, weight, bias, targets = _inputs((2, 6), 300, 16, dtype)
    targets.fill_(-100)
    _poison(hidden, torch.arange(0, 12, 2, device=DEVICE))
    lp, ent, (dh, dw, db) = run_api(hidden, weight, bias, targets, "both", backend=backend)
    for t in (lp, ent, dh, dw, db):
        assert (t == 0).all()


@pytest.mark.parametrize("backend", BOTH_BACKENDS)
def test_ignore_index_default_and_custom_differ(backend):
    """-100 is a target out of range when ignore_index is custom, and a custom value is honoured."""
    hidden, weight, bias, targets = _inputs(6, 50, 8, _dtype_for(backend))
    targets[2] = -7
    out = rlloss.token_logprobs(hidden, weight, targets, bias=bias, ignore_index=-7, backend=backend)
    assert out.logprobs[2] == 0 and (out.logprobs[torch.arange(6, device=DEVICE) != 2] < 0).all()
    with pytest.raises(ValueError, match="targets"):
        rlloss.token_logprobs(hidden, weight, targets, bias=bias, backend=backend)


# --- mask= (True = scored), alone and with ignore_index ------------------------------------------------

MASK_BACKENDS = ["torch", KERNEL_BACKEND, "reference"]


def _mask_case(lead):
    """(mask, ignored): a random token mask with both ends off, and ignore_index on some tokens inside it."""
    mask = torch.rand(lead, device=DEVICE) > 0.3
    mask.view(-1)[0] = mask.view(-1)[-1] = False
    ignored = mask & (torch.rand(lead, device=DEVICE) > 0.7)
    return mask, ignored


@pytest.mark.parametrize("backend", MASK_BACKENDS)
def test_token_logprobs_mask(backend):
    """Tokens outside the mask give exactly 0 and exactly zero gradient whatever their targets (out of range
    here) and, off the reference backend, their hidden rows (inf/NaN) hold; the scored tokens and dW, db equal
    the reference on those tokens alone. ignore_index inside the mask still skips a token."""
    dtype = torch.float32 if backend == KERNEL_BACKEND else torch.float64
    lead, V, D = (4, 9), 300, 16
    hidden, weight, bias, targets = _inputs(lead, V, D, dtype)
    mask, ignored = _mask_case(lead)
    targets[~mask] = V + 7  # never read
    targets[ignored] = -100
    if backend != "reference":
        _poison(hidden, (~mask).view(-1).nonzero().squeeze(1))
    g = _upstream("both", lead)
    for m in (mask, mask.to(torch.int64)):  # bool or 0/1
        lp, ent, (dh, dw, db) = run_api(hidden, weight, bias, targets, "both", g=g, backend=backend, mask=m)
        skipped = ~mask | ignored
        assert (lp[skipped] == 0).all() and (ent[skipped] == 0).all() and (dh[skipped] == 0).all()
        assert_kept_rows_match_reference(lp, ent, (dh, dw, db), hidden, weight, bias, targets, g, ~skipped)


@pytest.mark.parametrize("backend", MASK_BACKENDS)
def test_logprobs_from_logits_mask(backend):
    """The same for logits: rows outside the mask give 0 and exactly zero gradient, the rest equal the
    reference; ignore_index inside the mask still skips a row."""
    dtype = torch.float32 if backend == KERNEL_BACKEND else torch.float64
    lead, V = (3, 7), 257
    logits = (2.0 * torch.randn(*lead, V, device=DEVICE)).to(dtype)
    targets = torch.randint(0, V, lead, device=DEVICE)
    mask, ignored = _mask_case(lead)
    targets[~mask] = -3  # never read
    targets[ignored] = -100
    if backend != "reference":
        logits[~mask] = float("nan")
    g = _upstream("both", lead)
    leaf = _leaf(logits)
    out = rlloss.logprobs_from_logits(leaf, targets, mask=mask, return_entropy=True, backend=backend)
    (dz,) = torch.autograd.grad(_loss(out.logprobs, out.entropy, *g), [leaf])
    skipped = ~mask | ignored
    keep = ~skipped
    assert (out.logprobs[skipped] == 0).all() and (out.entropy[skipped] == 0).all() and (dz[skipped] == 0).all()
    ref_leaf = _leaf(logits[keep].double())
    rlp, rent = reference.logprobs_from_logits(ref_leaf, targets[keep])
    (rdz,) = torch.autograd.grad(_loss(rlp, rent, g[0][keep], g[1][keep]), [ref_leaf])
    assert_out_close(out.logprobs[keep], rlp, TOL[dtype], "logprobs")
    assert_out_close(out.entropy[keep], rent, TOL[dtype], "entropy")
    assert_grad_close(dz[keep], rdz, GRAD_TOL[dtype], "dlogits")


@pytest.mark.parametrize("fn", ["token_logprobs", "logprobs_from_logits"])
def test_mask_bad_input(fn):
    hidden, weight, _, targets = _inputs((2, 3), 20, 8, torch.float64, device="cpu")
    logits = torch.randn(2, 3, 20, dtype=torch.float64)

    def call(mask):
        if fn == "token_logprobs":
            return rlloss.token_logprobs(hidden, weight, targets, mask=mask, backend="torch")
        return rlloss.logprobs_from_logits(logits, targets, mask=mask, backend="torch")

    with pytest.raises(ValueError, match=r"mask must have targets' shape \(2, 3\), got \(3, 2\)"):
        call(torch.ones(3, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="mask must hold only 0 and 1"):
        call(torch.full((2, 3), 2.0))
    with pytest.raises(TypeError, match="mask must be a torch.Tensor"):
        call([[True] * 3] * 2)
    targets[0, 0] = 99  # out of range where it counts
    with pytest.raises(ValueError, match=r"targets must lie in \[0, 20\)"):
        call(torch.ones(2, 3, dtype=torch.bool))
    mask = torch.ones(2, 3, dtype=torch.bool)
    mask[0, 0] = False
    assert (call(mask).logprobs[0, 0] == 0).item()  # ... and not checked where it does not


# --- temperature, soft-cap, bias ------------------------------------------------------------------------


@pytest.mark.parametrize("use_bias", [True, False])
@pytest.mark.parametrize("softcap", [None, 5.0])
@pytest.mark.parametrize("temperature", [0.7, 1.0, 2.5])
def test_torch_backend_configs(temperature, softcap, use_bias):
    hidden, weight, bias, targets = _inputs(37, 1000, 48, torch.float64, bias=use_bias, logit_std=4.0)
    targets[::6] = -100
    check_against_reference(hidden, weight, bias, targets, "both", "torch", temperature=temperature,
                            softcap=softcap)


@pytest.mark.parametrize(
    "temperature,softcap,use_bias", [(0.7, 5.0, True), (2.5, None, False), (1.0, 5.0, False), (1.6, 3.0, True)]
)
def test_kernel_backend_configs(temperature, softcap, use_bias):
    hidden, weight, bias, targets = _inputs(37, 600, 24, torch.float32, bias=use_bias, logit_std=4.0)
    targets[::6] = -100
    check_against_reference(hidden, weight, bias, targets, "both", KERNEL_BACKEND, temperature=temperature,
                            softcap=softcap)


def test_softcap_bounds_logits():
    """With cap c every logit lies in (-c, c)/T, so -log p ≤ 2c/T + log V and entropy ≤ log V."""
    hidden, weight, bias, targets = _inputs(20, 100, 16, torch.float64, logit_std=50.0)
    out = rlloss.token_logprobs(hidden, weight, targets, bias=bias, softcap=2.0, temperature=0.5,
                                return_entropy=True, backend="torch")
    assert (out.logprobs >= -(2 * 2.0 / 0.5 + math.log(100)) - 1e-9).all()
    assert (out.entropy <= math.log(100) + 1e-9).all()


# --- large logits ---------------------------------------------------------------------------------------


def _large_logit_inputs(kind, N, V, D):
    hidden = torch.randn(N, D, device=DEVICE)
    if kind == "spread":  # logits ~ ±1e4 apart: near one-hot distributions
        weight, bias = torch.randn(V, D, device=DEVICE) * (1e4 / math.sqrt(D)), None
    else:  # logits ≈ 1e4 + O(1): a large common offset with a real spread below it
        weight, bias = torch.randn(V, D, device=DEVICE) * (2 / math.sqrt(D)), 1e4 + torch.randn(V, device=DEVICE)
    return hidden, weight, bias, torch.randint(0, V, (N,), device=DEVICE)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's numpy warns on exp overflow
@pytest.mark.parametrize("kind,softcap", [("spread", None), ("offset", None), ("spread", 30.0)])
@pytest.mark.parametrize("backend", BOTH_BACKENDS)
def test_large_logits_finite_and_exact(backend, kind, softcap):
    N, V, D = 37, 1000, 48
    hidden, weight, bias, targets = _large_logit_inputs(kind, N, V, D)
    targets[5] = -100
    live = targets != -100
    g = _upstream("both", (N,))
    lp, ent, grads = run_api(hidden, weight, bias, targets, "both", g=g, backend=backend, softcap=softcap)
    rlp, rent, rgrads = run_reference(hidden, weight, bias, targets, g, softcap=softcap)
    for t in (lp, ent, *grads):
        if t is not None:
            assert torch.isfinite(t).all()
    assert (ent >= 0).all()
    z = reference.logits_from_hidden(hidden.double(), weight.double(), bias.double() if bias is not None else None)
    assert z.abs().max() > 5e3  # the case is what it claims to be
    if softcap is None:
        # float32 logits of magnitude |z| carry ~|z|·2⁻²⁴ rounding each: allow a few ulps of the largest.
        ulp = z.abs().max().item() * 2.0 ** -23
        out_tol, grad_tol = 8 * ulp, 2 * ulp  # dz depends on logit differences known to ~1 ulp
    else:
        # The cap bounds the logits, but its derivative amplifies the rounding of the ~1e4 pre-cap values.
        out_tol, grad_tol = 1e-3, 2e-3
    torch.testing.assert_close(lp.double(), rlp, atol=out_tol, rtol=0)
    torch.testing.assert_close(ent.double(), rent, atol=out_tol, rtol=0)
    if kind == "offset":  # a real spread under the offset: entropy well away from 0 and still accurate
        assert rent[live].min() > 1.0
    for name, got, want in zip(("dhidden", "dweight", "dbias"), grads, rgrads):
        if want is not None:
            assert_grad_close(got, want, grad_tol, name)


# --- vocabulary splits ------------------------------------------------------------------------------------


def _split_stats(z: torch.Tensor, targets: torch.Tensor, bounds) -> torch.Tensor:
    """Partial statistics [4, S, N] (M, A, C shifted by its own split's M, z_y) of z's column splits, written
    from the definition in kernels/logprobs.py."""
    parts = []
    for a, b in zip(bounds[:-1], bounds[1:]):
        tile = z[:, a:b]
        m = tile.amax(1)
        shift = tile - m[:, None]
        inside = (targets >= a) & (targets < b)
        zy = torch.where(inside, z.gather(1, targets[:, None]).squeeze(1), torch.zeros_like(m))
        parts.append(torch.stack([m, shift.exp().sum(1), (shift * shift.exp()).sum(1), zy]))
    return torch.stack(parts, dim=1)


@pytest.mark.parametrize("softcap", [None, 4.0])
def test_kernel_vocab_splits_merge_exactly(softcap):
    """logits_stats over k vocabulary splits, merged with merge_stats, equals one split and the reference."""
    N, V, D = 37, 1000, 40
    hidden, weight, bias, targets = _inputs(N, V, D, torch.float32, logit_std=4.0)
    targets[::7] = -100
    x = hidden @ weight.T
    kw = dict(ignore_index=-100, temperature=0.9, softcap=softcap)
    one = kernels.logits_stats(x, bias, targets, splits=1, **kw)
    assert one.shape == (4, 1, N)
    st1 = api.merge_stats(one)
    live = targets != -100
    z = reference.logits_from_hidden(hidden.double(), weight.double(), bias.double(), temperature=0.9,
                                     softcap=softcap)
    torch.testing.assert_close((st1.shift + st1.total.log())[live].double(), torch.logsumexp(z, 1)[live],
                               atol=1e-5, rtol=1e-6)
    n_tiles = kernels.logits_stats(x, bias, targets, splits=10**6, **kw).shape[1]
    assert n_tiles > 1
    for k in (2, n_tiles, 10 * n_tiles):
        stats = kernels.logits_stats(x, bias, targets, splits=k, **kw)
        assert 1 < stats.shape[1] <= min(k, n_tiles)
        st = api.merge_stats(stats)
        for name in ("logprobs", "entropy"):
            got, want = getattr(st, name)()[live], getattr(st1, name)()[live]
            torch.testing.assert_close(got, want, atol=2e-6, rtol=2e-6, msg=lambda m: f"k={k} {name}: {m}")


@pytest.mark.parametrize("n_splits", [1, 2, 3, 7])
def test_merge_stats_exact_in_float64(n_splits):
    """Statistics of disjoint vocabulary chunks merge to the full row's lse, Σp·z and entropy, even when
    the chunks' maxima are ~1e4 apart."""
    N, V = 9, 101
    z = torch.randn(N, V, dtype=torch.float64) * 3
    z[:, : V // 2] -= 1e4 * (n_splits > 1)  # the first chunks sit far below the others
    targets = torch.randint(0, V, (N,))
    bounds = torch.linspace(0, V, n_splits + 1).round().long().tolist()
    st = api.merge_stats(_split_stats(z, targets, bounds))
    p = torch.softmax(z, 1)
    torch.testing.assert_close(st.shift + st.total.log(), torch.logsumexp(z, 1), atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(st.shift + st.ratio, (p * z).sum(1), atol=1e-9, rtol=1e-12)
    torch.testing.assert_close(st.entropy(), -(p * torch.log_softmax(z, 1)).sum(1), atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(st.logprobs(), torch.log_softmax(z, 1).gather(1, targets[:, None]).squeeze(1),
                               atol=1e-12, rtol=1e-12)


def test_api_splits_vocabulary_automatically(monkeypatch):
    """With few tokens the kernel path splits the vocabulary over programs, and the result is still exact."""
    seen = []
    original = kernels.logits_stats

    def spy(*args, **kwargs):
        stats = original(*args, **kwargs)
        seen.append(stats.shape[1])
        return stats

    monkeypatch.setattr(kernels, "logits_stats", spy)
    hidden, weight, bias, targets = _inputs(5, 4099, 32, torch.float32)
    check_against_reference(hidden, weight, bias, targets, "both", KERNEL_BACKEND)
    assert seen and seen[0] > 1


# --- determinism ----------------------------------------------------------------------------------------


def test_kernel_backend_deterministic():
    hidden, weight, bias, targets = _inputs(70, 1000, 40, torch.float32)
    targets[::9] = -100
    g = _upstream("both", (70,))
    first = run_api(hidden, weight, bias, targets, "both", g=g, backend=KERNEL_BACKEND)
    second = run_api(hidden, weight, bias, targets, "both", g=g, backend=KERNEL_BACKEND)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    for a, b in zip(first[2], second[2]):
        assert torch.equal(a, b)


# --- empty, single, V = 1 ---------------------------------------------------------------------------------


@pytest.mark.parametrize("lead", [(0,), (2, 0)])
@pytest.mark.parametrize("backend", ["torch", KERNEL_BACKEND, "reference"])
def test_empty_input(backend, lead):
    hidden, weight, bias, targets = _inputs(lead, 50, 8, torch.float32)
    lp, ent, (dh, dw, db) = run_api(hidden, weight, bias, targets, "both", backend=backend)
    assert lp.shape == lead and ent.shape == lead and lp.dtype == torch.float32
    assert dh.shape == hidden.shape and dw.shape == weight.shape and db.shape == bias.shape
    assert (dw == 0).all() and (db == 0).all()


@pytest.mark.parametrize("backend", BOTH_BACKENDS)
def test_vocabulary_of_one(backend):
    """V = 1: the only token has probability 1 — logprob 0, entropy 0, zero gradient, all exactly."""
    hidden, weight, bias, targets = _inputs((4, 3), 1, 16, _dtype_for(backend))
    lp, ent, grads = run_api(hidden, weight, bias, targets, "both", backend=backend, temperature=0.6,
                             softcap=3.0)
    for t in (lp, ent, *grads):
        assert (t == 0).all()


# --- logprobs_from_logits ---------------------------------------------------------------------------------


def run_logits_api(logits, targets, g, **kw):
    x = _leaf(logits)
    out = rlloss.logprobs_from_logits(x, targets, return_entropy=True, **kw)
    (dx,) = torch.autograd.grad(_loss(out.logprobs, out.entropy, *g), [x])
    return out.logprobs, out.entropy, dx


def run_logits_reference(logits, targets, g, temperature=1.0, ignore_index=-100):
    x = _leaf(logits.detach().double())
    lp, ent = reference.logprobs_from_logits(x / temperature, targets, ignore_index=ignore_index)
    (dx,) = torch.autograd.grad(_loss(lp, ent, *g), [x])
    return lp, ent, dx


def check_logits(logits, targets, mode, backend, out_tol=None, grad_tol=None, temperature=1.0,
                 ignore_index=-100, **kw):
    out_tol = out_tol if out_tol is not None else TOL[logits.dtype]
    grad_tol = grad_tol if grad_tol is not None else GRAD_TOL[logits.dtype]
    g = _upstream(mode, targets.shape)
    lp, ent, dx = run_logits_api(logits, targets, g, backend=backend, temperature=temperature,
                                 ignore_index=ignore_index, **kw)
    rlp, rent, rdx = run_logits_reference(logits, targets, g, temperature, ignore_index)
    assert lp.shape == targets.shape and ent.shape == targets.shape
    assert lp.dtype == (torch.float64 if logits.dtype == torch.float64 else torch.float32)
    assert dx.dtype == logits.dtype
    assert_out_close(lp, rlp, out_tol, "logprobs")
    assert_out_close(ent, rent, out_tol, "entropy")
    assert_grad_close(dx, rdx, grad_tol, "dlogits")
    return lp, ent, dx


@pytest.mark.parametrize("mode", GRAD_MODES)
@pytest.mark.parametrize("N", NS)
@pytest.mark.parametrize("V", VS)
def test_logits_torch_backend_float64(N, V, mode):
    logits = torch.randn(N, V, dtype=torch.float64, device=DEVICE) * 3
    targets = torch.randint(0, V, (N,), device=DEVICE)
    check_logits(logits, targets, mode, "torch", temperature=0.8)


@pytest.mark.parametrize("N,V", [(1, 1), (1, 1000), (1, 4099), (37, 1), (37, 1000), (37, 4099), (300, 1), (300, 1000)])
def test_logits_kernel_backend_float32(N, V):
    logits = torch.randn(N, V, device=DEVICE) * 3
    targets = torch.randint(0, V, (N,), device=DEVICE)
    check_logits(logits, targets, "both", KERNEL_BACKEND)


@pytest.mark.parametrize("mode", ["logprobs", "entropy"])
@pytest.mark.parametrize("temperature", [0.6, 1.7])
def test_logits_kernel_backend_modes_and_temperature(mode, temperature):
    logits = torch.randn(37, 1000, device=DEVICE) * 3
    targets = torch.randint(0, 1000, (37,), device=DEVICE)
    check_logits(logits, targets, mode, KERNEL_BACKEND, temperature=temperature)


@pytest.mark.parametrize("backend", ["torch", KERNEL_BACKEND])
def test_logits_float16(backend):
    logits = (torch.randn(37, 1000, device=DEVICE) * 3).half()
    targets = torch.randint(0, 1000, (37,), device=DEVICE)
    check_logits(logits, targets, "both", backend, out_tol=1e-5, grad_tol=2e-3)


@pytest.mark.parametrize("ignore_index", [-100, -1])
@pytest.mark.parametrize("backend", BOTH_BACKENDS)
def test_logits_ignored_rows_poisoned(backend, ignore_index):
    dtype = _dtype_for(backend)
    N, V = 40, 700
    logits = torch.randn(N, V, dtype=dtype, device=DEVICE) * 3
    targets = torch.randint(0, V, (N,), device=DEVICE)
    ignored = torch.zeros(N, dtype=torch.bool, device=DEVICE)
    ignored[torch.randperm(N, device=DEVICE)[:11]] = True
    targets[ignored] = ignore_index
    _poison(logits, ignored.nonzero().squeeze(1))
    g = _upstream("both", (N,))
    lp, ent, dx = run_logits_api(logits, targets, g, backend=backend, ignore_index=ignore_index)
    assert (lp[ignored] == 0).all() and (ent[ignored] == 0).all() and (dx[ignored] == 0).all()
    assert torch.isfinite(dx).all()
    keep = ~ignored
    rlp, rent, rdx = run_logits_reference(logits[keep], targets[keep], (g[0][keep], g[1][keep]))
    assert_out_close(lp[keep], rlp, TOL[dtype], "logprobs")
    assert_out_close(ent[keep], rent, TOL[dtype], "entropy")
    assert_grad_close(dx[keep], rdx, GRAD_TOL[dtype], "dlogits")


@pytest.mark.parametrize("layout", [None, "column_slice", "batch_transposed"])
@pytest.mark.parametrize("backend", BOTH_BACKENDS)
def test_logits_leading_dims_and_strides(backend, layout):
    dtype = _dtype_for(backend)
    logits = torch.randn(3, 5, 900, dtype=dtype, device=DEVICE) * 3
    if layout is not None:
        logits = _strided(logits, layout)
        assert not logits.is_contiguous()
    targets = torch.randint(0, 900, (3, 5), device=DEVICE)
    targets[2, 1] = -100
    lp, ent, dx = check_logits(logits, targets, "both", backend)
    assert lp.shape == (3, 5) and dx.shape == (3, 5, 900)


@pytest.mark.parametrize("lead", [(3, 4), (37,)])
@pytest.mark.parametrize("backend", BOTH_BACKENDS)
def test_logits_inplace_backward(backend, lead):
    """inplace_backward gives the gradient of the out-of-place path and writes it into the logits' buffer."""
    dtype = _dtype_for(backend)
    V = 600
    logits = torch.randn(*lead, V, dtype=dtype, device=DEVICE) * 3
    targets = torch.randint(0, V, lead, device=DEVICE)
    targets.view(-1)[1] = -100
    g = _upstream("both", lead)
    _, _, want = run_logits_api(logits, targets, g, backend=backend)
    x = logits.clone().requires_grad_()
    out = rlloss.logprobs_from_logits(x, targets, return_entropy=True, inplace_backward=True, backend=backend)
    torch.testing.assert_close(out.logprobs, run_logits_api(logits, targets, g, backend=backend)[0],
                               atol=0, rtol=0)
    _loss(out.logprobs, out.entropy, *g).backward()
    torch.testing.assert_close(x.grad, want, atol=0, rtol=0)
    torch.testing.assert_close(x.detach(), want, atol=0, rtol=0)  # the buffer now holds the gradient
    assert x.grad.data_ptr() == x.data_ptr()


def test_logits_inplace_backward_non_leaf():
    """In-place backward on logits produced by a matmul: upstream gradients are unchanged."""
    h = torch.randn(20, 16, dtype=torch.float64, requires_grad=True)
    w = torch.randn(300, 16, dtype=torch.float64)
    targets = torch.randint(0, 300, (20,))
    g = torch.randn(20, dtype=torch.float64)
    grads = []
    for inplace in (False, True):
        out = rlloss.logprobs_from_logits(h @ w.T, targets, inplace_backward=inplace, backend="torch")
        (grad,) = torch.autograd.grad((out.logprobs * g).sum(), [h])
        grads.append(grad)
    torch.testing.assert_close(grads[1], grads[0], atol=0, rtol=0)


@pytest.mark.parametrize("lead", [(0,), (2, 0)])
@pytest.mark.parametrize("backend", ["torch", KERNEL_BACKEND, "reference"])
def test_logits_empty(backend, lead):
    logits = torch.randn(*lead, 30, requires_grad=True, device=DEVICE)
    targets = torch.randint(0, 30, lead, device=DEVICE)
    out = rlloss.logprobs_from_logits(logits, targets, return_entropy=True, backend=backend)
    assert out.logprobs.shape == lead and out.entropy.shape == lead
    (out.logprobs.sum() + out.entropy.sum()).backward()
    assert logits.grad.shape == logits.shape


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # exp overflow in the interpreter's masked lanes
@pytest.mark.parametrize("backend", BOTH_BACKENDS)
def test_logits_vocabulary_of_one(backend):
    logits = torch.randn(6, 1, dtype=_dtype_for(backend), device=DEVICE) * 100
    lp, ent, dx = run_logits_api(logits, torch.zeros(6, dtype=torch.long, device=DEVICE), _upstream("both", (6,)),
                                 backend=backend, temperature=0.3)
    assert (lp == 0).all() and (ent == 0).all() and (dx == 0).all()


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("backend", BOTH_BACKENDS)
def test_logits_large_magnitude(backend):
    logits = torch.randn(20, 500, device=DEVICE) * 1e4
    logits[10:] = 1e4 + torch.randn(10, 500, device=DEVICE)  # large offset, real spread
    targets = torch.randint(0, 500, (20,), device=DEVICE)
    g = _upstream("both", (20,))
    lp, ent, dx = run_logits_api(logits, targets, g, backend=backend)
    rlp, rent, rdx = run_logits_reference(logits, targets, g)
    assert torch.isfinite(lp).all() and torch.isfinite(ent).all() and torch.isfinite(dx).all()
    assert (ent >= 0).all()
    ulp = logits.abs().max().item() * 2.0 ** -23
    torch.testing.assert_close(lp.double(), rlp, atol=8 * ulp, rtol=0)
    torch.testing.assert_close(ent.double(), rent, atol=8 * ulp, rtol=0)
    # p = exp(z − lse) with lse ≈ 1e4 known to ~1 float32 ulp on the offset rows
    assert_grad_close(dx, rdx, 2 * 1e4 * 2.0 ** -23, "dlogits")


# --- bad input ------------------------------------------------------------------------------------------


def _good(N=4, V=10, D=6, device="cpu"):
    return torch.randn(N, D, device=device), torch.randn(V, D, device=device), torch.randint(0, V, (N,), device=device)


@pytest.mark.parametrize(
    "change,exc,match",
    [
        (dict(weight=torch.randn(6)), ValueError, r"weight must be 2-D"),
        (dict(weight=torch.randn(2, 10, 6)), ValueError, r"weight must be 2-D"),
        (dict(hidden=torch.tensor(1.0)), ValueError, r"hidden must be \[\.\.\., D\]"),
        (dict(hidden=torch.randn(4, 5)), ValueError, r"hidden's last dim must equal weight's D = 6"),
        (dict(weight=torch.randn(0, 6)), ValueError, r"weight must have at least one vocabulary row"),
        (dict(targets=torch.tensor([0, 1, -5, 2])), ValueError, r"targets must lie in \[0, 10\).*-5"),
        (dict(targets=torch.tensor([0, 10, 2, 3])), ValueError, r"targets must lie in \[0, 10\).*10"),
        (dict(targets=torch.randint(0, 10, (4, 1))), ValueError, r"targets must have hidden's leading shape"),
        (dict(targets=torch.zeros(4)), TypeError, r"targets must be int64.*float32"),
        (dict(targets=torch.zeros(4, dtype=torch.int32)), TypeError, r"targets must be int64.*int32"),
        (dict(targets=[0, 1, 2, 3]), TypeError, r"targets must be a torch.Tensor"),
        (dict(hidden="h"), TypeError, r"hidden must be a torch.Tensor"),
        (dict(weight=torch.randn(10, 6, dtype=torch.float64)), TypeError, r"weight must have hidden's dtype"),
        (dict(hidden=torch.randint(0, 3, (4, 6))), TypeError, r"hidden must have dtype"),
        (dict(weight=torch.randn(10, 6, device="meta")), ValueError, r"one device.*weight on meta"),
        (dict(targets=torch.zeros(4, dtype=torch.long, device="meta")), ValueError, r"one device.*targets on meta"),
        (dict(bias=torch.randn(10, device="meta")), ValueError, r"one device.*bias on meta"),
        (dict(bias=torch.randn(11)), ValueError, r"bias must be \[V\] with V = 10"),
        (dict(bias=torch.randn(1, 10)), ValueError, r"bias must be 1-D"),
        (dict(bias=torch.zeros(10, dtype=torch.long)), TypeError, r"bias must have dtype"),
        (dict(temperature=0.0), ValueError, r"temperature must be a finite number > 0"),
        (dict(temperature=-1.0), ValueError, r"temperature"),
        (dict(temperature=float("inf")), ValueError, r"temperature"),
        (dict(temperature=float("nan")), ValueError, r"temperature"),
        (dict(temperature="1"), TypeError, r"temperature must be a float"),
        (dict(softcap=0.0), ValueError, r"softcap must be a finite number > 0"),
        (dict(softcap=-3.0), ValueError, r"softcap"),
        (dict(softcap=float("inf")), ValueError, r"softcap"),
        (dict(softcap=float("nan")), ValueError, r"softcap"),
        (dict(ignore_index=1.5), TypeError, r"ignore_index must be an int"),
        (dict(backend="cuda"), ValueError, r"backend='cuda' is not a backend"),
        (dict(backend="Torch"), ValueError, r"backend='Torch' is not a backend"),
        pytest.param(dict(backend="triton"), ValueError, r"backend='triton' needs CUDA tensors",
                     marks=pytest.mark.skipif(INTERPRETED, reason="interpreted kernels run CPU tensors")),
    ],
    ids=lambda x: None if not isinstance(x, dict) else "-".join(f"{k}" for k in x),
)
def test_token_logprobs_bad_input(change, exc, match):
    hidden, weight, targets = _good()
    kw = dict(hidden=hidden, weight=weight, targets=targets)
    kw.update(change)
    with pytest.raises(exc, match=match):
        rlloss.token_logprobs(kw.pop("hidden"), kw.pop("weight"), kw.pop("targets"), **kw)


def test_kernel_backend_rejects_float64():
    hidden, weight, targets = _good(device=DEVICE)
    with pytest.raises(TypeError, match=r"hidden must have dtype in \(float16, bfloat16, float32\).*float64"):
        rlloss.token_logprobs(hidden.double(), weight.double(), targets, backend=KERNEL_BACKEND)
    with pytest.raises(TypeError, match=r"logits must have dtype in \(float16, bfloat16, float32\).*float64"):
        rlloss.logprobs_from_logits(torch.randn(4, 10, dtype=torch.float64, device=DEVICE), targets,
                                    backend=KERNEL_BACKEND)


@pytest.mark.parametrize(
    "change,exc,match",
    [
        (dict(logits=torch.tensor(1.0)), ValueError, r"logits must be \[\.\.\., V\]"),
        (dict(logits=torch.randn(4, 0)), ValueError, r"logits must have a vocabulary dimension of at least 1"),
        (dict(logits=torch.randint(0, 3, (4, 10))), TypeError, r"logits must have dtype"),
        (dict(targets=torch.tensor([0, 1, -2, 3])), ValueError, r"targets must lie in \[0, 10\)"),
        (dict(targets=torch.tensor([0, 1, 2, 12])), ValueError, r"targets must lie in \[0, 10\)"),
        (dict(targets=torch.randint(0, 10, (5,))), ValueError, r"targets must have logits's leading shape"),
        (dict(targets=torch.zeros(4, dtype=torch.float64)), TypeError, r"targets must be int64"),
        (dict(targets=torch.zeros(4, dtype=torch.int32)), TypeError, r"targets must be int64"),
        (dict(targets=torch.zeros(4, dtype=torch.long, device="meta")), ValueError, r"targets on meta"),
        (dict(temperature=0), ValueError, r"temperature"),
        (dict(temperature=float("-inf")), ValueError, r"temperature"),
        (dict(ignore_index=None), TypeError, r"ignore_index"),
        (dict(backend="interpreter"), ValueError, r"backend='interpreter' is not a backend"),
        pytest.param(dict(backend="triton"), ValueError, r"backend='triton' needs CUDA tensors",
                     marks=pytest.mark.skipif(INTERPRETED, reason="interpreted kernels run CPU tensors")),
    ],
    ids=lambda x: None if not isinstance(x, dict) else "-".join(f"{k}" for k in x),
)
def test_logprobs_from_logits_bad_input(change, exc, match):
    kw = dict(logits=torch.randn(4, 10), targets=torch.randint(0, 10, (4,)))
    kw.update(change)
    with pytest.raises(exc, match=match):
        rlloss.logprobs_from_logits(kw.pop("logits"), kw.pop("targets"), **kw)


def _spy(monkeypatch, module, name, calls):
    original = getattr(module, name)

    def wrapper(*args, **kwargs):
        calls.append(name)
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, wrapper)


@pytest.mark.parametrize("env", ["torch", "reference", KERNEL_BACKEND])
def test_env_var_forces_backend(monkeypatch, env):
    calls = []
    _spy(monkeypatch, api, "_torch_stats", calls)
    _spy(monkeypatch, reference, "token_logprobs", calls)
    _spy(monkeypatch, kernels, "logits_stats", calls)
    monkeypatch.setenv("RLLOSS_BACKEND", env)
    hidden, weight, targets = _good(device=DEVICE)
    rlloss.token_logprobs(hidden, weight, targets)
    expected = {"torch": "_torch_stats", "reference": "token_logprobs"}.get(env, "logits_stats")
    assert calls == [expected]
    # An explicit argument beats the environment variable.
    calls.clear()
    rlloss.token_logprobs(hidden, weight, targets, backend="torch" if env != "torch" else "reference")
    assert calls == ["_torch_stats" if env != "torch" else "token_logprobs"]


@pytest.mark.parametrize("value,match", [
    ("bogus", r"RLLOSS_BACKEND='bogus' is not a backend"),
    pytest.param("triton", r"RLLOSS_BACKEND='triton' needs CUDA tensors",
                 marks=pytest.mark.skipif(INTERPRETED, reason="interpreted kernels run CPU tensors")),
])
def test_env_var_invalid(monkeypatch, value, match):
    monkeypatch.setenv("RLLOSS_BACKEND", value)
    hidden, weight, targets = _good()
    with pytest.raises(ValueError, match=match):
        rlloss.token_logprobs(hidden, weight, targets)
    with pytest.raises(ValueError, match=match):
        rlloss.logprobs_from_logits(torch.randn(4, 10), targets)
    # an explicit backend argument is used instead of the bad environment value
    out = rlloss.token_logprobs(hidden, weight, targets, backend="torch")
    assert torch.isfinite(out.logprobs).all()


# --- property tests -------------------------------------------------------------------------------------


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    data=st.data(),
    n=st.integers(0, 12),
    v=st.integers(1, 40),
    d=st.integers(1, 12),
    seed=st.integers(0, 2**31 - 1),
    temperature=st.floats(0.25, 4.0),
    softcap=st.one_of(st.none(), st.floats(0.5, 20.0)),
    use_bias=st.booleans(),
    mode=st.sampled_from(GRAD_MODES),
    ignore_index=st.sampled_from([-100, -1]),
)
def test_property_torch_backend_vs_reference(data, n, v, d, seed, temperature, softcap, use_bias, mode, ignore_index):
    mask = data.draw(st.lists(st.booleans(), min_size=n, max_size=n), label="ignored")
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, d, generator=gen, dtype=torch.float64)
    weight = torch.randn(v, d, generator=gen, dtype=torch.float64) * 2
    bias = torch.randn(v, generator=gen, dtype=torch.float64) if use_bias else None
    targets = torch.randint(0, v, (n,), generator=gen)
    ignored = torch.tensor(mask, dtype=torch.bool)
    targets[ignored] = ignore_index
    hidden[ignored] = float("nan")
    g = (torch.randn(n, generator=gen, dtype=torch.float64) if mode != "entropy" else None,
         torch.randn(n, generator=gen, dtype=torch.float64) if mode != "logprobs" else None)
    kw = dict(temperature=temperature, softcap=softcap, ignore_index=ignore_index)
    lp, ent, grads = run_api(hidden, weight, bias, targets, mode, g=g, backend="torch", **kw)
    rlp, rent, rgrads = run_reference(hidden, weight, bias, targets, g, **kw)
    assert_out_close(lp, rlp, 1e-10, "logprobs")
    assert_out_close(ent, rent, 1e-10, "entropy")
    assert (lp[ignored] == 0).all() and (ent[ignored] == 0).all() and (ent >= 0).all()
    for name, got, want in zip(("dhidden", "dweight", "dbias"), grads, rgrads):
        if want is not None:
            assert_grad_close(got, want, 1e-10, name)
    assert (grads[0][ignored] == 0).all()


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    data=st.data(),
    n=st.integers(0, 10),
    v=st.integers(1, 60),
    seed=st.integers(0, 2**31 - 1),
    temperature=st.floats(0.25, 4.0),
    mode=st.sampled_from(GRAD_MODES),
)
def test_property_logits_torch_backend_vs_reference(data, n, v, seed, temperature, mode):
    mask = data.draw(st.lists(st.booleans(), min_size=n, max_size=n), label="ignored")
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, v, generator=gen, dtype=torch.float64) * 4
    targets = torch.randint(0, v, (n,), generator=gen)
    ignored = torch.tensor(mask, dtype=torch.bool)
    targets[ignored] = -100
    logits[ignored] = float("inf")
    g = (torch.randn(n, generator=gen, dtype=torch.float64) if mode != "entropy" else None,
         torch.randn(n, generator=gen, dtype=torch.float64) if mode != "logprobs" else None)
    lp, ent, dx = run_logits_api(logits, targets, g, backend="torch", temperature=temperature)
    rlp, rent, rdx = run_logits_reference(logits, targets, g, temperature)
    assert_out_close(lp, rlp, 1e-10, "logprobs")
    assert_out_close(ent, rent, 1e-10, "entropy")
    assert_grad_close(dx, rdx, 1e-10, "dlogits")
    assert (dx[ignored] == 0).all()


# --- GPU, realistic sizes -------------------------------------------------------------------------------


def _chunked_reference(hidden, weight, targets, g_logp, g_ent, chunk):
    """float64 oracle over row chunks (bounded memory): logprobs, entropy, dhidden, dweight."""
    w64 = _leaf(weight.double())
    lps, ents, dhs = [], [], []
    for s in range(0, hidden.shape[0], chunk):
        h64 = _leaf(hidden[s:s + chunk].double())
        lp, ent = reference.token_logprobs(h64, w64, targets[s:s + chunk])
        _loss(lp, ent, g_logp[s:s + chunk], g_ent[s:s + chunk]).backward()
        lps.append(lp.detach())
        ents.append(ent.detach())
        dhs.append(h64.grad)
    return torch.cat(lps), torch.cat(ents), torch.cat(dhs), w64.grad


def _relative_error(got, want):
    return ((got.double() - want).norm() / want.norm()).item()


def check_realistic(N, D, V, dtype, backend, device, chunk=512):
    hidden, weight, _, targets = _inputs(N, V, D, dtype, bias=False, device=device)
    targets[::17] = -100
    g_logp, g_ent = _upstream("both", (N,), device)
    h, w = _leaf(hidden), _leaf(weight)
    out = rlloss.token_logprobs(h, w, targets, return_entropy=True, backend=backend)
    _loss(out.logprobs, out.entropy, g_logp, g_ent).backward()
    rlp, rent, rdh, rdw = _chunked_reference(hidden, weight, targets, g_logp, g_ent, chunk)
    for t in (out.logprobs, out.entropy, h.grad, w.grad):
        assert torch.isfinite(t).all()
    atol = 2e-3 if dtype == torch.bfloat16 else 1e-5
    torch.testing.assert_close(out.logprobs.double(), rlp, atol=atol, rtol=atol)
    torch.testing.assert_close(out.entropy.double(), rent, atol=atol, rtol=atol)
    grad_tol = 1e-2 if dtype == torch.bfloat16 else 1e-4
    assert _relative_error(h.grad, rdh) < grad_tol
    assert _relative_error(w.grad, rdw) < grad_tol


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_realistic_check_runs_on_cpu_small(dtype):
    """The GPU check below, at a small size on the torch backend (keeps its code exercised without CUDA)."""
    check_realistic(96, 64, 1500, dtype, "torch", "cpu", chunk=40)


@pytest.mark.gpu
@pytest.mark.parametrize("D,V", [(1024, 32000), (4096, 131072)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gpu_realistic(dtype, D, V):
    check_realistic(4096, D, V, dtype, "triton", "cuda")
    torch.cuda.empty_cache()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gpu_logits_realistic(dtype):
    N, V = 4096, 32000
    logits = (torch.randn(N, V, device="cuda") * 3).to(dtype)
    targets = torch.randint(0, V, (N,), device="cuda")
    targets[::13] = -100
    g = _upstream("both", (N,), "cuda")
    lp, ent, dx = run_logits_api(logits, targets, g, backend="triton", temperature=0.9)
    chunk = 512
    for s in range(0, N, chunk):
        rows = slice(s, s + chunk)
        rlp, rent, rdx = run_logits_reference(logits[rows], targets[rows], (g[0][rows], g[1][rows]), 0.9)
        atol = 2e-3 if dtype == torch.bfloat16 else 1e-5
        torch.testing.assert_close(lp[rows].double(), rlp, atol=atol, rtol=atol)
        torch.testing.assert_close(ent[rows].double(), rent, atol=atol, rtol=atol)
        assert _relative_error(dx[rows], rdx) < (1e-2 if dtype == torch.bfloat16 else 5e-5)


@pytest.mark.gpu
def test_gpu_logits_past_int32_offsets():
    """N×V > 2³¹ elements: rows at the end of the buffer need 64-bit offsets (≈4.5 GB of bfloat16 logits)."""
    N, V = 17000, 131072
    assert N * V > 2**31
    logits = torch.randn(N, V, device="cuda", dtype=torch.bfloat16)
    targets = torch.randint(0, V, (N,), device="cuda")
    g = _upstream("both", (N,), "cuda")
    x = logits.requires_grad_()
    out = rlloss.logprobs_from_logits(x, targets, return_entropy=True, inplace_backward=True, backend="triton")
    lp, ent = out.logprobs.detach().clone(), out.entropy.detach().clone()
    ref_rows = [slice(0, 64), slice(N - 64, N)]
    refs = [run_logits_reference(logits[r].detach(), targets[r], (g[0][r], g[1][r])) for r in ref_rows]
    _loss(out.logprobs, out.entropy, *g).backward()  # overwrites the logits with their gradient
    for r, (rlp, rent, rdx) in zip(ref_rows, refs):
        torch.testing.assert_close(lp[r].double(), rlp, atol=2e-3, rtol=2e-3)
        torch.testing.assert_close(ent[r].double(), rent, atol=2e-3, rtol=2e-3)
        assert _relative_error(x.grad[r], rdx) < 1e-2


@pytest.mark.gpu
def test_gpu_deterministic_realistic():
    hidden, weight, _, targets = _inputs(4096, 32000, 1024, torch.bfloat16, bias=False, device="cuda")
    g = _upstream("both", (4096,), "cuda")
    first = run_api(hidden, weight, None, targets, "both", g=g, backend="triton")
    second = run_api(hidden, weight, None, targets, "both", g=g, backend="triton")
    for a, b in zip(first[2][:2], second[2][:2]):
        assert torch.equal(a, b)


def test_forward_only_token_logprobs_builds_no_graph():
    """Teacher / old-policy passes: without inputs that need a gradient, no autograd node is built."""
    hidden, weight = torch.randn(5, 8), torch.randn(20, 8)
    targets = torch.randint(0, 20, (5,))
    out = rlloss.token_logprobs(hidden, weight, targets, return_entropy=True, backend="torch")
    assert out.logprobs.grad_fn is None and out.entropy.grad_fn is None
    with torch.no_grad():
        out_ng = rlloss.token_logprobs(hidden.requires_grad_(), weight, targets, backend="torch")
    assert out_ng.logprobs.grad_fn is None
    torch.testing.assert_close(out_ng.logprobs, out.logprobs)
    with_graph = rlloss.token_logprobs(hidden, weight, targets, backend="torch")
    assert with_graph.logprobs.grad_fn is not None


def test_zero_hidden_size_is_rejected():
    with pytest.raises(ValueError, match="hidden size D of at least 1, got D = 0"):
        rlloss.token_logprobs(torch.randn(3, 0), torch.randn(5, 0), torch.randint(0, 5, (3,)), backend="torch")
