"""The data engine's exceptions: the extension's typed errors (each carries ``path``,
``line`` and ``record``) and the Python-side ones."""

from __future__ import annotations

from pyfast_tune import _packer, hub

PackError = _packer.PackError
DataFormatError = _packer.DataFormatError
TokenizerError = _packer.TokenizerError
PackConfigError = _packer.PackConfigError
CorruptDataError = _packer.CorruptDataError
NoTrainableSamplesError = _packer.NoTrainableSamplesError
ShardMismatchError = _packer.ShardMismatchError
OutputExistsError = _packer.OutputExistsError
OutsideDataRootError = _packer.OutsideDataRootError
# A Hub input (hf://datasets/...) or tokenizer id that cannot be had (offline: not cached).
HubError = hub.HubError


class FingerprintMismatch(PackError):
    """A packed directory was built with other settings than the caller asks for."""
