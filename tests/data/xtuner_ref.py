"""An independent, plain-Python statement of XTuner 0.2.0's data semantics (PyPI
``xtuner==0.2.0``, whose ``xtuner/dataset`` is XTuner's main branch): every map_fn of
``xtuner/dataset/map_fns/dataset_map_fns``, ``template_map_fn``, the ``PROMPT_TEMPLATE`` and
``SYSTEM_TEMPLATE`` strings of ``xtuner/utils/templates.py``, and ``encode_fn`` of
``xtuner/dataset/utils.py``. It is the oracle for the Rust engine; it uses Python's own
f-strings / str.format / str.strip / json and the ``tokenizers`` package, nothing from
pyfast_tune. Where XTuner would raise, these raise too (KeyError, TypeError,
NotImplementedError), so a test can tell "XTuner fails on this record" from a result.

tests/data/test_xtuner_real.py checks this module against the installed XTuner when it is
importable."""

from __future__ import annotations

import json
from pathlib import Path

IGNORE = -100
IMAGE_TOKEN = "<image>"
IMAGE_TOKEN_INDEX = -200

# SYSTEM_TEMPLATE entries the map_fns use.
SYSTEMS = {
    "coder": (
        "You are a professional programer. Please provide the corresponding code based on "
        "the description of Human.\n"
    ),
    "medical": "如果你是一名医生，请根据患者的描述回答医学问题。\n",
    "arxiv_gentile": (
        "If you are an expert in writing papers, please generate a good paper title for this "
        "paper based on other authors' descriptions of their abstracts.\n"
    ),
    "colorist": (
        "You are a professional color designer. Please provide the corresponding colors "
        "based on the description of Human.\n"
    ),
    "lawyer": "你现在是一名专业的中国律师，请根据用户的问题给出准确、有理有据的回复。\n",
    "sql": (
        "If you are an expert in SQL, please generate a good SQL Query for Question based on "
        "the CREATE TABLE statement.\n"
    ),
}

_IM_SYSTEM = "<|im_start|>system\n{system}<|im_end|>\n"
_IM_INSTRUCTION = "<|im_start|>user\n{input}<|im_end|>\n<|im_start|>assistant\n"
_VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. The assistant "
    "gives helpful, detailed, and polite answers to the user's questions. {system}\n "
)
_DEEPSEEK_CODER_SYSTEM = (
    "You are an AI programming assistant, utilizing the DeepSeek Coder model, developed by "
    "DeepSeekCompany, and you only answer questions related to computer science. For "
    "politically sensitive questions, security and privacy issues, and other non-computer "
    "science questions, you will refuse to answer. {system}\n"
)
_DEEPSEEK_EOS = "<｜end▁of▁sentence｜>"


def _t(system, instruction, sep=None, suffix=None, suffix_as_eos=None, stop=None):
    """One PROMPT_TEMPLATE entry; keys XTuner leaves out are left out here too."""
    d = {"INSTRUCTION": instruction}
    for key, value in (
        ("SYSTEM", system),
        ("SEP", sep),
        ("SUFFIX", suffix),
        ("SUFFIX_AS_EOS", suffix_as_eos),
        ("STOP_WORDS", stop),
    ):
        if value is not None:
            d[key] = value
    return d


