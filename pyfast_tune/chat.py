"""Chat with a trained model, its turns formatted exactly as training encoded them.

    pyfast-tune chat merged/ --template default
    pyfast-tune chat models/base --adapter adapter/ --prompt "Hi there" --temperature 0

With an XTuner template the prompt is built like XTuner's ``encode_fn`` builds a training
sample (and like ``pack`` does, token for token): each piece tokenized alone without special
tokens; BOS before a turn when the previous one ended with EOS (and before the first);
``SYSTEM`` before the first input; ``INSTRUCTION`` around each input with its 1-based round;
``SUFFIX`` after each past answer, then EOS unless ``SUFFIX_AS_EOS``, then ``SEP``. With
``--template hf`` it is the tokenizer's own ``apply_chat_template``. Generation stops at EOS
or at the template's stop words, and streams text as soon as it can no longer turn into a
stop word.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pyfast_tune.hub import resolve_tokenizer


def py_format(fmt: str, **fields: str) -> str:
    """Python's ``str.format`` for the named fields in one pass (a ``{round}`` inside user
    text stays as is), ``{{``/``}}`` escapes, unknown ``{x}`` left alone — as ``pack`` does."""

    def sub(m: re.Match) -> str:
        if m.group(0) in ("{{", "}}"):
            return m.group(0)[0]
        key = m.group(1)
        return fields[key] if key in fields else m.group(0)

    return re.sub(r"\{\{|\}\}|\{([^{}]*)\}", sub, fmt)


def _token_string(value) -> str | None:
    if isinstance(value, dict):
        value = value.get("content")
    return value or None


@dataclass
class TemplateFormat:
    """Builds prompt ids for one XTuner template and a tokenizer directory."""

    tokenizer_dir: Path
    template: dict
    system: str | None = None
    bos: list[int] = field(default_factory=list)
    eos: list[int] = field(default_factory=list)
    _encoder: object = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        from tokenizers import Tokenizer

        d = Path(self.tokenizer_dir)
        self.tok = Tokenizer.from_file(str(d / "tokenizer.json" if d.is_dir() else d))
        cfg_path = (d if d.is_dir() else d.parent) / "tokenizer_config.json"
        cfg = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
        from pyfast_tune.data import NO_BOS_CLASSES

        bos, eos = _token_string(cfg.get("bos_token")), _token_string(cfg.get("eos_token"))
        if bos and cfg.get("tokenizer_class") not in NO_BOS_CLASSES:
            self.bos = [self._id(bos)]
        if eos:
            self.eos = [self._id(eos)]

    def _id(self, token: str) -> int:
        i = self.tok.token_to_id(token)
        if i is None:
            raise ValueError(f"{token!r} from tokenizer_config.json is not in the vocabulary")
        return i

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids if text else []

    def encode_conversation(
        self, turns: list[tuple[str, str | None]]
    ) -> tuple[list[int], list[bool]]:
        """(ids, trained) of ``turns`` = [(input, output), ...]; an output of None ends the
        ids at the open assistant turn (the generation prompt). Encoded by the engine's own
        training encoder, so a prompt is the prefix of the sample ``pack`` would write."""
        if self._encoder is None:
            from pyfast_tune.data import ChatEncoder

            self._encoder = ChatEncoder(self.tokenizer_dir, self.template["name"], self.system)
        ids, trained = self._encoder.encode(list(turns))
        return list(ids), list(trained)

    def prompt_ids(self, history: list[tuple[str, str]], query: str) -> list[int]:
        return self.encode_conversation([*history, (query, None)])[0]

    @property
    def stop_words(self) -> list[str]:
        return list(self.template["stop_words"])


class RawFormat(TemplateFormat):
    """``--template none``: no template, the text continued as is (a base or pretrained model).
    Pretraining samples are encoded as BOS + text, so the prompt is BOS + the text so far."""

    def __init__(self, tokenizer_dir: Path) -> None:
        none = {"system": "", "instruction": "", "suffix": "", "suffix_as_eos": True, "sep": "",
                "stop_words": []}  # fmt: skip
        super().__init__(tokenizer_dir, none)

    def prompt_ids(self, history: list[tuple[str, str]], query: str) -> list[int]:
        return self.bos + self.encode("".join(q + a for q, a in history) + query)


class HfFormat:
    """Prompt ids from the tokenizer's own chat template (``--template hf``)."""

    def __init__(self, tokenizer_dir: Path, system: str | None = None) -> None:
        from transformers import AutoTokenizer

        self.hf = AutoTokenizer.from_pretrained(tokenizer_dir)
        if not self.hf.chat_template:
            raise ValueError(
                f"{tokenizer_dir}: the tokenizer has no chat_template; pass --template"
            )
        self.system = system
        self.eos = [self.hf.eos_token_id] if self.hf.eos_token_id is not None else []

    def prompt_ids(self, history: list[tuple[str, str]], query: str) -> list[int]:
        messages = [{"role": "system", "content": self.system}] if self.system else []
        for q, a in history:
            messages += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        messages.append({"role": "user", "content": query})
        out = self.hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        if isinstance(out, dict) or hasattr(out, "keys"):
            out = out["input_ids"]
        return list(out)

    stop_words: tuple[str, ...] = ()  # EOS (and generation_config eos ids) only


