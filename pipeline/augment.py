"""Photometric video augmentation and ImageNet normalisation, implemented once on a batch tensor.

Implements `../shared/xkd-method.md` 3.2: ColorJitter (brightness, contrast, saturation 0.4, hue 0.2) in a random
order, applied always and with the same factors on every frame of a view; grayscale (p 0.2) and Gaussian blur
(p 0.5, kernel 9, sigma U(0.1, 2)) on local views; then x / 255 and ImageNet mean/std. The operations follow
torchvision's definitions for float images (contrast blends with the mean gray level of each frame, every step
clamps to [0, 1]).

The random factors are drawn per sample by the shard reader (`draw_photometric`), so both decoding paths apply
identical augmentations; `photometric` applies them to a whole batch on whatever device it lives on
(`DataConfig.augment_device`: the GPU on the DALI `mixed` path and, when CUDA is available, on the CPU-decoding
paths; otherwise the PyAV reader workers or the main process on DALI `cpu`). `augmented_batch` is the one place
that turns decoded uint8 views into the `Batch`, on every path.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from xkd.pipeline.batch import Batch
from xkd.pipeline.config import DataConfig

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_GRAY = (0.2989, 0.587, 0.114)  # ITU-R 601 luma, as torchvision's rgb_to_grayscale

PHOTOMETRIC_KEYS = ("jitter", "factors", "order", "gray", "blur", "sigma")


def draw_photometric(rng: np.random.Generator | None, cfg: DataConfig, local: bool) -> dict[str, np.ndarray]:
    """Random photometric parameters of one view; identity when `rng` is None or `cfg.augment` is off.

    `factors` are (brightness, contrast, saturation, hue shift); `order` is the permutation in which the four
    jitter operations run.
    """
    identity = {
        "jitter": np.bool_(False),
        "factors": np.array([1.0, 1.0, 1.0, 0.0], dtype=np.float32),
        "order": np.arange(4),
        "gray": np.bool_(False),
        "blur": np.bool_(False),
        "sigma": np.float32(1.0),
    }
    if rng is None or not cfg.augment:
        return identity
    b, c, s, h = cfg.video_brightness, cfg.video_contrast, cfg.video_saturation, cfg.video_hue
    return {
        "jitter": np.bool_(rng.random() < cfg.video_jitter_p),
        "factors": np.array(
            [
                rng.uniform(max(0.0, 1 - b), 1 + b),
                rng.uniform(max(0.0, 1 - c), 1 + c),
                rng.uniform(max(0.0, 1 - s), 1 + s),
            ]
            + [rng.uniform(-h, h)],
            dtype=np.float32,
        ),
        "order": rng.permutation(4),
        "gray": np.bool_(rng.random() < (cfg.video_local_grayscale_p if local else cfg.video_grayscale_p)),
        "blur": np.bool_(rng.random() < (cfg.video_local_blur_p if local else cfg.video_blur_p)),
        "sigma": np.float32(rng.uniform(*cfg.video_blur_sigma)),
    }


def collate_photometric(params: list[dict[str, np.ndarray]]) -> dict[str, torch.Tensor]:
    """Stack per-sample parameters into batch tensors: factors (B, 4), order (B, 4), the rest (B,)."""
    return {k: torch.from_numpy(np.stack([p[k] for p in params])) for k in PHOTOMETRIC_KEYS}


def _gray(x: torch.Tensor) -> torch.Tensor:
    """(N, 3, T, H, W) -> (N, 1, T, H, W) luma."""
    r, g, b = x.unbind(1)
    return (_GRAY[0] * r + _GRAY[1] * g + _GRAY[2] * b).unsqueeze(1)


def _per_sample(values: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return values.to(x.dtype).view(-1, *([1] * (x.dim() - 1)))


# The jitter operations work in place where they can: on the CPU path a batch of global views is ~150 MB of
# float32 and every extra pass over it costs more than the arithmetic.
def _brightness(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    return x.mul_(_per_sample(f, x)).clamp_(0, 1)


def _contrast(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    mean = _gray(x).mean(dim=(-2, -1), keepdim=True)  # (N, 1, T, 1, 1): per frame, as torchvision per image
    f = _per_sample(f, x)
    return x.mul_(f).add_(mean.mul_(1 - f)).clamp_(0, 1)


def _saturation(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    f = _per_sample(f, x)
    gray = _gray(x).mul_(1 - f)
    return x.mul_(f).add_(gray).clamp_(0, 1)


def _hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate the hue by `shift` turns: RGB -> HSV, h += shift (mod 1), HSV -> RGB (torchvision's adjust_hue).

    V = max and V*S = max - min are kept, so only the hue (in sixths of a turn) is computed and rotated.
    """
    r, g, b = x.unbind(1)
    maxc, minc = x.amax(1), x.amin(1)
    delta = maxc - minc
    safe = torch.where(delta > 0, delta, torch.ones_like(delta))
    h = torch.where(
        maxc == r,
        (g - b).div_(safe),
        torch.where(maxc == g, (b - r).div_(safe).add_(2), (r - g).div_(safe).add_(4)),
    )
    h = h.add_(_per_sample(shift, h) * 6)  # gray pixels (delta 0) come out unchanged whatever their hue

    def channel(n: float) -> torch.Tensor:
        k = torch.remainder(h + n, 6)
        return torch.minimum(k, 4 - k).clamp_(0, 1).mul_(delta).neg_().add_(maxc)

    return torch.stack([channel(5), channel(3), channel(1)], 1)


