"""The LLaVA model a run trains: a ``LlavaForConditionalGeneration`` loaded whole, or
assembled from ``vision_tower`` + ``llm`` with a new projector (XTuner's stage-1 layout: a
two-layer GELU MLP, features of ``visual_select_layer`` without the CLS token), then frozen
and adapted as the config asks.

Training runs Hugging Face's own modules. A forward pre-hook on the inner ``LlavaModel``
turns our packed-row inputs (``input_ids`` with -200 at image tokens, ``pixel_values``,
``image_starts``) into ``inputs_embeds``: the tower (bidirectional attention, its own
implementation; without gradients when frozen) -> the projector -> features written at each
image's rows; the language model then runs our varlen attention over the whole packed row and
the head computes the fused loss, as for any causal LM. The hook runs inside the model's
forward, so DeepSpeed's ZeRO-3 hooks gather the tower's and projector's weights as usual.
"""

from __future__ import annotations

import logging

import torch

from pyfast_tune.config import ConfigError

log = logging.getLogger(__name__)

PARTS = ("vision_tower", "projector", "llm")
# module name prefixes of each part inside LlavaForConditionalGeneration
_PREFIXES = {
    "vision_tower": ("model.vision_tower.",),
    "projector": ("model.multi_modal_projector.",),
    "llm": ("model.language_model.", "lm_head."),
}
_HOOKED = "_pyfast_image_hook"


def is_llava(cfg) -> bool:
    """Whether a training config trains a vision-language model (``vision_tower`` set, or
    ``model`` a LLaVA folder)."""
    if getattr(cfg, "vision_tower", None):
        return True
    if not cfg.model:
        return False
    try:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(
            cfg.model, trust_remote_code=bool(cfg.trust_remote_code)
        )
    except (OSError, ValueError):
        return False
    return getattr(config, "model_type", None) == "llava"


def part_of(name: str) -> str | None:
    """Which part (``vision_tower``, ``projector``, ``llm``) a parameter or module name of a
    (possibly peft-wrapped) LlavaForConditionalGeneration belongs to."""
    for part, prefixes in _PREFIXES.items():
        for p in prefixes:
            if name.startswith(p) or f".{p}" in f".{name}":
                return part
    return None


def llava_config(
    vision_config, text_config, select_layer: int = -2, image_token_id: int | None = None
):
    """A LlavaConfig joining a vision tower's and an LLM's configs, with XTuner's projector
    (GELU, biases) and feature choice (``select_layer``, CLS dropped)."""
    from transformers import LlavaConfig

    from pyfast_tune.vision.images import image_token_count

    config = LlavaConfig(
        image_seq_length=image_token_count(vision_config),
        vision_config=vision_config.to_dict(),
        text_config=text_config.to_dict(),
        vision_feature_layer=select_layer,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
        multimodal_projector_bias=True,
        image_token_id=image_token_id if image_token_id is not None else text_config.vocab_size,
    )
    config.tie_word_embeddings = bool(getattr(text_config, "tie_word_embeddings", False))
    return config


def assemble(vision_tower: str, llm: str, dtype: torch.dtype, select_layer: int = -2,
             seed: int = 0, quantization_config=None, device_map=None):  # fmt: skip
    """LlavaForConditionalGeneration from a vision tower folder (CLIP, or a model with a
    ``vision_config``) and a causal LM folder; the projector is new (seeded)."""
    from transformers import (
        AutoConfig,
        AutoModelForCausalLM,
        CLIPVisionModel,
        LlavaForConditionalGeneration,
    )

    tower_cfg = AutoConfig.from_pretrained(vision_tower)
    tower_cfg = getattr(tower_cfg, "vision_config", tower_cfg)
    tower = CLIPVisionModel.from_pretrained(vision_tower, config=tower_cfg, dtype=dtype)
    extra = {}
    if quantization_config is not None:
        extra = {"quantization_config": quantization_config, "device_map": device_map}
    lm = AutoModelForCausalLM.from_pretrained(llm, dtype=dtype, **extra)
    config = llava_config(tower.config, lm.config, select_layer)
    model = LlavaForConditionalGeneration(_shell_config(config))
    model.config = model.model.config = config
    model.model.vision_tower = tower
    model.model.language_model = lm.model
    model.lm_head = lm.lm_head
    # The sub-models keep their own config objects: make the composite's point at them, so
    # set_attn_implementation and save_pretrained see the configs the modules read.
    model.config.vision_config = tower.config
    model.config.text_config = lm.config
    gen = torch.Generator().manual_seed(seed)
    from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

    projector = LlavaMultiModalProjector(config)
    with torch.no_grad():
        for m in (projector.linear_1, projector.linear_2):
            # transformers' own init for new Linear layers: normal(0, initializer_range), 0 bias
            std = float(getattr(lm.config, "initializer_range", 0.02))
            m.weight.copy_(torch.randn(m.weight.shape, generator=gen) * std)
            m.bias.zero_()
    model.model.multi_modal_projector = projector.to(dtype)
    if device_map is not None:  # QLoRA: the quantized LLM's device
        model.model.multi_modal_projector.to(next(lm.parameters()).device)
    return model


