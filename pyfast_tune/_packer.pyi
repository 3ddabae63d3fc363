"""Typed stubs of the Rust extension ``pyfast_tune._packer`` (rust/packer-py/src/lib.rs).
Only ``pyfast_tune.data`` imports it; everyone else goes through that module."""

from collections.abc import Callable, Mapping
from os import PathLike
from typing import Any, Literal, TypedDict

__version__: str

class PackError(Exception):
    path: str | None
    line: int | None
    record: int | None

class DataFormatError(PackError): ...
class TokenizerError(PackError): ...
class PackConfigError(PackError): ...
class CorruptDataError(PackError): ...
class NoTrainableSamplesError(PackConfigError): ...
class ShardMismatchError(PackConfigError): ...
class OutputExistsError(PackConfigError): ...
class OutsideDataRootError(PackConfigError): ...

class ChatEncoder:
    def __init__(
        self, tokenizer: str | PathLike[str], template: str, system: str | None = None
    ) -> None: ...
    def encode(self, turns: list[tuple[str, str | None]]) -> tuple[list[int], list[bool]]: ...

Progress = Callable[[str, int, int], object] | None
# A pack option's value: what the engine's serde schema (PackConfig) reads.
OptionValue = None | bool | int | float | str | PathLike[str] | list[Any] | tuple[Any, ...]

class FieldDoc(TypedDict):
    name: str
    kind: str
    choices: list[str]
    help: str
    default: Any

class TemplateDict(TypedDict):
    name: str
    system: str | None
    instruction: str
    suffix: str
    suffix_as_eos: bool
    sep: str
    stop_words: list[str]

class BinaryFile(TypedDict):
    dtype: str
    width: int

class EngineFacts(TypedDict):
    format_version: int
    image_token_id: int
    binary_files: dict[str, BinaryFile]
    no_bos_classes: list[str]
    data_extensions: list[str]

class VerifyReport(TypedDict):
    ok: bool
    files: int
    tokens: int
    samples: int
    packs: int
    max_pack_tokens: int
    split_samples: int

# pack/merge_packs return the fields of ``pyfast_tune.data.PackStats`` (built from it with
# ``PackStats(**stats)``, which refuses a missing or unknown field).
def pack(
    options: Mapping[str, OptionValue],
    progress: Progress = None,
    fetch: Callable[[str, int, int], None] | None = None,
) -> dict[str, Any]: ...
def pack_defaults() -> dict[str, Any]: ...
def pack_fields() -> list[FieldDoc]: ...
def fingerprint(options: Mapping[str, OptionValue]) -> str: ...
def resolve_inputs(options: Mapping[str, OptionValue]) -> list[tuple[str, str]]: ...
def shard_reads(
    paths: list[str], sizes: list[int], index: int, shards: int, whole: bool
) -> list[Literal["", "whole", "part"]]: ...
def merge_packs(parts: list[str], out_dir: str, progress: Progress = None) -> dict[str, Any]: ...
def merge_plan(
    parts: list[str],
    out_dir: str,
    ranges: int,
    block_tokens: int | None = None,
    progress: Progress = None,
) -> dict[str, Any]: ...
def merge_write_range(staging: str, index: int) -> dict[str, list[str]]: ...
def merge_finish(staging: str, hashes: list[tuple[list[str], list[str]]]) -> dict[str, Any]: ...
def data_order(root: str, file_type: str) -> list[str]: ...
def read_pretok(path: str, min_length: int) -> tuple[int, int]: ...
def render_chats(
    tokenizer: str, conversations: list[list[dict[str, Any]]]
) -> list[tuple[str, list[int], list[int]]]: ...
def tokenizer_hash(path: str) -> str: ...
def templates() -> list[TemplateDict]: ...
def format_names() -> list[str]: ...
def engine_facts() -> EngineFacts: ...
def verify(path: str) -> VerifyReport: ...
def exchange_dirs(a: str | PathLike[str], b: str | PathLike[str]) -> bool: ...
