"""Running `xkd-shard` over a dataset: parallel workers, shard writing, resume, parts, the summary.

Prepares the inputs of XKD pretraining and evaluation (paper section "Experiments") once, offline. Files are
sorted by (split, key) (keys are hashes, so shards mix classes, which WebDataset's buffer shuffling needs) and
handed to `--workers` processes. Results are written as they complete, so one long file never leaves the other
workers idle; which shard a sample lands in may therefore differ between runs, the samples themselves do not
(`--workers 0` works in order). `--part I/N` keeps the files whose key hash is I-1 modulo N: a deterministic,
disjoint share that any scheduler can run anywhere; `xkd-shard merge` joins the parts. Crash safety and resume
are the journal's (`writer.py`).

A worker process that dies (a decoder crash, the OOM killer) breaks the whole process pool; the files that were
in flight are then re-run one at a time in a fresh pool, so only the file that kills a worker by itself is failed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import multiprocessing
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from xkd.sharding import mel
from xkd.sharding.encode import EncodeParams, FileResult, Task, die_with_parent, encode_file, new_row
from xkd.sharding.layouts import Listing, list_sources
from xkd.sharding.manifest import (
    DatasetInfo,
    ManifestRow,
    aggregate,
    build_dataset_json,
    count_samples,
    dataset_json_name,
    failure_fraction,
    manifest_name,
    part_suffix,
    summary_table,
    write_json,
    write_manifest,
)
from xkd.sharding.schema import SPLITS, parse_shard_name
from xkd.sharding.writer import (
    STATE_DIR,
    Journal,
    JournalState,
    ShardSet,
    clean_unfinished,
    index_path,
    reset_work_dir,
)


class UsageError(ValueError):
    """A problem with the command line or the output folder (exit status 2)."""


@dataclass
class RunOptions:
    """Everything `shard_dataset` needs besides the encoding parameters (filled by the CLI)."""

    src: Path
    out: Path
    layout: str
    dataset: str | None
    part: tuple[int, int] | None
    workers: int
    max_shard_samples: int
    max_shard_bytes: int
    max_failed: float
    overwrite: bool
    retry_failed: bool
    progress: bool


def in_part(key: str, part: tuple[int, int] | None) -> bool:
    """Whether a file (by key) belongs to part I of N: the key's hash modulo N is I-1."""
    if part is None:
        return True
    i, n = part
    return int(key.rsplit("_", 1)[1], 16) % n == i - 1


def _split_order(split: str) -> int:
    return SPLITS.index(split) if split in SPLITS else len(SPLITS)


def shard_dataset(opts: RunOptions, params: EncodeParams) -> int:
    """Shard `opts.src` into `opts.out`; return the exit status (0, or 1 when failures exceed --max-failed)."""
    listing = list_sources(opts.src, opts.layout, opts.dataset, params.audio_only, skip=opts.out)
    if not listing.items:
        kinds = "audio or video" if listing.audio_only else "video"
        raise UsageError(f"no {kinds} files found under {opts.src} ({listing.layout} layout); check --src")
    params = dataclasses.replace(params, audio_only=listing.audio_only)
    (opts.out / STATE_DIR).mkdir(parents=True, exist_ok=True)
    with _locked(opts.out / STATE_DIR / f"lock{part_suffix(opts.part)}", opts.out, opts.part):
        return _shard(opts, params, listing)


