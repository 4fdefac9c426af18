"""Shard writing (`xkd.sharding.writer`): size limits, DALI index offsets, journal recovery, cleanup of unfinished
shards and the duplicate-key guard. Samples here are small synthetic files; no media is decoded."""

from __future__ import annotations

import tarfile
from pathlib import Path

import numpy as np

from xkd.sharding.encode import FileResult, SampleFiles
from xkd.sharding.manifest import ManifestRow
from xkd.sharding.mel import MelResult
from xkd.sharding.schema import SampleMeta, make_key
from xkd.sharding.writer import Journal, JournalState, ShardSet, clean_unfinished, index_path


def result(tmp: Path, source: str, key: str | None = None, video_bytes: int = 3000) -> FileResult:
    key = key or make_key("d", source)
    meta = SampleMeta(key, "d", source, "train", 0, "c", 1.0, 8.0, 8, 112, True, width=16, height=16)
    video = tmp / f"{key}.video.mp4"
    video.write_bytes(bytes(range(256)) * (video_bytes // 256) + b"v")
    mel_path = tmp / f"{key}.mel.npy"
    np.save(mel_path, np.zeros((80, 112), np.float16))
    stats = MelResult(frames=112, samples=16000, count=8960, total=-1.0, total_sq=2.0)
    row = ManifestRow(source, key, "d", status="ok", split="train")
    return FileResult(row=row, samples=[SampleFiles(key, meta, video, mel_path, stats)])


def make_set(
    out: Path, max_samples: int = 100, max_bytes: int = 1 << 30
) -> tuple[ShardSet, Journal, JournalState]:
    journal = Journal(out / "journal.jsonl")
    state = JournalState.load(journal.read())
    return ShardSet(out, None, journal, state, max_samples, max_bytes, fold_dataset=False), journal, state


def test_shards_roll_at_the_limits_and_index_points_at_the_bytes(tmp_path: Path) -> None:
    # A sample takes 29.7 kB in the tar (video 9 kB, mel 18 kB, json, headers); the end of a tar up to 10 kB.
    shards, journal, _ = make_set(tmp_path, max_samples=3, max_bytes=70_000)
    for i in range(7):
        shards.add(result(tmp_path, f"s{i}.mp4", video_bytes=9000))
    shards.close()
    names = sorted(p.name for p in tmp_path.glob("*.tar"))
    state = JournalState.load(journal.read())
    assert [state.shards[n]["samples"] for n in names] == [2, 2, 2, 1]  # the byte limit cuts before 3
    assert all(p.stat().st_size <= 70_000 for p in tmp_path.glob("*.tar"))
    assert len(state.rows) == 7 and state.stats["all"].samples == 7 and state.stats["train"].count == 7 * 8960
    (tmp_path / "by_count").mkdir()
    shards, journal, _ = make_set(tmp_path / "by_count", max_samples=3)
    for i in range(7):
        shards.add(result(tmp_path, f"s{i}.mp4"))
    shards.close()
    assert [s["samples"] for s in JournalState.load(journal.read()).shards.values()] == [3, 3, 1]
    data = (tmp_path / names[0]).read_bytes()
    lines = index_path(tmp_path, names[0]).read_text().splitlines()
    assert lines[0] == "v1.2 2"
    with tarfile.open(tmp_path / names[0]) as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
    for line in lines[1:]:
        fields = line.split()
        for _ext, offset, size, name in zip(fields[0::4], fields[1::4], fields[2::4], fields[3::4]):
            assert data[int(offset) : int(offset) + int(size)] == members[name]
    assert not list(tmp_path.glob("*.video.mp4"))  # scratch files are consumed


def test_a_torn_journal_line_is_cut_and_unjournaled_shards_are_removed(tmp_path: Path) -> None:
    shards, journal, _ = make_set(tmp_path, max_samples=1)
    for i in range(2):
        shards.add(result(tmp_path, f"s{i}.mp4"))
    shards.close()
    # A crash after moving a shard into place but before journaling it, and one mid-write, and a torn line.
    (tmp_path / "train-000002.tar").write_bytes(b"x")
    (tmp_path / "train-000003.tar.partial").write_bytes(b"x")
    (tmp_path / "train-p001of002-000000.tar").write_bytes(b"another part's")
    with open(journal.path, "a") as f:
        f.write('{"event": "shard", "name": "train-0000')
    state = JournalState.load(journal.read())
    assert journal.path.read_text().endswith("\n") and len(state.shards) == 2
    removed = clean_unfinished(tmp_path, None, state)
    assert removed == ["train-000002.tar", "train-000003.tar.partial"]
    assert sorted(p.name for p in tmp_path.glob("*.tar")) == [
        "train-000000.tar",
        "train-000001.tar",
        "train-p001of002-000000.tar",
    ]
    assert state.next_index("train") == 2 and state.next_index("val") == 0


def test_duplicate_keys_fail_the_second_file(tmp_path: Path) -> None:
    shards, _, state = make_set(tmp_path)
    first = shards.add(result(tmp_path, "a.mp4", key="d_0123456789abcdef"))
    second = shards.add(result(tmp_path, "b.mp4", key="d_0123456789abcdef"))
    shards.close()
    assert first.status == "ok"
    assert (second.status, second.reason) == (
        "failed",
        "duplicate key: d_0123456789abcdef is also the key of a.mp4",
    )
    assert len(state.metas) == 1 and state.rows["b.mp4"].status == "failed"
