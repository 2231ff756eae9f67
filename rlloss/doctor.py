"""``python -m rlloss.doctor``: what this machine has, and whether rlloss computes the right numbers here.

Prints an environment report (Python, torch, Triton, transformers, the GPU and its driver, the backend each
op will use) and then runs every op once on this machine against the float64 reference, printing the error
it measured next to the tolerance it must meet. Exits with status 1 when any check fails, so it can gate a
job on a new cluster.
"""
from __future__ import annotations

import argparse
import importlib
import os
import platform
import sys
import traceback
from dataclasses import dataclass
from typing import Callable, List, Optional

import torch

from . import reference
from ._backend import (BACKENDS, DEPRECATED_ALIASES, ENV_VAR, TORCH, TRITON, is_reference, is_torch,
                       kernels_interpreted, uses_kernels, resolve_backend, triton_import_error)


@dataclass
class CheckResult:
    name: str
    backend: str
    error: Optional[float]
    tolerance: float
    note: str = ""

    @property
    def passed(self) -> bool:
        return self.error is not None and self.error <= self.tolerance


def _version(module: str) -> str:
    try:
        return importlib.import_module(module).__version__
    except Exception as exc:  # absent or broken: say which
        return f"not available ({type(exc).__name__})"


def environment_report(device: torch.device) -> List[str]:
    """Lines describing this machine and the backend each op will use on ``device``."""
    lines = [
        f"python        {sys.version.split()[0]} ({platform.platform()})",
        f"torch         {torch.__version__} (CUDA build: {torch.version.cuda or 'none'})",
        f"triton        {_version('triton')}",
        f"transformers  {_version('transformers')}",
        f"rlloss        {_version('rlloss')}",
    ]
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(device)
        driver = getattr(torch._C, "_cuda_getDriverVersion", lambda: None)()
        lines.append(f"GPU           {props.name}, {props.total_memory / 2**30:.0f} GiB, "
                     f"compute capability {props.major}.{props.minor}, {props.multi_processor_count} SMs"
                     + (f", driver API {driver}" if driver else ""))
    else:
        lines.append("GPU           none (CUDA not available)")
    err = triton_import_error()
    interpreted = err is None and kernels_interpreted()
    note = "; built for Triton's interpreter (TRITON_INTERPRET=1): triton runs CPU tensors" if interpreted else ""
    lines.append(f"kernels       {'importable' if err is None else 'unavailable: ' + err}{note}")
    forced = os.environ.get(ENV_VAR)
    try:
        chosen = resolve_backend(None, device)
    except (ValueError, RuntimeError) as exc:
        chosen = f"unusable ({exc})"
    lines.append(f"backend       {chosen} for tensors on {device}"
                 + (f" (forced by {ENV_VAR}={forced})" if forced else " (automatic)"))
    return lines


# --- self-test ----------------------------------------------------------------------------------------


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.detach().double(), want.detach().double()
    return float((got - want).abs().max() / want.abs().max().clamp(min=1e-30))


def _error(ours: Callable, theirs: Callable, inputs, grads=None) -> float:
    """The worst :func:`_rel` of the outputs of ``ours`` (on ``inputs``) against ``theirs`` (on float64 copies)
    and of the inputs' gradients for upstream gradients ``grads`` (default ones)."""
    leaves = [x.clone().requires_grad_() for x in inputs]
    leaves64 = [x.double().requires_grad_() for x in inputs]
    got, want = ours(*leaves), theirs(*leaves64)
    grads = grads or [torch.ones_like(w) for w in want]
    torch.autograd.backward(got, [g.to(x) for g, x in zip(grads, got)])
    torch.autograd.backward(want, [g.double() for g in grads])
    return max([_rel(a, b) for a, b in zip(got, want)] + [_rel(a.grad, b.grad) for a, b in zip(leaves, leaves64)])


