"""The ViT encoder, one class for both modalities (method sheet 1.1-1.2), and `build_encoder` for evaluation.

Video input (B, C, T, H, W) is cut into tubelets, audio (B, 1, F, T) into (freq, time) patches; a CLS token and
learnable positional embeddings sized for the global view are added, then pre-norm blocks and a final LayerNorm.
Other input sizes (local views, 224 px fine-tuning, other audio lengths) interpolate the patch part of the
positional embedding: trilinearly over (t, h, w) for video, bicubically along time only for audio (the number of
mel bins must match). The embedding is always the mean of the final-LN patch tokens, CLS excluded; the CLS token
matters only through the teacher's last-layer CLS attention.

In the MAS/MATS variants one `blocks` ModuleList instance is handed to both modalities' encoders, so each encoder's
`state_dict` still holds the blocks under `blocks.*` and loads alone.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from xkd.model.config import Modality, ModelConfig
from xkd.model.layers import PatchEmbed, build_blocks, init_xavier
from xkd.model.masking import random_masking


class Encoder(nn.Module):
    """ViT encoder for one modality.

    Args:
        modality: "video" (3-D tubelet grid) or "audio" (2-D freq x time grid).
        patch: patch extent per spatial axis.
        grid: token grid of the global view, the size the positional embeddings are learnt at.
        in_chans: input channels.
        dim: token width.
        blocks: the transformer block stack (built by `build_blocks`; shared between encoders in MAS/MATS).
    """

    def __init__(
        self,
        modality: Modality,
        patch: tuple[int, ...],
        grid: tuple[int, ...],
        in_chans: int,
        blocks: nn.ModuleList,
    ) -> None:
        super().__init__()
        dim = blocks[0].norm1.normalized_shape[0]
        self.modality = modality
        self.grid = tuple(grid)
        self.embed_dim = dim
        self.num_heads = blocks[0].attn.num_heads
        self.patch_embed = PatchEmbed(patch, in_chans, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + math.prod(grid), dim))
        self.blocks = blocks
        self.norm = nn.LayerNorm(dim)
        init_xavier(self.patch_embed.proj)
        init_xavier(self.norm)
        nn.init.normal_(self.cls_token, std=0.02)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)

    # ---- tokenisation ----
    def token_grid(self, shape: torch.Size | tuple[int, ...]) -> tuple[int, ...]:
        """Token grid of an input of `shape` (B, C, *S); raises if S is not divisible by the patch."""
        sizes, patch = tuple(shape[2:]), self.patch_embed.patch
        if len(sizes) != len(patch) or any(s % p for s, p in zip(sizes, patch)):
            raise ValueError(
                f"{self.modality} encoder: input of shape {tuple(shape)} does not tile into patches {patch} "
                f"(expected (B, C, {', '.join('k*' + str(p) for p in patch)}))"
            )
        return tuple(s // p for s, p in zip(sizes, patch))

    def patch_pos_embed(self, grid: tuple[int, ...]) -> Tensor:
        """Positional embeddings of the patch tokens for a token `grid`: (1, prod(grid), D)."""
        pos = self.pos_embed[:, 1:]
        if tuple(grid) == self.grid:
            return pos
        d = pos.shape[-1]
        pos = pos.reshape(1, *self.grid, d).movedim(-1, 1)  # (1, D, *grid)
        if len(grid) == 3:
            pos = F.interpolate(pos, size=grid, mode="trilinear", align_corners=False)
        else:
            if grid[0] != self.grid[0]:
                raise ValueError(
                    f"audio encoder: input has {grid[0]} frequency rows of patches, the model was built for "
                    f"{self.grid[0]}: audio positional embeddings are interpolated along time only, so the "
                    "number of mel bins must match ModelConfig.audio_mels"
                )
            # Bicubic on a (freq, time) grid whose freq size is unchanged is exact along freq: time-only.
            pos = F.interpolate(pos, size=grid, mode="bicubic", align_corners=False)
        return pos.movedim(1, -1).reshape(1, math.prod(grid), d)

    def embed(self, x: Tensor) -> Tensor:
        """Patch tokens plus positional embeddings, before masking (MAE order): (B, C, *S) -> (B, N, D)."""
        grid = self.token_grid(x.shape)  # checks the shape first, for a message naming the modality
        return self.patch_embed(x) + self.patch_pos_embed(grid)

    def _prepend_cls(self, tokens: Tensor) -> Tensor:
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(tokens.shape[0], -1, -1)
        return torch.cat([cls, tokens], dim=1)  # (B, 1 + N, D)

    # ---- forward passes ----
    def forward(self, x: Tensor) -> Tensor:
        """Token-level forward (fine-tuning): (B, C, *S) -> final-LN tokens (B, 1 + N, D), CLS first."""
        x = self._prepend_cls(self.embed(x))
        for block in self.blocks:
            x = block(x)
        return self.norm(x)

    def forward_features(self, x: Tensor) -> Tensor:
        """Pooled embedding for evaluation and heads: (B, C, *S) -> (B, D), mean of the patch tokens."""
        return self.forward(x)[:, 1:].mean(dim=1)

    def forward_masked(self, x: Tensor, mask_ratio: float) -> tuple[Tensor, Tensor, Tensor]:
        """MAE encoder pass on a random subset of tokens.

        Returns:
            tokens: (B, 1 + K, D) final-LN CLS and visible tokens, K = round(N (1 - mask_ratio)).
            mask: (B, N) float, 1 at masked positions, in the original token order.
            ids_restore: (B, N) permutation that puts [visible; masked] back in the original order.
        """
        tokens = self.embed(x)
        tokens, mask, ids_restore = random_masking(tokens, mask_ratio)
        x = self._prepend_cls(tokens)
        for block in self.blocks:
            x = block(x)
        return self.norm(x), mask, ids_restore

    def forward_with_attention(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Teacher pass: final-LN tokens (B, 1 + N, D) and the last block's CLS-to-patch attention (B, H, N)."""
        x = self._prepend_cls(self.embed(x))
        for block in self.blocks[:-1]:
            x = block(x)
        x, cls_attn = self.blocks[-1].forward_with_cls_attention(x)
        return self.norm(x), cls_attn[:, :, 1:]


def build_encoder(cfg: ModelConfig, modality: Modality, blocks: nn.ModuleList | None = None) -> Encoder:
    """The encoder of `modality` for `cfg`, with its own blocks unless a shared stack is given.

    A standalone encoder's state_dict keys equal those of `XKD(cfg).encoders()[modality]`, so an export loads into
    it directly (`enc.load_state_dict(tensors_with_prefix_stripped)`).
    """
    if modality not in ("video", "audio"):
        raise ValueError(f"build_encoder: modality must be 'video' or 'audio', got {modality!r}")
    if blocks is None:
        blocks = build_blocks(
            cfg.embed_dim,
            cfg.depth,
            cfg.num_heads,
            cfg.mlp_ratio,
            cfg.qkv_bias,
            fused=cfg.attention == "sdpa",
        )
    return Encoder(modality, cfg.patch(modality), cfg.grid(modality), cfg.in_chans(modality), blocks)
