"""The portable PyAV path: frame selection by index and stride, edge padding, 4:2:0 planes, and views that equal
DALI's "convert every frame to RGB, then resize a pixel ROI" computed the slow way."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from xkd.pipeline.decode import DecodeError, YuvClip, crop_resize, decode_frames, stack_views, video_views


@pytest.fixture(scope="module")
def counting_video(kit) -> bytes:
    """48 flat grey frames whose level encodes the frame index (10 + 5 i), VP9 at 8 fps."""
    levels = 10 + 5 * np.arange(48)
    frames = np.broadcast_to(levels[:, None, None, None], (48, 32, 48, 3)).astype(np.uint8)
    return kit.encode_vp9(np.ascontiguousarray(frames))


def frame_indices(clip: YuvClip) -> list[int]:
    levels = (clip.y.float().mean((1, 2)) - 16) * 255 / 219  # grey: Y = 16 + 219 / 255 * level
    return [round((float(level) - 10) / 5) for level in levels]


def test_frames_by_start_and_stride_with_seeking(counting_video: bytes):
    assert frame_indices(decode_frames(counting_video, 0, 4)) == [0, 1, 2, 3]
    assert frame_indices(decode_frames(counting_video, 5, 6, stride=3)) == [5, 8, 11, 14, 17, 20]
    clip = decode_frames(counting_video, 27, 8)  # a window that starts between keyframes
    assert clip.y.shape == (8, 32, 48) and clip.u.shape == clip.v.shape == (8, 16, 24)
    assert all(p.dtype == torch.uint8 for p in clip)
    assert frame_indices(clip) == list(range(27, 35))
    # Grey frames: no colour in the chroma planes.
    assert (clip.u.float() - 128).abs().max() <= 2 and (clip.v.float() - 128).abs().max() <= 2


def test_past_the_end_repeats_the_last_frame(counting_video: bytes):
    assert frame_indices(decode_frames(counting_video, 44, 7)) == [44, 45, 46, 47, 47, 47, 47]
    with pytest.raises(DecodeError):
        decode_frames(b"\x00" * 1000, 0, 4)


def test_odd_frame_sizes_decode_to_rounded_up_chroma(kit):
    frames = np.random.default_rng(0).integers(0, 256, (10, 49, 67, 3), dtype=np.uint8)
    clip = decode_frames(kit.encode_vp9(frames), 2, 4)
    assert clip.y.shape == (4, 49, 67) and clip.u.shape == clip.v.shape == (4, 25, 34)


def dali_reference(clip: YuvClip, box: tuple[int, int, int, int], size: int, flip: bool) -> np.ndarray:
    """What DALI computes, written out the slow way: every frame to RGB at full resolution (chroma upsampled
    bilinearly with centred samples, BT.601 limited range, clamped), then a triangle filter as wide as the larger
    of the input and output pixels over a pixel ROI, reading pixels around the ROI and repeating the frame's edge."""

    def upsample(n_out: int, n_in: int) -> np.ndarray:
        m = np.zeros((n_out, n_in))
        for k in range(n_out):
            p = (k + 0.5) * n_in / n_out - 0.5
            i = math.floor(p)
            m[k, min(max(i, 0), n_in - 1)] += 1 - (p - i)
            m[k, min(max(i + 1, 0), n_in - 1)] += p - i
        return m

    def roi(start: int, end: int, n_in: int) -> np.ndarray:
        m = np.zeros((size, n_in))
        scale = (end - start) / size
        support = max(scale, 1.0)
        for i in range(size):
            centre = start + (i + 0.5) * scale
            for j in range(math.floor(centre - support) - 1, math.ceil(centre + support) + 2):
                m[i, min(max(j, 0), n_in - 1)] += max(0.0, 1 - abs(j + 0.5 - centre) / support)
            m[i] /= m[i].sum()
        return m

    y, u, v = (p.double().numpy() for p in clip)
    (height, width), (chroma_height, chroma_width) = y.shape[1:], u.shape[1:]
    rows, columns = upsample(height, chroma_height), upsample(width, chroma_width)
    u, v = (np.einsum("hc,tcd,wd->thw", rows, p, columns) - 128 for p in (u, v))
    y = (y - 16) * 255 / 219
    kr, kb = 0.299, 0.114
    kg, c = 1 - kr - kb, 255 / 224
    rgb = np.stack(
        [
            y + 2 * (1 - kr) * c * v,
            y - 2 * kb * (1 - kb) / kg * c * u - 2 * kr * (1 - kr) / kg * c * v,
            y + 2 * (1 - kb) * c * u,
        ],
        -1,
    ).clip(0, 255)
    y0, x0, y1, x1 = box
    out = np.einsum("ih,thwc,jw->tijc", roi(y0, y1, height), rgb, roi(x0, x1, width))
    return out[:, :, ::-1] if flip else out


