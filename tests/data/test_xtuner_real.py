"""Cross-check against XTuner's own code: its map_fns, template_map_fn, PROMPT_TEMPLATE and
encode_fn (from ``xtuner==0.2.0``) run on generated and hand-made records, and our packed
samples must equal them token for token; the Python oracle (tests/data/xtuner_ref.py) must agree
with them too. XTuner is not a dependency: the test skips unless its package can be found,
on sys.path or in the site-packages named by ``XTUNER_SITE``, e.g.::

    python3 -m venv /tmp/xt && /tmp/xt/bin/pip install --no-deps xtuner==0.2.0 mmengine \\
        addict yapf termcolor platformdirs
    XTUNER_SITE=/tmp/xt/lib/python3.11/site-packages .venv/bin/python -m pytest \\
        tests/data/test_xtuner_real.py

Only the data modules are loaded, file by file, so XTuner's heavy package __init__ files
(model code, a pinned transformers) are never run; mmengine is needed for ConfigDict."""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import random
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import xtuner_ref
from test_formats import RECORDS, write_jsonl

from pyfast_tune.data import PackedDataset, pack

MAP_FN_NAMES = {  # our format -> XTuner's map_fn module
    "alpaca": "alpaca_map_fn",
    "alpaca_zh": "alpaca_zh_map_fn",
    "arxiv": "arxiv_map_fn",
    "code_alpaca": "code_alpaca_map_fn",
    "colors": "colors_map_fn",
    "crime_kg_assitant": "crime_kg_assitant_map_fn",
    "default": "default_map_fn",
    "law_reference": "law_reference_map_fn",
    "llava": "llava_map_fn",
    "medical": "medical_map_fn",
    "oasst1": "oasst1_map_fn",
    "openai": "openai_map_fn",
    "openorca": "openorca_map_fn",
    "pretrain": "pretrain_map_fn",
    "sql": "sql_map_fn",
    "stack_exchange": "stack_exchange_map_fn",
    "tiny_codes": "tiny_codes_map_fn",
    "wizardlm": "wizardlm_map_fn",
}


def _package(name: str, path: Path) -> None:
    mod = types.ModuleType(name)
    mod.__path__ = [str(path)]
    sys.modules[name] = mod


def _xtuner_missing() -> str | None:
    """Why XTuner's own code cannot run here, or None (checked without importing it)."""
    site = os.environ.get("XTUNER_SITE")
    if site and site not in sys.path:
        sys.path.append(site)  # after our venv: only what it lacks comes from there
    spec = importlib.util.find_spec("xtuner")
    if spec is None or not spec.submodule_search_locations:
        return "xtuner is not importable (install xtuner==0.2.0 --no-deps and set XTUNER_SITE)"
    if importlib.util.find_spec("mmengine") is None:
        return "xtuner's templates need mmengine (pip install --no-deps mmengine addict yapf)"
    return None


if _xtuner_missing():  # one skip for the module, not one per test
    pytest.skip(_xtuner_missing(), allow_module_level=True)


