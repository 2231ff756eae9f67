"""pytest-benchmark view of the ``advantages`` suite: ``pytest benchmarks/ --benchmark-only [--quick]``.

Times ``group_advantages`` (grpo and rank_gaussian, equal and varying group sizes, rlloss and the naive torch
path) at the suite's sizes with the ``benchmark`` fixture. The last tests are no benchmarks: the suite's
comparison on small CPU inputs and the varying group sizes (skipped under ``--benchmark-only``).
"""
import pytest
import torch

from benchmarks import _harness as harness
from benchmarks import advantages

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ROUNDS = 20


def pytest_generate_tests(metafunc):
    if "bench_case" in metafunc.fixturenames:
        cases = advantages.bench_cases(DEVICE, metafunc.config.getoption("--quick"))
        metafunc.parametrize("bench_case", cases,
                             ids=[f"{impl.name}-{mode}-{'equal' if g.group_size else 'varying'}-{n}"
                                  for impl, g, mode, n in cases])


def test_group_advantages(benchmark, bench_case):
    impl, grouping, mode, num_rewards = bench_case
    batch = advantages.make_batch(num_rewards, grouping, DEVICE)
    step = harness.synchronised(lambda: impl.run(batch, mode), DEVICE)
    benchmark.extra_info.update(impl=impl.name, mode=mode, grouping=grouping.name, rewards=num_rewards)
    benchmark.pedantic(step, rounds=ROUNDS, warmup_rounds=1, iterations=1)


@pytest.mark.parametrize("num_rewards", [100, 4096, 1 << 16])
def test_varying_group_sizes_stay_in_range(num_rewards):
    sizes = advantages.make_batch(num_rewards, advantages.VARIABLE, "cpu").sizes
    low, high = advantages.VARIABLE_SIZES
    assert int(sizes.sum()) == num_rewards and int(sizes.min()) >= low and int(sizes.max()) <= high


def test_comparison_on_cpu_stand_ins():
    """``compare`` end to end on 4096 rewards, with a bandwidth reference so the GPU fields are filled."""
    lines = []

    def timer(fns):
        return harness.cpu_times_interleaved(fns, 0, 1)

    records = advantages.compare(4096, "cpu", advantages.CPU_IMPLEMENTATIONS, timer, lines.append,
                                 copy_bandwidth=1e9)
    assert len(records) == len(lines) == 2 * len(advantages.ADVANTAGE_MODES) * 2
    assert all(r["status"] == "ok" and r["bandwidth_fraction"] > 0 for r in records)
    assert all(r["diff_reference"] < 1e-5 for r in records)
    assert all(r["diff_subject"] < 1e-5 for r in records if r["impl"] == "naive")
    table = harness.markdown_table(records, advantages._columns(gpu=True))
    assert table.count("\n") == len(records) + 1
