"""Random token masking for the masked-reconstruction branch (method sheet 2.2; MAE `random_masking`).

Each sample independently keeps round(N (1 - r)) tokens chosen uniformly at random (no tube or block masking).
"""

from __future__ import annotations

import torch
from torch import Tensor

from xkd.model.config import keep_count


def random_masking(tokens: Tensor, mask_ratio: float) -> tuple[Tensor, Tensor, Tensor]:
    """Keep a random subset of tokens per sample.

    Args:
        tokens: (B, N, D) patch tokens (positional embeddings already added).
        mask_ratio: fraction of tokens to drop.

    Returns:
        kept: (B, K, D) visible tokens in shuffled order, K = round(N (1 - mask_ratio)).
        mask: (B, N) float, 0 for kept and 1 for masked tokens, in the original order.
        ids_restore: (B, N) long; gathering [kept; masked] along N with it restores the original order.
    """
    b, n, d = tokens.shape
    keep = keep_count(n, mask_ratio)
    if keep < 1:
        raise ValueError(f"random_masking: mask_ratio={mask_ratio} keeps no token of {n}")
    noise = torch.rand(b, n, device=tokens.device)
    ids_shuffle = noise.argsort(dim=1)  # ascending: the first `keep` are kept
    ids_restore = ids_shuffle.argsort(dim=1)
    kept = tokens.gather(1, ids_shuffle[:, :keep, None].expand(-1, -1, d))
    mask = torch.ones(b, n, device=tokens.device)
    mask[:, :keep] = 0
    return kept, mask.gather(1, ids_restore), ids_restore


def restore_order(visible: Tensor, fill: Tensor, ids_restore: Tensor) -> Tensor:
    """Put visible tokens and a fill token back into the original order.

    Args:
        visible: (B, K, D) tokens in the shuffled order of `random_masking`.
        fill: (1, 1, D) token placed at every masked position (the decoder's mask token).
        ids_restore: (B, N) from `random_masking`.

    Returns:
        (B, N, D) tokens in the original order.
    """
    b, k, d = visible.shape
    n = ids_restore.shape[1]
    x = torch.cat([visible, fill.expand(b, n - k, d).to(visible.dtype)], dim=1)  # (B, N, D) shuffled order
    return x.gather(1, ids_restore[:, :, None].expand(-1, -1, d))
