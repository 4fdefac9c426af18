"""Loaders end to end on tiny shards (portable PyAV path): evaluation split over ranks x workers, reproducible
training streams, selection, skipping, audio-only data and audio/video alignment."""

from __future__ import annotations

import dataclasses
import itertools
from pathlib import Path

import numpy as np
import pytest
import torch

from xkd.pipeline import (
    DataConfig,
    count_samples,
    dataset_info,
    make_eval_loader,
    make_train_loader,
    mel_stats,
)
from xkd.pipeline.audio import MEL_FRAMES_PER_SECOND
from xkd.pipeline.shards import SkippedSampleWarning


def test_eval_two_ranks_two_workers_read_every_sample_once(tiny_shards: Path, kit, clip_samples):
    cfg = kit.tiny_config(tiny_shards, num_workers=2, batch_size=2)
    rows = []
    for rank in range(2):
        for batch in make_eval_loader(cfg, split="test", clips=2, crops=1, rank=rank, world_size=2):
            assert batch.video_local is None and batch.audio_local is None
            rows += list(zip(batch.key, batch.clip_index.tolist(), [rank] * len(batch)))
    keys = sorted(k for k, clip, _ in rows if clip == 0)
    assert keys == sorted(s.key for s in clip_samples)  # the silent sample too: evaluation keeps it
    assert sorted(k for k, clip, _ in rows if clip == 1) == keys
    assert len({(k, r) for k, _, r in rows}) == len(keys)  # one rank per key


def test_train_stream_is_reproducible_and_reseeded_from_seed_step_rank(tiny_shards: Path, kit):
    cfg = kit.tiny_config(tiny_shards)

    def first(n: int, **kw: int) -> list:
        return list(itertools.islice(make_train_loader(cfg, **kw), n))

    a, b = first(2, seed=3, step=10), first(2, seed=3, step=10)
    for x, y in zip(a, b):
        assert x.key == y.key and torch.equal(x.start_s, y.start_s)
        assert torch.equal(x.video_global, y.video_global) and torch.equal(x.audio_local, y.audio_local)
    later = first(2, seed=3, step=11)
    assert [x.key for x in later] != [x.key for x in a] or not torch.equal(later[0].start_s, a[0].start_s)
    batch = a[0]
    assert batch.video_global.shape == (4, 3, 16, 32, 32) and batch.video_local.shape == (1, 4, 3, 4, 16, 16)
    assert batch.audio_global.shape == (4, 1, 80, 224) and batch.audio_local.shape == (1, 4, 1, 80, 56)
    assert batch.label.dtype == torch.int64 and (batch.clip_index == 0).all()


def test_training_selection_and_too_few_shards(tiny_shards: Path, kit, clip_samples):
    silent = clip_samples[5].key
    seen = set()
    # Audio only: selection does not depend on decoding, and this keeps the test fast.
    quick = kit.tiny_config(tiny_shards, with_video=False)
    for batch in itertools.islice(make_train_loader(quick, seed=1), 15):
        seen.update(batch.key)
    assert silent not in seen and len(seen) == 11  # has_audio=false is not pretraining data

    high = {s.key for s in clip_samples if s.meta.label_name == "high"}
    for batch in itertools.islice(
        make_train_loader(kit.tiny_config(tiny_shards, classes=["high"]), seed=1), 3
    ):
        assert set(batch.key) <= high and (batch.label == 0).all()  # renumbered within the subset

    with pytest.raises(ValueError, match=r"4 shards for 2 ranks x 3 workers"):
        make_train_loader(kit.tiny_config(tiny_shards, num_workers=3), rank=0, world_size=2)
    with pytest.raises(ValueError, match="lacks"):
        make_train_loader(kit.tiny_config(tiny_shards, classes=["nope"]))
    assert count_samples(kit.tiny_config(tiny_shards)) == 11
    assert count_samples(kit.tiny_config(tiny_shards), split="test", train=False) == 12


