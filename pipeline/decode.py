"""The portable decoding path: PyAV decodes the shard's video bytes, torch crops, resizes and flips.

It produces the same uint8 clips as the DALI path (`dali.py`) for the same view parameters (`views.py`): frames
are picked by index at the view's stride from the window start, frames past the end repeat the last one (DALI's
`pad_mode="edge"`), and each view is DALI's pipeline in closed form. DALI converts every decoded frame to RGB
(BT.601 whatever the stream's colour tag, chroma upsampled bilinearly with centred siting, as swscale does) and
resizes a pixel ROI of the frame with an antialiased (triangle) filter that reads the pixels around the ROI and
repeats the frame's edge pixels. All of that is linear, so here the decoded Y, U and V planes are resampled
straight to the view's size with per-axis weight matrices that fold in the crop, the filter, the chroma
upsampling and the flip (two matrix products per plane, all frames at once), and only the view's pixels are
converted to RGB: 32 x 112 x 112 + 8 x 96 x 96 pixels per training sample instead of 32 full frames. Results
match DALI's to within rounding, except where a colour saturates (DALI clips each full-resolution pixel, this
path the resampled one). Runs inside torch DataLoader workers, one decoder thread per worker.
"""

from __future__ import annotations

import io
from fractions import Fraction
from typing import NamedTuple

import av
import numpy as np
import torch

# BT.601 limited range, DALI's conversion: rows R, G, B; columns Y, U, V (offsets 16, 128, 128).
_KR, _KB = 0.299, 0.114
_KG = 1 - _KR - _KB
_Y_GAIN, _C_GAIN = 255 / 219, 255 / 224
_YUV_TO_RGB = torch.tensor(
    [
        [_Y_GAIN, 0.0, 2 * (1 - _KR) * _C_GAIN],
        [_Y_GAIN, -2 * _KB * (1 - _KB) / _KG * _C_GAIN, -2 * _KR * (1 - _KR) / _KG * _C_GAIN],
        [_Y_GAIN, 2 * (1 - _KB) * _C_GAIN, 0.0],
    ],
    dtype=torch.float64,
)
# + 0.5: the float -> uint8 cast truncates, so adding half a level rounds to the nearest.
_RGB_BIAS = (0.5 - _YUV_TO_RGB @ torch.tensor([16.0, 128.0, 128.0], dtype=torch.float64)).float()[:, None]
_YUV_TO_RGB = _YUV_TO_RGB.float()


class DecodeError(RuntimeError):
    """The video bytes could not be decoded (the reader skips the sample with a counted warning)."""


class YuvClip(NamedTuple):
    """Decoded frames as their 4:2:0 planes: y (T, H, W), u and v (T, ceil(H / 2), ceil(W / 2)), uint8."""

    y: torch.Tensor
    u: torch.Tensor
    v: torch.Tensor


def _frame_index(offset: int, num: int, den: int) -> int:
    """round(offset * num / den) in integers, ties to even as Python's round of a Fraction."""
    q, r = divmod(offset * num, den)
    return q + (2 * r > den or (2 * r == den and q % 2 == 1))


def decode_frames(data: bytes, start: int, count: int, stride: int = 1) -> YuvClip:
    """Frames start, start + stride, ... (count of them) of an encoded video, as 4:2:0 planes.

    Seeks to the keyframe before `start` (shards keep a keyframe every <= 8 frames), so a window deep into a long
    clip costs at most a GOP of extra decoding. Frames are copied out of the decoder as they are, with no colour
    conversion; streams in another pixel format are converted to yuv420p.
    """
    planes: list[np.ndarray] = []
    decoded = np.zeros(count, dtype=bool)
    try:
        with av.open(io.BytesIO(data), mode="r") as container:
            stream = container.streams.video[0]
            stream.codec_context.thread_count = 1
            rate = stream.average_rate or stream.guessed_rate
            if not rate:
                raise DecodeError("video stream has no frame rate")
            time_base, origin = stream.time_base, stream.start_time or 0
            # frame index = (pts - origin) * time_base * rate, kept in integers (Fractions cost ~10 us a frame)
            scale = Fraction(time_base) * Fraction(rate)
            if start > 0:
                container.seek(
                    origin + int(Fraction(start) / Fraction(rate) / time_base), stream=stream, backward=True
                )
            end = start + stride * (count - 1)
            for frame in container.decode(stream):
                pts = frame.pts if frame.pts is not None else frame.dts
                index = _frame_index(pts - origin, scale.numerator, scale.denominator)
                if index > end:
                    break
                if index < start or (index - start) % stride:
                    continue
                if frame.format.name != "yuv420p":
                    frame = frame.reformat(format="yuv420p")
                if not planes:
                    planes = [np.empty((count, p.height, p.width), dtype=np.uint8) for p in frame.planes]
                slot = (index - start) // stride
                decoded[slot] = True
                for out, plane in zip(planes, frame.planes):
                    # The decoder's rows are padded to `line_size` bytes.
                    rows = np.frombuffer(plane, dtype=np.uint8).reshape(-1, plane.line_size)
                    out[slot] = rows[: out.shape[1], : out.shape[2]]
                if index == end:  # the window is complete: decoding the next frame would be wasted
                    break
    except (av.FFmpegError, IndexError, ValueError) as err:
        raise DecodeError(f"cannot decode video: {err}") from err
    if not decoded.any():
        raise DecodeError(f"no frame at or after frame {start}")
    # Frames past the end (or missing from the stream) repeat the last decoded one (DALI pad_mode="edge").
    last = np.flatnonzero(decoded)[-1]
    for out in planes:
        out[~decoded] = out[last]
    return YuvClip(*(torch.from_numpy(p) for p in planes))


