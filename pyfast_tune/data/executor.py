"""Run the N shards of one ``pack`` on local processes or a Ray cluster, then merge them.

The plan: shard i of N is encoded by ``pack(..., shard=(i, N))`` into ``work_dir/part-i-of-N``
and the N parts are merged into the output, byte-identical to one machine's ``pack``
(rust/packer/src/pack/shard.rs says why). The merge runs in three steps
(rust/packer/src/pack/shard/ranged.rs): one plan from the samples' lengths (bytes per sample,
in this process), then the tokens copied by the executor's workers into disjoint ranges of
the final files (each returns its blocks' BLAKE3 chaining values), then ``meta.json``
written last and the directory committed, so no process copies every token. The executor only decides *where* each
shard runs; the options that decide the bytes pass through unchanged (mixes included), and
the executor's own options (executor, shards, address, retries, work_dir) never reach the
engine, so they never reach the fingerprint.

A part is complete once the engine committed it: its ``meta.json`` (written last into the
staging directory, which is then renamed into place) marks it as part i of N. A rerun skips
complete parts (resume) and removes the staging folders ``.part-i-of-N.tmp-*`` that dead
attempts left. The engine itself only removes those of dead processes of its own host; an
attempt lost with its node left one named after another host, which only the executor knows
to be dead: the scheduler starts a new attempt of a shard only after the previous one failed.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import inspect
import json
import os
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from pyfast_tune import _packer
from pyfast_tune.data import errors
from pyfast_tune.data.errors import PackConfigError, PackError
from pyfast_tune.data.options import PackStats
from pyfast_tune.data.packing import fingerprint, pack

EXECUTORS = ("local", "ray")
PLAN = "plan.json"
PART_KIND = "pyfast-tune pack part"  # meta.json "kind" of a committed part (shard.rs KIND)
# Its layout (shard.rs PART_FORMAT): a part of another format is redone, never merged.
PART_FORMAT = 4
RAY_EXTRA = "pip install 'pyfast-tune[ray]'"


class ShardPlan:
    """N shards of one run and where their parts live: ``work_dir/part-i-of-N``."""

    def __init__(self, work_dir: str | os.PathLike, shards: int):
        if isinstance(shards, bool) or not isinstance(shards, int) or shards < 1:
            raise PackConfigError(f"shards must be a whole number >= 1, got {shards!r}")
        self.work_dir = Path(work_dir)
        self.shards = shards

    def part(self, i: int) -> Path:
        return self.work_dir / f"part-{i}-of-{self.shards}"

    def parts(self) -> list[Path]:
        return [self.part(i) for i in range(self.shards)]

    def complete(self, i: int) -> bool:
        """Was part i committed by the engine? (meta.json is the last thing it writes.)"""
        try:
            meta = json.loads((self.part(i) / "meta.json").read_text())
        except (OSError, ValueError):
            return False
        return (
            meta.get("kind") == PART_KIND
            and meta.get("format") == PART_FORMAT
            and meta.get("shard") == i
            and meta.get("num_shards") == self.shards
            and (self.part(i) / "part.json").is_file()
        )

    def pending(self) -> list[int]:
        return [i for i in range(self.shards) if not self.complete(i)]

    def remove_staging(self, i: int) -> int:
        """Remove the staging folders of part i left by dead attempts; how many."""
        prefix = f".{self.part(i).name}.tmp-"
        removed = 0
        for entry in self.work_dir.glob(prefix + "*"):
            shutil.rmtree(entry, ignore_errors=True)
            removed += not entry.exists()
        return removed

    def prepare(self, key: str, replace_stale: bool = False) -> None:
        """Create the work dir, or check that the parts in it belong to this run: ``key`` is
        the run's key (run_key), and parts of another run must never be merged into this one.
        Parts of another run are an error, or with ``replace_stale`` (the default work dir,
        ours alone) removed."""
        self.work_dir.mkdir(parents=True, exist_ok=True)
        plan = {"key": key, "num_shards": self.shards}
        path = self.work_dir / PLAN
        if path.is_file():
            try:
                found = json.loads(path.read_text())
            except ValueError:
                found = None
            if found != plan and replace_stale:
                shutil.rmtree(self.work_dir)
                self.work_dir.mkdir(parents=True)
            elif found != plan:
                raise PackConfigError(
                    f"{self.work_dir}: holds the parts of another run ({path}: {found}, this run "
                    f"{plan}); remove the folder or give another work dir"
                )
            else:
                return
        tmp = path.with_name(PLAN + ".tmp")
        tmp.write_text(json.dumps(plan))
        os.replace(tmp, path)


def pack_shard(
    options: dict[str, Any],
    plan: ShardPlan,
    i: int,
    before: Callable[[int], Any] | None = None,
) -> tuple[str, Any]:
    """Encode shard i of ``plan`` (the body of a local or Ray task).

    Returns ``("done", tokens)``, or ``("error", (class name, message, {path, line,
    record}))`` for a data or configuration error: returned, not raised, so that no scheduler retries it and the caller raises the engine's
    own exception (same type, file and record) exactly once. ``before(i)`` runs first (tests
    use it to hold a shard while they kill its node)."""
    if before is not None:
        before(i)
    if not plan.complete(i):  # a retry after the commit finds it done
        plan.remove_staging(i)
        try:
            pack(**options, out_dir=plan.part(i), shard=(i, plan.shards))
        except PackError as e:
            # The extension's classes do not pickle (their module is ``_packer``): send the
            # class name, message and where, and raise the same class on the caller's side.
            where = {k: getattr(e, k, None) for k in ("path", "line", "record")}
            return "error", (type(e).__name__, str(e), where)
    doc = json.loads((plan.part(i) / "part.json").read_text())
    return "done", int(doc["tokens"])


def run_key(options: dict[str, Any]) -> str:
    """What keys a work dir: the options, and each local input file's path, size and
    modification time (remote and Hub inputs by their spelling; their cached copies are
    keyed by version). A file changed between the shards of a resumed run is refused by the
    merge (its parts disagree on size or modification time)."""
    listing = []
    for inp in options.get("inputs") or []:
        spec = inp.get("path") if isinstance(inp, dict) else inp
        specs = spec if isinstance(spec, (list, tuple)) else [spec]
        for p in specs:
            if not isinstance(p, (str, os.PathLike)) or "://" in os.fspath(p):
                continue
            root = Path(p)
            if root.is_dir():
                files = sorted(root.rglob("*"))
            elif any(c in os.fspath(p) for c in "*?["):
                files = sorted(Path(f) for f in glob.glob(os.fspath(p), recursive=True))
            else:
                files = [root]
            for f in files:
                try:
                    st = f.stat()
                except OSError:
                    continue
                if f.is_file():
                    listing.append([os.fspath(f), st.st_size, st.st_mtime_ns])
    # The options that decide the bytes (fingerprint's), defaults filled in, however spelled.
    decide = inspect.signature(fingerprint).parameters
    spelled = {k: options.get(k, p.default) for k, p in decide.items()}
    text = json.dumps([spelled, listing], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def write_range(staging: str, index: int) -> tuple[list[str], list[str]]:
    """Copy range ``index`` of a staged merge into place (the body of a local or Ray task);
    its blocks' hashes. Idempotent: a retry writes the same bytes to the same place."""
    out = _packer.merge_write_range(staging, index)
    return out["ids"], out["mask"]