# XTuner 0.2.0's PROMPT_TEMPLATE, every entry, in its order.
TEMPLATES = {
    "default": _t("<|System|>:{system}\n", "<|User|>:{input}\n<|Bot|>:", "\n"),
    "zephyr": _t("<|system|>\n{system}\n", "<|user|>\n{input}\n<|assistant|>\n", "\n"),
    "internlm_chat": _t(
        "<|System|>:{system}\n", "<|User|>:{input}<eoh>\n<|Bot|>:", "\n", "<eoa>", True, ["<eoa>"]
    ),
    "internlm2_chat": _t(_IM_SYSTEM, _IM_INSTRUCTION, "\n", "<|im_end|>", True, ["<|im_end|>"]),
    "moss_sft": _t("{system}\n", "<|Human|>: {input}<eoh>\n", "\n", stop=["<eoc>", "<eom>"]),
    "llama2_chat": _t(
        "[INST] <<SYS>>\n You are a helpful, respectful and honest assistant. Always answer as "
        "helpfully as possible, while being safe. Your answers should not include any harmful, "
        "unethical, racist, sexist, toxic, dangerous, or illegal content. Please ensure that "
        "your responses are socially unbiased and positive in nature.\n{system}\n<</SYS>>\n"
        " [/INST] ",
        "[INST] {input} [/INST]",
        "\n",
    ),
    "code_llama_chat": _t("{system}\n", "[INST] {input} [/INST]"),
    "chatglm2": _t("{system}\n", "[Round {round}]\n\n问：{input}\n\n答：", "\n\n"),
    "chatglm3": _t("<|system|>\n{system}", "<|user|>\n{input}<|assistant|>\n", "\n"),
    "qwen_chat": _t(
        _IM_SYSTEM, _IM_INSTRUCTION, "\n", "<|im_end|>", True, ["<|im_end|>", "<|endoftext|>"]
    ),
    "baichuan_chat": _t("{system}\n", "<reserved_102>{input}<reserved_103>", "\n"),
    "baichuan2_chat": _t("{system}\n", "<reserved_106>{input}<reserved_107>", "\n"),
    "wizardlm": _t(_VICUNA_SYSTEM, "USER: {input} ASSISTANT:", "\n"),
    "wizardcoder": _t(
        "Below is an instruction that describes a task. Write a response that appropriately "
        "completes the request.\n\n{system}\n ",
        "### Instruction:\n{input}\n\n### Response:",
        "\n\n",
    ),
    "vicuna": _t(_VICUNA_SYSTEM, "USER: {input} ASSISTANT:", "\n"),
    "deepseek_coder": _t(
        _DEEPSEEK_CODER_SYSTEM, "### Instruction:\n{input}\n### Response:\n", "\n"
    ),
    "deepseekcoder": _t(_DEEPSEEK_CODER_SYSTEM, "### Instruction:\n{input}\n### Response:\n", "\n"),
    "deepseek_moe": _t("[INST] {system} [/INST]\n", "[INST] {input} [/INST]", "\n"),
    "deepseek_v2": _t(
        "{system}\n\n",
        "User: {input}\n\nAssistant: ",
        suffix=_DEEPSEEK_EOS,
        suffix_as_eos=True,
        stop=[_DEEPSEEK_EOS],
    ),
    "mistral": _t("[INST] {system} [/INST]\n", "[INST] {input} [/INST]", "\n"),
    "mixtral": _t("[INST] {system} [/INST]\n", "[INST] {input} [/INST]", "\n"),
    "minicpm": _t(None, "<用户> {input} <AI>", "\n"),
    "minicpm3": _t(
        _IM_SYSTEM, _IM_INSTRUCTION, "\n", "<|im_end|>", True, ["<|im_end|>", "<|endoftext|>"]
    ),
    "gemma": _t(
        "<start_of_turn>system\n{system}<end_of_turn>\n",
        "<start_of_turn>user\n{input}<end_of_turn>\n<start_of_turn>model\n",
        "\n",
        "<end_of_turn>",
        False,
        ["<end_of_turn>"],
    ),
    "cohere_chat": _t(
        "<|START_OF_TURN_TOKEN|><|SYSTEM_TOKEN|>{system}<|END_OF_TURN_TOKEN|>",
        "<|START_OF_TURN_TOKEN|><|USER_TOKEN|>{input}<|END_OF_TURN_TOKEN|>"
        "<|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>",
        suffix="<|END_OF_TURN_TOKEN|>",
        suffix_as_eos=True,
        stop=["<|END_OF_TURN_TOKEN|>"],
    ),
    "llama3_chat": _t(
        "<|start_header_id|>system<|end_header_id|>\n\n{system}<|eot_id|>",
        "<|start_header_id|>user<|end_header_id|>\n\n{input}<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n",
        suffix="<|eot_id|>",
        suffix_as_eos=True,
        stop=["<|eot_id|>"],
    ),
    "phi3_chat": _t(
        "<|system|>\n{system}<|end|>\n",
        "<|user|>\n{input}<|end|>\n<|assistant|>\n",
        "\n",
        "<|end|>",
        True,
        ["<|end|>"],
    ),
}


# ---- map_fns: record -> {"conversation": [turn, ...]} --------------------------------------


def _single(input_, output, system=None):
    turn = {"input": input_, "output": output}
    if system is not None:
        turn["system"] = system
    return {"conversation": [turn]}


def alpaca_map_fn(e):
    # 0.2.0: no system prompt any more; "<nooutput>" means no sample.
    if e.get("output") == "<nooutput>":
        return {"conversation": []}
    return _single(f"{e['instruction']}\n{e['input']}", e["output"])


