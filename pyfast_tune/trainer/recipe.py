"""The training recipe a rank runs: ``setup(cfg) -> Run``, then ``train(run)``.

``setup`` reads top to bottom: the process (rank, device, process group) -> the data (a packed
directory, mmapped) -> the batch geometry and order -> the engine (model, our kernels,
DeepSpeed) -> resume -> metrics, console and evaluation. ``train`` is the step loop: global
batch -> this rank's micro batches (``step.optimizer_step``) -> metrics -> evaluation ->
checkpoint. Import it under ``pyfast_tune.quiet.quiet_dependencies`` (``pyfast_tune.train.run``
does), which must be active while DeepSpeed and transformers are first imported.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch.distributed as dist

from pyfast_tune.config import resolve_report_to, to_dict
from pyfast_tune.data import PackedDataset
from pyfast_tune.hub import resolve_tokenizer
from pyfast_tune.trainer.batches import PackOrder, global_normalizer, grad_accumulation
from pyfast_tune.trainer.checkpoint import save_checkpoint, save_hf
from pyfast_tune.trainer.data_cache import packed_template, prepare_packed_dir, verify_packed_dir
from pyfast_tune.trainer.engine import Engine, build_engine
from pyfast_tune.trainer.evaluate import Evaluator, split_data
from pyfast_tune.trainer.metrics import (
    Console,
    MetricsLog,
    peak_flops_per_device,
    plot_loss_curve,
    require_reporters,
)
from pyfast_tune.trainer.model_setup import prepare_tokenizer
from pyfast_tune.trainer.resume import resolve_resume, restore
from pyfast_tune.trainer.runtime import Process, start_process
from pyfast_tune.trainer.step import optimizer_step

log = logging.getLogger("pyfast_tune.train")


@dataclass
class Data:
    """The training data of a run: packs, held-out evaluation data, and the tokenizer files."""

    tokenizer: str | None  # a folder of tokenizer files: packing, eval prompts, checkpoints
    packed_dir: Path
    dataset: Any  # PackedDataset, or its training part when eval.split holds samples out
    eval_set: Any  # what pyfast_tune.trainer.evaluate.split_data returned for evaluation
    fingerprint: str | None


@dataclass
class Run:
    """Everything ``train`` needs, made by ``setup``."""

    cfg: Any  # pyfast_tune.config.TrainConfig
    proc: Process
    data: Data
    order: PackOrder
    global_batch: int  # packs per optimizer step: what resume keeps fixed
    total_steps: int
    trained: Engine
    resume_from: Path | None
    start_step: int
    metrics: MetricsLog | None  # rank 0 only
    console: Console
    evaluator: Evaluator
    peak_flops: float | None  # per device, for MFU
    trainer_state: dict  # recorded with every checkpoint
    saved: list[Path] = field(default_factory=list)
    reference: Any = None  # objective dpo: pyfast_tune.trainer.preference.Reference


def _setup_data(cfg, output_dir: Path) -> Data:
    """mmap a packed dir (packing raw inputs once per node, under a file lock)."""
    cache_dir = Path(cfg.data.cache_dir or output_dir.parent / ".pyfast_cache")
    # A Hub id (the model's, by default) means its tokenizer files in the Hub cache: packing,
    # evaluation prompts and the checkpoints' copies all read that one folder.
    tokenizer = resolve_tokenizer(cfg.tokenizer or cfg.data.tokenizer or cfg.model)
    tokenizer = prepare_tokenizer(cfg, tokenizer, cache_dir)  # + new_special_tokens, if any
    from pyfast_tune.vision.run import llava_run

    llava = llava_run(cfg)  # LLaVA: packing counts images at their training size
    packed_dir = prepare_packed_dir(cfg.data, cfg.max_length, tokenizer, cache_dir)
    if cfg.data.verify:
        verify_packed_dir(packed_dir, cache_dir)
    dataset = PackedDataset(packed_dir)
    if cfg.objective != "sft":
        from pyfast_tune.trainer.preference import require_pairs

        require_pairs(dataset, cfg.objective)
    # What checkpoints, convert, merge and chat record is the template the data was packed
    # with, never a config default.
    cfg.data.template = packed_template(cfg.data.template, dataset.meta, packed_dir)
    # eval.split takes its samples out of the training packs; eval.data is opened (verified).
    dataset, eval_set = split_data(cfg, dataset, cache_dir)
    if llava is not None:  # packs at training length (image tokens expanded) with their images
        dataset = llava.wrap(dataset)
    # The training part's fingerprint: with eval.split it names the held-out samples too.
    return Data(tokenizer, packed_dir, dataset, eval_set, dataset.meta.get("fingerprint"))


def setup(cfg) -> Run:
    """Join the launch, open the data, build the engine, resume if asked; the run to train."""
    proc = start_process(cfg.sequence_parallel_size, cfg.show_dependency_warnings)
    output_dir = Path(cfg.output_dir)
    report_to = resolve_report_to(cfg.report_to, cfg.tensorboard)
    if proc.is_first:
        require_reporters(report_to)  # a missing logger fails now, not after loading the model
    data = _setup_data(cfg, output_dir)

    data_world = proc.topo.data_world
    grad_accum = grad_accumulation(cfg.micro_batch_size, data_world, cfg.global_batch_size,
                                   cfg.grad_accum)  # fmt: skip
    global_batch = cfg.micro_batch_size * grad_accum * data_world
    order = PackOrder(len(data.dataset), global_batch, cfg.seed)
    total_steps = cfg.max_steps or cfg.epochs * order.steps_per_epoch

    resume_from = resolve_resume(cfg.resume, output_dir)
    trained = build_engine(cfg, proc, grad_accum, total_steps, resume_from)
    # DPO's reference: before resume, so a precomputed table is of the starting weights.
    from pyfast_tune.trainer.preference import build_reference

    cache_dir = Path(cfg.data.cache_dir or output_dir.parent / ".pyfast_cache")
    reference = build_reference(cfg, trained, data.dataset, cache_dir, proc)
    eval_reference = reference
    if reference is not None and reference.table is not None and cfg.eval.data is not None:
        # eval.data is another packed directory: its samples get their own table.
        eval_reference = build_reference(cfg, trained, data.eval_set, cache_dir, proc)
    start_step = 0
    if resume_from is not None:
        geometry = (f"micro {cfg.micro_batch_size} x accum {grad_accum} x {data_world} "
                    "data-parallel processes")  # fmt: skip
        start_step = restore(trained.engine, resume_from, trained.resume_tag,
                             cfg.method != "full", global_batch=global_batch, geometry=geometry,
                             fingerprint=data.fingerprint, packed_dir=data.packed_dir)  # fmt: skip

    trainer_state = {"global_batch": global_batch, "world_size": proc.world, "seed": cfg.seed,
                     "data_fingerprint": data.fingerprint, "packed_dir": str(data.packed_dir),
                     "template": cfg.data.template, "config": to_dict(cfg)}  # fmt: skip
    metrics = None
    if proc.is_first:
        metrics = MetricsLog(output_dir, start_step, report_to, run={
            k: trainer_state[k] for k in ("config", "data_fingerprint", "packed_dir")})  # fmt: skip
    peak, peak_source = peak_flops_per_device(cfg.peak_tflops, trained.dtype)
    log.info("MFU peak per device: %.3g FLOP/s (%s)", peak, peak_source)
    console = Console(total_steps, start_step, cfg.log_steps, cfg.progress_bar,
                      disabled=not proc.is_first)  # fmt: skip
    topo = proc.topo
    evaluator = Evaluator(cfg, data.eval_set, trained.engine, template=cfg.data.template,
                          tokenizer=data.tokenizer, rank=topo.data_rank, world=topo.data_world,
                          sequence=topo.sequence, is_first=proc.is_first,
                          zero_stage=trained.zero_stage, device=proc.device, metrics=metrics,
                          write=console.write, reference=eval_reference)  # fmt: skip
    return Run(cfg, proc, data, order, global_batch, total_steps, trained, resume_from,
               start_step, metrics, console, evaluator, peak, trainer_state,
               reference=reference)  # fmt: skip


def train(run: Run) -> dict:
    """The step loop; returns {"losses": global-batch loss per step, "start_step", "steps"}."""
    cfg, engine, dataset = run.cfg, run.trained.engine, run.data.dataset
    if run.evaluator.due_at_start(run.start_step):  # eval.at_start: the untrained model
        run.evaluator.evaluate(0)
    engine.train()
    last_saved = run.start_step if run.resume_from is not None else -1
    losses, records = [], []
    run_start = time.perf_counter()
    step = run.start_step
    for step in range(run.start_step, run.total_steps):
        t0 = time.perf_counter()
        normalizer = _normalizer(cfg, dataset, run.order.global_batch(step))
        scheduler = run.trained.lr_scheduler
        lr = scheduler.get_last_lr()[0] if scheduler is not None else cfg.lr
        totals = optimizer_step(engine, dataset, run.order, step, run.proc.topo, normalizer,
                                run.trained.flops, cfg, run.proc.device,
                                reference=run.reference)  # fmt: skip
        dist.all_reduce(totals)
        now = time.perf_counter()
        losses.append(float(totals[0]))
        if run.proc.is_first:
            records.append(_log_step(run, step, totals.tolist(), lr, now - t0, now - run_start))
        done = step + 1
        if run.evaluator.due(done, run.total_steps):  # before saving: a checkpoint implies it
            run.evaluator.evaluate(done)
        if cfg.save_steps and done % cfg.save_steps == 0:
            _save(run, done)
            last_saved = done
        if cfg.stop_after_steps and done >= cfg.stop_after_steps:
            log.info("stop_after_steps=%d reached: stopping without a final save", done)
            break
    else:
        if run.total_steps > run.start_step and last_saved != run.total_steps:
            _save(run, run.total_steps)
        if cfg.save_hf:
            t = run.trained
            save_hf(t.engine, t.model, Path(cfg.output_dir) / "hf", t.zero_stage,
                    run.data.tokenizer)  # fmt: skip
    _close(run, records)
    return {"losses": losses, "start_step": run.start_step, "steps": step + 1 - run.start_step}


def _normalizer(cfg, dataset, pack_ids):
    """The global batch's loss denominator: trained tokens or samples (sft), pairs (preference)."""
    if cfg.objective != "sft":
        from pyfast_tune.trainer.preference import global_pairs

        return global_pairs(dataset, pack_ids)
    return global_normalizer(dataset, pack_ids, cfg.loss_reduction)


