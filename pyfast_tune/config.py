"""Training configuration: a YAML file plus ``--key value`` overrides, validated into dataclasses.

Every key has a command-line override; nested keys use dots::

    deepspeed pyfast_tune/train.py --config run.yaml --lr 1e-4 --lora.r 16 --data.template default

Values are parsed as YAML scalars (``--save_optimizer false`` is a bool, ``--lr 1e-4`` a float,
``--lora.target_modules [q_proj,v_proj]`` a list).

>>> cfg = load_config(None, ["--model", "m/", "--data", "packed/", "--lora.r", "4"])
>>> cfg.lora.r, cfg.method
(4, 'lora')
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

# Fixed choices live in a torch-free leaf: loading a config imports neither torch nor
# transformers. QUANT_TYPES stays importable from here.
from pyfast_tune.choices import (
    ATTENTION_CHOICES,
    ATTENTION_NAMES,
    DPO_LOSS_TYPES,
    DTYPE_NAMES,
    OBJECTIVES,
    QUANT_TYPES,
)


class ConfigError(ValueError):
    """A training config key is missing, unknown, of the wrong type or out of its choices."""


@dataclass
class LoraConfig:
    """peft LoRA settings; ``target_modules`` is a list of module names or ``all-linear``."""

    r: int = 8
    alpha: int = 16
    dropout: float = 0.05
    target_modules: Any = "all-linear"
    # modules trained in full beside the adapter and saved with it (peft's modules_to_save),
    # e.g. [embed_tokens, lm_head]; with new_special_tokens, unset means the two embeddings
    modules_to_save: list[str] | None = None


@dataclass
class QuantConfig:
    """bitsandbytes 4-bit settings for ``method: qlora``."""

    quant_type: str = "nf4"
    double_quant: bool = True
    compute_dtype: str = "auto"  # "auto" = the training dtype


@dataclass
class DataConfig:
    """Either ``path`` (a packed directory) or ``inputs`` to pack at start-up into ``cache_dir``."""

    path: str | None = None
    # Paths, or source mappings {path, format, columns, weight, max_samples, ...} mixed by
    # ratio (docs/workflow-mixing.md); passed to pack() as they are.
    inputs: list[str | dict] | None = None
    tokenizer: str | None = None
    format: str = "auto"
    # The prompt template. With ``path`` it is read from the packed directory (setting it only
    # checks that the directory was packed with it); with ``inputs`` unset means "default".
    template: str | None = None
    pack_seed: int = 0
    cache_dir: str | None = None  # default: <output_dir>/../.pyfast_cache
    skip_bad: bool = False
    verify: bool = True  # hash-check the packed directory at start-up (once per node per state)
    # Every other field of the engine's pack options (columns, min_length, file_type,
    # data_order, tokenizer_backend, rebuild_meta, ...) may be given as a data.<field> key; they
    # are collected here and passed to pack() with data.inputs.
    pack_options: dict = field(default_factory=dict)


# Pack options the training config sets elsewhere (top-level max_length, data.pack_seed, ...)
# or that only split or speed up the work, so they are not data.<field> keys.
_PACK_FIELDS_OWNED = {"inputs", "out_dir", "max_length", "seed", "threads", "shard"}


# pack()'s own arguments a data section may name too: the split (a name such as "test", unlike
# eval.split) and subset that choose the files of hf://datasets/... inputs.
_PACK_HUB_ARGS = {"split", "subset"}


def _pack_passthrough() -> set[str]:
    """The engine's pack options a ``data`` section may name directly: derived from PackConfig,
    so a field added to the engine is a training-config key without a change here."""
    from pyfast_tune.data import pack_defaults

    own = {f.name for f in dataclasses.fields(DataConfig)}
    return (set(pack_defaults()) | _PACK_HUB_ARGS) - _PACK_FIELDS_OWNED - own


@dataclass
class EvalConfig:
    """Evaluation during training (as XTuner's EvaluateChatHook and transformers' eval_steps):
    the loss on held-out data and greedy answers to fixed prompts, every ``steps`` optimizer
    steps and at the end. See pyfast_tune.trainer.evaluate."""

    data: str | None = None  # a packed directory, packed with the training tokenizer
    # or: this fraction of the training samples held out (chosen by data.pack_seed; 0 = none)
    split: float = 0.0
    steps: int = 0  # every N optimizer steps, and at the end; 0 = at the end only
    prompts: list[str] = field(default_factory=list)  # answered greedily, training template
    system: str | None = None  # the template's system text for the prompts
    max_new_tokens: int = 128
    at_start: bool = False  # also before the first step: the untrained model, as a baseline


@dataclass
class PreferenceConfig:
    """Settings of the preference objectives (``objective: dpo | orpo | simpo | reward``);
    see docs/workflow-preference.md. Names and defaults as TRL's configs."""

    beta: float = 0.1  # DPO's beta, ORPO's lambda, SimPO's beta
    loss_type: str = "sigmoid"  # dpo: sigmoid | ipo | hinge | robust | sppo_hard | nca_pair
    label_smoothing: float = 0.0  # dpo sigmoid/robust (cDPO), simpo
    gamma: float = 0.5  # SimPO's target reward margin (TRL's simpo_gamma)
    # dpo: policy (the starting weights: LoRA/QLoRA = adapters disabled, computed each step;
    # full = computed once before the first step) | precompute (the starting weights, computed
    # once before training, never in memory after) | a model path or Hub id (precomputed)
    reference: str = "policy"
    center_rewards_coefficient: float | None = None  # reward: c * (r_c + r_r)^2, as TRL's


