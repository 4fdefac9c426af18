"""Audio views: window cut, silence padding, volume jitter in the log domain, normalisation, BYOL-A crop."""

from __future__ import annotations

import math

import numpy as np
import torch

from xkd.pipeline.audio import add_gain, audio_views, mel_window, random_resize_crop
from xkd.sharding.mel import SILENCE, log_mel


def test_window_cut_and_silence_padding():
    mel = np.arange(80 * 10, dtype=np.float16).reshape(80, 10)
    window = mel_window(mel, 4, 8)
    assert window.dtype == torch.float32 and window.shape == (80, 8)
    assert torch.equal(window[:, :6], torch.from_numpy(mel[:, 4:].astype(np.float32)))
    assert (window[:, 6:] == SILENCE).all()


def test_volume_gain_matches_scaling_the_waveform():
    t = torch.arange(16000) / 16000
    wave = 0.3 * torch.sin(2 * math.pi * 440 * t) + 0.05 * torch.randn(
        16000, generator=torch.Generator().manual_seed(0)
    )
    louder = log_mel(wave * 1.2)
    shifted = add_gain(log_mel(wave), 1.2)
    # Equal wherever the signal is well above the log floor (the eps only matters near digital silence).
    loud = log_mel(wave) > -10
    assert torch.allclose(louder[loud], shifted[loud], atol=1e-3)


class FixedRng:
    """Stands in for numpy's Generator: uniform -> fixed values, integers -> the lower bound offset."""

    def __init__(self, uniforms: list[float], ints: list[int]):
        self.uniforms, self.ints = list(uniforms), list(ints)

    def uniform(self, low: float, high: float) -> float:
        return self.uniforms.pop(0)

    def integers(self, low: int, high: int) -> int:
        return self.ints.pop(0)


def test_byol_random_resize_crop():
    spec = torch.randn(80, 112)
    # Crop exactly the input where it sits on the 80 x 168 canvas: identity.
    same = random_resize_crop(spec, FixedRng([1.0, 1.0], [0, 28]))
    assert torch.allclose(same, spec, atol=1e-5)
    # The largest crop zooms out: the input shrinks and the canvas' zeros (the normalised mean) come in at the sides.
    wide = random_resize_crop(spec, FixedRng([1.0, 1.5], [0, 0]))
    assert wide.shape == (80, 112) and wide[:, :10].abs().max() < 0.2 and wide[:, -10:].abs().max() < 0.2
    rng = np.random.default_rng(0)
    assert all(random_resize_crop(spec, rng).shape == (80, 112) for _ in range(20))


def test_audio_views_training_and_evaluation():
    mel = np.random.default_rng(0).normal(-5, 4, (80, 600)).astype(np.float16)
    g, loc = audio_views(mel, 100, 448, mean=-5.0, std=4.0)
    assert g.shape == (1, 80, 448) and loc is None
    expected = (torch.from_numpy(mel[:, 100:548].astype(np.float32)) + 5.0) / 4.0
    assert torch.allclose(g[0], expected)
    rng = np.random.default_rng(1)
    g2, loc2 = audio_views(
        mel, 100, 448, -5.0, 4.0, np.array([0, 336]), 112, rng, global_gain=(0.9, 1.1), local_gain=(0.8, 1.2)
    )
    assert loc2.shape == (2, 1, 80, 112)
    shift = (g2[0] - expected).mean().item() * 4.0  # 2 ln g, g in [0.9, 1.1]
    assert 2 * math.log(0.9) - 1e-4 <= shift <= 2 * math.log(1.1) + 1e-4 and abs(shift) > 1e-6
