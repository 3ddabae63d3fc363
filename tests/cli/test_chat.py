"""`pyfast-tune chat`: prompts are token-for-token what `pack` trains on, greedy decoding equals
transformers' `generate`, stop words cut the answer and never leak into the stream."""

import json

import pytest
import torch

from pyfast_tune.chat import ChatSession, HfFormat, TemplateFormat, generate, py_format
from pyfast_tune.data import PackedDataset, pack, templates

TEMPLATES = {t["name"]: t for t in templates()}
CONVERSATIONS = [
    [("Hi! What is {round} here?", "Just text: {round} {{x}}."), ("And now?", "Now it is 2.")],
    [("One question only", "One answer only, with a newline\nhere.")],
    [("First", "A"), ("Second", "B"), ("Third", "C")],
]
SYSTEM = "You are terse."


def _records(system: str | None):
    for turns in CONVERSATIONS:
        messages = [{"role": "system", "content": system}] if system else []
        for q, a in turns:
            messages += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        yield {"messages": messages}


def test_py_format_is_single_pass_with_escapes():
    assert py_format("U: {input} r{round}", input="a {round} b", round="2") == "U: a {round} b r2"
    assert py_format("{{x}} {input} {other}", input="i") == "{x} i {other}"


@pytest.mark.parametrize("template", ["default", "internlm2_chat", "qwen_chat", "llama3_chat",
                                      "zephyr", "chatglm2"])  # fmt: skip
@pytest.mark.parametrize("system", [None, SYSTEM])
def test_prompt_encoding_equals_the_packed_training_sample(
    tmp_path, template, system, generated_tokenizer
):
    """Every conversation, encoded by chat's formatter, is the packed sample token for token
    (ids and trained mask); the prompt for the last turn is its prefix up to the answer."""
    tok = generated_tokenizer
    src = tmp_path / "c.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in _records(system)))
    pack([src], tmp_path / "p", tokenizer=tok, max_length=4096, format="openai", template=template)
    ds = PackedDataset(tmp_path / "p")
    fmt = TemplateFormat(tok, TEMPLATES[template], system)
    assert fmt.bos == ds.meta["tokenizer"]["bos"] and fmt.eos == ds.meta["tokenizer"]["eos"]
    for j in range(ds.num_samples):
        s = ds.sample(j)
        turns = CONVERSATIONS[s["source"][1]]
        ids, trained = fmt.encode_conversation(turns)
        assert ids == s["input_ids"].tolist()
        assert trained == (s["labels"] != -100).tolist()
        prompt = fmt.prompt_ids(turns[:-1], turns[-1][0])
        assert ids[: len(prompt)] == prompt
        assert trained[len(prompt)] and not trained[len(prompt) - 1]  # the answer starts there


def test_hf_prompt_is_the_prefix_of_the_hf_training_sample(tmp_path, generated_tokenizer):
    """--template hf: the generation prompt of the last turn is how `pack --template hf`
    encodes the conversation up to that answer (the engine's own Jinja renderer)."""
    tok = generated_tokenizer
    src = tmp_path / "c.jsonl"
    src.write_text(json.dumps(next(_records(SYSTEM))) + "\n")
    pack([src], tmp_path / "p", tokenizer=tok, max_length=4096, format="openai", template="hf")
    sample = PackedDataset(tmp_path / "p").sample(0)
    ids, trained = sample["input_ids"].tolist(), (sample["labels"] != -100).tolist()
    history, q = CONVERSATIONS[0][:-1], CONVERSATIONS[0][-1][0]
    prompt = HfFormat(tok, SYSTEM).prompt_ids(history, q)
    assert ids[: len(prompt)] == prompt
    assert trained[len(prompt)] and not trained[len(prompt) - 1]  # the answer starts there


class ScriptedLM(torch.nn.Module):
    """Emits a fixed token sequence (as one-hot logits), one token per call with a cache."""

    def __init__(self, script, vocab):
        super().__init__()
        self.script, self.vocab = script, vocab
        self.w = torch.nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, past_key_values=None, use_cache=True):
        step = 0 if past_key_values is None else past_key_values
        logits = torch.full((1, input_ids.shape[1], self.vocab), -1e9)
        logits[0, -1, self.script[min(step, len(self.script) - 1)]] = 0.0
        return type("Out", (), {"logits": logits, "past_key_values": step + 1})()


def test_stop_word_cuts_the_answer_and_never_reaches_the_stream(tiny_tokenizer):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tiny_tokenizer / "tokenizer.json"))
    answer = "The cat likes red apples."
    stop = "STOP!"  # several tokens in this vocabulary: only the text can match it
    script = tok.encode(answer + " " + stop + " more text", add_special_tokens=False).ids
    assert len(tok.encode(stop, add_special_tokens=False).ids) > 1
    model = ScriptedLM(script, tok.get_vocab_size())
    pieces = []
    text, ids = generate(model, [1, 2], lambda x: tok.decode(x, skip_special_tokens=False),
                         stop_ids=set(), stop_words=[stop], max_new_tokens=100,
                         on_text=pieces.append)  # fmt: skip
    assert text == answer + " "
    assert "".join(pieces) == text and len(pieces) > 3  # streamed in several pieces
    # An EOS id stops before it, and max_new_tokens bounds the answer.
    eos = script[3]
    text, ids = generate(model, [1], lambda x: tok.decode(x), stop_ids={eos}, max_new_tokens=100)
    assert ids == script[: script.index(eos)] and eos not in ids
    _, ids = generate(model, [1], lambda x: tok.decode(x), stop_ids=set(), max_new_tokens=2)
    assert ids == script[:2]


