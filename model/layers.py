"""Transformer building blocks shared by the encoders and decoders: patchify/unpatchify, the linear patch
embedding, attention, MLP and the pre-norm block (method sheet 1.1-1.3).

One patch layout serves both modalities: an input (B, C, *S) with S = (T, H, W) for video or (F, T) for audio is
cut into non-overlapping patches, tokens ordered grid-major over S (video t, h, w; audio freq, time) and each
patch flattened as (*patch, C) with the channel fastest, exactly as the released code's rearrange. The patch
embedding is that rearrange followed by one Linear, equivalent to a strided Conv3d/Conv2d.

These are written in plain torch rather than taken from timm: timm's `Attention` does not expose its attention
probabilities, which the teacher's refinement needs from the last block, and the remaining pieces (MLP, block)
are a few lines each; the parameter names (`qkv`, `proj`, `fc1`, `fc2`, `norm1`, `norm2`) follow timm's ViT.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def patchify(x: Tensor, patch: tuple[int, ...]) -> Tensor:
    """Cut (B, C, *S) into patches: returns (B, N, prod(patch) * C), N = prod(S_i / patch_i).

    Tokens are ordered grid-major over S; inside a patch the flatten order is (*patch, C), channel fastest.
    """
    b, c, *sizes = x.shape
    if len(sizes) != len(patch) or any(s % p for s, p in zip(sizes, patch)):
        raise ValueError(f"patchify: input spatial shape {tuple(sizes)} is not divisible by patch {patch}")
    grid = [s // p for s, p in zip(sizes, patch)]
    k = len(patch)
    # (B, C, g0, p0, g1, p1, ...) -> (B, g0, g1, ..., p0, p1, ..., C)
    x = x.reshape(b, c, *[d for g, p in zip(grid, patch) for d in (g, p)])
    x = x.permute(0, *[2 + 2 * i for i in range(k)], *[3 + 2 * i for i in range(k)], 1)
    return x.reshape(b, math.prod(grid), math.prod(patch) * c)


def unpatchify(patches: Tensor, patch: tuple[int, ...], grid: tuple[int, ...], channels: int) -> Tensor:
    """Inverse of `patchify`: (B, N, prod(patch) * C) -> (B, C, *[g * p for the grid and patch])."""
    b = patches.shape[0]
    k = len(patch)
    x = patches.reshape(b, *grid, *patch, channels)
    # (B, g0, g1, ..., p0, p1, ..., C) -> (B, C, g0, p0, g1, p1, ...)
    x = x.permute(0, 2 * k + 1, *[d for i in range(k) for d in (1 + i, 1 + k + i)])
    return x.reshape(b, channels, *[g * p for g, p in zip(grid, patch)])


class PatchEmbed(nn.Module):
    """Non-overlapping patches projected by one Linear: (B, C, *S) -> (B, N, D)."""

    def __init__(self, patch: tuple[int, ...], in_chans: int, dim: int) -> None:
        super().__init__()
        self.patch = tuple(patch)
        self.proj = nn.Linear(math.prod(patch) * in_chans, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(patchify(x, self.patch))


class Attention(nn.Module):
    """Multi-head self-attention. `fused` uses torch's scaled_dot_product_attention; otherwise softmax(QK^T)V is
    written out (the reference the fused path is tested against)."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = False, fused: bool = True) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.fused = fused
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def _qkv(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        b, n, d = x.shape
        # (B, N, 3D) -> (3, B, H, N, D/H)
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        return q, k, v

    def _merge(self, x: Tensor) -> Tensor:
        b, h, n, dh = x.shape
        return self.proj(x.transpose(1, 2).reshape(b, n, h * dh))  # (B, H, N, D/H) -> (B, N, D)

    def forward(self, x: Tensor) -> Tensor:
        """(B, N, D) -> (B, N, D)."""
        q, k, v = self._qkv(x)
        if self.fused:
            return self._merge(F.scaled_dot_product_attention(q, k, v))
        attn = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)  # (B, H, N, N)
        return self._merge(attn @ v)

    def forward_with_cls_attention(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(B, N, D) -> output (B, N, D) and the softmax attention of token 0 (CLS) over all tokens (B, H, N).

        Only the CLS row is formed explicitly (O(N) instead of the O(N^2) attention map); the output itself
        still goes through the configured kernel.
        """
        q, k, v = self._qkv(x)
        cls_attn = ((q[:, :, :1] * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)[:, :, 0]  # (B, H, N)
        if self.fused:
            return self._merge(F.scaled_dot_product_attention(q, k, v)), cls_attn
        attn = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)  # (B, H, N, N)
        return self._merge(attn @ v), cls_attn


class Mlp(nn.Module):
    """Linear -> GELU -> Linear."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block (no dropout, no drop-path: method sheet 1.2)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, qkv_bias: bool, fused: bool) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias, fused=fused)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))

    def forward_with_cls_attention(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Like `forward`, also returning the CLS attention row (B, H, N) of this block."""
        y, cls_attn = self.attn.forward_with_cls_attention(self.norm1(x))
        x = x + y
        return x + self.mlp(self.norm2(x)), cls_attn


def build_blocks(
    dim: int, depth: int, num_heads: int, mlp_ratio: float, qkv_bias: bool, fused: bool
) -> nn.ModuleList:
    """A stack of `depth` blocks, xavier-initialised (a separate object so MAS/MATS can share one stack)."""
    blocks = nn.ModuleList(Block(dim, num_heads, mlp_ratio, qkv_bias, fused) for _ in range(depth))
    blocks.apply(init_xavier)
    return blocks


@torch.no_grad()
def init_xavier(module: nn.Module) -> None:
    """MAE/XKD init: xavier-uniform Linear weights with zero bias, LayerNorm weight 1 and bias 0."""
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm) and module.elementwise_affine:
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
