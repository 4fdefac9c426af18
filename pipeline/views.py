"""Per-sample view parameters: the synchronous global window, the local windows, crop boxes and flips.

Implements the view sampling of `../shared/xkd-method.md` 2.1 and 3.1-3.2: one start time shared by video and
audio (the log-mel window is cut at the time of the first video frame, so the two stay aligned to within half a
mel hop), local views drawn independently per modality inside the global window, RandomResizedCrop boxes (global
scale (0.2, 1), local (0.08, 0.4)) and horizontal flips; and the evaluation views of section 5.1 (K evenly spaced
clips, resize 128 + centre crop 112, or 3 crops along the long side).

Everything is drawn from a `numpy.random.Generator` the reader seeds from (seed, step, rank, worker), so the
DALI and PyAV paths, fed by the same reader, see identical parameters. Crop boxes are integer pixel boxes
`(y0, x0, y1, x1)` in the source frame; resizing a box of the 128-px shard frame to 112 px is the paper's
"resize to 112, then crop" up to rounding.
"""

from __future__ import annotations

import math

import numpy as np

from xkd.pipeline.audio import MEL_FRAMES_PER_SECOND
from xkd.pipeline.config import DataConfig
from xkd.sharding.schema import SampleMeta

View = dict[str, object]
"""Keys: `start_s`, `clip_index`; video: `video_start`, `video_stride`, `video_box`, `video_flip`,
`video_local_offset` (L,), `video_local_box` (L, 4), `video_local_flip` (L,); audio: `audio_start`,
`audio_local_offset` (L',). Offsets of local views count output frames (video) or mel frames from the window start."""


def video_stride(meta: SampleMeta, cfg: DataConfig) -> int:
    """Source frames per view frame; raises ValueError if the shard's fps is not a multiple of `cfg.video_fps`."""
    stride = round(meta.fps / cfg.video_fps)
    if stride < 1 or abs(meta.fps - stride * cfg.video_fps) > 1e-3 * cfg.video_fps:
        raise ValueError(
            f"video at {meta.fps} fps is not an integer multiple of DataConfig.video_fps={cfg.video_fps}: "
            f"re-shard with xkd-shard --fps {cfg.video_fps:g} (or set video_fps)"
        )
    return stride


def start_range(meta: SampleMeta, cfg: DataConfig, with_video: bool, with_audio: bool) -> int:
    """The largest start of the global window (in source video frames, or mel frames for audio-only data);
    negative when the sample is shorter than the window.

    The audio window may run past the mel's end by at most one video frame (padded with silence), which absorbs
    the rounding between a video's duration and its audio's without moving the audio off the video's time.
    """
    if not with_video:
        return meta.mel_frames - cfg.audio_mel_frames
    stride = video_stride(meta, cfg)
    last = meta.num_frames - ((cfg.video_frames - 1) * stride + 1)
    if with_audio:
        slack = math.ceil(MEL_FRAMES_PER_SECOND / cfg.video_fps)
        by_audio = math.floor(
            (meta.mel_frames + slack - cfg.audio_mel_frames) / MEL_FRAMES_PER_SECOND * meta.fps
        )
        last = min(last, by_audio)
    return last


