"""Step metrics: metrics.jsonl, the loggers (TensorBoard, W&B, MLflow), tokens/s, MFU, the loss
curve PNG and the console (a progress bar on a TTY, one line per logged step otherwise).

MFU counts model FLOPs only (PaLM appendix B, https://arxiv.org/abs/2204.02311): matmul FLOPs
of every linear layer (forward 2·in·out per token, backward 2·in·out for the input gradient
plus 2·in·out for the weight gradient only when the weight is trained, so LoRA's frozen base
does not count as 6N), plus causal attention counted per *sample* (2·L²·H·D per layer forward,
3x that with backward), never per pack: attention across a 4096-token pack of 40 samples
would be 40x more FLOPs than the model actually needs. Activation recompute is not counted.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import time
from pathlib import Path

import numpy as np
import torch

from pyfast_tune.config import REPORTERS, resolve_report_to  # noqa: F401 - re-exported
from pyfast_tune.kernels.guard.environment import cpu_name


class FlopCounter:
    """Model FLOPs of a training step from the model's shapes (read before ZeRO partitions it)."""

    def __init__(self, model: torch.nn.Module):
        self.linear_flops_per_token = 0
        for name, module in model.named_modules():
            # per-token FLOPs: a vision tower and projector run per image, not per token
            if "vision_tower" in name or "multi_modal_projector" in name:
                continue
            if isinstance(module, torch.nn.Linear):
                mac = module.in_features * module.out_features
                trained = module.weight.requires_grad
                self.linear_flops_per_token += 2 * mac * (3 if trained else 2)
        cfg = model.config
        cfg = getattr(cfg, "text_config", None) or cfg  # a vision-language model's LLM
        heads = cfg.num_attention_heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
        self.attn_width = heads * head_dim
        self.layers = cfg.num_hidden_layers

    def step_flops(self, sample_lengths: np.ndarray) -> float:
        """FLOPs (forward + backward) of training on samples of these lengths."""
        lengths = np.asarray(sample_lengths, dtype=np.float64)
        attention = 3 * 2 * float((lengths**2).sum()) * self.attn_width * self.layers
        return self.linear_flops_per_token * float(lengths.sum()) + attention


# Dense (no sparsity) tensor-core peaks from NVIDIA's datasheets, TFLOP/s per GPU: (bf16/fp16,
# tf32). fp32 training on CUDA runs its matmuls in TF32 when allowed, else on CUDA cores, so
# the tf32 figure is the honest ceiling there. More specific names come first.
GPU_PEAK_TFLOPS = (
    ("H100 PCIe", 756.0, 378.0),
    ("H100 NVL", 835.0, 418.0),
    ("GH200", 989.0, 494.0),
    ("H200", 989.0, 494.0),
    ("H100", 989.0, 494.0),  # SXM (HBM3)
    ("H800", 989.0, 494.0),
    ("H20", 148.0, 74.0),
    ("B200", 2250.0, 1100.0),
    ("A100", 312.0, 156.0),
    ("A800", 312.0, 156.0),
    ("L40S", 362.0, 183.0),
    ("L40", 181.0, 90.5),
    ("L4", 121.0, 60.0),
    ("A10G", 70.0, 35.0),
    ("A10", 125.0, 62.5),
    ("A6000", 155.0, 77.4),
    ("V100", 125.0, 125.0),  # fp16 only (no bf16): its tensor cores
)
PEAK_CACHE_FORMAT = 2  # 2: the load the figure was measured under is kept with it


def gpu_peak_tflops(name: str, dtype: str = "bfloat16") -> float | None:
    """The datasheet peak of a GPU named ``name`` (``torch.cuda.get_device_name``), if known."""
    for key, half, tf32 in GPU_PEAK_TFLOPS:
        if key in name:
            return tf32 if dtype == "float32" else half
    return None


def _peak_cache_path(key: dict) -> Path:
    """Beside the kernel guard's decisions (the same root, without importing the kernels):
    ``$PYFAST_TUNE_CACHE/mfu``, else ``$XDG_CACHE_HOME`` or ``~/.cache``/pyfast_tune/mfu."""
    root = os.environ.get("PYFAST_TUNE_CACHE")
    if root:
        base = Path(root).expanduser()
    else:
        base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "pyfast_tune"
    digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    return base / "mfu" / f"peak-{digest}.json"


