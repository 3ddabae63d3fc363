"""Build the model to train: full weights, peft LoRA, or QLoRA (bitsandbytes nf4 + LoRA)."""

from __future__ import annotations

import logging

import torch

from pyfast_tune.config import ConfigError

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(name: str) -> str:
    """``auto`` = bfloat16 on GPU, float32 on CPU (CPU half-precision training is slow and lossy)."""
    if name == "auto":
        return "bfloat16" if torch.cuda.is_available() else "float32"
    if name not in DTYPES:
        raise ConfigError(f"dtype must be auto, {', '.join(DTYPES)}; got {name!r}")
    return name


def _quantization_config(cfg, dtype: torch.dtype, float_storage: bool):
    from transformers import BitsAndBytesConfig

    compute = dtype if cfg.quant.compute_dtype == "auto" else DTYPES[cfg.quant.compute_dtype]
    extra = {}
    if float_storage:
        # ZeRO-3 partitions every parameter and needs them in one float dtype.
        extra["bnb_4bit_quant_storage"] = dtype
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=cfg.quant.quant_type,
        bnb_4bit_use_double_quant=cfg.quant.double_quant,
        bnb_4bit_compute_dtype=compute,
        **extra,
    )


def build_model(cfg, dtype_name: str, local_rank: int = 0, zero_stage: int = 0) -> torch.nn.Module:
    """Load ``cfg.model`` with ``from_pretrained`` and prepare it for ``cfg.method``.

    ``use_cache`` is off (a KV cache is useless in training and disables transformers' packed
    handling); ``trust_remote_code`` only when the config asks for it.
    """
    from transformers import AutoModelForCausalLM

    dtype = DTYPES[dtype_name]
    kwargs = {"dtype": dtype, "trust_remote_code": bool(cfg.trust_remote_code)}
    if cfg.method == "qlora":
        kwargs["quantization_config"] = _quantization_config(
            cfg, dtype, float_storage=zero_stage == 3
        )
        device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
        kwargs["device_map"] = {"": device}
    model = AutoModelForCausalLM.from_pretrained(cfg.model, **kwargs)
    model.config.use_cache = False

    def checkpointing():
        # Non-reentrant: works with frozen inputs and kwargs. transformers 5 renamed the API.
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable({"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable({"use_reentrant": False})

    if cfg.method == "full":
        if cfg.gradient_checkpointing:
            checkpointing()
        return model

    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if cfg.method == "qlora":
        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=cfg.gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
    elif cfg.gradient_checkpointing:
        checkpointing()
        # Frozen embeddings give activations without grad; checkpointed blocks need one.
        model.enable_input_require_grads()
    lora = LoraConfig(
        r=cfg.lora.r,
        lora_alpha=cfg.lora.alpha,
        lora_dropout=cfg.lora.dropout,
        target_modules=cfg.lora.target_modules,
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, lora)
    if cfg.method == "qlora":
        # prepare_model_for_kbit_training upcasts norms to fp32; keep trainable weights in dtype.
        for p in model.parameters():
            if p.requires_grad and p.dtype != dtype:
                p.data = p.data.to(dtype)
    return model


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; 4-bit weights count their unpacked elements."""
    trainable = total = 0
    for p in model.parameters():
        state = getattr(p, "quant_state", None)
        if state is not None:
            n = int(torch.Size(state.shape).numel())
        else:  # ZeRO-3 partitioned parameters are empty outside forward; ds_numel is the full size
            n = getattr(p, "ds_numel", p.numel())
        total += n
        if p.requires_grad:
            trainable += n
    return trainable, total
