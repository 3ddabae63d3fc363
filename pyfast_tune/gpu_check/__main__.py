"""``python -m pyfast_tune.gpu_check --out DIR``: run the GPU check kit (see the package doc)."""

from __future__ import annotations

import argparse
import sys

from pyfast_tune.gpu_check.runner import PART_NAMES, run
from pyfast_tune.gpu_check.summary import format_summary


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m pyfast_tune.gpu_check",
        description="One prepared run of our GPU path: device and versions, doctor, the GPU "
        "tests, the GPU benchmarks, a short training run; report.json + summary.txt in --out. "
        "Without CUDA: the same parts in a dry mode on the CPU (Triton interpreter, tiny shapes).",
        epilog="examples:\n  python -m pyfast_tune.gpu_check --out gpu-report\n"
        "  python -m pyfast_tune.gpu_check --out r --parts env,bench_loss --dry\n"
        "  python -m pyfast_tune.gpu_check --out r --parts env,train --fail train   # recorded",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--out", required=True, help="folder for report.json, summary.txt, logs/")
    ap.add_argument("--parts", default=",".join(PART_NAMES),
                    help=f"comma-separated subset of {','.join(PART_NAMES)} (default: all)")  # fmt: skip
    ap.add_argument("--dry", action="store_true", help="the CPU dry mode even where CUDA is")
    ap.add_argument("--budget", action="append", default=[], metavar="PART=SECONDS",
                    help="override one part's time budget (repeatable)")  # fmt: skip
    ap.add_argument("--total", type=float, default=None,
                    help="seconds for the whole run (default: 470 on a GPU, 3600 dry)")  # fmt: skip
    ap.add_argument("--fail", default=None, metavar="PART[:hang]",
                    help="inject a failure into a part (tests the kit's isolation)")  # fmt: skip
    a = ap.parse_args(argv)
    budgets = {}
    for item in a.budget:
        part, sep, seconds = item.partition("=")
        if not sep or part not in PART_NAMES:
            ap.error(f"--budget takes PART=SECONDS with PART one of {PART_NAMES}, got {item!r}")
        budgets[part] = float(seconds)
    parts = [p.strip() for p in a.parts.split(",") if p.strip()]
    try:
        report = run(a.out, parts, dry=a.dry or None, budgets=budgets, total_s=a.total,
                     fail=a.fail)  # fmt: skip
    except ValueError as e:
        ap.error(str(e))
    print(format_summary(report))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
