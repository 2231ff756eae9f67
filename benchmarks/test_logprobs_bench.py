"""pytest-benchmark view of the ``logprobs`` suite: ``pytest benchmarks/ --benchmark-only [--quick]``.

Times the same forward + backward cases as ``python -m benchmarks`` (CPU default or quick sizes on a CPU, the
smallest GPU shape on CUDA) with the ``benchmark`` fixture; memory and accuracy stay with the main command.
The last test is no benchmark: it runs the GPU comparison's code path on CPU stand-ins (skipped under
``--benchmark-only``).
"""
import pytest
import torch

from benchmarks import _harness as harness
from benchmarks import logprobs

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Timed rounds per case (each a full forward + backward, about a second on a small CPU).
ROUNDS = 3


def pytest_generate_tests(metafunc):
    if "bench_case" in metafunc.fixturenames:
        cases = logprobs.bench_cases(DEVICE, metafunc.config.getoption("--quick"))
        metafunc.parametrize("bench_case", cases, ids=[case.id for case in cases])


def test_logprobs_fwd_bwd(benchmark, bench_case):
    reason = bench_case.impl.unavailable()
    if reason is not None:
        pytest.skip(reason)
    benchmark.extra_info.update(impl=bench_case.impl.name, dtype=str(bench_case.dtype), device=bench_case.device,
                                **vars(bench_case.shape))
    benchmark.pedantic(logprobs.bench_step(bench_case), rounds=ROUNDS, warmup_rounds=0, iterations=1)


def test_gpu_comparison_path_on_cpu_stand_ins():
    """``compare_implementations`` end to end at tiny sizes, with CPU timing and no memory probe."""
    probes = harness.cpu_probes(0, 1)

    def broken_forward(hidden, weight, targets):
        raise NotImplementedError("this peer does not support reduction='none'")

    def logprobs_only(hidden, weight, targets):
        return logprobs.naive_logprobs(hidden, weight, targets)[0], None

    impls = [
        logprobs.rlloss_implementation("torch"),
        logprobs.naive_implementation(torch.float32),
        logprobs.Implementation("broken", "peer", "raises", lambda: broken_forward),
        logprobs.Implementation("nll-only", "peer", "log-probs only", lambda: logprobs_only, has_entropy=False,
                                nll_sum_backward=True),
    ]
    shapes = [logprobs.Shape(N=33, D=16, V=300), logprobs.Shape(N=70, D=8, V=129)]
    lines = []
    records = logprobs.compare_implementations(shapes, torch.float32, "cpu", impls, probes, lines.append,
                                               matmul_tflops=1.0, floor_gemms=harness.LOGPROBS_FLOOR_GEMMS)
    assert [r["impl"] for r in records[:5]] == ["gemm-floor", "rlloss-torch", "naive", "broken", "nll-only"]
    assert [r["status"] for r in records] == ["ok", "ok", "ok", "error", "ok"] * 2 and len(lines) == 10
    floors = [r for r in records if r["impl"] == "gemm-floor"]
    assert all(r["gemms"] == list(harness.LOGPROBS_FLOOR_GEMMS) and r["time_vs_gemm_floor"] == 1.0 for r in floors)
    assert all(set(r["gemm_times_ms"]) == {"h·Wᵀ", "dz·W", "dzᵀ·h"} for r in floors)
    assert all(r["time_vs_gemm_floor"] > 0 for r in records if r["status"] == "ok")
    records = [r for r in records if r["impl"] != "gemm-floor"]
    assert all("NotImplementedError" in r["error"] for r in records if r["impl"] == "broken")
    peers = [r for r in records if r["impl"] in ("naive", "nll-only")]
    assert all(r["diff_rlloss_logprobs"] < 1e-4 for r in peers)
    assert all((r["diff_rlloss_entropy"] is None) == (r["impl"] == "nll-only") for r in peers)
    assert all(r["diff_ref_rows_logprobs"] < 1e-4 for r in records if r["status"] == "ok")
    table = harness.markdown_table(records + floors, logprobs._gpu_columns())
    assert table.count("\n") == len(records) + len(floors) + 1 and "GEMM floor" in table