def _shard(opts: RunOptions, params: EncodeParams, listing: Listing) -> int:
    dataset = listing.dataset
    items = [it for it in listing.items if in_part(it.key(dataset), opts.part)]
    out = opts.out
    state_dir = out / STATE_DIR
    suffix = part_suffix(opts.part)
    journal = Journal(state_dir / f"journal{suffix}.jsonl")
    if opts.overwrite:
        _remove_outputs(out, opts.part, journal)
    state = JournalState.load(journal.read())
    identity = {
        "dataset": dataset,
        "layout": listing.layout,
        "classes": listing.classes,
        "parameters": params.identity(),
        "part": list(opts.part) if opts.part else None,
    }
    if state.start is None:
        journal.append({"event": "start", **identity, "listing_sha1": listing.digest()})
        state.start = identity
    else:
        _check_resume(out, identity, state.start)
    removed = clean_unfinished(out, opts.part, state)
    work_dir = state_dir / f"work{suffix}"
    reset_work_dir(work_dir)

    done = {s for s, r in state.rows.items() if not (opts.retry_failed and r.status != "ok")}
    keys_by_source: dict[str, set[str]] = {}
    for key, meta in state.metas.items():
        keys_by_source.setdefault(meta.source, set()).add(key)
    todo = sorted(
        (it for it in items if it.source not in done),
        key=lambda it: (_split_order(it.split), it.key(dataset)),
    )
    tasks = [Task(it, dataset, params, work_dir, frozenset(keys_by_source.get(it.source, ()))) for it in todo]
    where = f"{opts.src} -> {out}" + (f" (part {opts.part[0]}/{opts.part[1]})" if opts.part else "")
    print(
        f"xkd-shard: {listing.layout} layout, dataset {dataset!r}, {len(listing.classes)} classes, "
        f"{len(items)} files{'' if opts.part is None else ' in this part'} (from {', '.join(listing.described)}); "
        f"{where}",
        file=sys.stderr,
    )
    if len(todo) < len(items) or removed:
        print(
            f"xkd-shard: resuming: {len(items) - len(todo)} files done earlier, {len(todo)} to go"
            + (f"; removed unfinished {', '.join(removed)}" if removed else ""),
            file=sys.stderr,
        )

    shards = ShardSet(
        out, opts.part, journal, state, opts.max_shard_samples, opts.max_shard_bytes, listing.fold_dataset
    )
    failed = sum(r.status != "ok" for s, r in state.rows.items() if s in done)
    bar = tqdm(
        total=len(items),
        initial=len(items) - len(todo),
        unit="file",
        desc=dataset,
        disable=not opts.progress,
        mininterval=0.5 if sys.stderr.isatty() else 30.0,
        smoothing=0.05,
        dynamic_ncols=True,
    )
    bar.set_postfix(failed=failed, refresh=False)
    results = execute(tasks, opts.workers)
    try:
        for result in results:
            with _sigint_deferred():
                row = shards.add(result)
            failed += row.status != "ok"
            bar.update(1)
            bar.set_postfix(failed=failed, refresh=False)
        shards.close()
    except KeyboardInterrupt:
        results.close()  # stops the workers
        bar.close()
        # Keep what is complete: the open shards hold whole samples, so they are finished and journaled.
        shards.close()
        print(f"\nxkd-shard: interrupted; rerun the same command to resume ({journal.path})", file=sys.stderr)
        return 130
    except BaseException:
        results.close()
        shards.abort()
        raise
    finally:
        bar.close()
    reset_work_dir(work_dir)
    work_dir.rmdir()

    rows = state_rows(state)
    info = DatasetInfo(
        dataset=dataset,
        layout=listing.layout,
        source_dir=str(opts.src.resolve()),
        classes=listing.classes,
        fold_dataset=listing.fold_dataset,
        folds=listing.folds,
        audio_only=listing.audio_only,
        parameters={
            **params.identity(),
            "mel": mel.mel_parameters(),
            "max_shard_samples": opts.max_shard_samples,
            "max_shard_bytes": opts.max_shard_bytes,
        },
        listing_files=len(listing.items),
        listing_sha1=listing.digest(),
    )
    write_manifest(rows, out / manifest_name(opts.part))
    write_json(
        build_dataset_json(info, rows, state.stats, state.shards, opts.part),
        out / dataset_json_name(opts.part),
    )
    counts = count_samples(rows, listing.fold_dataset)
    print(summary_table(rows, counts, opts.max_failed, f"xkd-shard summary: {where}"))
    fraction = failure_fraction(rows)
    if fraction > opts.max_failed:
        print(
            f"xkd-shard: {100 * fraction:.1f}% of the files failed, more than --max-failed {opts.max_failed:g}; "
            f"see the reason column of {out / manifest_name(opts.part)}",
            file=sys.stderr,
        )
        return 1
    return 0