@dataclass
class TrainConfig:
    """All training settings. See pyfast_tune/configs/*.yaml for commented examples."""

    model: str = ""
    tokenizer: str | None = None  # tokenizer files copied into checkpoints; default data's/model's
    trust_remote_code: bool = False
    dtype: str = "auto"  # auto = bfloat16 on GPU, float32 on CPU
    method: str = "lora"  # full | lora | qlora
    lora: LoraConfig = field(default_factory=LoraConfig)
    quant: QuantConfig = field(default_factory=QuantConfig)
    gradient_checkpointing: bool = True
    # Model set-up (pyfast_tune.trainer.model.model_setup): RoPE scaling as the model's config
    # class takes it ({type: linear|dynamic|yarn|llama3|..., factor: 4.0, ...}), a longer
    # max_position_embeddings, and special tokens added to the tokenizer (new embedding rows
    # = the mean of the existing ones).
    rope_scaling: dict | None = None
    max_position_embeddings: int | None = None
    new_special_tokens: list[str] = field(default_factory=list)
    # op (pyfast_tune.kernels: C++ on CPU, Triton on CUDA; falls back to ref with a warning when
    # it cannot build) | ref (PyTorch per-sample SDPA) | triton | cpp | torch_varlen | flash_attn |
    # sdpa, eager, ...: the model's own, unpatched, with transformers' masks from position_ids
    # (pyfast_tune.choices.ATTENTION_CHOICES; anything else is an error)
    attention: str = "op"
    fused_lora: bool = True
    # the LM head returns the loss (fused linear cross-entropy, never the tokens x vocabulary
    # logits); falls back to full logits with a warning where the model does not allow it
    fused_loss: bool = True
    data: DataConfig = field(default_factory=DataConfig)
    max_length: int = 4096
    deepspeed: str = "zero2"  # preset name (zero1 zero2 zero2_offload zero3 zero3_offload) or JSON
    max_steps: int | None = None
    epochs: int = 1
    lr: float = 2e-5
    lr_scheduler: str = "cosine"  # cosine | linear | constant
    warmup_steps: int = 0
    warmup_ratio: float = 0.0  # warm-up as a fraction of the run's steps (not with warmup_steps)
    min_lr_ratio: float = 0.0
    weight_decay: float = 0.0
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    adam_eps: float = 1e-8
    max_grad_norm: float = 1.0
    micro_batch_size: int = 1  # packs per rank per micro step, concatenated into one row
    grad_accum: int | None = None  # default 1, or derived from global_batch_size
    global_batch_size: int | None = None  # packs per optimizer step over all ranks
    loss_reduction: str = "token"  # token: mean over trained tokens of the global batch | sample
    # ranks that split each packed row (DeepSpeed-Ulysses); must divide the number of processes
    # and the model's attention heads; data-parallel size = processes / this
    sequence_parallel_size: int = 1
    seed: int = 0
    output_dir: str = "runs/run"
    save_steps: int = 0  # 0 = save only at the end
    save_total_limit: int | None = None  # keep the newest N checkpoints (never `latest`'s)
    save_optimizer: bool = True
    save_hf: bool = True  # HF-format weights/adapter + tokenizer in every checkpoint
    resume: Any = False  # false | true/"auto" (latest in output_dir) | a checkpoint dir
    log_steps: int = 1
    # loggers as in transformers: tensorboard | wandb | mlflow | none | a list; unset = tensorboard
    # (or none with the older `tensorboard: false`). WANDB_MODE=offline etc. are respected.
    report_to: Any = None
    tensorboard: bool = True
    progress_bar: bool = True  # a bar on a TTY; otherwise (and false) one line per log_steps
    show_dependency_warnings: bool = False  # dependencies' notices a user cannot act on
    peak_tflops: float | None = None  # per device, for MFU; default: a guess from the device
    stop_after_steps: int | None = None  # end the run early after this step (tests, budgets)
    eval: EvalConfig = field(default_factory=EvalConfig)  # evaluation during training
    # sft (next-token loss) | dpo | orpo | simpo | reward (preference packs: --format preference)
    objective: str = "sft"
    preference: PreferenceConfig = field(default_factory=PreferenceConfig)
    # LLaVA (docs/workflow-llava.md): `model` a LlavaForConditionalGeneration folder, or a
    # vision tower and an LLM joined by a new projector (XTuner's stage-1 layout); `freeze`
    # lists parts kept as they are (vision_tower, projector, llm; default [vision_tower]).
    vision_tower: str | None = None
    llm: str | None = None
    freeze: list[str] | None = None
    visual_select_layer: int = -2  # the tower layer whose features (CLS dropped) are projected


