"""`pyfast-tune pack` imports only what packing needs: its start-up is a fixed cost paid before
the first record is read, and on small inputs it is most of the run (numpy alone takes
~0.1-0.25 s to import). Each check runs a fresh interpreter, so the modules it finds loaded are
the ones the command itself pulled in; adding a heavy import to the pack path fails here.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

# Not needed to pack a local JSONL file with a local tokenizer. huggingface_hub is for hf://
# inputs and Hub tokenizer ids, tqdm for the progress bar (a terminal only), yaml for --mix
# files, pyarrow for Parquet/Arrow inputs, numpy for reading a packed directory back; our own
# pyfast_tune.hub (hf:// and Hub ids) and pyfast_tune.data.storage (s3://, gs://, az://) are
# for the URLs they handle (pyfast_tune.locations tells a URL from a path without them).
HEAVY = (
    "pyfast_tune.hub",
    "pyfast_tune.data.storage",
    "torch",
    "transformers",
    "numpy",
    "huggingface_hub",
    "tqdm",
    "yaml",
    "pyarrow",
    "pandas",
    "jinja2",
    "tokenizers",
    # the standard library's larger modules, none of which packing uses: dataclasses brings
    # inspect/ast/dis, shutil brings bz2/lzma (argparse imports it for the terminal width
    # unless given one), pathlib urllib; the training commands' and doctor's parsers
    "dataclasses",
    "inspect",
    "shutil",
    "pathlib",
    "typing",
    "pyfast_tune.cli_workflow",
    "pyfast_tune.doctor",
)

# Runs the CLI's own main() in this interpreter, then reports which HEAVY modules it loaded
# (not those the interpreter had already loaded before: a site hook may import typing).
PROBE = """
import sys
already = set(sys.modules)
import json
from pyfast_tune import cli
try:
    rc = cli.main(sys.argv[2:])
except SystemExit as e:  # --help exits
    rc = e.code
print(json.dumps({"rc": rc, "loaded": sorted(m for m in json.loads(sys.argv[1])
                                             if m in sys.modules and m not in already)}))
"""


def _probe(*argv: str) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", PROBE, json.dumps(HEAVY), *argv],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    ).stdout
    return json.loads(out.strip().splitlines()[-1])


def test_pack_help_imports_nothing_heavy():
    result = _probe("pack", "--help")
    assert result["rc"] == 0
    assert result["loaded"] == [], f"`pyfast-tune pack --help` imported {result['loaded']}"


@pytest.mark.parametrize("template", ["default", "hf"])
def test_whole_pack_run_imports_nothing_heavy(tmp_path, tiny_tokenizer, template):
    data = tmp_path / "chats.jsonl"
    chat = {
        "messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    }
    data.write_text(json.dumps(chat) + "\n" + json.dumps(chat) + "\n")
    out = tmp_path / "packed"
    result = _probe(
        "pack",
        str(data),
        "--out",
        str(out),
        "--tokenizer",
        str(tiny_tokenizer),
        "--template",
        template,
        "--max-length",
        "64",
        "--threads",
        "2",
    )
    assert result["rc"] == 0
    assert (out / "meta.json").is_file()  # it did pack
    assert result["loaded"] == [], f"`pyfast-tune pack` imported {result['loaded']}"


def test_library_names_still_import_lazily():
    # `from pyfast_tune import pack, PackedDataset` keeps working; numpy arrives with the name
    # that needs it, not with the package.
    code = (
        "import sys; from pyfast_tune import pack, PackStats, PackError; "
        "a = 'numpy' in sys.modules; from pyfast_tune import PackedDataset; "
        "print(a, 'numpy' in sys.modules, PackedDataset.__module__)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.split()
    assert out == ["False", "True", "pyfast_tune.data.dataset"]
