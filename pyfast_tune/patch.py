"""Hugging Face wiring: packed (varlen) attention and the fused LoRA op for any HF decoder.

Packed batches are one row holding several samples back to back, with position_ids restarting
at 0 per sample and no attention mask. Stock ``sdpa``/``eager`` attention either attends across
samples or depends on fragile packed-sequence detection (skipped when ``use_cache=True``), so we
register our own attention under ``transformers.AttentionInterface`` and a matching mask
function under ``AttentionMaskInterface`` (without the latter transformers builds no mask and
never passes us a padding mask). Segment boundaries come from the ``cu_seq_lens_q/k`` kwargs
transformers forwards to attention, else from position_ids resets; a padded batch (2D mask)
is unpadded into one segment per row. Cross-sample attention is zero by construction.

>>> from pyfast_tune import patch                       # doctest: +SKIP
>>> patch.apply(model, lora=False, attention_backend="ref")
>>> out = model(input_ids=ids, position_ids=pos, cu_seq_lens_q=cu, cu_seq_lens_k=cu,
...             max_length_q=m, max_length_k=m, use_cache=False)
>>> patch.revert(model)
"""

from __future__ import annotations

import contextlib
import logging

import torch

# The attention values and the names they register under live in a torch-free leaf, which the
# config checks against; they stay importable from here.
from pyfast_tune.choices import (  # noqa: F401
    ATTENTION_CHOICES,
    ATTENTION_NAMES,
    EXPLICIT_BACKENDS,
    STOCK_ATTENTION,
)

log = logging.getLogger(__name__)

_PREVIOUS_ATTN = "_pyfast_previous_attn_implementation"
_LORA_PATCHED = "_pyfast_lora_patched"


def cu_seqlens_from_position_ids(position_ids: torch.Tensor) -> torch.Tensor:
    """Sample boundaries of one packed row: a new sample starts wherever the position is 0.

    position_ids: (T,) or (1, T) int64 -> cu_seqlens: (n_samples + 1,) int32, [0, ..., T].
    A row whose first position is not 0 (a continuation) still starts a segment at index 0.
    """
    pos = position_ids.reshape(-1)
    starts = torch.nonzero(pos == 0).reshape(-1)
    if starts.numel() == 0 or starts[0] != 0:
        starts = torch.cat([starts.new_zeros(1), starts])
    end = torch.tensor([pos.numel()], device=pos.device, dtype=starts.dtype)
    return torch.cat([starts, end]).to(torch.int32)


def varlen_attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    softmax_scale: float | None = None,
    window: tuple[int, int] = (-1, -1),
) -> torch.Tensor:
    """Causal attention within each segment, none across segments: the reference path.

    q: (total, H, D), k/v: (total, H_kv, D) with H % H_kv == 0 (GQA), cu_seqlens: (n+1,) int32.
    Returns (total, H, D) in q's dtype. ``window`` = (left, right) as in flash-attention
    (-1 = unbounded); only left matters for causal attention. The same code as the guard's
    "sdpa" backend, so a run whose guard fell back to it trains exactly as ``attention: ref``.
    """
    from pyfast_tune.kernels.varlen_attention.upstream import sdpa

    return sdpa(q, k, v, cu_seqlens, cu_seqlens, softmax_scale, (int(window[0]), 0))


def _segments(
    batch: int, seq_len: int, position_ids: torch.Tensor | None, kwargs: dict
) -> tuple[torch.Tensor, int]:
    """cu_seqlens and max length for the flattened (batch * seq_len) tokens of this call."""
    cu = kwargs.get("cu_seq_lens_q")
    if cu is not None:
        cu_k = kwargs.get("cu_seq_lens_k")
        if cu_k is not None and not torch.equal(cu.to(cu_k.dtype), cu_k):
            raise ValueError("pyfast_varlen attention needs cu_seq_lens_q == cu_seq_lens_k")
        max_len = kwargs.get("max_length_q")
        if max_len is None:
            max_len = int((cu[1:] - cu[:-1]).max())
        return cu.to(torch.int32), int(max_len)
    if batch == 1 and position_ids is not None and position_ids.shape[-1] == seq_len:
        cu = cu_seqlens_from_position_ids(position_ids)
        return cu, int((cu[1:] - cu[:-1]).max())
    # Unpacked rows: each row is one sample.
    cu = torch.arange(0, (batch + 1) * seq_len, seq_len, dtype=torch.int32)
    return cu, seq_len


def _run_varlen(backend, q, k, v, cu, max_len, scaling, window):
    if backend == "ref":
        return varlen_attention_ref(q, k, v, cu, softmax_scale=scaling, window=window)
    from pyfast_tune.kernels import varlen_attention

    return varlen_attention(
        q, k, v, cu, cu, max_len, max_len, causal=True, softmax_scale=scaling, window=window,
        prefer=None if backend == "op" else backend,
    )  # fmt: skip


