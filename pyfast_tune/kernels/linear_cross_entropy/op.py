"""Fused linear cross-entropy: the loss of ``hidden @ weight.T`` without the (T, V) logits.

At a language model's head the logit matrix is tokens × vocabulary: 8,192 tokens of a Qwen
vocabulary (151,646) are 1.24 G elements, more memory than the rest of a LoRA step of a 7B
model. ``linear_cross_entropy`` walks the tokens in chunks (and the vocabulary in blocks when
even one chunk would be too large); per chunk it forms the logits, their log-sum-exp, the loss
and the gradient of the logits in place, and multiplies that gradient straight into the
gradients of hidden, weight and bias — during the forward, so nothing is recomputed. The
backward only scales those by the incoming gradient (a scalar for "sum"/"mean"); for
``reduction="none"`` the incoming gradient differs per token and cannot be applied to a
summed weight gradient, so there the backward recomputes chunk by chunk instead.

Log-sum-exp, softmax and all accumulations (loss, grad_weight, grad_bias, across vocabulary
blocks) are fp32 whatever the input dtype (fp64 for fp64 inputs). The chunk's logits come out
of the matmul in the input dtype, exactly as in ``F.cross_entropy((h @ W.T).float(), t)``, so
bf16 results carry PyTorch's own bf16 error, no more.

Backends of the one op ``torch.ops.pyfast_tune.linear_cross_entropy``:

- ``"triton"``: the row kernels of ``triton.py`` (online log-sum-exp over vocabulary blocks,
  gradient written over the logits) with torch matmuls around them (CUDA, or CPU under
  ``TRITON_INTERPRET=1``);
- ``"torch"``: the same chunk loop with in-place PyTorch row operations (CPU, and any device);
- ``"ref"``: ``linear_cross_entropy_ref`` (``ref.py``: whole logits, autograd), for tests;
- ``"auto"``: the first-use guard's choice (``pyfast_tune.kernels.guard``): triton on CUDA,
  torch elsewhere, each checked once per device, dtype and soft cap against ``ref``; a backend
  that fails the check is skipped with a warning.

Chunk size: ``chunk_bytes`` (default 128 MiB, env ``PYFAST_TUNE_LCE_CHUNK_MB``) bounds one
chunk's fp32 working set (tokens × vocabulary block × 4 bytes, plus its input-dtype copy).

>>> import torch
>>> h = torch.randn(10, 16, requires_grad=True); W = torch.randn(50, 16, requires_grad=True)
>>> t = torch.randint(0, 50, (10,))
>>> loss = linear_cross_entropy(h, W, t)
>>> loss.backward()
>>> torch.allclose(loss, linear_cross_entropy_ref(h, W, t))
True
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

from pyfast_tune.kernels import guard
from pyfast_tune.kernels.linear_cross_entropy.ref import REDUCTIONS, linear_cross_entropy_ref

__all__ = ["linear_cross_entropy", "default_chunk_bytes"]

OP = "linear_cross_entropy"  # its name for the first-use guard and PYFAST_TUNE_FAULTS
_BACKENDS = ("auto", "triton", "torch", "ref")
_DTYPES = {
    "triton": (torch.float32, torch.float16, torch.bfloat16),
    "torch": (torch.float32, torch.float16, torch.bfloat16, torch.float64),
    "ref": (torch.float32, torch.float16, torch.bfloat16, torch.float64),
}
# A chunk needs at least this many tokens before the vocabulary is split into blocks: fewer
# rows make the (rows × H) @ (H × V) matmuls memory-bound.
_MIN_CHUNK_TOKENS = 32


def default_chunk_bytes() -> int:
    """Working-set budget of one chunk: ``PYFAST_TUNE_LCE_CHUNK_MB`` MiB, default 128."""
    return int(float(os.environ.get("PYFAST_TUNE_LCE_CHUNK_MB", "128")) * 2**20)


def linear_cross_entropy(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    bias: Tensor | None = None,
    *,
    weights: Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    softcap: float | None = None,
    backend: str = "auto",
    chunk_bytes: int | None = None,
) -> Tensor:
    """Cross-entropy of ``hidden @ weight.T (+ bias)`` against ``targets``, chunked.

    Args:
        hidden: (T, H) fp32/fp16/bf16 (fp64 on the torch/ref backends).
        weight: (V, H), hidden's dtype and device (a tied embedding is fine).
        targets: (T,) integer class ids in [0, V), or ``ignore_index``.
        bias: optional (V,), hidden's dtype.
        weights: optional (T,) float multiplier per token (differentiable).
        ignore_index: targets equal to it contribute 0 and are not counted by "mean".
        reduction: "none" -> (T,) ``weights * ce``; "sum" -> ``Σ weights * ce``; "mean" ->
            that sum / (number of targets != ignore_index), 0 with zero gradients if none.
        softcap: c > 0 applies Gemma 2's ``c * tanh(z / c)`` to the logits z first.
        backend: "auto", "triton", "torch" or "ref" (see the module docstring).
        chunk_bytes: working-set budget of one chunk (default ``default_chunk_bytes()``).

    Returns:
        fp32 loss (fp64 for fp64 inputs): a scalar, or (T,) for ``reduction="none"``.

    Example:
        >>> loss = linear_cross_entropy(h, W, t, reduction="sum")     # doctest: +SKIP
    """
    backend = _resolve_backend(hidden, backend)
    # One check per call (on CPU it scans the targets): "auto" is checked against the widest
    # dtype set, and the guard never picks a backend that cannot take this dtype.
    checked = "ref" if backend == "auto" else backend
    _check_inputs(hidden, weight, targets, bias, weights, ignore_index, reduction, softcap, checked)
    args = (hidden, weight, targets, bias, weights, ignore_index, reduction, softcap, chunk_bytes)
    if backend == "auto":
        # the first-use guard's choice for this device, dtype and soft cap (our kernel checked
        # against PyTorch's whole-logits loss on the device, once, then cached); a backend that
        # fails at run time hands over to the next correct one
        shape = {"dtype": str(hidden.dtype).removeprefix("torch."), "softcap": softcap is not None}
        return guard.call_guarded(OP, hidden.device, shape, lambda b: _run(*args, b), (hidden,))
    return _run(*args, backend)


def _run(hidden, weight, targets, bias, weights, ignore_index, reduction, softcap, chunk_bytes,
         backend) -> Tensor:  # fmt: skip
    """One named backend, inputs already checked."""
    if backend == "ref":
        return linear_cross_entropy_ref(
            hidden, weight, targets, bias, weights=weights, ignore_index=ignore_index,
            reduction=reduction, softcap=softcap,
        )  # fmt: skip
    grad = torch.is_grad_enabled()
    budget = int(chunk_bytes) if chunk_bytes is not None else default_chunk_bytes()
    if budget < 1:
        raise ValueError(f"linear_cross_entropy: chunk_bytes must be positive, got {budget}")
    out = torch.ops.pyfast_tune.linear_cross_entropy(
        hidden.contiguous(),
        weight.contiguous(),
        targets.long().contiguous(),
        None if bias is None else bias.contiguous(),
        None if weights is None else weights.contiguous(),
        int(ignore_index),
        reduction,
        float(softcap or 0.0),
        grad and hidden.requires_grad,
        grad and weight.requires_grad,
        grad and bias is not None and bias.requires_grad,
        budget,
        backend,
    )
    return out[0]


def _resolve_backend(hidden: Tensor, backend: str) -> str:
    if backend not in _BACKENDS:
        raise ValueError(
            f"linear_cross_entropy: backend must be one of {_BACKENDS}, got {backend!r}"
        )
    if backend == "auto":
        return backend  # the first-use guard decides
    if backend == "triton" and not hidden.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(
            "linear_cross_entropy: backend='triton' needs CUDA tensors, or TRITON_INTERPRET=1 "
            "set before Triton is imported to run the kernels in the interpreter on CPU"
        )
    return backend


def _check_inputs(
    hidden, weight, targets, bias, weights, ignore_index, reduction, softcap, backend
) -> None:
    named = [("hidden", hidden), ("weight", weight), ("targets", targets)]
    named += [(n, t) for n, t in (("bias", bias), ("weights", weights)) if t is not None]
    for name, t in named:
        if not isinstance(t, Tensor):
            raise TypeError(f"linear_cross_entropy: {name} must be a torch.Tensor, got {type(t)}")
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(
            "linear_cross_entropy: expected hidden (T, H) and weight (V, H), got hidden "
            f"{tuple(hidden.shape)}, weight {tuple(weight.shape)}"
        )
    T, V = hidden.shape[0], weight.shape[0]
    if targets.shape != (T,) or targets.dtype.is_floating_point or targets.dtype == torch.bool:
        raise ValueError(
            f"linear_cross_entropy: targets must be ({T},) integer, got "
            f"{tuple(targets.shape)} {targets.dtype}"
        )
    if bias is not None and bias.shape != (V,):
        raise ValueError(f"linear_cross_entropy: bias must be ({V},), got {tuple(bias.shape)}")
    if weights is not None and (weights.shape != (T,) or not weights.dtype.is_floating_point):
        raise ValueError(
            f"linear_cross_entropy: weights must be ({T},) float, got "
            f"{tuple(weights.shape)} {weights.dtype}"
        )
    if (
        hidden.dtype not in _DTYPES[backend]
        or weight.dtype != hidden.dtype
        or (bias is not None and bias.dtype != hidden.dtype)
    ):
        raise TypeError(
            f"linear_cross_entropy: hidden, weight (and bias) must share one dtype of "
            f"{_DTYPES[backend]} for backend {backend!r}, got {hidden.dtype}, {weight.dtype}"
            + (f", {bias.dtype}" if bias is not None else "")
        )
    devices = {t.device for _, t in named}
    if len(devices) != 1:
        raise ValueError(f"linear_cross_entropy: all inputs must be on one device, got {devices}")
    if reduction not in REDUCTIONS:
        raise ValueError(
            f"linear_cross_entropy: reduction must be one of {REDUCTIONS}, got {reduction!r}"
        )
    if softcap is not None and not softcap > 0:
        raise ValueError(f"linear_cross_entropy: softcap must be > 0 or None, got {softcap!r}")
    if V == 0:
        raise ValueError("linear_cross_entropy: weight has no rows (vocabulary of 0)")
    if hidden.device.type == "cpu" and T:
        # On CPU this costs no device sync; on CUDA an out-of-range id trips an index assert.
        bad = (targets != ignore_index) & ((targets < 0) | (targets >= V))
        if bool(bad.any()):
            first = int(bad.nonzero()[0, 0])
            raise ValueError(
                f"linear_cross_entropy: targets must be in [0, {V}) or ignore_index="
                f"{ignore_index}; targets[{first}] = {int(targets[first])}"
            )


# ----------------------------------------------------------------------------------------
# The chunk loop, shared by the torch and triton backends. ``rows(z, tgt, g, lse, softcap)``
# is the per-row step on one (tokens × vocabulary block) slab z of logits:
# - returns (lse, zt) fp32: the slab's log-sum-exp per row (``lse`` itself when given) and the
#   (capped) logit of the row's target if it lies in the slab, else 0 (tgt < 0 or >= width);
# - with g (rows,) given, overwrites z with ``g * (softmax - onehot) * cap'`` (the gradient of
#   ``Σ g * ce`` w.r.t. the raw logits), the softmax taken against ``lse`` when given (a later
#   vocabulary block) or the slab's own (the whole vocabulary in one slab);
# - without g, z may be clobbered.


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _logits(h: Tensor, W: Tensor, b: Tensor | None) -> Tensor:
    return h @ W.T if b is None else torch.addmm(b, h, W.T)  # (rows, V_block), h's dtype


def _plan(T: int, V: int, H: int, dtype: torch.dtype, softcap: float, budget: int):
    """(tokens per chunk, vocabulary per block, vocabulary rows per grad_weight update)."""
    acc = _acc_dtype(dtype)
    per_elem = torch.finfo(acc).bits // 8 * (2 if softcap else 1)
    per_elem += 0 if dtype == acc else torch.finfo(dtype).bits // 8
    fit = budget // (V * per_elem)
    floor = min(T, _MIN_CHUNK_TOKENS)
    if fit >= max(floor, 1):
        chunk, block = min(T, fit), V
    else:
        chunk, block = max(floor, 1), max(1, budget // (max(floor, 1) * per_elem))
    # grad_weight += dlogitsᵀ h in the input dtype, added to the fp32 accumulator in slices
    # so the transient product stays a fraction of the budget.
    gw_rows = max(1, budget // (4 * H * max(1, torch.finfo(dtype).bits // 8)))
    return chunk, block, gw_rows


def _chunked(hidden, weight, bias, targets, ignored, gscale, softcap, need, budget, rows):
    """Per-token ce (T,) and the gradients of ``Σ_t gscale[t] * ce[t]`` that ``need`` asks for.

    need: (grad_hidden, grad_weight, grad_bias) bools. Returns (ce, gh, gw, gb), the gradients
    in the dtypes of hidden / weight / bias (None where not asked).
    """
    T, H = hidden.shape
    V = weight.shape[0]
    dtype, acc = hidden.dtype, _acc_dtype(hidden.dtype)
    need_h, need_w, need_b = need
    chunk, block, gw_rows = _plan(T, V, H, dtype, softcap, budget)
    one_block = block >= V
    ce = hidden.new_empty(T, dtype=acc)
    gh = None
    if need_h:  # one vocabulary block: each chunk's product is final, no accumulation
        gh = hidden.new_empty((T, H)) if one_block else hidden.new_zeros((T, H), dtype=acc)
    gw = weight.new_zeros((V, H), dtype=acc) if need_w else None
    gb = weight.new_zeros(V, dtype=acc) if need_b else None
    grads = need_h or need_w or need_b

    def apply(dz: Tensor, h: Tensor, t0: int, t1: int, v0: int, v1: int) -> None:
        """Multiply the slab's dlogits (rows × block, input dtype) into the gradients."""
        if gh is not None:
            if one_block:
                torch.mm(dz, weight, out=gh[t0:t1])
            elif dtype == acc:
                gh[t0:t1].addmm_(dz, weight[v0:v1])
            else:  # fp32 products: a bf16 rounding per vocabulary block would add up
                gh[t0:t1].addmm_(dz.to(acc), weight[v0:v1].to(acc))
        if gw is not None:
            if dtype == acc:
                gw[v0:v1].addmm_(dz.T, h)
            else:
                for s in range(v0, v1, gw_rows):
                    e = min(v1, s + gw_rows)
                    gw[s:e] += dz[:, s - v0 : e - v0].T @ h
        if gb is not None:
            gb[v0:v1] += dz.sum(0, dtype=acc)

    for t0 in range(0, T, chunk):
        t1 = min(T, t0 + chunk)
        h = hidden[t0:t1]
        tgt = torch.where(ignored[t0:t1], -1, targets[t0:t1])  # -1: in no block
        g = gscale[t0:t1] if grads else None
        if one_block:
            z = _logits(h, weight, bias)
            lse, zt = rows(z, tgt, g, None, softcap)
            if grads:
                apply(z, h, t0, t1, 0, V)
        else:
            lse = torch.full((t1 - t0,), -torch.inf, dtype=acc, device=hidden.device)
            zt = torch.zeros_like(lse)
            for v0 in range(0, V, block):
                v1 = min(V, v0 + block)
                z = _logits(h, weight[v0:v1], None if bias is None else bias[v0:v1])
                part, zt_part = rows(z, tgt - v0, None, None, softcap)
                lse = torch.logaddexp(lse, part)
                zt += zt_part
            if grads:
                for v0 in range(0, V, block):
                    v1 = min(V, v0 + block)
                    z = _logits(h, weight[v0:v1], None if bias is None else bias[v0:v1])
                    rows(z, tgt - v0, g, lse, softcap)
                    apply(z, h, t0, t1, v0, v1)
        ce[t0:t1] = torch.where(ignored[t0:t1], 0.0, lse - zt)
    cast = [x if x is None or x.dtype == ref.dtype else x.to(ref.dtype)
            for x, ref in ((gh, hidden), (gw, weight), (gb, bias if bias is not None else weight))]  # fmt: skip
    return (ce, *cast)


