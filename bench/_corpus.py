"""The data every benchmark runs on: the real ``../shared/data`` where it exists, otherwise a
generated corpus and a tokenizer trained on it, so ``pytest bench/`` reproduces on any clone.

    from _corpus import bench_data
    data = bench_data()
    print(data.label)            # which data the figures come from
    data.chat, data.docs         # OpenAI-style chats, {"text": ...} documents (JSONL)
    data.tokenizer               # the default tokenizer directory (tokenizer.json + config)
    data.tokenizers              # every tokenizer to compare, name -> directory

Real data: ``$PYFAST_TUNE_SHARED_DATA`` (default ``../shared/data``, as tests/conftest.py):
chitchat.jsonl, pydoc.jsonl and tokenizers/ (SmolLM2 is the default tokenizer).

Generated data (when that is absent) imitates what the figures depend on — length
distributions and the tokenizer's work per byte, not meaning:

- chats: log-normal message counts and message lengths (median ~300 tokens per conversation,
  a tail of several thousand, like chitchat/ShareGPT), contractions, numbers, a little
  accented, CJK and emoji text;
- documents: reStructuredText-like pages (titles, paragraphs, literal blocks of code),
  log-normal lengths from a few hundred to tens of thousands of tokens, like pydoc;
- words drawn from a Zipf–Mandelbrot law over English function words and ~60k generated
  words, so a BPE trained on it has a realistic vocabulary and merge depth;
- a byte-level BPE of vocabulary 49,152 (SmolLM2's size, so models sized for it fit) behind
  Llama 3's pre-tokenizer ``Split`` regex + ``ByteLevel``: the shape of Llama 3 / Qwen /
  GPT-4-style tokenizers, one our fast BPE path reads (rust/packer/src/tokenize/split.rs),
  with ChatML special tokens and a chat template, like SmolLM2's.

Generating and training take ~20 s once; the result is cached under ``.bench_cache/``,
keyed by ``GENERATOR_VERSION`` (bump it whenever the output would change).
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from pyfast_tune.demo import train_chatml_bpe

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("PYFAST_TUNE_SHARED_DATA", ROOT.parent / "shared" / "data"))
REAL_TOKENIZERS = ["qwen3", "smollm2", "mistral-v3", "deepseek-v3"]

GENERATOR_VERSION = 1
CACHE = ROOT / ".bench_cache" / f"corpus-v{GENERATOR_VERSION}"
CHATS, DOCUMENTS, VOCAB_SIZE, SEED = 4000, 500, 49152, 0
GENERATED_TOKENIZER = "generated-bpe49k"

# Llama 3's pre-tokenizer regex, character for character as in its tokenizer.json (digits in
# runs of up to three); the fast path recognises this exact string.
LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


@dataclass(frozen=True)
class BenchData:
    """Where a benchmark's inputs are, and a line saying which they are."""

    chat: Path
    docs: Path
    tokenizer: Path
    tokenizers: dict[str, Path] = field(default_factory=dict)
    real: bool = False
    label: str = ""

    def corpus(self, kind: str) -> Path:
        """``"chat"`` or ``"docs"``: the file of that kind."""
        return {"chat": self.chat, "docs": self.docs}[kind]


def bench_data() -> BenchData:
    """The real shared data when present, else the generated corpus (built once, cached)."""
    tok_root = SHARED / "tokenizers"
    if (
        (SHARED / "chitchat.jsonl").is_file()
        and (SHARED / "pydoc.jsonl").is_file()
        and (tok_root / "smollm2" / "tokenizer.json").is_file()
    ):
        toks = {
            n: tok_root / n for n in REAL_TOKENIZERS if (tok_root / n / "tokenizer.json").is_file()
        }
        return BenchData(
            chat=SHARED / "chitchat.jsonl",
            docs=SHARED / "pydoc.jsonl",
            tokenizer=tok_root / "smollm2",
            tokenizers=toks,
            real=True,
            label=f"data: real, {SHARED}: chitchat.jsonl (4,017 human chats), pydoc.jsonl "
            f"(497 Python doc pages); tokenizers {', '.join(toks)} (default smollm2)",
        )
    d = generated()
    return BenchData(
        chat=d / "chat.jsonl",
        docs=d / "docs.jsonl",
        tokenizer=d / GENERATED_TOKENIZER,
        tokenizers={GENERATED_TOKENIZER: d / GENERATED_TOKENIZER},
        real=False,
        label=f"data: GENERATED ({SHARED} absent; bench/_corpus.py v{GENERATOR_VERSION}, seed "
        f"{SEED}): {CHATS} chats with log-normal turn counts and lengths, {DOCUMENTS} "
        f"rst-like documents, byte-level BPE vocab {VOCAB_SIZE} (Llama 3 split regex) trained "
        f"on them; cached in {d}",
    )