def alpaca_zh_map_fn(e):
    return _single(f"{e['instruction_zh']}\n{e['input_zh']}", e["output_zh"])


def oasst1_map_fn(e):
    texts = []
    for piece in e["text"].strip().split("###"):
        piece = piece.strip()
        for marker in ("Human:", "Assistant:"):
            if piece.startswith(marker):
                texts.append(piece[len(marker) :].strip())
                break
    if len(texts) % 2 == 1:  # a question nobody answered
        texts = texts[:-1]
    pairs = zip(texts[0::2], texts[1::2])
    return {"conversation": [{"input": q, "output": a} for q, a in pairs]}


def _human_gpt(e, add_human):
    """wizardlm_map_fn / llava_map_fn: skip leading gpt messages; human values accumulate;
    a gpt message closes a turn; a trailing human is lost; any other `from` raises."""
    msgs = list(e["conversations"])
    while msgs and msgs[0]["from"] == "gpt":
        msgs.pop(0)
    pending, conv = "", []
    for m in msgs:
        if m["from"] == "human":
            pending = add_human(pending, m["value"])
        elif m["from"] == "gpt":
            conv.append({"input": pending, "output": m["value"]})
            pending = ""
        else:
            raise NotImplementedError(f"from {m['from']!r}")
    return {"conversation": conv}


def wizardlm_map_fn(e):
    return _human_gpt(e, lambda pending, value: pending + value)


def _llava_human(pending, value):
    if IMAGE_TOKEN in value:
        rest = value.replace(IMAGE_TOKEN, "").strip()
        value = (IMAGE_TOKEN + "\n" + rest).strip()
    return pending + value


def llava_map_fn(e):
    return _human_gpt(e, _llava_human)


def openai_map_fn(e):
    msgs = list(e["messages"])
    while msgs and msgs[0]["role"] == "assistant":
        msgs.pop(0)
    system, pending, conv = "", "", []
    for m in msgs:
        role = m["role"]
        if role == "system":
            system = m["content"]
        elif role == "user":
            pending += m["content"]
        elif role == "assistant":
            with_loss = str(m.get("loss", "True")).lower() == "true"
            conv.append(
                {
                    "system": system,
                    "input": pending,
                    "output": m["content"],
                    "output_with_loss": with_loss,
                }
            )
            system, pending = "", ""
        else:
            raise NotImplementedError(f"role {role!r}")
    return {"conversation": conv}


def pretrain_map_fn(e):
    return {"conversation": [{"input": "", "output": e["text"].strip(), "need_eos_token": False}]}


def colors_map_fn(e):
    after_first_colon = ":".join(e["description"].split(":")[1:]).strip()
    return _single(after_first_colon, e["color"], SYSTEMS["colorist"])


MAP_FNS = {
    "alpaca": alpaca_map_fn,
    "alpaca_zh": alpaca_zh_map_fn,
    "arxiv": lambda e: _single(e["abstract"], e["title"], SYSTEMS["arxiv_gentile"]),
    "code_alpaca": lambda e: _single(e["prompt"], e["completion"], SYSTEMS["coder"]),
    "colors": colors_map_fn,
    "crime_kg_assitant": lambda e: _single(e["input"], e["output"], SYSTEMS["lawyer"]),
    "default": lambda e: _single(e["input"], e["output"]),
    "law_reference": lambda e: _single(e["question"], e["answer"], SYSTEMS["lawyer"]),
    "llava": llava_map_fn,
    "medical": lambda e: _single(
        "{instruction}\n{input}".format(**e), e["output"], SYSTEMS["medical"]
    ),
    "oasst1": oasst1_map_fn,
    "openai": openai_map_fn,
    "openorca": lambda e: _single(e["question"], e["response"], e["system_prompt"]),
    "pretrain": pretrain_map_fn,
    "sql": lambda e: _single("{context}\n{question}".format(**e), e["answer"], SYSTEMS["sql"]),
    "stack_exchange": lambda e: _single(e["question"], e["response"]),
    "tiny_codes": lambda e: _single(e["prompt"], e["response"], SYSTEMS["coder"]),
    "wizardlm": wizardlm_map_fn,
    # XTuner's own format: no map_fn, the turns as they are.
    "conversation": lambda e: {"conversation": [dict(t) for t in e["conversation"]]},
}