def test_corrupt_members_are_skipped_and_counted_across_workers(tmp_path: Path, kit, clip_samples):
    broken_video = kit.FakeSample(
        clip_samples[0].key, clip_samples[0].meta, {**clip_samples[0].members, "video.mp4": b"\x1a\x45" * 500}
    )
    broken_mel = kit.FakeSample(
        clip_samples[1].key,
        clip_samples[1].meta,
        {**clip_samples[1].members, "mel.npy": b"\x93NUMPY garbage"},
    )
    missing = kit.FakeSample(
        clip_samples[2].key,
        clip_samples[2].meta,
        {k: v for k, v in clip_samples[2].members.items() if k != "mel.npy"},
    )
    kit.write_shards(
        tmp_path,
        [broken_video, clip_samples[3], broken_mel, clip_samples[4], missing, clip_samples[6]],
        "train",
        3,
    )
    # Two workers: their warnings go to their own stderr, their counts come back with the batches.
    loader = make_eval_loader(kit.tiny_config(tmp_path, num_workers=2), split="train", clips=1)
    keys = [k for batch in loader for k in batch.key]
    assert sorted(keys) == sorted(s.key for s in (clip_samples[3], clip_samples[4], clip_samples[6]))
    assert sum(loader.skipped.values()) == 3
    assert loader.skipped == {"undecodable video": 1, "bad mel": 1, "missing member": 1}
    with pytest.warns(SkippedSampleWarning) as caught:  # in-process: one warning per skipped sample
        list(make_eval_loader(kit.tiny_config(tmp_path), split="train", clips=1))
    assert len(caught) == 3 and any(clip_samples[1].key in str(w.message) for w in caught)


def test_audio_only_data_leave_video_fields_none(tmp_path: Path, kit):
    samples = [
        kit.make_sample(f"a/{i}.wav", i % 2, 5.0, None, kit.tone(5.0, [(0.0, 500.0 + 100 * i)]))
        for i in range(4)
    ]
    kit.write_shards(tmp_path, samples, "train", 1)
    cfg = kit.tiny_config(tmp_path, backend="auto")
    batch = next(make_train_loader(cfg))
    assert batch.video_global is None and batch.video_local is None
    assert batch.audio_global.shape == (4, 1, 80, 224) and batch.audio_local.shape == (1, 4, 1, 80, 56)
    evaluated = list(make_eval_loader(cfg, split="train", clips=3))
    assert sum(len(b) for b in evaluated) == 12 and all(b.video_global is None for b in evaluated)


def colour_tone_sample(kit):
    """A 6 s clip whose colour (red/blue) and tone (500 Hz / 3 kHz) switch together at known frame boundaries."""
    changes = [11, 20, 29, 37]  # frame indices at 8 fps: 1.375, 2.5, 3.625, 4.625 s
    state = np.cumsum(np.isin(np.arange(48), changes)) % 2
    frames = np.zeros((48, kit.HEIGHT, kit.WIDTH, 3), np.uint8)
    frames[state == 0, ..., 0] = 220
    frames[state == 1, ..., 2] = 220
    segments = [(0.0, 500.0)] + [(c / 8, 3000.0 if i % 2 == 0 else 500.0) for i, c in enumerate(changes)]
    return kit.make_sample("sync/colour_tone.mp4", 0, 6.0, frames, kit.tone(6.0, segments)), changes


def test_audio_and_video_windows_are_aligned(tmp_path: Path, kit):
    """The video frame where the colour switches and the mel frame where the tone switches agree to within half a
    video frame (62.5 ms) for random windows; both also agree with `start_s`."""
    sample, changes = colour_tone_sample(kit)
    kit.write_shards(tmp_path, [sample], "train", 1)
    cfg = kit.tiny_config(tmp_path, augment=False, video_local_views=0, audio_local_views=0, batch_size=8)
    batch = next(make_train_loader(cfg, seed=0))
    assert len(set(batch.start_s.tolist())) > 3  # several different windows
    hop_s = 1 / MEL_FRAMES_PER_SECOND
    for video, audio, start_s in zip(batch.video_global, batch.audio_global, batch.start_s.tolist()):
        blue = (video[2].mean((1, 2)) > video[0].mean((1, 2))).numpy()  # (T,)
        video_switches = np.flatnonzero(np.diff(blue.astype(int))) + 1
        high = (audio[0, 40:].mean(0) > audio[0, :40].mean(0)).numpy()  # 3 kHz lies in the upper mel bins
        audio_switches = np.flatnonzero(np.diff(high.astype(int))) + 1
        # A switch within half a frame of either window edge is blurred by the STFT window: compare the interior.
        audio_switches = [a for a in audio_switches if 1 / 16 < a * hop_s < 2.0 - 1 / 16]
        expected = [c - start_s * 8 for c in changes if 0.5 < c - start_s * 8 < 15.5]
        assert [v for v in video_switches if 0.5 < v < 15.5] == expected
        assert len(audio_switches) == len(expected), (start_s, audio_switches, expected)
        for v, a in zip(expected, audio_switches):
            assert abs(v / 8 - a * hop_s) <= 1 / 16, (start_s, v, a)


