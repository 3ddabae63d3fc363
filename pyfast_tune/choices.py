"""The names the training config accepts, in a leaf module that imports nothing heavy.

``pyfast_tune.config`` validates against these lists without importing torch or transformers
(loading a config, the CLI's help and the Rust-only install stay light); ``patch`` and
``export`` map the same names to what they run.

>>> from pyfast_tune.choices import ATTENTION_CHOICES, DTYPE_NAMES
>>> "op" in ATTENTION_CHOICES, DTYPE_NAMES["bf16"]
(True, 'bfloat16')
"""

from __future__ import annotations

# `attention: op`: the first-use guard races the backends that run here (see
# pyfast_tune.kernels.guard); a backend name: that one, checked by the guard but not raced
# (falls back if it fails). ("sdpa" is not among them: as an attention value it means the
# model's own stock SDPA.)
EXPLICIT_BACKENDS = ("triton", "cpp", "torch_varlen", "flash_attn")
# Our attention values -> the name each is registered under with transformers'
# AttentionInterface (pyfast_tune.patch registers them).
ATTENTION_NAMES = {
    "ref": "pyfast_varlen",
    "op": "pyfast_varlen_op",
    **{b: f"pyfast_varlen_{b}" for b in EXPLICIT_BACKENDS},
}
# Values of `attention` that leave the model's own attention in place (transformers' names).
# Training does not switch implementations for them: the model runs as it was loaded.
STOCK_ATTENTION = ("sdpa", "eager", "flash_attention_2", "flash_attention_3", "flex_attention")
# Every value the training config's `attention` accepts.
ATTENTION_CHOICES = (*ATTENTION_NAMES, *STOCK_ATTENTION)

# Floating-point dtype names (short and torch's own) -> torch's name; `export.DTYPES` maps them
# to torch dtypes.
DTYPE_NAMES = {
    "fp32": "float32",
    "float32": "float32",
    "bf16": "bfloat16",
    "bfloat16": "bfloat16",
    "fp16": "float16",
    "float16": "float16",
}

# bitsandbytes' 4-bit data types.
QUANT_TYPES = ("nf4", "fp4")

# Training objectives: next-token SFT, or a preference objective on packed pairs
# (pyfast_tune.trainer.objectives); `reward` trains a scalar head.
OBJECTIVES = ("sft", "dpo", "orpo", "simpo", "reward")
PREFERENCE_OBJECTIVES = OBJECTIVES[1:]
# `preference.loss_type` of `objective: dpo`, as TRL's DPOTrainer names them.
DPO_LOSS_TYPES = ("sigmoid", "ipo", "hinge", "robust", "sppo_hard", "nca_pair")
