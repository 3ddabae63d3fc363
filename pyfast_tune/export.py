"""From a training run to Hugging Face folders: ``convert`` a DeepSpeed checkpoint, ``merge`` an
adapter into its base model. No GPU, no process group, and no more memory than the weights.

    pyfast-tune convert runs/lora/ hf_adapter/            # newest checkpoint of the run
    pyfast-tune convert runs/full/checkpoints/step_00000200 hf_model/ --dtype bf16
    pyfast-tune merge models/base hf_adapter/ merged/ --dtype bf16

``convert`` rebuilds the weights from the DeepSpeed state itself (the fp32 master weights of
the optimizer partitions when they were saved, else the module weights), as DeepSpeed's
``zero_to_fp32`` does, but with ``torch.load(weights_only=True, mmap=True)``: the files are
read lazily (Adam's moments are never touched) and nothing in them is executed. The model's
parameters are built on the meta device and the rebuilt tensors assigned into them, so a full
model costs one fp32 copy of its weights (plus the cast copy with ``--dtype bf16|fp16``).
LoRA/QLoRA runs saved only the trainable weights (``exclude_frozen_parameters``): they become
a PEFT adapter folder for the run's base model.
"""

from __future__ import annotations

import json
import logging
import math
import re
import shutil
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch

from pyfast_tune.choices import DTYPE_NAMES
from pyfast_tune.trainer.torch_files import load_ds_file

log = logging.getLogger(__name__)

# The names are the config's (pyfast_tune.choices, torch-free); here, their torch dtypes.
DTYPES = {name: getattr(torch, torch_name) for name, torch_name in DTYPE_NAMES.items()}
RUN_FILE = "pyfast_tune.json"  # written next to the weights: the training template, for chat


def parse_dtype(name: str | None) -> torch.dtype | None:
    """``bf16|fp16|fp32`` (or the torch names) -> torch dtype; None keeps the run's dtype."""
    if name in (None, "", "auto"):
        return None
    if name not in DTYPES:
        raise ValueError(f"--dtype must be bf16, fp16 or fp32, got {name!r}")
    return DTYPES[name]


# --- locating a checkpoint -------------------------------------------------------------------


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint step directory from ``path``: the step dir itself, or a run's output_dir
    (or its ``checkpoints/``) whose ``latest`` pointer names the newest complete one."""
    from pyfast_tune.trainer.checkpoint import latest_checkpoint

    path = Path(path)
    if (path / "trainer_state.json").is_file():
        return path
    for run_dir in (path, path.parent if path.name == "checkpoints" else None):
        if run_dir is not None and (run_dir / "checkpoints" / "latest").is_file():
            found = latest_checkpoint(run_dir)
            if found is not None:
                return found
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such checkpoint or run directory")
    raise FileNotFoundError(
        f"{path}: neither a checkpoint (no trainer_state.json) nor a run's output_dir "
        "(no checkpoints/latest)"
    )


# --- reading DeepSpeed state safely ----------------------------------------------------------


def _rank_of(path: Path) -> int:
    m = re.search(r"zero_pp_rank_(\d+)_", path.name)
    return int(m.group(1)) if m else 0


def _numel(shape) -> int:
    return math.prod(int(x) for x in shape)


def load_zero_state(ds_dir: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Full (unpartitioned) fp32 weights saved in the DeepSpeed tag directory ``ds_dir``.

    Returns ``(state_dict, info)``: every parameter DeepSpeed saved (all of them, or only the
    trainable ones when saved with ``exclude_frozen_parameters``) plus persistent buffers and
    tied aliases; ``info`` has ``zero_stage``, ``world_size`` and ``source`` (``optimizer``:
    the fp32 master weights; ``module``: the module's own weights, used when ZeRO-1/2 state
    was saved without the optimizer).
    """
    ds_dir = Path(ds_dir)
    model_files = sorted(ds_dir.glob("*model_states.pt"), key=_rank_of)
    optim_files = sorted(ds_dir.glob("*optim_states.pt"), key=_rank_of)
    if not model_files:
        raise FileNotFoundError(f"{ds_dir}: no DeepSpeed *model_states.pt files")
    model_states = [load_ds_file(f) for f in model_files]
    first = model_states[0]
    buffer_names = set(first.get("buffer_names", []))
    state: dict[str, torch.Tensor] = OrderedDict(
        (k, v) for k, v in first["module"].items() if k in buffer_names
    )
    if not optim_files:
        if len(model_files) > 1:
            raise FileNotFoundError(
                f"{ds_dir}: ZeRO-3 checkpoint without *optim_states.pt: its weights live in "
                "the optimizer partitions, which are missing"
            )
        # ZeRO-1/2 saved without the optimizer: the module state holds the whole weights.
        state.update(first["module"])
        return state, {"zero_stage": None, "world_size": 1, "source": "module"}

    optim = [load_ds_file(f)["optimizer_state_dict"] for f in optim_files]
    stage = int(optim[0]["zero_stage"])
    world = optim[0]["partition_count"]
    world = max(world) if isinstance(world, list | tuple) else int(world)
    if world != len(optim_files):
        raise FileNotFoundError(
            f"{ds_dir}: {len(optim_files)} optimizer partition files for a world size of "
            f"{world}: a rank's files are missing or stale"
        )
    if stage <= 2:
        _zero12_params(state, first, [o["single_partition_of_fp32_groups"] for o in optim], world,
                       optim[0].get("param_alignment_paddings"))  # fmt: skip
    elif stage == 3:
        if len(model_states) != world:
            raise FileNotFoundError(
                f"{ds_dir}: {len(model_states)} model state files, {world} ranks"
            )
        _zero3_params(state, model_states, [o["fp32_flat_groups"] for o in optim], world)
    else:
        raise ValueError(f"{ds_dir}: unknown ZeRO stage {stage}")
    for alias, source in first.get("shared_params", {}).items():
        if source in state:
            state[alias] = state[source]
    return state, {"zero_stage": stage, "world_size": world, "source": "optimizer"}