def random_resized_crop(
    rng: np.random.Generator,
    height: int,
    width: int,
    scale: tuple[float, float],
    ratio: tuple[float, float],
) -> np.ndarray:
    """torchvision's RandomResizedCrop box: 10 tries at a random area fraction and log-uniform aspect ratio, else a
    centre crop clamped to the ratio range. Returns int32 (y0, x0, y1, x1)."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            y0 = int(rng.integers(0, height - h + 1))
            x0 = int(rng.integers(0, width - w + 1))
            return np.array([y0, x0, y0 + h, x0 + w], dtype=np.int32)
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        w, h = int(round(height * max(ratio))), height
    else:
        w, h = width, height
    y0, x0 = (height - h) // 2, (width - w) // 2
    return np.array([y0, x0, y0 + h, x0 + w], dtype=np.int32)


def eval_crop_boxes(height: int, width: int, size: int, resize: int, crops: int) -> np.ndarray:
    """Evaluation boxes (crops, 4): the square that becomes a `size` crop after scaling the short side to `resize`;
    1 crop is centred, 3 crops sit at the start, centre and end of the long side."""
    if crops not in (1, 3):
        raise ValueError(f"crops={crops}: evaluation supports 1 (centre) or 3 (along the long side) crops")
    side = min(height, width, int(round(min(height, width) * size / resize)))
    y_mid, x_mid = (height - side) // 2, (width - side) // 2
    if crops == 1:
        corners = [(y_mid, x_mid)]
    elif height > width:
        corners = [(0, x_mid), (y_mid, x_mid), (height - side, x_mid)]
    else:
        corners = [(y_mid, 0), (y_mid, x_mid), (y_mid, width - side)]
    return np.array([[y, x, y + side, x + side] for y, x in corners], dtype=np.int32)


def _times(meta: SampleMeta, cfg: DataConfig, start: int, with_video: bool) -> tuple[float, int]:
    """Start time and mel start of a window starting at `start` (source frame, or mel frame if audio-only)."""
    if with_video:
        start_s = start / meta.fps
        return start_s, int(round(start_s * MEL_FRAMES_PER_SECOND))
    return start / MEL_FRAMES_PER_SECOND, start


def draw_train_views(
    rng: np.random.Generator, meta: SampleMeta, cfg: DataConfig, with_video: bool, with_audio: bool
) -> View:
    """Random global window, local windows, crops and flips of one training sample (short samples start at 0)."""
    start = int(rng.integers(0, max(start_range(meta, cfg, with_video, with_audio), 0) + 1))
    start_s, audio_start = _times(meta, cfg, start, with_video)
    view: View = {"start_s": start_s, "clip_index": 0}
    if with_video:
        n_local = cfg.video_local_views
        view.update(
            video_start=start,
            video_stride=video_stride(meta, cfg),
            video_box=random_resized_crop(
                rng, meta.height, meta.width, cfg.video_global_scale, cfg.video_crop_ratio
            ),
            video_flip=bool(rng.random() < cfg.video_flip_p),
            video_local_offset=rng.integers(0, cfg.video_frames - cfg.video_local_frames + 1, n_local).astype(
                np.int32
            ),
            video_local_box=np.array(
                [
                    random_resized_crop(
                        rng, meta.height, meta.width, cfg.video_local_scale, cfg.video_crop_ratio
                    )
                    for _ in range(n_local)
                ],
                dtype=np.int32,
            ).reshape(n_local, 4),  # np.array, not np.stack: 0 local views (feature banks) gives (0, 4)
            video_local_flip=rng.random(n_local) < cfg.video_flip_p,
        )
    if with_audio:
        view.update(
            audio_start=audio_start,
            audio_local_offset=rng.integers(
                0, cfg.audio_mel_frames - cfg.audio_local_mel_frames + 1, cfg.audio_local_views
            ).astype(np.int32),
        )
    return view


def eval_views(
    meta: SampleMeta, cfg: DataConfig, clips: int, crops: int, with_video: bool, with_audio: bool
) -> list[View]:
    """The clips x crops evaluation views of one sample: clip starts evenly spaced over the sample (all at 0 when
    it is shorter than the window), `clip_index = clip * crops + crop`; no randomness, no local views."""
    if clips < 1:
        raise ValueError(f"clips={clips} must be >= 1")
    last = max(start_range(meta, cfg, with_video, with_audio), 0)
    starts = np.linspace(0, last, clips).round().astype(int)
    boxes = (
        eval_crop_boxes(meta.height, meta.width, cfg.video_size, cfg.video_eval_resize, crops)
        if with_video
        else None
    )
    views = []
    for clip, start in enumerate(starts):
        start_s, audio_start = _times(meta, cfg, int(start), with_video)
        for crop in range(crops):
            view: View = {"start_s": start_s, "clip_index": clip * crops + crop}
            if with_video:
                assert boxes is not None
                view.update(
                    video_start=int(start),
                    video_stride=video_stride(meta, cfg),
                    video_box=boxes[crop],
                    video_flip=False,
                )
            if with_audio:
                view["audio_start"] = audio_start
            views.append(view)
    return views
