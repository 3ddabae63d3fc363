"""Build the model to train: full weights, peft LoRA, or QLoRA (bitsandbytes nf4 + LoRA)."""

from __future__ import annotations

import logging

import torch

from pyfast_tune.choices import DTYPE_NAMES
from pyfast_tune.config import ConfigError

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(name: str) -> str:
    """``auto`` = bfloat16 on GPU, float32 on CPU (CPU half-precision training is slow and lossy)."""
    if name == "auto":
        return "bfloat16" if torch.cuda.is_available() else "float32"
    # The config accepts the short names too (bf16, fp16, fp32): one table maps both.
    if name not in DTYPE_NAMES:
        raise ConfigError(f"dtype must be auto, {', '.join(DTYPE_NAMES)}; got {name!r}")
    return DTYPE_NAMES[name]


def _quantization_config(cfg, dtype: torch.dtype, float_storage: bool):
    from transformers import BitsAndBytesConfig

    compute = (
        dtype if cfg.quant.compute_dtype == "auto" else DTYPES[DTYPE_NAMES[cfg.quant.compute_dtype]]
    )
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
    handling); ``trust_remote_code`` only when the config asks for it. The model set-up
    (``rope_scaling``, ``max_position_embeddings``, ``new_special_tokens``) is applied before
    LoRA wraps it and recorded as ``model.pyfast_tune_setup`` (checkpoints save it; convert,
    merge and chat apply the same set-up to the base model).
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    from pyfast_tune.trainer.model_setup import apply_to_config, model_setup, setup_vocab
    from pyfast_tune.vision.model import build_llava, is_llava

    if is_llava(cfg):  # a vision tower, projector and LLM: pyfast_tune.vision
        return build_llava(cfg, dtype_name, local_rank, zero_stage)

    setup = model_setup(cfg)
    dtype = DTYPES[dtype_name]
    kwargs = {"dtype": dtype, "trust_remote_code": bool(cfg.trust_remote_code)}
    if cfg.method == "qlora":
        kwargs["quantization_config"] = _quantization_config(
            cfg, dtype, float_storage=zero_stage == 3
        )
        device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
        kwargs["device_map"] = {"": device}
    config = AutoConfig.from_pretrained(cfg.model, trust_remote_code=bool(cfg.trust_remote_code))
    apply_to_config(config, setup)
    reward = getattr(cfg, "objective", "sft") == "reward"
    if reward:
        reward_head_config(config)
    auto = AutoModelForSequenceClassification if reward else AutoModelForCausalLM
    model = auto.from_pretrained(cfg.model, config=config, **kwargs)
    model.config.use_cache = False
    setup_vocab(model, setup)

    def checkpointing():
        # Non-reentrant: works with frozen inputs and kwargs. transformers 5 renamed the API.
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable({"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable({"use_reentrant": False})

    if cfg.method == "full":
        if cfg.gradient_checkpointing:
            checkpointing()
        model.pyfast_tune_setup = setup
        return model

    from peft import get_peft_model, prepare_model_for_kbit_training

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
    setup["modules_to_save"] = modules_to_save(cfg.lora.modules_to_save, model, setup)
    task = "SEQ_CLS" if reward else "CAUSAL_LM"  # SEQ_CLS trains and saves the `score` head
    model = get_peft_model(model, lora_config(cfg.lora, setup["modules_to_save"], task))
    if cfg.method == "qlora":
        # prepare_model_for_kbit_training upcasts norms to fp32; keep trainable weights in dtype.
        for p in model.parameters():
            if p.requires_grad and p.dtype != dtype:
                p.data = p.data.to(dtype)
    model.pyfast_tune_setup = setup
    return model


def reward_head_config(config) -> None:
    """A reward model's config: the causal LM's body with a new scalar head (``score``,
    ``num_labels`` 1), read at each sequence's last token that is not the pad id
    (``pyfast_tune.trainer.preference.score_positions``; transformers' rule, so the exported
    ``*ForSequenceClassification`` scores where training did). Without a pad id the EOS id is
    used, as TRL's reward models do when the tokenizer has no pad token."""
    config.num_labels = 1
    if getattr(config, "pad_token_id", None) is None:
        eos = getattr(config, "eos_token_id", None)
        config.pad_token_id = (eos[0] if isinstance(eos, list) else eos) if eos is not None else 0


def _embedding_names(model: torch.nn.Module) -> tuple[str | None, str | None, bool]:
    """(input embedding's module name, output embedding's, whether they share one weight)."""
    names = {id(m): n.rsplit(".", 1)[-1] for n, m in model.named_modules()}
    inp, out = model.get_input_embeddings(), model.get_output_embeddings()
    tied = out is not None and inp.weight is out.weight
    return names.get(id(inp)), names.get(id(out)) if out is not None else None, tied


def modules_to_save(configured, model: torch.nn.Module, setup: dict) -> list[str] | None:
    """``lora.modules_to_save``; unset with new special tokens: the embeddings (their new rows
    would stay at the mean otherwise), as LLaMA-Factory does when it resizes the vocabulary.
    Tied embeddings are one module (the input one; the head follows it, see lora_config)."""
    if configured is not None:
        return list(configured)
    if not setup.get("new_special_tokens"):
        return None
    inp, out, tied = _embedding_names(model)
    return [n for n in (inp, None if tied else out) if n]


def lora_config(lora, modules: list[str] | None, task_type: str = "CAUSAL_LM"):
    """peft's LoraConfig of a run (``lora``: the run's LoraConfig dataclass or its dict)."""
    import dataclasses

    from peft import LoraConfig

    get = lora.get if isinstance(lora, dict) else lambda k, d=None: getattr(lora, k, d)
    extra = {}
    if modules and "ensure_weight_tying" in {f.name for f in dataclasses.fields(LoraConfig)}:
        # Tied embeddings: the head uses the trained copy of the input embedding too (else
        # training sees an untied model that a saved, re-tied one would not reproduce).
        extra["ensure_weight_tying"] = True
    return LoraConfig(
        r=get("r", 8),
        lora_alpha=get("alpha", 16),
        lora_dropout=get("dropout", 0.05),
        target_modules=get("target_modules", "all-linear"),
        modules_to_save=list(modules) if modules else None,
        task_type=task_type,
        **extra,
    )


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
