"""Photometric augmentation on the batch: torchvision semantics, temporal consistency, normalisation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torchvision.transforms.v2 import functional as TF

from xkd.pipeline import DataConfig
from xkd.pipeline.augment import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    collate_photometric,
    draw_photometric,
    photometric,
)


def clips(b: int = 3, t: int = 4, h: int = 20, w: int = 24) -> torch.Tensor:
    return torch.randint(
        0, 256, (b, t, h, w, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)
    )


def params(b: int, **overrides: object) -> dict[str, torch.Tensor]:
    p = collate_photometric([draw_photometric(None, DataConfig(), local=False) for _ in range(b)])
    for k, v in overrides.items():
        p[k] = torch.as_tensor(v)
    return p


def denormalise(x: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1, 1)
    return x * std + mean


def reference(video: torch.Tensor, order: list[int], factors: list[float]) -> torch.Tensor:
    """torchvision's ColorJitter functions applied frame by frame in `order`."""
    ops = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue]
    x = video.permute(0, 1, 4, 2, 3).float() / 255  # (B, T, 3, H, W)
    out = []
    for clip in x:
        for i in order:
            clip = ops[i](clip, factors[i])
        out.append(clip)
    return torch.stack(out).permute(0, 2, 1, 3, 4)


def test_identity_parameters_only_normalise():
    video = clips()
    out = photometric(video, params(3))
    assert out.shape == (3, 3, 4, 20, 24) and out.dtype == torch.float32
    assert torch.allclose(denormalise(out), video.permute(0, 4, 1, 2, 3).float() / 255, atol=1e-6)


@pytest.mark.parametrize("order", [[0, 1, 2, 3], [3, 2, 1, 0], [2, 0, 3, 1]])
def test_colour_jitter_matches_torchvision(order: list[int]):
    video = clips()
    factors = [1.3, 0.7, 1.35, -0.15]
    p = params(3, jitter=[True] * 3, factors=[factors] * 3, order=[order] * 3)
    got = denormalise(photometric(video, p))
    assert torch.allclose(got, reference(video, order, factors), atol=1e-5)


def test_same_parameters_on_every_frame_and_per_sample_choices():
    frame = clips(b=2, t=1)
    video = frame.expand(-1, 5, -1, -1, -1).contiguous()  # a still clip
    cfg = DataConfig(video_local_grayscale_p=1.0, video_local_blur_p=1.0)
    rng = np.random.default_rng(0)
    p = collate_photometric([draw_photometric(rng, cfg, local=True) for _ in range(2)])
    out = photometric(video, p)
    assert torch.allclose(out[:, :, :1].expand_as(out), out)  # temporally consistent
    gray = denormalise(out)
    assert torch.allclose(gray[:, 0], gray[:, 1], atol=1e-6) and torch.allclose(
        gray[:, 1], gray[:, 2], atol=1e-6
    )

    # Only the chosen samples are blurred, with their own sigma, as torchvision's gaussian_blur.
    p = params(2, blur=[False, True], sigma=[1.0, 1.7])
    out = denormalise(photometric(video, p))
    x = video.permute(0, 1, 4, 2, 3).float() / 255
    assert torch.allclose(out[0], x[0].transpose(0, 1), atol=1e-6)
    expected = TF.gaussian_blur(x[1], kernel_size=[9, 9], sigma=[1.7, 1.7]).transpose(0, 1)
    assert torch.allclose(out[1], expected, atol=1e-5)


def test_drawn_parameters_follow_the_config():
    rng = np.random.default_rng(0)
    cfg = DataConfig()
    drawn = [draw_photometric(rng, cfg, local=True) for _ in range(400)]
    f = np.stack([d["factors"] for d in drawn])
    assert (
        (f[:, :3] >= 0.6 - 1e-6).all()
        and (f[:, :3] <= 1.4 + 1e-6).all()
        and (np.abs(f[:, 3]) <= 0.2 + 1e-6).all()
    )
    assert all(d["jitter"] for d in drawn)  # applied always, as in the paper
    assert 0.1 < np.mean([d["gray"] for d in drawn]) < 0.3 and 0.4 < np.mean([d["blur"] for d in drawn]) < 0.6
    globals_ = [draw_photometric(rng, cfg, local=False) for _ in range(100)]
    assert not any(d["gray"] or d["blur"] for d in globals_)
    assert not draw_photometric(rng, DataConfig(augment=False), local=True)["jitter"]