def _zero12_params(state, model_state, rank_groups, world, paddings) -> None:
    """ZeRO-1/2: each param group is one flat fp32 vector cut into ``world`` equal partitions;
    parameters lie back to back in it (plus optional alignment padding after each)."""
    frozen = model_state.get("frozen_param_shapes") or {}
    fragments = model_state.get("frozen_param_fragments") or {}
    for name in frozen:
        state[name] = fragments[name]
    for g, shapes in enumerate(model_state["param_shapes"]):
        flat = torch.cat([groups[g] for groups in rank_groups])
        offset = 0
        for i, (name, shape) in enumerate(shapes.items()):
            n = _numel(shape)
            state[name] = flat.narrow(0, offset, n).view(*shape)
            offset += n + (paddings[g][i] if paddings is not None else 0)
        # DeepSpeed pads each group to a multiple of 2 * world_size elements.
        align = 2 * world
        if math.ceil(offset / align) != math.ceil(flat.numel() / align):
            raise ValueError(f"param group {g}: consumed {offset} of {flat.numel()} elements")


def _zero3_params(state, model_states, rank_groups, world) -> None:
    """ZeRO-3: every parameter is split into ``world`` equal (padded) parts, rank r holding
    part r; within a rank the parts follow parameter order across the flat groups."""

    def take(groups: list[torch.Tensor], start: int, n: int) -> torch.Tensor:
        pieces, pos = [], 0
        for flat in groups:
            lo, hi = max(start, pos), min(start + n, pos + flat.numel())
            if lo < hi:
                pieces.append(flat[lo - pos : hi - pos])
            pos += flat.numel()
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces)

    first = model_states[0]
    frozen = first.get("frozen_param_shapes") or {}
    for name, shape in frozen.items():
        parts = [ms["frozen_param_fragments"][name] for ms in model_states]
        state[name] = torch.cat(parts)[: _numel(shape)].view(*shape)
    offset = 0
    shapes = {k: v for group in first["param_shapes"] for k, v in group.items()}
    for name, shape in shapes.items():
        n = _numel(shape)
        part = math.ceil(n / world)
        full = torch.cat([take(groups, offset, part) for groups in rank_groups])
        state[name] = full[:n].view(*shape)
        offset += part
    available = sum(t.numel() for t in rank_groups[0])
    if offset != available:
        raise ValueError(f"ZeRO-3 partitions: consumed {offset} of {available} elements per rank")


# --- building HF folders ---------------------------------------------------------------------


def _run_config(ckpt: Path) -> dict:
    state = json.loads((ckpt / "trainer_state.json").read_text())
    cfg = state.get("config")
    if not cfg or not cfg.get("model"):
        raise ValueError(
            f"{ckpt}/trainer_state.json has no training config (not a pyfast-tune run?)"
        )
    return cfg