def template_map_fn(example, template):
    """Wrap each turn: SYSTEM (only for a non-empty system; a template without SYSTEM raises,
    as ``template.SYSTEM`` does on XTuner's ConfigDict), INSTRUCTION with the 1-based round,
    SUFFIX onto the output, need_eos_token = not SUFFIX_AS_EOS, sep = SEP."""
    conversation = example.get("conversation", [])
    for i, turn in enumerate(conversation):
        inp = turn.get("input", "")
        text = template["INSTRUCTION"].format(input="" if inp is None else inp, round=i + 1)
        system = turn.get("system", "")
        if system not in ("", None):
            if "SYSTEM" not in template:
                raise AttributeError("template has no SYSTEM")
            text = template["SYSTEM"].format(system=system) + text
        turn["input"] = text
        if template.get("SUFFIX"):
            turn["output"] = turn.get("output", "") + template["SUFFIX"]
        turn["need_eos_token"] = not template.get("SUFFIX_AS_EOS", False)
        turn["sep"] = template.get("SEP", "")
    return {"conversation": conversation}


class RefTokenizer:
    """tokenizer.json + tokenizer_config.json, with XTuner's BOS/EOS rules
    (``get_bos_eos_token_ids``: no BOS for Qwen-family tokenizers)."""

    def __init__(self, path):
        from tokenizers import Tokenizer

        path = Path(path)
        self.tok = Tokenizer.from_file(str(path / "tokenizer.json"))
        cfg = json.loads((path / "tokenizer_config.json").read_text())

        def tid(key):
            v = cfg.get(key)
            if isinstance(v, dict):
                v = v["content"]
            return None if v is None else self.tok.token_to_id(v)

        qwen = cfg.get("tokenizer_class") in (
            "QWenTokenizer",
            "QWen2Tokenizer",
            "Qwen2Tokenizer",
            "Qwen2TokenizerFast",
        )
        bos = None if qwen else tid("bos_token")
        eos = tid("eos_token")
        self.bos = [] if bos is None else [bos]
        self.eos = [] if eos is None else [eos]

    def encode(self, text):
        return self.tok.encode(text, add_special_tokens=False).ids


def encode_fn(example, tok: RefTokenizer, max_length, with_image_token=False):
    """Token ids and labels of one conversation: BOS before a turn when the previous one
    ended with EOS (or it is the first); input untrained; output trained when
    ``output_with_loss`` is truthy; EOS after it when ``need_eos_token`` is truthy, trained
    with it; SEP untrained; one ``<image>`` in an input becomes IMAGE_TOKEN_INDEX; then
    truncation."""
    ids, labels = [], []
    needs_bos = True
    for turn in example["conversation"]:
        inp = turn["input"]
        if with_image_token and IMAGE_TOKEN in inp:
            halves = inp.split(IMAGE_TOKEN)
            assert len(halves) == 2, "more than one <image> in one input"
            enc = tok.encode(halves[0]) + [IMAGE_TOKEN_INDEX] + tok.encode(halves[1])
        else:
            enc = tok.encode(inp)
        if needs_bos:
            ids += tok.bos
            labels += [IGNORE] * len(tok.bos)
        ids += enc
        labels += [IGNORE] * len(enc)
        trained = turn.get("output_with_loss", True)
        out = tok.encode(turn["output"])
        ids += out
        labels += out if trained else [IGNORE] * len(out)
        if turn.get("need_eos_token", True):
            needs_bos = True
            ids += tok.eos
            labels += tok.eos if trained else [IGNORE] * len(tok.eos)
        else:
            needs_bos = False
        sep = turn.get("sep", "")
        if sep != "":
            s = tok.encode(sep)
            ids += s
            labels += [IGNORE] * len(s)
    return {"input_ids": ids[:max_length], "labels": labels[:max_length]}


def reference_samples(records, fmt, template_name, tok, max_length, templates=None):
    """Kept samples in input order: (record index, input_ids, labels). Drops what XTuner
    drops: empty conversations and samples without a trained token. Pretraining text is
    never templated (XTuner's pretrain configs set template_map_fn=None). ``templates``
    adds template entries beyond XTuner's."""
    table = {**TEMPLATES, **(templates or {})}
    out = []
    for idx, rec in enumerate(records):
        conv = MAP_FNS[fmt](json.loads(json.dumps(rec)))
        if not conv["conversation"]:
            continue
        if template_name != "none" and fmt != "pretrain":
            conv = template_map_fn(conv, table[template_name])
        enc = encode_fn(conv, tok, max_length, with_image_token=fmt == "llava")
        if any(label >= 0 for label in enc["labels"]):
            out.append((idx, enc["input_ids"], enc["labels"]))
    return out
