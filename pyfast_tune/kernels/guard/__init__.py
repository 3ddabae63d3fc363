"""First-use guard: an op proves itself on this device before it trains.

A leaf package: it knows ops by name only (``registry``) and imports none of them. By concern:

- ``op``: ``Op``, what an op gives the guard (backends, a random case, the reference);
- ``registry``: where each op's ``Op`` lives, imported on first use;
- ``check``: checking backends against the reference and racing the correct ones;
- ``decision``: deciding once per (op, device, shape class), in memory and on disk (``cache``,
  keyed by ``environment``), logging it, demoting a backend that fails at run time;
- ``call``: the guarded call every op runs through (retry on failure, nothing while tracing);
- ``faults``: ``PYFAST_TUNE_FAULTS``, making one backend wrong or fail, to test all this.

>>> from pyfast_tune.kernels import guard                                  # doctest: +SKIP
>>> guard.choose("varlen_attention", torch.device("cpu"),
...              {"dtype": "float32", "head_dim": 64, "gqa": 2, "window": [-1, 0]})
'cpp'
"""

from pyfast_tune.kernels.guard import faults
from pyfast_tune.kernels.guard.cache import CACHE_ENV, cache_dir
from pyfast_tune.kernels.guard.call import backend_failure, call_guarded, tracing
from pyfast_tune.kernels.guard.check import Check, Decision, evaluate, race_ms
from pyfast_tune.kernels.guard.decision import (
    check_now,
    choose,
    decide,
    decided,
    demote,
    describe,
    forget,
)
from pyfast_tune.kernels.guard.environment import (
    cpu_name,
    device_name,
    driver_version,
    environment,
    package_version,
    rank,
)
from pyfast_tune.kernels.guard.op import Op
from pyfast_tune.kernels.guard.registry import REGISTRY, declare_ops, get_op, op_names, register

__all__ = [
    "CACHE_ENV",
    "REGISTRY",
    "Check",
    "Decision",
    "Op",
    "backend_failure",
    "cache_dir",
    "call_guarded",
    "check_now",
    "choose",
    "cpu_name",
    "decide",
    "decided",
    "declare_ops",
    "demote",
    "describe",
    "device_name",
    "driver_version",
    "environment",
    "evaluate",
    "faults",
    "forget",
    "get_op",
    "op_names",
    "package_version",
    "race_ms",
    "rank",
    "register",
    "tracing",
]
