"""pytest-benchmark view of the ``prefix_attention`` suite: ``pytest benchmarks/ --benchmark-only [--quick]``.

Times the CPU default case (or, on CUDA, the first quick GPU shape) with the ``benchmark`` fixture. The last
tests are no benchmarks: they run the GPU comparison's code path (the repeated batch mapped onto the packed
stream, speed-ups, the table) and FlexAttention's mask on CPU stand-ins (skipped under ``--benchmark-only``).
"""
import pytest
import torch

from benchmarks import _harness as harness
from benchmarks import prefix_attention as suite

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ROUNDS = 3


def _cases(quick: bool):
    if DEVICE == "cuda":
        return [(impl, suite.gpu_shapes(quick=True)[0], suite.GPU_DTYPE) for impl in suite.GPU_IMPLEMENTATIONS]
    shape = suite.CPU_QUICK_SHAPE if quick else suite.CPU_DEFAULT_SHAPE
    return [(impl, shape, suite.CPU_DTYPE) for impl in suite.CPU_IMPLEMENTATIONS]


def pytest_generate_tests(metafunc):
    if "bench_case" in metafunc.fixturenames:
        cases = _cases(metafunc.config.getoption("--quick"))
        metafunc.parametrize("bench_case", cases, ids=[f"{impl.name}-{shape}".replace(" ", "-")
                                                       for impl, shape, _ in cases])


def test_prefix_attention_fwd_bwd(benchmark, bench_case):
    impl, shape, dtype = bench_case
    reason = impl.unavailable()
    if reason is not None:
        pytest.skip(reason)
    step = harness.synchronised(impl.prepare(suite.make_inputs(shape, dtype, DEVICE)).step, DEVICE)
    benchmark.extra_info.update(impl=impl.name, dtype=str(dtype), device=DEVICE, **vars(shape))
    benchmark.pedantic(step, rounds=ROUNDS, warmup_rounds=0, iterations=1)


def test_gpu_comparison_path_on_cpu_stand_ins():
    """``compare_implementations`` end to end at tiny sizes: the repeated batch's output and gradients, mapped
    onto the packed stream, must equal rlloss's; a failing implementation is recorded, not fatal."""
    probes = harness.cpu_probes(0, 1)

    def broken(inputs):
        raise NotImplementedError("this peer does not support grouped-query attention")

    impls = [
        suite.rlloss_implementation("torch"),
        suite.SDPA_REPEATED_CPU,
        suite.Implementation("broken", "peer", "raises", broken),
    ]
    shapes = [suite.Shape(G=3, P=37, S=11, Hq=4, Hkv=2, d=16), suite.Shape(G=2, P=5, S=20, Hq=2, Hkv=2, d=32)]
    lines = []
    records = suite.compare_implementations(shapes, torch.float32, "cpu", impls, probes, lines.append)
    assert len(records) == len(lines) == len(shapes) * len(impls)
    assert [r["status"] for r in records if r["impl"] == "broken"] == ["error"] * len(shapes)
    peers = [r for r in records if r["role"] != "subject" and r["status"] == "ok"]
    assert len(peers) == len(shapes) * (len(impls) - 2)
    for r in peers:
        assert max(r[f"diff_rlloss_{name}"] for name in ("out", "dq", "dk", "dv")) < 1e-4, r
        assert r["speedup_vs_sdpa"] is not None
    subject = [r for r in records if r["role"] == "subject"]
    assert all(r["fraction_of_ideal"] == r["speedup_vs_sdpa"] / r["ideal_attention_ratio"] for r in subject)
    table = harness.markdown_table(records, suite._gpu_columns())
    assert table.count("\n") == len(records) + 1


def test_ideal_ratio_matches_the_layout_flops():
    """The ideal ratio of the report is the exact pair count of the layouts up to the O(1/(P+S)) diagonal."""
    shape = suite.Shape(G=16, P=4096, S=512, Hq=1, Hkv=1, d=16)
    shared = suite.layout_of(shape, "cpu").attention_flops(16, 1)
    repeated = shape.G * (shape.P + shape.S) * (shape.P + shape.S + 1) // 2 * 4 * 16  # G causal sequences
    assert abs(repeated / shared / suite.ideal_attention_ratio(shape) - 1) < 1e-3
    assert abs(suite.ideal_attention_ratio(shape) - 3.857) < 1e-3


def test_flex_mask_is_the_layout():
    """FlexAttention's mask_mod sees exactly the layout's pairs, and (forward only: FlexAttention has no CPU
    backward) its eager output on the packed stream equals rlloss's."""
    flex = pytest.importorskip("torch.nn.attention.flex_attention")
    shape = suite.Shape(G=3, P=37, S=11, Hq=4, Hkv=2, d=16)
    visible = suite.flex_visibility(shape, "cpu")
    mask = flex.create_mask(visible, None, None, shape.T, shape.T, device="cpu")
    assert torch.equal(mask[0, 0], suite.layout_of(shape, "cpu").dense_mask())
    inputs = suite.make_inputs(shape, torch.float32, "cpu")
    block_mask = flex.create_block_mask(visible, None, None, shape.T, shape.T, device="cpu")
    with torch.no_grad():
        out = flex.flex_attention(*(suite.heads_first(x) for x in inputs[:3]), block_mask=block_mask, enable_gqa=True)
        expected = suite.rlloss.shared_prefix_attention(*inputs[:3], suite.layout_of(shape, "cpu"))
    assert (out[0].transpose(0, 1) - expected).abs().max() < 1e-5
