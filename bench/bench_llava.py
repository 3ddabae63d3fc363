"""LLaVA training throughput: packed rows (images expanded in place) against XTuner-style
unpacked, padded batches, on the same samples, measured in the same run.

Data: ../shared/data/easyvqa (300 image records, multi-turn questions about a shape; images
64x64 PNG) where present, else generated images of coloured shapes
(pyfast_tune.vision.tiny); mixed with text-only conversations (chitchat / the generated chats
of bench/_corpus.py, as LLaVA records without an image), ``--text-share`` of the samples.
Template ``vicuna`` (XTuner's LLaVA configs), the SmolLM2 (or generated 49k BPE) tokenizer.
Model: a CLIP tower of ``--image-size`` px images in 14 px patches (hidden 64, 2 layers:
``(size/14)^2`` image tokens, 256 at 224 px) + a new projector + a tiny Llama (hidden 128, 4
layers), fp32, the LLM and projector trained in full (tower frozen), AdamW; CPU.

- ``padded``: XTuner's LLaVA loop (``pack_to_max_length=False``): batches of ``--batch``
  samples in a shuffled order, each expanded to its training length (image tokens in place),
  right-padded to the longest, attention mask, Hugging Face's LlavaForConditionalGeneration
  forward (sdpa) and loss;
- ``packed``: ours: packs of up to ``--pack-length`` training tokens planned with each image
  counted at its expanded size (``pack --image-tokens``), one row per step, varlen attention
  (``ref``/``op``) and the fused loss; the tower runs on the pack's images.

Both train on exactly the same samples once; tokens/s counts real (non-pad) training tokens
(text + image tokens). Fill = real tokens / slots (padded: batch x longest; packed: packs x
pack length).

    python bench/bench_llava.py                       # ~3 min on 2 idle cores
    python bench/bench_llava.py --packs 6 --batch 8 --image-size 224
    pytest bench/bench_llava.py -s
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))


def _llava_data(work: Path, text_share: float, seed: int = 0) -> tuple[Path, str]:
    """LLaVA records with images, plus text-only records; (json file, description)."""
    import numpy as np
    from _corpus import SHARED, bench_data

    vqa = SHARED / "easyvqa" / "llava_300.json"
    if vqa.is_file():
        records = json.loads(vqa.read_text())
        for r in records:
            r["image"] = str(vqa.parent / r["image"])
        label = f"{vqa} ({len(records)} image records)"
    else:
        from pyfast_tune.vision.tiny import make_llava_records

        gen = make_llava_records(work / "gen", 300, seed=seed, turns=3)
        records = json.loads(gen.read_text())
        for r in records:
            r["image"] = str(gen.parent / r["image"])
        label = "generated shapes (300 image records; ../shared/data/easyvqa absent)"
    n_text = int(round(len(records) * text_share / (1 - text_share)))
    chat = bench_data().chat
    with open(chat) as f:
        for _, line in zip(range(n_text), f):
            msgs = json.loads(line)["messages"]
            conv = [{"from": "human" if m["role"] == "user" else "gpt", "value": m["content"]}
                    for m in msgs if m["role"] in ("user", "assistant")]  # fmt: skip
            records.append({"conversations": conv})
    order = np.random.default_rng(seed).permutation(len(records))
    out = work / "llava_mix.json"
    out.write_text(json.dumps([records[int(k)] for k in order]))
    return out, f"{label} + {n_text} text-only chats ({chat.name})"


def _spread(n_total: int, n: int) -> list[int]:
    import numpy as np

    return np.linspace(0, n_total - 1, min(n, n_total)).round().astype(int).tolist()


def _padded_batches(packs, pack_ids, batch: int, image_id: int, seed: int = 0):
    """The samples of these packs, shuffled, in padded batches: (ids, labels, mask, images)."""
    import numpy as np
    import torch

    ds, n = packs.dataset, packs.image_tokens
    samples = []
    for i in pack_ids:
        for s in ds.pack_sample_ids(i):
            sample = ds.sample(int(s))
            ids, labels = sample["input_ids"], sample["labels"]
            rep = np.where(ids == -200, n, 1)
            ids, labels = np.repeat(ids, rep), np.repeat(labels, rep)
            ids[ids == -200] = image_id
            entry = packs.table.get(int(s))
            samples.append((ids, labels, entry[0] if entry else None))
    order = np.random.default_rng(seed).permutation(len(samples))
    samples = [samples[k] for k in order]
    for k in range(0, len(samples), batch):
        group = samples[k : k + batch]
        width = max(len(s[0]) for s in group)
        ids = np.zeros((len(group), width), dtype=np.int64)
        labels = np.full((len(group), width), -100, dtype=np.int64)
        mask = np.zeros((len(group), width), dtype=np.int64)
        for r, (i, lab, _) in enumerate(group):
            ids[r, : len(i)], labels[r, : len(i)], mask[r, : len(i)] = i, lab, 1
        images = [s[2] for s in group if s[2] is not None]
        yield torch.from_numpy(ids), torch.from_numpy(labels), torch.from_numpy(mask), images


def _time_padded(model, packs, pack_ids, batch, image_id):
    import torch

    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step(ids, labels, mask, images):
        extra = {"pixel_values": packs.processor(images)} if images else {}
        loss = model(input_ids=ids, attention_mask=mask, labels=labels, use_cache=False,
                     **extra).loss  # fmt: skip
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step(*next(_padded_batches(packs, pack_ids, batch, image_id)))  # warm-up, untimed
    start = time.perf_counter()
    real = slots = 0
    for ids, labels, mask, images in _padded_batches(packs, pack_ids, batch, image_id):
        step(ids, labels, mask, images)
        real += int(mask.sum())
        slots += ids.numel()
    return time.perf_counter() - start, real, slots


def _time_packed(model, packs, pack_ids):
    import torch

    from pyfast_tune.trainer.batches import global_normalizer
    from pyfast_tune.trainer.step import batch_loss

    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step(i):
        batch = packs.collate([packs[i]], "token", global_normalizer(packs, [i], "token"))
        loss = batch_loss(model, batch, "cpu")
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return batch.num_tokens

    step(pack_ids[0])  # warm-up, untimed
    start = time.perf_counter()
    tokens = sum(step(i) for i in pack_ids)
    return time.perf_counter() - start, tokens


def run(packs: int, batch: int, pack_length: int, image_size: int, text_share: float,
        threads: int, backends: list[str]) -> dict:  # fmt: skip
    """Measure and print; returns the figures."""
    import copy

    import torch
    from _corpus import bench_data

    from pyfast_tune import patch
    from pyfast_tune.data import PackedDataset, pack
    from pyfast_tune.vision.data import ImagePacks
    from pyfast_tune.vision.images import ImageProcessor, image_token_count
    from pyfast_tune.vision.model import assemble, freeze_parts, install_image_hook
    from pyfast_tune.vision.tiny import make_tiny_clip, make_tiny_llm

    torch.set_num_threads(threads)
    tok = bench_data().tokenizer
    work = Path(tempfile.mkdtemp(prefix="bench_llava_"))
    data, label = _llava_data(work, text_share)
    tower = make_tiny_clip(work / "tower", image_size=image_size, hidden_size=64)
    llm = make_tiny_llm(work / "llm", tok, hidden_size=128, layers=4, init_std=0.02)
    base = assemble(str(tower), str(llm), torch.float32)
    base.config.image_token_id = base.config.text_config.vocab_size - 1  # the spare row
    freeze_parts(base, ["vision_tower"])
    n = image_token_count(base.config.vision_config)
    stats = pack([data], work / "packed", tokenizer=tok, max_length=pack_length - n + 1,
                 format="llava", template="vicuna", image_tokens=n, pack_length=pack_length)  # fmt: skip
    proc = ImageProcessor.for_model(tower, base.config.vision_config)
    packed = ImagePacks(PackedDataset(work / "packed"), n, proc)
    pack_ids = _spread(len(packed), packs)
    base.set_attn_implementation("sdpa")
    seconds, real, slots = _time_padded(copy.deepcopy(base), packed, pack_ids, batch,
                                        base.config.image_token_id)  # fmt: skip
    results = {"padded": {"seconds": seconds, "tokens": real, "tok_s": real / seconds,
                          "fill": real / slots}}  # fmt: skip
    packed_slots = len(pack_ids) * pack_length
    for backend in backends:
        model = copy.deepcopy(base)
        install_image_hook(model)
        patch.apply(model, lora=False, attention_backend=backend)
        seconds, tokens = _time_packed(model, packed, pack_ids)
        assert tokens == real, (tokens, real)  # the same samples, the same training tokens
        results[f"packed[{backend}]"] = {"seconds": seconds, "tokens": tokens,
                                         "tok_s": tokens / seconds, "fill": tokens / packed_slots}  # fmt: skip
    n_images = sum(len(packed[i]["images"]) for i in pack_ids)
    print()
    print(f"data: {label}; tokenizer {Path(tok).name}")
    print(f"CPU, {threads} thread(s); CLIP tower {image_size} px / 14 px patches ({n} image "
          f"tokens, frozen) + projector + tiny Llama (hidden 128, 4 layers), fp32, AdamW")  # fmt: skip
    print(f"{len(pack_ids)} packs of <= {pack_length} training tokens: {real} tokens, "
          f"{n_images} images; whole packed dir fill {stats.fill:.4f} ({stats.packs} packs); "
          f"padded batches of {batch} samples")  # fmt: skip
    print(f"{'method':<16}{'seconds':>10}{'tokens/s':>12}{'fill':>8}{'vs padded':>12}")
    for name, r in results.items():
        ratio = r["tok_s"] / results["padded"]["tok_s"]
        print(f"{name:<16}{r['seconds']:>10.2f}{r['tok_s']:>12.0f}{r['fill']:>8.3f}{ratio:>11.2f}x")
    results["dir_fill"] = stats.fill
    return results


def test_bench_llava():
    r = run(packs=3, batch=8, pack_length=2048, image_size=224, text_share=0.3, threads=2,
            backends=["ref"])  # fmt: skip
    assert r["packed[ref]"]["fill"] > r["padded"]["fill"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--packs", type=int, default=6, help="packs (and their samples) to train on")
    ap.add_argument("--batch", type=int, default=8, help="samples per padded batch")
    ap.add_argument("--pack-length", type=int, default=2048, help="training tokens per pack")
    ap.add_argument("--image-size", type=int, default=224, help="tower input size (px)")
    ap.add_argument("--text-share", type=float, default=0.3, help="share of text-only samples")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--backends", default="ref,op", help="varlen backends to measure")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    run(args.packs, args.batch, args.pack_length, args.image_size, args.text_share, args.threads,
        args.backends.split(","))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
