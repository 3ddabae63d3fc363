"""``pyfast-tune``: the command line. Every subcommand's help ends with runnable examples.

pyfast-tune pack data/ --out packed/ --tokenizer tok/ --max-length 4096 --template qwen_chat
pyfast-tune verify packed/
pyfast-tune templates | formats
pyfast-tune doctor --json
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys

EPILOG_PACK = """examples:
  pyfast-tune pack data/ --out packed/ --tokenizer tok/ --max-length 4096 --template qwen_chat
  pyfast-tune pack --in data/ --out packed/ --tokenizer tok/tokenizer.json --format openai
  pyfast-tune pack 'shards/*.jsonl.zst' --out packed/ --tokenizer tok/ --skip-bad --threads 8
  pyfast-tune pack data/ --data-order data/order.txt --out packed/ --tokenizer tok/
  pyfast-tune pack qa.jsonl --format alpaca --columns instruction=question,output=answer \\
      --out packed/ --tokenizer tok/
  pyfast-tune pack chats.jsonl --template hf --out packed/ --tokenizer tok/
  pyfast-tune pack internevo/ --file-type .bin --min-length 50 --out packed/ --tokenizer tok/
  pyfast-tune pack data/ --shard 0/3 --out part0/ --tokenizer tok/   # then merge-packs
  pyfast-tune pack data/ --shard auto --out parts/$SLURM_ARRAY_TASK_ID --tokenizer tok/  # sbatch --array
  pyfast-tune pack data/ --executor local --shards 4 --out packed/ --tokenizer tok/
  pyfast-tune pack data/ --executor ray --address auto --shards 64 --work-dir /shared/parts \\
      --out /shared/packed/ --tokenizer tok/
  pyfast-tune pack train-00000-of-00002.parquet sheet.csv --out packed/ --tokenizer tok/
  pyfast-tune pack hf://datasets/timdettmers/openassistant-guanaco --format oasst1 \\
      --template qwen_chat --out packed/ --tokenizer Qwen/Qwen2.5-0.5B-Instruct
