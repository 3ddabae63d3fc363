"""The workflow subcommands of ``pyfast-tune`` after packing: inspect, train, convert, merge,
chat, score. ``cli.py`` registers each ``_add_<command>`` (its ``COMMANDS`` table) only when the
command line needs it; heavy imports happen inside commands.

    pyfast-tune inspect packed/ --plot lengths.png
    pyfast-tune train run.yaml --nproc 2 --deepspeed zero2 --max_steps 100
    pyfast-tune convert runs/lora adapter/
    pyfast-tune merge models/base adapter/ merged/
    pyfast-tune chat merged/ --prompt "Hello"
    pyfast-tune score reward_model/ chats.jsonl
"""

from __future__ import annotations

import argparse
import json
import sys

_RAW = argparse.RawDescriptionHelpFormatter


def _add_inspect(sub) -> None:
    p = sub.add_parser(
        "inspect",
        help="statistics, a decoded sample and a length histogram of a packed directory",
        description="Counts, fill, token and trained-token totals, truncation/drop/skip counts "
        "and the fingerprint of a packed directory; one sample decoded with its trained spans "
        "between ⟦ ⟧; a histogram of sample lengths (text, and PNG with --plot).",
        epilog="examples:\n  pyfast-tune inspect packed/\n"
        "  pyfast-tune inspect packed/ --sample 42 --plot lengths.png\n"
        "  pyfast-tune inspect packed/ --json > stats.json",
        formatter_class=_RAW,
    )
    p.add_argument("packed_dir")
    p.add_argument(
        "--sample",
        type=int,
        default=0,
        metavar="J",
        help="sample to decode (input order; default 0; -1 for none)",
    )
    p.add_argument("--plot", default=None, metavar="PNG", help="write the length histogram here")
    p.add_argument("--bins", type=int, default=50, help="histogram bins (default 50)")
    p.add_argument(
        "--tokenizer",
        default=None,
        help="tokenizer dir for decoding (default: the path in meta.json)",
    )
    p.add_argument("--color", action="store_true", help="trained spans in green, not ⟦ ⟧")
    p.add_argument("--json", action="store_true", help="print the statistics as JSON")
    p.set_defaults(func=_cmd_inspect)


def _cmd_inspect(args) -> int:
    from pyfast_tune.data import PackedDataset
    from pyfast_tune.inspect_data import format_report, plot_lengths, render_sample, summarize

    ds = PackedDataset(args.packed_dir)
    report = summarize(ds, bins=args.bins)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(format_report(report))
    if args.sample >= 0 and ds.num_samples:
        print()
        print(render_sample(ds, args.sample, args.tokenizer, color=args.color))
    if args.plot:
        drawn = plot_lengths(ds, args.plot, bins=args.bins)
        print(f"wrote {drawn['path']} ({len(drawn['heights'])} bins)", file=sys.stderr)
    return 0


def _add_train(sub) -> None:
    p = sub.add_parser(
        "train",
        help="launch training (DeepSpeed launcher, or torchrun with --nproc)",
        description="Launch pyfast_tune/train.py on RUN.yaml in child processes: the DeepSpeed "
        "launcher on all visible GPUs (or --num-gpus N), or torchrun with --nproc N processes "
        "(CPU or GPU). Any other --key value overrides that config key (--lr 1e-4, --lora.r 16).",
        epilog="examples:\n  pyfast-tune train pyfast_tune/configs/lora.yaml --num-gpus 8\n"
        "  pyfast-tune train run.yaml --nproc 2 --deepspeed zero3 --max_steps 100\n"
        "  deepspeed --num_gpus 8 pyfast_tune/train.py --config run.yaml   # the same run\n"
        "  srun python pyfast_tune/train.py --config run.yaml               # under slurm",
        formatter_class=_RAW,
    )
    p.add_argument("config", metavar="RUN.yaml")
    _train_launch_options(p)
    p.add_argument("overrides", nargs=argparse.REMAINDER, help="--key value config overrides")
    p.set_defaults(func=_cmd_train)