def _load_xtuner():
    site = os.environ.get("XTUNER_SITE")
    if site and site not in sys.path:
        sys.path.append(site)  # after our venv: only what it lacks comes from there
    spec = importlib.util.find_spec("xtuner")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip(
            "xtuner is not importable (install xtuner==0.2.0 --no-deps and set XTUNER_SITE)"
        )
    if importlib.util.find_spec("mmengine") is None:
        pytest.skip("xtuner's templates need mmengine (pip install --no-deps mmengine addict yapf)")
    root = Path(spec.submodule_search_locations[0])
    if "xtuner" not in sys.modules:
        # Bare packages, so no package __init__ runs; then the data modules themselves.
        _package("xtuner", root)
        _package("xtuner.utils", root / "utils")
        for sub in ("dataset", "dataset/map_fns", "dataset/map_fns/dataset_map_fns"):
            _package("xtuner." + sub.replace("/", "."), root / sub)
        utils = sys.modules["xtuner.utils"]
        for leaf in ("constants", "templates"):
            m = importlib.import_module(f"xtuner.utils.{leaf}")
            for k, v in vars(m).items():
                if not k.startswith("_"):
                    setattr(utils, k, v)
    x = types.SimpleNamespace()
    x.version = (root / "version.py").read_text()
    dmf = "xtuner.dataset.map_fns.dataset_map_fns."
    x.map_fns = {
        ours: getattr(importlib.import_module(dmf + mod), mod) for ours, mod in MAP_FN_NAMES.items()
    }
    x.template_map_fn = importlib.import_module(
        "xtuner.dataset.map_fns.template_map_fn"
    ).template_map_fn
    x.encode_fn = importlib.import_module("xtuner.dataset.utils").encode_fn
    x.PROMPT_TEMPLATE = sys.modules["xtuner.utils"].PROMPT_TEMPLATE
    x.SYSTEM_TEMPLATE = sys.modules["xtuner.utils"].SYSTEM_TEMPLATE
    return x


@pytest.fixture(scope="module")
def xt():
    return _load_xtuner()


def xtuner_samples(x, records, fmt, template, hf_tok, max_length):
    """XTuner's own pipeline (process_hf_dataset minus HF datasets): map_fn, template_map_fn,
    drop empty conversations, encode_fn, drop samples without a trained label. Returns the
    kept (index, ids, labels) and the indices on which XTuner raised."""
    kept, raised = [], []
    for idx, rec in enumerate(records):
        try:
            conv = json.loads(json.dumps(rec))
            if fmt != "conversation":  # XTuner's own format has no map_fn
                conv = x.map_fns[fmt](conv)
            if template != "none" and fmt != "pretrain":
                conv = x.template_map_fn(conv, template=x.PROMPT_TEMPLATE[template])
            if not conv["conversation"]:
                continue
            enc = x.encode_fn(conv, hf_tok, max_length, with_image_token=fmt == "llava")
        except Exception:  # noqa: BLE001 - any failure of XTuner's is "this record fails"
            raised.append(idx)
            continue
        if any(label >= 0 for label in enc["labels"]):
            kept.append((idx, enc["input_ids"], enc["labels"]))
    return kept, raised


def oracle_samples(records, fmt, template, tok, max_length):
    kept, raised = [], []
    for idx, rec in enumerate(records):
        try:
            got = xtuner_ref.reference_samples([rec], fmt, template, tok, max_length)
        except Exception:  # noqa: BLE001
            raised.append(idx)
            continue
        kept += [(idx, ids, labels) for _, ids, labels in got]
    return kept, raised


def generated(fmt: str, rng: random.Random, n: int = 40) -> list[dict]:
    """Records that reach the branches where our code once departed from XTuner."""
    words = ["alpha", "beta", "gamma", " delta", "eps\n", "", "{round}", "<|im_end|>"]

    def text():
        return "".join(rng.choice(words) for _ in range(rng.randint(0, 4)))

    out = []
    for _ in range(n):
        if fmt == "wizardlm":
            froms = rng.choices(
                ["human", "gpt", "system"], weights=[10, 10, 1], k=rng.randint(0, 7)
            )
            out.append({"conversations": [{"from": f, "value": text()} for f in froms]})
        elif fmt == "openai":
            roles = rng.choices(
                ["user", "assistant", "system"], weights=[6, 6, 1], k=rng.randint(1, 7)
            )
            msgs = []
            for r in roles:
                m = {"role": r, "content": text()}
                loss = rng.choice(["absent", True, False, "false", "TRUE", None, 0, 1])
                if r == "assistant" and loss != "absent":
                    m["loss"] = loss
                msgs.append(m)
            out.append({"messages": msgs})
        elif fmt == "alpaca":
            rec = {"instruction": text(), "output": rng.choice([text(), "<nooutput>", "ok"])}
            rec["input"] = rng.choice(["", None, text(), 3])
            out.append(rec)
        elif fmt == "conversation":
            turns = []
            for _ in range(rng.randint(1, 3)):
                t = {"input": rng.choice([text(), None]), "output": text() + "x"}
                if rng.random() < 0.5:
                    t["system"] = rng.choice(["", None, text() + "s"])
                if rng.random() < 0.5:
                    t["output_with_loss"] = rng.choice([True, False, "false", 0, 1, None])
                turns.append(t)
            out.append({"conversation": turns})
    return out


