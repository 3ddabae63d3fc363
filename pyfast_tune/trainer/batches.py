"""Sample order, rank split and packed batches with per-sample label shift and loss weights.

The order is a pure function of (seed, epoch, position): epoch ``e`` visits the packs in
``default_rng([seed, e]).permutation(num_packs)``; optimizer step ``s`` takes the global batch
at positions ``[s*G, (s+1)*G)`` of that stream (``G`` packs, a partial last batch of an epoch
is dropped). Which rank and micro step gets which pack of the global batch depends on the
world size, but the global batch, its loss and its gradient do not, so a run resumed on a
different number of processes with the same ``G`` continues with the same batches and losses.

Loss targets are shifted inside each sample: token t of a sample is trained to predict token
t+1 of the *same* sample, and the last token of every sample predicts nothing, so no label
ever crosses a sample boundary (a plain ``labels[1:]`` shift over a packed row would train the
last token of one sample to predict the first token of the next).

Each token's loss gets a weight so that the sum over the whole global batch is:
- ``token`` (default): the mean over all trained tokens of the global batch. Every trained
  token counts the same whatever its sample's length or micro batch, and the result does not
  depend on how the batch is split over ranks and micro steps.
- ``sample``: the mean over samples of each sample's per-token mean (short answers weigh as
  much as long ones).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from pyfast_tune.config import ConfigError

IGNORE = -100


def grad_accumulation(micro_batch_size: int, data_world: int, global_batch_size: int | None,
                      grad_accum: int | None) -> int:  # fmt: skip
    """Micro steps per optimizer step. The global batch (``global_batch_size`` packs per
    optimizer step) is what resume keeps fixed on any number of processes; without it,
    ``grad_accum`` (default 1) micro steps on each of the ``data_world`` replicas."""
    if not global_batch_size:
        return grad_accum or 1
    if global_batch_size % (micro_batch_size * data_world):
        raise ConfigError(
            f"global_batch_size {global_batch_size} is not divisible by "
            f"micro_batch_size {micro_batch_size} x {data_world} data-parallel processes"
        )
    return global_batch_size // (micro_batch_size * data_world)


class PackOrder:
    """Deterministic order of packs over epochs and its split over ranks and micro steps.

    >>> order = PackOrder(num_packs=10, global_batch=4, seed=0)
    >>> order.steps_per_epoch
    2
    >>> order.global_batch(0).tolist() == order.global_batch(0).tolist()
    True
    """

    def __init__(self, num_packs: int, global_batch: int, seed: int):
        if global_batch < 1:
            raise ConfigError("global batch must hold at least one pack")
        if num_packs < global_batch:
            raise ConfigError(
                f"the data has {num_packs} packs, fewer than one global batch of {global_batch}"
            )
        self.num_packs = num_packs
        self.global_batch_size = global_batch
        self.seed = seed
        self.steps_per_epoch = num_packs // global_batch

    @lru_cache(maxsize=4)  # noqa: B019 - a few epochs' permutations, tied to this object's life
    def permutation(self, epoch: int) -> np.ndarray:
        """Pack indices in the order epoch ``epoch`` visits them."""
        return np.random.default_rng([self.seed, epoch]).permutation(self.num_packs)

    def epoch_of(self, step: int) -> int:
        return step // self.steps_per_epoch

    def global_batch(self, step: int) -> np.ndarray:
        """The ``G`` pack indices of optimizer step ``step`` (0-based), over all ranks."""
        epoch, k = divmod(step, self.steps_per_epoch)
        g = self.global_batch_size
        return self.permutation(epoch)[k * g : (k + 1) * g]

    def micro_batches(self, step: int, rank: int, world: int, micro: int) -> list[np.ndarray]:
        """This rank's micro batches of step ``step``: ``G // (world*micro)`` arrays of ``micro``.

        Micro step a, rank r takes slots ``[(a*world + r)*micro, ... + micro)`` of the batch.
        """
        g = self.global_batch_size
        if g % (world * micro):
            raise ConfigError(f"global batch {g} is not divisible by world {world} x micro {micro}")
        batch = self.global_batch(step)
        accum = g // (world * micro)
        return [
            batch[(a * world + rank) * micro : (a * world + rank + 1) * micro] for a in range(accum)
        ]


def shifted_targets(labels: np.ndarray, cu_seqlens: np.ndarray) -> np.ndarray:
    """Next-token targets of a packed row, shifted within each sample.

    labels: (T,) int64 unshifted (-100 = no loss), cu_seqlens: (n+1,) -> targets: (T,) int64,
    ``targets[t] = labels[t+1]`` inside a sample and -100 at each sample's last token.
    """
    targets = np.full_like(labels, IGNORE)
    targets[:-1] = labels[1:]
    ends = np.asarray(cu_seqlens[1:], dtype=np.int64) - 1
    targets[ends[ends >= 0]] = IGNORE
    return targets


def pack_trained_counts(pack: dict) -> np.ndarray:
    """Number of trained (shifted) targets of each sample of a pack: (n_samples,) int64."""
    targets = shifted_targets(pack["labels"], pack["cu_seqlens"])
    trained = np.concatenate([[0], np.cumsum(targets != IGNORE)])
    cu = np.asarray(pack["cu_seqlens"], dtype=np.int64)
    return trained[cu[1:]] - trained[cu[:-1]]


def global_normalizer(dataset, pack_ids, reduction: str) -> int:
    """Denominator of the global-batch loss: trained tokens (token) or trained samples (sample).

    Every rank computes it from the data (cheap: labels of G packs), so no collective is needed.
    """
    total = 0
    for i in pack_ids:
        counts = pack_trained_counts(dataset[int(i)])
        total += int(counts.sum()) if reduction == "token" else int((counts > 0).sum())
    return total


@dataclass
class PackedBatch:
    """One micro batch: ``micro`` packs flattened to one row (numpy, converted at the model)."""

    input_ids: np.ndarray  # (T,) int64
    position_ids: np.ndarray  # (T,) int64, restarting at 0 per sample
    targets: np.ndarray  # (T,) int64, shifted per sample, -100 = no loss
    weights: np.ndarray  # (T,) float64, per-token loss weight (0 where no loss)
    cu_seqlens: np.ndarray  # (n+1,) int32
    max_seqlen: int
    num_tokens: int
    num_trained: int
    sample_lengths: np.ndarray  # (n,) int64, for FLOPs accounting
    # untrained tokens padding a sequence-parallel row to a multiple of the group size (they
    # belong to no sample; see pyfast_tune.trainer.sequence_parallel)
    num_padding: int = 0
    # preference rows: each sample's id in the packed directory, and its (pair id, role)
    sample_ids: np.ndarray | None = None  # (n,) int64
    pairs: np.ndarray | None = None  # (n, 2) int64
    margins: np.ndarray | None = None  # (n,) float32, each sample's pair's margin (reward)


def collate(packs: list[dict], reduction: str, normalizer: int) -> PackedBatch:
    """Concatenate packs into one row; weights make ``sum(ce * weights)`` this row's share.

    normalizer: ``global_normalizer`` of the global batch this row belongs to.
    """
    ids, pos, tgt, wts, lens = [], [], [], [], []
    for p in packs:
        cu = np.asarray(p["cu_seqlens"], dtype=np.int64)
        t = shifted_targets(np.asarray(p["labels"]), cu)
        trained = t != IGNORE
        if reduction == "token":
            w = trained / max(normalizer, 1)
        else:
            seg_len = np.diff(cu)
            counts = np.add.reduceat(trained, cu[:-1]) if len(cu) > 1 else np.zeros(0)
            counts = np.where(seg_len > 0, counts, 0)
            per_token = np.repeat(
                np.where(counts > 0, 1.0 / np.maximum(counts, 1), 0.0), seg_len
            ) / max(normalizer, 1)
            w = trained * per_token
        ids.append(np.asarray(p["input_ids"], dtype=np.int64))
        pos.append(np.asarray(p["position_ids"], dtype=np.int64))
        tgt.append(t)
        wts.append(w.astype(np.float64))
        lens.append(np.diff(cu))
    lengths = np.concatenate(lens)
    cu_all = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    targets = np.concatenate(tgt)
    paired = {}
    if all("pairs" in p for p in packs):
        keys = ("sample_ids", "pairs") + (
            ("margins",) if all("margins" in p for p in packs) else ()
        )
        paired = {k: np.concatenate([p[k] for p in packs]) for k in keys}
    return PackedBatch(
        **paired,
        input_ids=np.concatenate(ids),
        position_ids=np.concatenate(pos),
        targets=targets,
        weights=np.concatenate(wts),
        cu_seqlens=cu_all,
        max_seqlen=int(lengths.max()) if len(lengths) else 0,
        num_tokens=int(cu_all[-1]),
        num_trained=int((targets != IGNORE).sum()),
        sample_lengths=lengths,
    )
