"""Fused LoRA: kernels vs reference, dropout masks, saved bytes, peft/QLoRA wiring.

Triton kernels run under TRITON_INTERPRET=1 (tests/conftest.py). Tolerances follow
flash-attention: against a float64 reference, our error must be at most 2x (outputs) or 3x
(gradients) the error of the same-dtype PyTorch composition (``lora_linear_ref``).
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from pyfast_tune.kernels.lora import (
    lora_dropout_mask,
    lora_linear,
    lora_linear_ref,
    patch_peft_lora,
    unpatch_peft_lora,
)

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
K_IN, N_OUT = 37, 45  # odd in/out features: several tiles each, the last one ragged


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # small shapes on a shared 2-core machine: intra-op threads only add contention
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _inputs(M, K, N, r, dtype, adapter_dtype=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    adt = adapter_dtype or dtype

    def rnd(*shape, scale=1.0, dt=dtype):
        return (torch.randn(*shape, generator=g) * scale).to(dt)

    x = rnd(M, K).requires_grad_()
    W = rnd(N, K, scale=K**-0.5)
    A = rnd(r, K, scale=K**-0.5, dt=adt).requires_grad_()
    B = rnd(N, r, scale=r**-0.5, dt=adt).requires_grad_()  # nonzero, unlike peft's init
    bias = rnd(N)
    return x, W, A, B, bias


def _check(name, ours, same_dtype, ref, factor):
    """max|ours - ref| <= factor * max|same_dtype - ref| (+ a 1e-6 relative floor)."""
    err = (ours.double() - ref).abs()
    bound = factor * (same_dtype.double() - ref).abs().max().item()
    bound += 1e-6 * ref.abs().max().item()
    if err.max().item() > bound:
        worst = torch.topk(err.flatten(), min(5, err.numel())).indices
        rows = [
            f"  at {tuple(torch.unravel_index(i, err.shape))}: ours {ours.flatten()[i].item():.6g}"
            f" ref {ref.flatten()[i].item():.6g} torch {same_dtype.flatten()[i].item():.6g}"
            for i in worst
        ]
        raise AssertionError(
            f"{name}: max err {err.max().item():.3g} > {factor} x torch err (bound {bound:.3g})\n"
            + "\n".join(rows)
        )


def _compare(backend, M, r, dtype, p, adapter_dtype=None, scaling=2.0, seed=1234, K=K_IN, N=N_OUT):
    x, W, A, B, bias = _inputs(M, K, N, r, dtype, adapter_dtype)
    mask = lora_dropout_mask((M, K), p, seed, backend, dtype=A.dtype) if p else None
    y = lora_linear(x, W, A, B, scaling, p, bias, backend=backend, seed=seed)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(9)).to(dtype)
    grads = torch.autograd.grad(y, (x, A, B), dy)

    y_pt = lora_linear_ref(x, W, A, B, scaling, p, bias, keep_mask=mask)
    grads_pt = torch.autograd.grad(y_pt, (x, A, B), dy)
    x64, A64, B64 = (t.detach().double().requires_grad_() for t in (x, A, B))
    y64 = lora_linear_ref(x64, W.double(), A64, B64, scaling, p, bias.double(), keep_mask=mask)
    grads64 = torch.autograd.grad(y64, (x64, A64, B64), dy.double())

    assert y.dtype == dtype and y.shape == (M, N)
    _check(f"{backend} y", y, y_pt, y64, 2)
    for gname, g, g_pt, g64 in zip(("dx", "dA", "dB"), grads, grads_pt, grads64):
        assert g.dtype == g_pt.dtype
        _check(f"{backend} {gname}", g, g_pt, g64, 3)


@pytest.mark.parametrize("p", [0.0, 0.1])
@pytest.mark.parametrize("M", [1, 1000])
@pytest.mark.parametrize("r", [1, 8, 64])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_lora_linear_matches_reference(backend, dtype, r, M, p):
    _compare(backend, M, r, dtype, p)


@pytest.mark.slow
@pytest.mark.parametrize("p", [0.0, 0.1])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_triton_larger_odd_shapes(dtype, p):
    """Many tiles in every dimension, ragged in each: M 1025, in 259, out 131, r 16."""
    _compare("triton", 1025, 16, dtype, p, K=259, N=131)


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_fp32_adapters_on_half_base(backend, dtype):
    # peft keeps adapters in fp32 on a bf16/fp16 model (autocast_adapter_dtype=True)
    _compare(backend, 97, 8, dtype, 0.1, adapter_dtype=torch.float32)


def test_leading_dims_no_bias_and_zero_tokens():
    x, W, A, B, _ = _inputs(2 * 3, K_IN, N_OUT, 4, torch.float32)
    x3 = x.detach().reshape(2, 3, K_IN)
    for backend in ("torch", "triton"):
        y = lora_linear(x3, W, A, B, 0.5, backend=backend)
        torch.testing.assert_close(y, lora_linear_ref(x3, W, A, B, 0.5))
        empty = lora_linear(x3[:0], W, A, B, 0.5, backend=backend)
        assert empty.shape == (0, 3, N_OUT)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_input_without_grad(backend):
    """First LoRA layer of a model: x needs no grad, only A and B do (no dx is computed)."""
    x, W, A, B, _ = _inputs(300, K_IN, N_OUT, 8, torch.float32)
    x = x.detach()
    y = lora_linear(x, W, A, B, 2.0, 0.1, backend=backend, seed=1)
    mask = lora_dropout_mask((300, K_IN), 0.1, 1, backend)
    y_ref = lora_linear_ref(x, W, A, B, 2.0, 0.1, keep_mask=mask)
    for g, g_ref in zip(
        torch.autograd.grad(y.sum(), (A, B)), torch.autograd.grad(y_ref.sum(), (A, B))
    ):
        torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_dropout_seed_semantics(backend):
    x, W, A, B, _ = _inputs(200, K_IN, N_OUT, 8, torch.float32)
    x = x.detach()
    mask = lora_dropout_mask((200, K_IN), 0.3, 5, backend)
    assert 0.65 < mask.float().mean().item() < 0.75  # keep rate 1 - p
    assert not torch.equal(mask, lora_dropout_mask((200, K_IN), 0.3, 6, backend))
    y5 = lora_linear(x, W, A, B, 1.0, 0.3, backend=backend, seed=5)
    torch.testing.assert_close(y5, lora_linear(x, W, A, B, 1.0, 0.3, backend=backend, seed=5))
    torch.testing.assert_close(y5, lora_linear_ref(x, W, A, B, 1.0, 0.3, keep_mask=mask))
    # seed=None: drawn from torch's global generator, so reproducible under manual_seed
    torch.manual_seed(11)
    y_a = lora_linear(x, W, A, B, 1.0, 0.3, backend=backend)
    y_b = lora_linear(x, W, A, B, 1.0, 0.3, backend=backend)
    torch.manual_seed(11)
    torch.testing.assert_close(y_a, lora_linear(x, W, A, B, 1.0, 0.3, backend=backend))
    assert not torch.allclose(y_a, y_b)


def test_torch_backend_mask_is_nn_dropout():
    """Same global RNG state -> the mask peft's nn.Dropout draws, forward and backward."""
    x, W, A, B, bias = _inputs(50, K_IN, N_OUT, 8, torch.float32)
    torch.manual_seed(3)
    y = lora_linear(x, W, A, B, 2.0, 0.25, bias, backend="torch")
    after = torch.rand(3)
    grads = torch.autograd.grad(y.square().sum(), (x, A, B))

    torch.manual_seed(3)
    drop = torch.nn.Dropout(0.25)
    y_peft = torch.nn.functional.linear(x, W, bias) + (drop(x) @ A.t() @ B.t()) * 2.0
    torch.testing.assert_close(torch.rand(3), after)  # generator advanced identically
    torch.testing.assert_close(y, y_peft)
    # backward folds 1/(1-p) into (M, r) instead of (M, K): rounding-level differences only;
    # a different mask would move these gradients by O(1)
    for g, g_peft in zip(grads, torch.autograd.grad(y_peft.square().sum(), (x, A, B))):
        torch.testing.assert_close(g, g_peft, rtol=1e-4, atol=1e-4)


