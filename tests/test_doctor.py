"""python -m rlloss.doctor: the report prints, the self-test passes here, and a wrong result fails it."""
import torch

from rlloss import doctor


def test_doctor_passes_on_this_machine(capsys):
    assert doctor.main(["--backend", "torch", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "torch         " in out and "backend       " in out
    assert out.count("PASS") == len(doctor.CHECKS) and "FAIL" not in out


def test_doctor_fails_on_a_wrong_result(monkeypatch, capsys):
    broken = [("always wrong", lambda device, backend, dtype: 1.0, 1e-4)] + doctor.CHECKS[:1]
    monkeypatch.setattr(doctor, "CHECKS", broken)
    assert doctor.main(["--backend", "torch", "--device", "cpu"]) == 1
    out = capsys.readouterr().out
    assert "FAIL  torch     always wrong" in out and "1 passed, 1 failed" in out


def test_doctor_reports_a_crash_as_failure(monkeypatch, capsys):
    def crash(device, backend, dtype):
        raise RuntimeError("kernel exploded")

    monkeypatch.setattr(doctor, "CHECKS", [("crashes", crash, 1e-4)])
    assert doctor.main(["--backend", "torch", "--device", "cpu"]) == 1
    assert "RuntimeError: kernel exploded" in capsys.readouterr().out


def test_environment_report_only(capsys):
    assert doctor.main(["--no-self-test", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert f"torch         {torch.__version__}" in out and "self-test" not in out
