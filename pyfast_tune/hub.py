"""Hugging Face Hub datasets and tokenizers as local files, through ``huggingface_hub`` only:
its cache (``HF_HOME``/``HF_HUB_CACHE``), token, ``HF_HUB_OFFLINE`` and ``HF_ENDPOINT``. There
is no downloader here: this module decides *which* files of a repository to read, asks
``huggingface_hub`` for them, and records the commit they came from.

Datasets are named as pandas, polars and DuckDB name them (fsspec's ``hf://`` spelling)::

    hf://datasets/<org>/<name>[@<revision>][/<path-or-glob>]

Without a path, ``split`` (default ``train``) and ``subset`` pick files as ``datasets`` does:
the dataset card's ``configs:`` YAML if it has one, else the Hub's split naming convention
(``data/<split>-00000-of-00002.parquet``, ``<split>.jsonl``, ``<split>/...``, else every file
is ``train``). A path that is a directory applies the same convention inside it; a file or
glob is read as is.

>>> ds = resolve_dataset("hf://datasets/timdettmers/openassistant-guanaco",
...                      extensions=[".jsonl"])                             # doctest: +SKIP
>>> ds.revision, ds.files                                                   # doctest: +SKIP
('0b3d1a…', ['openassistant_best_replies_train.jsonl'])
"""

from __future__ import annotations

import dataclasses
import glob
import os
import re
from collections import Counter
from collections.abc import Sequence
from pathlib import Path, PurePosixPath
from typing import Any

from pyfast_tune.data.errors import HubError  # noqa: F401 (hub.HubError)
from pyfast_tune.locations import HF_PREFIX, is_hub_url  # noqa: F401 (hub.is_hub_url)

DEFAULT_SPLIT = "train"

# What a tokenizer needs (the engine reads tokenizer.json and tokenizer_config.json; chat's
# `hf` template and transformers read the rest); weights are never fetched for a tokenizer.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
)

# The split naming convention of the Hub (``datasets``' data_files module, which the Hub's
# dataset viewer follows): first sharded files ``data/<split>-NNNNN-of-NNNNN*``, then split
# names as directory names, then in file names, else every file is ``train``. Keywords map
# to their split; separators are ``-._``, space and digits.
_SPLIT_KEYWORDS = {
    "train": ("train", "training"),
    "validation": ("validation", "valid", "dev", "val"),
    "test": ("test", "testing", "eval", "evaluation"),
}
_SEP = "[-._ 0-9]"
_SHARDED = re.compile(r"data/(\w+(?:\.\w+)*)-[0-9]{5}-of-[0-9]{5}[^/]*\.[^/]*")
_DIR_PATTERNS = ("**/{k}/**", "**/{k}{s}*/**", "**/*{s}{k}/**", "**/*{s}{k}{s}*/**")
_FILE_PATTERNS = ("**/{k}{s}*", "**/*{s}{k}{s}*")
# Never data, whatever a pattern says (unless a pattern names them).
_NOT_DATA = frozenset(("README.md", "config.json", "dataset_info.json", "dataset_infos.json",
                       "dummy_data.zip", "dataset_dict.json"))  # fmt: skip
_COMPRESSION = (".gz", ".zst")


@dataclasses.dataclass(frozen=True)
class HubDataset:
    """An ``hf://`` input resolved to local files in the Hugging Face cache."""

    url: str
    repo_id: str
    revision: str  # the commit hash, never a branch name
    split: str | None  # the split that chose the files (None: a path or glob did)
    subset: str | None  # the config whose data_files chose them (None: the card has none)
    files: list[str]  # paths in the repository, in reading order
    paths: list[str]  # the same files in the local cache

    def source(self) -> dict[str, Any]:
        """The record ``pack`` writes into meta.json and the fingerprint (``sources``)."""
        return {"repo_id": self.repo_id, "repo_type": "dataset", "revision": self.revision,
                "split": self.split, "subset": self.subset, "files": list(self.files)}  # fmt: skip


def parse_hub_url(url: str) -> tuple[str, str | None, str]:
    """``hf://datasets/org/name@rev/path`` -> (``org/name``, ``rev`` or None, ``path``)."""
    from urllib.parse import unquote

    m = re.fullmatch(r"hf://datasets/([^/@]+)/([^/@]+)(?:@([^/]+))?(?:/(.*))?", url)
    if m is None:
        raise ValueError(
            f"{url!r}: expected hf://datasets/<org>/<name>[@<revision>][/<path-or-glob>] "
            "(models are named by id: --tokenizer <org>/<name>)"
        )
    org, name, rev, path = m.groups()
    # A revision with a slash (refs/convert/parquet) is written URL-encoded, as fsspec does.
    return f"{org}/{name}", unquote(rev) if rev else None, (path or "").strip("/")