def generated(cache: Path = CACHE) -> Path:
    """The generated corpus and tokenizer under ``cache`` (built atomically when missing)."""
    if (cache / GENERATED_TOKENIZER / "tokenizer.json").is_file():
        return cache
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=cache.name + ".", dir=cache.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the cache is an ordinary build directory
    try:
        w = _Words(random.Random(SEED))
        chats = [_chat(w) for _ in range(CHATS)]
        docs = [_document(w) for _ in range(DOCUMENTS)]
        _write_jsonl(chats, tmp / "chat.jsonl")
        _write_jsonl(docs, tmp / "docs.jsonl")
        texts = [m["content"] for c in chats for m in c["messages"]] + [d["text"] for d in docs]
        train_tokenizer(texts, tmp / GENERATED_TOKENIZER, VOCAB_SIZE)
        try:
            tmp.rename(cache)
        except OSError:  # another process finished first: its copy is the same bytes
            if not (cache / GENERATED_TOKENIZER / "tokenizer.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return cache


def train_tokenizer(texts: list[str], out: Path, vocab_size: int) -> Path:
    """A Llama-3-shaped byte-level BPE trained on ``texts``: ``tokenizer.json`` and a
    ``tokenizer_config.json`` with ChatML special tokens (eos ``<|im_end|>``, no BOS)."""
    from tokenizers import Regex, pre_tokenizers

    pre = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(LLAMA3_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    return train_chatml_bpe(texts, out, vocab_size, pre, model_max_length=32768)


def _write_jsonl(records: list[dict], path: Path) -> None:
    with path.open("w") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


# Frequent English words first (Zipf ranks 1..), then generated ones; contractions exercise
# the regex's 's/'t/'re branches.
_FUNCTION_WORDS = (
    "the of and to a in is it you that he was for on are with as I his they be at one have "
    "this from or had by not but what some we can out other were all there when up use your "
    "how said an each she which do their time if will way about many then them would write "
    "like so these her long make thing see him two has look more day could go come did my "
    "no most who over know than call first people may down side been now find any new work "
    "part take get place made live where after back little only round man year came show "
    "every good me give our under name very through just form much great think say help low "
    "line before turn cause same mean differ move right boy old too does tell sentence set "
    "three want air well also play small end put home read hand large even here must big "
    "high such why ask went men need land different try kind off again don't I'm it's "
    "can't you're that's didn't we'll they've isn't he'd I've let's wouldn't"
).split()
_ONSETS = "b c d f g h j k l m n p r s t v w y z bl br ch cl cr dr fl fr gr pl pr sh sl st str th tr wh".split()
_VOWELS = "a e i o u a e i o ai ea ee ie oo ou".split()
_CODAS = ["", "", "", "n", "r", "s", "t", "l", "m", "nd", "st", "ng", "ck", "rt", "x"]
_ACCENTS = {"a": "áàä", "e": "éèê", "i": "íï", "o": "óöø", "u": "úü"}


class _Words:
    """Sentences of Zipf-distributed words; every choice from one seeded ``random.Random``."""

    def __init__(self, rng: random.Random, generated_words: int = 60_000):
        self.rng = rng
        seen, made = set(_FUNCTION_WORDS), []
        while len(made) < generated_words:
            k = rng.choice((1, 1, 2, 2, 2, 3, 3, 4))
            w = "".join(
                rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS) for _ in range(k)
            )
            if w not in seen:
                seen.add(w)
                made.append(w)
        # Shorter words are the frequent ones, as in any language (with noise).
        made.sort(key=lambda w: len(w) + 4 * rng.random())
        self.words = _FUNCTION_WORDS + made
        acc, self.cum = 0.0, []
        for r in range(len(self.words)):
            acc += 1.0 / (r + 2.7) ** 1.07  # Zipf–Mandelbrot, English-like
            self.cum.append(acc)
        self._common, self._common_cum = self.words[:3000], self.cum[:3000]  # identifiers

    def lognormal(self, median: float, sigma: float, lo: int, hi: int) -> int:
        return max(lo, min(hi, round(self.rng.lognormvariate(math.log(median), sigma))))

    def _positions(self, n: int, p: float):
        """Indices in ``range(n)`` each chosen with probability ``p`` (geometric gaps: one
        draw per chosen index, not one per word)."""
        rng, i, log_q = self.rng, -1, math.log(1.0 - p)
        while True:
            i += 1 + int(math.log(1.0 - rng.random()) / log_q)
            if i >= n:
                return
            yield i

    def _odd_word(self, w: str) -> str:
        """A number, or a little non-ASCII: accented letters, CJK, emoji."""
        rng = self.rng
        kind = rng.random()
        if kind < 0.75:
            return str(
                rng.choice((rng.randint(0, 99), rng.randint(1900, 2030), rng.randint(0, 10**7)))
            )
        if kind < 0.9:
            return "".join(
                rng.choice(_ACCENTS[c]) if c in _ACCENTS and rng.random() < 0.3 else c for c in w
            )
        if kind < 0.97:
            return "".join(chr(rng.randint(0x4E00, 0x62FF)) for _ in range(rng.randint(1, 4)))
        return chr(rng.randint(0x1F600, 0x1F64F))

    def text(self, words: int) -> str:
        """``words`` words in sentences of log-normal length (median 11 words)."""
        rng = self.rng
        ws = rng.choices(self.words, cum_weights=self.cum, k=words)
        for i in self._positions(words, 0.02):
            ws[i] = self._odd_word(ws[i])
        for i in self._positions(words, 0.06):
            ws[i] += ","
        out, start = [], 0
        while start < words:
            end = min(words, start + self.lognormal(11, 0.5, 2, 60))
            s = " ".join(ws[start:end]).rstrip(",")
            out.append(s[:1].upper() + s[1:] + rng.choice(".....?!"))
            start = end
        return " ".join(out)

    def sentence(self, n: int) -> str:
        """One sentence of ``n`` words (titles and headings)."""
        s = " ".join(self.rng.choices(self.words, cum_weights=self.cum, k=n))
        return s[:1].upper() + s[1:] + "."

    def identifier(self) -> str:
        parts = self.rng.choices(
            self._common, cum_weights=self._common_cum, k=self.rng.randint(1, 3)
        )
        return "_".join(p.strip("'").replace("'", "") for p in parts)


def _chat(w: _Words) -> dict:
    """One conversation: log-normal number of exchanges, log-normal message lengths."""
    rng = w.rng
    messages = []
    if rng.random() < 0.2:
        messages.append({"role": "system", "content": w.text(w.lognormal(20, 0.6, 3, 200))})
    for _ in range(w.lognormal(7, 1.05, 1, 250)):
        for role in ("user", "assistant"):
            content = w.text(w.lognormal(11, 1.0, 1, 8000))
            if rng.random() < 0.08:  # a second line, as people type them
                content += "\n" + w.text(w.lognormal(8, 0.8, 1, 200))
            messages.append({"role": role, "content": content})
    return {"messages": messages}


def _document(w: _Words) -> dict:
    """One reStructuredText-like page of log-normal length (in words)."""
    rng = w.rng
    title = w.sentence(w.lognormal(4, 0.4, 1, 12)).rstrip(".?!")
    parts = ["=" * len(title), title, "=" * len(title), ""]
    left = w.lognormal(1700, 1.2, 60, 40_000)
    while left > 0:
        r = rng.random()
        if r < 0.08:
            head = w.sentence(w.lognormal(3, 0.4, 1, 10)).rstrip(".?!")
            parts += [head, rng.choice("-~^") * len(head), ""]
        elif r < 0.25:
            parts += (
                ["Example::", ""]
                + [_code_line(w) for _ in range(w.lognormal(4, 0.7, 1, 40))]
                + [""]
            )
            left -= 20
        elif r < 0.32:
            parts += [
                f"* {w.text(w.lognormal(10, 0.6, 2, 60))}" for _ in range(rng.randint(2, 6))
            ] + [""]
            left -= 30
        else:
            n = w.lognormal(60, 0.7, 5, 600)
            para = w.text(n).split(" ")
            for _ in range(max(1, n // 25)):  # inline literals and references
                i = rng.randrange(len(para))
                para[i] = rng.choice(("``{}()``", ":func:`{}`", "`{}`_", "*{}*")).format(
                    w.identifier()
                )
            parts += [_wrap(" ".join(para)), ""]
            left -= n
    return {"text": "\n".join(parts)}


def _code_line(w: _Words) -> str:
    rng = w.rng
    f, a, b = w.identifier(), w.identifier(), w.identifier()
    line = rng.choice(
        (
            f">>> {a} = {f}({b}, {rng.randint(0, 999)})",
            f"   def {f}(self, {a}={rng.randint(0, 99)}):",
            f"       return {a}.{b} + {rng.random():.4f}",
            f"   {a}[{rng.randint(0, 9)}] = '{b}'",
            f"   if {a} is not None and len({b}) > {rng.randint(1, 64)}:",
            f"   # {w.text(rng.randint(3, 9))}",
        )
    )
    return "   " + line


def _wrap(text: str, width: int = 79) -> str:
    """Lines of at most ``width`` characters (rst sources are wrapped)."""
    lines, cur = [], ""
    for word in text.split(" "):
        if cur and len(cur) + 1 + len(word) > width:
            lines.append(cur)
            cur = word
        else:
            cur = f"{cur} {word}" if cur else word
    lines.append(cur)
    return "\n".join(lines)


if __name__ == "__main__":
    print(bench_data().label)
