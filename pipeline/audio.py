"""Audio views from the shards' log-mel: window cut, volume jitter, normalisation, BYOL-A random resize crop.

Implements `../shared/xkd-method.md` 3.3 on top of the precomputed natural-log mel (`../shared/contracts.md`,
"Audio front end"; the waveform -> log-mel transform itself lives once, in `xkd.sharding.mel`):
- the global view is the mel cut to the same time window as the video (frame i of the mel is centred at
  i * 143 / 16000 s, the first video frame at 0 s);
- volume jitter multiplies the waveform by g, i.e. adds 2 ln g to a power log-mel; global g ~ U(0.9, 1.1), local
  g ~ U(0.8, 1.2);
- normalisation with the paper's Kinetics statistics (mean -5.3688107, std 4.410007) unless asked otherwise;
- local views are 1 s segments of the global window followed by BYOL-A's RandomResizeCrop (centre the 80 x 112
  mel on an 80 x 168 canvas of zeros, i.e. of the mean after normalisation, crop a random (0.6-1.5 x 80, 0.6-1.5 x
  112) box, resize back bicubically with align_corners=True).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from xkd.sharding.mel import HOP_LENGTH, SAMPLE_RATE, SILENCE

# The mel's time grid (centered STFT): frame i is centred at i * 143 / 16000 s; 4 s -> 448 frames, 1 s -> 112.
MEL_FRAMES_PER_SECOND = SAMPLE_RATE / HOP_LENGTH


def mel_window(mel: np.ndarray, start: int, length: int) -> torch.Tensor:
    """Frames [start, start + length) of a (F, T) log-mel as float32 (F, length); frames past the end are silence."""
    window = torch.from_numpy(np.asarray(mel[:, max(start, 0) : start + length], dtype=np.float32))
    if window.shape[1] < length:
        window = F.pad(window, (0, length - window.shape[1]), value=SILENCE)
    return window


def add_gain(log_mel: torch.Tensor, gain: float) -> torch.Tensor:
    """Volume jitter in the log domain: a waveform gain g scales the power mel by g^2."""
    return log_mel + 2.0 * math.log(gain)


def normalise(log_mel: torch.Tensor, mean: float, std: float) -> torch.Tensor:
    return (log_mel - mean) / std


def random_resize_crop(
    spec: torch.Tensor,
    rng: np.random.Generator,
    canvas: float = 1.5,
    freq_scale: tuple[float, float] = (0.6, 1.5),
    time_scale: tuple[float, float] = (0.6, 1.5),
) -> torch.Tensor:
    """BYOL-A RandomResizeCrop of a normalised (F, T) mel: returns (F, T).

    The zero canvas means "the dataset mean" after normalisation, so crops larger than the input zoom out onto
    neutral padding rather than onto silence.
    """
    n_freq, n_time = spec.shape
    canvas_h, canvas_w = n_freq, int(n_time * canvas)
    board = spec.new_zeros(canvas_h, canvas_w)
    top, left = (canvas_h - n_freq) // 2, (canvas_w - n_time) // 2
    board[top : top + n_freq, left : left + n_time] = spec
    h = int(np.clip(int(rng.uniform(*freq_scale) * n_freq), 1, canvas_h))
    w = int(np.clip(int(rng.uniform(*time_scale) * n_time), 1, canvas_w))
    i = int(rng.integers(0, canvas_h - h + 1))
    j = int(rng.integers(0, canvas_w - w + 1))
    crop = board[i : i + h, j : j + w][None, None]  # (1, 1, h, w)
    return F.interpolate(crop, size=(n_freq, n_time), mode="bicubic", align_corners=True)[0, 0]


def audio_views(
    mel: np.ndarray,
    start: int,
    length: int,
    mean: float,
    std: float,
    local_offsets: np.ndarray | None = None,
    local_length: int = 0,
    rng: np.random.Generator | None = None,
    global_gain: tuple[float, float] = (1.0, 1.0),
    local_gain: tuple[float, float] = (1.0, 1.0),
    canvas: float = 1.5,
    freq_scale: tuple[float, float] = (0.6, 1.5),
    time_scale: tuple[float, float] = (0.6, 1.5),
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The global (1, F, length) and local (L', 1, F, local_length) views of one sample.

    Args:
        mel: unnormalised natural-log mel (F, T) from the shard.
        start, length: the global window in mel frames (the video's window, see `views.py`).
        mean, std: normalisation statistics.
        local_offsets: start of each local view inside the global window; None for no local view.
        rng: draws the gains and crops; None means evaluation (no gain, no crop).
        global_gain, local_gain: volume-jitter ranges.
        canvas, freq_scale, time_scale: BYOL-A random resize crop of the local views.
    """
    raw = mel_window(mel, start, length)
    gain = rng.uniform(*global_gain) if rng is not None else 1.0
    global_view = normalise(add_gain(raw, gain), mean, std)[None]
    if local_offsets is None or len(local_offsets) == 0:
        return global_view, None
    locals_ = []
    for offset in local_offsets:
        segment = raw[:, int(offset) : int(offset) + local_length]
        if rng is not None:
            segment = normalise(add_gain(segment, rng.uniform(*local_gain)), mean, std)
            segment = random_resize_crop(segment, rng, canvas, freq_scale, time_scale)
        else:
            segment = normalise(segment, mean, std)
        locals_.append(segment[None])
    return global_view, torch.stack(locals_)
