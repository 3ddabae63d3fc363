"""Look at a packed directory before training on it (XTuner's ``check-custom-dataset`` and
``log-dataset``): counts, fill, trained tokens, what was truncated or dropped, the
fingerprint, one sample decoded with its trained spans marked, and a sample-length histogram.

    pyfast-tune inspect packed/ --sample 3 --plot lengths.png

>>> report = summarize(PackedDataset("packed/"))            # doctest: +SKIP
>>> counts, edges = length_histogram(ds.sample_lengths, max_length=4096)   # doctest: +SKIP
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from pyfast_tune.data import PackedDataset

IMAGE_TOKEN_INDEX = -200  # XTuner's <image> placeholder in LLaVA samples (not a vocabulary id)

TRAINED_OPEN, TRAINED_CLOSE = "⟦", "⟧"  # marks text whose tokens carry loss
_GREEN, _RESET = "\x1b[32m", "\x1b[0m"


def length_histogram(
    lengths: np.ndarray, max_length: int | None = None, bins: int = 50
) -> tuple[np.ndarray, np.ndarray]:
    """Counts of ``lengths`` in at most ``bins`` equal integer-width bins covering
    ``[1, max_length]`` (or up to the longest length when it is larger or not given).

    Returns ``(counts, edges)``: bin ``k`` counts the lengths ``L`` with ``edges[k] <= L <
    edges[k + 1]``, and ``counts.sum() == len(lengths)``. Integer widths give every bin the same
    number of possible lengths, so the bars compare.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    if lengths.size and lengths.min() < 1:
        raise ValueError(f"sample lengths must be >= 1, got {int(lengths.min())}")
    top = max(int(max_length or 1), int(lengths.max()) if lengths.size else 1)
    width = -(-top // bins)  # ceil
    nbins = -(-top // width)
    edges = 1 + width * np.arange(nbins + 1, dtype=np.int64)
    counts = np.bincount((lengths - 1) // width, minlength=nbins).astype(np.int64)
    return counts, edges


def summarize(ds: PackedDataset, bins: int = 50) -> dict[str, Any]:
    """Everything ``inspect`` prints, as a dict. Token counts are recomputed from the arrays,
    not copied from meta.json; truncation/drop/skip counts (which the arrays cannot show)
    come from meta.json's stats."""
    stats = ds.meta.get("stats", {})
    max_length = int(ds.meta["max_length"])
    lengths = ds.sample_lengths
    pack_lengths = ds.pack_lengths
    loss_tokens = int(np.count_nonzero(np.asarray(ds.loss_mask)))
    counts, edges = length_histogram(lengths, max_length, bins)

    def describe(x: np.ndarray) -> dict[str, float]:
        if x.size == 0:
            return {}
        return {
            "min": int(x.min()),
            "mean": float(x.mean()),
            "median": float(np.median(x)),
            "p99": float(np.percentile(x, 99)),
            "max": int(x.max()),
        }

    return {
        "path": str(ds.path),
        "fingerprint": ds.meta.get("fingerprint"),
        "format": ds.meta.get("format"),
        "template": ds.meta.get("template"),
        "tokenizer": ds.meta.get("tokenizer", {}).get("path"),
        "max_length": max_length,
        "files": len(ds.files),
        "packs": ds.num_packs,
        "samples": ds.num_samples,
        "tokens": ds.num_tokens,
        "loss_tokens": loss_tokens,
        "loss_fraction": loss_tokens / ds.num_tokens if ds.num_tokens else 0.0,
        # LLaVA packed with --image-tokens: at training length, against the packs' capacity
        "fill": (
            int(ds.meta.get("num_training_tokens") or ds.num_tokens)
            / (ds.num_packs * int(ds.meta.get("pack_length") or max_length))
            if ds.num_packs
            else 0.0
        ),  # fmt: skip
        "records": stats.get("records"),
        "truncated_samples": stats.get("truncated_samples"),
        "truncated_tokens": stats.get("truncated_tokens"),
        "dropped_samples": stats.get("dropped_samples"),
        "dropped_tokens": stats.get("dropped_tokens"),
        "skipped_records": stats.get("skipped_records"),
        "skipped_files": stats.get("skipped_files"),
        "sample_length": describe(lengths),
        "pack_length": describe(pack_lengths),
        "samples_per_pack": float(ds.num_samples / ds.num_packs) if ds.num_packs else 0.0,
        "histogram": {"counts": counts.tolist(), "edges": edges.tolist()},
        "mix": ds.meta.get("mix", []),
        "images": _images(ds),
    }


def _images(ds: PackedDataset) -> dict[str, Any] | None:
    """LLaVA: how many samples have an image, the tokens each becomes in training, the packs'
    capacity after that expansion and the fill at training length (None without images)."""
    if not ds.images:
        return None
    return {"samples": len(ds.images), "image_tokens": ds.meta.get("image_tokens"),
            "pack_length": ds.meta.get("pack_length"),
            "training_fill": ds.meta.get("stats", {}).get("fill")
            if ds.meta.get("image_tokens") else None}  # fmt: skip


def _tokenizer(ds: PackedDataset, tokenizer: str | os.PathLike | None):
    from tokenizers import Tokenizer

    path = Path(tokenizer or ds.meta.get("tokenizer", {}).get("path", ""))
    if path.is_dir():
        path = path / "tokenizer.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"tokenizer {str(path)!r} (from meta.json) not found: pass --tokenizer DIR"
        )
    return Tokenizer.from_file(str(path))


def trained_spans(labels: np.ndarray) -> list[tuple[int, int, bool]]:
    """Maximal runs ``(start, end, trained)`` of a sample's tokens by whether they carry loss."""
    trained = np.asarray(labels) != -100
    if trained.size == 0:
        return []
    cuts = np.flatnonzero(np.diff(trained.astype(np.int8))) + 1
    bounds = [0, *cuts.tolist(), trained.size]
    return [(a, b, bool(trained[a])) for a, b in zip(bounds[:-1], bounds[1:])]


def render_sample(
    ds: PackedDataset, j: int, tokenizer: str | os.PathLike | None = None, color: bool = False
) -> str:
    """Sample ``j`` decoded (special tokens kept), trained spans between ⟦ ⟧ (or green). In a
    preference pack, both sides of ``j``'s pair: chosen, then rejected, each marked."""
    tok = _tokenizer(ds, tokenizer)
    s = ds.sample(j)
    if "pair" not in s:
        return _render_one(ds, tok, j, color)
    # The partner comes from pairs.bin, never from the sample index's parity.
    members = np.flatnonzero(np.asarray(ds.pairs[:, 0]) == s["pair"])
    by_role = sorted(members.tolist(), key=lambda k: int(ds.pairs[k, 1]))
    margin = "" if ds.margins is None else f" (margin {float(ds.margins[j]):g})"
    head = f"pair {s['pair']}{margin}:\n"
    return head + "\n".join(_render_one(ds, tok, k, color) for k in by_role)


def _render_one(ds: PackedDataset, tok: Any, j: int, color: bool) -> str:
    s = ds.sample(j)
    ids, labels = s["input_ids"], s["labels"]
    parts = []
    for a, b, trained in trained_spans(labels):
        span = [int(i) for i in ids[a:b]]
        pieces, run = [], []
        for i in span:  # LLaVA's <image> placeholder is not a vocabulary id
            if i == IMAGE_TOKEN_INDEX:
                pieces += [tok.decode(run, skip_special_tokens=False), "<image>"]
                run = []
            else:
                run.append(i)
        pieces.append(tok.decode(run, skip_special_tokens=False))
        text = "".join(pieces)
        if trained:
            text = f"{_GREEN}{text}{_RESET}" if color else f"{TRAINED_OPEN}{text}{TRAINED_CLOSE}"
        parts.append(text)
    file, record = s["source"]
    role = f"{s['role']} " if "role" in s else ""
    head = (
        f"{role}sample {j} ({file} record {record}): {len(ids)} tokens, "
        f"{int(np.count_nonzero(labels != -100))} trained"
    )
    if s.get("image") is not None:  # LLaVA: where the image's patch tokens go
        at = np.flatnonzero(ids == IMAGE_TOKEN_INDEX).tolist()
        head += f"; image {s['image']} at token {at[0] if len(at) == 1 else at}"
    return head + "\n" + "".join(parts)


def plot_lengths(ds: PackedDataset, out: str | os.PathLike, bins: int = 50) -> dict[str, Any]:
    """Write a PNG histogram of sample lengths (the numbers of :func:`length_histogram`).

    Returns ``{"path", "heights", "lefts", "widths"}`` read back from the drawn bars, so what
    the picture shows can be checked against the data.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    max_length = int(ds.meta["max_length"])
    counts, edges = length_histogram(ds.sample_lengths, max_length, bins)
    fig, ax = plt.subplots(figsize=(8, 4.5))
    bars = ax.bar(edges[:-1], counts, width=np.diff(edges), align="edge", edgecolor="black",
                  lw=0.3)  # fmt: skip
    ax.set_xlabel("sample length (tokens)")
    ax.set_ylabel("samples")
    ax.set_title(
        f"{ds.num_samples} samples in {ds.num_packs} packs of {max_length} tokens, "
        f"fill {ds.num_tokens / max(1, ds.num_packs * max_length):.2%}"
    )
    ax.axvline(max_length, color="red", ls="--", lw=1, label="max_length")
    ax.legend()
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    drawn = {
        "path": out,
        "heights": [r.get_height() for r in bars],
        "lefts": [r.get_x() for r in bars],
        "widths": [r.get_width() for r in bars],
    }
    plt.close(fig)
    return drawn


def format_report(report: dict[str, Any]) -> str:
    """The human-readable lines ``pyfast-tune inspect`` prints."""
    r = report
    sl, pl = r["sample_length"], r["pack_length"]
    lines = [
        f"{r['path']}: format {r['format']}, template {r['template']}, max_length "
        f"{r['max_length']}, {r['files']} input file(s)",
        f"fingerprint {r['fingerprint']}",
        f"tokenizer {r['tokenizer']}",
        f"{r['samples']} samples in {r['packs']} packs ({r['samples_per_pack']:.2f} per pack), "
        f"fill {r['fill']:.2%}",
        f"{r['tokens']} tokens, {r['loss_tokens']} trained ({r['loss_fraction']:.1%})",
        f"records {r['records']}: truncated {r['truncated_samples']} samples "
        f"({r['truncated_tokens']} tokens), dropped {r['dropped_samples']} samples "
        f"({r['dropped_tokens']} tokens), skipped {r['skipped_records']} records / "
        f"{r['skipped_files']} files",
    ]
    if sl:
        lines.append(
            f"sample length: min {sl['min']} median {sl['median']:.0f} mean {sl['mean']:.1f} "
            f"p99 {sl['p99']:.0f} max {sl['max']}"
        )
        lines.append(
            f"pack length:   min {pl['min']} median {pl['median']:.0f} mean {pl['mean']:.1f} "
            f"max {pl['max']}"
        )
    im = r.get("images")
    if im:
        size = (f"{im['image_tokens']} tokens each in training, packs of <= "
                f"{im['pack_length']} training tokens, training fill {im['training_fill']:.2%}"
                if im["image_tokens"] else "not expanded in packing (pack --image-tokens N)")  # fmt: skip
        lines.append(f"images: {im['samples']} samples with an image, {size}")
    if r.get("mix"):
        lines.append("sources (mix):")
        for m in r["mix"]:
            limit = f", max_samples {m['max_samples']}" if m.get("max_samples") else ""
            lines.append(
                f"  {m['name']}: weight {m['weight']:g}{limit}: {m['samples']} samples "
                f"({m['distinct_samples']} distinct of {m['available_samples']}), "
                f"{m['tokens']} tokens ({m['loss_tokens']} trained), "
                f"{m['token_share']:.1%} of the tokens"
            )
    counts, edges = r["histogram"]["counts"], r["histogram"]["edges"]
    peak = max(counts) if counts else 0
    top = max(r["max_length"], sl.get("max", 0))
    lines.append("sample lengths:")
    for c, a, b in zip(counts, edges[:-1], edges[1:]):
        if c:
            bar = "#" * max(1, round(40 * c / peak))
            lines.append(f"  {a:>6}-{min(b - 1, top):<6} {c:>8} {bar}")
    return "\n".join(lines)