def _saved_bytes(fn, params):
    """Bytes of distinct non-parameter storages autograd saves while running fn()."""
    param_ptrs = {p.untyped_storage().data_ptr() for p in params}
    seen = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in param_ptrs:
            seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("p", [0.0, 0.1])
def test_saved_activations_are_x_and_u(backend, p):
    from peft import LoraConfig, get_peft_model

    M, K, N, r = 64, 48, 40, 8
    x, W, A, B, _ = _inputs(M, K, N, r, torch.float32)
    ours = _saved_bytes(lambda: lora_linear(x, W, A, B, 2.0, p, backend=backend), (W, A, B))
    assert ours == M * K * 4 + M * r * 4  # x and u only: no mask, no dropped-out copy of x

    model = torch.nn.Sequential(torch.nn.Linear(K, N, bias=False))
    peft_model = get_peft_model(model, LoraConfig(r=r, lora_dropout=p, target_modules=["0"]))
    params = list(peft_model.parameters())
    peft_bytes = _saved_bytes(lambda: peft_model(x), params)
    assert ours <= peft_bytes
    if p > 0:  # peft keeps dropout(x) and the fp32 dropout noise: 2 x the bytes of x
        assert peft_bytes == 2 * M * K * 4 + M * r * 4


def test_validation_messages():
    x, W, A, B, bias = _inputs(4, 16, 8, 2, torch.float32)
    with pytest.raises(ValueError, match="shape mismatch"):
        lora_linear(x[:, :15], W, A, B, 1.0)
    with pytest.raises(ValueError, match="frozen"):
        lora_linear(x, W.clone().requires_grad_(), A, B, 1.0)
    with pytest.raises(TypeError, match="W dtype"):
        lora_linear(x, W.half(), A, B, 1.0)
    with pytest.raises(ValueError, match="dropout_p"):
        lora_linear(x, W, A, B, 1.0, dropout_p=1.0)
    with pytest.raises(ValueError, match="backend"):
        lora_linear(x, W, A, B, 1.0, backend="cuda")
    with pytest.raises(ValueError, match="keep_mask"):
        lora_linear_ref(x, W, A, B, 1.0, dropout_p=0.1)


