"""The first-use guard and its fault switch: a wrong or failing backend never trains.

``PYFAST_TUNE_FAULTS`` makes one backend return a perturbed result or raise; the guard must
reject exactly that backend (naming it in a warning), choose a correct one, cache decisions on
disk (never under a fault), decide nothing while tracing, and leave the caller's RNG alone. A
tiny training run with ``attention: op`` under each fault gives the losses of ``attention: ref``.
"""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys

import pytest
import torch

from pyfast_tune.kernels import guard
from pyfast_tune.kernels.guard import faults
from pyfast_tune.kernels.lora import lora_shape
from pyfast_tune.kernels.varlen_attention import attention_shape, varlen_attention
from tests.conftest import ROOT

CPU = torch.device("cpu")
ATTN = {"dtype": "float32", "head_dim": 32, "gqa": 2, "window": [-1, 0]}
LORA = {"dtype": "float32", "adapter_dtype": "float32", "rank": 4, "four_bit": False}


@pytest.fixture(autouse=True)
def fresh_guard(tmp_path, monkeypatch):
    """Each test: its own disk cache, no decisions in memory, no faults."""
    monkeypatch.setenv(guard.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.delenv(faults.ENV, raising=False)
    guard.forget()
    yield
    guard.forget()


def packed_qkv(seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    lens = [5, 1, 12, 9]
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)
    q = torch.randn(sum(lens), 4, 32, generator=g).to(dtype)
    k, v = (torch.randn(sum(lens), 2, 32, generator=g).to(dtype) for _ in range(2))
    return q, k, v, cu, max(lens)


def test_fault_spec_is_parsed_and_bad_specs_are_refused(monkeypatch):
    monkeypatch.setenv(faults.ENV, "varlen_attention.cpp=wrong, lora_linear.torch=raise")
    assert faults.active("varlen_attention", "cpp") == "wrong"
    assert faults.active("lora_linear", "torch") == "raise"
    assert faults.active("varlen_attention", "sdpa") is None
    with pytest.raises(faults.InjectedFault, match="lora_linear.torch"):
        faults.before("lora_linear", "torch")
    for bad in ("varlen_attention.cpp", "cpp=wrong", "varlen_attention.cpp=slow"):
        monkeypatch.setenv(faults.ENV, bad)
        with pytest.raises(ValueError, match="op.backend=kind"):
            faults.active("varlen_attention", "cpp")


def test_wrong_fault_perturbs_the_backend_it_names(monkeypatch):
    q, k, v, cu, m = packed_qkv()
    clean = varlen_attention(q, k, v, cu, cu, m, m, backend="cpp")
    monkeypatch.setenv(faults.ENV, "varlen_attention.cpp=wrong")
    wrong = varlen_attention(q, k, v, cu, cu, m, m, backend="cpp")
    assert (wrong - clean).abs().min() > 1.0  # every element moved by more than max|out|
    torch.testing.assert_close(varlen_attention(q, k, v, cu, cu, m, m, backend="ref"), clean)


@pytest.mark.parametrize("kind", ["wrong", "raise"])
def test_guard_rejects_a_faulty_attention_backend(monkeypatch, caplog, kind):
    monkeypatch.setenv(faults.ENV, f"varlen_attention.cpp={kind}")
    with caplog.at_level(logging.WARNING, logger="pyfast_tune.guard"):
        decision = guard.decide("varlen_attention", CPU, ATTN)
    checks = {c.backend: c for c in decision.checks}
    assert decision.chosen == "sdpa"
    assert checks["cpp"].ok is False and checks["sdpa"].ok is True
    if kind == "wrong":
        assert checks["cpp"].error_ratio > 100 * checks["cpp"].allowed
    else:
        assert "InjectedFault" in checks["cpp"].error
    assert re.search(r"backend 'cpp' rejected: .*using 'sdpa'", caplog.text), caplog.text
    # The op itself then runs SDPA: the result is the reference's, not the perturbed one.
    q, k, v, cu, m = packed_qkv()
    out = varlen_attention(q, k, v, cu, cu, m, m)
    torch.testing.assert_close(out, varlen_attention(q, k, v, cu, cu, m, m, backend="ref"))


def test_guard_accepts_correct_backends_and_caches_on_disk(monkeypatch, tmp_path):
    decision = guard.decide("varlen_attention", CPU, ATTN)
    checks = {c.backend: c for c in decision.checks}
    assert set(checks) == {"cpp", "sdpa"}
    for c in checks.values():
        assert c.ok and c.error_ratio <= c.allowed and c.ms > 0, c
    fastest = min(checks.values(), key=lambda c: c.ms).backend
    assert decision.chosen == fastest and checks[fastest].chosen
    files = list((tmp_path / "cache" / "guard").glob("varlen_attention-*.json"))
    assert len(files) == 1 and not list(files[0].parent.glob(".*tmp"))
    saved = json.loads(files[0].read_text())
    assert saved["key"]["torch"] == torch.__version__ and saved["key"]["shape"] == ATTN
    assert saved["decision"]["chosen"] == decision.chosen

    # A new process (memory forgotten) reads the file and checks nothing.
    guard.forget()
    monkeypatch.setattr(guard.check, "evaluate", lambda *a, **k: pytest.fail("re-checked"))
    again = guard.decide("varlen_attention", CPU, ATTN)
    assert again.chosen == decision.chosen and again.source == "disk cache"

    # A torn or foreign file is ignored (re-checked), never trusted.
    files[0].write_text("{not json")
    guard.forget()
    monkeypatch.undo()
    monkeypatch.setenv(guard.CACHE_ENV, str(tmp_path / "cache"))
    assert guard.decide("varlen_attention", CPU, ATTN).source == "checked"


def test_a_fault_bypasses_the_disk_cache(monkeypatch, tmp_path):
    guard.decide("varlen_attention", CPU, ATTN)  # a clean decision on disk
    guard.forget()
    monkeypatch.setenv(faults.ENV, "varlen_attention.cpp=wrong")
    decision = guard.decide("varlen_attention", CPU, ATTN)
    assert decision.source == "checked" and decision.chosen == "sdpa"
    assert len(list((tmp_path / "cache" / "guard").glob("varlen_attention-*"))) == 1


def test_explicit_backend_is_checked_not_raced(monkeypatch, caplog):
    decision = guard.decide("varlen_attention", CPU, ATTN, prefer="cpp")
    assert decision.chosen == "cpp"
    assert [c.backend for c in decision.checks] == ["cpp"] and decision.checks[0].ms is None
    guard.forget()
    monkeypatch.setenv(faults.ENV, "varlen_attention.cpp=wrong")
    with caplog.at_level(logging.WARNING, logger="pyfast_tune.guard"):
        decision = guard.decide("varlen_attention", CPU, ATTN, prefer="cpp")
    assert decision.chosen == "sdpa" and "backend 'cpp' rejected" in caplog.text


def test_failure_after_a_passed_check_falls_back(monkeypatch, caplog):
    q, k, v, cu, m = packed_qkv()
    assert guard.choose("varlen_attention", CPU, attention_shape(q, k, (-1, -1), True), "cpp")
    monkeypatch.setenv(faults.ENV, "varlen_attention.cpp=raise")  # e.g. a launch failure
    with caplog.at_level(logging.WARNING, logger="pyfast_tune.guard"):
        out = varlen_attention(q, k, v, cu, cu, m, m, prefer="cpp")
    assert "backend 'cpp' failed" in caplog.text and "using 'sdpa'" in caplog.text
    torch.testing.assert_close(out, varlen_attention(q, k, v, cu, cu, m, m, backend="ref"))


def test_a_broken_check_never_stops_the_op(monkeypatch, caplog, tmp_path):
    op = guard.get_op("varlen_attention")
    monkeypatch.setattr(op, "reference", lambda case: 1 / 0)
    with caplog.at_level(logging.WARNING, logger="pyfast_tune.guard"):
        decision = guard.decide("varlen_attention", CPU, ATTN)
    assert decision.source == "unchecked" and decision.chosen == "cpp"
    assert "could not be checked (ZeroDivisionError" in caplog.text
    assert not (tmp_path / "cache").exists()  # the next process checks again


def test_an_explicit_backend_that_cannot_run_here_says_so(monkeypatch, caplog):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with caplog.at_level(logging.WARNING, logger="pyfast_tune.guard"):
        decision = guard.decide("varlen_attention", CPU, ATTN, prefer="triton")
    assert decision.chosen in ("cpp", "sdpa")
    assert "backend 'triton' cannot run here: Triton needs CUDA" in caplog.text


def test_lse_callers_only_get_backends_that_return_it(monkeypatch):
    monkeypatch.setenv(faults.ENV, "varlen_attention.cpp=wrong")
    q, k, v, cu, m = packed_qkv()
    out, lse = varlen_attention(q, k, v, cu, cu, m, m, return_lse=True)
    ref_out, ref_lse = varlen_attention(q, k, v, cu, cu, m, m, return_lse=True, backend="ref")
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(lse, ref_lse)


def test_guard_leaves_rng_grad_mode_and_threads_alone():
    torch.manual_seed(123)
    state, threads = torch.get_rng_state(), torch.get_num_threads()
    with torch.no_grad():
        guard.decide("varlen_attention", CPU, ATTN)
        guard.decide("lora_linear", CPU, LORA)
        assert not torch.is_grad_enabled()
    assert torch.equal(torch.get_rng_state(), state) and torch.get_num_threads() == threads


def test_nothing_is_decided_while_tracing():
    from torch._subclasses.fake_tensor import FakeTensorMode

    q, k, v, cu, m = packed_qkv()
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        fq, fk, fv = (mode.from_tensor(t) for t in (q, k, v))
        out = varlen_attention(fq, fk, fv, cu, cu, m, m)
    assert out.shape == q.shape and not guard.decision._DECISIONS


@pytest.mark.parametrize("reentrant", [False, True])
def test_first_call_inside_activation_checkpointing(reentrant, caplog):
    """The check's own autograd must stay out of the checkpointed region (same saved-tensor
    count at recomputation) and checkpointing's control flow is not a backend failure."""
    from torch.utils.checkpoint import checkpoint

    q, k, v, cu, m = packed_qkv()
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    with caplog.at_level(logging.WARNING, logger="pyfast_tune.guard"):
        out = checkpoint(
            lambda q, k, v: varlen_attention(q * 1.0, k, v, cu, cu, m, m), q, k, v,
            use_reentrant=reentrant,
        )  # fmt: skip
        out.sum().backward()
    assert "failed" not in caplog.text and "could not be checked" not in caplog.text
    grads = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    varlen_attention(q, k, v, cu, cu, m, m).sum().backward()
    for g, t in zip(grads, (q, k, v)):
        torch.testing.assert_close(g, t.grad)


def test_only_rank_zero_logs_the_decision(monkeypatch, caplog):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv(faults.ENV, "varlen_attention.cpp=raise")
    with caplog.at_level(logging.INFO, logger="pyfast_tune.guard"):
        guard.decide("varlen_attention", CPU, ATTN)
    assert "rank 1: guard" in caplog.text and "'cpp' rejected" in caplog.text  # each rank warns
    assert "-> sdpa" not in caplog.text  # the decision line is rank 0's alone


# --- LoRA -----------------------------------------------------------------------------------


def _peft_model(r=4):
    peft = pytest.importorskip("peft", reason="the LoRA guard compares against peft")
    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(64, 48, bias=False), torch.nn.Linear(48, 32))
    model = peft.get_peft_model(
        base, peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=["0", "1"])
    )
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)
    return model


