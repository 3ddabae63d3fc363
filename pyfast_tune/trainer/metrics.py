"""Step metrics: metrics.jsonl, TensorBoard, tokens/s, MFU and the loss curve PNG.

MFU counts model FLOPs only (PaLM appendix B, https://arxiv.org/abs/2204.02311): matmul FLOPs
of every linear layer (forward 2·in·out per token, backward 2·in·out for the input gradient
plus 2·in·out for the weight gradient only when the weight is trained, so LoRA's frozen base
does not count as 6N), plus causal attention counted per *sample* (2·L²·H·D per layer forward,
3x that with backward), never per pack: attention across a 4096-token pack of 40 samples
would be 40x more FLOPs than the model actually needs. Activation recompute is not counted.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch


class FlopCounter:
    """Model FLOPs of a training step from the model's shapes (read before ZeRO partitions it)."""

    def __init__(self, model: torch.nn.Module):
        self.linear_flops_per_token = 0
        for module in model.modules():
            if isinstance(module, torch.nn.Linear):
                mac = module.in_features * module.out_features
                trained = module.weight.requires_grad
                self.linear_flops_per_token += 2 * mac * (3 if trained else 2)
        cfg = model.config
        heads = cfg.num_attention_heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
        self.attn_width = heads * head_dim
        self.layers = cfg.num_hidden_layers

    def step_flops(self, sample_lengths: np.ndarray) -> float:
        """FLOPs (forward + backward) of training on samples of these lengths."""
        lengths = np.asarray(sample_lengths, dtype=np.float64)
        attention = 3 * 2 * float((lengths**2).sum()) * self.attn_width * self.layers
        return self.linear_flops_per_token * float(lengths.sum()) + attention


def peak_flops_per_device(configured_tflops: float | None) -> tuple[float, str]:
    """Peak FLOP/s of one device and where the figure comes from."""
    if configured_tflops:
        return configured_tflops * 1e12, "config peak_tflops"
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        for key, tflops in (("H100", 989.0), ("A100", 312.0), ("L40", 181.0), ("A10", 125.0)):
            if key in name:
                return tflops * 1e12, f"bf16 dense peak of {name}"
        return 0.0, f"unknown peak for {name}: set peak_tflops"
    # No published peak for an arbitrary CPU: measure this process's fp32 matmul throughput.
    a = torch.randn(1024, 1024)
    a @ a
    t0 = time.perf_counter()
    n = 0
    while time.perf_counter() - t0 < 0.3:
        a @ a
        n += 1
    seconds = time.perf_counter() - t0
    return 2 * 1024**3 * n / seconds, "measured fp32 matmul throughput of this CPU process"


class MetricsLog:
    """metrics.jsonl (one line per optimizer step) and TensorBoard, written by rank 0 only."""

    def __init__(self, output_dir: Path, resume_step: int, tensorboard: bool):
        self.path = output_dir / "metrics.jsonl"
        output_dir.mkdir(parents=True, exist_ok=True)
        if self.path.exists():
            # Drop steps after the checkpoint we resume from: they are about to be redone.
            kept = [
                line
                for line in self.path.read_text().splitlines()
                if line.strip() and json.loads(line)["step"] <= resume_step
            ]
            self.path.write_text("".join(line + "\n" for line in kept))
        self.file = self.path.open("a")
        self.writer = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(output_dir / "tensorboard"), purge_step=resume_step + 1)

    def log(self, record: dict) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.writer is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.writer.add_scalar(f"train/{key}", value, record["step"])

    def close(self) -> None:
        self.file.close()
        if self.writer is not None:
            self.writer.close()


def read_metrics(path: str | Path) -> list[dict]:
    """The records of a metrics.jsonl file."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def plot_loss_curve(metrics_path: Path, out_png: Path) -> None:
    """Loss against step (raw and a 10-step moving average) as a PNG."""
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
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (mean over trained tokens)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_png, dpi=120)
    plt.close(fig)
