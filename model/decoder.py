"""Masked-reconstruction decoder, one per modality (method sheet 1.3).

Encoder output (CLS + visible tokens, after the final LN) -> Linear to the decoder width -> a learnable mask token
at every masked position, original order restored, CLS kept first -> learnable positional embeddings -> blocks ->
Linear to the raw patch size. As in the release (and unlike MAE) there is no LayerNorm before the prediction and the
decoder positional embeddings are learnt, not sin-cos. The decoder only ever sees the global view.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from xkd.model.layers import build_blocks, init_xavier
from xkd.model.masking import restore_order


class Decoder(nn.Module):
    """Predicts every patch of the global view from the visible tokens.

    Args:
        in_dim: encoder width.
        dim, depth, num_heads, mlp_ratio, qkv_bias, fused: decoder block settings.
        num_tokens: patch tokens N of the global view.
        patch_dim: raw values per patch (3072 for video tubelets, 64 for audio patches).
    """

    def __init__(
        self,
        in_dim: int,
        dim: int,
        depth: int,
        num_heads: int,
        mlp_ratio: float,
        qkv_bias: bool,
        fused: bool,
        num_tokens: int,
        patch_dim: int,
    ) -> None:
        super().__init__()
        self.embed = nn.Linear(in_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + num_tokens, dim))
        self.blocks = build_blocks(dim, depth, num_heads, mlp_ratio, qkv_bias, fused)
        self.pred = nn.Linear(dim, patch_dim)
        init_xavier(self.embed)
        init_xavier(self.pred)
        nn.init.normal_(self.mask_token, std=0.02)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)

    def forward(self, latent: Tensor, ids_restore: Tensor) -> Tensor:
        """(B, 1 + K, D_enc) encoder tokens and (B, N) ids_restore -> (B, N, patch_dim) predicted patches."""
        x = self.embed(latent)  # (B, 1 + K, D_dec)
        x = torch.cat(
            [x[:, :1], restore_order(x[:, 1:], self.mask_token, ids_restore)], dim=1
        )  # (B, 1 + N, D_dec)
        x = x + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.pred(x[:, 1:])  # CLS output dropped