def measure_matmul_flops(dtype: torch.dtype, device: str = "cpu", size: int = 1024,
                         trials: int = 7, trial_seconds: float = 0.25,
                         warmup_seconds: float = 0.5, clock=time.perf_counter) -> float:  # fmt: skip
    """FLOP/s of square ``size`` matmuls in ``dtype``: after ``warmup_seconds`` of them (clocks
    ramp up, caches and thread pools fill), the best of ``trials`` timed runs of at least
    ``trial_seconds``. The best, not the mean: interference (another process, a frequency
    dip) only ever slows a run down, so the fastest run is the one closest to the peak."""
    a = torch.randn(size, size, device=device).to(dtype)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)

    def run(seconds: float) -> float:
        sync()
        t0, n = clock(), 0
        while True:
            a @ a
            n += 1
            sync()
            elapsed = clock() - t0
            if elapsed >= seconds:
                return 2 * size**3 * n / elapsed

    run(warmup_seconds)
    return max(run(trial_seconds) for _ in range(trials))


def peak_flops_per_device(configured_tflops: float | None, dtype: str = "float32",
                          cache: bool = True) -> tuple[float, str]:  # fmt: skip
    """Peak FLOP/s of one device for training in ``dtype`` and where the figure comes from:
    the config's ``peak_tflops``; a known GPU's datasheet (:data:`GPU_PEAK_TFLOPS`); else a
    measurement (:func:`measure_matmul_flops`), cached per machine (CPU or GPU model, thread
    count, torch version, dtype) so every run on it divides by the same peak. The first
    process to take the cache's lock measures; the others wait and read its figure."""
    if configured_tflops:
        return configured_tflops * 1e12, "config peak_tflops"
    cuda = torch.cuda.is_available()
    if cuda:
        name = torch.cuda.get_device_name()
        tflops = gpu_peak_tflops(name, dtype)
        if tflops is not None:
            kind = "TF32" if dtype == "float32" else "bf16/fp16"
            return tflops * 1e12, f"{kind} dense datasheet peak of {name}"
    device = "cuda" if cuda else "cpu"
    key = {"device": torch.cuda.get_device_name() if cuda else cpu_name(),
           "threads": torch.get_num_threads(), "torch": torch.__version__, "dtype": dtype,
           "format": PEAK_CACHE_FORMAT}  # fmt: skip
    what = f"{dtype} matmul throughput of this {'GPU' if cuda else 'CPU process'}"
    if not cache:
        return measure_matmul_flops(getattr(torch, dtype), device), f"measured {what}"
    path = _peak_cache_path(key)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        lock = open(path.with_suffix(".lock"), "w")
    except OSError:  # an unwritable cache: measure (unstable across runs, but honest)
        return measure_matmul_flops(getattr(torch, dtype), device), f"measured {what}"
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        cached, load = 0.0, _load_average()
        try:
            data = json.loads(path.read_text())
            if data.get("key") == key:
                cached = float(data["flops"])
                # A figure measured while the machine was busier than now is too low (load
                # only ever slows a measurement down): measure again and keep the larger, so
                # the cached peak only rises towards the machine's own and then stays put.
                if float(data.get("load", 0.0)) - load < 1.0:
                    return cached, f"{what}, measured before (cached in {path})"
        except (OSError, ValueError, KeyError, TypeError):
            pass
        flops = max(cached, measure_matmul_flops(getattr(torch, dtype), device))
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"key": key, "flops": flops, "load": load}, indent=1))
        os.replace(tmp, path)
    return flops, f"measured {what} (cached in {path})"


def _load_average() -> float:
    """The 1-minute load average (0 where the system has none)."""
    try:
        return os.getloadavg()[0]
    except OSError:
        return 0.0


_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}


def require_reporters(names: list[str]) -> None:
    """Fail now, naming what to install, if a logger's library is absent (without importing
    it: that happens when the run starts logging)."""
    import importlib.util

    for name in names:
        package = _PACKAGES[name]
        try:
            found = importlib.util.find_spec(package) is not None
        except (ImportError, ValueError) as e:
            raise _missing(name, package, e) from None
        if not found:
            raise _missing(name, package, ModuleNotFoundError(f"No module named {package!r}"))


