"""The examples run end to end (a few steps of a tiny setting; learning itself is shown by the committed curve
in docs/examples.md, not asserted here)."""
import csv
import importlib.util
from pathlib import Path

import pytest

pytest.importorskip("transformers")

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def load(name):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("extra", [[], ["--shared-prefix"], ["--credit", "cepo"]],
                         ids=["padded", "shared_prefix", "cepo"])
def test_grpo_reverse_runs(tmp_path, extra):
    grpo = load("grpo_reverse")
    argv = ["--steps", "2", "--seed", "1", "--out", str(tmp_path), "--prompts", "2", "--group-size", "3",
            "--warmup-steps", "1", "--hidden-size", "32", "--layers", "1", "--threads", "1"]
    rows = grpo.main(argv + extra)
    assert [r["step"] for r in rows] == [0, 1, 2]
    with open(tmp_path / "reward.csv") as f:
        table = list(csv.DictReader(f))
    assert [int(r["step"]) for r in table] == [0, 1, 2]
    assert all(0.0 <= float(r["reward"]) <= 1.0 for r in table)
    assert all(float(r["loss"]) == float(r["loss"]) for r in table[:-1])  # finite: not NaN


def test_reward_partial_credit():
    grpo = load("grpo_reverse")
    assert grpo.reward([1, 2, 3], [3, 2, 1, grpo.EOS]) == 1.0
    assert grpo.reward([1, 2, 3], [3, 0, 1, grpo.EOS, 5]) == 0.75
    assert grpo.reward([1, 2, 3], [grpo.EOS]) == 0.0