def _dataclass_from_dict(cls, values: dict, where: str = ""):
    fields = {f.name: f for f in dataclasses.fields(cls)}
    if cls is DataConfig:
        values = dict(values)
        passthrough = _pack_passthrough()
        options = dict(values.pop("pack_options", None) or {})
        options.update({k: values.pop(k) for k in sorted(set(values) & passthrough)})
        bad = sorted(set(options) - passthrough)
        if bad:
            raise ConfigError(
                f"unknown pack option(s) {', '.join(where + k for k in bad)}; "
                f"known: {', '.join(where + k for k in sorted(passthrough))}"
            )
        values["pack_options"] = options
    unknown = sorted(set(values) - set(fields))
    if unknown:
        known = list(fields) + (sorted(_pack_passthrough()) if cls is DataConfig else [])
        raise ConfigError(
            f"unknown config key(s) {', '.join(where + k for k in unknown)}; "
            f"known: {', '.join(where + k for k in known)}"
        )
    kwargs = {}
    for name, value in values.items():
        sub_cls = _NESTED.get((cls, name))
        if sub_cls is not None:
            if name == "data" and isinstance(value, str):
                value = {"path": value}
            if not isinstance(value, dict):
                raise ConfigError(f"config key {where}{name} must be a mapping, got {value!r}")
            value = _dataclass_from_dict(sub_cls, value, f"{where}{name}.")
        kwargs[name] = _coerce(value, str(fields[name].type), f"{where}{name}")
    return cls(**kwargs)


def _coerce(value, annotation: str, key: str):
    """YAML 1.1 reads ``1e-4`` as a string; numbers declared float/int are converted."""
    if not isinstance(value, str) or value == "":
        return value
    for kind, convert in (("float", float), ("int", int)):
        if annotation.split(" | ")[0] == kind:
            try:
                return convert(value)
            except ValueError:
                raise ConfigError(f"config key {key} must be a {kind}, got {value!r}") from None
    return value


_NESTED = {
    (TrainConfig, "lora"): LoraConfig,
    (TrainConfig, "quant"): QuantConfig,
    (TrainConfig, "data"): DataConfig,
    (TrainConfig, "eval"): EvalConfig,
    (TrainConfig, "preference"): PreferenceConfig,
}


