"""Patchify/unpatchify layout, patch embedding, block shapes, and SDPA against explicit attention."""

from __future__ import annotations

import pytest
import torch

from xkd.model.layers import Attention, Block, PatchEmbed, patchify, unpatchify


def test_video_patchify_layout() -> None:
    # (B, C, T, H, W) with tubelet (2, 2, 2): tokens t-major then h then w; inside a patch (t, h, w, c), c fastest.
    x = torch.arange(1 * 3 * 4 * 4 * 6, dtype=torch.float32).reshape(1, 3, 4, 4, 6)
    p = patchify(x, (2, 2, 2))
    assert p.shape == (1, 2 * 2 * 3, 2 * 2 * 2 * 3)
    token = 1 * (2 * 3) + 0 * 3 + 2  # grid position (t=1, h=0, w=2)
    expected = x[0, :, 2:4, 0:2, 4:6].permute(1, 2, 3, 0).reshape(-1)
    assert torch.equal(p[0, token], expected)


def test_audio_patchify_layout() -> None:
    # (B, 1, F, T) with patch (2, 3): tokens freq-major then time; inside a patch (freq, time), time fastest.
    x = torch.arange(4 * 9, dtype=torch.float32).reshape(1, 1, 4, 9)
    p = patchify(x, (2, 3))
    assert p.shape == (1, 2 * 3, 6)
    assert torch.equal(p[0, 1], torch.tensor([3.0, 4.0, 5.0, 12.0, 13.0, 14.0]))  # freq row 0, time column 1
    assert torch.equal(p[0, 3], x[0, 0, 2:4, 0:3].reshape(-1))  # freq row 1, time column 0


@pytest.mark.parametrize(
    ("shape", "patch"),
    [((2, 3, 8, 32, 32), (2, 8, 8)), ((2, 1, 16, 32), (4, 8)), ((1, 3, 32, 112, 112), (4, 16, 16))],
)
def test_unpatchify_inverts_patchify(shape: tuple[int, ...], patch: tuple[int, ...]) -> None:
    x = torch.randn(shape)
    grid = tuple(s // p for s, p in zip(shape[2:], patch))
    assert torch.equal(unpatchify(patchify(x, patch), patch, grid, shape[1]), x)


def test_patchify_rejects_untileable_input() -> None:
    with pytest.raises(ValueError, match="not divisible"):
        patchify(torch.randn(1, 3, 8, 30, 32), (2, 8, 8))


def test_patch_embed_is_a_strided_convolution() -> None:
    embed = PatchEmbed((2, 8, 8), 3, 16)
    conv = torch.nn.Conv3d(3, 16, kernel_size=(2, 8, 8), stride=(2, 8, 8))
    with torch.no_grad():
        # Linear input order is (t, h, w, c): move c to the front for the conv kernel.
        conv.weight.copy_(embed.proj.weight.reshape(16, 2, 8, 8, 3).permute(0, 4, 1, 2, 3))
        conv.bias.copy_(embed.proj.bias)
    x = torch.randn(2, 3, 4, 16, 24)
    expected = conv(x).flatten(2).transpose(1, 2)  # (B, N, D), tokens t-major
    torch.testing.assert_close(embed(x), expected, rtol=1e-5, atol=1e-5)


def test_block_shapes_and_cls_attention() -> None:
    block = Block(32, 2, 4.0, qkv_bias=False, fused=True)
    x = torch.randn(3, 9, 32)
    y, cls_attn = block.forward_with_cls_attention(x)
    assert block(x).shape == y.shape == (3, 9, 32)
    assert cls_attn.shape == (3, 2, 9)
    torch.testing.assert_close(cls_attn.sum(-1), torch.ones(3, 2))
    assert block.attn.qkv.bias is None


def test_sdpa_and_explicit_attention_agree() -> None:
    torch.manual_seed(0)
    fused = Attention(32, 4, fused=True)
    explicit = Attention(32, 4, fused=False)
    explicit.load_state_dict(fused.state_dict())
    x = torch.randn(2, 17, 32)
    torch.testing.assert_close(fused(x), explicit(x), rtol=1e-5, atol=1e-6)
    (out_f, attn_f), (out_e, attn_e) = (
        fused.forward_with_cls_attention(x),
        explicit.forward_with_cls_attention(x),
    )
    torch.testing.assert_close(out_f, out_e, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(attn_f, attn_e)
    # The CLS row equals row 0 of the full attention map.
    q, k, _ = explicit._qkv(x)
    full = ((q * explicit.scale) @ k.transpose(-2, -1)).softmax(-1)
    torch.testing.assert_close(attn_e, full[:, :, 0])
