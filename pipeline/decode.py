"""The portable decoding path: PyAV decodes the shard's video bytes, torch crops, resizes and flips.

It produces the same uint8 clips as the DALI path (`dali.py`) for the same view parameters (`views.py`): frames
are picked by index at the view's stride from the window start, frames past the end repeat the last one (DALI's
`pad_mode="edge"`), YUV is converted to RGB the way DALI's decoder does (BT.601 whatever the stream's colour tag,
bilinear chroma upsampling), and crops are resized with antialiased bilinear filtering. Runs inside torch DataLoader workers, one decoder thread per worker.
"""

from __future__ import annotations

import io
from fractions import Fraction

import av
import numpy as np
import torch
import torch.nn.functional as F
from av.video.reformatter import Colorspace, Interpolation, VideoReformatter

# swscale flags that reproduce DALI's YUV -> RGB conversion (chroma interpolated to full width with exact
# rounding; swscale's default takes the nearest chroma sample, which differs by up to ~200 grey levels at colour
# edges). Together with forcing BT.601, DALI's matrix whatever the stream's tag, frames agree within 1 level.
_DALI_LIKE = Interpolation.BILINEAR | Interpolation.FULL_CHR_H_INT | Interpolation.ACCURATE_RND


class DecodeError(RuntimeError):
    """The video bytes could not be decoded (the reader skips the sample with a counted warning)."""


def decode_frames(data: bytes, start: int, count: int, stride: int = 1) -> torch.Tensor:
    """Frames start, start + stride, ... (count of them) of an encoded video as (count, H, W, 3) uint8 RGB.

    Seeks to the keyframe before `start` (shards keep a keyframe every <= 8 frames), so a window deep into a long
    clip costs at most a GOP of extra decoding.
    """
    wanted = start + stride * np.arange(count)
    rgb: dict[int, np.ndarray] = {}
    reformatter = VideoReformatter()
    try:
        with av.open(io.BytesIO(data), mode="r") as container:
            stream = container.streams.video[0]
            stream.codec_context.thread_count = 1
            rate = stream.average_rate or stream.guessed_rate
            if not rate:
                raise DecodeError("video stream has no frame rate")
            time_base, origin = stream.time_base, stream.start_time or 0
            if start > 0:
                container.seek(
                    origin + int(Fraction(start) / Fraction(rate) / time_base), stream=stream, backward=True
                )
            for frame in container.decode(stream):
                pts = frame.pts if frame.pts is not None else frame.dts
                index = round((pts - origin) * time_base * rate)
                if index > wanted[-1]:
                    break
                if index >= start and (index - start) % stride == 0:
                    rgb[index] = reformatter.reformat(
                        frame, format="rgb24", src_colorspace=Colorspace.ITU601, interpolation=_DALI_LIKE
                    ).to_ndarray()
    except (av.FFmpegError, IndexError, ValueError) as err:
        raise DecodeError(f"cannot decode video: {err}") from err
    if not rgb:
        raise DecodeError(f"no frame at or after frame {start}")
    last = rgb[max(rgb)]
    # Frames past the end repeat the last decoded one (DALI pad_mode="edge").
    return torch.from_numpy(np.stack([rgb.get(int(i), last) for i in wanted]))


def crop_resize(frames: torch.Tensor, box: np.ndarray, size: int, flip: bool) -> torch.Tensor:
    """Crop `box` (y0, x0, y1, x1) out of (T, H, W, 3) uint8 frames, resize it to size x size (antialiased
    bilinear, as DALI's resize) and optionally flip horizontally: (T, size, size, 3) uint8."""
    y0, x0, y1, x1 = (int(b) for b in box)
    crop = frames[:, y0:y1, x0:x1].permute(0, 3, 1, 2)  # (T, 3, h, w), channels-last memory: uint8 fast path
    out = F.interpolate(crop, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    out = out.permute(0, 2, 3, 1)
    return out.flip(2) if flip else out


def video_views(
    clip: torch.Tensor, view: dict[str, object], size: int, local_frames: int = 0, local_size: int = 0
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Cut one sample's views out of its decoded window.

    Args:
        clip: (T, H, W, 3) uint8, the window `decode_frames(data, view["video_start"], T, view["video_stride"])`.
        view: the sample's view parameters (see `views.View`).
        size: global view size; local_frames, local_size: local view geometry.

    Returns:
        global (T, S, S, 3) uint8 and local (L, T_l, S_l, S_l, 3) uint8 (None without local views).
    """
    global_view = crop_resize(clip, view["video_box"], size, bool(view["video_flip"]))
    if "video_local_offset" not in view or len(view["video_local_offset"]) == 0:
        return global_view, None
    locals_ = [
        crop_resize(clip[int(o) : int(o) + local_frames], box, local_size, bool(flip))
        for o, box, flip in zip(view["video_local_offset"], view["video_local_box"], view["video_local_flip"])
    ]
    return global_view, torch.stack(locals_)