def _luma_taps(start: float, end: float, size: int, length: int) -> tuple[np.ndarray, np.ndarray]:
    """Resampling of [start, end) of an axis of `length` pixels (pixel k covers [k, k + 1)) to `size` pixels with
    DALI's antialiased linear filter: a triangle as wide as the larger of the input and output pixels, reading
    the pixels around the interval and repeating the edge pixels past the axis ends.

    Returns (input pixel, weight), both (size, taps); each output's weights sum to 1.
    """
    scale = (end - start) / size
    support = max(scale, 1.0)
    centres = start + (np.arange(size) + 0.5) * scale
    pixels = np.floor(centres - support).astype(np.int64)[:, None] + np.arange(int(np.ceil(2 * support)) + 2)
    weights = np.maximum(0.0, 1 - np.abs(pixels + 0.5 - centres[:, None]) / support)
    weights /= weights.sum(1, keepdims=True)
    return np.clip(pixels, 0, length - 1), weights


def _chroma_taps(
    pixels: np.ndarray, weights: np.ndarray, length: int, chroma_length: int
) -> tuple[np.ndarray, np.ndarray]:
    """Compose luma taps with the bilinear upsampling of a 4:2:0 chroma axis to the luma grid (swscale's, so DALI
    decoder's: chroma samples centred on their luma pixels, the chroma axis spanning the luma axis, edge samples
    repeated): the same resampling read directly from the chroma plane."""
    position = (pixels + 0.5) * (chroma_length / length) - 0.5  # in chroma pixels
    below = np.floor(position)
    frac = position - below
    below = below.astype(np.int64)
    chroma = np.clip(np.concatenate([below, below + 1], 1), 0, chroma_length - 1)
    return chroma, np.concatenate([weights * (1 - frac), weights * frac], 1)


# Outputs per block of the banded matrix products: a block reads only the input pixels under its filters, which
# cuts the multiply-adds ~4x against whole-region products at S = 112 while the products stay large enough to be
# efficient. (MKL's sparse products were no faster here once their per-call allocations are counted.)
_BLOCK = 24


def _blocks(
    pixels: np.ndarray, weights: np.ndarray, flip: bool = False
) -> tuple[int, int, list[tuple[slice, slice, torch.Tensor]]]:
    """Taps as dense weights over the input pixels they reach (repeated pixels summed), split into blocks of
    outputs with the input span each block's taps cover. `flip` reverses the outputs.

    Returns (first input pixel, pixels spanned, [(outputs, input span from the first pixel, weights)]).
    """
    if flip:
        pixels, weights = pixels[::-1], weights[::-1]
    used = weights > 0
    lows = np.where(used, pixels, pixels.max()).min(1)
    highs = np.where(used, pixels, pixels.min()).max(1)
    first = int(lows.min())
    span = int(highs.max()) - first + 1
    size = len(pixels)
    flat = (np.arange(size)[:, None] * span + np.clip(pixels - first, 0, span - 1)).ravel()
    dense = torch.from_numpy(np.bincount(flat, weights.ravel(), minlength=size * span).astype(np.float32))
    dense = dense.view(size, span)
    starts = np.arange(0, size, _BLOCK)
    block_lows = (np.minimum.reduceat(lows, starts) - first).tolist()
    block_highs = (np.maximum.reduceat(highs, starts) - first + 1).tolist()
    blocks = [
        (slice(b, b + _BLOCK), slice(lo, hi), dense[b : b + _BLOCK, lo:hi])
        for b, lo, hi in zip(starts.tolist(), block_lows, block_highs)
    ]
    return first, span, blocks


