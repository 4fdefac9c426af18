"""Fixtures shared by the model tests: tiny configs and synthetic batches shaped like `pipeline.batch.Batch`."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from xkd.model import ModelConfig

Views = tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]


def make_views(cfg: ModelConfig, batch: int = 3, seed: int = 0) -> Views:
    """Random global and local views of both modalities with the geometry of `cfg`."""
    g = torch.Generator().manual_seed(seed)
    c = cfg.video_channels
    video_global = torch.randn(batch, c, cfg.video_frames, cfg.video_size, cfg.video_size, generator=g)
    video_local = torch.randn(
        cfg.video_local_views,
        batch,
        c,
        cfg.video_local_frames,
        cfg.video_local_size,
        cfg.video_local_size,
        generator=g,
    )
    audio_global = torch.randn(batch, 1, cfg.audio_mels, cfg.audio_frames, generator=g)
    audio_local = torch.randn(
        cfg.audio_local_views, batch, 1, cfg.audio_mels, cfg.audio_local_frames, generator=g
    )
    return video_global, video_local, audio_global, audio_local


@pytest.fixture(autouse=True)
def single_thread():
    """Tiny models run fastest on one thread, and on the shared 2-core machines OpenMP spinning across
    oversubscribed cores stalls them for seconds; the previous thread count is restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def tiny() -> Callable[..., ModelConfig]:
    """`tiny(**overrides)` -> the tiny preset with overrides."""
    return lambda **overrides: ModelConfig.from_name("tiny", **overrides)


@pytest.fixture
def views() -> Callable[..., Views]:
    """`views(cfg, batch=3, seed=0)` -> (video_global, video_local, audio_global, audio_local)."""
    return make_views