def test_demo_shards_from_xkd_shard_end_to_end(demo_shards: Path):
    """Real `xkd-shard` output through the default backend (DALI here when it is installed), paper geometry."""
    info = dataset_info(demo_shards)
    cfg = DataConfig(shards=str(demo_shards), batch_size=2, num_workers=2, shuffle_buffer=4)
    assert count_samples(cfg) == info["counts"]["train"] == 9
    assert count_samples(cfg, split="test", train=False) == info["counts"]["folds"]["1"]["test"] == 3
    stats = info["mel_stats"]["train"]
    mean, std = mel_stats(dataclasses.replace(cfg, mel_stats_from_dataset=True))
    assert mean == pytest.approx(stats["sum"] / stats["count"]) and 1 < std < 10
    assert mel_stats(cfg) == (-5.3688107, 4.410007)  # the paper's Kinetics statistics by default
    batch = next(make_train_loader(cfg, seed=0))
    assert batch.video_global.shape == (2, 3, 32, 112, 112) and batch.video_local.shape == (
        1,
        2,
        3,
        8,
        96,
        96,
    )
    assert batch.audio_global.shape == (2, 1, 80, 448) and batch.audio_local.shape == (1, 2, 1, 80, 112)
    assert ((batch.label >= 0) & (batch.label < len(info["classes"]))).all()
    # Normalised inputs: roughly zero-mean, unit-scale (not raw pixels or raw log-mels).
    assert batch.video_global.abs().mean() < 3 and batch.audio_global.abs().mean() < 3
    rows = [b for b in make_eval_loader(cfg, split="test", fold=1, clips=2, crops=3)]
    assert sum(len(b) for b in rows) == 3 * 2 * 3
    assert all(b.video_global.shape[1:] == (3, 32, 112, 112) and b.video_local is None for b in rows)


def _assert_equal_batches(a: list, b: list, atol: float = 0.0) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.key == y.key and torch.equal(x.start_s, y.start_s)
        for name in ("video_global", "video_local", "audio_global", "audio_local"):
            vx, vy = getattr(x, name), getattr(y, name)
            assert (vx is None) == (vy is None), name
            if vx is not None:
                assert vx.dtype == vy.dtype == torch.float32, name
                torch.testing.assert_close(vx.cpu(), vy.cpu(), rtol=0, atol=atol, msg=name)


def test_pyav_views_augmented_in_the_main_process_equal_the_readers(tiny_shards: Path, kit, monkeypatch):
    """With a device to augment on (a GPU in real runs, the CPU here), the PyAV readers hand over uint8 views and the
    main process augments and normalises them: the batches are the ones the readers would have made."""
    from xkd.pipeline import loader

    cfg = kit.tiny_config(tiny_shards, num_workers=2)

    def batches() -> tuple[list, list]:
        train = list(itertools.islice(make_train_loader(cfg, seed=5), 3))
        return train, list(make_eval_loader(cfg, split="test", clips=2, crops=1))

    in_reader = batches()
    assert loader.augment_device(cfg, "pyav") is None  # no GPU here: the readers augment
    monkeypatch.setattr(loader, "augment_device", lambda cfg, backend: torch.device("cpu"))
    raw = loader.ReaderDataset(
        loader._plan(cfg, "train", None, True, "pyav", rank=0, world_size=1, seed=(5, 0, 0))
    )
    first = next(iter(raw))[0]
    assert (
        first["video_global"].dtype == torch.uint8 and "photo_global" in first
    )  # uint8 views leave the reader
    in_main = batches()
    for reader_batches, main_batches in zip(in_reader, in_main):
        _assert_equal_batches(reader_batches, main_batches)


def test_augment_device_names_what_it_needs():
    with pytest.raises(ValueError, match="augment_device='gpu'.*auto"):
        DataConfig(shards="x", augment_device="gpu")
    if not torch.cuda.is_available():
        from xkd.pipeline.loader import augment_device

        with pytest.raises(RuntimeError, match="augment_device='cuda' needs a CUDA GPU"):
            augment_device(DataConfig(shards="x", augment_device="cuda"), "pyav")


@pytest.mark.gpu
def test_pyav_views_augmented_on_the_gpu_match_the_cpu(tiny_shards: Path, kit):
    batches = {}
    for device in ("cuda", "cpu"):
        cfg = kit.tiny_config(tiny_shards, num_workers=2, augment_device=device)
        batches[device] = list(itertools.islice(make_train_loader(cfg, seed=5), 3))
    assert batches["cuda"][0].video_global.is_cuda and not batches["cpu"][0].video_global.is_cuda
    # Same uint8 views and parameters; float kernels differ in rounding (blur, hue) only.
    _assert_equal_batches(batches["cuda"], batches["cpu"], atol=1e-4)
