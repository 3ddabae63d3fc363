"""An independent, plain-Python statement of XTuner's data semantics (map_fns,
template_map_fn, encode_fn), used as the oracle for the Rust engine. Written from XTuner's
documented behaviour; uses Python's own str.format / str.strip / json, and the `tokenizers`
package — nothing from pyfast_tune."""

from __future__ import annotations

import json
from pathlib import Path

IGNORE = -100
ALPACA_SYSTEM = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n"
)

TEMPLATES = {
    "default": dict(
        SYSTEM="<|System|>:{system}\n", INSTRUCTION="<|User|>:{input}\n<|Bot|>:", SEP="\n"
    ),
    "internlm2_chat": dict(
        SYSTEM="<|im_start|>system\n{system}<|im_end|>\n",
        INSTRUCTION="<|im_start|>user\n{input}<|im_end|>\n<|im_start|>assistant\n",
        SUFFIX="<|im_end|>",
        SUFFIX_AS_EOS=True,
        SEP="\n",
    ),
    "qwen_chat": dict(
        SYSTEM="<|im_start|>system\n{system}<|im_end|>\n",
        INSTRUCTION="<|im_start|>user\n{input}<|im_end|>\n<|im_start|>assistant\n",
        SUFFIX="<|im_end|>",
        SUFFIX_AS_EOS=True,
        SEP="\n",
    ),
    "llama3_chat": dict(
        SYSTEM="<|start_header_id|>system<|end_header_id|>\n\n{system}<|eot_id|>",
        INSTRUCTION=(
            "<|start_header_id|>user<|end_header_id|>\n\n{input}<|eot_id|>"
            "<|start_header_id|>assistant<|end_header_id|>\n\n"
        ),
        SUFFIX="<|eot_id|>",
        SUFFIX_AS_EOS=True,
    ),
}


def openai_map_fn(example):
    messages = example["messages"]
    system, input_, conversation = "", "", []
    while messages and messages[0]["role"] == "assistant":
        messages = messages[1:]
    for msg in messages:
        if msg["role"] == "system":
            system = msg["content"]
        elif msg["role"] == "user":
            input_ += msg["content"]
        elif msg["role"] == "assistant":
            loss = msg.get("loss", True)
            if isinstance(loss, str):
                loss = loss.lower() == "true"
            conversation.append(
                {
                    "system": system,
                    "input": input_,
                    "output": msg["content"],
                    "output_with_loss": loss,
                }
            )
            system, input_ = "", ""
        else:
            raise NotImplementedError(msg["role"])
    return {"conversation": conversation}


def alpaca_map_fn(example):
    if example.get("output") == "<nooutput>":
        return {"conversation": []}
    return {
        "conversation": [
            {
                "system": ALPACA_SYSTEM,
                "input": f"{example['instruction']}\n{example['input']}",
                "output": example["output"],
            }
        ]
    }


def pretrain_map_fn(example):
    return {
        "conversation": [{"input": "", "output": example["text"].strip(), "need_eos_token": False}]
    }


MAP_FNS = {
    "openai": openai_map_fn,
    "alpaca": alpaca_map_fn,
    "pretrain": pretrain_map_fn,
    "conversation": lambda e: {"conversation": [dict(t) for t in e["conversation"]]},
}


def template_map_fn(example, template):
    conversation = example.get("conversation", [])
    for i, turn in enumerate(conversation):
        inp = turn.get("input", "")
        if inp is None:
            inp = ""
        input_text = template["INSTRUCTION"].format(input=inp, round=i + 1)
        system = turn.get("system", "")
        if system != "" and system is not None:
            input_text = template["SYSTEM"].format(system=system) + input_text
        turn["input"] = input_text
        if template.get("SUFFIX", None):
            turn["output"] = turn.get("output", "") + template["SUFFIX"]
        turn["need_eos_token"] = not template.get("SUFFIX_AS_EOS", False)
        turn["sep"] = template.get("SEP", "")
    return {"conversation": conversation}


class RefTokenizer:
    """tokenizer.json + tokenizer_config.json, with XTuner's BOS/EOS rules."""

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


def encode_fn(example, tok: RefTokenizer, max_length):
    input_ids, labels = [], []
    next_needs_bos = True
    for turn in example["conversation"]:
        enc = tok.encode(turn["input"])
        if next_needs_bos:
            input_ids += tok.bos
            labels += [IGNORE] * len(tok.bos)
        input_ids += enc
        labels += [IGNORE] * len(enc)
        with_loss = turn.get("output_with_loss", True)
        out = tok.encode(turn["output"])
        input_ids += out
        labels += out if with_loss else [IGNORE] * len(out)
        if turn.get("need_eos_token", True):
            next_needs_bos = True
            input_ids += tok.eos
            labels += tok.eos if with_loss else [IGNORE] * len(tok.eos)
        else:
            next_needs_bos = False
        sep = turn.get("sep", "")
        if sep != "":
            s = tok.encode(sep)
            input_ids += s
            labels += [IGNORE] * len(s)
    if len(input_ids) > max_length:
        input_ids, labels = input_ids[:max_length], labels[:max_length]
    return {"input_ids": input_ids, "labels": labels}


def reference_samples(records, fmt, template_name, tok, max_length):
    """Kept samples in input order: (record index, input_ids, labels). Drops what XTuner
    drops: empty conversations and samples without a trained token."""
    out = []
    for idx, rec in enumerate(records):
        conv = MAP_FNS[fmt](json.loads(json.dumps(rec)))
        if not conv["conversation"]:
            continue
        if template_name != "none" and fmt != "pretrain":
            conv = template_map_fn(conv, TEMPLATES[template_name])
        enc = encode_fn(conv, tok, max_length)
        if any(label >= 0 for label in enc["labels"]):
            out.append((idx, enc["input_ids"], enc["labels"]))
    return out