def check(tmp_path, x, hf_tok, tok_dir, records, fmt, template, name):
    max_length = 4096
    want, raised = xtuner_samples(x, records, fmt, template, hf_tok, max_length)
    oracle, oracle_raised = oracle_samples(
        records, fmt, template, xtuner_ref.RefTokenizer(tok_dir), max_length
    )
    assert oracle_raised == raised, f"{name}: oracle and XTuner fail on different records"
    assert [(i, list(a), list(b)) for i, a, b in oracle] == want, f"{name}: oracle != XTuner"
    if not want:
        return
    data = write_jsonl(tmp_path / f"{name}.jsonl", records)
    out = tmp_path / f"{name}.packed"
    st = pack(data, out, tokenizer=tok_dir, max_length=max_length, format=fmt,
              template=template, skip_bad=True)  # fmt: skip
    assert st.skipped_records == len(raised), f"{name}: records XTuner fails on"
    ds = PackedDataset(out)
    assert ds.num_samples == len(want), name
    for j, (idx, ids, labels) in enumerate(want):
        s = ds.sample(j)
        assert s["source"][1] == idx, name
        np.testing.assert_array_equal(s["input_ids"], ids, err_msg=f"{name} record {idx}")
        np.testing.assert_array_equal(s["labels"], labels, err_msg=f"{name} record {idx}")


def test_version_and_tables_are_xtuner_0_2_0(xt):
    assert "0.2.0" in xt.version
    assert set(xt.PROMPT_TEMPLATE) == set(xtuner_ref.TEMPLATES)
    for name, entry in xt.PROMPT_TEMPLATE.items():
        assert dict(entry) == xtuner_ref.TEMPLATES[name], name
    for key, text in xtuner_ref.SYSTEMS.items():
        assert xt.SYSTEM_TEMPLATE[key] == text, key


@pytest.mark.parametrize("template", ["qwen_chat", "default", "gemma", "chatglm2", "llama3_chat"])
def test_every_format_encodes_as_xtuner(tmp_path, xt, tiny_tokenizer_bos, template):
    from transformers import AutoTokenizer

    hf_tok = AutoTokenizer.from_pretrained(str(tiny_tokenizer_bos))
    rng = random.Random(template)
    for fmt in sorted(set(RECORDS) | {"openai", "conversation"}):
        if fmt == "llava" and template != "qwen_chat":
            continue
        records = list(RECORDS.get(fmt, [])) + generated(fmt, rng)
        check(tmp_path, xt, hf_tok, tiny_tokenizer_bos, records, fmt, template, f"{fmt}-{template}")


def test_pretrain_and_untemplated_as_xtuner(tmp_path, xt, tiny_tokenizer_bos):
    from transformers import AutoTokenizer

    hf_tok = AutoTokenizer.from_pretrained(str(tiny_tokenizer_bos))
    texts = [{"text": " some text \n"}, {"text": ""}, {"text": "more\u001f"}]
    check(tmp_path, xt, hf_tok, tiny_tokenizer_bos, texts, "pretrain", "none", "pretrain")
    recs = generated("conversation", random.Random(5))
    recs = [r for r in recs if all(t["input"] is not None for t in r["conversation"])]
    check(tmp_path, xt, hf_tok, tiny_tokenizer_bos, recs, "conversation", "none", "conv-none")