@pytest.mark.parametrize("kind", ["wrong", "raise"])
def test_guard_rejects_a_faulty_lora_backend(monkeypatch, caplog, kind):
    from pyfast_tune.kernels.lora import guard_shapes, patch_peft_lora, unpatch_peft_lora

    model = _peft_model()
    x = torch.randn(7, 64, generator=torch.Generator().manual_seed(1))
    expected = model(x)
    assert patch_peft_lora(model) == 2
    assert [s for _, s in guard_shapes(model)] == [LORA]
    monkeypatch.setenv(faults.ENV, f"lora_linear.torch={kind}")
    with caplog.at_level(logging.WARNING, logger="pyfast_tune.guard"):
        got = model(x)
    assert guard.decide("lora_linear", CPU, LORA).chosen == "peft"
    assert "backend 'torch' rejected" in caplog.text
    torch.testing.assert_close(got, expected, rtol=0, atol=0)  # peft's own forward ran
    unpatch_peft_lora(model)


def test_lora_guard_picks_a_correct_fused_or_peft_forward():
    from pyfast_tune.kernels.lora import patch_peft_lora

    model = _peft_model()
    x = torch.randn(7, 64, generator=torch.Generator().manual_seed(1))
    expected = model(x)
    patch_peft_lora(model)
    torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-6)
    shape = lora_shape(torch.float32, model.base_model.model[0].lora_A["default"].weight, False)
    decision = guard.decide("lora_linear", CPU, shape)
    assert {c.backend for c in decision.checks if c.ok} == {"torch", "peft"}


