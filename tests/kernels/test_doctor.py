"""``pyfast-tune doctor``: versions, devices, the C++ build, every op x backend checked on this
device with the guard's decision; exit status 1 when a backend checked is wrong or fails."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from pyfast_tune import doctor
from pyfast_tune.kernels import guard
from pyfast_tune.kernels.guard import faults
from tests.conftest import ROOT

SMALL = {"dtype": "float32", "head_dim": 32, "gqa": 2, "window": [-1, 0]}


@pytest.fixture(autouse=True)
def clean(tmp_path, monkeypatch):
    monkeypatch.setenv(guard.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.delenv(faults.ENV, raising=False)
    guard.forget()
    # One attention shape class keeps the Triton-interpreter checks to seconds.
    full = doctor.shape_classes
    monkeypatch.setattr(
        doctor,
        "shape_classes",
        lambda op, dt: [SMALL] if op == "varlen_attention" else full(op, dt)[:1],
    )


def _json(capsys, *argv):
    code = doctor.main(["--json", *argv])
    return code, json.loads(capsys.readouterr().out)


def test_doctor_reports_every_backend_and_the_choice(capsys, tmp_path):
    code, report = _json(capsys)
    assert code == 0 and report["ok"]
    assert report["device"] and report["versions"]["torch"] and report["cpp_build"]["ok"]
    assert {d["device"] for d in report["devices"]} >= {"cpu"}
    attn = [c for c in report["checks"] if c["op"] == "varlen_attention"]
    assert {c["backend"] for c in attn} == {"cpp", "triton", "sdpa"}
    for c in attn:
        assert c["ok"] is True and c["error_ratio"] <= c["allowed"], c
        assert (c["dtype"], c["head_dim"], c["gqa"]) == ("float32", 32, 2)
    triton = next(c for c in attn if c["backend"] == "triton")
    assert not triton["raced"] and triton["ms"] is None and not triton["chosen"]  # interpreter
    chosen = [c for c in attn if c["chosen"]]
    assert len(chosen) == 1 and chosen[0]["ms"] == min(c["ms"] for c in attn if c["ms"])
    lora = [c for c in report["checks"] if c["op"] == "lora_linear"]
    assert {c["backend"] for c in lora} == {"torch", "triton", "peft"}
    assert sum(c["chosen"] for c in lora) == 1
    assert {d["op"] for d in report["decisions"]} >= {"varlen_attention", "lora_linear"}
    assert not (tmp_path / "cache").exists()  # doctor checks; it does not decide for training


def test_doctor_fails_on_a_wrong_backend(capsys, monkeypatch):
    monkeypatch.setenv(faults.ENV, "varlen_attention.cpp=wrong")
    code, report = _json(capsys, "--op", "varlen_attention")
    assert code == 1 and not report["ok"]
    by = {c["backend"]: c for c in report["checks"]}
    assert by["cpp"]["ok"] is False and by["cpp"]["error_ratio"] > 100
    assert by["sdpa"]["ok"] and by["sdpa"]["chosen"] and by["triton"]["ok"]
    assert report["decisions"] == [{"op": "varlen_attention", **SMALL, "chosen": "sdpa"}]


def test_doctor_table_says_why(capsys, monkeypatch):
    monkeypatch.setenv(faults.ENV, "varlen_attention.sdpa=raise")
    assert doctor.main(["--op", "varlen_attention"]) == 1
    out = capsys.readouterr().out
    assert "FAILED" in out and "InjectedFault" in out and "SOME BACKENDS FAILED" in out


def test_unknown_op_is_refused():
    with pytest.raises(ValueError, match="unknown op"):
        doctor.run(["no_such_op"])


def test_cli_doctor_json_exit_status_under_a_fault(tmp_path):
    """What a user runs: the console entry point, a fault set, JSON on stdout, exit 1."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), PYFAST_TUNE_CACHE=str(tmp_path))
    env[faults.ENV] = "lora_linear.torch=raise"
    cmd = [sys.executable, "-m", "pyfast_tune.cli", "doctor", "--json", "--op", "lora_linear"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1, proc.stderr[-3000:]
    report = json.loads(proc.stdout)
    torch_checks = [c for c in report["checks"] if c["backend"] == "torch"]
    assert torch_checks and all(c["ok"] is False for c in torch_checks)
    assert all("InjectedFault" in c["error"] for c in torch_checks)
    assert all(d["chosen"] == "peft" for d in report["decisions"])