def _check_token_logprobs(device, backend, dtype):
    from .logprobs import token_logprobs

    g = torch.Generator(device="cpu").manual_seed(0)
    n, d, v = 257, 64, 5003
    hidden = torch.randn(n, d, generator=g).to(device, dtype)
    weight = (0.1 * torch.randn(v, d, generator=g)).to(device, dtype)
    targets = torch.randint(0, v, (n,), generator=g).to(device)
    targets[::7] = -100
    grads = [torch.randn(n, generator=g).to(device) for _ in range(2)]
    return _error(lambda h, w: token_logprobs(h, w, targets, return_entropy=True, backend=backend),
                  lambda h, w: reference.token_logprobs(h, w, targets), (hidden, weight), grads)


def _check_logits(device, backend, dtype):
    from .logprobs import logprobs_from_logits

    g = torch.Generator(device="cpu").manual_seed(1)
    logits = (3 * torch.randn(129, 3001, generator=g)).to(device, dtype)
    targets = torch.randint(0, 3001, (129,), generator=g).to(device)
    return _error(lambda z: logprobs_from_logits(z, targets, return_entropy=True, temperature=0.8, backend=backend),
                  lambda z: reference.logprobs_from_logits(z / 0.8, targets), (logits,))


def _check_advantages(device, backend, dtype):
    from .advantages import ADVANTAGE_MODES, default_eps, group_advantages

    g = torch.Generator(device="cpu").manual_seed(2)
    sizes = [1, 5, 16, 3, 70]
    rewards = torch.randn(sum(sizes), generator=g).round(decimals=1).to(device, dtype)
    worst = 0.0
    for mode in ADVANTAGE_MODES:
        got = group_advantages(rewards, group_sizes=sizes, mode=mode, backend=backend)
        want = reference.group_advantages(rewards.double(), sizes, mode=mode, eps=default_eps(mode))
        worst = max(worst, float((got.double() - want).abs().max()))
    return worst


def _policy_batch(device, dtype, seed):
    g = torch.Generator(device="cpu").manual_seed(seed)
    b, t = 4, 77
    mask = torch.rand(b, t, generator=g) > 0.2
    make = lambda: (torch.randn(b, t, generator=g) * 0.3 - 2.0).to(device, dtype)  # noqa: E731
    return dict(mask=mask.to(device), old=make(), ref=make(), adv=torch.randn(b, generator=g).to(device, dtype))


def _check_policy(device, backend, dtype):
    from .config import LossConfig
    from .policy import policy_loss

    worst = 0.0
    for preset in ("dapo", "gspo", "grpo"):
        config = LossConfig.preset(preset, beta=0.04, entropy_coef=0.01)
        batch = _policy_batch(device, dtype, seed=3)
        logprobs = (batch["old"] + 0.1 * torch.randn_like(batch["old"])).detach()
        old, adv, mask, ref = batch["old"], batch["adv"], batch["mask"], batch["ref"]
        worst = max(worst, _error(
            lambda lp, ent: [policy_loss(lp, old, adv, mask, config=config, ref_logprobs=ref, entropy=ent,
                                         backend=backend).loss],
            lambda lp, ent: reference.policy_loss(lp, old.double(), adv.double(), mask, config=config,
                                                  ref_logprobs=ref.double(), entropy=ent)[:1],
            (logprobs, torch.rand_like(logprobs))))
    return worst


def _check_fused_policy(device, backend, dtype):
    from .config import LossConfig
    from .policy import FusedPolicyLoss

    g = torch.Generator(device="cpu").manual_seed(4)
    b, t, d, v = 3, 45, 64, 2001
    hidden = torch.randn(b, t, d, generator=g).to(device, dtype)
    weight = (0.1 * torch.randn(v, d, generator=g)).to(device, dtype)
    targets = torch.randint(0, v, (b, t), generator=g).to(device)
    batch = _policy_batch(device, torch.float32, seed=4)
    mask = batch["mask"][:b, :t]
    adv, old = batch["adv"][:b], batch["old"][:b, :t] - 5.0
    config = LossConfig.preset("dapo", entropy_coef=0.01)

    def theirs(h, w):
        lp, ent = reference.token_logprobs(h, w, torch.where(mask, targets, -100))
        return reference.policy_loss(lp, old.double(), adv.double(), mask, config=config, entropy=ent)[:1]

    return _error(lambda h, w: [FusedPolicyLoss(config, backend=backend)(h, w, targets, mask, adv,
                                                                         old_logprobs=old).loss],
                  theirs, (hidden, weight))