def resolve_dataset(
    url: str,
    split: str | None = None,
    subset: str | None = None,
    extensions: Sequence[str] = (".jsonl", ".json"),
) -> HubDataset:
    """The local files of ``url`` (fetched into the cache unless offline) for ``split`` and
    ``subset``, and the commit they belong to. ``extensions`` are the file endings the engine
    reads. Raises :class:`HubError` naming the id when the data cannot be had, before anything
    is written.

    >>> resolve_dataset("hf://datasets/org/chats@v1.0", split="test").paths   # doctest: +SKIP
    """
    hf = _hub()
    repo_id, revision, path = parse_hub_url(url)
    where = f"hf://datasets/{repo_id}"
    commit, files, card = _repo_state(hf, repo_id, revision, where)
    where = f"{where}@{commit[:12]}"
    if path and subset is not None:
        raise ValueError(f"{url}: give a subset or a path in the repository, not both")
    chosen_split, chosen_subset = None, None
    if path and (_is_glob(path) or path in files):
        if split is not None:
            raise ValueError(f"{url}: names its files; a split ({split!r}) cannot also choose")
        chosen = _match([path], files) if _is_glob(path) else [path]
        if not chosen:
            raise HubError(f"{where}: no file matches {path!r}")
    elif path:
        if not any(f.startswith(path + "/") for f in files):
            raise HubError(f"{where}: no file or directory {path!r}")
        chosen_split = split or DEFAULT_SPLIT
        chosen = _split_files(files, path + "/", chosen_split, where)
    else:
        chosen_split = split or DEFAULT_SPLIT
        chosen_subset, chosen = _card_files(card, files, chosen_split, subset, where)
    chosen = _readable(chosen, extensions, where)
    local = _fetch(hf, repo_id, commit, chosen, where)
    return HubDataset(url, repo_id, commit, chosen_split, chosen_subset, chosen, local)


def resolve_tokenizer(name: str | os.PathLike) -> str:
    """A local tokenizer path for ``name``: ``name`` itself when such a path exists, else the
    Hub model id ``org/name[@revision]`` with only its tokenizer files fetched into the cache
    (offline: read from it). Raises :class:`HubError` naming the id when neither works.

    >>> resolve_tokenizer("Qwen/Qwen2.5-0.5B-Instruct")                       # doctest: +SKIP
    '~/.cache/huggingface/hub/models--Qwen--Qwen2.5-0.5B-Instruct/snapshots/7ae5…'
    """
    name = os.fspath(name)
    if os.path.exists(name) or not _looks_like_repo_id(name):
        return name  # a local path (or a missing one, which the engine reports as such)
    repo_id, _, revision = name.partition("@")
    hf = _hub()
    try:
        folder = hf.snapshot_download(
            repo_id,
            revision=revision or None,
            allow_patterns=list(TOKENIZER_FILES),
            local_files_only=_offline(hf),
        )
    except Exception as e:  # huggingface_hub's errors differ between its versions
        raise HubError(
            f"tokenizer {name!r}: no such local path, and as a Hugging Face Hub model id: "
            f"{_why(hf, e)}"
        ) from e
    if not os.path.isfile(os.path.join(folder, "tokenizer.json")):
        raise HubError(
            f"tokenizer {name!r} (Hub snapshot {folder}) has no tokenizer.json"
            + (" in the cache (HF_HUB_OFFLINE is set)" if _offline(hf) else "")
        )
    return folder


def _is_glob(path: str) -> bool:
    return any(c in path for c in "*?[")


def _looks_like_repo_id(name: str) -> bool:
    repo_id = name.partition("@")[0]
    part = r"[A-Za-z0-9][\w.-]*"
    return (
        re.fullmatch(rf"{part}(/{part})?", repo_id) is not None
        and "--" not in repo_id
        and not repo_id.endswith(".json")
    )


def _hub():
    try:
        import huggingface_hub
        import huggingface_hub.constants
        import huggingface_hub.errors  # noqa: F401  (submodules are not loaded by the package)
    except ImportError:
        raise HubError(
            "Hugging Face Hub inputs need the huggingface_hub package: pip install huggingface_hub"
        ) from None
    return huggingface_hub


def _offline(hf) -> bool:
    # Read at call time from huggingface_hub, which parses HF_HUB_OFFLINE once at import.
    return bool(hf.constants.HF_HUB_OFFLINE)


def _why(hf, e: Exception) -> str:
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    if _offline(hf):
        return f"not in the Hugging Face cache {hf.constants.HF_HUB_CACHE} and HF_HUB_OFFLINE is set ({text})"
    return text