def merge_ranged(
    parts: Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    ranges: int,
    write_all: Callable[[str, int], list[tuple[list[str], list[str]]]],
    block_tokens: int | None = None,
) -> tuple[PackStats, dict[str, float]]:
    """Merge ``parts`` into ``out_dir`` in ranges: plan here, then
    ``write_all(staging, k)`` runs :func:`write_range` for ranges ``0..k`` wherever it
    likes and returns their results in order, then the manifest is written and the
    directory committed. A run the serial merge refuses (pairs beside single samples, a
    mix of pairs) is handed to it by the plan step, for its error. Returns the statistics
    and the seconds of each step (plan, write, finish)."""
    t0 = time.monotonic()
    planned = _packer.merge_plan([os.fspath(p) for p in parts], os.fspath(out_dir), ranges,
                                 block_tokens)  # fmt: skip
    t1 = time.monotonic()
    if "stats" in planned:
        return PackStats(**planned["stats"]), {"plan": t1 - t0, "write": 0.0, "finish": 0.0}
    staging = planned["staging"]
    try:
        hashes = write_all(staging, planned["ranges"])
        t2 = time.monotonic()
        stats = _packer.merge_finish(staging, [(list(i), list(m)) for i, m in hashes])
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    t3 = time.monotonic()
    return PackStats(**stats), {"plan": t1 - t0, "write": t2 - t1, "finish": t3 - t2}


