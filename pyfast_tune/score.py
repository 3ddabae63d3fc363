"""Score conversations with a reward model: ``pyfast-tune score MODEL FILE``.

The conversations are templated and tokenized by the packer exactly as training encoded the
pairs (the template recorded by ``convert``/``merge``, else ``--template``), packed whole into
rows of ``--max-length`` tokens, and each row runs once through the model with our varlen
attention — no padding, no attention across conversations. A conversation's score is the
``score`` head's output at its last token that is not the pad id (transformers' rule for
``*ForSequenceClassification``, the position the reward model was trained on).

    pyfast-tune score reward_model/ conversations.jsonl > scores.jsonl

Input: JSON/JSONL records with ``messages`` (OpenAI form), as ``pack --format openai``
reads; output: one JSON line per scored record, ``{"file", "record", "score"}``, in input
order.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch


def load_reward_model(model_dir: str | Path, dtype: torch.dtype = torch.float32,
                      trust_remote_code: bool = False):  # fmt: skip
    """A reward model folder (``convert`` of a full run, or ``merge`` of a LoRA run) as
    ``AutoModelForSequenceClassification`` with our varlen attention."""
    from transformers import AutoModelForSequenceClassification

    from pyfast_tune import patch

    model = AutoModelForSequenceClassification.from_pretrained(
        model_dir, dtype=dtype, trust_remote_code=trust_remote_code
    )
    if model.config.num_labels != 1:
        raise ValueError(f"{model_dir}: a reward model has one output (num_labels 1), this one "
                         f"has {model.config.num_labels}")  # fmt: skip
    model.config.use_cache = False
    model.eval()
    patch.apply(model, lora=False, attention=True, attention_backend="auto")
    return model


def score_packed(model, packed_dir: str | Path) -> dict[int, float]:
    """Every sample's score in a packed directory: {sample id: score}, one forward per pack
    (training's ``reward_scores``: the ``score`` head at each sample's last non-pad token)."""
    from pyfast_tune.data import PackedDataset
    from pyfast_tune.trainer.batches import collate
    from pyfast_tune.trainer.preference import reward_scores
    from pyfast_tune.trainer.step import model_inputs

    ds = PackedDataset(packed_dir)
    device = next(model.parameters()).device
    out: dict[int, float] = {}
    with torch.no_grad():
        for i in range(len(ds)):
            batch = collate([ds[i]], "token", 1)
            scores = reward_scores(model, model_inputs(batch, device), batch).cpu().tolist()
            out.update(zip((int(j) for j in ds.pack_sample_ids(i)), scores))
    return out


def score_file(model_dir: str | Path, inputs: list[str], template: str | None = None,
               max_length: int = 4096, threads: int | None = None) -> list[dict]:  # fmt: skip
    """Scores of the conversations in ``inputs``: [{"file", "record", "score"}], input order.

    >>> score_file("reward_model/", ["chats.jsonl"])[:1]      # doctest: +SKIP
    [{'file': 'chats.jsonl', 'record': 0, 'score': 1.73}]
    """
    from pyfast_tune.data import PackedDataset, pack

    model_dir = Path(model_dir)
    run = model_dir / "pyfast_tune.json"
    if template is None:
        template = json.loads(run.read_text()).get("template") if run.is_file() else None
    if template is None:
        raise ValueError(
            f"{model_dir} records no template (not from convert/merge): pass --template"
        )
    model = load_reward_model(model_dir)
    with tempfile.TemporaryDirectory(prefix="pyfast-score-") as tmp:
        packed = Path(tmp) / "packed"
        pack(inputs, packed, tokenizer=str(model_dir), max_length=max_length, format="openai",
             template=template, threads=threads)  # fmt: skip
        scores = score_packed(model, packed)
        ds = PackedDataset(packed)
        samples = np.asarray(ds.samples)
        return [{"file": ds.files[int(samples[j, 3])], "record": int(samples[j, 4]),
                 "score": scores[j]} for j in range(ds.num_samples)]  # fmt: skip


def score_main(args) -> int:
    """``pyfast-tune score``: one JSON line per conversation on stdout."""
    for rec in score_file(args.model, args.inputs, args.template, args.max_length, args.threads):
        sys.stdout.write(json.dumps(rec) + "\n")
    return 0
