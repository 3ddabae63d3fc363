"""The GPU check kit (``python -m pyfast_tune.gpu_check``) in its dry mode on the CPU.

The kit runs on a GPU only now and then, for minutes; these tests keep it working in between:
the report's schema, a failing part recorded while the others still run, a hanging part
killed at its budget, and the targets judged from measurements.
"""

from __future__ import annotations

import json

import pytest

from pyfast_tune.gpu_check import PART_NAMES, STATUSES, run
from pyfast_tune.gpu_check.summary import evaluate_targets, format_summary

PART_KEYS = {"status": str, "seconds": float, "budget_s": float, "results": (dict, type(None)),
             "error": (str, type(None)), "log": (str, type(None))}  # fmt: skip


def check_schema(report: dict, parts: list[str]) -> None:
    """What docs/gpu-reports/README.md promises a report holds."""
    assert report["schema"] == 1 and report["kit"] == "pyfast_tune.gpu_check"
    assert report["mode"] in ("gpu", "dry")
    assert isinstance(report["started"], str) and isinstance(report["seconds"], float)
    assert isinstance(report["ok"], bool)
    assert list(report["parts"]) == parts  # in the order they ran
    for name, part in report["parts"].items():
        assert set(part) == set(PART_KEYS), name
        for key, kind in PART_KEYS.items():
            assert isinstance(part[key], kind), (name, key, part[key])
        assert part["status"] in STATUSES, (name, part["status"])
        if part["status"] != "ok":
            assert part["error"], f"{name}: a part that is not ok says why"
    assert report["ok"] == all(p["status"] in ("ok", "skipped") for p in report["parts"].values())
    for t in report["targets"]:
        assert set(t) == {"name", "limit", "value", "met", "detail"}
        assert t["met"] in (True, False, None)


def test_dry_run_records_failures_and_hangs_and_goes_on(tmp_path):
    parts = ["env", "doctor", "bench_loss", "train"]
    report = run(tmp_path, parts, dry=True, fail="doctor,train:hang", budgets={"train": 8})
    check_schema(report, parts)
    assert report["mode"] == "dry"
    on_disk = json.loads((tmp_path / "report.json").read_text())
    assert on_disk["parts"].keys() == report["parts"].keys() and on_disk["ok"] is False

    env, doctor, loss, train = (report["parts"][p] for p in parts)
    assert env["status"] == "ok", env["error"]
    assert env["results"]["cuda_available"] is False
    assert env["results"]["triton_interpret"] == "1"  # the dry mode's interpreter
    assert report["device"]["device"] == "cpu" and report["versions"]["torch"]

    assert doctor["status"] == "failed" and "injected failure" in doctor["error"]
    # The part after the failure ran and measured: ours and plain cross-entropy on CPU.
    assert loss["status"] == "ok", loss["error"]
    rows = {r["method"]: r for r in loss["results"]["rows"]}
    assert rows["ours"]["loss"] == pytest.approx(rows["plain"]["loss"], rel=1e-4)
    assert rows["liger"]["unavailable"].startswith("n/a")
    # The hanging part was killed at its budget, not waited for.
    assert train["status"] == "timeout" and 8 <= train["seconds"] < 30
    assert "killed after its budget" in train["error"]

    summary = (tmp_path / "summary.txt").read_text()
    assert "SOME PARTS FAILED" in summary
    for name in parts:
        assert name in summary
    assert (tmp_path / "logs" / "bench_loss.log").stat().st_size > 0


def test_unknown_part_is_refused(tmp_path):
    with pytest.raises(ValueError, match="unknown part"):
        run(tmp_path, ["env", "benchmarks"], dry=True)