def random_clip(rng: np.random.Generator, frames: int, height: int, width: int) -> YuvClip:
    """Noise planes inside the RGB gamut (converting before or after resizing then agree up to rounding)."""
    chroma = (frames, (height + 1) // 2, (width + 1) // 2)
    planes = (rng.integers(60, 181, (frames, height, width)), *(rng.integers(110, 147, chroma) for _ in "uv"))
    return YuvClip(*(torch.from_numpy(p.astype(np.uint8)) for p in planes))


@pytest.mark.parametrize(
    ("height", "width", "box", "size", "flip"),
    [
        (48, 64, (0, 0, 48, 64), 32, False),  # whole frame, downscaled
        (48, 64, (3, 7, 40, 50), 32, True),  # odd offsets, filters reading around the ROI
        (37, 51, (1, 0, 37, 29), 40, False),  # odd frame (odd chroma) size, ROI on the frame edges, upscaled
        (37, 51, (10, 11, 21, 26), 16, True),  # small odd ROI, odd frame
        (40, 60, (0, 0, 40, 60), 11, False),  # strong downscaling: wide filters clamped at the edges
    ],
)
def test_crop_resize_is_convert_then_resize(height, width, box, size, flip):
    clip = random_clip(np.random.default_rng(height + size), 3, height, width)
    out = crop_resize(clip, np.array(box), size, flip)
    assert out.shape == (3, size, size, 3) and out.dtype == torch.uint8
    diff = np.abs(out.double().numpy() - dali_reference(clip, box, size, flip))
    assert diff.max() <= 0.5 + 1e-3  # rounding only


def test_saturated_colours_clamp_instead_of_wrapping():
    # Flat frames far outside the RGB gamut: red beyond 255, then below 0 (clamping before or after resizing
    # agrees on flat frames).
    planes = (
        np.array([235, 16])[:, None, None],
        np.array([16, 240])[:, None, None],
        np.array([240, 16])[:, None, None],
    )
    clip = YuvClip(
        *(torch.from_numpy(np.broadcast_to(p, (2, n, n)).astype(np.uint8)) for p, n in zip(planes, (8, 4, 4)))
    )
    out = crop_resize(clip, np.array([0, 0, 8, 8]), 4, False)
    assert out[0, ..., 0].eq(255).all() and out[1, ..., 0].eq(0).all()
    assert torch.equal(
        out, torch.from_numpy(dali_reference(clip, (0, 0, 8, 8), 4, False).round().astype(np.uint8))
    )


def test_views_share_one_window_and_keep_channel_first_memory():
    clip = random_clip(np.random.default_rng(1), 8, 24, 32)
    view = {
        "video_box": np.array([2, 3, 22, 27]),
        "video_flip": True,
        "video_local_offset": np.array([4, 1]),
        "video_local_box": np.array([[0, 0, 12, 12], [5, 9, 24, 32]]),
        "video_local_flip": np.array([False, True]),
    }
    global_view, local_views = video_views(clip, view, 16, local_frames=3, local_size=8)
    assert global_view.shape == (8, 16, 16, 3) and local_views.shape == (2, 3, 8, 8, 3)
    assert torch.equal(global_view, crop_resize(clip, view["video_box"], 16, True))
    second = YuvClip(*(p[1:4] for p in clip))
    assert torch.equal(local_views[1], crop_resize(second, view["video_local_box"][1], 8, True))
    batch = stack_views([global_view, global_view.flip(2)])
    assert torch.equal(batch, torch.stack([global_view, global_view.flip(2)]))
    # (B, 3, T, S, S) in memory: the float conversion reads in order.
    assert batch.movedim(-1, 1).is_contiguous()
