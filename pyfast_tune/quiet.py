"""Keep dependencies' notices a user cannot act on off the console.

Training, ``convert``, ``merge`` and ``chat`` import transformers, peft, DeepSpeed and (through
peft) bitsandbytes. Each of them prints notices about its own API or optional kernels that say
nothing about the user's run: FutureWarning/DeprecationWarning raised inside them, DeepSpeed's
"Setting accelerator to CPU" on a machine without CUDA, bitsandbytes' "Failed to load CPU
gemm_4bit_forward from kernels-community" for a 4-bit kernel a LoRA run never calls, and the
weight-loading/shard-writing progress bars. Real warnings (weights not initialised, a model's
own config problems) still show.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import warnings

# Raised inside these packages, deprecations are about their API, not the user's.
_DEPENDENCIES = r"(transformers|peft|deepspeed|accelerate|torch)(\.|$)"
# bitsandbytes logs this at import when the optional `kernels` package is absent.
_BNB_OPTIONAL_KERNEL_LOGGER = "bitsandbytes.backends.cpu.ops"


@contextlib.contextmanager
def quiet_dependencies(show: bool = False, hide_bitsandbytes: bool = False):
    """Within the block, dependencies' notices are not shown (everything is restored on exit:
    tests run several trainings in one process). ``show=True`` changes nothing.

    ``hide_bitsandbytes``: make ``import bitsandbytes`` fail, so peft (which imports it at
    start-up whatever the method) does not load it at all; for runs that never quantize.
    """
    if show:
        yield
        return
    import torch

    hid_bnb = hide_bitsandbytes and "bitsandbytes" not in sys.modules
    if hid_bnb:
        sys.modules["bitsandbytes"] = None  # import fails, importlib.util.find_spec says absent
    bnb_log = logging.getLogger(_BNB_OPTIONAL_KERNEL_LOGGER)
    bnb_level = bnb_log.level
    bnb_log.setLevel(logging.ERROR)
    saved_env = os.environ.get("DS_ACCELERATOR")
    if saved_env is None and not torch.cuda.is_available():
        os.environ["DS_ACCELERATOR"] = "cpu"
    try:
        with warnings.catch_warnings():
            for category in (FutureWarning, DeprecationWarning):
                warnings.filterwarnings("ignore", category=category, module=_DEPENDENCIES)
            try:
                from transformers.utils import logging as hf_logging

                bars = hf_logging.is_progress_bar_enabled()
                hf_logging.disable_progress_bar()
            except ImportError:  # pragma: no cover - transformers is a [train] dependency
                bars = False
            try:
                yield
            finally:
                if bars:
                    hf_logging.enable_progress_bar()
    finally:
        bnb_log.setLevel(bnb_level)
        if hid_bnb and sys.modules.get("bitsandbytes", 0) is None:
            del sys.modules["bitsandbytes"]
        if saved_env is None:
            os.environ.pop("DS_ACCELERATOR", None)
