"""``pack`` inputs into a packed directory, ``merge_packs`` the parts of a sharded run, and
what a run would read or record (``fingerprint``, ``data_order``)."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Mapping, Sequence

from pyfast_tune import _packer
from pyfast_tune.data.errors import PackConfigError, PackError
from pyfast_tune.data.mapped import _pack_mapped
from pyfast_tune.data.mix import is_mix, mix_sources
from pyfast_tune.data.options import (
    PackStats,
    _engine_options,
    _inputs,
    _resolve_sources,
    _run_pack,
    _tqdm_progress,
)
from pyfast_tune.locations import is_remote, tokenizer_path


def pack(
    inputs: str | os.PathLike | Mapping | Sequence[str | os.PathLike | Mapping],
    out_dir: str | os.PathLike,
    tokenizer: str | os.PathLike,
    max_length: int = 4096,
    format: str = "auto",
    template: str = "default",
    seed: int = 0,
    threads: int | None = None,
    skip_bad: bool = False,
    data_order: str | os.PathLike | None = None,
    progress: bool = False,
    columns: str | Mapping[str, str] | None = None,
    min_length: int = 0,
    file_type: str | None = None,
    rebuild_meta: bool = False,
    shard: tuple[int, int] | None = None,
    map_fn: Callable[[dict], dict | None] | None = None,
    tokenizer_backend: str = "auto",
    split: str | None = None,
    subset: str | None = None,
    executor: str | None = None,
    shards: int | None = None,
    address: str | None = None,
    retries: int = 3,
    work_dir: str | os.PathLike | None = None,
    image_tokens: int = 0,
    pack_length: int = 0,
    image_folder: str | os.PathLike | None = None,
) -> PackStats:
    """Read, template, tokenize and pack ``inputs`` into ``out_dir`` (written atomically).

    inputs: files, directories (recursive, sorted by relative path) or globs; with
      ``data_order`` the single data root. An input may be a source mapping instead —
      ``{"path", "name", "format", "columns", "split", "subset", "weight", "max_samples"}`` —
      and then every input is a source of a mix: ``weight`` repeats a source's samples (2.5:
      every sample twice plus a seeded half), ``max_samples`` takes a seeded subset first;
      exact counts, per-source figures in ``stats.mix`` and meta.json
      (docs/workflow-mixing.md). JSON arrays or JSONL, plain/.gz/.zst (both are
      streamed: inputs larger than memory are fine), and pre-tokenized InternEVO ``X.bin`` with
      ``X.bin.meta`` (pick them in directories with ``file_type=".bin"``).
      Hugging Face Hub datasets as ``hf://datasets/<org>/<name>[@<revision>][/<path-or-glob>]``,
      read through ``huggingface_hub`` and its cache (``HF_HUB_OFFLINE=1`` reads the cache
      only); ``split`` (default ``train``) and ``subset`` (a config name) pick their files as
      ``datasets.load_dataset`` does, and meta.json records the commit they were read at.
    tokenizer: a directory with ``tokenizer.json`` (+ ``tokenizer_config.json`` for BOS/EOS)
      or the ``tokenizer.json`` itself; or a Hub model id ``<org>/<name>`` when no such local
      path exists (only its tokenizer files are fetched).
    format: see ``formats()`` (XTuner's map_fns; ``auto`` detects by keys). template: an XTuner
      template name, ``hf`` (the tokenizer's own chat template, loss on assistant content) or
      ``none`` (``templates()``); pretraining text is never templated.
    columns: remap dataset columns to the format's fields, ``"instruction=question,output=answer"``
      or ``{"instruction": "question", "output": "answer"}``.
    min_length: pre-tokenized rows with fewer tokens are skipped (XTuner's ``min_length``).
    rebuild_meta: rebuild a missing or inconsistent ``X.bin.meta`` instead of failing.
    shard: ``(i, n)`` encodes part i of n into ``out_dir``; join the parts with ``merge_packs``.
    map_fn: the slow path for data no format fits: a Python function called on every record
      (a dict) returning a record in ``format`` (e.g. ``{"conversation": [...]}``) or None to
      drop it. Records are mapped here in Python, one by one, into a temporary directory that
      mirrors the inputs' names (so sources stay file + record), then packed by the engine.
      Prefer ``format`` + ``columns``: they run in Rust, in parallel.
    tokenizer_backend: ``auto`` (the fast byte-level BPE path when it provably gives the ids
      of Hugging Face ``tokenizers``, else ``tokenizers``), ``hf``, or ``fast`` (fails, saying
      why, when the tokenizer does not qualify). It changes the speed, never the output.
    executor: ``"local"`` (processes of this machine) or ``"ray"`` (Ray Core tasks; needs
      ``pip install 'pyfast-tune[ray]'``) runs ``shards`` parts (``shards`` alone means
      local) in ``work_dir`` (default ``<out_dir>.parts``, removed after the merge) and merges
      them into ``out_dir``: the same bytes as one ``pack``. A shard lost with its node is
      retried up to ``retries`` times; a rerun skips complete parts. ``address``: the Ray
      cluster (``"auto"``: the running one). None of these reach the fingerprint
      (docs/workflow-large-dataset.md).
    image_tokens: LLaVA (``format="llava"``): the tokens one image becomes in training; packs
      are planned with each ``<image>`` counted at that size, within ``pack_length`` (default
      ``max_length + image_tokens - 1``; ``max_length`` stays XTuner's text truncation length),
      and every image must exist under ``image_folder`` (default: the data file's folder) —
      else a record error, or a counted skip with ``skip_bad`` (docs/workflow-llava.md).
    Inputs and ``out_dir`` may be object-storage URLs (``s3://``, ``gs://``, ``az://``;
    ``pyfast_tune.data.storage``): inputs are copied into a local cache, the output is packed
    locally and uploaded with ``meta.json`` last.
    The output bytes depend only on the inputs and settings, never on ``threads``,
    ``tokenizer_backend`` or the executor.

    >>> pack("chats.jsonl", "packed/", tokenizer="tok/", max_length=2048,
    ...      template="qwen_chat").fill > 0.99                              # doctest: +SKIP
    True
    """
    if is_remote(out_dir):  # packed here, then uploaded with meta.json last
        args = dict(locals())  # pack's arguments, before anything else is local
        from pyfast_tune.data import storage

        # Ray's merge tasks write the output's ranges on any node: it is staged in the work
        # dir, which every node sees, not in this machine's cache.
        if executor == "ray" and work_dir is None:
            raise PackConfigError(
                f"the Ray executor with the output {out_dir} needs work_dir (--work-dir) on a "
                "file system every node sees: the merge's tasks write the output there before "
                "it is uploaded"
            )
        base = work_dir if executor == "ray" else None
        return storage.write_remote(
            out_dir, lambda local: pack(**{**args, "out_dir": local}), base=base
        )
    if executor is None and shards is None and (address, retries, work_dir) != (None, 3, None):
        raise PackConfigError("address, retries and work_dir go with executor= or shards=N")
    if executor is not None or shards is not None:
        from pyfast_tune.data.executor import run_sharded  # it imports this module

        engine = dict(
            inputs=inputs, tokenizer=tokenizer, max_length=max_length, format=format,
            template=template, seed=seed, threads=threads, skip_bad=skip_bad,
            data_order=data_order, columns=columns, min_length=min_length,
            file_type=file_type, rebuild_meta=rebuild_meta, shard=shard, map_fn=map_fn,
            tokenizer_backend=tokenizer_backend, split=split, subset=subset,
            image_tokens=image_tokens, pack_length=pack_length, image_folder=image_folder,
        )  # fmt: skip
        return run_sharded(
            engine, out_dir, executor or "local", shards, address, retries, work_dir, progress
        )
    # Hub inputs and tokenizer ids become local files before anything is written; a shard
    # lays out object-storage inputs as placeholders and fetches only the objects it reads
    # (not for LLaVA, whose records name images beside them).
    lazy = shard is not None and map_fn is None and not is_mix(inputs) and not image_tokens
    remote = lazy and any(is_remote(i) for i in _inputs(inputs))
    inputs, mix, sources = _inputs_and_mix(
        inputs, template, split, subset, data_order, map_fn, lazy=remote
    )
    options = _engine_options(
        sources,
        mix,
        inputs=inputs,
        out_dir=out_dir,
        tokenizer=tokenizer_path(tokenizer),
        max_length=max_length,
        format=format,
        template=template,
        seed=seed,
        threads=threads,
        skip_bad=skip_bad,
        data_order=data_order,
        columns=columns,
        min_length=min_length,
        file_type=file_type,
        rebuild_meta=rebuild_meta,
        shard=shard,
        tokenizer_backend=tokenizer_backend,
        image_tokens=image_tokens,
        pack_length=pack_length,
        image_folder=image_folder,
    )
    try:
        fetch = _fetch_shard_objects(options, shard) if remote else None
        if map_fn is not None:
            return _pack_mapped(map_fn, options, progress)
        return _run_pack(options, progress, fetch)
    except PackError as e:
        storage = sys.modules.get("pyfast_tune.data.storage")  # loaded when a URL was fetched
        if storage is not None:
            storage.name_urls(e)
        raise


def _fetch_shard_objects(options: dict, shard: tuple[int, int]):
    """Download the object-storage inputs that shard ``shard`` reads whole (``storage.fetch``
    laid them out as placeholders): with ``whole_files``, each object of at most one share of
    the bytes is read by one shard alone. The engine's ``fetch`` hook for the objects it
    reads part of (a large JSONL object: the lines of this shard's share), or None."""
    from pyfast_tune.data import storage

    options["whole_files"] = True
    files = [p for p, _ in _packer.resolve_inputs(options)]
    sizes = [os.path.getsize(p) for p in files]
    reads = _packer.shard_reads(files, sizes, *shard, True)
    # a pre-tokenized X.bin is read with its X.bin.meta
    whole = (x for p, r in zip(files, reads, strict=True) if r == "whole" for x in (p, p + ".meta"))
    storage.materialize(whole)
    return storage.fetch_range if "part" in reads else None


def _inputs_and_mix(inputs, template, split, subset, data_order, map_fn=None, lazy=False):
    """(local inputs, engine mix, Hub sources): plain inputs, or — when an input is a source
    mapping — every input as a source of a mix (docs/workflow-mixing.md). ``lazy``: object
    storage inputs as placeholders (``storage.fetch``)."""
    if not is_mix(inputs):
        paths, sources = _resolve_sources(inputs, split, subset, data_order, lazy)
        return paths, [], sources
    if data_order is not None or map_fn is not None:
        raise PackConfigError(
            "a mix of sources cannot take a data-order file or a map_fn: give each source "
            "its paths, format and columns"
        )
    mix, sources = mix_sources(inputs, template, split, subset)
    return [], mix, sources


def merge_packs(
    parts: Sequence[str | os.PathLike], out_dir: str | os.PathLike, progress: bool = False
) -> PackStats:
    """Join the part directories written by ``pack(..., shard=(i, n))`` for every i into
    ``out_dir``: the same bytes a single ``pack`` would write.

    >>> merge_packs(["part0/", "part1/", "part2/"], "packed/")           # doctest: +SKIP
    """
    report, close = _tqdm_progress() if progress else (None, lambda: None)
    try:
        stats = _packer.merge_packs([os.fspath(p) for p in parts], os.fspath(out_dir), report)
    finally:
        close()
    return PackStats(**stats)


def data_order(root: str | os.PathLike, file_type: str = ".bin") -> list[str]:
    """Relative paths of the files under ``root`` ending with ``file_type``, recursively and
    truly sorted by relative path bytes (hidden entries skipped): the lines of XTuner's
    ``data_order.txt``, the same on every machine.

    >>> data_order("data/", ".bin")[:2]                                   # doctest: +SKIP
    ['a/0.bin', 'a/1.bin']
    """
    return list(_packer.data_order(os.fspath(root), file_type))


def fingerprint(
    inputs: str | os.PathLike | Sequence[str | os.PathLike],
    tokenizer: str | os.PathLike,
    max_length: int = 4096,
    format: str = "auto",
    template: str = "default",
    seed: int = 0,
    skip_bad: bool = False,
    data_order: str | os.PathLike | None = None,
    columns: str | Mapping[str, str] | None = None,
    min_length: int = 0,
    file_type: str | None = None,
    tokenizer_backend: str = "auto",
    split: str | None = None,
    subset: str | None = None,
    image_tokens: int = 0,
    pack_length: int = 0,
    image_folder: str | os.PathLike | None = None,
) -> str:
    """The fingerprint ``pack`` would write for these arguments, without packing (it hashes
    every input; Hub inputs and tokenizer ids are resolved as ``pack`` resolves them). Key a
    cache of packed directories with it.

    >>> fingerprint("chats.jsonl", tokenizer="tok/", max_length=2048)   # doctest: +SKIP
    '5c0f...'
    """
    inputs, mix, sources = _inputs_and_mix(inputs, template, split, subset, data_order)
    options = _engine_options(
        sources,
        mix,
        inputs=inputs,
        tokenizer=tokenizer_path(tokenizer),
        max_length=max_length,
        format=format,
        template=template,
        seed=seed,
        skip_bad=skip_bad,
        data_order=data_order,
        columns=columns,
        min_length=min_length,
        file_type=file_type,
        tokenizer_backend=tokenizer_backend,
        image_tokens=image_tokens,
        pack_length=pack_length,
        image_folder=image_folder,
    )
    return _packer.fingerprint(options)


def exchange_dirs(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Swap two existing directories atomically (``renameat2(RENAME_EXCHANGE)``), the engine's
    own commit primitive; False where the kernel or filesystem cannot, OSError otherwise."""
    return _packer.exchange_dirs(os.fspath(a), os.fspath(b))