def _log_step(run: Run, step: int, totals: list[float], lr: float, seconds: float,
              elapsed: float) -> dict:  # fmt: skip
    """Rank 0: the step's record (global figures), to metrics.jsonl and the console."""
    loss, tokens, trained, step_flops, padding = totals[:5]
    grad_norm = run.trained.engine.get_global_grad_norm()
    peak = run.peak_flops
    record = {
        "step": step + 1,
        "epoch": run.order.epoch_of(step),
        "loss": loss,
        "lr": lr,
        "tokens": int(tokens),
        "trained_tokens": int(trained),
        "padding_tokens": int(padding),  # sequence-parallel rows' padding, not in MFU
        "seconds": seconds,
        "elapsed": elapsed,
        "tokens_per_s": tokens / seconds,
        "trained_tokens_per_s": trained / seconds,
        "mfu": step_flops / seconds / (peak * run.proc.world) if peak else None,
        "grad_norm": float(grad_norm) if grad_norm is not None else None,
    }
    if run.cfg.objective != "sft":  # TRL's names: rewards/chosen, logps/rejected, ...
        from pyfast_tune.trainer.preference import metric_means

        record["pairs"] = int(totals[5])
        record.update(metric_means(totals[5:], run.cfg.objective))
    if (step + 1) % run.cfg.log_steps == 0 or step + 1 == run.total_steps:
        run.metrics.log(record)
    run.console.step(record)
    return record


def _save(run: Run, step: int) -> Path:
    cfg, t = run.cfg, run.trained
    path = save_checkpoint(t.engine, t.model, Path(cfg.output_dir), step, run.trainer_state,
                           zero_stage=t.zero_stage, save_optimizer=cfg.save_optimizer,
                           save_hf_output=cfg.save_hf, exclude_frozen=cfg.method != "full",
                           tokenizer=run.data.tokenizer, save_total_limit=cfg.save_total_limit,
                           protect=run.resume_from)  # fmt: skip
    run.saved.append(path)
    return path


def _close(run: Run, records: list[dict]) -> None:
    """The console's summary and the loss curve (rank 0); the engine and the group released."""
    run.console.close()
    if run.proc.is_first:
        run.metrics.close()
        output_dir = Path(run.cfg.output_dir)
        plot = output_dir / "loss.png"
        plot_loss_curve(run.metrics.path, plot)
        run.console.summary(records, output_dir, run.saved[-1] if run.saved else None,
                            plot if plot.is_file() else None)  # fmt: skip
    if hasattr(run.trained.engine, "destroy"):
        run.trained.engine.destroy()
    dist.barrier()