def _unpad(padding_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Token indices, cu_seqlens and max length of a (B, T) padding mask, one sample per row."""
    mask = padding_mask.bool()
    lengths = mask.sum(1)  # (B,)
    t = mask.shape[1]
    first = mask.int().argmax(1)
    last = t - 1 - mask.flip(1).int().argmax(1)
    if not bool(((last - first + 1 == lengths) | (lengths == 0)).all()):
        raise ValueError("pyfast_varlen attention: each row's unpadded tokens must be contiguous")
    idx = mask.reshape(-1).nonzero().reshape(-1)
    cu = torch.cat([lengths.new_zeros(1), lengths.cumsum(0)]).to(torch.int32)
    return idx, cu, int(lengths.max())


def _common_dtype(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Under autocast (Trainer's bf16/fp16 on fp32 weights) q/k leave rotary in fp32 while v is
    bf16; stock SDPA is autocast to the low dtype, so ours is too. Otherwise: the query's."""
    device = tensors[0].device.type
    if torch.is_autocast_enabled(device):
        dtype = torch.get_autocast_dtype(device)
    else:
        dtype = tensors[0].dtype
    return tuple(t if t.dtype == dtype else t.to(dtype) for t in tensors)


def _varlen_forward(backend: str):
    def attention(
        module: torch.nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        dropout: float = 0.0,
        scaling: float | None = None,
        sliding_window: int | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, None]:
        # query: (B, H, T, D), key/value: (B, H_kv, T, D) -> output (B, T, H, D), as HF expects.
        if dropout:
            raise ValueError("pyfast_varlen attention does not implement attention dropout")
        if query.shape[2] != key.shape[2]:
            raise ValueError(
                "pyfast_varlen attention is for training: no KV cache (use_cache=False)"
            )
        batch, heads, seq_len, head_dim = query.shape
        query, key, value = _common_dtype(query, key, value)
        q = query.transpose(1, 2).reshape(batch * seq_len, heads, head_dim)
        k = key.transpose(1, 2).reshape(batch * seq_len, key.shape[1], head_dim)
        v = value.transpose(1, 2).reshape(batch * seq_len, value.shape[1], value.shape[-1])
        window = (sliding_window - 1, 0) if sliding_window else (-1, -1)
        sequence_parallel = kwargs.get("sequence_parallel")
        if sequence_parallel is not None:
            # A shard of a row split over a sequence-parallel group: all-to-all to the whole row
            # for heads/N heads, attend, all-to-all back (pyfast_tune.trainer.sequence_parallel).
            if batch != 1 or attention_mask is not None or kwargs.get("cu_seq_lens_q") is None:
                raise ValueError(
                    "sequence-parallel attention takes one packed row, no mask, and the whole "
                    "row's cu_seq_lens_q"
                )
            cu, max_len = _segments(batch, seq_len, None, kwargs)
            cu = cu.to(query.device)
            out = sequence_parallel.attention(
                q, k, v, lambda q, k, v: _run_varlen(backend, q, k, v, cu, max_len, scaling, window)
            )
        elif attention_mask is not None:
            # A padded batch (the mask function passes the 2D mask only when there is padding):
            # gather the real tokens, one segment per row, and leave zeros at the pads.
            idx, cu, max_len = _unpad(attention_mask.to(query.device))
            out = q.new_zeros(batch * seq_len, heads, v.shape[-1])
            out[idx] = _run_varlen(backend, q[idx], k[idx], v[idx], cu, max_len, scaling, window)
        else:
            cu, max_len = _segments(batch, seq_len, kwargs.get("position_ids"), kwargs)
            out = _run_varlen(backend, q, k, v, cu.to(query.device), max_len, scaling, window)
        return out.reshape(batch, seq_len, heads, -1), None

    attention.__name__ = f"pyfast_varlen_{backend}_attention"
    return attention


def register() -> None:
    """Register our attention under ``ATTENTION_NAMES`` with transformers (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask

    for backend, name in ATTENTION_NAMES.items():
        AttentionInterface.register(name, _varlen_forward(backend))
        # Like flash-attention: None without padding (segments then come from cu_seq_lens or
        # position_ids), else the 2D padding mask, which our attention unpads.
        AttentionMaskInterface.register(name, flash_attention_mask)


def _set_attn(model: torch.nn.Module, name: str) -> None:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if hasattr(base, "set_attn_implementation"):
        if "vision_config" in getattr(base.config, "sub_configs", {}):
            # A vision-language model: only its language model packs; the vision encoder
            # attends bidirectionally over each image with its own implementation.
            base.set_attn_implementation({"": name, "text_config": name})
            return
        base.set_attn_implementation(name)
    else:  # pragma: no cover - very old transformers
        base.config._attn_implementation = name


def _current_attn(model: torch.nn.Module) -> str | None:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return getattr(base.config, "_attn_implementation", None)


def usable_attention_backend(backend: str, device: torch.device) -> str:
    """``backend`` if it can run on ``device`` here, else "ref" with a warning saying why.

    "op" needs the C++ extension on CPU (built on first use: a compiler) or Triton on CUDA;
    checking before training starts turns a missing compiler into one warning instead of a
    failure in the first forward pass."""
    if backend != "op":
        return backend
    try:
        if device.type == "cuda":
            import triton  # noqa: F401
        else:
            from pyfast_tune.kernels.varlen_attention.cpu import load_varlen_attention

            load_varlen_attention()
    except Exception as e:  # ImportError, ExtensionBuildError
        log.warning("attention 'op' cannot run on %s here (%s); using 'ref'", device, e)
        return "ref"
    return backend


def apply(
    model: torch.nn.Module,
    lora: bool = True,
    attention: bool = True,
    attention_backend: str = "auto",
) -> torch.nn.Module:
    """Switch ``model`` (HF or peft-wrapped) to packed varlen attention and the fused LoRA op.

    attention_backend: "op" = ``pyfast_tune.kernels.varlen_attention`` with the backend the
    first-use guard picks for the device and shape class (the fastest correct of the C++
    kernel or per-sample SDPA on CPU; Triton, torch's varlen_attn, flash-attn or SDPA on
    CUDA); "triton" / "cpp" / "torch_varlen" / "flash_attn" = that backend, checked by the
    guard but not raced; "ref" = exact per-segment PyTorch SDPA (this module), unchecked;
    "auto" = "op" where it can run on the model's device, else "ref" (see
    ``usable_attention_backend``). ``lora=True`` patches peft LoRA layers with
    ``pyfast_tune.kernels.lora.patch_peft_lora`` (the guard picks the fused op or peft's own
    forward) when that module is installed, and logs and skips otherwise. The guard decides
    here, eagerly, for the shape classes the model's config and LoRA layers show, so a
    torch.compile'd forward finds the decisions made. Returns the model; ``revert(model)``
    undoes both.
    """
    if attention:
        if attention_backend == "auto":
            device = next((p.device for p in model.parameters()), torch.device("cpu"))
            attention_backend = usable_attention_backend("op", device)
        if attention_backend not in ATTENTION_NAMES:
            raise ValueError(
                f"attention_backend must be one of {sorted(ATTENTION_NAMES)}, got {attention_backend!r}"
            )
        register()
        if not hasattr(model, _PREVIOUS_ATTN):
            setattr(model, _PREVIOUS_ATTN, _current_attn(model))
        _set_attn(model, ATTENTION_NAMES[attention_backend])
        if attention_backend != "ref":
            _decide_attention(model, None if attention_backend == "op" else attention_backend)
    if lora:
        try:
            from pyfast_tune.kernels.lora import guard_shapes, patch_peft_lora
        except ImportError as e:
            log.info("fused LoRA op not available (%s); peft's own LoRA layers stay in place", e)
        else:
            patch_peft_lora(model)
            setattr(model, _LORA_PATCHED, True)
            for device, shape in guard_shapes(model):
                _decide("lora_linear", device, shape, None)
    return model


def _decide(op: str, device: torch.device, shape: dict, prefer: str | None) -> None:
    """Make the guard's decision now; a failure here only defers it to the first call."""
    from pyfast_tune.kernels import guard

    try:
        guard.decide(op, device, shape, prefer)
    except Exception as e:
        log.warning("guard: deciding %s (%s) ahead failed (%s); deciding on first use",
                    op, guard.describe(shape), e)  # fmt: skip