def _gpu_report(triton_ms: float, ours_peak: float) -> dict:
    rows = []
    for tokens, segments in ((8192, 1), (32768, 4), (16384, 32)):
        for method, ms in (("triton", triton_ms), ("torch_varlen", 10.0), ("flash_attn", 12.0)):
            rows.append({"tokens": tokens, "segments": segments, "method": method,
                         "fwd_ms": ms / 3, "bwd_ms": 2 * ms / 3, "fwd_bwd_ms": ms,
                         "fwd_tflops": 1.0, "fwd_bwd_tflops": 1.0, "peak_mib": 1.0})  # fmt: skip
    # A short-segment shape where ours is slow must not count: the target is T 8k-32k.
    rows[-3]["fwd_bwd_ms"] = 100.0
    loss = [{"tokens": 8192, "vocab": 151936, "method": m, "ms": 1.0, "peak_mib": peak}
            for m, peak in (("ours", ours_peak), ("plain", 1000.0))]  # fmt: skip
    checks = [{"op": "varlen_attention", "backend": "triton", "ok": True},
              {"op": "lora_linear", "backend": "flash", "ok": None}]  # fmt: skip

    def part(results):
        return {"status": "ok", "seconds": 1.0, "budget_s": 9.0, "results": results,
                "error": None, "log": None}  # fmt: skip

    return {"mode": "gpu", "parts": {
        "doctor": part({"checks": checks}),
        "bench_attention": part({"setup": {"head_dim": 128, "dtype": "bfloat16"}, "rows": rows}),
        "bench_loss": part({"rows": loss})}}  # fmt: skip


def test_targets_judged_from_measurements():
    met = {t["name"].split(" ")[0]: t for t in evaluate_targets(_gpu_report(12.0, 150.0))}
    assert met["every"]["met"] is True and met["every"]["value"] == 0
    assert met["attention"]["value"] == pytest.approx(1.2) and met["attention"]["met"] is True
    assert met["fused"]["value"] == pytest.approx(0.15) and met["fused"]["met"] is True
    missed = {t["name"].split(" ")[0]: t for t in evaluate_targets(_gpu_report(14.0, 300.0))}
    assert missed["attention"]["met"] is False and missed["fused"]["met"] is False
    dry = dict(_gpu_report(12.0, 150.0), mode="dry")
    assert [t["met"] for t in evaluate_targets(dry)][1:] == [None, None]  # no GPU, no verdict
    report = dict(_gpu_report(14.0, 300.0), targets=evaluate_targets(_gpu_report(14.0, 300.0)))
    assert "MISSED" in format_summary(report)


@pytest.mark.slow
def test_full_dry_run(tmp_path):
    """Every part in the dry mode, as `make gpu-check` runs it without CUDA (minutes)."""
    report = run(tmp_path, dry=True)
    check_schema(report, list(PART_NAMES))
    bad = {n: p["error"] for n, p in report["parts"].items() if p["status"] != "ok"}
    assert not bad, bad
    assert report["parts"]["pytest"]["results"]["counts"].get("passed", 0) >= 5
    train = report["parts"]["train"]["results"]
    assert train["backends"]["attention"] == "cpp" and train["max_abs_diff"] <= train["tolerance"]


def test_packer_extension_taken_from_the_wheel(tmp_path):
    """A tree copied to a GPU machine has no compiled extension (``*.so`` is ignored by git):
    the kit takes it from the abi3 wheel in dist-gpu/ and the tree's Python still runs."""
    import importlib.util
    import shutil
    import subprocess
    import sys
    import zipfile
    from pathlib import Path

    built = importlib.util.find_spec("pyfast_tune._packer")
    if built is None:
        pytest.skip("the data engine's extension is not built here (make build)")
    src = Path(importlib.util.find_spec("pyfast_tune").origin).parent
    shutil.copytree(src, tmp_path / "pyfast_tune", ignore=shutil.ignore_patterns("*.so"))
    (tmp_path / "dist-gpu").mkdir()
    with zipfile.ZipFile(
        tmp_path / "dist-gpu" / "pyfast_tune-0.1.0-cp310-abi3-linux_x86_64.whl", "w"
    ) as whl:
        whl.write(built.origin, "pyfast_tune/_packer.abi3.so")
        whl.writestr("pyfast_tune/__init__.py", "raise ImportError('the wheel's Python ran')")
    code = ("import sys; from pathlib import Path; from pyfast_tune.gpu_check.parts import "
            "ensure_packer; r = Path(sys.argv[1]); print(ensure_packer(r, r / 'work')); "
            "import pyfast_tune, pyfast_tune._packer as p; print(pyfast_tune.__file__); print(p.__file__)")  # fmt: skip
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(tmp_path)}
    p = subprocess.run([sys.executable, "-c", code, str(tmp_path)], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=120)  # fmt: skip
    assert p.returncode == 0, p.stderr
    origin, package, packer = p.stdout.splitlines()
    assert origin.startswith("wheel: pyfast_tune-0.1.0-cp310-abi3")
    assert package == str(tmp_path / "pyfast_tune" / "__init__.py")  # the tree's Python
    assert packer == str(tmp_path / "work" / "packer" / "pyfast_tune" / "_packer.abi3.so")
