"""Sequence parallelism over packed rows: the DeepSpeed-Ulysses scheme (arXiv:2309.14509).

With ``sequence_parallel_size: N`` the ranks form groups of N consecutive ranks. Every rank of a
group trains on the same packed row, each on one contiguous shard of its tokens:

1. ``collate`` builds the *whole* row first (position ids restarting per sample, ``cu_seqlens``,
   targets shifted within each sample, loss weights), so nothing depends on where the shards
   fall; ``shard_row`` then pads the row at the end to a multiple of N with untrained tokens
   that belong to no sample (their own attention segment, weight 0) and cuts it into N shards.
   A target at a shard boundary stays with the token that predicts it, i.e. on the rank that
   holds the predicting token, because targets are sliced with their tokens.
2. Everything but attention is per token, so it runs on the shard. Rotary embeddings see the
   shard's slice of the row's position ids, the global ones.
3. Attention (``ulysses_attention``): an all-to-all turns the shard's (S, H, D) queries, keys
   and values into the whole row's tokens for H/N heads, our varlen op runs on the whole row
   with the row's ``cu_seqlens`` (no attention across samples, nothing approximated), and a
   second all-to-all turns the (T, H/N, D) result back into the shard's (S, H, D). Key/value
   heads are split the same way; when there are fewer of them than N (or their count does
   not divide by N), each is repeated just enough times that it does (see ``kv_repeats``).
4. The loss of a shard is its tokens' share of the global-batch loss (weights from the whole
   global batch, as without sequence parallelism), so the shares of all ranks sum to the
   global-batch loss, and the gradients summed over all ranks (the all-to-all's backward
   carries each rank's share back to the ranks whose queries, keys and values it used) are
   the gradient of that loss.

ZeRO treats the whole data x sequence grid as data parallel, as DeepSpeed's own Ulysses does
(its sequence-data-parallel group): parameters, gradients and optimizer state are sharded
over all ranks, and its gradient average over all ranks is undone by the loss scale, leaving
the sum. We do not hand DeepSpeed its Ulysses ``mpu`` (``parallel_state_sp``): with it,
DeepSpeed 0.19's ZeRO-3 reduce-scatter path averages over the sequence-parallel ranks while
its contiguous-bucket path and ZeRO-1/2 sum over them (the gradient then depends on bucket
layout), and checkpoints record a tensor-parallel degree of N for one model-state file, which
its universal-checkpoint converter refuses. DeepSpeed only learns ``sequence_parallel_size``
in its config, so its batch-size check counts packs per data-parallel replica.

The all-to-all is ours, not ``deepspeed.sequence.layer.DistributedAttention``: that
layer cannot repeat key/value heads (it requires H_kv >= N), and ours is a pure function of
an ``exchange`` that tests drive without processes.

>>> row = shard_row(collate(packs, "token", normalizer), size=2, rank=1)  # doctest: +SKIP
>>> loss = batch_loss(engine, row, device, sequence_parallel=SequenceParallel(group, 2, 1))
...                                                                        # doctest: +SKIP
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch

from pyfast_tune.config import ConfigError
from pyfast_tune.trainer.batches import IGNORE, PackedBatch

# What fills the padding at the end of a row. Its value does not matter: the padding is its
# own attention segment and trains nothing.
PAD_TOKEN_ID = 0

Exchange = Callable[[torch.Tensor], torch.Tensor]


def padded_length(num_tokens: int, size: int) -> int:
    """The row's length rounded up to a multiple of ``size`` (each shard the same length)."""
    return -(-num_tokens // size) * size


def shard_row(batch: PackedBatch, size: int, rank: int) -> PackedBatch:
    """Rank ``rank``'s contiguous shard of one packed row split over ``size`` ranks.

    ``batch`` is the whole row as ``collate`` built it (targets already shifted per sample over
    the whole row). The row is padded at the end to ``padded_length(T, size)`` tokens: input
    id ``PAD_TOKEN_ID``, position ids restarting at 0, target -100, weight 0, and one extra
    ``cu_seqlens`` segment so the padding attends only to itself. Returns a batch whose
    per-token arrays (input_ids, position_ids, targets, weights) are the shard's
    (``padded_length // size`` tokens), whose ``cu_seqlens``/``max_seqlen`` describe the whole
    padded row (attention runs on it after the all-to-all), and whose counts are the shard's:
    ``num_tokens`` real tokens, ``num_trained`` trained targets, ``num_padding`` padding
    tokens. ``sample_lengths`` (FLOPs) is the row's on rank 0 and empty elsewhere, so a
    row's FLOPs are counted once per group.
    """
    if size < 1 or not 0 <= rank < size:
        raise ValueError(f"shard_row: need 0 <= rank < size, got rank {rank} of {size}")
    total = batch.num_tokens
    padded = padded_length(total, size)
    pad = padded - total
    cu = np.asarray(batch.cu_seqlens, dtype=np.int32)
    input_ids = np.asarray(batch.input_ids, dtype=np.int64)
    position_ids = np.asarray(batch.position_ids, dtype=np.int64)
    targets = np.asarray(batch.targets, dtype=np.int64)
    weights = np.asarray(batch.weights, dtype=np.float64)
    if pad:
        input_ids = np.concatenate([input_ids, np.full(pad, PAD_TOKEN_ID, np.int64)])
        position_ids = np.concatenate([position_ids, np.arange(pad, dtype=np.int64)])
        targets = np.concatenate([targets, np.full(pad, IGNORE, np.int64)])
        weights = np.concatenate([weights, np.zeros(pad, np.float64)])
        cu = np.concatenate([cu, np.array([padded], np.int32)])
    shard = padded // size
    lo, hi = rank * shard, (rank + 1) * shard
    return replace(
        batch,
        input_ids=input_ids[lo:hi],
        position_ids=position_ids[lo:hi],
        targets=targets[lo:hi],
        weights=weights[lo:hi],
        cu_seqlens=cu,
        max_seqlen=max(batch.max_seqlen, pad),
        num_tokens=int(max(0, min(hi, total) - lo)),
        num_trained=int((targets[lo:hi] != IGNORE).sum()),
        num_padding=int(max(0, hi - max(lo, total))),
        sample_lengths=batch.sample_lengths if rank == 0 else batch.sample_lengths[:0],
    )


def kv_repeats(heads: int, kv_heads: int, size: int) -> int:
    """How many times each key/value head is repeated so the heads split evenly over ``size``.

    The query heads split into ``size`` contiguous blocks of ``heads/size``; query head h reads
    key/value head ``h // (heads/kv_heads)``. Repeating each key/value head r times (r the
    smallest with ``kv_heads*r`` divisible by ``size``, i.e. ``size / gcd(kv_heads, size)``)
    gives every rank exactly the key/value heads its query heads read, in order; r divides
    the GQA group size whenever ``size`` divides ``heads``, so the grouping stays exact.
    1 when ``size`` divides ``kv_heads`` (the heads are split, not repeated).
    """
    check_heads(heads, kv_heads, size)
    return size // math.gcd(kv_heads, size)


def check_heads(heads: int, kv_heads: int, size: int) -> None:
    """Ulysses splits attention heads over the group: ``size`` must divide the query heads."""
    if heads % kv_heads:
        raise ValueError(
            f"{heads} attention heads are not a multiple of {kv_heads} key/value heads"
        )
    if heads % size:
        raise ConfigError(
            f"sequence_parallel_size {size} must divide the model's {heads} attention heads "
            "(each rank attends with heads / sequence_parallel_size of them)"
        )


# Layout around the exchange. An exchange takes (N, ...) and returns (N, ...): slot j of what a
# rank sends goes to rank j, and slot s of what it receives came from rank s (all_to_all_single
# over dim 0).


def heads_to_send(x: torch.Tensor, size: int) -> torch.Tensor:
    """(S, H, D) sequence shard -> (N, S, H/N, D): head block j is sent to rank j."""
    s, h, d = x.shape
    return x.reshape(s, size, h // size, d).transpose(0, 1).contiguous()


def sequence_from_received(x: torch.Tensor) -> torch.Tensor:
    """(N, S, H/N, D), slot s = shard s's tokens for this rank's heads -> (N*S, H/N, D): the
    whole row in order (shards are contiguous and in rank order)."""
    n, s, h, d = x.shape
    return x.reshape(n * s, h, d)


def sequence_to_send(x: torch.Tensor, size: int) -> torch.Tensor:
    """(T, h, D) whole row for this rank's heads -> (N, T/N, h, D): shard j is sent to rank j."""
    t, h, d = x.shape
    return x.reshape(size, t // size, h, d)


def heads_from_received(x: torch.Tensor) -> torch.Tensor:
    """(N, S, h, D), slot s = this shard's tokens for rank s's heads -> (S, N*h, D)."""
    n, s, h, d = x.shape
    return x.transpose(0, 1).reshape(s, n * h, d)


class _Exchanged(torch.autograd.Function):
    """An all-to-all over dim 0 with its gradient: the transpose of "slot j goes to rank j,
    slot s comes from rank s" is the same exchange, applied to the gradient."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, exchange: Exchange) -> torch.Tensor:
        ctx.exchange = exchange
        return exchange(x.contiguous())

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return ctx.exchange(grad.contiguous()), None


def ulysses_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    size: int,
    exchange: Exchange,
    attend: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """Attention over a row split into ``size`` sequence shards, one per rank.

    q: (S, H, D), k/v: (S, H_kv, D) / (S, H_kv, D_v), this rank's shard of the row, every rank
    of the group calling at once; ``exchange``: all-to-all over dim 0 among them;
    ``attend(q, k, v)``: attention over the whole row, (T, H/N, D) x (T, H_kv'/N, D) ->
    (T, H/N, D_v) with T = N*S. Returns (S, H, D_v), the shard's attention output, equal to
    the whole row's attention output at the shard's tokens.
    """
    heads, kv_heads = q.shape[1], k.shape[1]
    repeats = kv_repeats(heads, kv_heads, size)
    if repeats > 1:
        k = k.repeat_interleave(repeats, dim=1)
        v = v.repeat_interleave(repeats, dim=1)
    qh, kh, vh = (
        sequence_from_received(_Exchanged.apply(heads_to_send(x, size), exchange))
        for x in (q, k, v)
    )
    out = attend(qh, kh, vh)  # (T, H/N, D_v)
    return heads_from_received(_Exchanged.apply(sequence_to_send(out, size), exchange))


def all_to_all_exchange(group) -> Exchange:
    """The exchange among the ranks of ``group`` (torch.distributed all_to_all_single)."""
    import torch.distributed as dist

    def exchange(x: torch.Tensor) -> torch.Tensor:
        out = torch.empty_like(x)
        dist.all_to_all_single(out, x, group=group)
        return out

    return exchange


@dataclass
class SequenceParallel:
    """This rank's place in its sequence-parallel group, handed to attention as a model kwarg
    (``sequence_parallel=...``; ``pyfast_tune.patch`` routes our attention through it)."""

    group: Any
    size: int
    rank: int
    attention_calls: int = 0

    def attention(self, q, k, v, attend):
        """``ulysses_attention`` over this group (see there for shapes)."""
        self.attention_calls += 1
        return ulysses_attention(q, k, v, self.size, all_to_all_exchange(self.group), attend)

    def require_attention_since(self, calls: int) -> None:
        """Fail if no attention layer went through ``attention`` since the count was ``calls``:
        a model whose attention bypasses transformers' AttentionInterface never sees the
        kwarg, and would train each shard attending within itself only."""
        if self.attention_calls == calls:
            raise RuntimeError(
                "sequence parallelism: the model's forward never called pyfast_tune's "
                "attention, so each rank attended within its own shard only; it needs a model "
                "whose attention goes through transformers' AttentionInterface"
            )


@dataclass(frozen=True)
class Topology:
    """How the world splits: ``data_world`` data-parallel replicas of ``sequence_parallel_size``
    ranks each. ``data_rank``: which replica this rank belongs to (replicas take different
    packs); ``sequence``: its sequence-parallel group (None when the size is 1)."""

    data_rank: int
    data_world: int
    sequence: SequenceParallel | None

    @property
    def world(self) -> int:
        return self.data_world * (self.sequence.size if self.sequence is not None else 1)


def topology(sequence_parallel_size: int, rank: int, world: int) -> Topology:
    """Build the groups (every rank calls this, after the process group exists): ranks
    ``[g*N, (g+1)*N)`` form sequence-parallel group g, the data-parallel index of a rank is
    ``rank // N``."""
    n = sequence_parallel_size
    if n < 1 or world % n:
        raise ConfigError(
            f"sequence_parallel_size {n} must divide the number of processes ({world})"
        )
    if n == 1:
        return Topology(rank, world, None)
    import torch.distributed as dist

    mine = None
    for g in range(world // n):  # new_group is collective: every rank creates every group
        group = dist.new_group(list(range(g * n, (g + 1) * n)))
        if g == rank // n:
            mine = group
    return Topology(rank // n, world // n, SequenceParallel(mine, n, rank % n))


def check_model(config, size: int) -> None:
    """Fail before training if the model's heads cannot be split over ``size`` ranks."""
    if size == 1:
        return
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    check_heads(heads, kv_heads, size)
