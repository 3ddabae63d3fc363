"""Train a Hugging Face causal LM on packed data under DeepSpeed.

Entry points (all read the same YAML and accept ``--key value`` overrides of every key)::

    deepspeed --num_gpus 2 pyfast_tune/train.py --config pyfast_tune/configs/lora.yaml --lr 1e-4
    torchrun --nproc_per_node 2 pyfast_tune/train.py --config run.yaml --lora.r 16
    srun python pyfast_tune/train.py --config run.yaml     # SLURM_PROCID/NTASKS/LOCALID
    python pyfast_tune/train.py --config run.yaml          # one process
    pyfast-tune train run.yaml --nproc 2 --deepspeed zero3 # the CLI, via pyfast_tune.launch

The step loop below reads top to bottom: global batch -> this rank's micro batches -> packed
rows with per-sample shifted targets -> weighted loss -> DeepSpeed backward/step -> metrics
-> checkpoint. See ``pyfast_tune.trainer.batches`` for the order and the loss definition.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import os
import sys
import time
from pathlib import Path

from pyfast_tune.config import ConfigError
from pyfast_tune.quiet import quiet_dependencies

log = logging.getLogger("pyfast_tune.train")


def _tools_on_path() -> None:
    # DeepSpeed JIT-builds CPU ops with ninja, which lives next to this interpreter in a venv.
    bin_dir = str(Path(sys.executable).parent)
    if bin_dir not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = os.pathsep.join([bin_dir, os.environ.get("PATH", "")])


def _distributed_env() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from torchrun/deepspeed, SLURM, or a single process."""
    env = os.environ
    if "RANK" not in env and "SLURM_PROCID" in env:
        env["RANK"] = env["SLURM_PROCID"]
        env["WORLD_SIZE"] = env["SLURM_NTASKS"]
        env["LOCAL_RANK"] = env.get("SLURM_LOCALID", "0")
        env.setdefault("MASTER_ADDR", "127.0.0.1")  # multi-node: export MASTER_ADDR in sbatch
        env.setdefault("MASTER_PORT", "29500")
    if "RANK" not in env:
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        env.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
        env.setdefault("MASTER_PORT", str(port))
    return int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", "0"))


def _lr_lambda(total_steps: int, warmup: int, kind: str, min_ratio: float):
    import math

    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if kind == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        decay = 0.5 * (1 + math.cos(math.pi * progress)) if kind == "cosine" else 1 - progress
        return min_ratio + (1 - min_ratio) * decay

    return factor


def _resolve_resume(resume, output_dir: Path) -> Path | None:
    from pyfast_tune.trainer.checkpoint import latest_checkpoint

    if resume in (False, None, "false", ""):
        return None
    if resume in (True, "auto", "true", "latest"):
        return latest_checkpoint(output_dir)
    path = Path(resume)
    if (path / "trainer_state.json").is_file():
        return path
    found = latest_checkpoint(path)
    if found is None:
        raise FileNotFoundError(f"resume: no checkpoint at {path}")
    return found


