"""The MFU peak: datasheet figures for known GPUs, a measurement that takes the best of
several timed runs after a warm-up, cached per machine so two runs divide by the same peak."""

import json

import pytest
import torch

from pyfast_tune.trainer import metrics


def test_known_gpus_use_their_datasheet_peak(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for name, dtype, tflops in [("NVIDIA H100 80GB HBM3", "bfloat16", 989.0),
                                ("NVIDIA H100 PCIe", "bfloat16", 756.0),
                                ("NVIDIA H200", "bfloat16", 989.0),
                                ("NVIDIA A100-SXM4-80GB", "bfloat16", 312.0),
                                ("NVIDIA A100-SXM4-80GB", "float32", 156.0),
                                ("NVIDIA L40S", "float16", 362.0),
                                ("NVIDIA L40", "bfloat16", 181.0)]:  # fmt: skip
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a, n=name: n)
        peak, source = metrics.peak_flops_per_device(None, dtype)
        assert peak == tflops * 1e12, name
        assert name in source and "datasheet" in source
    assert metrics.peak_flops_per_device(123.0, "bfloat16") == (123e12, "config peak_tflops")


def test_measurement_is_the_best_trial_after_the_warmup():
    """A fake clock: each matmul 'takes' 1 s, except that trials 2 and 4 are slowed down
    (interference). The result is the undisturbed rate, and the warm-up is not a trial."""
    size = 8
    durations = iter([5.0] + [1.0, 3.0, 1.0, 2.0, 1.0] * 10)  # warm-up, then per-matmul times
    t = [0.0]
    calls = []

    def clock():
        calls.append(t[0])
        return t[0]

    real_matmul = torch.Tensor.__matmul__

    def slow_matmul(a, b):
        t[0] += next(durations)
        return real_matmul(a, b)

    with pytest.MonkeyPatch.context() as m:
        m.setattr(torch.Tensor, "__matmul__", slow_matmul)
        flops = metrics.measure_matmul_flops(torch.float32, size=size, trials=5,
                                             trial_seconds=1.0, warmup_seconds=1.0,
                                             clock=clock)  # fmt: skip
    assert flops == 2 * size**3 / 1.0  # the best trial: one matmul in 1 s


def test_peak_is_measured_once_per_machine_and_read_back(monkeypatch, tmp_path):
    monkeypatch.setenv("PYFAST_TUNE_CACHE", str(tmp_path))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(metrics, "_load_average", lambda: 1.0)
    measured = []

    def fake_measure(dtype, device="cpu", **kw):
        measured.append((dtype, torch.get_num_threads()))
        return 1e11 * len(measured)  # a different figure each time it is really measured

    monkeypatch.setattr(metrics, "measure_matmul_flops", fake_measure)
    first, source1 = metrics.peak_flops_per_device(None, "float32")
    second, source2 = metrics.peak_flops_per_device(None, "float32")
    assert first == second == 1e11 and len(measured) == 1
    assert "measured before" in source2 and "measured before" not in source1
    files = list((tmp_path / "mfu").glob("peak-*.json"))
    assert len(files) == 1 and json.loads(files[0].read_text())["flops"] == 1e11
    # Another dtype or thread count is another machine state: measured anew, cached apart.
    assert metrics.peak_flops_per_device(None, "bfloat16")[0] == 2e11
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(threads + 1)
        assert metrics.peak_flops_per_device(None, "float32")[0] == 3e11
    finally:
        torch.set_num_threads(threads)
    assert metrics.peak_flops_per_device(None, "float32")[0] == 1e11
    assert len(measured) == 3
    # A torn cache file (a crash while another process wrote it) is measured again.
    for f in (tmp_path / "mfu").glob("peak-*.json"):
        f.write_text("{")
    assert metrics.peak_flops_per_device(None, "float32")[0] == 4e11


def test_a_peak_measured_under_load_is_measured_again_when_quieter(monkeypatch, tmp_path):
    """Seen: a peak cached while the machine had load 10 made a later quiet run report MFU 1.9
    (190%). A figure from a busier machine is measured again and the larger one kept."""
    monkeypatch.setenv("PYFAST_TUNE_CACHE", str(tmp_path))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    figures = iter([1e11, 5e11, 3e11])
    monkeypatch.setattr(metrics, "measure_matmul_flops", lambda *a, **k: next(figures))
    load = {"now": 8.0}
    monkeypatch.setattr(metrics, "_load_average", lambda: load["now"])
    assert metrics.peak_flops_per_device(None, "float32")[0] == 1e11  # measured under load 8
    load["now"] = 7.5  # about as busy: read back, not measured
    assert metrics.peak_flops_per_device(None, "float32")[0] == 1e11
    load["now"] = 0.5  # quieter: measured again, the larger kept
    flops, source = metrics.peak_flops_per_device(None, "float32")
    assert flops == 5e11 and "measured" in source
    assert metrics.peak_flops_per_device(None, "float32")[0] == 5e11  # now read back
    load["now"] = 9.0  # busier again: never measured down
    assert metrics.peak_flops_per_device(None, "float32")[0] == 5e11
    files = list((tmp_path / "mfu").glob("peak-*.json"))
    assert json.loads(files[0].read_text())["flops"] == 5e11


def test_unknown_gpu_is_measured_not_zero(monkeypatch, tmp_path):
    monkeypatch.setenv("PYFAST_TUNE_CACHE", str(tmp_path))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Some Future GPU")
    seen = []
    monkeypatch.setattr(metrics, "measure_matmul_flops",
                        lambda dtype, device="cpu", **kw: seen.append(device) or 5e13)  # fmt: skip
    peak, source = metrics.peak_flops_per_device(None, "bfloat16")
    assert peak == 5e13 and seen == ["cuda"] and "GPU" in source


def test_a_real_measurement_is_positive_and_of_the_right_order():
    flops = metrics.measure_matmul_flops(torch.float32, size=256, trials=2, trial_seconds=0.05,
                                         warmup_seconds=0.05)  # fmt: skip
    assert 1e8 < flops < 1e15  # any CPU of this century, never a unit slip
