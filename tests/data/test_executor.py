"""``pack(..., executor=, shards=)``: the shards of one pack on local processes or a Ray
cluster, merged byte-identically to one ``pack``; resume, dead attempts, data errors, node
loss, and ``--shard auto`` from a Slurm job array."""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import threading
import time
from pathlib import Path

import pytest

from pyfast_tune.cli import main
from pyfast_tune.data import DataFormatError, PackConfigError, fingerprint, pack
from pyfast_tune.data.executor import ShardPlan, merge_ranged, run_sharded, write_range

FILES = ["input_ids.bin", "loss_mask.bin", "meta.json", "pack_samples.bin", "packs.bin",
         "samples.bin"]  # fmt: skip


@pytest.fixture(scope="module")
def chats(tmp_path_factory):
    """Two JSONL files of generated chats (openai format), unequal in size."""
    from pyfast_tune.demo import synth_conversations, write_jsonl

    d = tmp_path_factory.mktemp("executor_data")
    return [
        write_jsonl(synth_conversations(300, seed=2), d / "a.jsonl"),
        write_jsonl(synth_conversations(170, seed=3), d / "b.jsonl"),
    ]


def _opts(tok):
    return dict(tokenizer=tok, max_length=256, format="openai", template="default", seed=3)


@pytest.fixture(scope="module")
def one_pack(chats, tiny_tokenizer, tmp_path_factory):
    out = tmp_path_factory.mktemp("one") / "packed"
    stats = pack(chats, out, **_opts(tiny_tokenizer))
    assert stats.samples > 400
    return out, stats


def assert_same_bytes(a: Path, b: Path) -> None:
    assert sorted(os.listdir(b)) == sorted(os.listdir(a))
    for name in os.listdir(a):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


@pytest.mark.parametrize("shards", [1, 2, 3])
def test_local_executor_equals_one_pack(chats, tiny_tokenizer, one_pack, tmp_path, shards):
    out = tmp_path / "packed"
    stats = pack(chats, out, executor="local", shards=shards, **_opts(tiny_tokenizer))
    assert_same_bytes(one_pack[0], out)
    # The executor's options never reach the fingerprint.
    assert (
        stats.fingerprint == one_pack[1].fingerprint == fingerprint(chats, **_opts(tiny_tokenizer))
    )
    assert (stats.samples, stats.packs) == (one_pack[1].samples, one_pack[1].packs)
    assert not (tmp_path / "packed.parts").exists()  # the default work dir goes after the merge


def test_a_mix_passes_through_the_executor(chats, tiny_tokenizer, tmp_path):
    mix = [{"path": str(chats[0]), "name": "a", "weight": 1.5},
           {"path": str(chats[1]), "name": "b", "max_samples": 50}]  # fmt: skip
    one = pack(mix, tmp_path / "one", **_opts(tiny_tokenizer))
    two = pack(mix, tmp_path / "two", shards=2, **_opts(tiny_tokenizer))  # shards alone: local
    assert_same_bytes(tmp_path / "one", tmp_path / "two")
    assert [m["samples"] for m in two.mix] == [m["samples"] for m in one.mix] == [450, 50]


def test_resume_redoes_only_unfinished_parts(chats, tiny_tokenizer, one_pack, tmp_path):
    work = tmp_path / "work"
    pack(chats, tmp_path / "first", executor="local", shards=3, work_dir=work,
         **_opts(tiny_tokenizer))  # fmt: skip
    plan = ShardPlan(work, 3)
    assert plan.pending() == []  # a given work dir is kept
    # A run killed midway: part 1 never committed, and two attempts of it died while
    # encoding, one here and one on another host (the engine removes only its own host's).
    import shutil

    shutil.rmtree(plan.part(1))
    dead = [work / ".part-1-of-3.tmp-otherhost-77-1", work / ".part-1-of-3.tmp-here-4194305-2"]
    for d in dead:
        d.mkdir()
        (d / "stage_tokens.tmp").write_bytes(b"\0" * 100)
    before = {i: os.stat(plan.part(i) / "part.json").st_mtime_ns for i in (0, 2)}
    assert plan.pending() == [1]
    stats = pack(chats, tmp_path / "second", executor="local", shards=3, work_dir=work,
                 **_opts(tiny_tokenizer))  # fmt: skip
    assert {i: os.stat(plan.part(i) / "part.json").st_mtime_ns for i in (0, 2)} == before
    assert plan.complete(1) and not any(d.exists() for d in dead)
    assert sorted(p.name for p in work.iterdir()) == [
        "part-0-of-3", "part-1-of-3", "part-2-of-3", "plan.json"]  # fmt: skip
    assert_same_bytes(one_pack[0], tmp_path / "second")
    # A part left by a version that staged in another layout (no "format"): redone, not merged.
    meta = json.loads((plan.part(2) / "meta.json").read_text())
    del meta["format"]
    (plan.part(2) / "meta.json").write_text(json.dumps(meta))
    assert plan.pending() == [2]
    pack(chats, tmp_path / "third", executor="local", shards=3, work_dir=work,
         **_opts(tiny_tokenizer))  # fmt: skip
    assert plan.pending() == [] and os.stat(plan.part(0) / "part.json").st_mtime_ns == before[0]
    assert_same_bytes(one_pack[0], tmp_path / "third")
    assert stats.fingerprint == one_pack[1].fingerprint