def _torch_rows(z: Tensor, tgt: Tensor, g: Tensor | None, lse: Tensor | None, softcap: float):
    """The row step in PyTorch, in place on an fp32 (fp64) view of z: see ``_chunked``."""
    y = z if z.dtype in (torch.float32, torch.float64) else z.to(torch.float32)
    width = y.shape[1]
    valid = (tgt >= 0) & (tgt < width)
    col = tgt.clamp(0, width - 1)
    cap_grad = None
    if softcap:
        y.div_(softcap).tanh_()
        if g is not None:
            cap_grad = 1.0 - y * y  # d(c·tanh(z/c))/dz
        y.mul_(softcap)
    zt = torch.where(valid, y.gather(1, col[:, None]).squeeze(1), 0.0)
    if lse is None:
        m = y.amax(1, keepdim=True)
        y.sub_(m).exp_()
        s = y.sum(1, keepdim=True)
        lse = (m + s.log()).squeeze(1)
        if g is None:
            return lse, zt
        y.mul_(g[:, None] / s)  # g · softmax
    else:
        y.sub_(lse[:, None]).exp_().mul_(g[:, None])
    r = valid.nonzero().squeeze(1)
    y.index_put_((r, col[r]), -g[r].to(y.dtype), accumulate=True)
    if cap_grad is not None:
        y.mul_(cap_grad)
    if y is not z:
        z.copy_(y)
    return lse, zt


