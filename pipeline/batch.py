"""The batch: the one type the data pipeline hands to the trainer and the evaluator (`../shared/contracts.md`).

Both the DALI path and the portable PyAV path yield `Batch`; `train.py` and `eval.py` unpack it and pass plain
tensors to `model/`, which never imports this module.

Shapes for the paper's geometry (configs change T, H, W, F and the mel length):

- `video_global` (B, 3, 32, 112, 112) float32, ImageNet-normalised; None for audio-only data.
- `video_local`  (L, B, 3, 8, 96, 96) float32, L local views; None when no local view is asked for.
- `audio_global` (B, 1, 80, 448) float32, normalised log-mel; None for video-only batches.
- `audio_local`  (L', B, 1, 80, 112) float32; None when no local view is asked for.
- `label` (B,) int64, -1 if unlabelled; `key` list of B sample keys; `start_s` (B,) float32 start of the global
  window in the sample; `clip_index` (B,) int64, 0..K-1 in evaluation (K clips x crops per key flattened into B),
  0 in training.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch


@dataclass
class Batch:
    video_global: torch.Tensor | None
    """(B, 3, T, H, W) float32, ImageNet-normalised, or None."""
    video_local: torch.Tensor | None
    """(L, B, 3, T_l, H_l, W_l) float32, or None."""
    audio_global: torch.Tensor | None
    """(B, 1, F, T_mel) float32, normalised log-mel, or None."""
    audio_local: torch.Tensor | None
    """(L', B, 1, F, T_mel_l) float32, or None."""
    label: torch.Tensor
    """(B,) int64, -1 if unlabelled."""
    key: list[str]
    """B sample keys (repeated across the clips of one sample in evaluation)."""
    start_s: torch.Tensor
    """(B,) float32, start of the global window in seconds."""
    clip_index: torch.Tensor
    """(B,) int64, clip/crop index within a sample in evaluation; 0 in training."""

    def __len__(self) -> int:
        return len(self.key)

    def to(self, device: torch.device | str, non_blocking: bool = True) -> Batch:
        """A copy with every tensor on `device` (the trainer moves batches; the pipeline never guesses a device)."""
        moved = {}
        for f in fields(self):
            value = getattr(self, f.name)
            moved[f.name] = (
                value.to(device, non_blocking=non_blocking) if isinstance(value, torch.Tensor) else value
            )
        return Batch(**moved)