def _write_local(workers: int) -> Callable[[str, int], list[tuple[list[str], list[str]]]]:
    def write_all(staging: str, k: int) -> list[tuple[list[str], list[str]]]:
        if k == 1 or workers == 1:
            return [write_range(staging, i) for i in range(k)]
        from concurrent.futures import ProcessPoolExecutor
        from multiprocessing import get_context

        with ProcessPoolExecutor(min(k, workers), mp_context=get_context("spawn")) as pool:
            return list(pool.map(write_range, [staging] * k, range(k)))

    return write_all


def _write_ray(retries: int) -> Callable[[str, int], list[tuple[list[str], list[str]]]]:
    def write_all(staging: str, k: int) -> list[tuple[list[str], list[str]]]:
        import ray

        task = ray.remote(num_cpus=1, max_retries=retries, scheduling_strategy="SPREAD")(
            write_range
        )
        refs = [task.remote(staging, i) for i in range(k)]
        try:
            return ray.get(refs)
        except ray.exceptions.RayError as e:
            for ref in refs:
                ray.cancel(ref, force=True)
            raise PackError(f"merge: writing a range of {staging} failed: {e}") from e

    return write_all


class _Progress:
    """One bar over all shards: shards done, tokens/s of the encoded parts, ETA."""

    def __init__(self, total: int, done: int, enabled: bool):
        self.start = time.monotonic()
        self.tokens = 0
        self.bar = None
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=done, desc="shards", unit="shard")

    def shard_done(self, tokens: int) -> None:
        self.tokens += tokens
        if self.bar is not None:
            rate = self.tokens / max(time.monotonic() - self.start, 1e-9)
            self.bar.set_postfix_str(f"{rate / 1e6:.2f} M tokens/s", refresh=False)
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _finish(result: tuple[str, Any], bar: _Progress) -> None:
    status, value = result
    if status == "error":
        name, message, where = value
        cls = getattr(errors, name, None)
        if not (isinstance(cls, type) and issubclass(cls, PackError)):
            cls, message = PackError, f"{name}: {message}"
        exc = cls(message)
        for k, v in where.items():
            setattr(exc, k, v)
        raise exc
    bar.shard_done(value)


