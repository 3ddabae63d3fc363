"""The DeepSpeed engine a run trains with: its config, the model (built partitioned under
ZeRO-3), our attention and LoRA op, the learning-rate schedule, and ``deepspeed.initialize``."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import deepspeed
import torch
from transformers import AutoConfig

from pyfast_tune import patch
from pyfast_tune.trainer.ds_config import deepspeed_config, zero_stage
from pyfast_tune.trainer.metrics import FlopCounter
from pyfast_tune.trainer.model import build_model, count_parameters, resolve_dtype
from pyfast_tune.trainer.resume import deepspeed_tag
from pyfast_tune.trainer.runtime import Process
from pyfast_tune.trainer.sequence_parallel import check_model as check_sequence_parallel_model

log = logging.getLogger(__name__)


def lr_lambda(total_steps: int, warmup: int, kind: str, min_ratio: float):
    """The learning-rate factor of each step: linear warmup, then constant, linear or cosine
    decay to ``min_ratio``."""

    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if kind == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        decay = 0.5 * (1 + math.cos(math.pi * progress)) if kind == "cosine" else 1 - progress
        return min_ratio + (1 - min_ratio) * decay

    return factor


@dataclass
class Engine:
    """What ``deepspeed.initialize`` made of the model, and what the run needs beside it."""

    engine: Any  # deepspeed.DeepSpeedEngine (the model wrapped, with its optimizer)
    model: torch.nn.Module
    lr_scheduler: Any  # None when the DeepSpeed JSON brings its own scheduler
    zero_stage: int
    dtype: str  # the training dtype's torch name (float32, bfloat16, float16)
    flops: FlopCounter
    resume_tag: str  # the DeepSpeed tag a resume loads


def _model(cfg, ds_cfg: dict, stage: int, dtype: str, proc: Process) -> torch.nn.Module:
    """The model, with our attention and LoRA op patched in."""
    zero_init = None
    if stage == 3 and cfg.method != "qlora":
        # ZeRO-3: from_pretrained builds the model under deepspeed.zero.Init while this object
        # lives, so each process only ever holds its partition of the base weights, and a
        # model larger than one process's memory loads. (QLoRA's 4-bit base is loaded whole.)
        from transformers.integrations import HfDeepSpeedConfig

        zero_init = HfDeepSpeedConfig(ds_cfg)
    model = build_model(cfg, dtype, proc.local_rank, stage)
    if zero_init is not None:
        held = sum(p.numel() for p in model.parameters())
        full = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())
        log.info("ZeRO-3: model built partitioned (deepspeed.zero.Init): this process holds "
                 "%d of %d parameter elements", held, full)  # fmt: skip
    if cfg.attention in patch.ATTENTION_NAMES:
        attention = patch.usable_attention_backend(cfg.attention, proc.device)
        patch.apply(
            model,
            # The fused op reads 4-bit weights stored as uint8, not ZeRO-3's float storage.
            lora=cfg.fused_lora
            and cfg.method != "full"
            and not (cfg.method == "qlora" and stage == 3),
            attention=True,
            attention_backend=attention,
        )
    return model


def build_engine(cfg, proc: Process, grad_accum: int, total_steps: int,
                 resume_from: Path | None) -> Engine:  # fmt: skip
    """DeepSpeed config -> model -> schedule -> ``deepspeed.initialize``."""
    dtype = resolve_dtype(cfg.dtype)
    hidden = AutoConfig.from_pretrained(cfg.model, trust_remote_code=cfg.trust_remote_code)
    hidden = getattr(hidden, "text_config", None) or hidden  # a vision-language model's LLM
    check_sequence_parallel_model(hidden, cfg.sequence_parallel_size)
    ds_cfg = deepspeed_config(
        cfg.deepspeed,
        micro_batch_size=cfg.micro_batch_size,
        grad_accum=grad_accum,
        world_size=proc.topo.data_world,
        sequence_parallel_size=cfg.sequence_parallel_size,
        lr=cfg.lr,
        betas=tuple(cfg.adam_betas),
        eps=cfg.adam_eps,
        weight_decay=cfg.weight_decay,
        max_grad_norm=cfg.max_grad_norm,
        dtype=dtype,
        hidden_size=getattr(hidden, "hidden_size", 1024),
        gloo=proc.device.type == "cpu",
    )
    stage = zero_stage(ds_cfg)
    torch.manual_seed(cfg.seed)  # the LoRA initialisation
    model = _model(cfg, ds_cfg, stage, dtype, proc)
    flops = FlopCounter(model)  # from module shapes, whatever ZeRO did to them
    trainable, total = count_parameters(model)
    log.info("model %s: %d trainable of %d parameters (%s)", cfg.model, trainable, total, dtype)

    scheduler = None
    if "scheduler" not in ds_cfg:
        warmup = cfg.warmup_steps or math.ceil(cfg.warmup_ratio * total_steps)  # as HF's
        lam = lr_lambda(total_steps, warmup, cfg.lr_scheduler, cfg.min_lr_ratio)

        def scheduler(opt):
            return torch.optim.lr_scheduler.LambdaLR(opt, lam)

    tag = deepspeed_tag(resume_from, proc.world, ds_cfg)  # may switch ds_cfg to universal
    engine, _, _, lr_scheduler = deepspeed.initialize(
        model=model,
        model_parameters=[p for p in model.parameters() if p.requires_grad],
        config=ds_cfg,
        lr_scheduler=scheduler,
    )
    return Engine(engine, model, lr_scheduler, stage, dtype, flops, tag)
