"""Without Triton (no wheel for the platform), ``import rlloss`` works and the torch backend runs: the mode tables
live in the Triton-free ``rlloss.kernels.tables`` and ``rlloss.kernels`` loads its op modules on first use."""
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent("""
    import sys
    sys.modules["triton"] = None  # `import triton` raises ImportError
    import torch
    import rlloss
    from rlloss import LossConfig, _backend
    from rlloss.kernels import tables
    assert _backend.triton_import_error() is not None
    assert _backend.resolve_backend(None, torch.device("cuda")) == "torch"
    lp = torch.randn(3, 7, requires_grad=True)
    out = rlloss.policy_loss(lp, lp.detach() + 0.01, torch.randn(3), torch.ones(3, 7, dtype=torch.bool),
                             config=LossConfig.preset("verl_grpo"), ref_logprobs=lp.detach() + 0.5)
    out.loss.backward()
    assert torch.isfinite(lp.grad).all() and len(out.metrics) > 0
    assert rlloss.config.LOSS_MODES is tables.LOSS_MODES
    print("ok")
""")


def test_import_and_torch_backend_without_triton():
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stdout + proc.stderr
