"""Evaluation during training: the loss on held-out packs and greedy answers to fixed prompts.

What XTuner's ``EvaluateChatHook`` and transformers' ``eval_steps`` give, configured by the
``eval`` section (``pyfast_tune.config.EvalConfig``), run every ``eval.steps`` optimizer steps
and after the last one. The schedule is a function of the absolute step, so a resumed run
evaluates at the same steps as an uninterrupted one.

Held-out data, ``eval.split: f``: a fraction ``f`` of the *samples* (records that encoded to a
trainable sample) of the training data, chosen by a keyed hash of each sample's source (file
name relative to the inputs' common directory, record index) and the pack seed: the
``round(f * samples)`` samples with the smallest keys. The choice depends on the records
alone, not on packing, ``max_length`` or where the files lie, and a larger fraction holds out
a superset. The data is packed once, whole (the same cached
directory as without a split, so ``split: 0`` trains exactly the packs it always did); the
training packs are those packs with the held-out samples taken out (``TrainingPacks``): no
training row ever holds a held-out token, and the remaining samples keep their packs, which
lose ~``f`` of their fill. The held-out samples are evaluated in rows of up to ``max_length``
tokens (``SamplePacks``). Re-packing the rest instead would give full packs, but at the cost
of a second packing of the whole input, and a cache entry, for every split value.

Eval loss: the training loss's definition and code (``batches.collate``, ``step.batch_loss``
with the same fused head), over the whole eval set at once: with ``loss_reduction: token`` the
mean over all trained tokens of the eval set, with ``sample`` the mean of per-sample means.
Packs are dealt out over the data-parallel ranks, no gradients, modules in eval mode (dropout
off) and restored after; the loss shares and token counts are summed over ranks.

Prompts: built by ``pyfast_tune.chat`` with the template the training data was packed with
(the engine's own encoder for XTuner templates) and answered greedily by ``chat.generate``
with a KV cache, under the model's own attention (ours is packed training attention without a
cache). Under ZeRO-3 each forward gathers the parameters collectively, so every rank runs
every decoding step and rank 0's logits are broadcast: all ranks pick the same token and stop
at the same step (no rank can hang in a gather the others never join). Without ZeRO-3 every
process holds the model: each answers its share of the prompts and the answers are gathered.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from pathlib import Path

import numpy as np
import torch

from pyfast_tune.config import ConfigError
from pyfast_tune.data import packed_row
from pyfast_tune.trainer.batches import collate, global_normalizer

log = logging.getLogger(__name__)

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer, elementwise on uint64 (wrapping arithmetic)."""
    x = x.astype(np.uint64, copy=True)
    with np.errstate(over="ignore"):
        x ^= x >> np.uint64(30)
        x *= np.uint64(0xBF58476D1CE4E5B9)
        x ^= x >> np.uint64(27)
        x *= np.uint64(0x94D049BB133111EB)
        x ^= x >> np.uint64(31)
    return x


def source_names(files: list[str]) -> list[str]:
    """Input file names relative to their common directory: what keys the split, so the same
    data held elsewhere (another mount, a copied tree, a file given by absolute path) holds
    out the same records. A directory input already names its files relative to itself."""
    import posixpath

    dirs = [posixpath.dirname(f) for f in files]
    try:
        common = posixpath.commonpath(dirs) if dirs else ""
    except ValueError:  # absolute and relative names mixed
        common = ""
    return [posixpath.relpath(f, common) if common else f for f in files]


def sample_keys(files: list[str], file_index: np.ndarray, record: np.ndarray, seed: int):
    """The hold-out key of each sample: a 64-bit hash of (seed, source file name, record)."""
    per_file = np.array(
        [
            int.from_bytes(hashlib.blake2b(f"{seed}\0{name}".encode(), digest_size=8).digest(),
                           "little")
            for name in files
        ],
        dtype=np.uint64,
    )  # fmt: skip
    with np.errstate(over="ignore"):
        mixed = per_file[np.asarray(file_index, dtype=np.int64)] + _mix64(
            np.asarray(record, dtype=np.uint64) + _GOLDEN
        )
    return _mix64(mixed)