def _tokenizer_source(ckpt: Path, cfg: dict) -> Path | None:
    from pyfast_tune.trainer.checkpoint import TOKENIZER_FILES

    candidates = [ckpt / "hf", cfg.get("tokenizer"), (cfg.get("data") or {}).get("tokenizer"),
                  cfg.get("model")]  # fmt: skip
    for c in candidates:
        if c and any((Path(c) / n).is_file() for n in TOKENIZER_FILES):
            return Path(c)
        if c and Path(c).is_file() and Path(c).name == "tokenizer.json":
            return Path(c)
    return None


def run_setup(path: str | Path | None) -> dict | None:
    """The model set-up (rope, added tokens: pyfast_tune.trainer.model_setup) a folder's base
    needs: from ``convert``'s pyfast_tune.json, or for a checkpoint's ``hf/`` folder from its
    trainer_state.json. None when there is none to apply (or it is applied already)."""
    if path is None:
        return None
    d = Path(path)
    for f, key in ((d / RUN_FILE, "model_setup"), (d.parent / "trainer_state.json", "model_setup")):
        if f.is_file():
            return json.loads(f.read_text()).get(key)
    return None


def _empty_model(model_dir: str | Path, dtype: torch.dtype | None, trust_remote_code: bool,
                 setup: dict | None = None, reward: bool = False):  # fmt: skip
    """The architecture of ``model_dir`` with its parameters on the meta device (no memory),
    with the run's set-up (rope in the config, the grown vocabulary); ``reward``: its
    sequence-classification form (a reward run's scalar head).
    Buffers are real: non-persistent ones (rotary ``inv_freq``) are in no checkpoint."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    from pyfast_tune.trainer.model_setup import apply_to_config

    config = AutoConfig.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    if setup:
        apply_to_config(config, setup)
        if setup.get("tokens"):
            config.vocab_size = max(config.vocab_size, setup["tokens"])
    auto = AutoModelForCausalLM
    if reward:
        from pyfast_tune.trainer.model import reward_head_config

        reward_head_config(config)
        auto = AutoModelForSequenceClassification
    with init_empty_weights(include_buffers=False):
        return auto.from_config(
            config, dtype=dtype or torch.float32, trust_remote_code=trust_remote_code
        )


def _assign(model: torch.nn.Module, weights: dict[str, torch.Tensor], dtype) -> None:
    """Load ``weights`` into a meta-device ``model`` by assignment; every tensor must be set."""
    cast = {k: v.to(dtype).contiguous() if dtype else v.contiguous() for k, v in weights.items()}
    missing, unexpected = model.load_state_dict(cast, strict=False, assign=True)
    if unexpected:
        raise ValueError(f"checkpoint tensors the model does not have: {unexpected[:5]}")
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    still_meta = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if still_meta:
        raise ValueError(f"checkpoint lacks weights for {still_meta[:5]} (missing: {missing[:5]})")


def _write_generation_config(model, base: str | Path, out: Path, tokenizer_dir: Path | None):
    from transformers import GenerationConfig

    try:
        gen = GenerationConfig.from_pretrained(base)
    except OSError:
        gen = GenerationConfig.from_model_config(model.config)
    if tokenizer_dir is not None and (tokenizer_dir / "tokenizer_config.json").is_file():
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(tokenizer_dir)
        for key in ("eos_token_id", "bos_token_id", "pad_token_id"):
            if getattr(gen, key, None) is None and getattr(tok, key, None) is not None:
                setattr(gen, key, getattr(tok, key))
    gen.save_pretrained(out)


def run_template(ckpt: Path) -> str | None:
    """The template a checkpoint's run trained with: recorded by training; for checkpoints
    from before it was recorded, the packed directory's meta.json if it is still there (the
    config's data.template used to hold a default, not what the data was packed with)."""
    state = json.loads((ckpt / "trainer_state.json").read_text())
    if state.get("template"):
        return state["template"]
    meta = Path(state.get("packed_dir") or "/nonexistent") / "meta.json"
    if meta.is_file():
        return json.loads(meta.read_text()).get("template")
    data = (state.get("config") or {}).get("data")
    return data.get("template") if isinstance(data, dict) else None


def _write_run_file(out: Path, cfg: dict, ckpt: Path, setup: dict | None = None) -> None:
    template = run_template(ckpt)
    info = {"template": template, "base_model": cfg.get("model"), "method": cfg.get("method"),
            "objective": cfg.get("objective", "sft"),
            "checkpoint": str(ckpt) if ckpt else None}  # fmt: skip
    if setup and cfg.get("method") != "full":  # a full model's config and weights hold it
        info["model_setup"] = setup
    (out / RUN_FILE).write_text(json.dumps(info, indent=2) + "\n")