# --- training under a fault -----------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, tiny_tokenizer):
    """Packed generated chats, a tiny Llama with LoRA, a 3-step one-process config."""
    from pyfast_tune.data import pack
    from pyfast_tune.demo import synth_conversations, write_jsonl
    from pyfast_tune.trainer.tiny import make_tiny_llama

    d = tmp_path_factory.mktemp("guard_train")
    data = write_jsonl(synth_conversations(60, seed=3), d / "chat.jsonl")
    pack([data], d / "packed", tokenizer=tiny_tokenizer, max_length=256, template="default")
    model = make_tiny_llama(d / "tiny", tiny_tokenizer, seed=0, init_std=0.3)
    config = d / "run.yaml"
    config.write_text(
        f"model: {model}\ndata: {d / 'packed'}\nmax_length: 256\nmethod: lora\n"
        "lora: {r: 4, alpha: 8, dropout: 0.0}\ndeepspeed: zero2\nmax_steps: 3\nlr: 1.0e-2\n"
        "micro_batch_size: 1\nglobal_batch_size: 2\ngradient_checkpointing: false\n"
        "save_hf: false\ntensorboard: false\nprogress_bar: false\n"
    )
    return d, config


def _train(tiny_run, name, attention, fault=None):
    d, config = tiny_run
    env = dict(os.environ, PYTHONPATH=str(ROOT), PYFAST_TUNE_CACHE=str(d / "cache"))
    env.pop(faults.ENV, None)
    if fault:
        env[faults.ENV] = fault
    cmd = [sys.executable, str(ROOT / "pyfast_tune" / "train.py"), "--config", str(config),
           "--output_dir", str(d / name), "--attention", attention]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    from pyfast_tune.trainer.metrics import read_metrics

    return [m["loss"] for m in read_metrics(d / name / "metrics.jsonl")], proc.stderr


