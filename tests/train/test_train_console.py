"""Loggers (report_to: TensorBoard, W&B, MLflow) and the console (bar / plain lines, summary).

W&B and MLflow are not dependencies: their integration is checked against fake modules put in
``sys.modules`` that record every call, and a missing library against an import that fails.
The end-to-end test runs a tiny training through the launcher with captured (non-TTY) output.
"""

from __future__ import annotations

import io
import json
import sys
import types
from pathlib import Path

import pytest

from pyfast_tune.config import resolve_report_to
from pyfast_tune.trainer.metrics import Console, MetricsLog, require_reporters
from tests.conftest import tiny_training, train_process

ROOT = Path(__file__).resolve().parents[2]
RUN = {"config": {"lr": 0.001, "lora": {"r": 4}}, "data_fingerprint": "fp123", "packed_dir": "/p"}


def _record(step: int, loss: float = 2.0) -> dict:
    return {"step": step, "epoch": 0, "loss": loss, "lr": 1e-3, "tokens": 400,
            "trained_tokens": 100, "seconds": 0.5, "elapsed": 0.5 * step, "tokens_per_s": 800.0,
            "trained_tokens_per_s": 200.0, "mfu": 0.0123, "grad_norm": None}  # fmt: skip


def test_report_to_values():
    assert resolve_report_to(None) == ["tensorboard"]
    assert resolve_report_to(None, tensorboard=False) == []
    assert resolve_report_to("none") == []
    assert resolve_report_to("wandb") == ["wandb"]
    assert resolve_report_to(["tensorboard", "MLflow", "wandb"]) == [
        "tensorboard",
        "mlflow",
        "wandb",
    ]
    with pytest.raises(ValueError, match="unknown logger 'comet'"):
        resolve_report_to(["comet"])
    with pytest.raises(ValueError, match="'none' cannot be combined"):
        resolve_report_to(["none", "wandb"])
    with pytest.raises(ValueError, match="report_to must be"):
        resolve_report_to(3)


def test_report_to_is_a_config_key():
    from pyfast_tune.config import load_config

    cfg = load_config(None, ["--model", "m/", "--data", "p/", "--report_to", "[wandb,mlflow]"])
    assert cfg.report_to == ["wandb", "mlflow"]
    with pytest.raises(ValueError, match="unknown logger"):
        load_config(None, ["--model", "m/", "--data", "p/", "--report_to", "neptune"])


@pytest.mark.parametrize("name", ["wandb", "mlflow"])
def test_missing_logger_library_is_a_clear_error(name, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, name, None)  # `import name` fails, find_spec says absent
    with pytest.raises(ImportError, match=f"report_to includes '{name}'.*pip install {name}"):
        require_reporters([name])
    with pytest.raises(ImportError, match=f"pip install {name}, or remove '{name}'"):
        MetricsLog(tmp_path, 0, [name], RUN)


def test_tensorboard_logs_scalars_and_the_run(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    log = MetricsLog(tmp_path, 0, ["tensorboard"], RUN)
    for step in (1, 2):
        log.log(_record(step, loss=3.0 - step))
    log.close()
    events = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"tensors": 0})
    events.Reload()
    assert [e.value for e in events.Scalars("train/loss")] == [2.0, 1.0]
    assert "train/mfu" in events.Tags()["scalars"]
    text = events.Tensors("run/config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "fp123" in text and '"r": 4' in text
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == [1, 2]


def test_wandb_integration(tmp_path, monkeypatch):
    calls = []

    class Run:
        summary: dict = {}

        def log(self, data, step):
            calls.append(("log", data, step))

        def finish(self):
            calls.append(("finish",))

    fake = types.ModuleType("wandb")
    fake.init = lambda **kw: calls.append(("init", kw)) or Run()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.setenv("WANDB_MODE", "offline")
    log = MetricsLog(tmp_path / "run1", 0, ["wandb"], RUN)
    log.log(_record(1))
    log.close()
    init = calls[0][1]
    assert "mode" not in init  # WANDB_MODE (offline) is wandb's to read, never overridden
    assert init["config"] == RUN["config"] and init["name"] == "run1"
    assert Run.summary["data_fingerprint"] == "fp123"
    assert calls[1][0] == "log" and calls[1][2] == 1 and calls[1][1]["train/loss"] == 2.0
    assert calls[-1] == ("finish",)


@pytest.mark.parametrize("tracking_uri", [None, "http://tracking.example:5000"])
def test_mlflow_integration(tmp_path, monkeypatch, tracking_uri):
    calls = []
    fake = types.ModuleType("mlflow")
    for fn in ("set_tracking_uri", "set_experiment", "start_run", "log_params", "set_tags",
               "log_metrics", "end_run"):  # fmt: skip
        setattr(fake, fn, lambda *a, _fn=fn, **kw: calls.append((_fn, a, kw)))
    monkeypatch.setitem(sys.modules, "mlflow", fake)
    if tracking_uri:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking_uri)
    else:
        monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    log = MetricsLog(tmp_path, 0, ["mlflow"], RUN)
    log.log(_record(3))
    log.close()
    by = {c[0]: c for c in calls}
    if tracking_uri:  # the user's server: left alone
        assert "set_tracking_uri" not in by
    else:  # offline: a file store beside the run, never a server
        assert by["set_tracking_uri"][1][0] == (tmp_path / "mlruns").resolve().as_uri()
    assert by["log_params"][1][0]["lora.r"] == "4"
    assert by["set_tags"][1][0]["data_fingerprint"] == "fp123"
    assert by["log_metrics"][1][0]["loss"] == 2.0 and by["log_metrics"][2]["step"] == 3
    assert calls[-1][0] == "end_run"


