"""View parameters: crop boxes, synchronous windows, evaluation clips, determinism."""

from __future__ import annotations

import math

import numpy as np
import pytest

from xkd.pipeline import DataConfig
from xkd.pipeline.audio import MEL_FRAMES_PER_SECOND
from xkd.pipeline.views import draw_train_views, eval_crop_boxes, eval_views, random_resized_crop, start_range
from xkd.sharding.schema import SampleMeta


def meta(seconds: float = 10.0, fps: float = 8.0, width: int = 170, height: int = 128) -> SampleMeta:
    frames = int(round(seconds * fps))
    return SampleMeta(
        key="toy_0",
        dataset="toy",
        source="x",
        split="train",
        label=0,
        label_name="a",
        duration_s=seconds,
        fps=fps,
        num_frames=frames,
        mel_frames=1 + int(round(seconds * 16000)) // 143,
        has_audio=True,
        width=width,
        height=height,
    )


def test_random_resized_crop_respects_scale_ratio_and_bounds():
    rng = np.random.default_rng(0)
    for _ in range(300):
        y0, x0, y1, x1 = random_resized_crop(rng, 128, 170, (0.2, 1.0), (3 / 4, 4 / 3))
        h, w = y1 - y0, x1 - x0
        assert 0 <= y0 < y1 <= 128 and 0 <= x0 < x1 <= 170
        assert 0.19 <= h * w / (128 * 170) <= 1.01
        assert 3 / 4 - 0.05 <= w / h <= 4 / 3 + 0.05
    # A frame far outside the ratio range falls back to the largest centred crop of the allowed ratio.
    assert random_resized_crop(rng, 10, 400, (1.0, 1.0), (3 / 4, 4 / 3)).tolist() == [0, 193, 10, 206]


def test_eval_crop_boxes_centre_and_three_crops():
    # Short side 128 scaled to 128 -> crop 112: the paper's resize-128 centre-crop-112.
    assert eval_crop_boxes(128, 170, 112, 128, 1).tolist() == [[8, 29, 120, 141]]
    three = eval_crop_boxes(128, 170, 112, 128, 3)
    assert three[:, 1].tolist() == [0, 29, 58] and (three[:, 3] - three[:, 1] == 112).all()
    assert eval_crop_boxes(170, 128, 112, 128, 3)[:, 0].tolist() == [0, 29, 58]


def test_train_views_fit_the_clip_and_audio_starts_at_the_video_time():
    cfg = DataConfig()
    m = meta(seconds=6.0)
    rng = np.random.default_rng(0)
    starts = set()
    for _ in range(200):
        v = draw_train_views(rng, m, cfg, True, True)
        start = v["video_start"]
        starts.add(start)
        assert start >= 0 and start + cfg.video_frames <= m.num_frames
        assert v["start_s"] == start / m.fps
        assert v["audio_start"] == round(start / m.fps * MEL_FRAMES_PER_SECOND)
        assert v["audio_start"] + cfg.audio_mel_frames <= m.mel_frames
        assert ((v["video_local_offset"] >= 0) & (v["video_local_offset"] <= 24)).all()
        assert ((v["audio_local_offset"] >= 0) & (v["audio_local_offset"] <= 336)).all()
    assert starts == set(range(17))  # every start of a 48-frame clip for a 32-frame window
    # Same generator state -> same views (both decoding paths rely on it).
    a = draw_train_views(np.random.default_rng(5), m, cfg, True, True)
    b = draw_train_views(np.random.default_rng(5), m, cfg, True, True)
    assert all(np.array_equal(a[k], b[k]) for k in a)


def test_stride_short_clips_and_audio_only_windows():
    cfg = DataConfig()
    m = meta(seconds=10.0, fps=16.0)
    assert start_range(m, cfg, True, False) == 160 - 63
    v = draw_train_views(np.random.default_rng(0), m, cfg, True, True)
    assert v["video_stride"] == 2
    with pytest.raises(ValueError, match="not an integer multiple"):
        start_range(meta(fps=25.0), cfg, True, True)
    assert start_range(meta(seconds=3.0), cfg, True, True) < 0
    audio_only = meta(seconds=5.0)
    assert start_range(audio_only, cfg, False, True) == audio_only.mel_frames - 448


def test_eval_views_evenly_spaced_clips_times_crops():
    cfg = DataConfig()
    m = meta(seconds=10.0)
    views = eval_views(m, cfg, clips=3, crops=3, with_video=True, with_audio=True)
    assert [v["clip_index"] for v in views] == list(range(9))
    starts = [v["video_start"] for v in views[::3]]
    assert starts == [0, 24, 48]  # 80 frames, last start 48
    assert all(v["video_flip"] is False for v in views)
    assert [v["audio_start"] for v in views[::3]] == [round(s / 8 * MEL_FRAMES_PER_SECOND) for s in starts]
    short = eval_views(meta(seconds=2.0), cfg, clips=2, crops=1, with_video=True, with_audio=True)
    assert [v["video_start"] for v in short] == [0, 0]
    assert math.isclose(views[3]["start_s"], 3.0)