_JITTER_OPS = (_brightness, _contrast, _saturation, _hue)


def _blur(x: torch.Tensor, sigma: torch.Tensor, kernel: int) -> torch.Tensor:
    """Per-sample Gaussian blur of every frame, separable, reflect padding (torchvision's GaussianBlur)."""
    n, c, t, h, w = x.shape
    radius = kernel // 2
    taps = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
    weights = torch.exp(-0.5 * (taps[None] / sigma.to(x)[:, None]) ** 2)
    weights = (weights / weights.sum(1, keepdim=True))[:, None]  # (N, 1, kernel)
    # Rows become the conv batch and samples the channels, so one grouped conv1d blurs every sample with its sigma.
    rows = x.permute(1, 2, 3, 0, 4).reshape(c * t * h, n, w)
    rows = F.conv1d(F.pad(rows, (radius, radius), mode="reflect"), weights, groups=n)
    cols = rows.reshape(c, t, h, n, w).permute(0, 1, 4, 3, 2).reshape(c * t * w, n, h)
    cols = F.conv1d(F.pad(cols, (radius, radius), mode="reflect"), weights, groups=n)
    return cols.reshape(c, t, w, n, h).permute(3, 0, 1, 4, 2)


def photometric(video: torch.Tensor, params: dict[str, torch.Tensor], blur_kernel: int = 9) -> torch.Tensor:
    """Augment and normalise a batch of clips.

    Args:
        video: (B, T, H, W, 3) uint8 clips (the decoders' layout).
        params: `collate_photometric` output for the B clips.
        blur_kernel: Gaussian-blur kernel size.

    Returns:
        (B, 3, T, H, W) float32, ImageNet-normalised.
    """
    b, t, h, w, _ = video.shape
    x = torch.empty((b, 3, t, h, w), dtype=torch.float32, device=video.device)
    x.copy_(
        video.permute(0, 4, 1, 2, 3)
    )  # one pass: uint8 (B, T, H, W, 3) -> contiguous float (B, 3, T, H, W)
    params = {k: v.to(x.device) for k, v in params.items()}
    jitter, gray, blur = params["jitter"].bool(), params["gray"].bool(), params["blur"].bool()
    unit = bool(jitter.any() or gray.any() or blur.any())
    if unit:
        x.mul_(1 / 255)  # the colour operations work on [0, 1] images, like torchvision's
        for slot in range(4):
            for op_index, op in enumerate(_JITTER_OPS):
                x = _apply(
                    x, jitter & (params["order"][:, slot] == op_index), op, params["factors"][:, op_index]
                )
        x = _apply(x, gray, lambda v, _: _gray(v).expand(-1, 3, -1, -1, -1), params["sigma"])
        x = _apply(x, blur, lambda v, sigma: _blur(v, sigma, blur_kernel), params["sigma"])
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1, 1)
    # (x / 255 - mean) / std, with the 1/255 folded into the scale when no colour operation ran.
    return x.mul_(1 / std if unit else 1 / (255 * std)).sub_(mean / std)


def _apply(x: torch.Tensor, chosen: torch.Tensor, op, values: torch.Tensor) -> torch.Tensor:
    """`op(x[chosen], values[chosen])` written back; the whole batch without copies when every sample is chosen."""
    if not chosen.any():
        return x
    if chosen.all():
        return op(x, values)
    index = chosen.nonzero().squeeze(1)
    x[index] = op(x[index], values[index])
    return x


def video_views_batch(
    video_global: torch.Tensor,
    video_local: list[torch.Tensor],
    photo_global: dict[str, torch.Tensor],
    photo_local: list[dict[str, torch.Tensor]],
    blur_kernel: int = 9,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Augment and normalise the decoded views of a batch, as both decoding paths hand them over.

    Args:
        video_global: (B, T, H, W, 3) uint8.
        video_local: L tensors (B, T_l, H_l, W_l, 3) uint8.
        photo_global, photo_local: collated parameters of the global view and of each local view.

    Returns:
        (B, 3, T, H, W) float32 and (L, B, 3, T_l, H_l, W_l) float32 (None when L = 0).
    """
    global_view = photometric(video_global, photo_global, blur_kernel)
    if not video_local:
        return global_view, None
    return global_view, torch.stack(
        [photometric(v, p, blur_kernel) for v, p in zip(video_local, photo_local)]
    )


def augmented_batch(
    side: dict[str, object],
    video_global: torch.Tensor,
    video_local: list[torch.Tensor],
    device: torch.device,
    blur_kernel: int = 9,
) -> Batch:
    """The `Batch` of one batch of decoded uint8 views, augmented and normalised on `device`.

    Args:
        side: the reader's other fields: the `Batch` fields but the video ones, plus `photo_global` and
            `photo_local` (the collated photometric parameters), which are consumed.
        video_global, video_local: as `video_views_batch` takes them, on any device (copied to `device` as uint8).
    """
    photo_global, photo_local = side.pop("photo_global"), side.pop("photo_local")
    global_view, local_views = video_views_batch(
        video_global.to(device, non_blocking=True),
        [v.to(device, non_blocking=True) for v in video_local],
        photo_global,
        photo_local,
        blur_kernel,
    )
    return Batch(video_global=global_view, video_local=local_views, **side)