def _missing(name: str, package: str, error: Exception) -> ImportError:
    return ImportError(
        f"report_to includes {name!r} but the {package} package cannot be imported ({error}): "
        f"pip install {package}, or remove {name!r} from report_to"
    )


def _flatten(config: dict, prefix: str = "") -> dict:
    """{"lora": {"r": 16}} -> {"lora.r": 16}; lists and None as strings (loggers' params)."""
    out = {}
    for key, value in config.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = (
                value if isinstance(value, (int, float, str, bool)) else str(value)
            )
    return out


def answers_markdown(answers: list[dict]) -> str:
    """Eval prompts and their answers as Markdown (what the loggers show as text)."""
    return "\n\n".join(f"**Q:** {qa['prompt']}\n\n**A:** {qa['answer']}" for qa in answers)


def _scalars(record: dict) -> dict:
    return {
        k: float(v)
        for k, v in record.items()
        if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)
    }


class _TensorBoard:
    def __init__(self, output_dir: Path, resume_step: int, run: dict):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:  # torch's writer needs the tensorboard package
            raise _missing("tensorboard", "tensorboard", e) from None
        self.writer = SummaryWriter(str(output_dir / "tensorboard"), purge_step=resume_step + 1)
        self.writer.add_text("run/config", "```\n" + json.dumps(run, indent=2) + "\n```")

    def log(self, record: dict, prefix: str = "train") -> None:
        for key, value in _scalars(record).items():
            self.writer.add_scalar(f"{prefix}/{key}", value, record["step"])
        if record.get("answers"):
            self.writer.add_text(f"{prefix}/answers", answers_markdown(record["answers"]),
                                 record["step"])  # fmt: skip

    def close(self) -> None:
        self.writer.close()


class _Wandb:
    """Weights & Biases. WANDB_MODE=offline (or disabled), WANDB_PROJECT, WANDB_DIR and the
    other WANDB_* settings are wandb's own and left to it; the run's files default to
    <output_dir>/wandb."""

    def __init__(self, output_dir: Path, resume_step: int, run: dict):
        try:
            import wandb
        except ImportError as e:
            raise _missing("wandb", "wandb", e) from None
        self.wandb = wandb
        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT", "pyfast-tune"),
            name=os.environ.get("WANDB_NAME", output_dir.name),
            dir=os.environ.get("WANDB_DIR", str(output_dir)),
            config=run["config"],
        )
        self.run.summary["data_fingerprint"] = run["data_fingerprint"]
        self.run.summary["packed_dir"] = run["packed_dir"]
        self.run.summary["resumed_from_step"] = resume_step

    def log(self, record: dict, prefix: str = "train") -> None:
        values = {f"{prefix}/{k}": v for k, v in _scalars(record).items()}
        if record.get("answers"):
            values[f"{prefix}/answers"] = self.wandb.Table(
                columns=["prompt", "answer"],
                data=[[qa["prompt"], qa["answer"]] for qa in record["answers"]],
            )
        self.run.log(values, step=record["step"])

    def close(self) -> None:
        self.run.finish()


class _MLflow:
    """MLflow. MLFLOW_TRACKING_URI and MLFLOW_EXPERIMENT_NAME are respected; with no tracking
    URI set the run is written offline under <output_dir>/mlruns (never a server)."""

    def __init__(self, output_dir: Path, resume_step: int, run: dict):
        try:
            import mlflow
        except ImportError as e:
            raise _missing("mlflow", "mlflow", e) from None
        self.mlflow = mlflow
        if not os.environ.get("MLFLOW_TRACKING_URI"):
            mlflow.set_tracking_uri((output_dir / "mlruns").resolve().as_uri())
        mlflow.set_experiment(os.environ.get("MLFLOW_EXPERIMENT_NAME", "pyfast-tune"))
        self.active = mlflow.start_run(run_name=output_dir.name)
        # MLflow limits a param value to 6000 characters (500 in older servers).
        params = {k: str(v)[:500] for k, v in _flatten(run["config"]).items()}
        mlflow.log_params(params)
        mlflow.set_tags({"data_fingerprint": str(run["data_fingerprint"]),
                         "packed_dir": str(run["packed_dir"]),
                         "resumed_from_step": str(resume_step)})  # fmt: skip

    def log(self, record: dict, prefix: str = "train") -> None:
        # Training metrics keep their plain names (as before); eval ones get the prefix.
        scalars = _scalars(record)
        if prefix != "train":
            scalars = {f"{prefix}_{k}": v for k, v in scalars.items()}
        self.mlflow.log_metrics(scalars, step=record["step"])
        if record.get("answers"):
            self.mlflow.log_text(answers_markdown(record["answers"]),
                                 f"{prefix}/answers_step_{record['step']:08d}.md")  # fmt: skip

    def close(self) -> None:
        self.mlflow.end_run()