def parse_overrides(argv: list[str]) -> dict:
    """``["--lr", "1e-4", "--lora.r=16"]`` -> ``{"lr": 1e-4, "lora": {"r": 16}}``.

    A flag without a value (followed by another flag or nothing) means true.
    """
    out: dict = {}
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--"):
            raise ConfigError(f"expected --key value, got {arg!r}")
        key = arg[2:]
        if "=" in key:
            key, raw = key.split("=", 1)
            i += 1
        elif i + 1 < len(argv) and not argv[i + 1].startswith("--"):
            raw = argv[i + 1]
            i += 2
        else:
            raw = "true"
            i += 1
        value = yaml.safe_load(raw) if raw != "" else ""
        node = out
        parts = key.replace("-", "_").split(".")
        for part in parts[:-1]:
            if part == "data" and isinstance(node.get(part), str):
                node[part] = {"path": node[part]}
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--{key}: {part} is not a mapping")
        if isinstance(value, str) and parts == ["data"] and isinstance(node.get("data"), dict):
            node["data"]["path"] = value
        else:
            node[parts[-1]] = value
    return out


def _merge(base: dict, over: dict) -> dict:
    merged = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        elif isinstance(value, dict) and key == "data" and isinstance(merged.get(key), str):
            merged[key] = _merge({"path": merged[key]}, value)
        else:
            merged[key] = value
    return merged


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> TrainConfig:
    """Read the YAML at ``path`` (if any), apply ``--key value`` overrides, validate."""
    values: dict = {}
    if path is not None:
        loaded = yaml.safe_load(Path(path).read_text())
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the config must be a YAML mapping")
        values = loaded or {}
    values = _merge(values, parse_overrides(overrides or []))
    cfg = _dataclass_from_dict(TrainConfig, values)
    validate(cfg)
    return cfg


def validate(cfg: TrainConfig) -> None:
    """Reject inconsistent settings with a message naming the key."""
    if cfg.vision_tower and not (cfg.llm or cfg.model):
        raise ConfigError("vision_tower needs `llm` (the language model it is joined to)")
    if cfg.vision_tower and not cfg.model:
        cfg.model = cfg.llm  # the LLM's config, tokenizer and name serve where a model's do
    if not cfg.model:
        raise ConfigError("config key `model` (a local model directory or Hub id) is required")
    if cfg.method not in ("full", "lora", "qlora"):
        raise ConfigError(f"method must be full, lora or qlora, got {cfg.method!r}")
    if cfg.loss_reduction not in ("token", "sample"):
        raise ConfigError(f"loss_reduction must be token or sample, got {cfg.loss_reduction!r}")
    if cfg.lr_scheduler not in ("cosine", "linear", "constant"):
        raise ConfigError(
            f"lr_scheduler must be cosine, linear or constant, got {cfg.lr_scheduler!r}"
        )
    _check_attention(cfg.attention)
    _check_dtypes(cfg)
    if (cfg.data.path is None) == (cfg.data.inputs is None):
        raise ConfigError("set exactly one of data.path (packed dir) and data.inputs (raw files)")
    if cfg.data.inputs is not None and not (cfg.data.tokenizer or cfg.tokenizer):
        raise ConfigError("data.inputs needs data.tokenizer (or tokenizer) to pack with")
    if isinstance(cfg.data.inputs, str):
        cfg.data.inputs = [cfg.data.inputs]
    if cfg.data.inputs is not None and cfg.data.template is None:
        cfg.data.template = "default"  # what `pack` uses when not told
    if cfg.data.path is not None and cfg.data.pack_options:
        raise ConfigError(
            f"data.{', data.'.join(sorted(cfg.data.pack_options))}: pack options apply to "
            "data.inputs; data.path is already packed"
        )
    if cfg.micro_batch_size < 1:
        raise ConfigError("micro_batch_size must be >= 1")
    if not _is_int(cfg.sequence_parallel_size) or cfg.sequence_parallel_size < 1:
        raise ConfigError(
            f"sequence_parallel_size must be an integer >= 1, got {cfg.sequence_parallel_size!r}"
        )
    if cfg.sequence_parallel_size > 1:
        if cfg.attention not in ATTENTION_NAMES:
            # The model's own attention would attend within each rank's shard only.
            raise ConfigError(
                f"sequence_parallel_size > 1 needs our attention (attention: one of "
                f"{', '.join(ATTENTION_NAMES)}), not the model's own {cfg.attention!r}"
            )
    resolve_report_to(cfg.report_to, cfg.tensorboard)  # names checked; libraries at start-up
    if cfg.log_steps < 1:
        raise ConfigError(f"log_steps must be >= 1, got {cfg.log_steps}")
    if cfg.max_steps is None and cfg.epochs < 1:
        raise ConfigError("set max_steps or epochs >= 1")
    _check_eval(cfg.eval)
    _check_model_setup(cfg)
    _check_objective(cfg)