@contextlib.contextmanager
def _sigint_deferred() -> Iterator[None]:
    """Hold Ctrl-C until the block is done, so an interrupted run never finishes a shard mid-sample.

    The handler itself waits: masking SIGINT in the main thread would not, because the kernel then delivers it to
    another thread (the process pool's, tqdm's) and Python still runs the handler in the main thread, mid-block.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: pending.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if pending:
        signal.raise_signal(signal.SIGINT)  # now handled as it would have been (KeyboardInterrupt by default)


def state_rows(state: JournalState) -> list[ManifestRow]:
    """The manifest rows: one per journaled file, completed from the samples the journal holds for it."""
    by_source: dict[str, list] = {}
    for key in sorted(state.metas):
        meta = state.metas[key]
        by_source.setdefault(meta.source, []).append(meta)
    rows = []
    for source, row in state.rows.items():
        metas = by_source.get(source, [])
        if metas:
            aggregate(row, metas)
            row.shard = ",".join(dict.fromkeys(sorted(state.shard_of[m.key] for m in metas)))
            if row.status != "ok":
                # Windows written by an earlier run are in the shards even if the rest of the file failed now.
                row.status, row.reason = "ok", f"incomplete: {row.reason}"
        rows.append(row)
    return rows


@contextlib.contextmanager
def _locked(path: Path, out: Path, part: tuple[int, int] | None) -> Iterator[None]:
    """An exclusive lock on `path` while the block runs: two runs of one part into one --out would write the
    same shard names."""
    with open(path, "a+") as handle:
        try:
            import fcntl
        except ImportError:  # no advisory locks on this platform
            yield
            return
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            which = f"part {part[0]}/{part[1]}" if part else "this dataset"
            raise UsageError(
                f"another xkd-shard is writing {which} into {out}; wait for it or stop it"
            ) from None
        yield


def _check_resume(out: Path, identity: dict[str, object], start: dict[str, object]) -> None:
    diff = [k for k in identity if identity[k] != start.get(k)]
    if diff:
        details = "; ".join(
            f"{k}: {start.get(k)!r} then, {identity[k]!r} now" for k in diff if k != "classes"
        )
        if "classes" in diff:
            details = "; ".join(filter(None, [details, "the class list changed"]))
        raise UsageError(
            f"{out} holds an earlier run with other settings ({details}): rerun with the same options to resume, "
            "or pass --overwrite to start again, or choose another --out"
        )


def _remove_outputs(out: Path, part: tuple[int, int] | None, journal: Journal) -> None:
    """--overwrite: delete what runs of this part wrote (other parts' files are left alone)."""
    for path in out.iterdir():
        parsed = parse_shard_name(path.name.removesuffix(".partial"))
        if parsed is not None and (parsed["part"], parsed["parts"]) == (part or (None, None)):
            path.unlink()
            index_path(out, path.name.removesuffix(".partial")).unlink(missing_ok=True)
    for name in (manifest_name(part), dataset_json_name(part)):
        (out / name).unlink(missing_ok=True)
    journal.path.unlink(missing_ok=True)


def _init_worker() -> None:
    # Ctrl-C is the main process's to handle (it finishes the open shards); one core per worker.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    torch.set_num_threads(1)
    die_with_parent()


def make_pool(workers: int) -> ProcessPoolExecutor:
    """Worker processes for sharding and verifying (one torch thread each, they die with this process)."""
    if sys.platform.startswith("linux"):
        # Workers fork from a server that has imported the encoder once (fast start, no inherited threads).
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(["xkd.sharding.encode"])
    else:
        ctx = multiprocessing.get_context("spawn")
    return ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_init_worker)


def _shutdown(pool: ProcessPoolExecutor) -> None:
    terminate = getattr(pool, "terminate_workers", None)
    if terminate is not None:
        terminate()
    else:
        # Python < 3.14 has no public way to stop busy workers at once.
        for process in list((getattr(pool, "_processes", None) or {}).values()):
            process.terminate()
    pool.shutdown(wait=True, cancel_futures=True)


def _crashed(task: Task) -> FileResult:
    reason = "worker crashed: the process died while decoding this file (a decoder crash or out of memory)"
    return FileResult(row=new_row(task.item, task.dataset, reason))


def execute(
    tasks: list[Task], workers: int, work: Callable[[Task], FileResult] = encode_file
) -> Iterator[FileResult]:
    """Results of `work` (the worker function, `encode_file`) over `tasks` as they complete, from `workers`
    processes (0: in this process, in task order)."""
    if workers == 0:
        # One thread, as in a worker process: the log-mel tensors are small, and extra threads only add
        # synchronisation (6x slower on a busy 2-core machine).
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            for task in tasks:
                yield work(task)
        finally:
            torch.set_num_threads(threads)
        return
    # Enough queued work to keep every worker busy past a slow file, with little scratch space in flight.
    window = 4 * workers
    pending = iter(tasks)
    running: dict[Future[FileResult], Task] = {}
    pool = make_pool(workers)
    try:
        while True:
            while len(running) < window and (task := next(pending, None)) is not None:
                running[pool.submit(work, task)] = task
            if not running:
                return
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            suspects = []
            for future in done:
                task = running.pop(future)
                try:
                    result = future.result()
                except BrokenProcessPool:
                    suspects.append(task)
                    continue
                yield result
            if not suspects:
                continue
            # Every file in flight is a suspect; alone in a fresh pool, only the culprit breaks it again.
            suspects.extend(running.values())
            running.clear()
            _shutdown(pool)
            pool = make_pool(workers)
            for suspect in suspects:
                try:
                    result = pool.submit(work, suspect).result()
                except BrokenProcessPool:
                    _shutdown(pool)
                    pool = make_pool(workers)
                    result = _crashed(suspect)
                yield result
    finally:
        _shutdown(pool)


def default_out(src: Path) -> Path:
    """`shards/<basename of --src>` (relative to the current directory)."""
    return Path("shards") / Path(os.path.abspath(src)).name
