"""Preference training on packed pairs: one row holds whole pairs (chosen and rejected are
adjacent segments, each attending only to itself), and one forward gives every segment's
sequence log-probability.

Per row: the per-token log-probabilities come from the fused linear cross-entropy head with
``reduction="none"`` (never the tokens × vocabulary logits), masked by the loss mask — the
targets are -100 wherever the packed loss mask is 0, whatever the token id (XTuner's DPO
treats label id 0 as "ignore", which drops Qwen's token 0, "!", from its log-probabilities).
Segment sums give each sample's log-probability; ``pairs`` (each sample's pair id and role,
stored by the packer) says which two segments form a pair — never their parity. The pair
losses of ``pyfast_tune.trainer.objectives`` are summed over the row's pairs and divided by
the pairs of the whole global batch, so every pair weighs the same whatever pack, micro step
or rank it lands in, and the global-batch loss equals the mean over its pairs.

Under sequence parallelism each rank holds a slice of the row: its segment sums are partial,
and an all-reduce over the group (whose backward passes the gradient through unchanged) gives
every rank the whole sums. Each rank then computes the same row loss; the gradient reaching a
rank's slice is the true one, and DeepSpeed's sum over ranks is the row's gradient.

The reference log-probabilities (DPO) come from a ``Reference``: the policy with its adapters
disabled (LoRA/QLoRA, each step, no extra memory), or a table of every sample's reference
log-probability computed once before the first step (full fine-tuning's starting weights,
``reference: precompute``, or another model), cached beside the packs under a key of the
reference's and the data's fingerprints.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from pyfast_tune.config import ConfigError
from pyfast_tune.trainer.batches import IGNORE, PackedBatch, collate, pack_trained_counts
from pyfast_tune.trainer.loss_head import fused_loss_head, hf_model
from pyfast_tune.trainer.objectives import (
    METRICS,
    SequenceLogps,
    dpo_losses,
    orpo_odds_ratio,
    pair_metrics,
    reward_losses,
    simpo_losses,
)

log = logging.getLogger(__name__)

# What a row reports besides its loss share: the pair count, then the sums of METRICS.
NUM_FIGURES = 1 + len(METRICS)


@dataclass(frozen=True)
class PairNormalizer:
    """Denominators of a global batch: its pairs, and its chosen completions' trained tokens
    (ORPO's NLL term is the token mean over them, as TRL's)."""

    pairs: int
    chosen_tokens: int


def pair_counts(pack: dict) -> tuple[int, int]:
    """(pairs, trained tokens of the chosen completions) of one pack."""
    roles = np.asarray(pack["pairs"])[:, 1]
    trained = pack_trained_counts(pack)
    return int((roles == 0).sum()), int(trained[roles == 0].sum())


def global_pairs(dataset, pack_ids) -> PairNormalizer:
    """The ``PairNormalizer`` of the packs ``pack_ids`` (every rank computes it from the data)."""
    pairs = tokens = 0
    for i in pack_ids:
        p, t = pair_counts(dataset[int(i)])
        pairs += p
        tokens += t
    return PairNormalizer(pairs, tokens)


def require_pairs(dataset, objective: str) -> None:
    """A preference objective needs a preference pack: fail before the model loads."""
    base = getattr(dataset, "dataset", dataset)
    if getattr(base, "pairs", None) is None:
        raise ConfigError(
            f"objective {objective} trains on preference pairs, but {base.path} holds no pairs "
            "(pack the data with --format preference)"
        )


def pair_layout(pairs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Segment indices of each pair's chosen and rejected sample in a row: two (P,) arrays.

    pairs: (n, 2) int64, each segment's (pair id, role). Every pair must have both roles in
    the row (the packer never splits a pair; a row that does is a corrupt input).
    """
    pairs = np.asarray(pairs, dtype=np.int64)
    order = np.lexsort((pairs[:, 1], pairs[:, 0]))  # by pair id, then role (chosen first)
    if len(order) % 2:
        raise ValueError(f"a preference row holds {len(order)} samples: a pair is split")
    grouped = order.reshape(-1, 2)
    ids, roles = pairs[grouped, 0], pairs[grouped, 1]
    if not (
        np.all(ids[:, 0] == ids[:, 1]) and np.all(roles[:, 0] == 0) and np.all(roles[:, 1] == 1)
    ):
        raise ValueError("a preference row does not hold each pair's chosen and rejected sample")
    return grouped[:, 0], grouped[:, 1]