@pytest.fixture(scope="module")
def ref_losses(tiny_run):
    losses, _ = _train(tiny_run, "ref", "ref")  # also caches the LoRA decision on disk
    assert len(losses) == 3
    return losses


@pytest.mark.parametrize(
    # slow: a whole training run per kind; the default run trains under "raise", and the
    # guard's handling of "wrong" is tested without training above
    "kind",
    [pytest.param("wrong", marks=pytest.mark.slow), "raise"],
)
def test_training_under_a_fault_matches_the_reference_path(tiny_run, ref_losses, kind):
    losses, log = _train(tiny_run, f"op_{kind}", "op", f"varlen_attention.cpp={kind}")
    # The guard fell back to SDPA, the code `ref` runs. Not bit-equal: CPU BLAS rounding
    # moves with buffer alignment, which the guard's own allocations shift (seen at 1e-7).
    torch.testing.assert_close(losses, ref_losses, rtol=1e-5, atol=0)
    assert re.search(r"varlen_attention .*backend 'cpp' rejected", log), log[-3000:]


# --- the fused linear cross-entropy joins through one registration --------------------------


def test_linear_cross_entropy_is_checked_and_never_races_the_logits(monkeypatch):
    shape = {"dtype": "float32", "softcap": False}
    decision = guard.decide("linear_cross_entropy", CPU, shape)
    by = {c.backend: c for c in decision.checks}
    assert by["torch"].ok and decision.chosen == "torch"  # ref holds the logits: not raced
    guard.forget()
    monkeypatch.setenv(faults.ENV, "linear_cross_entropy.torch=wrong")
    decision = guard.decide("linear_cross_entropy", CPU, shape)
    assert {c.backend: c.ok for c in decision.checks}["torch"] is False
    assert decision.chosen == "ref"  # checked and correct: the plain fallback


