"""Reader stages on plain lists of synthetic sample dicts and on tiny tar shards (webdataset tests/test_filters.py
style): selection, rank/worker splits, shuffling, tar grouping, and counted skipping of broken samples."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import pytest

from xkd.pipeline.shards import (
    Selection,
    SkipCounter,
    SkippedSampleWarning,
    batched,
    decode_members,
    list_shards,
    read_tar,
    resample,
    sample_part,
    select,
    shuffle,
    split_by_key,
    split_shards,
)
from xkd.sharding.schema import SampleMeta, make_key


def meta(i: int, **overrides: object) -> SampleMeta:
    fields = dict(
        key=make_key("toy", f"c{i}"),
        dataset="toy",
        source=f"c{i}",
        split="train",
        label=i % 3,
        label_name=["a", "b", "c"][i % 3],
        duration_s=4.0,
        fps=8.0,
        num_frames=32,
        mel_frames=448,
        has_audio=True,
    )
    fields.update(overrides)
    return SampleMeta(**fields)


def samples(n: int, **overrides: object) -> list[dict]:
    return [
        {"__key__": meta(i).key, "__shard__": "toy-000000.tar", "meta": meta(i, **overrides)}
        for i in range(n)
    ]


def test_selection_by_split_fold_class_and_audio():
    items = samples(6)
    items[1]["meta"].split = "test"
    items[2]["meta"].has_audio = False
    assert [s["meta"].source for s in select(items, Selection("train"))] == ["c0", "c2", "c3", "c4", "c5"]
    assert [s["meta"].source for s in select(items, Selection("train", require_audio=True))] == [
        "c0",
        "c3",
        "c4",
        "c5",
    ]
    subset = Selection("train", classes=["c", "a"])
    kept = list(select(items, subset))
    assert [s["meta"].source for s in kept] == ["c0", "c2", "c3", "c5"]
    # Labels are renumbered to positions in the subset: "c" -> 0, "a" -> 1.
    assert [subset.label(s["meta"]) for s in kept] == [1, 0, 1, 0]

    folds = samples(4, split="all")
    for i, s in enumerate(folds):
        s["meta"].folds = {"1": "train" if i < 3 else "test", "2": "test" if i < 2 else "train"}
    assert len(list(select(folds, Selection("train", fold=1)))) == 3
    assert len(list(select(folds, Selection("train", fold=None)))) == 3  # fold 1 by default
    assert len(list(select(folds, Selection("test", fold=2)))) == 2


def test_split_by_key_covers_every_sample_exactly_once():
    items = samples(200)
    parts = [list(split_by_key(items, part, 4)) for part in range(4)]
    keys = [s["__key__"] for part in parts for s in part]
    assert sorted(keys) == sorted(s["__key__"] for s in items)
    assert all(len(part) > 20 for part in parts)  # a hash, not a degenerate split
    assert sample_part(items[0]["__key__"], 4) == sample_part(items[0]["__key__"], 4)


def test_split_shards_by_rank_then_worker_and_too_few_shards():
    shards = [f"s{i}" for i in range(8)]
    owned = [split_shards(shards, r, 2, w, 2) for r in range(2) for w in range(2)]
    assert sorted(s for part in owned for s in part) == shards
    assert owned[0] == ["s0", "s4"]
    with pytest.raises(ValueError, match=r"3 shards for 2 ranks x 2 workers"):
        split_shards(shards[:3], 0, 2, 0, 2)


def test_shuffle_is_a_seeded_permutation_and_resample_stays_in_the_list():
    items = list(range(100))
    a = list(shuffle(iter(items), 20, np.random.default_rng(1)))
    b = list(shuffle(iter(items), 20, np.random.default_rng(1)))
    c = list(shuffle(iter(items), 20, np.random.default_rng(2)))
    assert sorted(a) == items and a == b and a != c and a != items
    drawn = [s for _, s in zip(range(50), resample(["x", "y", "z"], np.random.default_rng(0)))]
    assert set(drawn) == {"x", "y", "z"}
    assert [len(b) for b in batched(range(10), 4)] == [4, 4, 2]


def npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> str:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return str(path)


def good_members(i: int) -> list[tuple[str, bytes]]:
    m = meta(i, mel_frames=5)
    mel = np.zeros((80, 5), np.float16)
    return [(f"{m.key}.json", m.to_json()), (f"{m.key}.mel.npy", npy(mel)), (f"{m.key}.video.mp4", b"vp9")]


def test_corrupt_members_are_skipped_counted_and_named(tmp_path: Path):
    bad = {i: meta(i, mel_frames=5) for i in range(10, 16)}
    members = good_members(0)
    members += [(f"{bad[10].key}.json", bad[10].to_json()), (f"{bad[10].key}.video.mp4", b"vp9")]  # no mel
    members += [(f"{bad[11].key}.json", bad[11].to_json()), (f"{bad[11].key}.mel.npy", b"not an npy")]
    members += [
        (f"{bad[12].key}.json", b"{broken"),
        (f"{bad[12].key}.mel.npy", npy(np.zeros((80, 5), np.float16))),
    ]
    members += [
        (f"{bad[13].key}.json", bad[13].to_json()),
        (f"{bad[13].key}.mel.npy", npy(np.zeros((80, 7), np.float16))),
    ]
    pickled = io.BytesIO()
    np.save(pickled, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    members += [(f"{bad[14].key}.json", bad[14].to_json()), (f"{bad[14].key}.mel.npy", pickled.getvalue())]
    members += [(f"{bad[15].key}.mel.npy", npy(np.zeros((80, 5), np.float16)))]  # no json
    members += good_members(1)
    shard = write_tar(tmp_path / "train-000000.tar", members)
    skips = SkipCounter()
    with pytest.warns(SkippedSampleWarning) as caught:
        kept = list(decode_members(read_tar([shard], skips), skips, 80, need_video=False, need_audio=True))
    assert [s["meta"].source for s in kept] == ["c0", "c1"]
    assert kept[0]["mel"].shape == (80, 5)
    assert skips.counts == {"missing member": 2, "bad mel": 3, "bad json": 1}
    messages = [str(w.message) for w in caught]
    for i in range(10, 16):
        assert any(bad[i].key in msg and shard in msg for msg in messages), bad[i].key
    assert any("missing member" in msg and "mel.npy" in msg for msg in messages)
    assert any("Object arrays cannot be loaded" in msg for msg in messages)  # never unpickled


def test_truncated_shard_keeps_earlier_samples_and_broken_data_raise(tmp_path: Path):
    shard = write_tar(tmp_path / "train-000000.tar", good_members(0) + good_members(1))
    data = Path(shard).read_bytes()
    Path(shard).write_bytes(data[: len(data) // 2 + 100])
    skips = SkipCounter()
    with pytest.warns(SkippedSampleWarning, match="unreadable shard"):
        kept = list(read_tar([shard], skips))
    assert len(kept) >= 1 and skips.counts

    garbage = write_tar(tmp_path / "train-000001.tar", [(f"k{i}.json", b"{") for i in range(10)])
    with pytest.warns(SkippedSampleWarning), pytest.raises(RuntimeError, match="5 faulty samples in a row"):
        list(read_tar([garbage], SkipCounter(max_consecutive=5)))
    # An endless (resampled) stream whose selection matches nothing stops instead of spinning.
    good = write_tar(tmp_path / "train-000002.tar", good_members(2))
    with pytest.raises(RuntimeError, match="no sample matching the selection"):
        next(
            read_tar(
                resample([good], np.random.default_rng(0)),
                SkipCounter(3),
                keep=Selection("val"),
                resampled=True,
            )
        )


def test_list_shards_plain_fold_and_missing(tmp_path: Path):
    for name in ["train-000001.tar", "train-000000.tar", "test-000000.tar", "notes.tar"]:
        (tmp_path / name).write_bytes(b"")
    assert list_shards(tmp_path, "train") == (
        [str(tmp_path / "train-000000.tar"), str(tmp_path / "train-000001.tar")],
        False,
    )
    with pytest.raises(FileNotFoundError, match="no shards of split 'val'"):
        list_shards(tmp_path, "val")
    folds = tmp_path / "folds"
    folds.mkdir()
    (folds / "all-000000.tar").write_bytes(b"")
    assert list_shards(folds, "test") == ([str(folds / "all-000000.tar")], True)