def _repo_state(hf, repo_id: str, revision: str | None, where: str):
    """(commit hash, every file path at that commit, the card's YAML or None).

    huggingface_hub resolves the revision: online it asks the Hub (and records the branch or
    tag in the cache's ``refs/``, so a later offline run finds it), offline or unreachable it
    reads ``refs/`` and ``snapshots/``. The dataset card comes with it; the snapshot folder is
    named by the commit."""
    rev = revision or "main"
    try:
        snapshot = Path(
            hf.snapshot_download(
                repo_id,
                repo_type="dataset",
                revision=rev,
                allow_patterns=["README.md"],
                local_files_only=_offline(hf),
            )
        )
    except Exception as e:  # huggingface_hub's errors differ between its versions
        raise HubError(f"{where}@{rev}: {_why(hf, e)}") from e
    commit = snapshot.name
    files = _cached_tree(hf, repo_id, commit)
    if files is None and not _offline(hf):
        try:
            api = hf.HfApi()
            files = sorted(api.list_repo_files(repo_id, repo_type="dataset", revision=commit))
        except Exception:  # unreachable after all: the snapshot is what there is
            files = None
    if files is None:  # offline without a cached listing: the snapshot's files are all we know
        files = sorted(
            p.relative_to(snapshot).as_posix() for p in snapshot.rglob("*") if p.is_file()
        )
    readme = snapshot / "README.md"
    if "README.md" in files and not readme.is_file():
        raise HubError(
            f"{where}@{commit[:12]}: its dataset card README.md (which may define its subsets) "
            f"is not in the Hugging Face cache {hf.constants.HF_HUB_CACHE}"
        )
    return commit, files, _card_yaml(readme) if readme.is_file() else None


def _cached_tree(hf, repo_id: str, commit: str) -> list[str] | None:
    """The full file listing huggingface_hub cached for ``commit`` (newer versions keep one),
    so that files missing from a partial snapshot are reported rather than silently left out."""
    listing = getattr(hf, "get_cached_repo_tree", None)
    if listing is None:
        return None
    try:
        return sorted(f.path for f in listing(repo_id, repo_type="dataset", revision=commit))
    except Exception:  # CachedRepoTreeNotFoundError: nothing was listed for this commit
        return None


def _card_yaml(readme: str | os.PathLike) -> dict | None:
    from huggingface_hub.repocard import metadata_load

    return metadata_load(readme)


def _card_files(card, files, split: str, subset: str | None, where: str):
    """(subset used, files of ``split``) from the card's ``configs:`` or the naming convention."""
    configs = (card or {}).get("configs") or []
    if not configs:
        if subset is not None:
            raise HubError(
                f"{where}: no subset {subset!r}: its dataset card defines no subsets (configs)"
            )
        return None, _split_files(files, "", split, where)
    names = [c.get("config_name", "default") for c in configs]
    if subset is None:
        flagged = [c for c in configs if c.get("default")]
        named = [c for c in configs if c.get("config_name", "default") == "default"]
        pick = flagged or named or (configs if len(configs) == 1 else [])
        if not pick:
            raise HubError(f"{where}: several subsets and none is the default; pick one of {names}")
        config = pick[0]
    else:
        found = [c for c in configs if c.get("config_name", "default") == subset]
        if not found:
            raise HubError(f"{where}: no subset {subset!r}; its subsets: {names}")
        config = found[0]
    name = config.get("config_name", "default")
    base = (config.get("data_dir") or "").strip("/")
    base = base + "/" if base else ""
    if config.get("data_files") is None:
        return name, _split_files(files, base, split, f"{where} subset {name!r}")
    by_split = _data_files_by_split(config["data_files"], f"{where} subset {name!r}")
    if split not in by_split:
        raise HubError(f"{where} subset {name!r}: no split {split!r}; its splits: {list(by_split)}")
    chosen = _match([base + p for p in by_split[split]], files)
    if not chosen:
        raise HubError(f"{where} subset {name!r} split {split!r}: {by_split[split]} match no file")
    return name, chosen


def _data_files_by_split(spec, where: str) -> dict[str, list[str]]:
    """A card's ``data_files`` (a pattern, a list, or ``[{split, path}]``) as split -> patterns."""
    as_list = lambda v: list(v) if isinstance(v, list) else [v]  # noqa: E731
    if isinstance(spec, str):
        return {DEFAULT_SPLIT: [spec]}
    if isinstance(spec, dict):
        return {str(k): as_list(v) for k, v in spec.items()}
    if isinstance(spec, list) and all(isinstance(x, str) for x in spec):
        return {DEFAULT_SPLIT: list(spec)}
    if isinstance(spec, list) and all(isinstance(x, dict) and "split" in x for x in spec):
        return {str(x["split"]): as_list(x.get("path", [])) for x in spec}
    raise HubError(f"{where}: unreadable data_files {spec!r} in its dataset card")