"""


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """argparse's formatter with the terminal width read as ``shutil.get_terminal_size`` does
    (``COLUMNS``, else the terminal, else 80) but without importing shutil: argparse builds
    a formatter for every ``add_argument``, and shutil (with bz2, lzma, fnmatch) would be one
    of the largest imports of a `pack` run."""

    def __init__(self, prog: str, **kwargs) -> None:
        if kwargs.get("width") is None:
            kwargs["width"] = _terminal_columns() - 2
        super().__init__(prog, **kwargs)


def _terminal_columns() -> int:
    try:
        columns = int(os.environ.get("COLUMNS", "0"))
    except ValueError:
        columns = 0
    if columns <= 0:
        try:
            columns = os.get_terminal_size(sys.__stdout__.fileno()).columns
        except (AttributeError, ValueError, OSError):
            columns = 0
    return columns or 80


# How the CLI spells a few fields of the engine's pack options; every other field is the flag
# ``--name-with-dashes``, typed, defaulted and documented from the engine's table.
_PACK_FLAG = {"out_dir": "--out"}
_PACK_REQUIRED = {"out_dir", "tokenizer"}


def _add_pack(sub) -> None:
    from pyfast_tune.data import pack_fields

    p = sub.add_parser(
        "pack",
        help="read, template, tokenize and pack data into a packed directory",
        description="Pack JSON/JSONL, CSV/TSV, Parquet or Arrow data (files, directories, globs, "
        "Hub datasets) into an mmap-able directory of whole samples, written atomically. The "
        "output bytes depend only on the inputs and options, never on --threads. The options "
        "are the engine's pack options (PackConfig), one flag per field.",
        epilog=EPILOG_PACK,
        formatter_class=HelpFormatter,
    )
    for field in pack_fields():
        _add_pack_field(p, field)
    # Not engine options: they choose which files of hf://datasets/... inputs are read.
    p.add_argument(
        "--split",
        default=None,
        help="split of hf://datasets/... inputs (default train: the files the dataset card's "
        "configs or the Hub's split naming assign to it)",
    )
    p.add_argument(
        "--subset", default=None, help="subset (config name) of hf://datasets/... inputs"
    )
    p.add_argument(
        "--mix",
        default=None,
        metavar="FILE",
        help="mix sources by ratio: a YAML/JSON list of {path, name, format, columns, split, "
        "subset, weight, max_samples} (instead of INPUTs; see docs/workflow-mixing.md)",
    )
    # Not engine options either: where the shards of one pack run (never in the fingerprint).
    p.add_argument(
        "--executor",
        choices=["local", "ray"],
        default=None,
        help="run --shards N parts on local processes or as Ray tasks (pip install "
        "'pyfast-tune[ray]'), then merge them: the same bytes as one pack",
    )
    p.add_argument("--shards", type=int, default=None, metavar="N", help="parts to run")
    p.add_argument(
        "--address", default=None, help="Ray cluster address (auto: the running cluster)"
    )
    p.add_argument(
        "--retries",
        type=int,
        default=None,
        help="reruns of a shard whose worker or node died (default 3); data errors never rerun",
    )
    p.add_argument(
        "--work-dir",
        default=None,
        help="where the parts go (shared by every node; kept, and a rerun resumes from it; "
        "default OUT.parts, removed after the merge)",
    )
    p.add_argument("--json", action="store_true", help="print the statistics as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_pack)


def _add_pack_field(p: argparse.ArgumentParser, field: dict) -> None:
    name, kind, default, help_ = field["name"], field["kind"], field["default"], field["help"]
    if kind == "paths":
        p.add_argument(name, nargs="*", metavar="INPUT", help=help_)
        p.add_argument(
            "--in",
            dest=f"{name}_opt",
            action="append",
            default=[],
            metavar="INPUT",
            help="same as a positional INPUT (repeatable)",
        )
        return
    flag = _PACK_FLAG.get(name, "--" + name.replace("_", "-"))
    kwargs: dict = {"dest": name, "help": help_}
    if kind == "bool":
        kwargs.update(action="store_true", default=bool(default))
    elif kind == "shard":
        kwargs.update(type=_parse_shard, default=default, metavar="I/N")
    else:
        kwargs.update(type=int if kind == "int" else str, default=default)
        if field["choices"]:
            kwargs["choices"] = field["choices"]
        if name in _PACK_REQUIRED:
            kwargs["required"] = True
        elif default not in (None, ""):
            kwargs["help"] = f"{help_} (default {default})"
    p.add_argument(flag, **kwargs)


def _cmd_pack(args) -> int:
    from pyfast_tune.data import pack, pack_fields

    options = {field["name"]: getattr(args, field["name"]) for field in pack_fields()}
    options["inputs"] = list(args.inputs) + list(args.inputs_opt)
    if args.mix is not None:
        from pyfast_tune.data import PackConfigError
        from pyfast_tune.data.mix import load_mix_file

        if options["inputs"]:
            raise PackConfigError("--mix lists the inputs: give them in the mix file, not as INPUT")
        options["inputs"] = load_mix_file(args.mix)
    hub_files = {k: getattr(args, k) for k in ("split", "subset") if getattr(args, k) is not None}
    run = ("executor", "shards", "address", "retries", "work_dir")  # given ones only
    run = {k: getattr(args, k) for k in run if getattr(args, k) is not None}
    stats = pack(progress=not args.quiet and sys.stderr.isatty(), **hub_files, **options, **run)
    for msg in stats.skipped_examples:
        print(f"skipped: {msg}", file=sys.stderr)
    if args.json:
        print(json.dumps(stats.__dict__, indent=2))
    if args.shard:
        i, n = args.shard
        print(
            f"encoded shard {i}/{n} into {args.out_dir}: {stats.samples} samples, "
            f"{stats.tokens} tokens; join all parts with `pyfast-tune merge-packs`"
        )
        return 0
    print(f"packed {args.out_dir}: {stats.summary()}")
    for m in stats.mix:
        print(
            f"  {m['name']}: {m['samples']} samples ({m['distinct_samples']} distinct of "
            f"{m['available_samples']}, weight {m['weight']:g}), {m['tokens']} tokens "
            f"({m['loss_tokens']} trained), {m['token_share']:.1%} of the tokens"
        )
    return 0


def _parse_shard(spec: str) -> tuple[int, int]:
    if spec == "auto":  # one task of a Slurm job array: --array=0-(N-1)
        env = ("SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT")
        if not all(os.environ.get(k) for k in env):
            raise argparse.ArgumentTypeError(
                "--shard auto reads I/N from SLURM_ARRAY_TASK_ID/SLURM_ARRAY_TASK_COUNT, "
                "which are not set (run it as a task of `sbatch --array=0-<N-1>`)"
            )
        first = int(os.environ.get("SLURM_ARRAY_TASK_MIN", "0"))  # --array=1-4 counts from 1
        spec = f"{int(os.environ[env[0]]) - first}/{os.environ[env[1]]}"
    try:
        i, n = (int(x) for x in spec.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{spec!r}: expected I/N, e.g. 0/3") from None
    return i, n


def _add_verify(sub) -> None:
    p = sub.add_parser(
        "verify",
        help="recompute hashes and packing invariants of a packed directory",
        epilog="example:\n  pyfast-tune verify packed/",
        formatter_class=HelpFormatter,
    )
    p.add_argument("packed_dir")
    p.set_defaults(func=_cmd_verify)


def _cmd_verify(args) -> int:
    from pyfast_tune.data import PackedDataset

    report = PackedDataset(args.packed_dir).verify()
    print(
        f"ok: {args.packed_dir}: {report['files']} files match meta.json; {report['samples']} "
        f"samples in {report['packs']} packs, each exactly once and whole; largest pack "
        f"{report['max_pack_tokens']} tokens"
    )
    return 0


def _add_lists(sub) -> None:
    p = sub.add_parser(
        "templates",
        help="list prompt templates",
        epilog="example:\n  pyfast-tune templates",
        formatter_class=HelpFormatter,
    )
    p.set_defaults(func=_cmd_templates)
    p = sub.add_parser(
        "formats",
        help="list dataset formats",
        epilog="example:\n  pyfast-tune formats",
        formatter_class=HelpFormatter,
    )
    p.set_defaults(func=_cmd_formats)


def _cmd_templates(args) -> int:
    from pyfast_tune.data import templates

    print("none: no template (text used as is; pretraining text is never templated)")
    print(
        "hf: the tokenizer's own Jinja chat_template (tokenizer_config.json or "
        "chat_template.jinja), loss on assistant content + EOS; e.g. qwen3: "
        "'<|im_start|>user\\nHi<|im_end|>\\n<|im_start|>assistant\\n' ... output'<|im_end|>'"
    )
    for t in templates():
        example = t["instruction"].replace("{input}", "Hi").replace("{round}", "1")
        print(
            f"{t['name']}: {example!r} ... output{t['suffix']!r}"
            f"{'' if t['suffix_as_eos'] else ' <eos>'} sep={t['sep']!r}"
        )
    return 0


_FORMAT_EXAMPLES = {
    "auto": "detected per file from the first record's keys",
    "conversation": '{"conversation": [{"system": "...", "input": "Hi", "output": "Hello"}]}',
    "openai": '{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}',
    "alpaca": '{"instruction": "Add", "input": "1+1", "output": "2"}',
    "pretrain": '{"text": "Raw text for continued pretraining."}',
    "alpaca_zh": '{"instruction_zh": "加法", "input_zh": "1+1", "output_zh": "2"}',
    "oasst1": '{"text": "### Human: Hi ### Assistant: Hello"}',
    "code_alpaca": '{"prompt": "Reverse a list", "completion": "xs[::-1]"}',
    "medical": '{"instruction": "头痛", "input": "三天", "output": "..."} (medical system prompt)',
    "tiny_codes": '{"prompt": "Write fizzbuzz", "response": "..."}',
    "default": '{"input": "Hi", "output": "Hello"}',
    "wizardlm": '{"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]}'
    " (alias sharegpt)",
    "openorca": '{"system_prompt": "...", "question": "Hi", "response": "Hello"}',
    "stack_exchange": '{"question": "How?", "response": "Like this."}',
    "arxiv": '{"abstract": "We study...", "title": "A Study"}',
    "colors": '{"description": "Color: deep sea blue", "color": "#123456"}',
    "law_reference": '{"question": "...", "answer": "..."} (lawyer system prompt)',
    "crime_kg_assitant": '{"input": "...", "output": "..."} (lawyer system prompt)',
    "sql": '{"context": "CREATE TABLE t (a INT)", "question": "Count rows", "answer": "SELECT ..."}',
    "llava": '{"image": "a.jpg", "conversations": [{"from": "human", "value": "<image>\\nWhat?"}, '
    '{"from": "gpt", "value": "A cat."}]} (<image> -> id -200; images.json)',
    "preference": '{"prompt": "Hi", "chosen": "Hello", "rejected": "Go away"} (TRL forms; pairs.bin)',
    ".bin": 'pre-tokenized InternEVO: X.bin lines {"tokens": [1, -2, ...]} + X.bin.meta '
    "(np.save N×2 offset, count); --file-type .bin",
}


def _cmd_formats(args) -> int:
    from pyfast_tune.data import formats

    for name in formats():
        print(f"{name}: {_FORMAT_EXAMPLES.get(name, '')}")
    print(f"(pre-tokenized) {_FORMAT_EXAMPLES['.bin']}")
    return 0


def _add_order(sub) -> None:
    p = sub.add_parser(
        "order",
        help="write a data-order file (XTuner get_data_order.py format), truly sorted",
        description="List the files under DATA_DIR ending with --file-type, recursively, sorted by "
        "relative path bytes (not filesystem order, so every cluster gets the same order), one "
        "relative path per line. `pyfast-tune pack DATA_DIR --data-order FILE` reads exactly those.",
        epilog="examples:\n  pyfast-tune order data/ --out data_order.txt --file-type .bin\n"
        "  pyfast-tune pack data/ --data-order data_order.txt --file-type .bin --out packed/ "
        "--tokenizer tok/",
        formatter_class=HelpFormatter,
    )
    p.add_argument("data_dir")
    p.add_argument("--out", required=True, help="the data-order file to write")
    p.add_argument("--file-type", default=".bin", help="file-name ending (default .bin)")
    p.set_defaults(func=_cmd_order)


def _cmd_order(args) -> int:
    from pyfast_tune.data import data_order

    names = data_order(args.data_dir, args.file_type)
    if not names:
        raise ValueError(f"{args.data_dir}: no files ending with {args.file_type!r}")
    tmp = f"{args.out}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write("".join(n + "\n" for n in names))
    os.replace(tmp, args.out)
    print(f"wrote {args.out}: {len(names)} files")
    return 0


def _add_merge(sub) -> None:
    p = sub.add_parser(
        "merge-packs",
        help="join the parts of `pack --shard I/N` into one packed directory",
        description="Join the N part directories written by `pyfast-tune pack --shard I/N` "
        "(any order) into one packed directory, byte-identical to a single-machine `pack`.",
        epilog="example:\n  for i in 0 1 2; do pyfast-tune pack data/ --shard $i/3 --out part$i "
        "--tokenizer tok/; done\n  pyfast-tune merge-packs part0 part1 part2 --out packed/",
        formatter_class=HelpFormatter,
    )
    p.add_argument("parts", nargs="+", metavar="PART")
    p.add_argument("--out", required=True)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_merge)


def _cmd_merge(args) -> int:
    from pyfast_tune.data import merge_packs

    stats = merge_packs(args.parts, args.out, progress=not args.quiet and sys.stderr.isatty())
    print(f"packed {args.out}: {stats.summary()}")
    return 0


# Each command and the function that registers it (module, name), in the order of the help.
# A command line naming one command builds that command's parser alone: `pyfast-tune pack`
# imports neither the training commands (cli_workflow.py) nor doctor.py, nor builds their
# parsers, since start-up is paid before every pack reads its first record.
COMMANDS: dict[str, tuple[str, str]] = {
    "pack": (__name__, "_add_pack"),
    "verify": (__name__, "_add_verify"),
    "templates": (__name__, "_add_lists"),
    "formats": (__name__, "_add_lists"),
    "order": (__name__, "_add_order"),
    "merge-packs": (__name__, "_add_merge"),
    # inspect, train, convert, merge, chat, score live in cli_workflow.py.
    **{
        c: ("pyfast_tune.cli_workflow", f"_add_{c}")
        for c in ("inspect", "train", "convert", "merge", "chat", "score")
    },  # fmt: skip
    "doctor": ("pyfast_tune.doctor", "add_parser"),  # kernel checks on this machine
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The CLI's parser: every command, or only ``command``'s (a name of :data:`COMMANDS`)."""
    parser = argparse.ArgumentParser(
        prog="pyfast-tune",
        description="Fast, exact, reproducible fine-tuning of Hugging Face causal LMs.",
        epilog="examples:\n  pyfast-tune pack data/ --out packed/ --tokenizer tok/\n"
        "  pyfast-tune verify packed/",
        formatter_class=HelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    wanted = [command] if command in COMMANDS else list(COMMANDS)
    for where in dict.fromkeys(COMMANDS[c] for c in wanted):  # once each, in order
        getattr(importlib.import_module(where[0]), where[1])(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser(argv[0] if argv else None).parse_args(argv)
    from pyfast_tune.data import PackError

    try:
        return args.func(args)
    except (PackError, OSError, ValueError) as e:
        print(f"pyfast-tune {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"pyfast-tune {args.command}: interrupted; nothing written", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