@pytest.fixture(scope="module")
def parts3(chats, tiny_tokenizer, tmp_path_factory):
    """The three parts of one run, encoded once."""
    d = tmp_path_factory.mktemp("parts3")
    for i in range(3):
        pack(chats, d / f"part{i}", shard=(i, 3), **_opts(tiny_tokenizer))
    return [d / f"part{i}" for i in range(3)]


@pytest.mark.parametrize("ranges", [1, 2, 5])
def test_merge_in_ranges_equals_one_pack(parts3, one_pack, tmp_path, ranges):
    """Blocks of 1,024 tokens: every range many blocks, samples cut by block and range
    edges; ranges written in reverse order (any order gives the same bytes and hashes)."""
    out = tmp_path / "packed"
    seen = []

    def write_all(staging, k):
        assert k == ranges
        # Until the manifest, the output does not exist and the staging dir has no meta.json.
        assert not out.exists() and not (Path(staging) / "meta.json").exists()
        hashes = {i: write_range(staging, i) for i in reversed(range(k))}
        seen.append(k)
        return [hashes[i] for i in range(k)]

    stats, seconds = merge_ranged(parts3, out, ranges, write_all, block_tokens=1024)
    assert seen == [ranges] and set(seconds) == {"plan", "write", "finish"}
    assert_same_bytes(one_pack[0], out)
    assert (stats.samples, stats.packs, stats.fingerprint) == (
        one_pack[1].samples, one_pack[1].packs, one_pack[1].fingerprint)  # fmt: skip
    assert not [p for p in tmp_path.iterdir() if p.name != "packed"]  # no staging left


