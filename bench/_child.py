"""What the memory benchmarks share: generated words, and `pyfast-tune` run in a fresh
process whose peak RSS is read from outside (not a benchmark: pytest does not collect it)."""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time

MiB = 1 << 20
WORDS = (
    "the of and to in is was for on that with as by at from his her an which this be are "
    "data token pack sample model train stream shard memory merge format template byte "
    "order reader writer engine batch offset length loss label python rust"
).split()


# Spawns the command from a fresh, small process and reports the child's peak RSS (ru_maxrss
# from wait4) and its own. Measuring from the benchmark process itself is wrong: a forked (or
# vforked) child's ru_maxrss includes the parent's resident pages until exec, so under pytest
# it reported the pytest process's size, not the packer's. From this launcher the most it can
# add is its own resident size at spawn, which is printed beside the figure.
# (The launcher's own figure is VmHWM of its address space, not its ru_maxrss: that one
# carries its parent's size across exec the same way.)
LAUNCHER = """
import os, sys
with open("/proc/self/status") as f:
    own = next(int(x.split()[1]) for x in f if x.startswith("VmHWM:"))
pid = os.posix_spawn(sys.argv[2], sys.argv[2:], os.environ)
_, status, ru = os.wait4(pid, 0)
with open(sys.argv[1], "w") as f:
    f.write(f"{ru.ru_maxrss * 1024} {own * 1024}")
sys.exit(os.waitstatus_to_exitcode(status))
"""


def run_child(args: list[str]) -> tuple[float, int, int, str]:
    """Run `pyfast-tune ARGS` in a fresh process; (seconds, its peak RSS bytes, the launcher's
    peak RSS bytes (the most the first figure can include that is not the packer's), stdout).
    """
    with (
        tempfile.TemporaryFile("w+") as out,
        tempfile.TemporaryFile("w+") as err,
        tempfile.NamedTemporaryFile("r") as rss,
    ):
        t = time.perf_counter()
        cmd = [sys.executable, "-m", "pyfast_tune.cli", *args]
        p = subprocess.run(
            [sys.executable, "-S", "-c", LAUNCHER, rss.name, *cmd], stdout=out, stderr=err
        )
        dt = time.perf_counter() - t
        out.seek(0)
        err.seek(0)
        if p.returncode != 0:
            raise RuntimeError(f"pyfast-tune {' '.join(args)} failed:\n{err.read()}")
        child, launcher = (int(x) for x in rss.read().split())
        return dt, child, launcher, out.read()
