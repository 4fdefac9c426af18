"""The projector head and the token pooling that feeds it (method sheet 1.4, 2.3 and 2.4).

`ProjectorHead` is the DINO/iBOT-style `2048-gelu-3-256-8192-norm3` head: Linear -> LN -> GELU -> Linear -> the
*same* LN -> GELU -> Linear to the bottleneck, L2-normalise, weight-normalised prototype layer with the magnitude g
fixed to 1, then a non-affine LayerNorm over the K outputs.

The frozen-g weight norm is written as a plain `weight` parameter whose rows are L2-normalised in `forward`. With
g == 1 this is exactly `weight_norm(..., g frozen at 1)` (same function of v, same gradient: the component of the
upstream gradient orthogonal to each row, scaled by 1/||v||) but it has a single ordinary parameter, so EMA
copies, `state_dict` and optimizers need no special case.

Pooling: students and plain teachers average the patch tokens; the refined teacher re-weights them with the
cross-modal CLS attention and rescales so the pooled vector keeps the plain mean's norm.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class NormalizedLinear(nn.Module):
    """Bias-free Linear whose weight rows are L2-normalised (weight norm with g fixed to 1)."""

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_dim, in_dim))
        # Only the direction of each row matters; DINO leaves nn.Linear's default init here.
        nn.init.trunc_normal_(self.weight, std=0.02)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, F.normalize(self.weight, dim=1))


class ProjectorHead(nn.Module):
    """(B, D) pooled embedding -> (B, K) prototype logits, each row zero-mean and unit-variance over K.

    Args:
        in_dim: encoder width.
        hidden_dim: hidden width (2048).
        num_layers: Linear layers up to the bottleneck (3).
        bottleneck_dim: bottleneck width (256).
        out_dim: prototypes K (8192).
    """

    def __init__(
        self, in_dim: int, hidden_dim: int, num_layers: int, bottleneck_dim: int, out_dim: int
    ) -> None:
        super().__init__()
        dims = [in_dim] + [hidden_dim] * (num_layers - 1)
        self.hidden = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))
        # One LayerNorm module after every hidden layer: the release appends the same instance twice (iBOT quirk).
        self.norm = nn.LayerNorm(hidden_dim)
        self.act = nn.GELU()
        self.bottleneck = nn.Linear(hidden_dim, bottleneck_dim)
        self.last = NormalizedLinear(bottleneck_dim, out_dim)
        self.out_norm = nn.LayerNorm(out_dim, elementwise_affine=False)
        for layer in [*self.hidden, self.bottleneck]:
            nn.init.trunc_normal_(layer.weight, std=0.02)
            nn.init.zeros_(layer.bias)

    def forward(self, x: Tensor) -> Tensor:
        for layer in self.hidden:
            x = self.act(self.norm(layer(x)))
        x = F.normalize(self.bottleneck(x), dim=-1)  # (B, bottleneck)
        return self.out_norm(self.last(x))  # (B, K)


def mean_patch_tokens(tokens: Tensor) -> Tensor:
    """(B, 1 + N, D) encoder tokens with CLS first -> (B, D) mean of the patch tokens."""
    return tokens[:, 1:].mean(dim=1)


def refinement_weights(cls_attn_video: Tensor, cls_attn_audio: Tensor, mode: str) -> tuple[Tensor, Tensor]:
    """Cross-modal per-token weights from the teachers' last-layer CLS-to-patch attention (method sheet 2.4).

    Args:
        cls_attn_video: (B, H, N_v) video teacher CLS attention over its patch tokens.
        cls_attn_audio: (B, H, N_a) audio teacher CLS attention over its patch tokens.
        mode: "mean": r_v = a_v * mean_i a_a / mean_j a_v (and symmetrically), i.e. each modality's own attention
            with every head rescaled by the other modality's mean attention over its own; "softmax":
            r_v = softmax_j(a_v * mean_i a_a).

    Returns:
        (B, N_v) and (B, N_a) weights: r averaged over heads.
    """
    a_v, a_a = cls_attn_video.float(), cls_attn_audio.float()
    mean_v, mean_a = a_v.mean(dim=-1, keepdim=True), a_a.mean(dim=-1, keepdim=True)  # (B, H, 1)
    if mode == "mean":
        r_v, r_a = a_v * mean_a / mean_v, a_a * mean_v / mean_a
    elif mode == "softmax":
        r_v, r_a = (a_v * mean_a).softmax(dim=-1), (a_a * mean_v).softmax(dim=-1)
    else:
        raise ValueError(f"refinement_weights: mode must be 'mean' or 'softmax', got {mode!r}")
    return r_v.mean(dim=1), r_a.mean(dim=1)


def refined_pool(tokens: Tensor, weights: Tensor) -> Tensor:
    """Energy-preserving weighted pooling: s * mean_j(w_j f_j) with s = ||mean_j f_j|| / ||mean_j w_j f_j||.

    Args:
        tokens: (B, 1 + N, D) final-LN teacher tokens, CLS first (dropped here).
        weights: (B, N) per-token weights.

    Returns:
        (B, D) pooled vector with the same L2 norm as the plain mean of the patch tokens.
    """
    f = tokens[:, 1:].float()
    plain = f.mean(dim=1)
    weighted = (weights[:, :, None] * f).mean(dim=1)  # (B, D)
    scale = plain.norm(dim=-1, keepdim=True) / weighted.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return (scale * weighted).to(tokens.dtype)
