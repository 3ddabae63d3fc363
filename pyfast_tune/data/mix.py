"""Mixing sources by ratio: an input may be a mapping ``{path, name, format, columns, split,
subset, weight, max_samples}`` instead of a path, in ``pack(inputs=...)``, in a training
config's ``data.inputs`` and in a mix file (``pyfast-tune pack --mix mix.yaml``). The engine
makes the choice (``PackConfig.mix``): exact per-source counts, the same bytes on any thread
count or shard split. See docs/workflow-mixing.md."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence

from pyfast_tune.data.errors import PackConfigError
from pyfast_tune.data.facts import _FACTS
from pyfast_tune.data.options import _columns as columns_spec
from pyfast_tune.locations import is_hub_url

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing at run time
if TYPE_CHECKING:
    from typing import Any

SOURCE_KEYS = (
    "path",
    "name",
    "format",
    "columns",
    "split",
    "subset",
    "weight",
    "max_samples",
    "template",
)


def is_mix(inputs: Any) -> bool:
    """Whether ``inputs`` holds a source mapping (then every input is a source of a mix)."""
    if isinstance(inputs, Mapping):
        return True
    if isinstance(inputs, (str, os.PathLike)):
        return False
    return any(isinstance(x, Mapping) for x in inputs)


def _columns(columns: Any, where: str) -> str | None:
    if columns is None:
        return None
    if not isinstance(columns, (Mapping, str)):
        raise PackConfigError(f"{where}: columns must be a mapping or 'field=column,...' text")
    return columns_spec(columns)


def _number(value: Any, kind: type, where: str, key: str):
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise PackConfigError(f"{where}: {key} must be a number, got {value!r}")
    if kind is int and value != int(value):
        raise PackConfigError(f"{where}: {key} must be a whole number, got {value!r}")
    return kind(value)


def mix_sources(
    inputs: Any, template: str, split: str | None = None, subset: str | None = None
) -> tuple[list[dict], list[dict]]:
    """The engine's ``mix`` list and the Hub ``sources`` for ``inputs`` (paths or source
    mappings). ``split``/``subset`` are the defaults of Hub sources that name none; a source's
    ``template`` may only repeat the run's ``template``."""
    if isinstance(inputs, (Mapping, str, os.PathLike)):
        inputs = [inputs]
    mix: list[dict] = []
    sources: list[dict] = []
    for i, entry in enumerate(inputs):
        src = dict(entry) if isinstance(entry, Mapping) else {"path": os.fspath(entry)}
        where = f"mix source {i}"
        unknown = sorted(set(src) - set(SOURCE_KEYS))
        if unknown:
            raise PackConfigError(
                f"{where}: unknown keys {unknown}; a source takes {', '.join(SOURCE_KEYS)}"
            )
        if "path" not in src:
            raise PackConfigError(f"{where}: no path (a file, directory, glob or hf:// id)")
        paths = src["path"]
        paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
        if src.get("template") not in (None, template):
            raise PackConfigError(
                f"{where}: template {src['template']!r} differs from the run's {template!r}; "
                "one pack has one template (it is what training and chat use)"
            )
        local: list[str] = []
        for p in map(os.fspath, paths):
            if not is_hub_url(p):
                if src.get("split") is not None or src.get("subset") is not None:
                    raise PackConfigError(
                        f"{where}: split and subset choose the files of hf://datasets/... "
                        f"paths, and {p!r} is local"
                    )
                local.append(p)
                continue
            from pyfast_tune import hub

            ds = hub.resolve_dataset(
                p,
                split=src.get("split", split),
                subset=src.get("subset", subset),
                extensions=_FACTS["data_extensions"],
            )
            local.extend(ds.paths)
            sources.append(ds.source())
        out: dict[str, Any] = {"name": str(src.get("name") or os.fspath(paths[0])), "inputs": local}
        if src.get("format") is not None:
            out["format"] = str(src["format"])
        columns = _columns(src.get("columns"), where)
        if columns is not None:
            out["columns"] = columns
        if src.get("weight") is not None:
            out["weight"] = _number(src["weight"], float, where, "weight")
        if src.get("max_samples") is not None:
            out["max_samples"] = _number(src["max_samples"], int, where, "max_samples")
        mix.append(out)
    return mix, sources


def load_mix_file(path: str | os.PathLike) -> list[Any]:
    """The sources of a mix file: YAML or JSON, a list of sources or ``{"sources": [...]}``.
    Relative local paths are taken relative to the file's folder."""
    from pathlib import Path

    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise PackConfigError(f"{path}: cannot read the mix file ({e.strerror})") from None
    try:
        if path.suffix == ".json":
            doc = json.loads(text)
        else:
            import yaml

            doc = yaml.safe_load(text)
    except Exception as e:  # yaml.YAMLError / json.JSONDecodeError, with their position
        raise PackConfigError(f"{path}: not a valid mix file: {e}") from None
    if isinstance(doc, Mapping):
        unknown = sorted(set(doc) - {"sources"})
        if unknown:
            raise PackConfigError(f"{path}: unknown keys {unknown}; expected 'sources'")
        doc = doc.get("sources")
    if not isinstance(doc, Sequence) or isinstance(doc, str) or not doc:
        raise PackConfigError(f"{path}: expected a non-empty list of sources")
    return [_relative_to(path.parent, entry) for entry in doc]


def _relative_to(base: os.PathLike, entry: Any) -> Any:
    def fix(p: Any) -> Any:
        p = os.fspath(p)
        if is_hub_url(p) or os.path.isabs(p):
            return p
        return os.path.join(os.fspath(base), p)

    if isinstance(entry, Mapping):
        entry = dict(entry)
        if "path" in entry:
            paths = entry["path"]
            entry["path"] = (
                fix(paths) if isinstance(paths, (str, os.PathLike)) else [fix(x) for x in paths]
            )
        return entry
    return fix(entry)