def _train_launch_options(p, exclusive: bool = True) -> None:
    group = p.add_mutually_exclusive_group() if exclusive else p
    group.add_argument("--num-gpus", type=int, default=None, help="DeepSpeed launcher GPUs")
    group.add_argument("--nproc", type=int, default=None, help="torchrun processes")
    p.add_argument(
        "--deepspeed",
        default=None,
        help="preset (zero1 zero2 zero2_offload zero3 zero3_offload) or JSON path",
    )


def _cmd_train(args) -> int:
    from pyfast_tune.launch import launch

    # Launch options may also follow RUN.yaml, where REMAINDER swallowed them.
    late = argparse.ArgumentParser(add_help=False)
    _train_launch_options(late, exclusive=False)  # both given: our error below, not an exit
    found, overrides = late.parse_known_args(args.overrides)
    num_gpus = args.num_gpus if args.num_gpus is not None else found.num_gpus
    nproc = args.nproc if args.nproc is not None else found.nproc
    if num_gpus is not None and nproc is not None:
        raise ValueError("--num-gpus and --nproc exclude each other")
    return launch(args.config, num_gpus=num_gpus, nproc=nproc,
                  deepspeed=args.deepspeed or found.deepspeed, extra_args=overrides)  # fmt: skip


def _add_convert(sub) -> None:
    p = sub.add_parser(
        "convert",
        help="DeepSpeed checkpoint -> HF folder (safetensors) or PEFT adapter folder",
        description="Rebuild the weights of a pyfast-tune DeepSpeed checkpoint (ZeRO 1/2/3, any "
        "world size) without a GPU or process group: full fine-tunes become a Hugging Face model "
        "folder (safetensors, config, generation config, tokenizer files), LoRA/QLoRA runs a PEFT "
        "adapter folder for the run's base model. CKPT_DIR is a checkpoint step directory or a "
        "run's output_dir (its newest checkpoint).",
        epilog="examples:\n  pyfast-tune convert runs/lora adapter/\n"
        "  pyfast-tune convert runs/full/checkpoints/step_00000200 model/ --dtype bf16 "
        "--max-shard-size 5GB",
        formatter_class=_RAW,
    )
    p.add_argument("checkpoint", metavar="CKPT_DIR")
    p.add_argument("out", metavar="OUT_DIR")
    p.add_argument(
        "--dtype",
        default=None,
        choices=["bf16", "fp16", "fp32"],
        help="weights dtype (default: fp32, DeepSpeed's master weights)",
    )
    p.add_argument("--max-shard-size", default="2GB", help="safetensors shard size (default 2GB)")
    p.set_defaults(func=_cmd_convert)


def _cmd_convert(args) -> int:
    from pyfast_tune.export import convert
    from pyfast_tune.quiet import quiet_dependencies

    with quiet_dependencies():
        r = convert(args.checkpoint, args.out, dtype=args.dtype, max_shard_size=args.max_shard_size)
    print(f"converted {r['checkpoint']} (step {r['step']}, ZeRO-{r['zero_stage']}, "
          f"{r['world_size']} ranks, {r['source']} weights) -> {r['kind']} {args.out}: "
          f"{r['tensors']} tensors, tokenizer files {', '.join(r['tokenizer_files']) or 'none'}")  # fmt: skip
    return 0


def _add_merge(sub) -> None:
    p = sub.add_parser(
        "merge",
        help="merge a LoRA/QLoRA adapter into its base model (plain HF folder)",
        epilog="examples:\n  pyfast-tune merge models/base adapter/ merged/\n"
        "  pyfast-tune merge models/base runs/lora/checkpoints/step_00000200/hf merged/ --dtype bf16",
        formatter_class=_RAW,
    )
    p.add_argument("base", metavar="BASE")
    p.add_argument("adapter", metavar="ADAPTER")
    p.add_argument("out", metavar="OUT")
    p.add_argument(
        "--dtype",
        default=None,
        choices=["bf16", "fp16", "fp32"],
        help="saved dtype (default: the base model's)",
    )
    p.add_argument("--max-shard-size", default="2GB")
    p.add_argument("--trust-remote-code", action="store_true")
    p.set_defaults(func=_cmd_merge)


