"""Writing shards atomically and resumably: tar shards, their DALI index files, and the run journal.

The shard format is WebDataset's (webdataset `writer.py` ShardWriter is the anchor): consecutive tar members
`<key>.<ext>` form a sample. XKD's training loader reads these shards (`../shared/contracts.md`, "Shards" and
"Reading shards"); the paper's pipeline decoded raw videos at train time instead.

Crash safety (a `kill -9` at any instant leaves a state a rerun finishes with no duplicated and no missing sample):

1. A shard is written as `<name>.partial` and moved onto `<name>` with `os.replace` once complete, so a `.tar`
   under its final name is always whole.
2. After the move, one line is appended (and fsynced) to the journal: the shard's name, the json of its samples,
   the manifest rows of the files it completes and its log-mel statistics. Failed files get a line each.
3. A rerun reads the journal (ignoring a torn last line), deletes any shard of its own part that the journal does
   not list (moved but not journaled) and every `.partial`, and processes only the files the journal lacks.
   Shard indices continue after the last journaled one, so a deleted shard's name is reused.

The journal is the single source of truth: the manifest and `dataset.json` are rebuilt from it at the end.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

from xkd.sharding.encode import FileResult, SampleFiles
from xkd.sharding.manifest import ManifestRow, MelStats, stats_keys
from xkd.sharding.schema import SampleMeta, parse_shard_name, shard_name

STATE_DIR = ".xkd-shard"
"""Per-output-folder state: journals and per-worker scratch files."""
INDEX_DIR = "index"
"""DALI `fn.readers.webdataset` index files (`wds2idx` format v1.2), one per shard: `index/<shard stem>.idx`."""
_TAR_BLOCK = 512
_TAR_RECORD = 20 * _TAR_BLOCK


def index_path(out: Path, name: str) -> Path:
    return out / INDEX_DIR / (Path(name).stem + ".idx")


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class ShardFile:
    """One tar shard being written under `<name>.partial`; `close()` moves it (and its index) into place."""

    def __init__(self, out: Path, name: str) -> None:
        self.out, self.name = out, name
        self.partial = out / (name + ".partial")
        self.tar = tarfile.open(self.partial, "w", format=tarfile.USTAR_FORMAT)  # noqa: SIM115 (closed in close/abort)
        self.index: list[str] = []
        self.metas: list[SampleMeta] = []
        self.rows: list[ManifestRow] = []
        self.stats: dict[str, MelStats] = {}

    @property
    def samples(self) -> int:
        return len(self.metas)

    @property
    def size(self) -> int:
        return self.tar.offset

    def add(self, key: str, members: list[tuple[str, bytes | Path]]) -> None:
        entries = []
        for ext, content in members:
            name = f"{key}.{ext}"
            # Plain ustar headers (names < 100 bytes) keep every data offset at header + 512, as the index says.
            if len(name.encode()) >= 100:
                raise ValueError(f"member name {name!r} is too long for a ustar header")
            info = tarfile.TarInfo(name)
            info.mode, info.mtime, info.uname, info.gname = 0o444, 0, "", ""
            header = self.tar.offset
            if isinstance(content, bytes):
                info.size = len(content)
                self.tar.addfile(info, io.BytesIO(content))
            else:
                info.size = content.stat().st_size
                with open(content, "rb") as f:
                    self.tar.addfile(info, f)
            entries.append(f"{ext} {header + _TAR_BLOCK} {info.size} {name}")
        self.index.append(" ".join(entries))

    def close(self) -> int:
        """Finish the tar, write its index, move both into place; return the shard's size in bytes."""
        self.tar.close()
        with open(self.partial, "rb") as f:
            os.fsync(f.fileno())
        index = index_path(self.out, self.name)
        index.parent.mkdir(exist_ok=True)
        tmp = index.with_name(index.name + ".partial")
        tmp.write_text(f"v1.2 {len(self.index)}\n" + "\n".join(self.index) + "\n")
        os.replace(tmp, index)
        size = self.partial.stat().st_size
        os.replace(self.partial, self.out / self.name)
        _fsync_dir(self.out)
        return size

    def abort(self) -> None:
        try:
            self.tar.close()
        finally:
            self.partial.unlink(missing_ok=True)