_REPORTER_CLASSES = {"tensorboard": _TensorBoard, "wandb": _Wandb, "mlflow": _MLflow}


class MetricsLog:
    """metrics.jsonl (one line per logged step) and the loggers of ``report_to``, rank 0 only.

    ``run`` is what the loggers record with the run: ``{"config": ..., "data_fingerprint":
    ..., "packed_dir": ...}``. Each logger's library is imported here, only when named; a
    missing one is an ImportError saying what to install.
    """

    def __init__(
        self,
        output_dir: Path,
        resume_step: int,
        report_to: list[str] | bool = (),
        run: dict | None = None,
    ):
        if isinstance(report_to, bool):  # the older signature: a TensorBoard switch
            report_to = ["tensorboard"] if report_to else []
        run = {"config": {}, "data_fingerprint": None, "packed_dir": None, **(run or {})}
        self.path = output_dir / "metrics.jsonl"
        self.eval_path = output_dir / "eval.jsonl"  # evaluation records (trainer.evaluate)
        output_dir.mkdir(parents=True, exist_ok=True)
        for path in (self.path, self.eval_path):
            if path.exists():
                # Drop steps after the checkpoint we resume from: they are about to be redone.
                kept = [
                    line
                    for line in path.read_text().splitlines()
                    if line.strip() and json.loads(line)["step"] <= resume_step
                ]
                path.write_text("".join(line + "\n" for line in kept))
        self.reporters = []
        try:
            for name in report_to:
                self.reporters.append(_REPORTER_CLASSES[name](output_dir, resume_step, run))
        except BaseException:
            self.close()
            raise
        self.file = self.path.open("a")

    def log(self, record: dict) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        for reporter in self.reporters:
            reporter.log(record)

    def log_eval(self, record: dict) -> None:
        """An evaluation record (step, loss, trained_tokens, samples, seconds, answers): one
        line of eval.jsonl, and ``eval/...`` in every logger (answers as text)."""
        with self.eval_path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        for reporter in self.reporters:
            reporter.log(record, prefix="eval")

    def close(self) -> None:
        if getattr(self, "file", None) is not None:
            self.file.close()
        for reporter in self.reporters:
            reporter.close()
        self.reporters = []


def read_metrics(path: str | Path) -> list[dict]:
    """The records of a metrics.jsonl file."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def plot_loss_curve(metrics_path: Path, out_png: Path) -> None:
    """Loss against step (raw and a 10-step moving average, and the eval loss of eval.jsonl
    beside ``metrics_path`` if any) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(metrics_path)
    if not records:
        return
    steps = np.array([r["step"] for r in records])
    loss = np.array([r["loss"] for r in records])
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, loss, lw=0.8, alpha=0.5, label="loss")
    if len(loss) >= 10:
        smooth = np.convolve(loss, np.ones(10) / 10, mode="valid")
        ax.plot(steps[9:], smooth, lw=1.5, label="10-step mean")
    eval_path = metrics_path.with_name("eval.jsonl")
    evals = [r for r in read_metrics(eval_path) if "loss" in r] if eval_path.is_file() else []
    if evals:  # the held-out loss (trainer.evaluate), same definition
        ax.plot([r["step"] for r in evals], [r["loss"] for r in evals], "o-", lw=1.2, ms=4,
                label="eval loss")  # fmt: skip
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (mean over trained tokens)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_png, dpi=120)
    plt.close(fig)