def _holdback(text: str, stop_words: Sequence[str]) -> int:
    """Characters at the end of ``text`` not to print yet: a partial stop word, or an
    incomplete UTF-8 sequence (decoded as U+FFFD)."""
    keep = 0
    for w in stop_words:
        for k in range(min(len(w) - 1, len(text)), 0, -1):
            if text.endswith(w[:k]):
                keep = max(keep, k)
                break
    if text.endswith("\ufffd"):
        keep = max(keep, 1)
    return keep


def _cache_argument(model) -> str:
    """The forward argument (and output key) of the KV cache: ``cache`` in transformers 5's
    later releases, ``past_key_values`` before (the old name still works there, with a
    deprecation notice on every chat)."""
    import inspect

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    params = inspect.signature(type(base).forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def generate(
    model,
    prompt_ids: list[int],
    decode: Callable[[list[int]], str],
    *,
    stop_ids: set[int],
    stop_words: Sequence[str] = (),
    max_new_tokens: int = 256,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    repetition_penalty: float = 1.0,
    seed: int = 0,
    on_text: Callable[[str], None] | None = None,
    first_inputs: dict | None = None,
) -> tuple[str, list[int]]:
    """Decode from ``model`` with a KV cache; returns (answer text, generated ids).

    Each step's logits first get the ``repetition_penalty`` of every token already in the
    prompt or the answer (CTRL, https://arxiv.org/abs/1909.05858, as transformers applies it:
    a positive logit divided by it, a negative one multiplied). Then greedy when
    ``temperature`` is 0, else sampling from ``softmax(logits / T)`` restricted to the
    ``top_k`` most likely tokens (0 = all) and to the smallest set whose probability reaches
    ``top_p``. Stops at a ``stop_ids`` token (not included) or at the first stop word (cut
    off), or after ``max_new_tokens``. ``on_text`` receives the answer piece by piece as it
    becomes final. ``first_inputs``: more inputs of the first forward (a LLaVA image's
    ``pixel_values``).
    """
    import torch

    gen = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    inputs = torch.tensor([prompt_ids], device=device)
    past, out_ids, shown, text = None, [], 0, ""
    seen = torch.tensor(sorted(set(prompt_ids)), dtype=torch.long)
    cache_key = _cache_argument(model)
    with torch.no_grad():
        for _ in range(max_new_tokens):
            extra = (first_inputs or {}) if past is None else {}
            out = model(input_ids=inputs, use_cache=True, **{cache_key: past}, **extra)
            past = getattr(out, cache_key)
            logits = out.logits[0, -1].float().cpu()
            if repetition_penalty != 1.0 and len(seen):
                picked = logits[seen]
                logits[seen] = torch.where(
                    picked > 0, picked / repetition_penalty, picked * repetition_penalty
                )
            if temperature <= 0:
                token = int(torch.argmax(logits))
            else:
                if 0 < top_k < logits.numel():
                    kth = torch.topk(logits, top_k).values[-1]
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                probs = torch.softmax(logits / temperature, dim=-1)
                if top_p < 1.0:
                    sorted_p, order = torch.sort(probs, descending=True)
                    # Keep tokens until the mass before them reaches top_p (always >= 1 token).
                    keep = torch.cumsum(sorted_p, 0) - sorted_p < top_p
                    probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_p[keep])
                token = int(torch.multinomial(probs, 1, generator=gen))
            if token in stop_ids:
                break
            out_ids.append(token)
            if repetition_penalty != 1.0 and not bool((seen == token).any()):
                seen = torch.cat([seen, torch.tensor([token])])
            text = decode(out_ids)
            hits = [i for i in (text.find(w) for w in stop_words) if i >= 0]
            if hits:
                text = text[: min(hits)]
                break
            final = len(text) - _holdback(text, stop_words)
            if on_text and final > shown:
                on_text(text[shown:final])
                shown = final
            inputs = torch.tensor([[token]], device=device)
    text = text.removesuffix("\ufffd")  # an unfinished UTF-8 sequence at max_new_tokens
    if on_text and len(text) > shown:
        on_text(text[shown:])
    return text, out_ids