def _optimizer_step(engine, dataset, order, step, topo, normalizer, flops, cfg, device):
    """This rank's micro batches of optimizer step ``step``, forward/backward/step each.

    Returns float64 [loss share, tokens, trained tokens, model FLOPs, padding tokens] of this
    rank; their sum over ranks is the step's global figures (the loss share sums to the
    global-batch loss). With sequence parallelism (``topo.sequence``) the rank trains on its
    shard of each row (``pyfast_tune.trainer.sequence_parallel``).
    """
    import numpy as np
    import torch

    from pyfast_tune.trainer.batches import collate
    from pyfast_tune.trainer.sequence_parallel import shard_row
    from pyfast_tune.trainer.step import batch_loss

    sp = topo.sequence
    micro_batches = order.micro_batches(step, topo.data_rank, topo.data_world, cfg.micro_batch_size)
    totals = torch.zeros(5, dtype=torch.float64)
    for accum_index, pack_ids in enumerate(micro_batches):
        row = accum_index * topo.data_world + topo.data_rank  # the row's index in the global batch
        # Dropout masks depend on (seed, step, row) only: identical under any world size
        # (a shard of a sequence-parallel row draws its own: its rank is in the seed too).
        key = [cfg.seed, step, row] + ([sp.rank] if sp is not None else [])
        torch.manual_seed(int(np.random.SeedSequence(key).generate_state(1)[0]))
        batch = collate([dataset[int(i)] for i in pack_ids], cfg.loss_reduction, normalizer)
        if sp is not None:
            batch = shard_row(batch, sp.size, sp.rank)
        calls = sp.attention_calls if sp is not None else 0
        loss = batch_loss(engine, batch, device, fused=cfg.fused_loss, sequence_parallel=sp)
        if sp is not None:
            sp.require_attention_since(calls)
        # DeepSpeed divides by grad_accum and averages gradients over all ranks (the shards of
        # a sequence-parallel row too); undo both so the gradient is that of the global-batch
        # loss (the sum of all rows' and shards' shares).
        engine.backward(loss * (len(micro_batches) * topo.world))
        engine.step()
        totals += torch.tensor(
            [
                float(loss.detach()),
                batch.num_tokens,
                batch.num_trained,
                flops.step_flops(batch.sample_lengths),
                batch.num_padding,
            ],
            dtype=torch.float64,
        )
    return totals


def packed_template(configured: str | None, meta: dict, packed_dir) -> str:
    """The template a packed directory was encoded with (its meta.json). A config that names
    another one would train with one template and chat with another: an error naming both."""
    packed = meta.get("template")
    if packed is None:
        raise ConfigError(f"{packed_dir}/meta.json records no template (not a packed directory?)")
    if configured is not None and configured != packed:
        raise ConfigError(
            f"data.template is {configured!r} but {packed_dir} was packed with template "
            f"{packed!r}: drop data.template (the packed directory's is used) or re-pack with "
            f"--template {configured}"
        )
    return packed


def run(cfg) -> dict:
    """Train with ``cfg`` (a ``TrainConfig``) in this process; returns a summary dict."""
    _tools_on_path()
    # bitsandbytes stays unloaded unless the run quantizes (QLoRA).
    with quiet_dependencies(cfg.show_dependency_warnings, cfg.method != "qlora"):
        return _run(cfg)