def _fresh_dir(out: Path) -> Path:
    """A temp dir beside ``out``; the caller renames it into place when complete."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    return tmp


def _publish(tmp: Path, out: Path) -> Path:
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out


def convert(
    checkpoint: str | Path,
    out_dir: str | Path,
    dtype: str | None = None,
    max_shard_size: str = "2GB",
) -> dict[str, Any]:
    """DeepSpeed checkpoint of a pyfast-tune run -> HF model folder, or PEFT adapter folder for
    LoRA/QLoRA runs. Written to a temp dir and renamed, so ``out_dir`` is never half-written.

    >>> convert("runs/lora", "adapter/")                   # doctest: +SKIP
    {'kind': 'adapter', 'step': 200, 'tensors': 28, ...}
    """
    from pyfast_tune.trainer.checkpoint import DS_TAG, copy_tokenizer_files

    ckpt = resolve_checkpoint(checkpoint)
    cfg = _run_config(ckpt)
    state = json.loads((ckpt / "trainer_state.json").read_text())
    step, setup = state["step"], state.get("model_setup")
    ds_dir = ckpt / "deepspeed" / DS_TAG
    weights, info = load_zero_state(ds_dir)
    out = Path(out_dir)
    torch_dtype = parse_dtype(dtype)
    trust = bool(cfg.get("trust_remote_code"))
    method = cfg.get("method", "full")
    reward = cfg.get("objective") == "reward"
    tok_src = _tokenizer_source(ckpt, cfg)
    tmp = _fresh_dir(out)
    try:
        with torch.no_grad():
            from pyfast_tune.vision.export import empty_llava, finish_folder, is_llava_run

            llava = is_llava_run(cfg)
            if method == "full":
                model = (empty_llava(cfg, torch_dtype) if llava
                         else _empty_model(cfg["model"], torch_dtype, trust, setup, reward))  # fmt: skip
                _assign(model, weights, torch_dtype)
                model.save_pretrained(tmp, max_shard_size=max_shard_size, safe_serialization=True)
                if not reward:
                    _write_generation_config(model, cfg["model"], tmp, tok_src)
                kind = "model"
            else:
                model = _adapter_model(cfg, trust, setup)
                _assign_adapter(model, weights, torch_dtype)
                # The base is on meta; new tokens' rows are rebuilt from it at load time.
                model.save_pretrained(tmp, safe_serialization=True, save_embedding_layers=False)
                kind = "adapter"
        copied = copy_tokenizer_files(tok_src, tmp)
        _add_missing_tokens(tmp, setup)
        if llava and kind == "model":  # <image> token and processors (pyfast_tune.vision)
            finish_folder(tmp, cfg)
        _write_run_file(tmp, cfg, ckpt, setup)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _publish(tmp, out)
    return {"kind": kind, "step": step, "checkpoint": str(ckpt), "tensors": len(weights),
            "tokenizer_files": copied, **info}  # fmt: skip


def _add_missing_tokens(folder: Path, setup: dict | None) -> None:
    """The run's added tokens in the exported tokenizer, when the copy came from a tokenizer
    without them (the run's tokenizer folder under its cache is gone)."""
    tokens = (setup or {}).get("new_special_tokens")
    if not tokens or not (folder / "tokenizer.json").is_file():
        return
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    if all(tok.token_to_id(t) is not None for t in tokens):
        return
    from pyfast_tune.trainer.model_setup import TOKENS_FILE, extend_tokenizer

    info = extend_tokenizer(folder, tokens, folder)
    (folder / TOKENS_FILE).unlink()
    if info["tokens"] != setup["tokens"]:
        raise ValueError(f"the tokenizer with {tokens} has {info['tokens']} tokens; the run "
                         f"trained with {setup['tokens']}: not the run's tokenizer")  # fmt: skip


def _adapter_model(cfg: dict, trust: bool, setup: dict | None = None):
    """The run's PeftModel (same LoRA config as training) on the meta device."""
    from peft import get_peft_model

    from pyfast_tune.trainer.model import lora_config
    from pyfast_tune.vision.export import empty_llava, is_llava_run

    reward = cfg.get("objective") == "reward"
    llava = is_llava_run(cfg)
    base = (
        empty_llava(cfg, None) if llava else _empty_model(cfg["model"], None, trust, setup, reward)
    )
    base.config.name_or_path = str(cfg["model"])
    modules = (setup or {}).get("modules_to_save", (cfg.get("lora") or {}).get("modules_to_save"))
    task = "SEQ_CLS" if reward else "CAUSAL_LM"
    lcfg = lora_config(cfg.get("lora") or {}, modules, task)
    if llava:  # the LLM's layers the run adapted, by full name (pyfast_tune.vision.model)
        lcfg.target_modules = (setup or {})["llava"]["lora_targets"]
    model = get_peft_model(base, lcfg)
    model.peft_config["default"].base_model_name_or_path = str(cfg["model"])
    return model


def _assign_adapter(model, weights: dict[str, torch.Tensor], dtype) -> None:
    """Assign the trained (LoRA) weights; the frozen base stays on meta and is not saved."""
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    given = set(weights) & trainable
    if given != trainable:
        missing = sorted(trainable - given)
        raise ValueError(
            f"checkpoint lacks {len(missing)} adapter weights (e.g. {missing[:3]}): was it trained "
            "with another LoRA config?"
        )
    cast = {k: (v.to(dtype) if dtype else v).contiguous() for k, v in weights.items() if k in given}
    aliases: dict[int, list[str]] = {}
    for name, t in model.state_dict(keep_vars=True).items():
        aliases.setdefault(id(t), []).append(name)
    model.load_state_dict(cast, strict=False, assign=True)
    # assign=True replaces a parameter under the name given only; a tied alias (peft's
    # modules_to_save of tied embeddings share one weight) must follow it or stay on meta.
    for names in aliases.values():
        source = next((n for n in names if n in cast), None)
        for name in names if source is not None else ():
            if name not in cast:
                owner, _, attr = name.rpartition(".")
                src_owner, _, src_attr = source.rpartition(".")
                value = getattr(model.get_submodule(src_owner), src_attr)
                setattr(model.get_submodule(owner), attr, value)


def merge(
    base: str | Path,
    adapter: str | Path,
    out_dir: str | Path,
    dtype: str | None = None,
    max_shard_size: str = "2GB",
    trust_remote_code: bool = False,
) -> dict[str, Any]:
    """Merge a LoRA adapter (from ``convert`` or a checkpoint's ``hf/``) into ``base``; save a
    plain HF model with the tokenizer files and generation config.

    The merge runs in float32 (a QLoRA run's adapter is merged into the unquantized base, as
    XTuner's merge does) and is cast to ``dtype`` at the end; default: the base's dtype.

    >>> merge("models/base", "adapter/", "merged/", dtype="bf16")   # doctest: +SKIP
    """
    from peft import PeftModel
    from transformers import AutoConfig

    from pyfast_tune.hub import resolve_tokenizer
    from pyfast_tune.trainer.checkpoint import copy_tokenizer_files
    from pyfast_tune.trainer.model_setup import load_base

    out = Path(out_dir)
    adapter_path = Path(adapter)
    # Before the work: a base named by its Hub id gives its tokenizer files from the Hub cache.
    tok_src = (
        adapter_path
        if (adapter_path / "tokenizer_config.json").is_file()
        else Path(resolve_tokenizer(base))
    )
    config = AutoConfig.from_pretrained(base, trust_remote_code=trust_remote_code)
    target = parse_dtype(dtype) or getattr(config, "dtype", None) or torch.float32
    if isinstance(target, str):
        target = DTYPES.get(target, torch.float32)
    # The run's rope settings and grown vocabulary go on the base first; the merged config
    # and weights then hold them, so plain from_pretrained loads the result.
    run = adapter_path / RUN_FILE
    reward = run.is_file() and json.loads(run.read_text()).get("objective") == "reward"
    model = load_base(base, run_setup(adapter_path), reward=reward, dtype=torch.float32,
                      trust_remote_code=trust_remote_code)  # fmt: skip
    model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    model = model.to(target)
    model.config.use_cache = True
    tmp = _fresh_dir(out)
    try:
        model.save_pretrained(tmp, max_shard_size=max_shard_size, safe_serialization=True)
        copied = copy_tokenizer_files(tok_src, tmp)
        if not reward:
            _write_generation_config(model, base, tmp, tok_src)
        from pyfast_tune.vision.export import finish_folder, is_llava_run

        if is_llava_run({"model": str(base)}):  # the base's image processors beside it
            finish_folder(tmp, {"model": str(base)})
        if run.is_file():
            info = json.loads(run.read_text())
            info.update(method="merged", adapter=str(adapter_path), base_model=str(base))
            info.pop("model_setup", None)  # applied: in the merged config and weights
            (tmp / RUN_FILE).write_text(json.dumps(info, indent=2) + "\n")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _publish(tmp, out)
    return {"dtype": str(target).removeprefix("torch."), "tokenizer_files": copied}