def default_template(*dirs: Path | None) -> str:
    """The template recorded by ``convert``/``merge`` (pyfast_tune.json) or, for a checkpoint's
    ``hf/`` folder, by training (its trainer_state.json); else ``hf``."""
    from pyfast_tune.export import RUN_FILE, run_template

    for d in dirs:
        if d is None:
            continue
        d = Path(d)
        template = None
        if (d / RUN_FILE).is_file():
            template = json.loads((d / RUN_FILE).read_text()).get("template")
        elif (d.parent / "trainer_state.json").is_file():
            template = run_template(d.parent)
        if template:
            return template
    return "hf"


def quantization_config(bits: int | None, dtype):
    """bitsandbytes' config for loading in ``bits`` (4: nf4 with double quantization, as
    XTuner's chat; 8: LLM.int8), or None. bitsandbytes' quantized matmuls need CUDA (its CPU
    backend covers only some ops and versions), so no CUDA device is an error here, before
    any weight is read."""
    if bits is None:
        return None
    if bits not in (4, 8):
        raise ValueError(f"--bits must be 4 or 8, got {bits}")
    import importlib.util

    import torch

    if importlib.util.find_spec("bitsandbytes") is None:
        raise ImportError(f"--bits {bits} needs bitsandbytes: pip install bitsandbytes "
                          "(or pyfast-tune[train]), or leave --bits out")  # fmt: skip
    if not torch.cuda.is_available():
        raise RuntimeError(f"--bits {bits} needs a CUDA GPU (bitsandbytes quantizes on CUDA); "
                           "none is visible: leave --bits out to chat in bf16/fp32")  # fmt: skip
    from transformers import BitsAndBytesConfig

    if bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                              bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype)  # fmt: skip


def load_model(model_dir: str | Path, adapter: str | Path | None, dtype: str | None,
               trust_remote_code: bool = False, bits: int | None = None):  # fmt: skip
    """``from_pretrained`` the model (CPU: float32 unless ``dtype``; ``bits`` 4/8: quantized
    by bitsandbytes), plus a PEFT adapter; the adapter's run set-up (rope, added tokens) is
    applied to the base first."""
    import torch

    from pyfast_tune.export import parse_dtype, run_setup
    from pyfast_tune.trainer.model_setup import load_base

    torch_dtype = parse_dtype(dtype) or (
        torch.bfloat16 if torch.cuda.is_available() else torch.float32
    )
    kwargs = {"dtype": torch_dtype, "trust_remote_code": trust_remote_code}
    quant = quantization_config(bits, torch_dtype)
    if quant is not None:
        kwargs["quantization_config"] = quant
    if torch.cuda.is_available():
        kwargs["device_map"] = "auto"
    model = load_base(model_dir, run_setup(adapter) if adapter else None, **kwargs)
    if adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter)
    model.eval()
    return model


def prompt_format(template: str, tokenizer_dir: Path, system: str | None = None):
    """The prompt builder of ``template`` (an XTuner template name, ``hf`` or ``none``).

    >>> prompt_format("default", Path("tok/")).prompt_ids([], "Hi")      # doctest: +SKIP
    """
    from pyfast_tune.data import templates

    tokenizer_dir = Path(tokenizer_dir)
    if template == "hf":
        return HfFormat(tokenizer_dir, system)
    if template == "none":
        return RawFormat(tokenizer_dir)
    by_name = {t["name"]: t for t in templates()}
    if template not in by_name:
        raise ValueError(
            f"unknown template {template!r}: see `pyfast-tune templates` (or hf, none)"
        )
    return TemplateFormat(tokenizer_dir, by_name[template], system)


def stop_token_ids(fmt, tok, template: str, model=None) -> set[int]:
    """Ids that end an answer: EOS, the template's one-token stop words, and with ``hf`` the
    model's generation_config EOS ids. ``tok``: a ``tokenizers.Tokenizer``."""
    stop_ids = set(fmt.eos)
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if template == "hf" and gen_eos is not None:
        stop_ids |= set(gen_eos if isinstance(gen_eos, list) else [gen_eos])
    for w in fmt.stop_words:  # a stop word that is one token stops by id too
        i = tok.token_to_id(w)
        if i is not None:
            stop_ids.add(i)
    return stop_ids


