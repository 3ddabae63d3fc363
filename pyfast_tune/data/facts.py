"""Facts of the packed format and the encoder, read from the engine rather than restated."""

from __future__ import annotations

from pyfast_tune import _packer

IGNORE_INDEX = -100
IMAGE_TOKEN_INDEX = -200  # XTuner's placeholder for <image> (LLaVA)
# Facts of the packed format and the encoder, read from the engine rather than restated.
_FACTS = _packer.engine_facts()
IMAGE_TOKEN_ID: int = _FACTS["image_token_id"]  # IMAGE_TOKEN_INDEX as stored in input_ids.bin
FORMAT_VERSION: int = _FACTS["format_version"]
# Each binary file's (dtype, row width), in the order the engine writes them.
BINARY_LAYOUT: dict[str, tuple[str, int]] = {
    name: (f["dtype"], f["width"]) for name, f in _FACTS["binary_files"].items()
}
# Tokenizer classes that get no BOS token (XTuner's get_bos_eos_token_ids, as pack encodes).
NO_BOS_CLASSES: frozenset[str] = frozenset(_FACTS["no_bos_classes"])
