"""The portable PyAV path: frame selection by index and stride, edge padding, crop/resize/flip."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from xkd.pipeline.decode import DecodeError, crop_resize, decode_frames


@pytest.fixture(scope="module")
def counting_video(kit) -> bytes:
    """48 flat grey frames whose level encodes the frame index (10 + 5 i), VP9 at 8 fps."""
    levels = 10 + 5 * np.arange(48)
    frames = np.broadcast_to(levels[:, None, None, None], (48, 32, 48, 3)).astype(np.uint8)
    return kit.encode_vp9(np.ascontiguousarray(frames))


def frame_indices(frames: torch.Tensor) -> list[int]:
    return [round((float(f.float().mean()) - 10) / 5) for f in frames]


def test_frames_by_start_and_stride_with_seeking(counting_video: bytes):
    assert frame_indices(decode_frames(counting_video, 0, 4)) == [0, 1, 2, 3]
    assert frame_indices(decode_frames(counting_video, 5, 6, stride=3)) == [5, 8, 11, 14, 17, 20]
    clip = decode_frames(counting_video, 27, 8)  # a window that starts between keyframes
    assert clip.shape == (8, 32, 48, 3) and clip.dtype == torch.uint8
    assert frame_indices(clip) == list(range(27, 35))


def test_past_the_end_repeats_the_last_frame(counting_video: bytes):
    assert frame_indices(decode_frames(counting_video, 44, 7)) == [44, 45, 46, 47, 47, 47, 47]
    with pytest.raises(DecodeError):
        decode_frames(b"\x00" * 1000, 0, 4)


def test_crop_resize_and_flip():
    frames = torch.zeros(2, 40, 60, 3, dtype=torch.uint8)
    frames[:, :, 30:] = 200  # right half bright: the edge lands mid-crop
    out = crop_resize(frames, np.array([0, 10, 40, 50]), 16, flip=False)
    assert out.shape == (2, 16, 16, 3) and out.dtype == torch.uint8
    assert out[0, :, :7].float().mean() < 5 and out[0, :, 9:].float().mean() > 195
    flipped = crop_resize(frames, np.array([0, 10, 40, 50]), 16, flip=True)
    assert torch.equal(flipped, out.flip(2))
