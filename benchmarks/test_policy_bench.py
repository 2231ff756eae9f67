"""pytest-benchmark view of the ``policy`` suite: ``pytest benchmarks/ --benchmark-only [--quick]``.

Times the same forward + backward cases as ``python -m benchmarks`` (the CPU default or quick case on a CPU,
the first GPU shape with both presets on CUDA) with the ``benchmark`` fixture; memory and accuracy stay with
the main command. The last tests are no benchmarks: they run the GPU comparison's code path on CPU stand-ins,
Liger's adapter included where liger-kernel imports (skipped under ``--benchmark-only``).
"""
import pytest
import torch

from benchmarks import _harness as harness
from benchmarks import policy

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ROUNDS = 3


def pytest_generate_tests(metafunc):
    if "bench_case" in metafunc.fixturenames:
        cases = policy.bench_cases(DEVICE, metafunc.config.getoption("--quick"))
        metafunc.parametrize("bench_case", cases, ids=[case.id for case in cases])


def test_policy_fwd_bwd(benchmark, bench_case):
    reason = bench_case.impl.unavailable()
    if reason is not None:
        pytest.skip(reason)
    benchmark.extra_info.update(impl=bench_case.impl.name, preset=bench_case.preset, variant=bench_case.variant.name,
                                dtype=str(bench_case.dtype), device=bench_case.device, B=bench_case.shape.B,
                                T=bench_case.shape.T, D=bench_case.shape.D, V=bench_case.shape.V)
    benchmark.pedantic(policy.bench_step(bench_case), rounds=ROUNDS, warmup_rounds=0, iterations=1)


STAND_IN_PROBES = harness.cpu_probes(0, 1)


def test_gpu_comparison_path_on_cpu_stand_ins():
    """``compare_implementations`` end to end at tiny float64 sizes, with CPU timing and no memory probe."""

    def broken():
        def forward(inputs, config):
            raise NotImplementedError("this peer has no such loss")

        return forward

    impls = [policy.fused_implementation("torch"), policy.unfused_implementation("torch"), policy.TRL_STYLE,
             policy.Implementation("broken", "peer", "raises", broken)]
    shapes = [policy.Shape(B=2, T=9, D=8, V=50), policy.Shape(B=3, T=5, D=4, V=33)]
    lines = []
    records = policy.compare_implementations(shapes, policy.PRESETS, policy.VARIANTS, torch.float64, "cpu", "torch",
                                             impls, STAND_IN_PROBES, lines.append, matmul_tflops=1.0,
                                             floor_gemms=harness.FUSED_LOSS_FLOOR_GEMMS)
    configurations = len(policy.PRESETS) * len(policy.VARIANTS)
    per_shape = 2 + configurations * len(impls)
    assert len(records) == len(lines) == per_shape * len(shapes)
    assert [r["status"] for r in records if r["impl"] == "broken"] == ["error"] * configurations * 2
    gemm_floors = [r for r in records if r["impl"] == "gemm-floor"]
    assert len(gemm_floors) == 2 and all(r["status"] == "ok" and r["gemms"] == list(harness.FUSED_LOSS_FLOOR_GEMMS)
                                         for r in gemm_floors)
    assert all(r["time_vs_gemm_floor"] > 0 for r in records if r["status"] == "ok")
    floors = [r for r in records if r["impl"] == "token_logprobs"]
    assert len(floors) == 2 and all(r["status"] == "ok" for r in floors)
    fused = [r for r in records if r["impl"] == "fused"]
    assert all(r["time_vs_token_logprobs"] > 0 for r in fused)
    for r in records:
        if r["impl"] in ("unfused", "trl"):
            assert r["status"] == "ok" and r["time_vs_fused"] > 0
            assert r["diff_fused_loss"] < 1e-6, r
            assert r["diff_fused_grad_hidden_rel"] < 1e-5 and r["diff_fused_grad_weight_rel"] < 1e-5, r
    table = harness.markdown_table(records, policy._gpu_columns())
    assert table.count("\n") == len(records) + 1 and "\\|Δloss\\|" in table


def test_liger_adapter_on_cpu():
    """Liger's GRPO loss (uncompiled, on CPU) against FusedPolicyLoss for both presets: equal without the
    entropy bonus, different by exactly that term with it."""
    liger = policy.liger_implementation(compiled=False)
    reason = liger.unavailable()
    if reason is not None:
        pytest.skip(reason)
    impls = [policy.fused_implementation("torch"), liger]
    records = policy.compare_implementations([policy.Shape(B=2, T=16, D=8, V=64)], policy.PRESETS, policy.VARIANTS,
                                             torch.float32, "cpu", "torch", impls, STAND_IN_PROBES, lambda line: None)
    peers = [r for r in records if r["impl"] == "liger"]
    assert peers and all(r["status"] == "ok" for r in peers), [r["error"] for r in peers]
    for r in peers:
        if r["variant"] == policy.PLAIN.name:
            assert r["differs"] == "" and r["diff_fused_loss"] < 1e-5, r
            assert r["diff_fused_grad_hidden_rel"] < 1e-4 and r["diff_fused_grad_weight_rel"] < 1e-4, r
        else:
            assert "entropy" in r["differs"]
