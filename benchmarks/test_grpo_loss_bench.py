"""Checks of the ``grpo_loss`` suite's code paths at tiny sizes (no benchmarks: skipped under
``--benchmark-only``): the contenders compute the same loss, the GPU path runs on CPU stand-ins, and the issue's
targets are read off records as met, missed or not measured. Cut Cross-Entropy is left out here: its
``torch_compile`` path compiles for half a minute on a cold CPU; ``python -m benchmarks --suite grpo_loss --quick``
runs it.
"""
import pytest
import torch

import rlloss
from benchmarks import _harness as harness
from benchmarks import grpo_loss

STAND_IN_PROBES = harness.cpu_probes(0, 1)
TINY = grpo_loss.Shape(B=3, T=17, D=8, V=70)


def test_contenders_agree_with_rlloss_on_cpu_stand_ins():
    impls = [grpo_loss.RLLOSS, grpo_loss.NAIVE]
    if grpo_loss.LIGER_CPU.unavailable() is None:
        impls.append(grpo_loss.LIGER_CPU)
    lines = []
    records = grpo_loss.compare_in_process(TINY, torch.float32, "cpu", impls, STAND_IN_PROBES, lines.append)
    assert [r["impl"] for r in records] == ["gemm-floor"] + [impl.name for impl in impls] and len(lines) == len(records)
    assert all(r["status"] == "ok" for r in records), [r["error"] for r in records]
    for r in records[2:]:
        assert r["diff_rlloss_loss"] < 1e-6 and r["diff_rlloss_grad_hidden_rel"] < 1e-4, r
        assert r["diff_rlloss_grad_weight_rel"] < 1e-4, r
    assert all(r["time_vs_gemm_floor"] > 0 and r["time_vs_naive"] > 0 for r in records)
    table = harness.markdown_table(records, grpo_loss._columns(gpu=True))
    assert table.count("\n") == len(records) + 1 and "\\|Δloss\\|" in table


def test_extension_points_give_rlloss_s_loss_and_selection_runs():
    """rlloss-ext (per-token advantages, clip ranges as tensors, one pass) is the plain loss exactly; rlloss-select
    (TRL's top_entropy_quantile, two-pass) runs."""
    impls = [grpo_loss.RLLOSS, grpo_loss.RLLOSS_EXT, grpo_loss.RLLOSS_SELECT]
    records = grpo_loss.compare_in_process(TINY, torch.float32, "cpu", impls, STAND_IN_PROBES, lambda line: None,
                                           floor_gemms=None)
    assert all(r["status"] == "ok" for r in records), [r["error"] for r in records]
    ext, select = records[1], records[2]
    assert ext["diff_rlloss_loss"] == 0.0 and ext["diff_rlloss_grad_hidden_rel"] == 0.0
    assert select["diff_rlloss_loss"] > 0.0


def test_plain_loss_matches_the_float64_reference():
    """grpo_loss_from_logprobs (the naive and CCE paths' loss code) is rlloss's bnpo loss."""
    inputs = grpo_loss.make_inputs(TINY, torch.float64, "cpu")
    config = grpo_loss.loss_config()
    naive = grpo_loss.loss_step(grpo_loss.NAIVE.make(config), inputs)()
    expected = rlloss.FusedPolicyLoss(config, backend="reference")(
        inputs.hidden, inputs.weight, inputs.targets, inputs.mask, inputs.advantages,
        old_logprobs=inputs.old_logprobs).loss
    torch.testing.assert_close(naive.loss, expected.detach())


def test_only_the_plain_grpo_loss_is_accepted():
    grpo_loss.check_plain_grpo(rlloss.LossConfig.preset("bnpo"))
    for preset, overrides in (("grpo", {}), ("bnpo", {"beta": 0.04}), ("bnpo", {"entropy_coef": 0.01}),
                              ("gspo", {})):
        with pytest.raises(ValueError, match="bnpo"):
            grpo_loss.check_plain_grpo(rlloss.LossConfig.preset(preset, **overrides))


def test_targets_are_reported_from_the_records():
    def record(impl, time_ms, peak, status="ok"):
        return {"impl": impl, "status": status, "time_ms": time_ms, "peak_memory_bytes": peak}

    met = grpo_loss.TARGETS[:3]  # issue #9's (the fourth, issue #14's, compares rlloss-ext with rlloss)
    rows = harness.evaluate_targets(met, [record("rlloss", 70.0, 10), record("naive", 100.0, 100),
                                          record("cce", 80.0, 50)])
    assert [row["status"] for row in rows] == ["met", "met", "met"]
    assert [round(row["ratio"], 3) for row in rows] == [0.7, 0.875, 0.1]
    rows = harness.evaluate_targets(met, [record("rlloss", 90.0, 20), record("naive", 100.0, 100),
                                          record("cce", None, None, status="error")])
    assert [row["status"] for row in rows] == ["missed", "not measured", "missed"]
    assert "cce" in rows[1]["reason"] and rows[1]["ratio"] is None
    assert harness.target_line(rows[0]).startswith("MISSED") and "0.90×" in harness.target_line(rows[0])
    table = harness.markdown_table(rows, harness.TARGET_COLUMNS)
    assert table.count("\n") == len(rows) + 1 and "≤ 0.75×" in table