def local_segments(batch: PackedBatch, sequence_parallel=None) -> np.ndarray:
    """Each local token's segment index (samples 0..n-1; n = a sequence-parallel pad)."""
    cu = np.asarray(batch.cu_seqlens, dtype=np.int64)
    n = len(batch.pairs)
    length = len(batch.input_ids)
    start = 0 if sequence_parallel is None else sequence_parallel.rank * length
    positions = np.arange(start, start + length)
    return np.minimum(np.searchsorted(cu, positions, side="right") - 1, n)


class _SumOverGroup(torch.autograd.Function):
    """All-reduce (sum) whose backward is the identity: every rank computes the same loss from
    the summed values, so the gradient of its own partial sum is the incoming one."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        y = x.clone()
        dist.all_reduce(y, group=group)
        return y

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


def segment_sums(values: torch.Tensor, segments: torch.Tensor, n: int,
                 sequence_parallel=None) -> torch.Tensor:  # fmt: skip
    """(n,) sums of ``values`` (T,) per segment (the whole row's, under sequence parallelism)."""
    out = values.new_zeros(n + 1).index_add(0, segments, values)[:n]
    if sequence_parallel is not None:
        out = _SumOverGroup.apply(out, sequence_parallel.group)
    return out


def token_logps(model, inputs: dict, targets: torch.Tensor, fused: bool) -> torch.Tensor:
    """(T,) fp32 log-probability of each target, 0 where the target is -100."""
    head = fused_loss_head(model, inputs) if fused else None
    if head is None:
        logits = model(**inputs).logits[0].float()  # (T, V)
        safe = targets.clamp(min=0)
        logp = torch.log_softmax(logits, dim=-1).gather(1, safe[:, None])[:, 0]
        return torch.where(targets != IGNORE, logp, torch.zeros_like(logp))
    with head.computing_loss(targets, None, reduction="none"):
        ce = model(**inputs).logits  # what the head returned: (T,) cross-entropies
    if ce.dim() != 1:
        raise RuntimeError(f"fused loss: the model returned {tuple(ce.shape)} for per-token losses")
    return -ce.float()


def sequence_logps(model, batch: PackedBatch, device, fused: bool, sequence_parallel=None,
                   inputs: dict | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """(per-token log-probs (T,), per-segment sums (n,), per-segment trained tokens (n,))."""
    from pyfast_tune.trainer.step import model_inputs

    inputs = inputs or model_inputs(batch, device, sequence_parallel)
    targets = torch.from_numpy(batch.targets).to(device)
    n = len(batch.pairs)
    segments = torch.from_numpy(local_segments(batch, sequence_parallel)).to(device)
    per_token = token_logps(model, inputs, targets, fused)
    sums = segment_sums(per_token, segments, n, sequence_parallel)
    with torch.no_grad():
        trained = (targets != IGNORE).to(per_token.dtype)
        counts = segment_sums(trained, segments, n, sequence_parallel)
    return per_token, sums, counts


def score_positions(input_ids: np.ndarray, cu_seqlens: np.ndarray, n: int,
                    pad_token_id: int | None) -> np.ndarray:  # fmt: skip
    """Where each of the first ``n`` segments is scored: its last token whose id is not
    ``pad_token_id`` — transformers' ``*ForSequenceClassification`` rule, so an exported
    model scores a conversation at the position training did (the segment's last token when
    it is not the pad id; with pad = EOS, the token before a final EOS, as TRL's reward
    models)."""
    ids = np.asarray(input_ids)
    cu = np.asarray(cu_seqlens, dtype=np.int64)
    out = cu[1 : n + 1] - 1
    if pad_token_id is None:
        return out
    for k in range(n):
        real = np.nonzero(ids[cu[k] : cu[k + 1]] != pad_token_id)[0]
        out[k] = cu[k] + (real[-1] if len(real) else cu[k + 1] - cu[k] - 1)
    return out


def reward_scores(model, inputs: dict, batch: PackedBatch) -> torch.Tensor:
    """(n,) scalar scores of each segment of an unsharded row (``score_positions``) from a
    sequence-classification model's ``score`` head, read by a forward hook so every
    wrapper's forward runs."""
    hf = hf_model(model)
    head = getattr(hf, "score", None)
    if head is None:
        raise ConfigError(f"objective reward needs a sequence-classification model with a "
                          f"`score` head; {type(hf).__name__} has none")  # fmt: skip
    seen = []
    hook = head.register_forward_hook(lambda mod, args, out: seen.append(out))
    try:
        model(**inputs)
    finally:
        hook.remove()
    if len(seen) != 1:
        raise RuntimeError(f"the model called its score head {len(seen)} times in one forward")
    out = seen[0].reshape(-1, seen[0].shape[-1])  # (T, 1)
    pad = getattr(hf.config, "pad_token_id", None)
    n = len(batch.sample_lengths)
    last = torch.from_numpy(score_positions(batch.input_ids, batch.cu_seqlens, n, pad))
    return out[last.to(out.device), 0].float()


class Reference:
    """Reference log-probabilities of a DPO run's samples.

    ``table``: (num_samples,) float64 indexed by sample id (precomputed), or None: the policy
    with its adapters disabled, each step.
    """

    def __init__(self, table: np.ndarray | None = None):
        self.table = table

    def logps(self, model, batch: PackedBatch, device, fused: bool, sequence_parallel=None,
              inputs: dict | None = None) -> torch.Tensor:  # fmt: skip
        """(n,) reference log-probability of each segment of ``batch``."""
        if self.table is not None:
            return torch.from_numpy(self.table[batch.sample_ids]).to(device=device,
                                                                   dtype=torch.float32)  # fmt: skip
        with torch.no_grad(), adapters_disabled(model), eval_mode(model):
            _, sums, _ = sequence_logps(model, batch, device, fused, sequence_parallel, inputs)
        return sums.detach()


class adapters_disabled:
    """The peft model inside ``model`` runs without its adapters while inside."""

    def __init__(self, model):
        self.peft = _peft_model(model)
        if self.peft is None:
            raise ConfigError("reference: policy computed each step needs LoRA adapters to "
                              "disable; full fine-tuning precomputes it")  # fmt: skip

    def __enter__(self):
        self.ctx = self.peft.disable_adapter()
        self.ctx.__enter__()

    def __exit__(self, *exc):
        return self.ctx.__exit__(*exc)


class eval_mode:
    """Dropout off while inside (the reference is a deterministic function of its weights, as
    TRL's reference model in eval mode); each module's mode restored after.

    Only the modules that drop (``nn.Dropout`` and attention layers with an
    ``attention_dropout``) switch: a whole-model ``eval()`` is a state change for some layers
    (bitsandbytes' 4-bit linear on CPU repacks its weights for an inference kernel on its first
    eval-mode forward), which would make a gradient-checkpointed recompute of the policy's
    forward differ from the forward it recomputes."""

    def __init__(self, model):
        self.model = model

    def __enter__(self):
        drops = [m for m in self.model.modules()
                 if isinstance(m, torch.nn.modules.dropout._DropoutNd)
                 or hasattr(m, "attention_dropout")]  # fmt: skip
        self.modes = {m: m.training for m in drops}
        for m in drops:
            m.training = False

    def __exit__(self, *exc):
        for m, training in self.modes.items():
            m.training = training


def _peft_model(model):
    m = model
    for _ in range(4):
        if hasattr(m, "disable_adapter") and hasattr(m, "peft_config"):
            return m
        inner = m._modules.get("module")
        if inner is None:
            return None
        m = inner
    return None


def row_loss(model, batch: PackedBatch, device, cfg, norm: PairNormalizer,
             reference: Reference | None, sequence_parallel=None):  # fmt: skip
    """This row's share of the global-batch preference loss.

    Returns (the loss to backpropagate, the share to report, figures (NUM_FIGURES,) float64:
    this row's pairs and its sums of ``METRICS``). Under sequence parallelism every rank of
    the group backpropagates the whole row's pair loss (see the module doc) and reports
    1/size of it; the figures are counted on the group's rank 0.
    """
    from pyfast_tune.trainer.step import model_inputs

    objective, pref = cfg.objective, cfg.preference
    sp = sequence_parallel
    chosen, rejected = pair_layout(batch.pairs)
    c, r = torch.from_numpy(chosen).to(device), torch.from_numpy(rejected).to(device)
    inputs = model_inputs(batch, device, sp)
    nll = None
    ref = None
    if objective == "reward":
        scores = reward_scores(model, inputs, batch)
        margin = None
        if batch.margins is not None:  # the pairs' `margin` column, as TRL's RewardTrainer
            margin = torch.from_numpy(batch.margins[chosen]).to(scores.device, scores.dtype)
        losses = reward_losses(scores[c], scores[r], margin, pref.center_rewards_coefficient)
        metrics = pair_metrics("reward", pref.beta, None, scores=(scores[c], scores[r]))
    else:
        # The reference first: nothing runs between the policy's forward and its backward
        # (a gradient-checkpointed recompute must see the state its forward saw).
        ref_sums = None
        if objective == "dpo":
            ref_sums = reference.logps(model, batch, device, cfg.fused_loss, sp, inputs)
        per_token, sums, counts = sequence_logps(model, batch, device, cfg.fused_loss, sp, inputs)
        pol = SequenceLogps(sums[c], sums[r], counts[c], counts[r])
        if objective == "dpo":
            ref = SequenceLogps(ref_sums[c], ref_sums[r], counts[c], counts[r])
            losses = dpo_losses(pol, ref, pref.beta, pref.loss_type, pref.label_smoothing)
        elif objective == "orpo":
            losses = orpo_odds_ratio(pol, pref.beta)
            # The NLL of the chosen completions: a token mean over the global batch's.
            segments = torch.from_numpy(local_segments(batch, sp)).to(device)
            is_chosen = torch.zeros(len(batch.pairs) + 1, dtype=torch.bool, device=device)
            is_chosen[c] = True
            nll = -(per_token * is_chosen[segments]).sum() / max(norm.chosen_tokens, 1)
        elif objective == "simpo":
            losses = simpo_losses(pol, pref.beta, pref.gamma, pref.label_smoothing)
        else:
            raise ConfigError(f"unknown preference objective {objective!r}")
        metrics = pair_metrics(objective, pref.beta, pol, ref)
    pair_part = losses.sum() / max(norm.pairs, 1)
    size = sp.size if sp is not None else 1
    loss = pair_part if nll is None else pair_part + nll
    reported = pair_part.detach() / size + (0 if nll is None else nll.detach())
    figures = torch.zeros(NUM_FIGURES, dtype=torch.float64)
    if sp is None or sp.rank == 0:
        figures[0] = len(chosen)
        for k, name in enumerate(METRICS, start=1):
            if name in metrics:
                figures[k] = float(metrics[name].double().sum())
    return loss, reported, figures


def metric_means(figures: list[float], objective: str) -> dict[str, float]:
    """TRL-named means of a step's (or an evaluation's) summed figures."""
    pairs = figures[0]
    out = {}
    for k, name in enumerate(METRICS, start=1):
        if objective == "reward" and name.startswith("logps/"):
            continue
        out[name] = figures[k] / pairs if pairs else float("nan")
    return out


# ---------------------------------------------------------------------------------------------
# Precomputed reference log-probabilities


def _files_signature(model_path: str) -> list:
    """What identifies a model's weights cheaply: each file's name, size and mtime (a local
    folder), or the id itself (a Hub id, resolved to the same snapshot by the Hub cache)."""
    path = Path(model_path)
    if not path.is_dir():
        return [str(model_path)]
    sig = []
    for f in sorted(path.iterdir()):
        if f.suffix in (".safetensors", ".bin", ".json", ".pt") and f.is_file():
            st = f.stat()
            sig.append([f.name, st.st_size, st.st_mtime_ns])
    return [str(path.resolve()), sig]


def reference_key(cfg, packed_fingerprint: str | None, dtype: str, source: str) -> str:
    """The cache key of a precomputed table: the reference's and the data's fingerprints, the
    dtype and the settings that change a log-probability."""
    from pyfast_tune.trainer.model_setup import model_setup

    model = cfg.model if source in ("policy", "precompute") else source
    quant = (
        (cfg.method, cfg.quant.quant_type, cfg.quant.double_quant)
        if cfg.method == "qlora"
        else None
    )
    ident = {
        "format": 1,
        "model": _files_signature(model),
        "setup": {k: v for k, v in model_setup(cfg).items() if k != "modules_to_save"},
        "quant": quant if source in ("policy", "precompute") else None,
        "data": packed_fingerprint,
        "dtype": dtype,
        "attention": cfg.attention,
    }
    blob = json.dumps(ident, sort_keys=True, default=str).encode()
    return hashlib.blake2b(blob, digest_size=16).hexdigest()


def compute_table(model, dataset, device, cfg, topo) -> np.ndarray:
    """Every sample's log-probability under ``model`` (no grad, eval mode): (num_samples,)
    float64 on every rank. Data-parallel rank r takes packs r, r + D, ...; every rank runs the
    same number of forwards (a rank past the end repeats pack 0 and discards it), as ZeRO-3's
    parameter gathers need; an all-reduce joins the parts."""
    from pyfast_tune.trainer.sequence_parallel import shard_row

    sp = topo.sequence
    table = np.zeros(dataset.num_samples, dtype=np.float64)
    rounds = math.ceil(len(dataset) / topo.data_world)
    with torch.no_grad(), eval_mode(model):
        for a in range(rounds):
            i = a * topo.data_world + topo.data_rank
            real = i < len(dataset)
            batch = collate([dataset[i if real else 0]], "token", 1)
            if sp is not None:
                batch = shard_row(batch, sp.size, sp.rank)
            _, sums, _ = sequence_logps(model, batch, device, cfg.fused_loss, sp)
            if real and (sp is None or sp.rank == 0):
                table[batch.sample_ids] = sums.double().cpu().numpy()
    if dist.is_initialized():
        t = torch.from_numpy(table)
        dist.all_reduce(t)
        table = t.numpy()
    return table


def build_reference(cfg, trained, dataset, cache_dir: Path, proc) -> Reference | None:
    """The ``Reference`` of a DPO run (None for the other objectives). Call it before resume
    restores a checkpoint: ``policy``/``precompute`` tables are the starting weights'."""
    if cfg.objective != "dpo":
        return None
    source = cfg.preference.reference
    lora = cfg.method in ("lora", "qlora")
    if source == "policy" and lora:
        return Reference(None)  # adapters disabled, each step
    base = getattr(dataset, "dataset", dataset)  # the whole packed dir (eval samples too)
    key = reference_key(cfg, base.meta.get("fingerprint"), trained.dtype, source)
    path = Path(cache_dir) / "reference_logps" / f"{key}.npy"
    if path.is_file():
        table = np.load(path)
        if table.shape == (base.num_samples,):
            log.info("reference log-probabilities: %s (cached)", path)
            return Reference(table)
    log.info("reference log-probabilities: computing %d samples' once (%s)",
             base.num_samples, "the starting weights" if source in ("policy", "precompute")
             else source)  # fmt: skip
    if source in ("policy", "precompute"):
        model = trained.engine
        ctx = adapters_disabled(model) if lora else contextlib.nullcontext()
        with ctx:
            table = compute_table(model, base, proc.device, cfg, proc.topo)
    else:
        table = compute_table(_load_reference(cfg, source, trained, proc), base, proc.device,
                              cfg, proc.topo)  # fmt: skip
    if proc.is_first:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp-{os.getpid()}.npy")
        np.save(tmp, table)
        os.replace(tmp, path)
    return Reference(table)


def _load_reference(cfg, source: str, trained, proc):
    """Another model as the reference: loaded whole in the training dtype on this device,
    with our attention; used for the precompute only, then dropped."""
    from transformers import AutoModelForCausalLM

    from pyfast_tune import patch
    from pyfast_tune.trainer.model import DTYPES

    model = AutoModelForCausalLM.from_pretrained(
        source, dtype=DTYPES[trained.dtype], trust_remote_code=bool(cfg.trust_remote_code)
    ).to(proc.device)
    model.config.use_cache = False
    model.requires_grad_(False)
    if cfg.attention in patch.ATTENTION_NAMES:
        backend = patch.usable_attention_backend(cfg.attention, proc.device)
        patch.apply(model, lora=False, attention=True, attention_backend=backend)
    return model


def eval_figures(model, eval_set, cfg, device, reference: Reference | None, rank: int,
                 world: int, micro: int, sequence=None) -> list[float]:  # fmt: skip
    """[loss, pairs, sums of METRICS] of ``eval_set`` over all processes (the loss is the mean
    over its pairs). Rows are split like ``evaluate.eval_loss``'s: every rank runs the same
    number of forwards, a rank past the end repeats row 0 and discards it."""
    from pyfast_tune.trainer.sequence_parallel import shard_row

    norm = global_pairs(eval_set, range(len(eval_set)))
    n = len(eval_set)
    totals = torch.zeros(1 + NUM_FIGURES, dtype=torch.float64)
    with torch.no_grad():
        for a in range(math.ceil(n / (world * micro))):
            start = (a * world + rank) * micro
            ids = list(range(start, min(start + micro, n)))
            batch = collate([eval_set[i] for i in ids or [0]], "token", 1)
            if sequence is not None:
                batch = shard_row(batch, sequence.size, sequence.rank)
            _, reported, figures = row_loss(model, batch, device, cfg, norm, reference, sequence)
            if ids:
                totals += torch.cat([torch.tensor([float(reported)], dtype=torch.float64),
                                     figures])  # fmt: skip
    if dist.is_initialized():
        dist.all_reduce(totals)
    return totals.tolist()