# --- QLoRA: bitsandbytes 4-bit base weight on CPU -----------------------------------------


def _nf4_weight(N, K, quant_type="nf4", double_quant=True):
    bnb = pytest.importorskip("bitsandbytes", reason="QLoRA needs bitsandbytes")
    from bitsandbytes.functional import dequantize_4bit

    layer = bnb.nn.Linear4bit(
        K, N, bias=False, quant_type=quant_type, compress_statistics=double_quant
    )
    layer.weight.data = torch.randn(N, K) * K**-0.5
    layer = layer.to("cpu")  # quantizes
    W4 = layer.weight
    assert W4.dtype == torch.uint8 and W4.quant_state is not None
    return W4, dequantize_4bit(W4.data, W4.quant_state)


@pytest.mark.parametrize("p", [0.0, 0.1])
def test_qlora_op_on_cpu(p):
    W4, W_dq = _nf4_weight(N_OUT, K_IN)
    x, _, A, B, bias = _inputs(33, K_IN, N_OUT, 8, torch.float32)
    y = lora_linear(x, W4, A, B, 2.0, p, bias, seed=4)
    mask = lora_dropout_mask((33, K_IN), p, 4, "torch") if p else None
    y_ref = lora_linear_ref(x, W_dq, A, B, 2.0, p, bias, keep_mask=mask)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    for g, g_ref in zip(
        torch.autograd.grad(y.sum(), (x, A, B)), torch.autograd.grad(y_ref.sum(), (x, A, B))
    ):
        torch.testing.assert_close(g, g_ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "quant_type,double_quant,dtype",
    [("nf4", True, torch.bfloat16), ("nf4", False, torch.float32), ("fp4", True, torch.float16)],
)
def test_qlora_triton_dequantizes_in_kernel(quant_type, double_quant, dtype):
    """The kernels read the packed 4-bit weight (dequantized per tile) like the dense one."""
    W4, W_dq = _nf4_weight(N_OUT, K_IN, quant_type, double_quant)
    x, _, A, B, bias = _inputs(300, K_IN, N_OUT, 8, dtype)
    y = lora_linear(x, W4, A, B, 2.0, 0.1, bias, backend="triton", seed=3)
    mask = lora_dropout_mask((300, K_IN), 0.1, 3, "triton")
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(9)).to(dtype)
    grads = torch.autograd.grad(y, (x, A, B), dy)
    y_pt = lora_linear_ref(x, W_dq.to(dtype), A, B, 2.0, 0.1, bias, keep_mask=mask)
    grads_pt = torch.autograd.grad(y_pt, (x, A, B), dy)
    x64, A64, B64 = (t.detach().double().requires_grad_() for t in (x, A, B))
    y64 = lora_linear_ref(x64, W_dq.double(), A64, B64, 2.0, 0.1, bias.double(), keep_mask=mask)
    grads64 = torch.autograd.grad(y64, (x64, A64, B64), dy.double())
    _check("4-bit y", y, y_pt, y64, 2)
    for name, g, g_pt, g64 in zip(("dx", "dA", "dB"), grads, grads_pt, grads64):
        _check(f"4-bit {name}", g, g_pt, g64, 3)


