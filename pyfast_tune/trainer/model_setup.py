"""Model set-up as XTuner and LLaMA-Factory do it, recorded so every export repeats it.

- ``rope_scaling`` / ``max_position_embeddings``: written into the model's config before the
  model is built (its rotary embedding reads them at construction), so a run can go past the
  model's native length, as XTuner's ``_prepare_for_long_context_training`` does. The types a
  config class accepts are transformers' own (the RoPE types it has a validator for).
- ``new_special_tokens``: added to the tokenizer once (a tokenizer folder under the run's
  cache, which packing, evaluation and checkpoints then use), and the embeddings grown to the
  new tokenizer length with the new rows set to the mean of the existing ones (XTuner's
  ``smart_tokenizer_and_embedding_resize``; transformers' own ``mean_resizing`` samples
  around the mean instead, so it is not used). The rows are a pure function of the base
  weights, so ``convert``/``merge``/``chat`` rebuild them from the base exactly.

The set-up is a plain dict (:func:`model_setup`) that checkpoints store in trainer_state.json
and ``convert`` in ``pyfast_tune.json``.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
from pathlib import Path

import torch

from pyfast_tune.config import ConfigError

log = logging.getLogger(__name__)

TOKENS_FILE = "pyfast_tune_tokens.json"  # in a tokenizer folder made by prepare_tokenizer
_NEEDS_ORIGINAL = ("yarn", "llama3", "longrope")  # types that scale from the native length


def _tokenizer_dir(tokenizer: str | Path) -> Path:
    p = Path(tokenizer)
    return p.parent if p.is_file() else p


def _token_count(tokenizer_dir: Path) -> int:
    """len(tokenizer) as transformers counts it: the vocabulary plus added tokens."""
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json")).get_vocab_size(True)


def prepare_tokenizer(cfg, tokenizer: str, cache_dir: Path) -> str:
    """The tokenizer of the run: ``tokenizer`` itself, or with ``cfg.new_special_tokens`` a
    copy with them added, made once per node under ``cache_dir`` (file lock, temp dir and
    rename) and keyed by the source's hash and the tokens. ``cfg.tokenizer`` (and, for raw
    inputs, ``cfg.data.tokenizer``) then name it, so the data is packed with the new tokens.

    A ``data.path`` directory was packed before: the tokenizer it records must already hold
    every new token at the id the extended tokenizer gives it (else its ids would disagree
    with the model's rows); pack with the folder this function writes, or use data.inputs."""
    tokens = list(cfg.new_special_tokens or [])
    if not tokens:
        return tokenizer
    from pyfast_tune.data import tokenizer_hash

    src = _tokenizer_dir(tokenizer)
    key = hashlib.blake2b(
        json.dumps([tokenizer_hash(tokenizer), tokens]).encode(), digest_size=12
    ).hexdigest()
    cache_dir.mkdir(parents=True, exist_ok=True)
    out = cache_dir / f"tokenizer-{key}"
    with open(cache_dir / f".tokenizer-{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (out / TOKENS_FILE).is_file():
            tmp = cache_dir / f".tmp-tokenizer-{key}-{os.getpid()}"
            shutil.rmtree(tmp, ignore_errors=True)
            extend_tokenizer(src, tokens, tmp)
            shutil.rmtree(out, ignore_errors=True)
            os.replace(tmp, out)
    if cfg.data.path is not None:
        _check_packed_tokens(Path(cfg.data.path), out, tokens)
    cfg.tokenizer = str(out)
    if cfg.data.inputs is not None:
        cfg.data.tokenizer = str(out)
    log.info("new_special_tokens %s: tokenizer %s", tokens, out)
    return str(out)


def extend_tokenizer(src: str | Path, tokens: list[str], out: str | Path) -> dict:
    """Save ``src`` with ``tokens`` added as special tokens at ``out``; returns (and writes
    there as TOKENS_FILE) ``{"base_tokens": len before, "tokens": len after, "added": [...]}``."""
    from tokenizers import AddedToken
    from transformers import AutoTokenizer

    out = Path(out)
    tok = AutoTokenizer.from_pretrained(str(_tokenizer_dir(src)))
    base = len(tok)
    # Special added tokens (never split, not normalized); add_tokens keeps one spelling across
    # transformers 4 and 5 (add_special_tokens' list key was renamed between them).
    tok.add_tokens([AddedToken(t, special=True, normalized=False) for t in tokens],
                   special_tokens=True)  # fmt: skip
    tok.save_pretrained(str(out))
    info = {"base_tokens": base, "tokens": len(tok), "added": tokens,
            "ids": {t: tok.convert_tokens_to_ids(t) for t in tokens}}  # fmt: skip
    (out / TOKENS_FILE).write_text(json.dumps(info, indent=2) + "\n")
    return info


def _check_packed_tokens(packed_dir: Path, extended: Path, tokens: list[str]) -> None:
    from tokenizers import Tokenizer

    meta = json.loads((packed_dir / "meta.json").read_text())
    recorded = (meta.get("tokenizer") or {}).get("path")
    src = _tokenizer_dir(recorded) if recorded else None
    if src is None or not (src / "tokenizer.json").is_file():
        raise ConfigError(
            f"new_special_tokens: {packed_dir} was packed with tokenizer {recorded!r}, which is "
            f"not there to check for {tokens}: use data.inputs (packed with the new tokens) or "
            f"re-pack with --tokenizer {extended}"
        )
    ids = json.loads((extended / TOKENS_FILE).read_text())["ids"]
    packed = Tokenizer.from_file(str(src / "tokenizer.json"))
    wrong = {t: packed.token_to_id(t) for t in tokens if packed.token_to_id(t) != ids[t]}
    if wrong:
        raise ConfigError(
            f"new_special_tokens: {packed_dir} was packed with {src}, where "
            f"{', '.join(_describe(t, i) for t, i in wrong.items())} (the model gives them "
            f"ids {[ids[t] for t in wrong]}): text with them was split into other tokens; use "
            f"data.inputs or re-pack with --tokenizer {extended}"
        )


def _describe(token: str, i: int | None) -> str:
    return f"{token!r} is no token" if i is None else f"{token!r} is id {i}"


def model_setup(cfg) -> dict:
    """The set-up of a run as a plain dict (``cfg``: a TrainConfig after prepare_tokenizer)."""
    setup = {
        "rope_scaling": dict(cfg.rope_scaling) if cfg.rope_scaling else None,
        "max_position_embeddings": cfg.max_position_embeddings,
        "new_special_tokens": list(cfg.new_special_tokens or []),
    }
    if setup["new_special_tokens"]:
        info_file = _tokenizer_dir(cfg.tokenizer or "") / TOKENS_FILE
        if not info_file.is_file():
            raise ConfigError("new_special_tokens: the tokenizer was not prepared "
                              "(pyfast_tune.trainer.model_setup.prepare_tokenizer)")  # fmt: skip
        info = json.loads(info_file.read_text())
        setup.update(base_tokens=info["base_tokens"], tokens=info["tokens"])
    return setup


def rope_types(config) -> list[str] | None:
    """The RoPE types ``config``'s class accepts (None: the model has no rotary embedding)."""
    if not (getattr(config, "rope_parameters", None) or hasattr(config, "rope_theta")):
        return None
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    kinds = {"default", *ROPE_INIT_FUNCTIONS}
    if hasattr(config, "validate_rope"):  # transformers 5: a validator per accepted type
        kinds = {k for k in kinds if hasattr(config, f"_validate_{k}_rope_parameters")}
    return sorted(kinds)


def apply_to_config(config, setup: dict) -> None:
    """Write the set-up's ``rope_scaling`` and ``max_position_embeddings`` into ``config``
    (before the model is built from it); what the config class rejects is a ConfigError."""
    rope, longest = setup.get("rope_scaling"), setup.get("max_position_embeddings")
    model_type = getattr(config, "model_type", type(config).__name__)
    if rope:
        kind = rope.get("rope_type", rope.get("type"))
        accepted = rope_types(config)
        if accepted is None:
            raise ConfigError(f"rope_scaling: {model_type} models have no rotary position "
                              "embedding to scale")  # fmt: skip
        if kind not in accepted:
            raise ConfigError(
                f"rope_scaling type {kind!r} is not one {type(config).__name__} accepts: "
                f"{', '.join(accepted)}"
            )
        params = {k: v for k, v in rope.items() if k != "type"}
        params["rope_type"] = kind
        if kind in _NEEDS_ORIGINAL:
            params.setdefault("original_max_position_embeddings", config.max_position_embeddings)
        try:
            if hasattr(config, "validate_rope"):  # transformers 5: rope_parameters
                current = dict(getattr(config, "rope_parameters", None) or {})
                if any(isinstance(v, dict) for v in current.values()):
                    raise ConfigError(f"rope_scaling: {model_type} has a RoPE per layer type "
                                      f"({current}); set it in the model's config.json")  # fmt: skip
                theta = current.get("rope_theta", getattr(config, "rope_theta", None))
                config.rope_parameters = {**({"rope_theta": theta} if theta else {}), **params}
                config.validate_rope()
            else:  # transformers 4: rope_scaling beside rope_theta
                from transformers.modeling_rope_utils import rope_config_validation

                config.rope_scaling = params
                rope_config_validation(config)
        except (KeyError, ValueError, TypeError) as e:
            if isinstance(e, ConfigError):
                raise
            raise ConfigError(f"rope_scaling {rope}: {model_type} rejects it: {e}") from None
    if longest:
        if not hasattr(config, "max_position_embeddings"):
            raise ConfigError(f"max_position_embeddings: {model_type} configs have no such key")
        config.max_position_embeddings = int(longest)


def _embedding_weights(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    weights = [model.get_input_embeddings().weight]
    out = model.get_output_embeddings()
    if out is not None and out.weight is not weights[0]:
        weights.append(out.weight)
    return weights


def setup_vocab(model: torch.nn.Module, setup: dict) -> None:
    """Grow the embeddings to the extended tokenizer's length (never shrink them) and set the
    new tokens' rows, input and output (tied: once), to the mean of the base tokens' rows."""
    base, total = setup.get("base_tokens"), setup.get("tokens")
    if not setup.get("new_special_tokens") or total is None or total <= base:
        return
    weight = model.get_input_embeddings().weight
    rows = int(getattr(weight, "ds_shape", weight.shape)[0])
    if total > rows:
        model.resize_token_embeddings(total, mean_resizing=False)
    first = min(base, rows)  # tokens added into a padded vocabulary reuse its spare rows
    weights = _embedding_weights(model)
    gather = _gathered(weights)
    with gather, torch.no_grad():
        if _rank() == 0 or gather is _NO_GATHER:
            for w in weights:
                w[first:total] = w[:first].float().mean(0).to(w.dtype)


class _NoGather:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


_NO_GATHER = _NoGather()


def _gathered(weights):
    """ZeRO-3 partitions the embeddings at load: gather them, rank 0 edits, then re-partition."""
    if not any(hasattr(w, "ds_id") for w in weights):
        return _NO_GATHER
    import deepspeed

    return deepspeed.zero.GatheredParameters(weights, modifier_rank=0)


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_initialized() else 0


def load_base(model_dir, setup: dict | None, reward: bool = False, **kwargs):
    """``from_pretrained(model_dir)`` with a run's set-up applied (config, then vocabulary):
    the base an adapter of that run goes on, or what ``merge`` merges it into. ``reward``:
    the sequence-classification model of a reward run (``objective: reward``)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    from pyfast_tune.vision.model import llava_class_for

    auto = AutoModelForSequenceClassification if reward else AutoModelForCausalLM
    auto = llava_class_for(model_dir) or auto  # a LLaVA folder: LlavaForConditionalGeneration
    if not setup and not reward:
        return auto.from_pretrained(model_dir, **kwargs)
    trust = bool(kwargs.get("trust_remote_code"))
    config = AutoConfig.from_pretrained(model_dir, trust_remote_code=trust)
    apply_to_config(config, setup or {})
    if reward:
        from pyfast_tune.trainer.model import reward_head_config

        reward_head_config(config)
    model = auto.from_pretrained(model_dir, config=config, **kwargs)
    if not setup:
        return model
    setup_vocab(model, setup)
    return model
