"""``pyfast-tune``: the command line. Every subcommand's help ends with runnable examples.

    pyfast-tune pack data/ --out packed/ --tokenizer tok/ --max-length 4096 --template qwen_chat
    pyfast-tune verify packed/
    pyfast-tune templates | formats
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable

from pyfast_tune.cli_workflow import REGISTRARS as _workflow_registrars

EPILOG_PACK = """examples:
  pyfast-tune pack data/ --out packed/ --tokenizer tok/ --max-length 4096 --template qwen_chat
  pyfast-tune pack --in data/ --out packed/ --tokenizer tok/tokenizer.json --format openai
  pyfast-tune pack 'shards/*.jsonl.zst' --out packed/ --tokenizer tok/ --skip-bad --threads 8
  pyfast-tune pack data/ --data-order data/order.txt --out packed/ --tokenizer tok/
"""


def _add_pack(sub) -> None:
    p = sub.add_parser(
        "pack",
        help="read, template, tokenize and pack data into a packed directory",
        description="Pack JSON/JSONL data (files, directories, globs; plain, .gz, .zst) into an "
        "mmap-able directory of whole samples, written atomically. The output bytes depend only "
        "on the inputs and options, never on --threads.",
        epilog=EPILOG_PACK,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("inputs", nargs="*", metavar="INPUT", help="files, directories or globs")
    p.add_argument("--in", dest="inputs_opt", action="append", default=[], metavar="INPUT",
                   help="same as a positional INPUT (repeatable)")
    p.add_argument("--out", required=True, help="output directory (replaced atomically)")
    p.add_argument("--tokenizer", required=True,
                   help="directory with tokenizer.json (+ tokenizer_config.json), or the json")
    p.add_argument("--max-length", type=int, default=4096, help="pack capacity (default 4096)")
    p.add_argument("--format", default="auto", help="auto|conversation|openai|alpaca|pretrain")
    p.add_argument("--template", default="default",
                   help="XTuner prompt template name or 'none' (see `pyfast-tune templates`)")
    p.add_argument("--seed", type=int, default=0, help="seed of the pack order (default 0)")
    p.add_argument("--threads", type=int, default=None, help="worker threads (default: all)")
    p.add_argument("--data-order", default=None,
                   help="file listing input paths (relative to the single INPUT dir), one per line")
    p.add_argument("--skip-bad", action="store_true",
                   help="skip and count bad records/files instead of failing")
    p.add_argument("--tokenizer-backend", choices=["auto", "hf", "fast"], default="auto",
                   help="text encoder: the fast byte-level BPE path when it provably "
                        "gives the ids of Hugging Face tokenizers (auto), always tokenizers "
                        "(hf), or fast (fail if the tokenizer does not qualify); never "
                        "changes the output")
    p.add_argument("--json", action="store_true", help="print the statistics as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_pack)


def _cmd_pack(args) -> int:
    from pyfast_tune.data import pack

    inputs = list(args.inputs) + list(args.inputs_opt)
    stats = pack(
        inputs,
        args.out,
        tokenizer=args.tokenizer,
        max_length=args.max_length,
        format=args.format,
        template=args.template,
        seed=args.seed,
        threads=args.threads,
        skip_bad=args.skip_bad,
        tokenizer_backend=args.tokenizer_backend,
        data_order=args.data_order,
        progress=not args.quiet and sys.stderr.isatty(),
    )
    for msg in stats.skipped_examples:
        print(f"skipped: {msg}", file=sys.stderr)
    if args.json:
        print(json.dumps(stats.__dict__, indent=2))
    print(f"packed {args.out}: {stats.summary()}")
    return 0


def _add_verify(sub) -> None:
    p = sub.add_parser(
        "verify",
        help="recompute hashes and packing invariants of a packed directory",
        epilog="example:\n  pyfast-tune verify packed/",
        formatter_class=argparse.RawDescriptionHelpFormatter,
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
    p = sub.add_parser("templates", help="list prompt templates",
                       epilog="example:\n  pyfast-tune templates",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.set_defaults(func=_cmd_templates)
    p = sub.add_parser("formats", help="list dataset formats",
                       epilog="example:\n  pyfast-tune formats",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.set_defaults(func=_cmd_formats)


def _cmd_templates(args) -> int:
    from pyfast_tune.data import templates

    print("none: no template (text used as is; pretraining text is never templated)")
    for t in templates():
        example = t["instruction"].replace("{input}", "Hi").replace("{round}", "1")
        print(f"{t['name']}: {example!r} ... output{t['suffix']!r}"
              f"{'' if t['suffix_as_eos'] else ' <eos>'} sep={t['sep']!r}")
    return 0


_FORMAT_EXAMPLES = {
    "auto": "detected per file from the first record's keys",
    "conversation": '{"conversation": [{"system": "...", "input": "Hi", "output": "Hello"}]}',
    "openai": '{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}',
    "alpaca": '{"instruction": "Add", "input": "1+1", "output": "2"}',
    "pretrain": '{"text": "Raw text for continued pretraining."}',
}


def _cmd_formats(args) -> int:
    from pyfast_tune.data import formats

    for name in formats():
        print(f"{name}: {_FORMAT_EXAMPLES.get(name, '')}")
    return 0


REGISTRARS: list[Callable] = [_add_pack, _add_verify, _add_lists]
# inspect, train, convert, merge, chat (issue 5) live in cli_workflow.py.
REGISTRARS += _workflow_registrars


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pyfast-tune",
        description="Fast, exact, reproducible fine-tuning of Hugging Face causal LMs.",
        epilog="examples:\n  pyfast-tune pack data/ --out packed/ --tokenizer tok/\n"
        "  pyfast-tune verify packed/",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for register in REGISTRARS:
        register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
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
