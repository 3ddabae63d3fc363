"""Chat's XTuner-style options: --top-k, --repetition-penalty, --stop-words, --bits."""

import pytest
import torch

from pyfast_tune.chat import ChatSession, generate


@pytest.fixture(scope="module")
def tiny_model(tiny_tokenizer, tmp_path_factory):
    from pyfast_tune.trainer.tiny import make_tiny_llama

    return make_tiny_llama(tmp_path_factory.mktemp("m") / "tiny", tiny_tokenizer, init_std=0.3)


@pytest.fixture(scope="module")
def model(tiny_model):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()


def test_repetition_penalty_equals_transformers_generate(model):
    prompt = [5, 17, 33, 101, 7, 5, 5]
    kw = {"stop_ids": set(), "max_new_tokens": 16}
    plain = generate(model, prompt, lambda x: "", **kw)[1]
    ours = generate(model, prompt, lambda x: "", repetition_penalty=1.8, **kw)[1]
    ref = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                         max_new_tokens=16, min_new_tokens=16, do_sample=False, eos_token_id=None,
                         pad_token_id=0, repetition_penalty=1.8)  # fmt: skip
    assert ours == ref[0, len(prompt) :].tolist()
    assert ours != plain  # the penalty changed the greedy answer of this model
    # Penalised tokens repeat less than without it.
    assert len(set(ours)) > len(set(plain))


def test_top_k_one_is_greedy_and_top_k_limits_the_choice(model):
    prompt = [3, 4, 5]
    kw = {"stop_ids": set(), "max_new_tokens": 12}
    greedy = generate(model, prompt, lambda x: "", **kw)[1]
    hot = generate(model, prompt, lambda x: "", temperature=5.0, seed=3, **kw)[1]
    assert hot != greedy
    assert (
        generate(model, prompt, lambda x: "", temperature=5.0, seed=3, top_k=1, **kw)[1] == greedy
    )
    # With k = 3 every sampled token is among the 3 likeliest given its prefix.
    ids = generate(model, prompt, lambda x: "", temperature=5.0, seed=3, top_k=3, **kw)[1]
    with torch.no_grad():
        logits = model(torch.tensor([prompt + ids])).logits[0]
    for i, tok in enumerate(ids):
        top3 = torch.topk(logits[len(prompt) - 1 + i], 3).indices.tolist()
        assert tok in top3


def test_stop_words_are_added_to_the_templates(tiny_model):
    s = ChatSession(tiny_model, template="internlm2_chat")
    free = s.ask("What does the cat do?", max_new_tokens=12)
    assert len(free) > 3
    word = free[1:3]  # a piece of the answer the model gives: it must cut there
    s2 = ChatSession(tiny_model, template="internlm2_chat", stop_words=[word])
    assert "<|im_end|>" in s2.stop_words and word in s2.stop_words
    cut = s2.ask("What does the cat do?", max_new_tokens=12)
    assert cut == free[: free.find(word)]


def test_bits_without_cuda_or_bitsandbytes_is_a_clear_error(tiny_model, monkeypatch):
    import importlib.util

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the no-CUDA error cannot happen here")
    with pytest.raises(ValueError, match="--bits must be 4 or 8"):
        ChatSession(tiny_model, template="internlm2_chat", bits=3)
    if importlib.util.find_spec("bitsandbytes") is not None:
        with pytest.raises(RuntimeError, match="--bits 4 needs a CUDA GPU"):
            ChatSession(tiny_model, template="internlm2_chat", bits=4)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "bitsandbytes" else real(name, *a))  # fmt: skip
    with pytest.raises(ImportError, match="--bits 8 needs bitsandbytes: pip install"):
        ChatSession(tiny_model, template="internlm2_chat", bits=8)


def test_cli_flags_reach_generation(tiny_model, monkeypatch, capsys):
    from pyfast_tune import chat
    from pyfast_tune.cli import main as cli

    seen = {}
    real = chat.generate

    def spy(*a, **kw):
        seen.update(kw)
        return real(*a, **kw)

    monkeypatch.setattr(chat, "generate", spy)
    assert cli(["chat", str(tiny_model), "--template", "internlm2_chat", "--prompt", "Hi",
                "--max-new-tokens", "4", "--top-k", "5", "--repetition-penalty", "1.3",
                "--temperature", "0.7", "--stop-words", "zz", "yy"]) == 0  # fmt: skip
    assert seen["top_k"] == 5 and seen["repetition_penalty"] == 1.3
    assert seen["temperature"] == 0.7 and {"zz", "yy", "<|im_end|>"} <= set(seen["stop_words"])