def _resample(planes: tuple[torch.Tensor, ...], rows: tuple, columns: tuple, out: torch.Tensor) -> None:
    """Resample every frame of each (T, H, W) uint8 plane into out[i] (S, T, S) float (view row, frame, view
    column): the columns in one product per block over all rows of all frames and planes, then the rows in one
    product per block and plane with the frames inside the rows. 2-D products only, no copies between passes."""
    (r0, nr, row_blocks), (c0, nc, column_blocks) = rows, columns
    frames, size = planes[0].shape[0], out.shape[-1]
    region = torch.empty((len(planes), nr, frames, nc))  # rows before frames: the row pass reads whole rows
    for dst, plane in zip(region, planes):
        dst.copy_(plane[:, r0 : r0 + nr, c0 : c0 + nc].transpose(0, 1))
    flat = region.view(-1, nc)
    across = torch.empty((len(planes), nr, frames * size))
    flat_across = across.view(-1, size)
    for outputs, span, w in column_blocks:
        torch.mm(flat[:, span], w.T, out=flat_across[:, outputs])
    for dst, src in zip(out, across):
        dst = dst.view(size, -1)
        for outputs, span, w in row_blocks:
            torch.mm(w, src[span], out=dst[outputs])


def crop_resize(clip: YuvClip, box: np.ndarray, size: int, flip: bool) -> torch.Tensor:
    """Crop `box` (y0, x0, y1, x1, luma pixels) out of every frame of a clip, resize it to size x size as DALI's
    antialiased linear resize with a pixel ROI, optionally flip horizontally, and convert to RGB:
    (T, size, size, 3) uint8, laid out channel-first in memory ((3, T, size, size) contiguous, permuted)."""
    y0, x0, y1, x1 = (float(b) for b in box)
    frames, height, width = clip.y.shape
    chroma_height, chroma_width = clip.u.shape[1:]
    luma_rows = _luma_taps(y0, y1, size, height)
    luma_columns = _luma_taps(x0, x1, size, width)
    chroma_rows = _chroma_taps(*luma_rows, height, chroma_height)
    chroma_columns = _chroma_taps(*luma_columns, width, chroma_width)
    yuv = torch.empty((3, size, frames, size))  # (plane, view row, frame, view column)
    # Reversing the output columns' weights flips the view for free.
    _resample((clip.y,), _blocks(*luma_rows), _blocks(*luma_columns, flip), yuv[:1])
    _resample((clip.u, clip.v), _blocks(*chroma_rows), _blocks(*chroma_columns, flip), yuv[1:])
    rgb = torch.mm(_YUV_TO_RGB, yuv.view(3, -1)).add_(_RGB_BIAS).clamp_(0, 255)
    out = torch.empty((3, frames, size, size), dtype=torch.uint8)
    # float -> int32 -> uint8 is ~3x faster than a direct cast (which torch does not vectorise); both truncate.
    out.transpose(1, 2).copy_(rgb.view(yuv.shape).to(torch.int32))
    return out.permute(1, 2, 3, 0)


def video_views(
    clip: YuvClip, view: dict[str, object], size: int, local_frames: int = 0, local_size: int = 0
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Cut one sample's views out of its decoded window.

    Args:
        clip: the window `decode_frames(data, view["video_start"], T, view["video_stride"])`.
        view: the sample's view parameters (see `views.View`).
        size: global view size; local_frames, local_size: local view geometry.

    Returns:
        global (T, S, S, 3) uint8 and local (L, T_l, S_l, S_l, 3) uint8 (None without local views).
    """
    global_view = crop_resize(clip, view["video_box"], size, bool(view["video_flip"]))
    if "video_local_offset" not in view or len(view["video_local_offset"]) == 0:
        return global_view, None
    locals_ = [
        crop_resize(YuvClip(*(p[int(o) : int(o) + local_frames] for p in clip)), box, local_size, bool(flip))
        for o, box, flip in zip(view["video_local_offset"], view["video_local_box"], view["video_local_flip"])
    ]
    return global_view, stack_views(locals_)


def stack_views(views: list[torch.Tensor]) -> torch.Tensor:
    """torch.stack of (..., 3) uint8 views that keeps them channel-first in memory, as `crop_resize` writes them:
    the photometric step's uint8 -> float copy to (B, 3, T, S, S) then reads memory in order (~8x faster than
    gathering interleaved RGB)."""
    return torch.stack([v.movedim(-1, 0) for v in views]).movedim(1, -1)