def test_console_lines_without_a_tty(tmp_path):
    out = io.StringIO()  # not a TTY: plain lines even with progress_bar on
    console = Console(total_steps=5, start_step=0, log_steps=2, progress_bar=True, stream=out)
    records = [_record(s) for s in range(1, 6)]
    for r in records:
        console.step(r)
    lines = out.getvalue().splitlines()
    assert [x.split(" | ")[0] for x in lines] == ["step 2/5", "step 4/5", "step 5/5"]
    for field in ("loss 2.0000", "lr 1.00e-03", "tok/s 800", "trained 25%", "MFU 1.2%",
                  "elapsed ", "ETA "):  # fmt: skip
        assert field in lines[0]
    assert lines[-1].endswith("ETA 0:00:00")
    text = console.summary(records, tmp_path, tmp_path / "ck", tmp_path / "loss.png")
    assert "done: 5 steps in" in text and "2000 tokens (500 trained)" in text
    assert "mean 800 tokens/s" in text and "final loss 2.0000" in text
    assert (
        f"checkpoint: {tmp_path / 'ck'}" in text and f"loss plot: {tmp_path / 'loss.png'}" in text
    )
    assert out.getvalue().endswith(text + "\n")
    quiet = io.StringIO()
    other_rank = Console(5, 0, 1, True, disabled=True, stream=quiet)
    other_rank.step(records[0])
    other_rank.summary(records, tmp_path, None, None)
    assert quiet.getvalue() == ""


def test_console_bar_on_a_tty():
    class Tty(io.StringIO):
        def isatty(self):
            return True

    out = Tty()
    console = Console(total_steps=3, start_step=0, log_steps=1, progress_bar=True, stream=out)
    for s in (1, 2, 3):
        console.step(_record(s))
    console.close()
    shown = out.getvalue()
    assert "\r" in shown and "3/3" in shown  # one bar updated in place
    assert "loss=2.0000" in shown and "MFU=1.2%" in shown and "trained=25%" in shown
    assert "step 1/3 |" not in shown  # no plain lines on a TTY


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, tiny_tokenizer, generated_chats):
    return tiny_training(
        tmp_path_factory.mktemp("console"), tiny_tokenizer, generated_chats, records=24, turns=2,
        config="lora: {r: 4, alpha: 8, dropout: 0.0}\nmax_steps: 3\nlr: 1.0e-3\nlog_steps: 2\n"
        "gradient_checkpointing: false\nreport_to: [tensorboard]\n",
    )["config"]  # fmt: skip


def test_training_prints_lines_and_a_summary_and_no_dependency_noise(tiny_run, tmp_path):
    out = tmp_path / "run"
    proc = train_process(tiny_run, out, 1, timeout=1200)
    lines = [x for x in proc.stdout.splitlines() if x.startswith("step ")]
    assert [x.split(" | ")[0] for x in lines] == ["step 2/3", "step 3/3"], proc.stdout
    for field in ("loss ", "lr ", "tok/s ", "trained ", "MFU ", "ETA "):
        assert all(f" | {field}" in x for x in lines), lines
    assert "\r" not in proc.stdout + proc.stderr  # no carriage-return bar in a log
    assert "done: 3 steps in" in proc.stdout and "final loss" in proc.stdout
    assert f"loss plot: {out / 'loss.png'}" in proc.stdout and (out / "loss.png").is_file()
    assert f"checkpoint: {out / 'checkpoints' / 'step_00000003'}" in proc.stdout
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    both = proc.stdout + proc.stderr
    for noise in ("bitsandbytes", "gemm_4bit", "FutureWarning", "DeprecationWarning",
                  "built successfully", "Setting accelerator to CPU"):  # fmt: skip
        assert noise not in both, noise