def held_out_samples(dataset, fraction: float, seed: int) -> np.ndarray:
    """Sample ids (sorted) that ``eval.split: fraction`` holds out of ``dataset``.

    >>> held_out_samples(PackedDataset("packed/"), 0.01, seed=0)   # doctest: +SKIP
    array([  17,  230, ...])
    """
    n = dataset.num_samples
    count = int(round(fraction * n))
    if count < 1 or count >= n:
        raise ConfigError(
            f"eval.split {fraction} of {n} samples holds out {count}: it must leave at least one "
            "sample on each side (use eval.data for a separate set)"
        )
    samples = np.asarray(dataset.samples)
    keys = sample_keys(source_names(dataset.files), samples[:, 3], samples[:, 4], seed)
    pairs = getattr(dataset, "pairs", None)
    if pairs is not None:
        # Preference packs: whole pairs are held out (both samples of a pair share its record,
        # so its key; the fraction counts pairs).
        pairs = np.asarray(pairs)
        chosen = np.nonzero(pairs[:, 1] == 0)[0]
        take = chosen[np.argsort(keys[chosen], kind="stable")[: max(1, count // 2)]]
        held = np.isin(pairs[:, 0], pairs[take, 0])
        if held.all():
            raise ConfigError(f"eval.split {fraction} holds out every pair")
        return np.nonzero(held)[0]
    return np.sort(np.argsort(keys, kind="stable")[:count])


class TrainingPacks:
    """The packs of ``dataset`` with the samples ``held_out`` taken out; packs left empty are
    gone. Indexable like ``PackedDataset`` (``len``, ``[i]``, ``meta``, ``pack_lengths``).

    ``meta["fingerprint"]`` is the packed directory's combined with the held-out ids, so a
    checkpoint trained on one split refuses to resume on another.
    """

    def __init__(self, dataset, held_out: np.ndarray):
        self.dataset = dataset
        self.path = dataset.path
        self.held = np.zeros(dataset.num_samples, dtype=bool)
        self.held[held_out] = True
        pack_of = np.asarray(dataset.samples[:, 2], dtype=np.int64)
        per_pack = np.diff(np.asarray(dataset.packs[:, 1], dtype=np.int64))
        held_per_pack = np.bincount(pack_of[held_out], minlength=len(per_pack))
        self.touched = held_per_pack > 0
        self.packs = np.nonzero(held_per_pack < per_pack)[0]  # packs that still train
        lengths = np.asarray(dataset.samples[:, 1], dtype=np.int64)
        held_tokens = np.bincount(pack_of[held_out], weights=lengths[held_out],
                                  minlength=len(per_pack)).astype(np.int64)  # fmt: skip
        self._lengths = (np.asarray(dataset.pack_lengths) - held_tokens)[self.packs]
        h = hashlib.blake2b(str(dataset.meta.get("fingerprint")).encode(), digest_size=16)
        h.update(np.asarray(held_out, dtype="<i8").tobytes())
        self.meta = {
            **dataset.meta,
            "fingerprint": f"{dataset.meta.get('fingerprint')}-heldout-{h.hexdigest()}",
            "packed_fingerprint": dataset.meta.get("fingerprint"),
            "held_out_samples": int(len(held_out)),
        }
        self.num_samples = int(dataset.num_samples - len(held_out))

    def __len__(self) -> int:
        return len(self.packs)

    def __getitem__(self, i: int) -> dict:
        k = int(self.packs[i])
        pack = self.dataset[k]
        if not self.touched[k]:
            return pack
        keep = ~self.held[self.dataset.pack_sample_ids(k)]
        cu = np.asarray(pack["cu_seqlens"], dtype=np.int64)
        tokens = np.concatenate([np.arange(a, b) for a, b in zip(cu[:-1][keep], cu[1:][keep])])
        row = packed_row(pack["input_ids"][tokens], pack["labels"][tokens], np.diff(cu)[keep])
        for key in ("sample_ids", "pairs", "margins"):  # preference packs
            if key in pack:
                row[key] = pack[key][keep]
        return row

    @property
    def pack_lengths(self) -> np.ndarray:
        """Tokens in every training pack (int64)."""
        return self._lengths


class SamplePacks:
    """Samples ``sample_ids`` of ``dataset`` in input order, laid end to end in rows of at most
    ``max_length`` tokens (a longer sample gets a row of its own). Indexable like
    ``PackedDataset``. How samples are grouped changes no loss: attention and label shift
    stay inside each sample and the loss is normalised over the whole set."""

    def __init__(self, dataset, sample_ids: np.ndarray, max_length: int):
        self.dataset = dataset
        self.sample_ids = np.asarray(sample_ids, dtype=np.int64)
        lengths = np.asarray(dataset.samples[:, 1], dtype=np.int64)[self.sample_ids]
        self.rows: list[tuple[int, int]] = []  # [start, end) into sample_ids
        pairs = getattr(dataset, "pairs", None)
        # A row never separates the two samples of a pair (preference data).
        pair_of = np.asarray(pairs)[self.sample_ids, 0] if pairs is not None else None
        start, used = 0, 0
        for j, n in enumerate(lengths):
            same_pair = pair_of is not None and j > 0 and pair_of[j] == pair_of[j - 1]
            if j > start and used + n > max_length and not same_pair:
                self.rows.append((start, j))
                start, used = j, 0
            used += int(n)
        if len(lengths):
            self.rows.append((start, len(lengths)))

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        a, b = self.rows[i]
        samples = [self.dataset.sample(int(j)) for j in self.sample_ids[a:b]]
        row = packed_row(
            np.concatenate([s["input_ids"] for s in samples]),
            np.concatenate([s["labels"] for s in samples]),
            np.array([len(s["input_ids"]) for s in samples], dtype=np.int64),
        )
        if getattr(self.dataset, "pairs", None) is not None:
            row["sample_ids"] = self.sample_ids[a:b].copy()
            row["pairs"] = np.asarray(self.dataset.pairs[self.sample_ids[a:b]], dtype=np.int64)
            if getattr(self.dataset, "margins", None) is not None:
                row["margins"] = np.asarray(self.dataset.margins[self.sample_ids[a:b]],
                                            dtype=np.float32)  # fmt: skip
        return row


def split_data(cfg, dataset, cache_dir: Path | None = None):
    """(training packs, eval set or None) for ``cfg.eval``: ``eval.data`` opened (it must be
    packed with the training tokenizer; hash-checked like the training data when
    ``data.verify``, with its marker in ``cache_dir``), or ``eval.split`` held out of
    ``dataset``."""
    from pyfast_tune.data import PackedDataset

    ev = cfg.eval
    if ev.data is not None:
        eval_set = PackedDataset(ev.data)
        if cfg.data.verify and cache_dir is not None:
            from pyfast_tune.trainer.data_cache import verify_packed_dir

            verify_packed_dir(Path(ev.data), cache_dir)
        ours = dataset.meta.get("tokenizer", {}).get("hash")
        theirs = eval_set.meta.get("tokenizer", {}).get("hash")
        if ours != theirs:
            raise ConfigError(
                f"eval.data {ev.data} was packed with another tokenizer "
                f"({eval_set.meta.get('tokenizer', {}).get('path')!r}) than the training data "
                f"({dataset.meta.get('tokenizer', {}).get('path')!r}): re-pack it with the "
                "training tokenizer"
            )
        if eval_set.meta.get("template") != dataset.meta.get("template"):
            log.warning("eval.data %s was packed with template %r, the training data with %r: "
                        "the eval loss is over another prompt format", ev.data,
                        eval_set.meta.get("template"), dataset.meta.get("template"))  # fmt: skip
        return dataset, eval_set
    if ev.split:
        held = held_out_samples(dataset, ev.split, int(dataset.meta.get("seed", 0)))
        log.info("eval.split %g: %d of %d samples held out of training",
                 ev.split, len(held), dataset.num_samples)  # fmt: skip
        max_length = int(dataset.meta.get("max_length") or cfg.max_length)
        return TrainingPacks(dataset, held), SamplePacks(dataset, held, max_length)
    return dataset, None


def eval_loss(
    loss_of,
    eval_set,
    normalizer: int,
    rank: int,
    world: int,
    micro: int,
    reduction: str,
    sequence=None,
) -> torch.Tensor:
    """float64 [loss, trained tokens, samples] of ``eval_set`` summed over all processes.

    ``loss_of(batch)`` is training's ``batch_loss`` (a row's share of the loss whose weights
    are normalised by ``normalizer``). ``rank``/``world``: data-parallel coordinates; rank r
    takes rows ``(a*world + r)*micro ...`` in round a, like a training step; every rank runs
    the same number of forwards (a rank past the end runs row 0 with zero weights), as ZeRO-3's
    collective parameter gathers need. ``sequence`` (a ``SequenceParallel``): each row is
    sharded over the group as in training (``sequence_parallel.shard_row``), every shard
    contributing its tokens' share.
    """
    import torch.distributed as dist

    n = len(eval_set)
    rounds = math.ceil(n / (world * micro))
    totals = torch.zeros(3, dtype=torch.float64)
    with torch.no_grad():
        for a in range(rounds):
            start = (a * world + rank) * micro
            ids = list(range(start, min(start + micro, n)))
            batch = collate([eval_set[i] for i in ids or [0]], reduction, normalizer)
            if not ids:
                batch.weights = np.zeros_like(batch.weights)
            samples = len(batch.sample_lengths) if sequence is None or sequence.rank == 0 else 0
            if sequence is not None:
                from pyfast_tune.trainer.sequence_parallel import shard_row

                batch = shard_row(batch, sequence.size, sequence.rank)
            loss = loss_of(batch)
            if ids:
                totals += torch.tensor([float(loss), batch.num_trained, samples],
                                       dtype=torch.float64)  # fmt: skip
    if dist.is_initialized():
        dist.all_reduce(totals)
    return totals


class _RankZeroLogits:
    """A model whose every forward broadcasts rank 0's last-position logits to all ranks."""

    def __init__(self, module: torch.nn.Module):
        self.module = module

    def parameters(self):
        return self.module.parameters()

    def get_base_model(self):  # what chat.generate reads the forward's signature from
        get = getattr(self.module, "get_base_model", None)
        return get() if callable(get) else self.module

    def __call__(self, **kwargs):
        import torch.distributed as dist

        out = self.module(**kwargs)
        last = out.logits[:, -1:].float().contiguous()  # (1, 1, V)
        dist.broadcast(last, src=0)
        out.logits = last
        return out


def _eval_modes(module: torch.nn.Module) -> dict:
    """Put ``module`` in eval mode; returns every submodule's previous mode for restoring.

    bitsandbytes' 4-bit layers stay in training mode: on CPU an eval-mode no-grad forward
    repacks their weights for an inference kernel that every later training step would use.
    They have no dropout, so their mode changes nothing else.
    """
    modes = {m: m.training for m in module.modules()}
    module.eval()
    for m in modes:
        if type(m).__name__ == "Linear4bit":
            m.training = True
    return modes


class Evaluator:
    """Eval loss and prompt answers for one run; ``due(step)`` then ``evaluate(step)``.

    ``rank``/``world``: this process's data-parallel coordinates (``topology``'s data_rank
    and data_world); ``sequence``: its sequence-parallel group (None without). ``metrics``:
    rank 0's ``MetricsLog`` (None elsewhere); ``write``: rank 0's printer (the console's).
    """

    def __init__(self, cfg, eval_set, engine, *, template: str, tokenizer: str, rank: int,
                 world: int, zero_stage: int, device, metrics=None, write=print,
                 loss_of=None, sequence=None, is_first: bool | None = None,
                 reference=None):  # fmt: skip
        self.cfg = cfg
        self.ev = cfg.eval
        self.eval_set = eval_set
        self.engine = engine
        self.rank, self.world = rank, world
        self.sequence = sequence
        # The process that prints, logs and (without ZeRO-3) answers: global rank 0.
        self.is_first = (rank == 0) if is_first is None else is_first
        self.zero_stage = zero_stage
        self.device = device
        self.metrics = metrics
        self.write = write
        if loss_of is None:
            from pyfast_tune.trainer.step import batch_loss

            def loss_of(batch):
                return batch_loss(engine, batch, device, fused=cfg.fused_loss,
                                  sequence_parallel=sequence)  # fmt: skip

        self.loss_of = loss_of
        self.reference = reference  # objective dpo: the run's reference log-probabilities
        self.normalizer = 0
        if eval_set is not None and cfg.objective != "sft":
            from pyfast_tune.trainer.preference import require_pairs

            require_pairs(eval_set, cfg.objective)
        elif eval_set is not None:
            if len(eval_set) == 0:
                raise ConfigError("the eval set holds no packs")
            self.normalizer = global_normalizer(eval_set, range(len(eval_set)), cfg.loss_reduction)
        self.prompts = list(self.ev.prompts)
        if self.prompts:
            from tokenizers import Tokenizer

            from pyfast_tune.chat import prompt_format, stop_token_ids

            tok_dir = Path(tokenizer)
            self.format = prompt_format(template, tok_dir, self.ev.system)
            self.tok = Tokenizer.from_file(
                str(tok_dir / "tokenizer.json" if tok_dir.is_dir() else tok_dir)
            )
            self.stop_ids = stop_token_ids(self.format, self.tok, template, self._hf())

    @property
    def enabled(self) -> bool:
        return self.eval_set is not None or bool(self.prompts)

    def due(self, step: int, total_steps: int) -> bool:
        """Evaluate after optimizer step ``step`` (1-based)? Every ``eval.steps``, and the last."""
        if not self.enabled:
            return False
        every = self.ev.steps
        return step == total_steps or bool(every and step % every == 0)

    def due_at_start(self, start_step: int) -> bool:
        """Evaluate before the first step (``eval.at_start``)? Not when resuming: the run
        evaluated its untrained model when it started."""
        return self.enabled and self.ev.at_start and start_step == 0

    def _hf(self):
        from pyfast_tune.trainer.loss_head import hf_model

        return hf_model(self.engine)

    def evaluate(self, step: int) -> dict:
        """Run the eval loss and the prompts now; print and log them on rank 0 (the record)."""
        module = self.engine.module if hasattr(self.engine, "module") else self.engine
        modes = _eval_modes(module)
        t0 = time.perf_counter()
        record: dict = {"step": step}
        try:
            if self.eval_set is not None and self.cfg.objective != "sft":
                record.update(self._preference_figures(module))
                record["loss_seconds"] = time.perf_counter() - t0
            elif self.eval_set is not None:
                totals = eval_loss(self.loss_of, self.eval_set, self.normalizer, self.rank,
                                   self.world, self.cfg.micro_batch_size,
                                   self.cfg.loss_reduction, self.sequence)  # fmt: skip
                loss, trained, samples = totals.tolist()
                record.update(loss=loss, trained_tokens=int(trained), samples=int(samples),
                              loss_seconds=time.perf_counter() - t0)  # fmt: skip
            if self.prompts:
                t1 = time.perf_counter()
                record["answers"] = self.answer(module)
                record["answer_seconds"] = time.perf_counter() - t1
        finally:
            for m, training in modes.items():
                m.training = training
        record["seconds"] = time.perf_counter() - t0
        if self.is_first:
            self._report(record)
        return record

    def _preference_figures(self, module) -> dict:
        """The preference loss (mean over pairs) and TRL's metrics on the eval pairs."""
        from pyfast_tune.trainer.preference import eval_figures, metric_means

        figures = eval_figures(self.engine, self.eval_set, self.cfg, self.device, self.reference,
                               self.rank, self.world, self.cfg.micro_batch_size,
                               self.sequence)  # fmt: skip
        return {"loss": figures[0], "pairs": int(figures[1]),
                **metric_means(figures[1:], self.cfg.objective)}  # fmt: skip

    def answer(self, module) -> list[dict]:
        """Greedy answers to ``eval.prompts``: [{"prompt", "answer"}] in prompt order.

        Under ZeRO-3 every process decodes every prompt in lockstep (rank 0's logits decide);
        otherwise each holds the whole model, so process r answers prompts r, r+N, ... and
        the answers are gathered (no process idles in a collective while another decodes).
        """
        import torch.distributed as dist

        from pyfast_tune import patch
        from pyfast_tune.chat import generate

        world = dist.get_world_size() if dist.is_initialized() else 1
        rank = dist.get_rank() if dist.is_initialized() else 0
        lockstep = self.zero_stage == 3 and world > 1
        model = _RankZeroLogits(module) if lockstep else module
        mine = range(len(self.prompts)) if lockstep else range(rank, len(self.prompts), world)
        answers = {}
        with patch.decoding(module):
            for i in mine:
                ids = self.format.prompt_ids([], self.prompts[i])
                answers[i], _ = generate(
                    model,
                    ids,
                    lambda t: self.tok.decode(t, skip_special_tokens=False),
                    stop_ids=self.stop_ids,
                    stop_words=self.format.stop_words,
                    max_new_tokens=self.ev.max_new_tokens,
                    temperature=0.0,
                )
        if not lockstep and world > 1:
            gathered: list = [None] * world
            dist.all_gather_object(gathered, answers)
            answers = {i: a for part in gathered for i, a in part.items()}
        return [{"prompt": q, "answer": answers[i]} for i, q in enumerate(self.prompts)]

    def _report(self, record: dict) -> None:
        lines = [f"eval step {record['step']}:"]
        if "pairs" in record:  # a preference objective: TRL's accuracy and margin too
            lines[0] += (f" loss {record['loss']:.4f} over {record['pairs']} pairs, accuracy "
                         f"{record['rewards/accuracies']:.3f}, margin "
                         f"{record['rewards/margins']:.4f}")  # fmt: skip
        elif "loss" in record:
            lines[0] += (f" loss {record['loss']:.4f} over {record['trained_tokens']} trained "
                         f"tokens of {record['samples']} samples")  # fmt: skip
        for qa in record.get("answers", []):
            lines.append(f"  Q: {qa['prompt']}")
            lines.append(f"  A: {qa['answer']}")
        self.write("\n".join(lines))
        if self.metrics is not None:
            self.metrics.log_eval(record)