def _split_files(files: list[str], base: str, split: str, where: str) -> list[str]:
    """The files of ``split`` under ``base`` by the Hub's split naming convention."""
    under = [f[len(base) :] for f in files if f.startswith(base)]
    by_split = _convention(under)
    if split not in by_split:
        raise HubError(f"{where}: no split {split!r}; its splits: {list(by_split)}")
    return [base + f for f in _match(by_split[split], under)]


def _convention(files: list[str]) -> dict[str, list[str]]:
    """split -> patterns, as the Hub names splits (see the module docstring)."""
    sharded: list[str] = []
    for f in files:
        m = _SHARDED.fullmatch(f)
        if m and m.group(1) not in sharded:
            sharded.append(m.group(1))
    if sharded:
        known = [s for s in _SPLIT_KEYWORDS if s in sharded]
        order = known + sorted(set(sharded) - set(known))
        return {s: [f"data/{s}-[0-9][0-9][0-9][0-9][0-9]-of-[0-9][0-9][0-9][0-9][0-9]*.*"]
                for s in order}  # fmt: skip
    for templates in (_DIR_PATTERNS, _FILE_PATTERNS):
        found = {
            split: pats
            for split, keywords in _SPLIT_KEYWORDS.items()
            if _match(pats := [t.format(k=k, s=_SEP) for k in keywords for t in templates], files)
        }
        if found:
            return found
    return {DEFAULT_SPLIT: ["**"]} if _match(["**"], files) else {}


def _match(patterns: list[str], files: list[str]) -> list[str]:
    """Files matching any pattern, pattern by pattern, each pattern's matches sorted. Hidden
    files and ``__special__`` directories, and the card and metadata files, only when a
    pattern names them (as ``datasets`` resolves data_files)."""
    from fsspec.utils import glob_translate  # huggingface_hub's own dependency

    out: list[str] = []
    seen: set[str] = set()
    for pattern in patterns:
        # fsspec's glob semantics, as datasets resolves data_files: * and ? within one path
        # component, [...] classes, a ** component spans any number of directories.
        rx = re.compile(glob_translate(pattern))
        ignore = _NOT_DATA - {PurePosixPath(pattern).name}
        for f in sorted(files):
            if f in seen or not rx.fullmatch(f) or PurePosixPath(f).name in ignore:
                continue
            if _hidden_or_special(f, pattern):
                continue
            seen.add(f)
            out.append(f)
    return out


def _hidden_or_special(path: str, pattern: str) -> bool:
    """A hidden part (``.x``) or ``__special__`` directory in ``path`` that ``pattern`` does
    not spell out: such files match only when asked for by name."""

    def hidden(p: PurePosixPath) -> int:
        return sum(1 for x in p.parts if x.startswith(".") and set(x) != {"."})

    def special(p: PurePosixPath) -> int:
        return sum(1 for x in p.parent.parts if x.startswith("__"))

    f, pat = PurePosixPath(path), PurePosixPath(pattern)
    return hidden(f) != hidden(pat) or special(f) != special(pat)


def _readable(files: list[str], extensions: Sequence[str], where: str) -> list[str]:
    """The files the engine reads; when several kinds are present (say .parquet and .jsonl),
    only the most common one, as ``datasets`` picks one loader per split."""

    def kind(f: str) -> str | None:
        if not any(f.endswith(e) for e in extensions):
            return None
        stem = f
        for c in _COMPRESSION:
            stem = stem.removesuffix(c)
        ext = PurePosixPath(stem).suffix
        return ".json" if ext in (".json", ".jsonl") else ext

    kinds = [kind(f) for f in files]
    counts = Counter(k for k in kinds if k is not None)
    if not counts:
        shown = ", ".join(files[:5]) + (f", ... ({len(files) - 5} more)" if len(files) > 5 else "")
        raise HubError(
            f"{where}: no file the engine reads among [{shown}]; readable: {', '.join(extensions)}"
        )
    best = max(counts, key=lambda k: (counts[k], -kinds.index(k)))
    return [f for f, k in zip(files, kinds) if k == best]


def _fetch(hf, repo_id: str, commit: str, files: list[str], where: str) -> list[str]:
    """Local paths of ``files`` at ``commit``, downloaded into the cache unless offline."""
    try:
        folder = hf.snapshot_download(
            repo_id,
            repo_type="dataset",
            revision=commit,
            allow_patterns=[glob.escape(f) for f in files],
            local_files_only=_offline(hf),
        )
    except Exception as e:
        raise HubError(f"{where}: {_why(hf, e)}") from e
    paths = [os.path.join(folder, f) for f in files]
    missing = [f for f, p in zip(files, paths) if not os.path.isfile(p)]
    if missing:
        shown = ", ".join(missing[:3]) + (
            f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        )
        raise HubError(
            f"{where}: {shown} not in the Hugging Face cache {hf.constants.HF_HUB_CACHE}"
            + (" and HF_HUB_OFFLINE is set" if _offline(hf) else "")
        )
    return paths