def _check_objective(cfg: TrainConfig) -> None:
    if cfg.objective not in OBJECTIVES:
        raise ConfigError(
            f"objective must be one of {', '.join(OBJECTIVES)}; got {cfg.objective!r}"
        )
    p = cfg.preference
    for key in ("beta", "label_smoothing", "gamma"):
        value = getattr(p, key)
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise ConfigError(f"preference.{key} must be a number, got {value!r}")
    if p.beta <= 0:
        raise ConfigError(f"preference.beta must be > 0, got {p.beta}")
    if p.loss_type not in DPO_LOSS_TYPES:
        raise ConfigError(
            f"preference.loss_type must be one of {', '.join(DPO_LOSS_TYPES)}; got {p.loss_type!r}"
        )
    if cfg.objective == "dpo" and p.label_smoothing and p.loss_type not in ("sigmoid", "robust"):
        raise ConfigError(
            f"preference.label_smoothing applies to loss_type sigmoid or robust, not {p.loss_type}"
        )
    if not 0 <= p.label_smoothing < 0.5:
        raise ConfigError(
            f"preference.label_smoothing must be in [0, 0.5), got {p.label_smoothing}"
        )
    if not isinstance(p.reference, str) or not p.reference:
        raise ConfigError(
            f"preference.reference must be policy, precompute or a model path; got {p.reference!r}"
        )
    c = p.center_rewards_coefficient
    if c is not None and (not isinstance(c, (int, float)) or isinstance(c, bool) or c < 0):
        raise ConfigError(f"preference.center_rewards_coefficient must be >= 0, got {c!r}")
    if cfg.objective == "reward" and cfg.sequence_parallel_size > 1:
        raise ConfigError("objective reward does not support sequence_parallel_size > 1 yet")


def _check_model_setup(cfg: TrainConfig) -> None:
    """The types of the model set-up, run hygiene and LoRA extras (what the model's own config
    class accepts is checked when it is loaded, by pyfast_tune.trainer.model)."""
    if cfg.warmup_ratio and cfg.warmup_steps:
        raise ConfigError(
            f"set one of warmup_steps ({cfg.warmup_steps}) and warmup_ratio ({cfg.warmup_ratio})"
        )
    if not isinstance(cfg.warmup_ratio, (int, float)) or not 0 <= cfg.warmup_ratio < 1:
        raise ConfigError(f"warmup_ratio must be a number in [0, 1), got {cfg.warmup_ratio!r}")
    if cfg.save_total_limit is not None and (
        not _is_int(cfg.save_total_limit) or cfg.save_total_limit < 1
    ):
        raise ConfigError(
            f"save_total_limit must be an integer >= 1 (or unset: keep all), got "
            f"{cfg.save_total_limit!r}"
        )
    rope = cfg.rope_scaling
    if rope is not None:
        kind = rope.get("rope_type", rope.get("type")) if isinstance(rope, dict) else None
        if not isinstance(kind, str):
            raise ConfigError(
                f"rope_scaling must be a mapping with a type, e.g. {{type: linear, factor: 2.0}}; "
                f"got {rope!r}"
            )
    mpe = cfg.max_position_embeddings
    if mpe is not None and (not _is_int(mpe) or mpe < 1):
        raise ConfigError(f"max_position_embeddings must be an integer >= 1, got {mpe!r}")
    if isinstance(cfg.new_special_tokens, str):
        cfg.new_special_tokens = [cfg.new_special_tokens]
    tokens = cfg.new_special_tokens or []
    if not isinstance(tokens, list) or not all(isinstance(t, str) and t for t in tokens):
        raise ConfigError(f"new_special_tokens must be a list of non-empty strings, got {tokens!r}")
    if len(set(tokens)) != len(tokens):
        raise ConfigError(f"new_special_tokens lists a token twice: {tokens!r}")
    cfg.new_special_tokens = list(tokens)
    modules = cfg.lora.modules_to_save
    if isinstance(modules, str):
        modules = cfg.lora.modules_to_save = [modules]
    if modules is not None:
        if not isinstance(modules, list) or not all(isinstance(m, str) and m for m in modules):
            raise ConfigError(
                f"lora.modules_to_save must be a list of module names, got {modules!r}"
            )
        if cfg.method == "full":
            raise ConfigError("lora.modules_to_save applies to method lora or qlora; "
                              "method full trains every module already")  # fmt: skip


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_eval(ev: EvalConfig) -> None:
    if ev.data is not None and (not isinstance(ev.data, str) or not ev.data):
        raise ConfigError(f"eval.data must be a packed directory path, got {ev.data!r}")
    if not isinstance(ev.split, (int, float)) or isinstance(ev.split, bool):
        raise ConfigError(f"eval.split must be a number in [0, 1), got {ev.split!r}")
    if not 0 <= ev.split < 1:
        raise ConfigError(
            f"eval.split must be in [0, 1) (a fraction of the samples, 0 = none), got {ev.split}"
        )
    if ev.split and ev.data is not None:
        raise ConfigError("set one of eval.data (a packed directory) and eval.split, not both")
    if not _is_int(ev.steps) or ev.steps < 0:
        raise ConfigError(
            f"eval.steps must be an integer >= 0 (0 = at the end only), got {ev.steps!r}"
        )
    if ev.prompts is None:
        ev.prompts = []
    if isinstance(ev.prompts, str):
        ev.prompts = [ev.prompts]
    if not isinstance(ev.prompts, list) or not all(isinstance(q, str) and q for q in ev.prompts):
        raise ConfigError(f"eval.prompts must be a list of non-empty strings, got {ev.prompts!r}")
    if ev.system is not None and not isinstance(ev.system, str):
        raise ConfigError(f"eval.system must be a string, got {ev.system!r}")
    if not _is_int(ev.max_new_tokens) or ev.max_new_tokens < 1:
        raise ConfigError(f"eval.max_new_tokens must be an integer >= 1, got {ev.max_new_tokens!r}")
    if not isinstance(ev.at_start, bool):
        raise ConfigError(f"eval.at_start must be true or false, got {ev.at_start!r}")
    if (ev.steps or ev.at_start) and ev.data is None and not ev.split and not ev.prompts:
        raise ConfigError(
            "eval.steps or eval.at_start is set but there is nothing to evaluate: set "
            "eval.data, eval.split or eval.prompts"
        )