# --- peft wiring: a tiny Llama trained with and without the swap ---------------------------

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _tiny_llama(tmp_path, quantized=False):
    from transformers import BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        # a multiple of 64: bitsandbytes 0.50's CPU 4-bit dequantize/gemm (the C++ path, even
        # in_features) mis-index the 64-element blocks when in_features % 64 != 0, so peft's own
        # QLoRA forward would use a wrong weight there; the Triton kernel indexes blocks the way
        # the quantizer wrote them (flat), like bitsandbytes' CUDA and pure-PyTorch paths.
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    model = LlamaForCausalLM(cfg)
    if not quantized:
        return model
    model.save_pretrained(tmp_path / "base")
    qcfg = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    )
    return LlamaForCausalLM.from_pretrained(tmp_path / "base", quantization_config=qcfg)


def _peft(model, dropout):
    from peft import LoraConfig, get_peft_model

    pm = get_peft_model(
        model, LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules=TARGETS)
    )
    torch.manual_seed(1)
    for name, prm in pm.named_parameters():
        if "lora_B" in name:  # peft zeroes B; train from a state where the adapter matters
            torch.nn.init.normal_(prm, std=0.05)
    return pm


def _train(model, steps=3):
    ids = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(2))
    # SGD: Adam's g / sqrt(v) would turn rounding-level gradient differences on near-zero
    # gradients into lr-sized weight differences
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    torch.manual_seed(7)  # the dropout masks
    model.train()
    losses = []
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize(
    "backend,dropout,quantized,dtype",
    [
        ("torch", 0.1, False, torch.float32),
        ("triton", 0.0, False, torch.float32),
        ("torch", 0.1, True, torch.float32),
        ("triton", 0.0, True, torch.float32),
        ("torch", 0.1, False, torch.bfloat16),
        pytest.param("triton", 0.0, False, torch.bfloat16, marks=pytest.mark.slow),
    ],
    ids=["torch-dropout", "triton", "qlora-torch-dropout", "qlora-triton", "bf16-torch-dropout",
         "bf16-triton"],
)  # fmt: skip
def test_swap_trains_like_peft(tmp_path, backend, dropout, quantized, dtype):
    """Losses of a tiny Llama trained with the swap equal peft's own (dropout masks included).

    bf16: peft keeps the adapters in fp32 (mixed-dtype op); the two computations round
    differently, so losses agree to 1e-3 (a different dropout mask moves them by ~5e-3).
    """
    base = _tiny_llama(tmp_path, quantized)
    peft_model = _peft(base if quantized else base.to(dtype), dropout)
    fused = copy.deepcopy(peft_model)
    assert patch_peft_lora(fused, backend=backend) == 2 * len(TARGETS)
    q_proj = fused.base_model.model.model.layers[0].self_attn.q_proj
    assert "forward" in q_proj.__dict__  # the swap really is in place

    losses_peft, losses_fused = _train(peft_model), _train(fused)
    assert losses_fused[0] != losses_fused[-1]
    rtol, atol = (2e-5, 1e-6) if dtype == torch.float32 else (1e-3, 1e-3)
    torch.testing.assert_close(losses_fused, losses_peft, rtol=rtol, atol=0)

    # the trained adapters agree, and saving them is unaffected by the swap
    sd_peft = {k: v for k, v in peft_model.state_dict().items() if "lora_" in k}
    sd_fused = {k: v for k, v in fused.state_dict().items() if "lora_" in k}
    assert sd_fused.keys() == sd_peft.keys()
    for k in sd_peft:
        torch.testing.assert_close(sd_fused[k], sd_peft[k], rtol=100 * rtol, atol=atol)


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.slow)])
def test_swap_under_gradient_checkpointing(tmp_path, backend):
    """Recomputed forwards redraw the same dropout masks (checkpoint restores the RNG state)."""
    model = _peft(_tiny_llama(tmp_path), 0.1)
    patch_peft_lora(model, backend=backend)
    model.train()
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(4))

    def lora_grads():
        torch.manual_seed(5)
        model(input_ids=ids, labels=ids).loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        model.zero_grad(set_to_none=True)
        return grads

    plain = lora_grads()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    checkpointed = lora_grads()
    assert plain.keys() == checkpointed.keys() and len(plain) == 4 * len(TARGETS)
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-5, atol=1e-7)