def test_linear_cross_entropy_auto_runs_the_guards_choice(monkeypatch, caplog):
    """``backend="auto"`` (what training uses) asks the guard: with our CPU kernel made wrong,
    the loss and gradients are still PyTorch's whole-logits ones, and a warning names it."""
    from pyfast_tune.kernels import linear_cross_entropy, linear_cross_entropy_ref

    g = torch.Generator().manual_seed(0)
    h = torch.randn(37, 16, generator=g, requires_grad=True)
    w = torch.randn(50, 16, generator=g, requires_grad=True)
    t = torch.randint(0, 50, (37,), generator=g)

    def loss_and_grads(fn, **kw):
        hh, ww = h.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
        loss = fn(hh, ww, t, **kw)
        loss.backward()
        return loss.detach(), hh.grad, ww.grad

    want = loss_and_grads(linear_cross_entropy_ref)
    monkeypatch.setenv(faults.ENV, "linear_cross_entropy.torch=wrong")
    with caplog.at_level("WARNING", logger="pyfast_tune.guard"):
        got = loss_and_grads(linear_cross_entropy, backend="auto")
    assert "backend 'torch' rejected" in caplog.text
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)
    chosen = guard.decided("linear_cross_entropy", CPU, {"dtype": "float32", "softcap": False})
    assert chosen == "ref"


def test_linear_cross_entropy_falls_back_when_its_choice_fails_at_run_time(monkeypatch, caplog):
    """Through the one guarded-call helper, as attention and LoRA: a backend that passed its
    check but fails on a later call (a launch error) is demoted with a warning, and the call
    still returns the right loss from the next correct backend."""
    from pyfast_tune.kernels import linear_cross_entropy, linear_cross_entropy_ref
    from pyfast_tune.kernels.linear_cross_entropy import op as lce_op

    g = torch.Generator().manual_seed(1)
    h, w = torch.randn(21, 16, generator=g), torch.randn(50, 16, generator=g)
    t = torch.randint(0, 50, (21,), generator=g)
    shape = {"dtype": "float32", "softcap": False}
    assert guard.choose("linear_cross_entropy", CPU, shape) == "torch"

    def launch_failure(*args):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setitem(lce_op._ROWS, "torch", launch_failure)
    with caplog.at_level(logging.WARNING, logger="pyfast_tune.guard"):
        loss = linear_cross_entropy(h, w, t)
    assert "backend 'torch' failed" in caplog.text
    assert guard.decided("linear_cross_entropy", CPU, shape) != "torch"
    torch.testing.assert_close(loss, linear_cross_entropy_ref(h, w, t))