def run_local(
    options: dict[str, Any],
    plan: ShardPlan,
    pending: Sequence[int],
    bar: _Progress,
    retries: int = 3,
    workers: int | None = None,
    _before: Callable[[int], Any] | None = None,
) -> None:
    """Encode the ``pending`` shards in a pool of spawned processes (spawn: the engine's
    thread pool does not survive a fork). A worker that dies (killed, out of memory) breaks
    the pool; its unfinished shards run again in a fresh pool, at most ``retries`` times."""
    from concurrent.futures import ProcessPoolExecutor, as_completed
    from concurrent.futures.process import BrokenProcessPool
    from multiprocessing import get_context

    workers = max(1, min(len(pending), workers or os.cpu_count() or 1))
    if options.get("threads") is None:  # share the cores instead of oversubscribing them
        options = {**options, "threads": max(1, (os.cpu_count() or 1) // workers)}
    todo = list(pending)
    for attempt in range(retries + 1):
        with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
            futures = {pool.submit(pack_shard, options, plan, i, _before): i for i in todo}
            try:
                for fut in as_completed(futures):
                    _finish(fut.result(), bar)
                    todo.remove(futures[fut])
                return
            except BrokenProcessPool as e:
                if attempt == retries:
                    raise PackError(
                        f"shards {todo} of {plan.shards}: a worker process died "
                        f"{retries + 1} times ({e})"
                    ) from e
            except BaseException:
                for fut in futures:
                    fut.cancel()
                raise


def run_ray(
    options: dict[str, Any],
    plan: ShardPlan,
    pending: Sequence[int],
    bar: _Progress,
    retries: int = 3,
    _before: Callable[[int], Any] | None = None,
) -> None:
    """Encode the ``pending`` shards as Ray Core tasks, one CPU each. ``max_retries`` reruns
    a task lost with its worker or node (on another node); ``retry_exceptions=False`` and the
    returned data errors (:func:`pack_shard`) mean a bad record is reported once, never
    retried. Runs inside :func:`_ray_session`. The work dir must be reachable at the same
    path from every node (a shared file system)."""
    import ray

    # SPREAD: shards go to different nodes first (each shard's engine uses its node's
    # cores), instead of queueing behind one another where the driver runs.
    task = ray.remote(
        num_cpus=1, max_retries=retries, retry_exceptions=False, scheduling_strategy="SPREAD"
    )(pack_shard)
    refs = {task.remote(options, plan, i, _before): i for i in pending}
    try:
        while refs:
            ready, _ = ray.wait(list(refs), num_returns=1)
            i = refs.pop(ready[0])
            try:
                result = ray.get(ready[0])
            except ray.exceptions.RayError as e:  # lost more than `retries` times, or a bug
                raise PackError(f"shard {i}/{plan.shards} failed: {e}") from e
            _finish(result, bar)
    except BaseException:
        for ref in refs:  # the run has failed: stop the other shards
            ray.cancel(ref, force=True)
        raise


@contextlib.contextmanager
def _ray_session(address: str | None):
    """Ray for the run: the connection already made, or one to ``address`` (``"auto"``: the
    running cluster; None: a local one), closed at the end."""
    try:
        import ray
    except ImportError:
        raise PackConfigError(f"the Ray executor needs Ray: {RAY_EXTRA}") from None
    started = not ray.is_initialized()
    if started:
        ray.init(address=address, log_to_driver=False, include_dashboard=False)
    try:
        yield
    finally:
        if started:
            ray.shutdown()


def run_sharded(
    options: dict[str, Any],
    out_dir: str | os.PathLike,
    executor: str,
    shards: int,
    address: str | None = None,
    retries: int = 3,
    work_dir: str | os.PathLike | None = None,
    progress: bool = False,
    _before: Callable[[int], Any] | None = None,
    _block_tokens: int | None = None,
    _merge_seconds: dict[str, float] | None = None,
) -> PackStats:
    """``pack(**options, out_dir=out_dir)`` as ``shards`` parts run by ``executor`` (local
    processes or Ray tasks), merged into ``out_dir``. Parts go to ``work_dir`` (default
    ``<out_dir>.parts``, removed after the merge; a given one is kept). Rerun after a failure
    with the same arguments to resume: complete parts are not encoded again."""
    if executor not in EXECUTORS:
        raise PackConfigError(f"executor must be one of {EXECUTORS}, got {executor!r}")
    if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
        raise PackConfigError(f"retries must be a whole number >= 0, got {retries!r}")
    if options.get("map_fn") is not None:
        raise PackConfigError("a map_fn runs in this process: it cannot be split into shards")
    if options.get("shard") is not None:
        raise PackConfigError("give either shard=(i, n) (one part) or shards=N, not both")
    options = {k: v for k, v in options.items() if k not in ("map_fn", "shard")}
    if executor == "ray":
        try:
            import ray  # noqa: F401  (fail before hashing the inputs)
        except ImportError:
            raise PackConfigError(f"the Ray executor needs Ray: {RAY_EXTRA}") from None
    own_dir = work_dir is None
    plan = ShardPlan(Path(f"{os.fspath(out_dir).rstrip('/')}.parts") if own_dir else work_dir,
                     shards)  # fmt: skip
    # The run's options and input listing key the work dir, so a resume never merges a stale
    # part; not the inputs' bytes: the shards hash those, once (each its share).
    plan.prepare(run_key(options), own_dir)
    start = time.monotonic()
    pending = plan.pending()
    bar = _Progress(shards, shards - len(pending), progress)
    workers = max(1, min(shards, os.cpu_count() or 1))
    with _ray_session(address) if executor == "ray" else contextlib.nullcontext():
        try:
            if executor == "local":
                run_local(options, plan, pending, bar, retries, _before=_before)
            else:
                run_ray(options, plan, pending, bar, retries, _before)
        finally:
            bar.close()
        encoded = time.monotonic()
        write_all = _write_local(workers) if executor == "local" else _write_ray(retries)
        stats, steps = merge_ranged(plan.parts(), out_dir, shards, write_all, _block_tokens)
        if _merge_seconds is not None:  # the bench's breakdown of the merge
            _merge_seconds.update(steps)
    if own_dir:
        shutil.rmtree(plan.work_dir, ignore_errors=True)
    # The merge's own figures time the merge alone; the caller ran the whole plan: encode =
    # the shards (as the slowest of them), write = the merge.
    end = time.monotonic()
    return stats.replace(
        seconds=end - start,
        tokens_per_second=stats.tokens / max(end - start, 1e-9),
        encode_seconds=encoded - start,
        write_seconds=end - encoded,
    )