class ChatSession:
    """A model, a prompt format and the history; :meth:`ask` answers one message."""

    def __init__(
        self,
        model_dir: str | Path,
        adapter: str | Path | None = None,
        template: str | None = None,
        system: str | None = None,
        tokenizer: str | Path | None = None,
        dtype: str | None = None,
        trust_remote_code: bool = False,
        bits: int | None = None,
        stop_words: Sequence[str] = (),
        image: str | Path | None = None,
    ) -> None:
        quantization_config(bits, None)  # a --bits that cannot work fails before any loading
        model_dir = Path(model_dir)
        self.model_dir, self.image = model_dir, None
        adapter = Path(adapter) if adapter else None
        tok_dir = Path(tokenizer) if tokenizer else None
        if tok_dir is None:
            tok_dir = adapter if adapter and (adapter / "tokenizer.json").is_file() else model_dir
        # A model or tokenizer named by its Hub id: its tokenizer files from the Hub cache.
        tok_dir = Path(resolve_tokenizer(tok_dir))
        if not (tok_dir / "tokenizer.json").is_file() and not tok_dir.is_file():
            raise FileNotFoundError(f"{tok_dir}: no tokenizer.json; pass --tokenizer DIR")
        self.template = template or default_template(adapter, model_dir)
        self.format = prompt_format(self.template, tok_dir, system)
        from tokenizers import Tokenizer

        self.tok = Tokenizer.from_file(str(tok_dir / "tokenizer.json"))
        self.model = load_model(model_dir, adapter, dtype, trust_remote_code, bits)
        # --stop-words add to the template's (XTuner's chat: its --stop-words extend them).
        self.stop_words = list(dict.fromkeys([*self.format.stop_words, *stop_words]))
        self.stop_ids = stop_token_ids(self.format, self.tok, self.template, self.model)
        for w in stop_words:  # a one-token stop word stops by id too
            i = self.tok.token_to_id(w)
            if i is not None:
                self.stop_ids.add(i)
        self.history: list[tuple[str, str]] = []
        if image is not None:
            self.set_image(image)

    def set_image(self, image: str | Path) -> None:
        """Chat about ``image`` (a LLaVA model): the next message opens with it."""
        from pyfast_tune.vision.chat import ImagePrompt

        self.image = ImagePrompt(self.model, self.model_dir, image)
        self.history.clear()

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=False)

    def ask(self, message: str, on_text=None, image: str | Path | None = None,
            **gen_kwargs) -> str:  # fmt: skip
        if image is not None:
            self.set_image(image)
        first = {}
        if self.image is not None:  # its token opens the first message; pixels every prompt
            if not self.history:
                message = self.image.message(message)
            first = {"pixel_values": self.image.pixel_values}
        ids = self.format.prompt_ids(self.history, message)
        if self.image is not None:
            ids = self.image.expand(ids)
        answer, _ = generate(
            self.model,
            ids,
            self.decode,
            stop_ids=self.stop_ids,
            stop_words=self.stop_words,
            on_text=on_text,
            first_inputs=first,
            **gen_kwargs,
        )
        self.history.append((message, answer))
        return answer


def _stream(piece: str) -> None:
    sys.stdout.write(piece)
    sys.stdout.flush()


def chat_main(args) -> int:
    """``pyfast-tune chat``: one answer for ``--prompt``, else an interactive loop."""
    session = ChatSession(
        args.model,
        adapter=args.adapter,
        template=args.template,
        system=args.system,
        tokenizer=args.tokenizer,
        dtype=args.dtype,
        trust_remote_code=args.trust_remote_code,
        bits=getattr(args, "bits", None),
        stop_words=getattr(args, "stop_words", None) or (),
        image=getattr(args, "image", None),
    )
    gen = {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature,
           "top_p": args.top_p, "top_k": getattr(args, "top_k", 0),
           "repetition_penalty": getattr(args, "repetition_penalty", 1.0),
           "seed": args.seed}  # fmt: skip
    if args.prompt is not None:
        session.ask(args.prompt, on_text=_stream, **gen)
        print()
        return 0
    print(
        f"chat with {args.model}{' + ' + args.adapter if args.adapter else ''} "
        f"(template {session.template}); /reset clears the history, /exit or Ctrl-D quits",
        file=sys.stderr,
    )
    while True:
        try:
            message = input(">>> ")
        except EOFError:
            print()
            return 0
        if message.strip() in ("/exit", "/quit", "exit"):
            return 0
        if message.strip() == "/reset":
            session.history.clear()
            continue
        if not message.strip():
            continue
        session.ask(message, on_text=_stream, **gen)
        print()