def _check_attention(value: str) -> None:
    # A typo must not train silently with the model's stock attention instead of ours.
    if value not in ATTENTION_CHOICES:
        raise ConfigError(f"attention must be one of {', '.join(ATTENTION_CHOICES)}; got {value!r}")


def _check_dtypes(cfg: TrainConfig) -> None:
    for key, value in (("dtype", cfg.dtype), ("quant.compute_dtype", cfg.quant.compute_dtype)):
        if value != "auto" and value not in DTYPE_NAMES:
            raise ConfigError(f"{key} must be auto, {', '.join(DTYPE_NAMES)}; got {value!r}")
    if cfg.quant.quant_type not in QUANT_TYPES:
        raise ConfigError(
            f"quant.quant_type must be one of {', '.join(QUANT_TYPES)}; got {cfg.quant.quant_type!r}"
        )


REPORTERS = ("tensorboard", "wandb", "mlflow")


def resolve_report_to(report_to, tensorboard: bool = True) -> list[str]:
    """The loggers a ``report_to`` value names, as in transformers: ``tensorboard``, ``wandb``,
    ``mlflow``, ``none`` or a list of them. Unset (None): ``tensorboard`` unless the older
    ``tensorboard: false`` switch is off."""
    if report_to is None:
        return ["tensorboard"] if tensorboard else []
    if not isinstance(report_to, (str, list, tuple)):
        raise ConfigError(f"report_to must be a logger name or a list of them, got {report_to!r}")
    names = [report_to] if isinstance(report_to, str) else list(report_to)
    out = []
    for name in names:
        if not isinstance(name, str) or name.lower() not in (*REPORTERS, "none"):
            raise ConfigError(
                f"report_to: unknown logger {name!r}; expected {', '.join(REPORTERS)}, none "
                "or a list of them"
            )
        name = name.lower()
        if name != "none" and name not in out:
            out.append(name)
    if "none" in [str(n).lower() for n in names] and out:
        raise ConfigError(f"report_to: 'none' cannot be combined with {out}")
    return out


def to_dict(cfg: TrainConfig) -> dict:
    """Plain dict of ``cfg`` (for saving next to checkpoints and metrics)."""
    return dataclasses.asdict(cfg)