def _clock(seconds: float) -> str:
    seconds = int(round(max(seconds, 0)))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def step_fields(record: dict) -> dict[str, str]:
    """The console's per-step fields of a metrics record (formatted strings)."""
    tokens = record.get("tokens") or 0
    mfu = record.get("mfu")
    fields = {
        "loss": f"{record['loss']:.4f}",
        "lr": f"{record['lr']:.2e}",
        "tok/s": f"{record['tokens_per_s']:.0f}",
        "trained": f"{record['trained_tokens'] / tokens:.0%}" if tokens else "n/a",
        "MFU": f"{mfu:.1%}" if mfu is not None else "n/a",
    }
    if "rewards/accuracies" in record:  # preference objectives (TRL's names)
        fields["acc"] = f"{record['rewards/accuracies']:.2f}"
        fields["margin"] = f"{record['rewards/margins']:.3f}"
    return fields


class Console:
    """What rank 0 shows per step: on a TTY (and ``progress_bar``) one tqdm bar with step/total,
    loss, lr, tokens/s, the trained-token share, MFU and ETA; otherwise (a log file, a pipe,
    ``progress_bar: false``) one plain line per ``log_steps`` with the same fields, so logs
    are not one growing line of carriage returns. ``disabled`` (other ranks) shows nothing."""

    def __init__(self, total_steps: int, start_step: int, log_steps: int,
                 progress_bar: bool, disabled: bool = False, stream=None):  # fmt: skip
        import sys

        self.stream = stream or sys.stdout
        self.total = total_steps
        self.start = start_step
        self.log_steps = max(1, int(log_steps))
        self.disabled = disabled
        self.t0 = time.perf_counter()
        self.bar = None
        isatty = getattr(self.stream, "isatty", lambda: False)()
        if not disabled and progress_bar and isatty:
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, desc="train",
                            dynamic_ncols=True, file=self.stream)  # fmt: skip

    def step(self, record: dict) -> None:
        if self.disabled:
            return
        fields = step_fields(record)
        if self.bar is not None:
            self.bar.set_postfix(fields, refresh=False)
            self.bar.update(1)
            return
        step = record["step"]
        if step % self.log_steps and step != self.total:
            return
        done = step - self.start
        elapsed = time.perf_counter() - self.t0
        eta = elapsed / done * (self.total - step) if done else 0.0
        line = " | ".join(
            [
                f"step {step}/{self.total}",
                *(f"{k} {v}" for k, v in fields.items()),
                f"elapsed {_clock(elapsed)}",
                f"ETA {_clock(eta)}",
            ]  # fmt: skip
        )
        print(line, file=self.stream, flush=True)

    def write(self, text: str) -> None:
        """Print ``text`` (above the bar on a TTY, so the bar is not torn); nothing if disabled."""
        if self.disabled:
            return
        if self.bar is not None:
            self.bar.write(text, file=self.stream)
        else:
            print(text, file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def summary(self, records: list[dict], output_dir: Path, checkpoint: Path | None,
                loss_plot: Path | None) -> str:  # fmt: skip
        """The end-of-run lines (printed unless disabled, returned either way)."""
        seconds = time.perf_counter() - self.t0
        tokens = sum(r["tokens"] for r in records)
        trained = sum(r["trained_tokens"] for r in records)
        step_seconds = sum(r["seconds"] for r in records)
        final = f"{records[-1]['loss']:.4f}" if records else "n/a"
        lines = [
            f"done: {len(records)} steps in {_clock(seconds)}, {tokens} tokens ({trained} "
            f"trained), mean {tokens / step_seconds if step_seconds else 0:.0f} tokens/s, "
            f"final loss {final}",
            f"checkpoint: {checkpoint if checkpoint is not None else 'none saved'}",
            f"loss plot: {loss_plot if loss_plot is not None else 'none (no logged step)'}",
            f"metrics: {output_dir / 'metrics.jsonl'}",
        ]
        text = "\n".join(lines)
        if not self.disabled:
            self.close()
            print(text, file=self.stream, flush=True)
        return text