def _triton_rows(z, tgt, g, lse, softcap):
    from pyfast_tune.kernels.linear_cross_entropy.triton import lce_rows

    return lce_rows(z, tgt, g, lse, softcap)


_ROWS = {"torch": _torch_rows, "triton": _triton_rows}


def _token_scales(targets, weights, ignore_index, reduction, acc):
    """(ignored (T,) bool, per-token loss multiplier (T,) acc: weights, 0 where ignored, /count
    for "mean")."""
    ignored = targets == ignore_index
    w = torch.zeros_like(targets, dtype=acc).masked_fill_(~ignored, 1.0)
    if weights is not None:
        w *= weights.to(acc)
    if reduction == "mean":
        w /= (~ignored).sum().clamp(min=1).to(acc)
    return ignored, w


# ----------------------------------------------------------------------------------------
# The custom ops. Forward returns (loss, ce, grad_hidden, grad_weight, grad_bias); the three
# gradients are those of the loss itself (computed in the forward, for "sum" and "mean") or
# empty when not asked for.


@torch.library.custom_op("pyfast_tune::linear_cross_entropy", mutates_args=())
def _lce_op(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    bias: Tensor | None,
    weights: Tensor | None,
    ignore_index: int,
    reduction: str,
    softcap: float,
    grad_hidden: bool,
    grad_weight: bool,
    grad_bias: bool,
    chunk_bytes: int,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """loss (() or (T,)), ce (T,) in fp32/fp64; gradients in the inputs' dtypes, or empty."""
    acc = _acc_dtype(hidden.dtype)
    ignored, scale = _token_scales(targets, weights, ignore_index, reduction, acc)
    eager = reduction != "none"
    # "none" with only hidden's gradient wanted (a frozen head: LoRA): each token's gradient
    # row depends on that token alone, so it is computed here and scaled per token in the
    # backward, which then recomputes nothing.
    rows = _rows_only(reduction, grad_hidden, grad_weight, grad_bias, bias)
    need = (grad_hidden and (eager or rows), grad_weight and eager, grad_bias and eager)
    ce, gh, gw, gb = _chunked(
        hidden, weight, bias, targets, ignored, scale, softcap, need, chunk_bytes, _ROWS[backend]
    )
    if reduction == "none":
        loss = ce * scale
    else:  # T terms: summed in fp64, so the sum adds no rounding beyond the fp32 result's
        loss = (ce.double() * scale).sum().to(acc)
    return loss, ce, *(x if x is not None else hidden.new_empty(0) for x in (gh, gw, gb))


def _rows_only(reduction: str, grad_hidden: bool, grad_weight: bool, grad_bias: bool,
               bias) -> bool:  # fmt: skip
    """Reduction "none" where hidden's gradient is the only one wanted: computed eagerly."""
    has_bias_grad = grad_bias and bias is not None
    return reduction == "none" and grad_hidden and not grad_weight and not has_bias_grad


@_lce_op.register_fake
def _(hidden, weight, targets, bias, weights, ignore_index, reduction, softcap, gh, gw, gb, cb, be):
    acc = _acc_dtype(hidden.dtype)
    T = hidden.shape[0]
    eager = reduction != "none"
    rows = _rows_only(reduction, gh, gw, gb, bias)
    return (
        hidden.new_empty((T,) if reduction == "none" else (), dtype=acc),
        hidden.new_empty(T, dtype=acc),
        torch.empty_like(hidden) if gh and (eager or rows) else hidden.new_empty(0),
        torch.empty_like(weight) if gw and eager else hidden.new_empty(0),
        torch.empty_like(bias) if gb and eager and bias is not None else hidden.new_empty(0),
    )


@torch.library.custom_op("pyfast_tune::linear_cross_entropy_backward", mutates_args=())
def _lce_backward_op(
    grad_loss: Tensor,
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    bias: Tensor | None,
    weights: Tensor | None,
    ignore_index: int,
    softcap: float,
    grad_hidden: bool,
    grad_weight: bool,
    grad_bias: bool,
    chunk_bytes: int,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of ``Σ_t grad_loss[t] * loss_none[t]`` (reduction "none"), recomputed."""
    acc = _acc_dtype(hidden.dtype)
    ignored, scale = _token_scales(targets, weights, ignore_index, "none", acc)
    need = (grad_hidden, grad_weight, grad_bias)
    _, gh, gw, gb = _chunked(
        hidden, weight, bias, targets, ignored, scale * grad_loss.to(acc), softcap, need,
        chunk_bytes, _ROWS[backend],
    )  # fmt: skip
    return tuple(x if x is not None else hidden.new_empty(0) for x in (gh, gw, gb))


@_lce_backward_op.register_fake
def _(grad_loss, hidden, weight, targets, bias, weights, ii, softcap, gh, gw, gb, cb, be):
    return (
        torch.empty_like(hidden) if gh else hidden.new_empty(0),
        torch.empty_like(weight) if gw else hidden.new_empty(0),
        torch.empty_like(bias) if gb and bias is not None else hidden.new_empty(0),
    )


def _setup_context(ctx, inputs, output):
    hidden, weight, targets, bias, weights, ignore_index, reduction, softcap = inputs[:8]
    flags, chunk_bytes, backend = inputs[8:11], inputs[11], inputs[12]
    _, ce, gh, gw, gb = output
    ctx.mark_non_differentiable(ce, gh, gw, gb)
    ctx.rows = _rows_only(reduction, *flags, bias)
    if ctx.rows:  # hidden's per-token gradient rows, computed in the forward
        ctx.save_for_backward(gh, ce)
    elif reduction == "none":
        ctx.save_for_backward(hidden, weight, targets, bias, weights, ce)
    else:
        ctx.save_for_backward(gh, gw, gb, targets, ce)
    ctx.args = (ignore_index, reduction, softcap, flags, chunk_bytes, backend)
    ctx.weights_dtype = None if weights is None else weights.dtype


def _backward(ctx, grad_loss, *_unused):
    ignore_index, reduction, softcap, flags, chunk_bytes, backend = ctx.args
    needs = ctx.needs_input_grad
    if ctx.rows:
        rows, ce = ctx.saved_tensors
        g = grad_loss.to(ce.dtype)
        gh, gw, gb = (rows.to(g.dtype) * g[:, None]).to(rows.dtype), None, None
        g_weights = ce * g if needs[4] else None
    elif reduction == "none":
        hidden, weight, targets, bias, weights, ce = ctx.saved_tensors
        grad_loss = grad_loss.contiguous()
        gh, gw, gb = torch.ops.pyfast_tune.linear_cross_entropy_backward(
            grad_loss, hidden, weight, targets, bias, weights, ignore_index, softcap, *flags,
            chunk_bytes, backend,
        )  # fmt: skip
        g_weights = ce * grad_loss if needs[4] else None
    else:
        # The gradients of the loss were computed in the forward: scale them in place (they
        # are this node's own outputs, used once; a second backward through a retained graph
        # fails autograd's saved-tensor version check instead of reusing scaled values).
        gh, gw, gb, targets, ce = ctx.saved_tensors
        g = grad_loss
        inplace = not torch.compiler.is_compiling()  # AOT autograd forbids the mutation
        gh, gw, gb = (
            (x.mul_(g) if inplace else x * g) if f else None for x, f in zip((gh, gw, gb), flags)
        )
        g_weights = None
        if needs[4]:
            g_weights = ce * g
            if reduction == "mean":
                g_weights = g_weights / (targets != ignore_index).sum().clamp(min=1)
    if g_weights is not None:
        g_weights = g_weights.to(ctx.weights_dtype)
    return (
        gh if flags[0] and needs[0] else None,
        gw if flags[1] and needs[1] else None,
        None,
        gb if flags[2] and needs[3] else None,
        g_weights,
        *([None] * 8),
    )


_lce_op.register_autograd(_backward, setup_context=_setup_context)