def _shell_config(config):
    """``config`` with the smallest tower and LLM: the container whose parts ``assemble``
    replaces is built cheaply (and under ZeRO-3's zero.Init without real sizes)."""
    from transformers import LlavaConfig

    text = type(config.text_config)(hidden_size=8, intermediate_size=8, num_hidden_layers=1,
                                    num_attention_heads=1, num_key_value_heads=1, vocab_size=8)  # fmt: skip
    vision = type(config.vision_config)(hidden_size=8, intermediate_size=8, num_hidden_layers=1,
                                        num_attention_heads=1, image_size=config.vision_config.image_size,
                                        patch_size=config.vision_config.patch_size)  # fmt: skip
    return LlavaConfig(vision_config=vision.to_dict(), text_config=text.to_dict())


def freeze_parts(model: torch.nn.Module, parts) -> None:
    """``requires_grad_(False)`` on every parameter of the named parts."""
    for name, p in model.named_parameters():
        if part_of(name) in parts:
            p.requires_grad_(False)


def lora_targets(model: torch.nn.Module, configured) -> list[str]:
    """Full names of the Linear layers LoRA adapts: ``configured`` (``all-linear`` or module
    names) resolved inside the language model only — the tower and projector are never
    adapted by a bare name such as ``q_proj`` (CLIP has one too) — plus the vision tower's
    layers when the list names ``vision_tower``."""
    names = ["all-linear"] if configured in (None, "all-linear") else list(configured)
    parts = {"llm"} | ({"vision_tower"} if "vision_tower" in names else set())
    wanted = {n for n in names if n not in ("vision_tower", "all-linear")}
    every = "all-linear" in names or not wanted
    out = []
    for name, m in model.named_modules():
        if not isinstance(m, torch.nn.Linear) or name == "lm_head" or part_of(name) not in parts:
            continue
        if every or name.rsplit(".", 1)[-1] in wanted:
            out.append(name)
    if not out:
        raise ConfigError(f"lora.target_modules {configured!r} matches no Linear layer of the LLM")
    return out


def _image_features(inner, pixel_values: torch.Tensor) -> torch.Tensor:
    """(n, 3, H, W) -> (n, N, D_text) by the LlavaModel ``inner``'s own tower (its own
    attention, no packing kwargs), selected layer without CLS, and projector; without
    gradients through a frozen tower."""
    config = inner.config
    tower = inner.vision_tower
    frozen = not any(p.requires_grad for p in tower.parameters())
    with torch.set_grad_enabled(torch.is_grad_enabled() and not frozen):
        out = tower(pixel_values.to(next(tower.parameters()).dtype), output_hidden_states=True)
        feats = out.hidden_states[config.vision_feature_layer]
        if config.vision_feature_select_strategy == "default":
            feats = feats[:, 1:]
    return inner.multi_modal_projector(feats)


def install_image_hook(model: torch.nn.Module) -> None:
    """Register the forward pre-hook described in the module doc on the LlavaModel inside
    ``model`` (plain or peft-wrapped). Idempotent."""
    from transformers import LlavaForConditionalGeneration

    hf = next(m for m in model.modules() if isinstance(m, LlavaForConditionalGeneration))
    inner = hf.model
    if getattr(inner, _HOOKED, False):
        return

    def hook(module, args, kwargs):
        pixel_values = kwargs.pop("pixel_values", None)
        starts = kwargs.pop("image_starts", None)
        input_ids = kwargs.get("input_ids")
        if starts is None or input_ids is None:
            return args, dict(kwargs, pixel_values=pixel_values)
        kwargs["input_ids"] = None
        embed = module.get_input_embeddings()
        embeds = embed(input_ids.clamp(min=0))  # (1, T, D); image rows replaced below
        # the hooked module's own parts: a deepcopy of the model runs its copies
        feats = _image_features(module, pixel_values)  # (n, N, D)
        n_tokens = feats.shape[1]
        seq = embeds.shape[1]
        keep = starts + n_tokens <= seq  # a probe on the row's first tokens keeps what fits
        if len(starts) and bool(keep.any()):
            rows = (starts[keep][:, None] + torch.arange(n_tokens, device=starts.device)).reshape(
                -1
            )
            embeds = embeds.clone()
            embeds[0, rows] = (
                feats[: len(starts)][keep].reshape(-1, feats.shape[-1]).to(embeds.dtype)
            )
        # Every parameter of the tower and projector takes part in every forward (a blank
        # image when the batch has none), so ZeRO-3 ranks gather the same weights in step.
        embeds = embeds + 0.0 * feats.sum().to(embeds.dtype)
        kwargs["inputs_embeds"] = embeds
        return args, kwargs

    inner.register_forward_pre_hook(hook, with_kwargs=True)
    setattr(inner, _HOOKED, True)


