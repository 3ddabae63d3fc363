"""pyfast-tune: fast, exact, reproducible fine-tuning of Hugging Face causal LMs.

The data engine (``pack``, ``PackedDataset``) needs only numpy; training needs the
``[train]`` extra (torch, transformers, peft, deepspeed). Names load lazily, so importing
``pyfast_tune.kernels`` never loads the Rust extension and ``pyfast_tune.data`` never loads torch.

>>> from pyfast_tune import pack, PackedDataset        # doctest: +SKIP
>>> stats = pack(["data/"], "packed/", tokenizer="tok/", max_length=4096, template="qwen_chat")
>>> ds = PackedDataset("packed/"); ds[0]["cu_seqlens"]
"""

__version__ = "0.1.0"

_DATA_NAMES = (
    "pack",
    "fingerprint",
    "PackedDataset",
    "PackStats",
    # Every exception the data engine raises (subclasses first name their base here).
    "PackError",
    "DataFormatError",
    "TokenizerError",
    "PackConfigError",
    "CorruptDataError",
    "NoTrainableSamplesError",
    "ShardMismatchError",
    "OutputExistsError",
    "OutsideDataRootError",
    "FingerprintMismatch",
)
# Raised when a C++ kernel extension cannot be compiled (pyfast_tune.kernels).
_KERNEL_NAMES = ("ExtensionBuildError",)
# Raised for a bad training config (a ValueError: missing, unknown or out-of-choice keys).
_CONFIG_NAMES = ("ConfigError",)
# Raised for a Hub dataset or tokenizer id that cannot be resolved (a FileNotFoundError).
_HUB_NAMES = ("HubError",)

__all__ = [*_DATA_NAMES, *_KERNEL_NAMES, *_CONFIG_NAMES, *_HUB_NAMES, "__version__"]


def __getattr__(name: str):
    if name in _DATA_NAMES:
        from pyfast_tune import data

        return getattr(data, name)
    if name in _KERNEL_NAMES:
        from pyfast_tune.kernels.varlen_attention import cpu as _cpp

        return getattr(_cpp, name)
    if name in _CONFIG_NAMES:
        from pyfast_tune import config

        return getattr(config, name)
    if name in _HUB_NAMES:
        from pyfast_tune import hub

        return getattr(hub, name)
    raise AttributeError(f"module 'pyfast_tune' has no attribute {name!r}")