def _run(cfg) -> dict:
    import math

    import deepspeed
    import torch
    import torch.distributed as dist
    from transformers import AutoConfig

    from pyfast_tune import patch
    from pyfast_tune.config import to_dict
    from pyfast_tune.data import PackedDataset
    from pyfast_tune.hub import resolve_tokenizer
    from pyfast_tune.trainer.batches import PackOrder, global_normalizer
    from pyfast_tune.trainer.checkpoint import (
        DS_TAG,
        load_checkpoint,
        read_trainer_state,
        save_checkpoint,
        save_hf,
        universal_tag,
    )
    from pyfast_tune.trainer.data_cache import prepare_packed_dir, verify_packed_dir
    from pyfast_tune.trainer.ds_config import deepspeed_config, zero_stage
    from pyfast_tune.trainer.evaluate import Evaluator, split_data
    from pyfast_tune.trainer.metrics import (
        Console,
        FlopCounter,
        MetricsLog,
        peak_flops_per_device,
        plot_loss_curve,
        require_reporters,
        resolve_report_to,
    )
    from pyfast_tune.trainer.model import build_model, count_parameters, resolve_dtype
    from pyfast_tune.trainer.model_setup import prepare_tokenizer
    from pyfast_tune.trainer.sequence_parallel import check_model as check_sequence_parallel_model
    from pyfast_tune.trainer.sequence_parallel import topology

    rank, world, local_rank = _distributed_env()
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format=f"[rank{rank}] %(asctime)s %(name)s: %(message)s",
    )
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(local_rank)
    device = torch.device(f"cuda:{local_rank}" if cuda else "cpu")
    with (
        contextlib.redirect_stdout(io.StringIO())
        if not cfg.show_dependency_warnings
        else (contextlib.nullcontext())
    ):  # DeepSpeed prints that it built its shared-memory op, on every start
        deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo")
    # Sequence-parallel groups of N consecutive ranks; packs are split over the world / N
    # data-parallel replicas (all of it without sequence parallelism).
    topo = topology(cfg.sequence_parallel_size, rank, world)
    data_world = topo.data_world
    output_dir = Path(cfg.output_dir)
    report_to = resolve_report_to(cfg.report_to, cfg.tensorboard)
    if rank == 0:
        require_reporters(report_to)  # a missing logger fails now, not after loading the model

    # Data: mmap a packed dir (packing raw inputs once per node, under a file lock).
    cache_dir = Path(cfg.data.cache_dir or output_dir.parent / ".pyfast_cache")
    # A Hub id (the model's, by default) means its tokenizer files in the Hub cache: packing,
    # evaluation prompts and the checkpoints' copies all read that one folder.
    tokenizer = resolve_tokenizer(cfg.tokenizer or cfg.data.tokenizer or cfg.model)
    tokenizer = prepare_tokenizer(cfg, tokenizer, cache_dir)  # + new_special_tokens, if any
    packed_dir = prepare_packed_dir(cfg.data, cfg.max_length, tokenizer, cache_dir)
    if cfg.data.verify:
        verify_packed_dir(packed_dir, cache_dir)
    dataset = PackedDataset(packed_dir)
    # What checkpoints, convert, merge and chat record is the template the data was packed
    # with, never a config default.
    cfg.data.template = packed_template(cfg.data.template, dataset.meta, packed_dir)
    # eval.split takes its samples out of the training packs; eval.data is opened (verified).
    dataset, eval_set = split_data(cfg, dataset, cache_dir)

    # Batch geometry: the global batch G (packs per optimizer step) is what resume keeps fixed.
    micro = cfg.micro_batch_size
    if cfg.global_batch_size:
        if cfg.global_batch_size % (micro * data_world):
            raise ConfigError(
                f"global_batch_size {cfg.global_batch_size} is not divisible by "
                f"micro_batch_size {micro} x {data_world} data-parallel processes"
            )
        grad_accum = cfg.global_batch_size // (micro * data_world)
    else:
        grad_accum = cfg.grad_accum or 1
    global_batch = micro * grad_accum * data_world
    order = PackOrder(len(dataset), global_batch, cfg.seed)
    total_steps = cfg.max_steps or cfg.epochs * order.steps_per_epoch

    dtype = resolve_dtype(cfg.dtype)
    hidden = AutoConfig.from_pretrained(cfg.model, trust_remote_code=cfg.trust_remote_code)
    check_sequence_parallel_model(hidden, cfg.sequence_parallel_size)
    ds_cfg = deepspeed_config(
        cfg.deepspeed,
        micro_batch_size=micro,
        grad_accum=grad_accum,
        world_size=data_world,
        sequence_parallel_size=cfg.sequence_parallel_size,
        lr=cfg.lr,
        betas=tuple(cfg.adam_betas),
        eps=cfg.adam_eps,
        weight_decay=cfg.weight_decay,
        max_grad_norm=cfg.max_grad_norm,
        dtype=dtype,
        hidden_size=getattr(hidden, "hidden_size", 1024),
    )
    stage = zero_stage(ds_cfg)
    # Model, our attention and LoRA op, FLOPs (from module shapes, whatever ZeRO did).
    torch.manual_seed(cfg.seed)
    zero_init = None
    if stage == 3 and cfg.method != "qlora":
        # ZeRO-3: from_pretrained builds the model under deepspeed.zero.Init while this object
        # lives, so each process only ever holds its partition of the base weights, and a
        # model larger than one process's memory loads. (QLoRA's 4-bit base is loaded whole.)
        from transformers.integrations import HfDeepSpeedConfig

        zero_init = HfDeepSpeedConfig(ds_cfg)
    model = build_model(cfg, dtype, local_rank, stage)
    if zero_init is not None:
        held = sum(p.numel() for p in model.parameters())
        full = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())
        log.info("ZeRO-3: model built partitioned (deepspeed.zero.Init): this process holds "
                 "%d of %d parameter elements", held, full)  # fmt: skip
    if cfg.attention in patch.ATTENTION_NAMES:
        attention = patch.usable_attention_backend(cfg.attention, device)
        patch.apply(
            model,
            # The fused op reads 4-bit weights stored as uint8, not ZeRO-3's float storage.
            lora=cfg.fused_lora
            and cfg.method != "full"
            and not (cfg.method == "qlora" and stage == 3),
            attention=True,
            attention_backend=attention,
        )
    flops = FlopCounter(model)
    trainable, total = count_parameters(model)
    log.info("model %s: %d trainable of %d parameters (%s)", cfg.model, trainable, total, dtype)

    scheduler = None
    if "scheduler" not in ds_cfg:
        warmup = cfg.warmup_steps or math.ceil(cfg.warmup_ratio * total_steps)  # as HF's
        lam = _lr_lambda(total_steps, warmup, cfg.lr_scheduler, cfg.min_lr_ratio)

        def scheduler(opt):
            return torch.optim.lr_scheduler.LambdaLR(opt, lam)

    # Resuming on another world size needs DeepSpeed's universal checkpoint format.
    resume_from = _resolve_resume(cfg.resume, output_dir)
    ds_tag = DS_TAG
    if resume_from is not None:
        saved = read_trainer_state(resume_from)
        if saved["world_size"] != world and saved.get("has_optimizer", True):
            ds_tag = universal_tag(resume_from)
            ds_cfg["checkpoint"] = {"load_universal": True}

    engine, _, _, lr_scheduler = deepspeed.initialize(
        model=model,
        model_parameters=[p for p in model.parameters() if p.requires_grad],
        config=ds_cfg,
        lr_scheduler=scheduler,
    )
    exclude_frozen = cfg.method != "full"

    start_step = 0
    fingerprint = dataset.meta.get("fingerprint")
    if resume_from is not None:
        state = load_checkpoint(engine, resume_from, exclude_frozen, ds_tag)
        if state["global_batch"] != global_batch:
            raise ConfigError(
                f"{resume_from} was trained with a global batch of {state['global_batch']} packs; "
                f"this run has {global_batch} (micro {micro} x accum {grad_accum} x {data_world} "
                "data-parallel processes): set global_batch_size to resume on the same batches"
            )
        if state.get("data_fingerprint") != fingerprint:
            raise ConfigError(f"{resume_from} was trained on different data ({packed_dir})")
        start_step = state["step"]
        log.info(
            "resumed from %s at step %d (saved by %d processes)",
            resume_from,
            start_step,
            state["world_size"],
        )

    metrics = None
    if rank == 0:
        metrics = MetricsLog(
            output_dir,
            start_step,
            report_to,
            run={
                "config": to_dict(cfg),
                "data_fingerprint": fingerprint,
                "packed_dir": str(packed_dir),
            },  # fmt: skip
        )
    peak, peak_source = peak_flops_per_device(cfg.peak_tflops, dtype)
    log.info("MFU peak per device: %.3g FLOP/s (%s)", peak, peak_source)
    trainer_state = {
        "global_batch": global_batch,
        "world_size": world,
        "seed": cfg.seed,
        "data_fingerprint": fingerprint,
        "packed_dir": str(packed_dir),
        "template": cfg.data.template,
        "config": to_dict(cfg),
    }

    saved: list[Path] = []

    def checkpoint(step: int) -> Path:
        path = save_checkpoint(
            engine,
            model,
            output_dir,
            step,
            trainer_state,
            zero_stage=stage,
            save_optimizer=cfg.save_optimizer,
            save_hf_output=cfg.save_hf,
            exclude_frozen=exclude_frozen,
            tokenizer=tokenizer,
            save_total_limit=cfg.save_total_limit,
            protect=resume_from,
        )
        saved.append(path)
        return path

    console = Console(total_steps, start_step, cfg.log_steps, cfg.progress_bar, disabled=rank != 0)
    evaluator = Evaluator(cfg, eval_set, engine, template=cfg.data.template, tokenizer=tokenizer,
                          rank=topo.data_rank, world=topo.data_world, sequence=topo.sequence,
                          is_first=rank == 0, zero_stage=stage, device=device,
                          metrics=metrics, write=console.write)  # fmt: skip
    if evaluator.due_at_start(start_step):  # eval.at_start: the untrained model, a baseline
        evaluator.evaluate(0)
    records = []
    engine.train()
    last_saved = start_step if resume_from is not None else -1
    losses = []
    run_start = time.perf_counter()
    step = start_step
    for step in range(start_step, total_steps):
        t0 = time.perf_counter()
        normalizer = global_normalizer(dataset, order.global_batch(step), cfg.loss_reduction)
        lr = lr_scheduler.get_last_lr()[0] if lr_scheduler is not None else cfg.lr
        totals = _optimizer_step(engine, dataset, order, step, topo, normalizer, flops, cfg, device)
        dist.all_reduce(totals)
        seconds = time.perf_counter() - t0
        loss_value, tokens, trained, step_flops, padding = totals.tolist()
        losses.append(loss_value)
        if rank == 0:
            grad_norm = engine.get_global_grad_norm()
            record = {
                "step": step + 1,
                "epoch": order.epoch_of(step),
                "loss": loss_value,
                "lr": lr,
                "tokens": int(tokens),
                "trained_tokens": int(trained),
                "padding_tokens": int(padding),  # sequence-parallel rows' padding, not in MFU
                "seconds": seconds,
                "elapsed": time.perf_counter() - run_start,
                "tokens_per_s": tokens / seconds,
                "trained_tokens_per_s": trained / seconds,
                "mfu": step_flops / seconds / (peak * world) if peak else None,
                "grad_norm": float(grad_norm) if grad_norm is not None else None,
            }
            if (step + 1) % cfg.log_steps == 0 or step + 1 == total_steps:
                metrics.log(record)
            records.append(record)
            console.step(record)
        done = step + 1
        if evaluator.due(done, total_steps):  # before saving: a checkpoint implies its eval
            evaluator.evaluate(done)
        if cfg.save_steps and done % cfg.save_steps == 0:
            checkpoint(done)
            last_saved = done
        if cfg.stop_after_steps and done >= cfg.stop_after_steps:
            log.info("stop_after_steps=%d reached: stopping without a final save", done)
            break
    else:
        if total_steps > start_step and last_saved != total_steps:
            checkpoint(total_steps)
        if cfg.save_hf:
            save_hf(engine, model, output_dir / "hf", stage, tokenizer)
    console.close()
    if rank == 0:
        metrics.close()
        plot = output_dir / "loss.png"
        plot_loss_curve(metrics.path, plot)
        console.summary(records, output_dir, saved[-1] if saved else None,
                        plot if plot.is_file() else None)  # fmt: skip
    if hasattr(engine, "destroy"):
        engine.destroy()
    dist.barrier()
    return {"losses": losses, "start_step": start_step, "steps": step + 1 - start_step}


