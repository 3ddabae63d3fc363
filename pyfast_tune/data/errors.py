"""The data engine's exceptions: the extension's typed errors (each carries ``path``,
``line`` and ``record``) and the Python-side ones."""

from __future__ import annotations

from pyfast_tune import _packer

PackError = _packer.PackError
DataFormatError = _packer.DataFormatError
TokenizerError = _packer.TokenizerError
PackConfigError = _packer.PackConfigError
CorruptDataError = _packer.CorruptDataError
NoTrainableSamplesError = _packer.NoTrainableSamplesError
ShardMismatchError = _packer.ShardMismatchError
OutputExistsError = _packer.OutputExistsError
OutsideDataRootError = _packer.OutsideDataRootError


class HubError(FileNotFoundError):
    """A Hub repository, revision, subset, split or file that cannot be had: absent from the
    Hub, or (offline) absent from the cache. The message names the id."""


class FingerprintMismatch(PackError):
    """A packed directory was built with other settings than the caller asks for."""