@pytest.fixture(scope="module")
def tiny_model(tiny_tokenizer, tmp_path_factory):
    from pyfast_tune.trainer.tiny import make_tiny_llama

    return make_tiny_llama(tmp_path_factory.mktemp("m") / "tiny", tiny_tokenizer, init_std=0.3)


def test_greedy_equals_transformers_generate(tiny_model):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    prompt = [5, 17, 33, 101, 7]
    _, ours = generate(model, prompt, lambda x: "", stop_ids=set(), max_new_tokens=16)
    ref = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                         max_new_tokens=16, min_new_tokens=16, do_sample=False, eos_token_id=None,
                         pad_token_id=0, use_cache=True)  # fmt: skip
    assert ours == ref[0, len(prompt) :].tolist()
    assert len(set(ours)) > 1  # a real sequence, not one repeated token


def test_sampling_is_seeded_and_top_p_zero_mass_is_greedy(tiny_model):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    kw = {"stop_ids": set(), "max_new_tokens": 12}
    greedy = generate(model, [3, 4, 5], lambda x: "", **kw)[1]
    a = generate(model, [3, 4, 5], lambda x: "", temperature=1.5, seed=1, **kw)[1]
    b = generate(model, [3, 4, 5], lambda x: "", temperature=1.5, seed=1, **kw)[1]
    c = generate(model, [3, 4, 5], lambda x: "", temperature=1.5, seed=2, **kw)[1]
    assert a == b and a != c and a != greedy
    # top_p so small that only the most likely token survives: sampling becomes greedy.
    assert generate(model, [3, 4, 5], lambda x: "", temperature=1.5, top_p=1e-9, **kw)[1] == greedy


def test_session_keeps_history_in_the_training_format(tiny_model):
    s = ChatSession(tiny_model, template="internlm2_chat", system="Be brief.")
    first = s.ask("What does the cat do?", max_new_tokens=8)
    s.ask("And the robot?", max_new_tokens=8)
    assert s.history[0] == ("What does the cat do?", first)
    expected = s.format.encode_conversation(s.history[:1] + [("Next?", None)])[0]
    assert s.format.prompt_ids(s.history[:1], "Next?") == expected
    text = s.decode(expected)
    assert text.startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat does")
    assert text.endswith("<|im_end|>\n<|im_start|>user\nNext?<|im_end|>\n<|im_start|>assistant\n")
    assert s.tok.token_to_id("<|im_end|>") in s.stop_ids
    with pytest.raises(ValueError, match="unknown template"):
        ChatSession(tiny_model, template="no_such_template")


def test_template_none_prompt_is_the_pretraining_encoding(tmp_path, generated_tokenizer):
    """--template none continues raw text: BOS + text, as `pack --format pretrain` trains it."""
    from pyfast_tune.chat import RawFormat

    tok = generated_tokenizer
    text = "def fibonacci(n):\n    return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)"
    (tmp_path / "t.jsonl").write_text(json.dumps({"text": text}) + "\n")
    pack([tmp_path / "t.jsonl"], tmp_path / "p", tokenizer=tok, max_length=512,
         format="pretrain", template="none")  # fmt: skip
    sample = PackedDataset(tmp_path / "p").sample(0)["input_ids"].tolist()
    assert RawFormat(tok).prompt_ids([], text) == sample
    raw = RawFormat(tok)  # the history is the text so far
    joined = raw.prompt_ids([], "def fibonacci(n):\n    return")
    assert raw.prompt_ids([("def fib", "onacci(n):")], "\n    return") == joined


def test_interactive_loop_keeps_history_until_reset(tiny_model, monkeypatch, capsys):
    """The loop answers each line, /reset forgets the history, Ctrl-D (EOF) ends it."""
    import pyfast_tune.chat as chat_mod
    from pyfast_tune.cli import main as cli

    lines = iter(["What does the cat do?", "", "And the robot?", "/reset", "Hi"])
    prompts = []
    real = chat_mod.TemplateFormat.prompt_ids

    def spy(self, history, query):
        prompts.append((len(history), query))
        return real(self, history, query)

    def fake_input(prompt=""):
        try:
            return next(lines)
        except StopIteration:
            raise EOFError from None

    monkeypatch.setattr(chat_mod.TemplateFormat, "prompt_ids", spy)
    monkeypatch.setattr("builtins.input", fake_input)
    args = ["chat", str(tiny_model), "--template", "default", "--max-new-tokens", "4"]
    assert cli(args) == 0
    assert prompts == [(0, "What does the cat do?"), (1, "And the robot?"), (0, "Hi")]
    assert "template default" in capsys.readouterr().err