def test_patch_keeps_saved_adapters_and_merged_weights(tmp_path):
    from peft.tuners.lora import layer as lora_layer

    model = _peft(_tiny_llama(tmp_path), 0.0)
    model.save_pretrained(tmp_path / "plain")
    ids = torch.randint(0, 128, (1, 12), generator=torch.Generator().manual_seed(3))
    model.eval()
    with torch.no_grad():
        logits_plain = model(input_ids=ids).logits
        with model.disable_adapter():
            logits_base = model(input_ids=ids).logits

    assert patch_peft_lora(model) == 2 * len(TARGETS)
    assert patch_peft_lora(model) == 2 * len(TARGETS)  # idempotent
    model.save_pretrained(tmp_path / "patched")
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        assert (tmp_path / "plain" / name).read_bytes() == (
            tmp_path / "patched" / name
        ).read_bytes()
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, logits_plain)
        with model.disable_adapter():  # falls back to peft, which skips the adapter
            torch.testing.assert_close(model(input_ids=ids).logits, logits_base)
        model.merge_adapter()  # merged: falls back to the base layer with merged weights
        torch.testing.assert_close(model(input_ids=ids).logits, logits_plain)
        model.unmerge_adapter()

    assert unpatch_peft_lora(model) == 2 * len(TARGETS)
    for module in model.modules():
        if isinstance(module, lora_layer.Linear):
            assert "forward" not in module.__dict__
    merged_fused = copy.deepcopy(model)
    patch_peft_lora(merged_fused)
    w_plain = model.merge_and_unload().state_dict()
    w_fused = merged_fused.merge_and_unload().state_dict()
    assert w_plain.keys() == w_fused.keys()
    for k in w_plain:
        assert torch.equal(w_plain[k], w_fused[k]), k


# --- GPU compile check: no GPU here, but Triton can still compile for a CUDA target ---------

_COMPILE = r"""
import inspect, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from pyfast_tune.kernels.lora import triton as L

arch, act, adt, w4, r_block = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4] == "1", int(sys.argv[5])
ptr = {"X": act, "W": "u8" if w4 else act, "Y": act, "BIAS": act, "DY": act, "DX": act,
       "A": adt, "B": adt, "U": adt, "DA": adt, "DB": adt, "DU": "fp32", "CODE": "fp32",
       "ABSMAX": "fp32"}
consts = dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, BLOCK_R=r_block, FP32_DOT=False,
              HAS_BIAS=True, HAS_DROPOUT=True, W_4BIT=w4, QBLOCK=64, NEED_DX=True,
              DOT_PRECISION="ieee" if act == "fp32" else "tf32")
for fn in (L._lora_fwd_kernel, L._lora_bwd_dx_kernel, L._lora_bwd_dadb_kernel):
    names = list(inspect.signature(fn.fn).parameters)
    sig = {n: "constexpr" if n in consts else "*" + ptr[n[:-4]] if n.endswith("_ptr")
           else "fp32" if n in ("scaling", "p") else "i64" if n == "seed" else "i32"
           for n in names}
    cx = {(names.index(n),): v for n, v in consts.items() if n in names}
    kernel = triton.compile(ASTSource(fn, sig, constexprs=cx), target=GPUTarget("cuda", arch, 32))
    assert ".entry" in kernel.asm["ptx"], fn
print("compiled")
"""


def _compile_for_gpu(arch, act, adt, w4, r_block):
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    args = [str(arch), act, adt, "1" if w4 else "0", str(r_block)]
    out = subprocess.run(
        [sys.executable, "-c", _COMPILE, *args],
        env=env,
        capture_output=True,
        text=True,
        cwd=str(Path(__file__).resolve().parents[2]),
        timeout=600,
    )
    assert out.returncode == 0 and "compiled" in out.stdout, out.stderr[-3000:]


def test_kernels_compile_for_gpu_qlora_bf16():
    """Compiled-mode only errors (types across branches, constexpr returns) show up here."""
    _compile_for_gpu(80, "bf16", "fp32", True, 16)


@pytest.mark.slow
@pytest.mark.parametrize(
    "arch,act,adt,w4,r_block",
    [(80, "bf16", "bf16", False, 16), (80, "fp16", "fp16", False, 64),
     (90, "fp32", "fp32", False, 16), (90, "bf16", "bf16", True, 128)],
)  # fmt: skip
def test_kernels_compile_for_gpu(arch, act, adt, w4, r_block):
    _compile_for_gpu(arch, act, adt, w4, r_block)