def _decide_attention(model: torch.nn.Module, prefer: str | None) -> None:
    """The attention shape class from the model's config: dtype, head dim, GQA, no window
    (sliding-window layers get theirs on first use)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = (
        base.config.get_text_config() if hasattr(base.config, "get_text_config") else base.config
    )
    heads = getattr(config, "num_attention_heads", None)
    embed = base.get_input_embeddings() if hasattr(base, "get_input_embeddings") else None
    weight = getattr(embed, "weight", None)
    if not heads or weight is None or not weight.dtype.is_floating_point:
        return
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    shape = {
        "dtype": str(weight.dtype).removeprefix("torch."),
        "head_dim": int(head_dim),
        "gqa": int(heads // kv_heads),
        "window": [-1, 0],
    }
    _decide("varlen_attention", weight.device, shape, prefer)


def revert(model: torch.nn.Module) -> torch.nn.Module:
    """Undo ``apply``: restore the previous attention implementation and peft's LoRA layers."""
    previous = getattr(model, _PREVIOUS_ATTN, None)
    if hasattr(model, _PREVIOUS_ATTN):
        _set_attn(model, previous or "sdpa")
        delattr(model, _PREVIOUS_ATTN)
    if getattr(model, _LORA_PATCHED, False):
        from pyfast_tune.kernels.lora import unpatch_peft_lora

        unpatch_peft_lora(model)
        delattr(model, _LORA_PATCHED)
    return model


@contextlib.contextmanager
def decoding(model: torch.nn.Module):
    """While inside, ``model`` runs the attention ``apply`` replaced (its own: sdpa, eager,
    ...), which decodes with a KV cache; ours is packed training attention without a cache.
    A model ``apply`` did not switch stays as it is.

    >>> with patch.decoding(model):                        # doctest: +SKIP
    ...     out = model(input_ids=ids, use_cache=True)
    """
    if not hasattr(model, _PREVIOUS_ATTN):
        yield model
        return
    ours = _current_attn(model)
    _set_attn(model, getattr(model, _PREVIOUS_ATTN) or "sdpa")
    try:
        yield model
    finally:
        _set_attn(model, ours)