def default_freeze(cfg) -> list[str]:
    """``freeze`` as given, else XTuner's stage 2: the tower frozen (adapted only when
    ``lora.target_modules`` names it), the LLM trained (full or LoRA) and the projector."""
    if cfg.freeze is not None:
        bad = sorted(set(cfg.freeze) - set(PARTS))
        if bad:
            raise ConfigError(f"freeze: unknown part(s) {bad}; known: {list(PARTS)}")
        return list(cfg.freeze)
    return ["vision_tower"]


def build_llava(cfg, dtype_name: str, local_rank: int = 0, zero_stage: int = 0) -> torch.nn.Module:
    """The LLaVA model of a run, frozen and adapted as ``cfg`` says (see the module doc)."""
    from transformers import LlavaForConditionalGeneration

    from pyfast_tune.trainer.model import DTYPES, _quantization_config, lora_config

    dtype = DTYPES[dtype_name]
    freeze = default_freeze(cfg)
    quant, device_map = None, None
    if cfg.method == "qlora":
        quant = _quantization_config(cfg, dtype, float_storage=zero_stage == 3)
        # 4-bit LLM only: the tower, projector and head stay in dtype (XTuner's llm-only QLoRA)
        # Names for both matching rules: older transformers test a substring, 5.x matches
        # from the start of the module's full name or as a suffix (so "vision_tower" alone
        # misses "model.vision_tower.…" and the tower and projector were quantised).
        parts = ("vision_tower", "multi_modal_projector")
        quant.llm_int8_skip_modules = [*parts, *(rf".*\.{p}" for p in parts), "lm_head"]
        device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
        device_map = {"": device}
    if cfg.vision_tower:
        model = assemble(cfg.vision_tower, cfg.llm or cfg.model, dtype, cfg.visual_select_layer,
                         cfg.seed, quant, device_map)  # fmt: skip
    else:
        extra = {"quantization_config": quant, "device_map": device_map} if quant else {}
        model = LlavaForConditionalGeneration.from_pretrained(cfg.model, dtype=dtype, **extra)
    model.config.use_cache = False
    model.config.text_config.use_cache = False
    if cfg.gradient_checkpointing:
        lm = model.model.language_model  # the tower runs once per image: not checkpointed
        if hasattr(lm, "activation_checkpointing_enable"):  # transformers 5's name
            lm.activation_checkpointing_enable({"use_reentrant": False})
        else:
            lm.gradient_checkpointing_enable({"use_reentrant": False})
    if cfg.method == "full":
        freeze_parts(model, freeze)
    else:
        from peft import get_peft_model

        targets = lora_targets(model, cfg.lora.target_modules)
        freeze_parts(model, PARTS)
        save = None if "projector" in freeze else ["multi_modal_projector"]
        lcfg = lora_config(cfg.lora, save)  # CAUSAL_LM: peft's generate/forward wrapper
        lcfg.target_modules = targets
        model = get_peft_model(model, lcfg)
    install_image_hook(model)
    from pyfast_tune.trainer.model_setup import model_setup

    setup = model_setup(cfg)
    setup["llava"] = {"freeze": freeze, "select_layer": model_select_layer(model),
                      "lora_targets": None if cfg.method == "full" else targets}  # fmt: skip
    if cfg.method != "full":
        setup["modules_to_save"] = save
    model.pyfast_tune_setup = setup
    trainable = sorted(
        {part_of(n) for n, p in model.named_parameters() if p.requires_grad} - {None}
    )
    log.info("LLaVA: training %s (frozen: %s)", trainable or "nothing", freeze)
    if not trainable:
        raise ConfigError("freeze leaves nothing to train")
    return model


def llava_class_for(model_dir) -> type | None:
    """LlavaForConditionalGeneration when ``model_dir`` holds a LLaVA model, else None (no
    Auto class for causal LMs takes a LlavaConfig)."""
    import json
    from pathlib import Path

    f = Path(model_dir) / "config.json"
    if not f.is_file() or json.loads(f.read_text()).get("model_type") != "llava":
        return None
    from transformers import LlavaForConditionalGeneration

    return LlavaForConditionalGeneration


def model_select_layer(model) -> int:
    from transformers import LlavaForConditionalGeneration

    hf = next(m for m in model.modules() if isinstance(m, LlavaForConditionalGeneration))
    return hf.config.vision_feature_layer