def _parse(argv: list[str]) -> tuple[str | None, list[str]]:
    parser = argparse.ArgumentParser(
        prog="pyfast_tune/train.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", help="YAML config (see pyfast_tune/configs/)")
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    args, overrides = parser.parse_known_args(argv)
    if args.local_rank is not None:
        os.environ.setdefault("LOCAL_RANK", str(args.local_rank))
    return args.config, overrides


def train_main(argv: list[str]) -> int:
    """Train in this process (one rank of a launch); returns the exit code.

    >>> train_main(["--config", "pyfast_tune/configs/lora.yaml", "--max_steps", "2"])  # doctest: +SKIP
    0
    """
    import torch.distributed as dist

    from pyfast_tune.config import load_config

    config_path, overrides = _parse(argv)
    cfg = load_config(config_path, overrides)
    try:
        run(cfg)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    if __package__ in (None, ""):
        # Run as a script by deepspeed/torchrun: Python put pyfast_tune/ first on sys.path,
        # where kernels/ and config.py would shadow top-level modules of those names
        # (bitsandbytes imports a `kernels` package); put the project root there instead.
        # Every pyfast_tune import in this file is inside a function, so this still comes first.
        sys.path[0] = str(Path(__file__).resolve().parents[1])
    sys.exit(train_main(sys.argv[1:]))
