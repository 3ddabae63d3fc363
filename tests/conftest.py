"""Shared test setup.

TRITON_INTERPRET must be set before any Triton kernel is defined: there is no GPU on the
development and CI machines, so Triton kernels run (slowly) in the interpreter on CPU.
"""

import os
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault(
    "TORCH_EXTENSIONS_DIR", str(Path(__file__).resolve().parents[1] / ".torch_extensions")
)

import pytest  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
NO_SHARED = "../shared/data is absent (only the project's own machines have it); the core tests generate their own data"


def shared_path(*parts: str) -> Path:
    """Path under ../shared/data; skips the calling test with a stated reason when absent."""
    p = SHARED.joinpath(*parts)
    if not p.exists():
        pytest.skip(f"{NO_SHARED}: missing {p}")
    return p


@pytest.fixture
def shared_data():
    return shared_path


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory):
    """A byte-level BPE tokenizer trained on generated data (no download, no ../shared)."""
    from pyfast_tune.demo import make_tokenizer, synth_conversations

    d = tmp_path_factory.mktemp("tok")
    make_tokenizer(synth_conversations(300, seed=1), d)
    return d