def _check_prefix_attention(device, backend, dtype):
    from .prefix_attention import SharedPrefixLayout, shared_prefix_attention

    layout = SharedPrefixLayout.from_groups([19, 1], [[5, 1, 12], [7, 3]], device=device)
    g = torch.Generator(device="cpu").manual_seed(5)
    T, hq, hkv, d = layout.total_tokens, 4, 2, 64
    q, k, v = (torch.randn(T, h, d, generator=g).to(device, dtype) for h in (hq, hkv, hkv))
    grad_out = torch.randn(T, hq, d, generator=g).to(device)
    return _error(lambda *qkv: [shared_prefix_attention(*qkv, layout, backend=backend)],
                  lambda *qkv: [reference.shared_prefix_attention(*qkv, layout.dense_mask(), scale=d ** -0.5)],
                  (q, k, v), [grad_out])


# (name, check, tolerance for float32 inputs)
CHECKS: List[tuple] = [
    ("token_logprobs (fwd + bwd)", _check_token_logprobs, 1e-4),
    ("logprobs_from_logits (fwd + bwd)", _check_logits, 1e-4),
    ("group_advantages (every mode)", _check_advantages, 1e-4),
    ("policy_loss (dapo, gspo, grpo + KL + entropy)", _check_policy, 1e-4),
    ("FusedPolicyLoss (fwd + bwd)", _check_fused_policy, 1e-4),
    ("shared_prefix_attention (fwd + bwd)", _check_prefix_attention, 1e-4),
]


def self_test(device: torch.device, backends: List[str]) -> List[CheckResult]:
    """Run every check on every backend in ``backends`` with float32 inputs on ``device``."""
    results = []
    for backend in backends:
        for name, check, tolerance in CHECKS:
            try:
                error = check(device, backend, torch.float32)
                results.append(CheckResult(name, backend, error, tolerance))
            except Exception as exc:  # a crash is a failed check, reported with its cause
                note = f"{type(exc).__name__}: {exc}".splitlines()[0][:160]
                if os.environ.get("RLLOSS_DOCTOR_TRACEBACK"):
                    traceback.print_exc()
                results.append(CheckResult(name, backend, None, tolerance, note))
    return results


def _default_backends(device: torch.device) -> List[str]:
    backends = [resolve_backend(None, device)]
    if device.type == "cpu" and not uses_kernels(backends[0]) and triton_import_error() is None \
            and kernels_interpreted():
        backends.append(TRITON)  # the kernels under Triton's interpreter
    if device.type == "cuda" and not is_torch(backends[0]):
        backends.append(TORCH)
    return backends


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rlloss.doctor", description=__doc__.splitlines()[0])
    choices = [b for b in BACKENDS if not is_reference(b)] + list(DEPRECATED_ALIASES)  # reference: the yardstick
    parser.add_argument("--backend", action="append", choices=choices,
                        help="backend(s) to self-test (default: the automatic one, plus torch on CUDA and "
                             "triton on CPU when TRITON_INTERPRET=1 built the kernels for the interpreter)")
    parser.add_argument("--device", default=None, help="device to test on (default: cuda if available)")
    parser.add_argument("--no-self-test", action="store_true", help="print the environment report only")
    args = parser.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))

    print("rlloss doctor — environment")
    for line in environment_report(device):
        print("  " + line)
    if args.no_self_test:
        return 0
    backends = args.backend or _default_backends(device)
    print(f"\nself-test on {device}, float32 inputs against the float64 reference (backends: {', '.join(backends)})")
    results = self_test(device, backends)
    width = max(len(r.name) for r in results)
    for r in results:
        status = "PASS" if r.passed else "FAIL"
        measured = f"error {r.error:.2e}" if r.error is not None else r.note
        print(f"  {status}  {r.backend:<9} {r.name:<{width}}  {measured} (tolerance {r.tolerance:.0e})")
    failed = [r for r in results if not r.passed]
    print(f"\n{len(results) - len(failed)} passed, {len(failed)} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