def test_each_input_byte_is_hashed_by_one_shard(parts3, chats):
    """A file split between shards is hashed in blocks, each by the shard whose share holds
    its first byte; the merge folds them (the merged fingerprint equals one pack's: above)."""
    owned = {}
    for part in parts3:
        doc = json.loads((part / "part.json").read_text())
        for (f, _), entry, row in zip(doc["read"], doc["file_entries"], doc["file_table"]):
            blocks = row.get("blake3_blocks")
            if blocks is not None:
                assert entry["blake3"] is None  # left to the merge
                owned.setdefault(f, []).extend(
                    range(blocks["first"], blocks["first"] + len(blocks["cvs"]))
                )
    sizes = [c.stat().st_size for c in chats]
    block = [max(1024, 1 << max(0, (s // 256 - 1).bit_length())) for s in sizes]
    assert owned == {f: list(range(-(-sizes[f] // block[f]))) for f in range(len(chats))}


def test_a_file_changed_between_shards_is_refused(chats, tiny_tokenizer, tmp_path):
    import shutil

    from pyfast_tune.data import ShardMismatchError, merge_packs

    data = tmp_path / "a.jsonl"
    shutil.copy(chats[0], data)
    pack(data, tmp_path / "p0", shard=(0, 2), **_opts(tiny_tokenizer))
    raw = bytearray(data.read_bytes())  # a new version, same size: one letter changed
    at = raw.index(b'"content": "') + len(b'"content": "')
    raw[at] = ord("Q") if raw[at] != ord("Q") else ord("R")
    data.write_bytes(bytes(raw))
    pack(data, tmp_path / "p1", shard=(1, 2), **_opts(tiny_tokenizer))
    with pytest.raises(ShardMismatchError, match="changed between the shards"):
        merge_packs([tmp_path / "p0", tmp_path / "p1"], tmp_path / "out")


def test_a_failed_range_leaves_no_output(parts3, tmp_path):
    out = tmp_path / "packed"

    def write_all(staging, k):
        write_range(staging, 0)
        raise OSError("node lost")

    with pytest.raises(OSError, match="node lost"):
        merge_ranged(parts3, out, 2, write_all, block_tokens=1024)
    assert list(tmp_path.iterdir()) == []  # neither the output nor its staging dir


def test_local_executor_merges_in_parallel_ranges(chats, tiny_tokenizer, one_pack, tmp_path):
    out = tmp_path / "packed"
    opts = {"inputs": chats, **_opts(tiny_tokenizer)}
    stats = run_sharded(opts, out, "local", 2, _block_tokens=1024)
    assert_same_bytes(one_pack[0], out)
    assert stats.write_seconds > 0 and stats.encode_seconds > 0


def test_a_work_dir_of_another_run_is_refused(chats, tiny_tokenizer, tmp_path):
    work = tmp_path / "work"
    pack(chats, tmp_path / "a", shards=2, work_dir=work, **_opts(tiny_tokenizer))
    other = {**_opts(tiny_tokenizer), "max_length": 300}
    with pytest.raises(PackConfigError, match="holds the parts of another run"):
        pack(chats, tmp_path / "b", shards=2, work_dir=work, **other)
    with pytest.raises(PackConfigError, match="holds the parts of another run"):
        pack(chats, tmp_path / "b", shards=3, work_dir=work, **_opts(tiny_tokenizer))
    assert json.loads((work / "plan.json").read_text())["num_shards"] == 2


@pytest.fixture(scope="module")
def bad_chats(chats, tmp_path_factory):
    """b.jsonl with line 8 (record 7) cut short."""
    lines = chats[1].read_text().splitlines()
    lines[7] = '{"messages": [oops'
    bad = tmp_path_factory.mktemp("bad") / "b.jsonl"
    bad.write_text("\n".join(lines) + "\n")
    return [chats[0], bad]


def test_local_data_error_is_the_engines_own(bad_chats, tiny_tokenizer, tmp_path):
    with pytest.raises(DataFormatError) as one:
        pack(bad_chats, tmp_path / "one", **_opts(tiny_tokenizer))
    with pytest.raises(DataFormatError) as sharded:
        pack(bad_chats, tmp_path / "two", shards=2, **_opts(tiny_tokenizer))
    assert str(sharded.value) == str(one.value)
    assert str(bad_chats[1]) + ":8:" in str(sharded.value) and "record 7" in str(sharded.value)
    assert (sharded.value.path, sharded.value.line) == (str(bad_chats[1]), 8)
    assert not (tmp_path / "two").exists()


def test_bad_executor_arguments(chats, tiny_tokenizer, tmp_path):
    for kwargs, msg in [
        ({"executor": "local"}, "shards must be a whole number"),
        ({"shards": 0}, "shards must be a whole number"),
        ({"executor": "dask", "shards": 2}, "executor must be one of"),
        ({"shards": 2, "retries": -1}, "retries must be"),
        ({"shards": 2, "shard": (0, 2)}, "not both"),
        ({"shards": 2, "map_fn": dict}, "map_fn"),
        ({"work_dir": "w"}, "go with executor= or shards=N"),
    ]:
        with pytest.raises(PackConfigError, match=msg):
            pack(chats, tmp_path / "x", **kwargs, **_opts(tiny_tokenizer))


def test_a_missing_ray_names_the_extra(chats, tiny_tokenizer, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    with pytest.raises(PackConfigError, match=r"pip install 'pyfast-tune\[ray\]'"):
        pack(chats, tmp_path / "x", executor="ray", shards=2, **_opts(tiny_tokenizer))


def test_ray_with_an_object_storage_output_needs_a_shared_work_dir(chats, tiny_tokenizer):
    # the merge's range tasks write the output wherever they run: never into one machine's
    # local cache (before anything is read or connected)
    with pytest.raises(PackConfigError, match=r"s3://b/packed needs work_dir .*every node"):
        pack(chats, "s3://b/packed", executor="ray", shards=2, **_opts(tiny_tokenizer))


def _cli(chats, tok, *args):
    return ["pack", *map(str, chats), "--tokenizer", str(tok), "--max-length", "256",
            "--format", "openai", "--seed", "3", "--quiet", *args]  # fmt: skip


def test_cli_shard_auto_reads_the_slurm_array(chats, tiny_tokenizer, one_pack, tmp_path,
                                              monkeypatch, capsys):  # fmt: skip
    for task in (1, 2):  # sbatch --array=1-2: IDs count from SLURM_ARRAY_TASK_MIN
        monkeypatch.setenv("SLURM_ARRAY_TASK_ID", str(task))
        monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "2")
        monkeypatch.setenv("SLURM_ARRAY_TASK_MIN", "1")
        out = tmp_path / f"part{task}"
        assert main(_cli(chats, tiny_tokenizer, "--shard", "auto", "--out", str(out))) == 0
        meta = json.loads((out / "meta.json").read_text())
        assert (meta["shard"], meta["num_shards"]) == (task - 1, 2)
    assert main(["merge-packs", str(tmp_path / "part2"), str(tmp_path / "part1"), "--out",
                 str(tmp_path / "packed"), "--quiet"]) == 0  # fmt: skip
    assert_same_bytes(one_pack[0], tmp_path / "packed")
    monkeypatch.delenv("SLURM_ARRAY_TASK_ID")
    with pytest.raises(SystemExit):
        main(_cli(chats, tiny_tokenizer, "--shard", "auto", "--out", str(tmp_path / "x")))
    assert "SLURM_ARRAY_TASK_ID" in capsys.readouterr().err


def test_cli_local_executor(chats, tiny_tokenizer, one_pack, tmp_path, capsys):
    out = tmp_path / "packed"
    args = ["--executor", "local", "--shards", "2", "--work-dir", str(tmp_path / "w")]
    assert main(_cli(chats, tiny_tokenizer, *args, "--out", str(out))) == 0
    assert_same_bytes(one_pack[0], out)
    assert f"packed {out}:" in capsys.readouterr().out


# ---------------------------------------------------------------- Ray

needs_ray = pytest.mark.skipif(
    importlib.util.find_spec("ray") is None,
    reason="the Ray executor's tests need Ray: pip install 'pyfast-tune[ray]'",
)


def _start_cluster(head_cpus: int, workers: int):
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True,
                      head_node_args={"num_cpus": head_cpus, "include_dashboard": False})  # fmt: skip
    nodes = [cluster.add_node(num_cpus=1) for _ in range(workers)]
    cluster.wait_for_nodes()
    return cluster, nodes


@pytest.fixture(scope="module")
def ray_cluster():
    """Three nodes of one CPU each (the head is one of them)."""
    cluster, _ = _start_cluster(head_cpus=1, workers=2)
    yield cluster
    cluster.shutdown()


def _attempts(marks: Path):
    """A ``before`` hook for the shard tasks: records (shard, node) of every attempt. A
    closure, so Ray pickles it by value (this test module is not importable on the nodes)."""

    def before(i: int) -> None:
        import ray

        node = ray.get_runtime_context().get_node_id()
        (marks / f"{i}-{node}-{time.monotonic_ns()}").touch()

    return before


@needs_ray
def test_ray_cluster_packs_4_shards_like_one_pack(ray_cluster, chats, tiny_tokenizer,
                                                  one_pack, tmp_path):  # fmt: skip
    marks = tmp_path / "marks"
    marks.mkdir()
    out = tmp_path / "packed"
    record = _attempts(marks)

    def meet(i: int) -> None:
        # Ray hands a finished task's worker the next queued one, so shards of a few ms
        # (these) may all run on the first node leased: each attempt waits (up to 30 s) until
        # a second node has started one, which only a cluster that never spreads fails.
        record(i)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if len({m.name.split("-")[1] for m in marks.iterdir()}) >= 2:
                return
            time.sleep(0.02)

    # Not connected yet: run_ray connects to the address, runs, and disconnects.
    stats = run_sharded({"inputs": chats, **_opts(tiny_tokenizer)}, out, "ray", 4,
                        address=ray_cluster.address, _before=meet)  # fmt: skip
    assert_same_bytes(one_pack[0], out)
    assert stats.fingerprint == one_pack[1].fingerprint
    seen = [m.name.split("-") for m in marks.iterdir()]
    assert sorted(int(s[0]) for s in seen) == [0, 1, 2, 3]  # each shard once
    assert len({s[1] for s in seen}) >= 2  # spread over the nodes


@needs_ray
def test_ray_data_error_is_reported_once_not_retried(ray_cluster, bad_chats, tiny_tokenizer,
                                                     tmp_path):  # fmt: skip
    marks = tmp_path / "marks"
    marks.mkdir()
    with pytest.raises(DataFormatError) as e:
        run_sharded({"inputs": bad_chats, **_opts(tiny_tokenizer)}, tmp_path / "out", "ray", 2,
                    address=ray_cluster.address, retries=3, _before=_attempts(marks))  # fmt: skip
    assert (e.value.path, e.value.line) == (str(bad_chats[1]), 8)
    assert "record 7" in str(e.value)
    tries = [m.name.split("-")[0] for m in marks.iterdir()]
    # The bad shard (1) ran once; shard 0 may have been cancelled before it started.
    assert tries.count("1") == 1 and tries.count("0") <= 1, tries
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
@needs_ray
def test_ray_node_lost_mid_shard_reruns_elsewhere(chats, tiny_tokenizer, one_pack, tmp_path):
    """Three one-CPU worker nodes (the head takes no tasks); a worker node is removed
    ungracefully while its shard runs: the shard reruns on another node, and the bytes
    are still those of one pack."""
    cluster, nodes = _start_cluster(head_cpus=0, workers=3)
    marks = tmp_path / "marks"
    marks.mkdir()
    record = _attempts(marks)

    def hold(i: int) -> None:
        record(i)
        time.sleep(4)  # long enough for the test to kill the node under this attempt

    killed = {}

    def kill_a_busy_node() -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not killed:
            for m in marks.iterdir():
                shard, node_id, _ = m.name.split("-")
                victim = next((n for n in nodes if n.node_id == node_id), None)
                if victim is not None:
                    killed.update(shard=int(shard), node=node_id)
                    cluster.remove_node(victim, allow_graceful=False)
                    return
            time.sleep(0.05)

    killer = threading.Thread(target=kill_a_busy_node)
    killer.start()
    try:
        stats = run_sharded({"inputs": chats, **_opts(tiny_tokenizer)}, tmp_path / "packed",
                            "ray", 4, address=cluster.address, retries=3, _before=hold)  # fmt: skip
    finally:
        killer.join()
        cluster.shutdown()
    assert killed, "no shard attempt started"
    assert_same_bytes(one_pack[0], tmp_path / "packed")
    assert stats.fingerprint == one_pack[1].fingerprint
    attempts = [m.name.split("-")[:2] for m in marks.iterdir()]
    ran_on = {node for shard, node in attempts if int(shard) == killed["shard"]}
    assert killed["node"] in ran_on and len(ran_on) >= 2, attempts  # rerun on another node


def test_a_run_killed_midway_reruns_only_unfinished_parts(chats, tiny_tokenizer, one_pack,
                                                          tmp_path):  # fmt: skip
    """The driver and its workers are SIGKILLed while shards 2 and 3 are held (shards 0 and 1
    committed); the rerun encodes 2 and 3 only and merges the bytes of one pack."""
    import signal
    import subprocess

    (tmp_path / "hold.py").write_text(
        "import time\ndef hold(i):\n    if i >= 2:\n        time.sleep(600)\n"
    )
    work = tmp_path / "work"
    script = (
        "import sys\n"
        f"sys.path.insert(0, {str(tmp_path)!r})\n"
        "from hold import hold\n"
        "from pyfast_tune.data.executor import run_sharded\n"
        "if __name__ == '__main__':\n"
        f"    run_sharded({{'inputs': {[str(c) for c in chats]!r}, **{_opts(str(tiny_tokenizer))!r}}},"
        f" {str(tmp_path / 'first')!r}, 'local', 4, work_dir={str(work)!r}, _before=hold)\n"
    )
    (tmp_path / "driver.py").write_text(script)
    proc = subprocess.Popen([sys.executable, str(tmp_path / "driver.py")], start_new_session=True)
    plan = ShardPlan(work, 4)
    try:
        deadline = time.monotonic() + 120
        while plan.pending() != [2, 3] and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.1)
        assert plan.pending() == [2, 3], f"driver exited {proc.poll()} before the kill"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert not (tmp_path / "first").exists()
    before = {i: os.stat(plan.part(i) / "part.json").st_mtime_ns for i in (0, 1)}
    stats = pack(chats, tmp_path / "second", executor="local", shards=4, work_dir=work,
                 **_opts(tiny_tokenizer))  # fmt: skip
    assert {i: os.stat(plan.part(i) / "part.json").st_mtime_ns for i in (0, 1)} == before
    assert plan.pending() == []
    assert_same_bytes(one_pack[0], tmp_path / "second")
    assert stats.fingerprint == one_pack[1].fingerprint