def _cmd_merge(args) -> int:
    from pyfast_tune.export import merge
    from pyfast_tune.quiet import quiet_dependencies

    with quiet_dependencies():
        r = merge(args.base, args.adapter, args.out, dtype=args.dtype,
                  max_shard_size=args.max_shard_size, trust_remote_code=args.trust_remote_code)  # fmt: skip
    print(f"merged {args.adapter} into {args.base} -> {args.out} ({r['dtype']})")
    return 0


def _add_chat(sub) -> None:
    p = sub.add_parser(
        "chat",
        help="chat with a model (+ adapter), turns formatted as in training",
        description="Prompts are built exactly as training encoded samples (the XTuner template's "
        "SYSTEM/INSTRUCTION/SUFFIX/SEP with BOS/EOS, or the tokenizer's chat template with "
        "--template hf); generation stops at EOS and the template's stop words and streams as it "
        "goes. Default template: the one recorded by convert/merge, else hf.",
        epilog="examples:\n  pyfast-tune chat merged/\n"
        "  pyfast-tune chat models/base --adapter adapter/ --template qwen_chat --system 'Be brief.'\n"
        "  pyfast-tune chat merged/ --prompt 'What is 2+2?' --temperature 0 --max-new-tokens 32\n"
        "  pyfast-tune chat llava/ --image cat.png --prompt 'What colour is the cat?'",
        formatter_class=_RAW,
    )
    p.add_argument("model", metavar="MODEL")
    p.add_argument("--adapter", default=None, help="PEFT adapter directory")
    p.add_argument(
        "--template",
        default=None,
        help="template name (`pyfast-tune templates`), hf (the tokenizer's chat "
        "template) or none (raw text continuation)",
    )
    p.add_argument("--system", default=None, help="system text")
    p.add_argument("--prompt", default=None, help="answer this one message and exit")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0, help="sample from the k likeliest (0 = all)")
    p.add_argument("--repetition-penalty", type=float, default=1.0,
                   help="> 1 discourages tokens already in the conversation (1 = off)")  # fmt: skip
    p.add_argument("--stop-words", nargs="+", default=[], metavar="WORD",
                   help="more stop words, added to the template's")  # fmt: skip
    p.add_argument("--bits", type=int, choices=[4, 8], default=None,
                   help="load the model quantized by bitsandbytes (needs CUDA)")  # fmt: skip
    p.add_argument("--image", default=None, metavar="PATH",
                   help="a LLaVA model: chat about this image (docs/workflow-llava.md)")  # fmt: skip
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument(
        "--tokenizer", default=None, help="tokenizer dir (default: adapter's or model's)"
    )
    p.add_argument("--dtype", default=None, choices=["bf16", "fp16", "fp32"])
    p.add_argument("--trust-remote-code", action="store_true")
    p.set_defaults(func=_cmd_chat)


def _cmd_chat(args) -> int:
    from pyfast_tune.chat import chat_main
    from pyfast_tune.quiet import quiet_dependencies

    with quiet_dependencies():
        return chat_main(args)


def _add_score(sub) -> None:
    p = sub.add_parser(
        "score",
        help="score conversations with a reward model (objective: reward), packed",
        description="Each conversation is templated as training encoded the pairs (the template "
        "recorded by convert/merge), packed whole into rows and scored at its last non-pad "
        "token. One JSON line per conversation: {file, record, score}, in input order.",
        epilog="examples:\n  pyfast-tune score reward_model/ chats.jsonl > scores.jsonl\n"
        "  pyfast-tune score merged_rm/ data/*.jsonl --template qwen_chat --max-length 8192",
        formatter_class=_RAW,
    )
    p.add_argument("model", metavar="MODEL", help="a reward model folder (convert or merge)")
    p.add_argument("inputs", nargs="+", metavar="FILE", help="JSON/JSONL with `messages`")
    p.add_argument("--template", default=None, help="default: the one the model recorded")
    p.add_argument("--max-length", type=int, default=4096, help="tokens per packed row")
    p.add_argument("--threads", type=int, default=None)
    p.set_defaults(func=_cmd_score)


def _cmd_score(args) -> int:
    from pyfast_tune.quiet import quiet_dependencies
    from pyfast_tune.score import score_main

    with quiet_dependencies():
        return score_main(args)