def member_size(members: list[tuple[str, bytes | Path]]) -> int:
    """Bytes the members take in a tar (headers and padding included)."""
    total = 0
    for _, content in members:
        size = len(content) if isinstance(content, bytes) else content.stat().st_size
        total += _TAR_BLOCK + -(-size // _TAR_BLOCK) * _TAR_BLOCK
    return total


class Journal:
    """Append-only JSON-lines log of finished work; see the module docstring."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def read(self) -> list[dict[str, object]]:
        """All complete events; a torn last line (the process died mid-write) is cut off the file."""
        if not self.path.exists():
            return []
        data = self.path.read_bytes()
        events, good = [], 0
        for line in data.splitlines(keepends=True):
            if not line.endswith(b"\n"):
                break
            try:
                events.append(json.loads(line))
            except json.JSONDecodeError:
                break
            good += len(line)
        if good != len(data):
            with open(self.path, "r+b") as f:
                f.truncate(good)
        return events

    def append(self, event: dict[str, object]) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(event, sort_keys=True, ensure_ascii=True) + "\n")
            f.flush()
            os.fsync(f.fileno())


@dataclass
class JournalState:
    """What earlier runs of this part finished, read from its journal."""

    start: dict[str, object] | None = None
    rows: dict[str, ManifestRow] = field(default_factory=dict)
    """source -> its last journaled row."""
    metas: dict[str, SampleMeta] = field(default_factory=dict)
    """key -> json of every sample in a journaled shard."""
    shard_of: dict[str, str] = field(default_factory=dict)
    """key -> shard name."""
    shards: dict[str, dict[str, object]] = field(default_factory=dict)
    """shard name -> {split, index, samples, bytes}."""
    stats: dict[str, MelStats] = field(default_factory=dict)

    @classmethod
    def load(cls, events: list[dict[str, object]]) -> JournalState:
        state = cls()
        for event in events:
            kind = event["event"]
            if kind == "start" and state.start is None:
                state.start = event
            elif kind == "row":
                row = ManifestRow.from_dict(event["row"])  # type: ignore[arg-type]
                state.rows[row.source] = row
            elif kind == "shard":
                name = str(event["name"])
                state.shards[name] = {k: event[k] for k in ("split", "index", "samples", "bytes")}
                for raw in event["metas"]:  # type: ignore[union-attr]
                    meta = SampleMeta(**raw)
                    state.metas[meta.key] = meta
                    state.shard_of[meta.key] = name
                for raw in event["rows"]:  # type: ignore[union-attr]
                    row = ManifestRow.from_dict(raw)
                    state.rows[row.source] = row
                for group, raw in event["mel_stats"].items():  # type: ignore[union-attr]
                    state.stats.setdefault(group, MelStats()).merge(MelStats.from_dict(raw))
        return state

    def next_index(self, split: str) -> int:
        return 1 + max((int(s["index"]) for s in self.shards.values() if s["split"] == split), default=-1)


def clean_unfinished(out: Path, part: tuple[int, int] | None, state: JournalState) -> list[str]:
    """Delete this part's `.partial` files and any shard (and index) the journal does not list."""
    removed = []
    for path in sorted(out.iterdir()):
        name = path.name.removesuffix(".partial")
        parsed = parse_shard_name(name)
        if parsed is None:
            continue
        mine = (parsed["part"], parsed["parts"]) == (part or (None, None))
        if mine and (path.name.endswith(".partial") or name not in state.shards):
            path.unlink()
            index_path(out, name).unlink(missing_ok=True)
            removed.append(path.name)
    if (out / INDEX_DIR).is_dir():
        for path in (out / INDEX_DIR).glob("*.partial"):
            path.unlink()
    return removed


class ShardSet:
    """The open shards of a run (one per split), rolled at the sample and byte limits, journaled when closed."""

    def __init__(
        self,
        out: Path,
        part: tuple[int, int] | None,
        journal: Journal,
        state: JournalState,
        max_samples: int,
        max_bytes: int,
        fold_dataset: bool,
    ) -> None:
        self.out, self.part, self.journal, self.state = out, part, journal, state
        self.max_samples, self.max_bytes, self.fold_dataset = max_samples, max_bytes, fold_dataset
        self.open: dict[str, ShardFile] = {}
        self.next: dict[str, int] = {}
        self.seen_keys: dict[str, str] = {k: m.source for k, m in state.metas.items()}

    def add(self, result: FileResult) -> ManifestRow:
        """Take one file's result; return its row (final for failures, completed later for samples)."""
        row = result.row
        duplicate = next(
            (s for s in result.samples if self.seen_keys.get(s.key, row.source) != row.source), None
        )
        if duplicate is not None:
            for sample in result.samples:
                sample.discard()
            row.status = "failed"
            row.reason = f"duplicate key: {duplicate.key} is also the key of {self.seen_keys[duplicate.key]}"
            result.samples = []
        if not result.samples:
            # A file whose every sample was journaled earlier is complete; anything else is a failure row.
            self._journal_row(row)
            return row
        for sample in result.samples:
            self._add_sample(row.split, sample)
        self.open[row.split].rows.append(row)
        return row

    def _journal_row(self, row: ManifestRow) -> None:
        self.journal.append({"event": "row", "row": row.to_dict()})
        self.state.rows[row.source] = row

    def _add_sample(self, split: str, sample: SampleFiles) -> None:
        members = sample.members()
        size = member_size(members)
        shard = self.open.get(split)
        if shard is not None and (
            shard.samples >= self.max_samples or shard.size + size + _TAR_RECORD > self.max_bytes
        ):
            self.close_split(split)
            shard = None
        if shard is None:
            if split not in self.next:
                self.next[split] = self.state.next_index(split)
            shard = ShardFile(self.out, shard_name(split, self.next[split], self.part))
            self.next[split] += 1
            self.open[split] = shard
        shard.add(sample.key, members)
        shard.metas.append(sample.meta)
        self.seen_keys[sample.key] = sample.meta.source
        if sample.mel_stats is not None:
            for group in stats_keys(sample.meta.split, sample.meta.folds, self.fold_dataset):
                st = shard.stats.setdefault(group, MelStats())
                st.add(sample.mel_stats.count, sample.mel_stats.total, sample.mel_stats.total_sq)
        sample.discard()

    def close_split(self, split: str) -> None:
        shard = self.open.pop(split)
        size = shard.close()
        index = parse_shard_name(shard.name)
        assert index is not None
        event = {
            "event": "shard",
            "name": shard.name,
            "split": split,
            "index": index["index"],
            "samples": shard.samples,
            "bytes": size,
            "metas": [json.loads(m.to_json()) for m in shard.metas],
            "rows": [r.to_dict() for r in shard.rows],
            "mel_stats": {k: v.to_dict() for k, v in sorted(shard.stats.items())},
        }
        self.journal.append(event)
        self.state.shards[shard.name] = {
            "split": split,
            "index": index["index"],
            "samples": shard.samples,
            "bytes": size,
        }
        for meta in shard.metas:
            self.state.metas[meta.key] = meta
            self.state.shard_of[meta.key] = shard.name
        for row in shard.rows:
            self.state.rows[row.source] = row
        for group, st in shard.stats.items():
            self.state.stats.setdefault(group, MelStats()).merge(st)

    def close(self) -> None:
        """Finish every open shard (end of run, or an orderly stop on Ctrl-C)."""
        for split in list(self.open):
            self.close_split(split)

    def abort(self) -> None:
        for shard in self.open.values():
            shard.abort()
        self.open.clear()


def reset_work_dir(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True, exist_ok=True)
