"""Every Triton kernel compiles for an H100 (sm_90), not only runs under the interpreter.

The kernel tests run through TRITON_INTERPRET=1, which lets through what the compiler rejects (loop-carried
values changing type, constexpr misuse, tl.dot shapes, unsupported ops). tests/compile_kernels.py compiles
the launchers' constexpr variants and CUDA block configs with the real compiler, no GPU needed; it runs in a
subprocess because kernels are decorated as interpreter objects in this process. The test compiles the
--quick covering subset to PTX (the whole Triton lowering; ptxas, which only adds the cubin, is skipped for
time); run the script by hand for every variant down to cubin with register and spill reports.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).with_name("compile_kernels.py")
ROOT = SCRIPT.parent.parent


def _nvidia_backend_missing():
    """Why this Triton build cannot compile for NVIDIA GPUs, or None when it can."""
    try:
        from triton.backends import backends
    except Exception as e:  # noqa: BLE001
        return f"triton.backends cannot be imported: {e!r}"
    if "nvidia" not in backends:
        return f"this Triton build has no NVIDIA backend (backends: {sorted(backends)})"
    try:  # even PTX needs ptxas: its version is part of the compile cache key
        from triton.backends.nvidia.compiler import get_ptxas

        try:
            ptxas = get_ptxas(90).path
        except TypeError:  # releases whose get_ptxas takes no arch
            ptxas = get_ptxas().path
    except Exception as e:  # noqa: BLE001
        return f"the NVIDIA backend's ptxas is not available: {e!r}"
    if not ptxas or not os.path.exists(ptxas):
        return f"the NVIDIA backend's ptxas is not available ({ptxas!r})"
    return None


def test_every_kernel_compiles_for_sm90():
    reason = _nvidia_backend_missing()
    if reason is not None:
        pytest.skip(reason)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    jobs = str(max(1, min(8, os.cpu_count() or 1)))
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--ptx-only", "--jobs", jobs],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"compile_kernels.py failed (exit {proc.returncode}):\n{output}"
    assert " compiled in " in proc.stdout, output
