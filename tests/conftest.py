"""Shared test setup.

TRITON_INTERPRET must be set before any Triton kernel is defined: there is no GPU on the
development and CI machines, so Triton kernels run (slowly) in the interpreter on CPU.
"""

import os
import socket
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault(
    "TORCH_EXTENSIONS_DIR", str(Path(__file__).resolve().parents[1] / ".torch_extensions")
)

import pytest  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
# PYFAST_TUNE_SHARED_DATA points elsewhere (a path that does not exist shows exactly what a
# fresh clone with nothing beside it runs and skips).
SHARED = Path(os.environ.get("PYFAST_TUNE_SHARED_DATA", ROOT.parent / "shared" / "data"))
NO_SHARED = f"{SHARED} is absent (only the project's own machines have it); the core tests generate their own data"


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


@pytest.fixture(scope="session")
def generated_chats(tmp_path_factory):
    """OpenAI-style chats of the demo's generated world (JSONL), the data the tiny tokenizer
    was trained on plus more: what training, export and workflow tests run on, so they run
    on any clone."""
    from pyfast_tune.demo import synth_conversations, write_jsonl

    return write_jsonl(
        synth_conversations(400, seed=2), tmp_path_factory.mktemp("chats") / "chats.jsonl"
    )


@pytest.fixture(scope="session")
def tiny_tokenizer_bos(tiny_tokenizer, tmp_path_factory):
    """The tiny tokenizer with a BOS token (``<|im_start|>``, as SmolLM2's config has), so the
    BOS rules of encoding are exercised too."""
    import json
    import shutil

    d = tmp_path_factory.mktemp("tok_bos")
    shutil.copy(tiny_tokenizer / "tokenizer.json", d / "tokenizer.json")
    config = json.loads((tiny_tokenizer / "tokenizer_config.json").read_text())
    config["bos_token"] = "<|im_start|>"
    (d / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return d


@pytest.fixture(params=["tiny_tokenizer", "tiny_tokenizer_bos"])
def generated_tokenizer(request):
    """Each generated tokenizer in turn: without and with a BOS token."""
    return request.getfixturevalue(request.param)


def shared_cases(cases: list) -> list:
    """Parameters of a test whose every case reads ../shared/data: all the cases when it is
    present; otherwise one case that skips with the reason, so a clone without it shows one
    skip for the test instead of one per case. Cases are values (one argument) or tuples."""
    if SHARED.exists():
        return list(cases)
    width = len(cases[0]) if isinstance(cases[0], tuple) else 1
    reason = f"{NO_SHARED}; every case of this test reads it"
    return [pytest.param(*[None] * width, marks=pytest.mark.skip(reason=reason), id="no-shared")]


# ---------------------------------------------------------------- tiny training runs


def packed_chats(d: Path, tokenizer, chats: Path, records: int, turns: int = 4) -> Path:
    """``records`` generated chats of at most ``turns`` turns (written to ``d/chat.jsonl``)
    packed into 256-token packs with the ``default`` template, in ``d/packed``."""
    from pyfast_tune.data import pack
    from pyfast_tune.trainer.tiny import trimmed_conversations

    jsonl = trimmed_conversations(chats, d / "chat.jsonl", records=records, turns=turns)
    pack([jsonl], d / "packed", tokenizer=tokenizer, max_length=256, format="openai",
         template="default")  # fmt: skip
    return d / "packed"


def tiny_training(
    d: Path, tokenizer, chats: Path, records: int, turns: int, config: str = ""
) -> dict:
    """What a tiny training run needs, made in ``d``: ``records`` generated chats of at most
    ``turns`` turns packed into 256-token packs (template ``default``), a tiny Llama, and
    ``run.yaml`` training it on them, with ``config`` (YAML lines) after model, data and
    max_length. Returns the paths: config, model, packed, jsonl, dir, and the tokenizer."""
    from pyfast_tune.trainer.tiny import make_tiny_llama

    packed_chats(d, tokenizer, chats, records, turns)
    jsonl = d / "chat.jsonl"
    model = make_tiny_llama(d / "tiny", tokenizer, seed=0, init_std=0.1)
    run_yaml = d / "run.yaml"
    run_yaml.write_text(f"model: {model}\ndata: {d / 'packed'}\nmax_length: 256\n{config}")
    return {"config": run_yaml, "model": model, "packed": d / "packed", "jsonl": jsonl, "dir": d,
            "tok": tokenizer}  # fmt: skip


def sgd_deepspeed_json(d: Path, preset: str) -> Path:
    """A DeepSpeed preset with torch's plain SGD (no momentum) for its AdamW, written in ``d``.

    For tests that compare weights (or what weights decide, such as greedy answers) between
    runs whose sums round differently (another world size, the fused loss): after an Adam
    step a weight whose gradient is near zero moves by up to lr in a direction rounding
    picks, so such comparisons would hold only on some CPUs; after SGD steps the weights
    differ by lr times the gradients' rounding."""
    import json

    from pyfast_tune.trainer.ds_config import load_deepspeed_json

    ds = load_deepspeed_json(preset)
    ds["optimizer"] = {"type": "SGD", "params": {"lr": "auto"}}
    path = d / f"{preset}_sgd.json"
    path.write_text(json.dumps(ds, indent=2))
    return path


def train_process(config: Path, out: Path, nproc: int = 1, *args: str, check: bool = True,
                  timeout: float = 900) -> subprocess.CompletedProcess:  # fmt: skip
    """Train ``config`` into ``out`` as ``pyfast-tune train`` does (torchrun, ``nproc``
    processes, extra ``args`` as config overrides); with ``check`` it must succeed."""
    from pyfast_tune.launch import launch_command

    cmd = launch_command(config, nproc=nproc, extra_args=["--output_dir", str(out), *args])
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    if nproc == 1:
        # One process needs no launcher (torchrun's agent costs ~2 s a run; the 2-process
        # runs keep it): the rank's variables are set here, whatever the test process's
        # environment holds, with a fresh port.
        cmd = [sys.executable, "-m", "pyfast_tune.train", *cmd[cmd.index("--config") :]]
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        env.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1",
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if check:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc


def train_metrics(config: Path, out: Path, nproc: int = 1, *args: str) -> list[dict]:
    """``train_process``, then the run's metrics.jsonl records."""
    from pyfast_tune.trainer.metrics import read_metrics

    train_process(config, out, nproc, *args)
    return read_metrics(out / "metrics.jsonl")
